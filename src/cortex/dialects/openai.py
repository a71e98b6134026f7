"""OpenAI chat completions and (legacy) completions <-> InferenceJob.

Every request field is either honoured or refused with a 400 that names it; fields that
only label a request (`user`, `metadata`, `store`, ...) are accepted and not used.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cortex.dialects import sse
from cortex.dialects.common import (
    MAX_TOKENS_LIMIT,
    Answer,
    Part,
    check_tools,
    describe,
    http_status,
    join_text,
    json_output,
    stop_list,
    thinking_for,
)
from cortex.protocol.errors import CortexError, InvalidRequest
from cortex.protocol.messages import (
    ChatMessage,
    Delta,
    Done,
    InferenceJob,
    NamedTool,
    OutputFormat,
    ReasoningDelta,
    SamplingParams,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    Usage,
)

DEFAULT_MAX_TOKENS = 1024
# Seeds within what the engines take (int64): larger ones used to fail on a node as internal errors.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


class FunctionCallIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str


class ToolCallIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Part] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCallIn] | None = None


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # the call's arguments are decoded constrained to `parameters`


class ToolDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the schema always binds here


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _Sampled(BaseModel):
    """The fields both OpenAI endpoints share."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    n: int | None = Field(None, ge=1)
    user: str | None = None  # a label
    logit_bias: dict[str, float] | None = None

    def sampling(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=stop_list(self.stop, "stop"),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=_logit_bias(self.logit_bias),
        )


class ChatCompletionRequest(_Sampled):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    # Labels only: accepted, never change the output.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


def _refuse_unsupported(req: ChatCompletionRequest) -> None:
    if req.n not in (None, 1):
        raise InvalidRequest("`n` must be 1: this server returns one choice per request; send n requests instead")
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequest("`top_logprobs` needs `logprobs: true`")


def _content(message: ChatMessageIn, index: int) -> str:
    if message.content is None:
        if message.role != "assistant" or not message.tool_calls:
            raise InvalidRequest(
                f"`messages[{index}].content` is missing; only an assistant turn with tool_calls may omit it"
            )
        return ""
    return join_text(message.content, f"messages[{index}].content", "part")


def _message(m: ChatMessageIn, index: int) -> ChatMessage:
    if m.role == "tool" and not m.tool_call_id:
        raise InvalidRequest(f"`messages[{index}].tool_call_id` is required on a tool message")
    if m.tool_calls and m.role != "assistant":
        raise InvalidRequest(f"`messages[{index}].tool_calls` is only allowed on assistant messages")
    calls = [ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments) for c in m.tool_calls or []]
    return ChatMessage(
        role="system" if m.role == "developer" else m.role,
        content=_content(m, index),
        name=m.name,
        tool_calls=calls or None,
        tool_call_id=m.tool_call_id if m.role == "tool" else None,
    )


def _output_format(response_format: ResponseFormat | None) -> OutputFormat | None:
    if response_format is None:
        return None
    spec = response_format.json_schema or JsonSchemaFormat()
    return json_output(response_format.type, spec.schema_, spec.name, "response_format")


def _tools(req: ChatCompletionRequest) -> tuple[list[Tool] | None, ToolChoice]:
    tools = [
        Tool(
            name=t.function.name,
            description=t.function.description,
            parameters=t.function.parameters or {},
            strict=bool(t.function.strict),
        )
        for t in req.tools or []
    ] or None
    choice: ToolChoice = "auto"
    if isinstance(req.tool_choice, NamedToolChoice):
        choice = NamedTool(name=req.tool_choice.function.name)
    elif req.tool_choice is not None:
        choice = req.tool_choice
    check_tools(tools, choice, "tool_choice")
    return tools, choice


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    if not bias:
        return None
    if len(bias) > 300:
        raise InvalidRequest("`logit_bias` takes at most 300 tokens")
    out = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()):
            raise InvalidRequest(f"`logit_bias` keys are token ids as strings; {key!r} is not one")
        if not -100 <= value <= 100:
            raise InvalidRequest(f"`logit_bias` values lie in -100..100; token {key} has {value}")
        out[int(key)] = value
    return out


