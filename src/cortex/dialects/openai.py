"""OpenAI chat completions and (legacy) completions <-> InferenceJob.

Every request field is either honoured or refused with a 400 that names it; fields that
only label a request (`user`, `metadata`, `store`, ...) are accepted and not used.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cortex.dialects import sse
from cortex.dialects.common import Part, describe, http_status, join_text, stop_list
from cortex.protocol.errors import CortexError, InvalidRequest
from cortex.protocol.messages import ChatMessage, Done, InferenceJob, SamplingParams, Usage

DEFAULT_MAX_TOKENS = 1024


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Part] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _Sampled(BaseModel):
    """The fields both OpenAI endpoints share."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    n: int | None = Field(None, ge=1)
    user: str | None = None  # a label
    logit_bias: dict[str, float] | None = None  # refused when set

    def sampling(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=stop_list(self.stop, "stop"),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
        )


class ChatCompletionRequest(_Sampled):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    # Labels only: accepted, never change the output.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # Recognised but not served yet; refused by name when set (see `_refuse_unsupported`).
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    reasoning_effort: str | None = None


_UNSUPPORTED = ("tools", "tool_choice", "logit_bias", "top_logprobs", "reasoning_effort")


def _refuse_unsupported(req: ChatCompletionRequest) -> None:
    for name in _UNSUPPORTED:
        if getattr(req, name) not in (None, [], {}):
            raise InvalidRequest(f"`{name}` is not supported by this server yet; remove it from the request")
    if req.logprobs:
        raise InvalidRequest("`logprobs` is not supported by this server yet; remove it or set it to false")
    if req.n not in (None, 1):
        raise InvalidRequest("`n` must be 1: this server returns one choice per request")
    if req.response_format and req.response_format.get("type") not in (None, "text"):
        raise InvalidRequest("`response_format` other than text is not supported yet")


def _content(message: ChatMessageIn, index: int) -> str:
    if message.content is None:
        if message.tool_calls:
            raise InvalidRequest(f"`messages[{index}].tool_calls` is not supported by this server yet")
        return ""
    return join_text(message.content, f"messages[{index}].content", "part")


def to_job(req: ChatCompletionRequest, model_id: str, *, job_id: str, request_id: str) -> InferenceJob:
    _refuse_unsupported(req)
    if req.max_tokens and req.max_completion_tokens and req.max_tokens != req.max_completion_tokens:
        raise InvalidRequest("`max_tokens` and `max_completion_tokens` disagree; send one of them")
    messages = [
        ChatMessage(
            role="system" if m.role == "developer" else m.role,
            content=_content(m, i),
            name=m.name,
        )
        for i, m in enumerate(req.messages)
    ]
    sampling = req.sampling(req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_TOKENS)
    return InferenceJob(job_id=job_id, request_id=request_id, model=model_id, messages=messages, sampling=sampling)


# --- /v1/completions ------------------------------------------------------------------------------


class CompletionRequest(_Sampled):
    """The legacy prompt-completion API: the prompt goes to the model as it is, with no chat template."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    # Recognised but not served; refused by name when set.
    suffix: str | None = None
    logprobs: int | None = None


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
    for name in ("suffix", "logit_bias"):
        if getattr(req, name) not in (None, {}):
            raise InvalidRequest(f"`{name}` is not supported by this server; remove it from the request")
    if req.logprobs is not None:
        raise InvalidRequest("`logprobs` is not supported by this server; remove it from the request")
    for name in ("n", "best_of"):
        if getattr(req, name) not in (None, 1):
            raise InvalidRequest(f"`{name}` must be 1: this server returns one choice per request")
    sampling = req.sampling(req.max_tokens or DEFAULT_COMPLETION_TOKENS)
    prompt = completion_prompt(req)
    return InferenceJob(job_id=job_id, request_id=request_id, model=model_id, prompt=prompt, sampling=sampling)


# --- responses -------------------------------------------------------------------------------------


def usage(u: Usage) -> dict[str, int]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens}


def _finish_reason(done: Done) -> str:
    return "length" if done.finish_reason == "length" else "stop"


class ChunkWriter:
    """Builds one chat completion, whole or as the SSE chunks OpenAI streams: the role first, then
    content deltas, the finish_reason chunk, the usage chunk when asked for, `[DONE]`."""

    object = "chat.completion"

    def __init__(self, completion_id: str, model: str, include_usage: bool) -> None:
        self._id = completion_id
        self._model = model
        self._created = int(time.time())
        self._include_usage = include_usage

    def _body(self, object_: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self._id, "object": object_, "created": self._created, "model": self._model, "choices": choices}

    def _chunk(self, choices: list[dict[str, Any]]) -> bytes:
        chunk = self._body(f"{self.object}.chunk", choices)
        if self._include_usage:
            chunk["usage"] = None
        return sse.event(chunk)

    def _choice(self, text: str | None, finish_reason: str | None) -> dict[str, Any]:
        delta = {"content": text} if text is not None else {}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def start(self) -> list[bytes]:
        first = self._choice("", None)
        first["delta"] = {"role": "assistant", "content": ""}
        return [self._chunk([first])]

    def text(self, text: str) -> list[bytes]:
        return [self._chunk([self._choice(text, None)])]

    def finish(self, done: Done) -> list[bytes]:
        chunks = [self._chunk([self._choice(None, _finish_reason(done))])]
        if self._include_usage:
            last = self._body(f"{self.object}.chunk", [])
            last["usage"] = usage(done.usage)
            chunks.append(sse.event(last))
        return [*chunks, sse.event("[DONE]")]

    def fail(self, exc: CortexError) -> list[bytes]:
        """An error after the stream began: in-band, then the end."""
        return [sse.event(error_payload(exc)), sse.event("[DONE]")]

    def keepalive(self) -> bytes:
        return b": loading the model\n\n"

    def response(self, text: str, done: Done) -> dict[str, Any]:
        message = {"role": "assistant", "content": text, "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": _finish_reason(done)}
        return {**self._body(self.object, [choice]), "usage": usage(done.usage)}


class TextWriter(ChunkWriter):
    """The same for `/v1/completions`: `text_completion` objects, `text` instead of a message,
    no role chunk. With `echo`, the prompt comes first."""

    object = "text_completion"

    def __init__(self, completion_id: str, model: str, include_usage: bool, echo: str | None = None) -> None:
        super().__init__(completion_id, model, include_usage)
        self._echo = echo

    def _chunk(self, choices: list[dict[str, Any]]) -> bytes:
        chunk = self._body(self.object, choices)  # streamed chunks keep the plain object name
        if self._include_usage:
            chunk["usage"] = None
        return sse.event(chunk)

    def _choice(self, text: str | None, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

    def start(self) -> list[bytes]:
        return self.text(self._echo) if self._echo else []

    def finish(self, done: Done) -> list[bytes]:
        chunks = [self._chunk([self._choice(None, _finish_reason(done))])]
        if self._include_usage:
            last = self._body(self.object, [])
            last["usage"] = usage(done.usage)
            chunks.append(sse.event(last))
        return [*chunks, sse.event("[DONE]")]

    def response(self, text: str, done: Done) -> dict[str, Any]:
        choice = self._choice((self._echo or "") + text, _finish_reason(done))
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


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