def to_job(req: ChatCompletionRequest, model_id: str, *, job_id: str, request_id: str) -> InferenceJob:
    _refuse_unsupported(req)
    if req.max_tokens and req.max_completion_tokens and req.max_tokens != req.max_completion_tokens:
        raise InvalidRequest("`max_tokens` and `max_completion_tokens` disagree; send one of them")
    messages = [_message(m, i) for i, m in enumerate(req.messages)]
    tools, choice = _tools(req)
    sampling = req.sampling(req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_TOKENS)
    sampling.logprobs = (req.top_logprobs or 0) if req.logprobs else None
    return InferenceJob(
        job_id=job_id,
        request_id=request_id,
        model=model_id,
        messages=messages,
        sampling=sampling,
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=req.parallel_tool_calls is not False,
        reasoning=thinking_for(req.reasoning_effort),
        output_format=_output_format(req.response_format),
    )


# --- /v1/completions ------------------------------------------------------------------------------


class CompletionRequest(_Sampled):
    """The legacy prompt-completion API: the prompt goes to the model as it is, with no chat template."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    # Recognised but not served; refused by name when set.
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=5)


DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for this endpoint


def completion_prompt(req: CompletionRequest) -> str:
    prompt = req.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise InvalidRequest(
                "`prompt` must be one string (or a list of exactly one string); batches of prompts and token ids "
                "are not supported"
            )
        prompt = prompt[0]
    if not prompt:
        raise InvalidRequest("`prompt` is empty")
    return prompt


def completion_to_job(req: CompletionRequest, model_id: str, *, job_id: str, request_id: str) -> InferenceJob:
    if req.suffix:
        raise InvalidRequest("`suffix` (fill-in-the-middle) is not supported by this server; remove it")
    for name in ("n", "best_of"):
        if getattr(req, name) not in (None, 1):
            raise InvalidRequest(f"`{name}` must be 1: this server returns one choice per request")
    sampling = req.sampling(req.max_tokens or DEFAULT_COMPLETION_TOKENS)
    sampling.logprobs = req.logprobs
    prompt = completion_prompt(req)
    return InferenceJob(job_id=job_id, request_id=request_id, model=model_id, prompt=prompt, sampling=sampling)


# --- responses -------------------------------------------------------------------------------------


def usage(u: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def _finish_reason(done: Done) -> str:
    return done.finish_reason if done.finish_reason in ("length", "tool_calls") else "stop"


def _logprobs(logprobs: list[TokenLogprob] | None) -> dict[str, Any] | None:
    if logprobs is None:
        return None
    return {"content": [lp.model_dump() for lp in logprobs], "refusal": None}


class ChunkWriter:
    """Builds one chat completion, whole or as the SSE chunks OpenAI streams: the role first, then
    content, `reasoning_content` and tool-call deltas, the finish_reason chunk, the usage chunk
    when asked for, `[DONE]`."""

    object = "chat.completion"
    _chunk_object = "chat.completion.chunk"

    def __init__(self, completion_id: str, model: str, include_usage: bool) -> None:
        self._id = completion_id
        self._model = model
        self._created = int(time.time())
        self._include_usage = include_usage
        # A text chunk is the same bytes around its text every time: build those once, since this
        # runs for every token the gateway relays.
        head, _, tail = self._chunk(
            [{"index": 0, "delta": {"content": "\x00"}, "logprobs": None, "finish_reason": None}]
        ).partition(b'"\\u0000"')
        self._text_frame = (head, tail)

    def _body(self, object_: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self._id, "object": object_, "created": self._created, "model": self._model, "choices": choices}

    def _chunk(self, choices: list[dict[str, Any]]) -> bytes:
        chunk = self._body(self._chunk_object, choices)
        if self._include_usage:
            chunk["usage"] = None
        return sse.event(chunk)

    def _delta(self, delta: dict[str, Any], finish_reason: str | None = None, logprobs: Any = None) -> bytes:
        return self._chunk([{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}])

    def start(self) -> list[bytes]:
        return [self._delta({"role": "assistant", "content": ""})]

    def text(self, delta: Delta) -> list[bytes]:
        if delta.logprobs is None:
            head, tail = self._text_frame
            return [head + json.dumps(delta.text, ensure_ascii=False).encode() + tail]
        return [self._delta({"content": delta.text}, logprobs=_logprobs(delta.logprobs))]

    def reasoning(self, delta: ReasoningDelta) -> list[bytes]:
        return [self._delta({"reasoning_content": delta.text})]

    def tool_call(self, delta: ToolCallDelta) -> list[bytes]:
        call: dict[str, Any] = {"index": delta.index}
        if delta.id is not None:
            call |= {"id": delta.id, "type": "function", "function": {"name": delta.name, "arguments": delta.arguments}}
        else:
            call["function"] = {"arguments": delta.arguments}
        return [self._delta({"tool_calls": [call]})]

    def _usage_chunk(self, done: Done) -> list[bytes]:
        if not self._include_usage:
            return []
        last = self._body(self._chunk_object, [])
        last["usage"] = usage(done.usage)
        return [sse.event(last)]

    def finish(self, done: Done) -> list[bytes]:
        return [self._delta({}, _finish_reason(done)), *self._usage_chunk(done), sse.event("[DONE]")]

    def fail(self, exc: CortexError) -> list[bytes]:
        """An error after the stream began: in-band, then the end."""
        return [sse.event(error_payload(exc)), sse.event("[DONE]")]

    def keepalive(self) -> bytes:
        return b": loading the model\n\n"

    def response(self, answer: Answer, done: Done) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": answer.text, "refusal": None}
        if answer.calls:
            message["content"] = answer.text or None
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in answer.calls
            ]
        if answer.reasoning:
            message["reasoning_content"] = answer.reasoning
        choice = {
            "index": 0,
            "message": message,
            "logprobs": _logprobs(answer.logprobs),
            "finish_reason": _finish_reason(done),
        }
        return {**self._body(self.object, [choice]), "usage": usage(done.usage)}


class TextWriter(ChunkWriter):
    """The same for `/v1/completions`: `text_completion` objects, `text` instead of a message,
    no role chunk. With `echo`, the prompt comes first."""

    object = "text_completion"
    _chunk_object = "text_completion"  # streamed chunks keep the plain object name

    def __init__(self, completion_id: str, model: str, include_usage: bool, echo: str | None = None) -> None:
        super().__init__(completion_id, model, include_usage)
        self._echo = echo
        self._offset = len(echo or "")  # where the next token starts in the whole text

    def _legacy(self, logprobs: list[TokenLogprob] | None) -> dict[str, Any] | None:
        """The completions API's own logprobs shape: parallel lists, alternatives as {token: logprob}."""
        if logprobs is None:
            return None
        offsets = []
        for lp in logprobs:
            offsets.append(self._offset)
            self._offset += len(lp.token)
        return {
            "tokens": [lp.token for lp in logprobs],
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{t.token: t.logprob for t in lp.top_logprobs} for lp in logprobs],
            "text_offset": offsets,
        }

    def _text(self, text: str, finish_reason: str | None = None, logprobs: Any = None) -> bytes:
        return self._chunk([{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}])

    def start(self) -> list[bytes]:
        return [self._text(self._echo)] if self._echo else []

    def text(self, delta: Delta) -> list[bytes]:
        return [self._text(delta.text, logprobs=self._legacy(delta.logprobs))]

    def finish(self, done: Done) -> list[bytes]:
        return [self._text("", _finish_reason(done)), *self._usage_chunk(done), sse.event("[DONE]")]

    def response(self, answer: Answer, done: Done) -> dict[str, Any]:
        choice = {"index": 0, "text": (self._echo or "") + answer.text, "logprobs": self._legacy(answer.logprobs)}
        choice["finish_reason"] = _finish_reason(done)
        return {**self._body(self.object, [choice]), "usage": usage(done.usage)}


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "server_error")


def error_payload(exc: CortexError) -> dict[str, Any]:
    """OpenAI's envelope; a preflight refusal adds its structured form (kind, model, detail, suggestion)."""
    message, extra = describe(exc)
    body = error_body(message, error_type(http_status(exc.code)), exc.code.value)
    body["error"].update(extra)
    return body


class OpenAIErrorDetail(BaseModel):
    """The error object, as documented in /openapi.json; a preflight refusal adds kind, model, detail, suggestion."""

    model_config = ConfigDict(extra="allow")
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    """The body of every error response; only documents it (error_body builds it)."""

    error: OpenAIErrorDetail


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
