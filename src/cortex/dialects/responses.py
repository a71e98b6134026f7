"""OpenAI's Responses API (`/v1/responses`) <-> InferenceJob. Pure functions and builders, no I/O.

Honoured: `input` (a string, or `message`, `function_call`, `function_call_output` and `reasoning`
items), `instructions`, function `tools` (with `strict`), `tool_choice`, `parallel_tool_calls`,
`max_output_tokens`, `temperature`, `top_p`, `reasoning.effort`, `text.format` (`text`,
`json_object`, `json_schema`), `stream`, `store` and `previous_response_id` (the gateway's response
store, in NATS). Labels that change nothing are accepted (`metadata`, `user`, `include`,
`prompt_cache_key`, ...). Hosted tools (`web_search`, `file_search`, ...) and tool namespaces are
not run here: they are left out of the prompt, as Codex sends `web_search` on every turn. Whatever
would change the answer and cannot be honoured is refused by name (docs/api.md has the table).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cortex.dialects import sse
from cortex.dialects.common import (
    MAX_TOKENS_LIMIT,
    Answer,
    Part,
    check_tools,
    describe,
    join_text,
    json_output,
    thinking_for,
)
from cortex.dialects.openai import DEFAULT_MAX_TOKENS
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
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
)


class InputItem(BaseModel):
    """One input item; which fields matter depends on `type` (a message may leave `type` out)."""

    model_config = ConfigDict(extra="allow")
    type: str = "message"
    id: str | None = None
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[Part] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[Part] | None = None


class ToolIn(BaseModel):
    model_config = ConfigDict(extra="allow")  # a hosted tool's own settings
    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    name: str


class Reasoning(BaseModel):
    model_config = ConfigDict(extra="forbid")
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None  # the model's own text is given whole
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # a hint to OpenAI's own models; unused


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_obfuscation: bool | None = None  # there is no obfuscation padding to include


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[ToolIn] | None = None
    tool_choice: Literal["auto", "none", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    reasoning: Reasoning | None = None
    text: TextConfig | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    store: bool = True
    previous_response_id: str | None = None
    truncation: Literal["disabled", "auto"] | None = None
    # Refused by name (_refuse_unsupported says why), rather than as unknown fields.
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None
    max_tool_calls: int | None = None
    top_logprobs: int | None = None
    # Labels only: accepted, never change the output.
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    service_tier: str | None = None
    include: list[str] | None = None
    client_metadata: dict[str, Any] | None = None  # Codex's


_REFUSED = {
    "conversation": "conversations are not stored here; chain turns with `previous_response_id`",
    "prompt": "stored prompt templates are OpenAI's; send the text as `instructions` and `input`",
    "max_tool_calls": "it caps hosted tool calls, which this server does not run; leave it unset",
    "top_logprobs": "log probabilities are served by /v1/chat/completions (`logprobs`, `top_logprobs`)",
}


def _refuse_unsupported(req: ResponsesRequest) -> None:
    if req.background:
        raise InvalidRequest("`background: true` is not supported: send the request and wait, or stream it")
    for field, why in _REFUSED.items():
        if getattr(req, field) is not None:
            raise InvalidRequest(f"`{field}` is not supported: {why}")
    if req.truncation == "auto":
        raise InvalidRequest(
            "`truncation: auto` is not supported: this server never drops turns from a conversation; "
            "leave it unset (disabled) and shorten the input"
        )


# --- input ----------------------------------------------------------------------------------------


def _text(content: str | list[Part] | None, where: str) -> str:
    """Text of input_text / output_text / text parts; other parts (images, files) are refused by name."""
    if content is None or isinstance(content, str):
        return content or ""
    parts = [Part(type="text", text=p.text) if p.type in ("input_text", "output_text") else p for p in content]
    return join_text(parts, where, "part")


def to_messages(items: str | list[InputItem]) -> list[ChatMessage]:
    """The input in the job's terms. Consecutive function_call items join one assistant turn, with
    the text before them; past reasoning is not replayed (as with chat completions)."""
    if isinstance(items, str):
        return [ChatMessage(role="user", content=items)]
    out: list[ChatMessage] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if item.type == "message":
            if item.role is None:
                raise InvalidRequest(f"`{where}.role` is required on a message item")
            role = "system" if item.role == "developer" else item.role
            out.append(ChatMessage(role=role, content=_text(item.content, f"{where}.content")))
        elif item.type == "function_call":
            if not item.call_id or not item.name:
                raise InvalidRequest(f"`{where}` needs `call_id` and `name` on a function_call item")
            call = ToolCall(id=item.call_id, name=item.name, arguments=item.arguments or "{}")
            turn = _open_assistant(out)
            turn.tool_calls = [*(turn.tool_calls or []), call]
        elif item.type == "function_call_output":
            if not item.call_id:
                raise InvalidRequest(f"`{where}.call_id` is required on a function_call_output item")
            text = _text(item.output, f"{where}.output")
            out.append(ChatMessage(role="tool", content=text, tool_call_id=item.call_id))
        elif item.type != "reasoning":
            raise InvalidRequest(
                f"`{where}` is a {item.type!r} item; this server takes message, function_call, "
                "function_call_output and reasoning items"
            )
    if not out:
        raise InvalidRequest("`input` holds no message; send at least one")
    return out


def _open_assistant(messages: list[ChatMessage]) -> ChatMessage:
    if messages and messages[-1].role == "assistant":
        return messages[-1]
    turn = ChatMessage(role="assistant", content="")
    messages.append(turn)
    return turn


def _tools(req: ResponsesRequest) -> tuple[list[Tool] | None, ToolChoice]:
    tools = []
    for i, t in enumerate(req.tools or []):
        if t.type != "function":
            continue  # hosted tools and namespaces: not run here, so not offered to the model
        if not t.name:
            raise InvalidRequest(f"`tools[{i}].name` is required on a function tool")
        parameters = t.parameters or {"type": "object", "properties": {}}
        tools.append(Tool(name=t.name, description=t.description, parameters=parameters, strict=bool(t.strict)))
    choice: ToolChoice = "auto"
    if isinstance(req.tool_choice, FunctionChoice):
        choice = NamedTool(name=req.tool_choice.name)
    elif req.tool_choice is not None:
        choice = req.tool_choice
    check_tools(tools, choice, "tool_choice")
    return tools or None, choice


def _output_format(fmt: TextFormat | None) -> OutputFormat | None:
    return json_output(fmt.type, fmt.schema_, fmt.name, "text.format") if fmt else None


def to_job(
    req: ResponsesRequest, model_id: str, conversation: list[ChatMessage], *, job_id: str, request_id: str
) -> InferenceJob:
    """`conversation`: the stored turns before this one (from `previous_response_id`), then this
    turn's input (`to_messages`); `instructions` go first, and are not stored with the turn."""
    _refuse_unsupported(req)
    messages = [*conversation]
    if req.instructions:  # instructions are not carried over from a previous response
        messages.insert(0, ChatMessage(role="system", content=req.instructions))
    tools, choice = _tools(req)
    sampling = SamplingParams(
        max_tokens=req.max_output_tokens or DEFAULT_MAX_TOKENS, temperature=req.temperature, top_p=req.top_p
    )
    return InferenceJob(
        job_id=job_id,
        request_id=request_id,
        model=model_id,
        messages=messages,
        sampling=sampling,
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=req.parallel_tool_calls is not False,
        reasoning=thinking_for(req.reasoning.effort if req.reasoning else None),
        output_format=_output_format(req.text.format if req.text else None),
    )


def input_items(items: str | list[InputItem]) -> list[dict[str, Any]]:
    """The input as `/input_items` lists it: each item with an id."""
    if isinstance(items, str):
        items = [InputItem(role="user", content=[Part(type="input_text", text=items)])]
    out = []
    for item in items:
        body = item.model_dump(exclude_none=True)
        body.setdefault("id", f"{_PREFIX.get(item.type, 'item')}_{uuid.uuid4().hex}")
        out.append(body)
    return out


# --- the response ---------------------------------------------------------------------------------

_PREFIX = {"message": "msg", "function_call": "fc", "reasoning": "rs", "function_call_output": "fco"}


def response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def _item_id(kind: str) -> str:
    return f"{_PREFIX[kind]}_{uuid.uuid4().hex}"


def _usage(done: Done | None, reasoning_tokens: int) -> dict[str, Any] | None:
    if done is None:
        return None
    return {
        "input_tokens": done.usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": done.usage.cached_tokens},
        "output_tokens": done.usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": done.usage.total_tokens,
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [_text_part(text)] if status == "completed" else []
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}


def _reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "reasoning_text", "text": text}] if status == "completed" else []
    return {"id": item_id, "type": "reasoning", "summary": [], "content": content}


def _call_item(item_id: str, call: ToolCall, status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments,
    }


def answer_messages(answer: Answer) -> list[ChatMessage]:
    """The answer as the job's history will hold it (past reasoning is not replayed)."""
    return [ChatMessage(role="assistant", content=answer.text, tool_calls=answer.calls or None)]


class ResponseWriter:
    """One response, whole or as the Responses API's stream: response.created, response.in_progress,
    then for each output item (reasoning, message, function_call) its `added`, its deltas and its
    `done` events, then response.completed (or response.incomplete when max_output_tokens ran out;
    response.failed for an error after the start). Every event carries a `sequence_number`.

    `final` holds the last response object once it is whole, for the store.
    """

    def __init__(self, req: ResponsesRequest, response_id: str, model: str) -> None:
        self._req = req
        self.id = response_id
        self._model = model
        self._created = int(time.time())
        self._seq = 0
        self._items: list[dict[str, Any]] = []  # finished output items
        self._open: dict[str, Any] | None = None  # the item being streamed
        self._open_text = ""
        self.answer = Answer()  # gathered from the stream, or the whole one given to `response`
        self.final: dict[str, Any] | None = None

    # --- the response object ---

    def _response(self, status: str, output: list[dict[str, Any]], done: Done | None) -> dict[str, Any]:
        req = self._req
        fmt = req.text.format if req.text and req.text.format else None
        incomplete = done is not None and done.finish_reason == "length"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self._created,
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": self._model,
            "output": output,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": req.reasoning.effort if req.reasoning else None, "summary": None},
            "store": req.store,
            "temperature": req.temperature,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            "tool_choice": _choice(req.tool_choice),
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "top_p": req.top_p,
            "truncation": req.truncation or "disabled",
            "usage": _usage(done, self.answer.reasoning_tokens),
            "metadata": req.metadata or {},
            "user": req.user,
        }

    def _status(self, done: Done) -> str:
        return "incomplete" if done.finish_reason == "length" else "completed"

    def response(self, answer: Answer, done: Done) -> dict[str, Any]:
        output = []
        if answer.reasoning:
            output.append(_reasoning_item(_item_id("reasoning"), answer.reasoning, "completed"))
        if answer.text or not answer.calls:
            output.append(_message_item(_item_id("message"), answer.text, "completed"))
        output += [_call_item(_item_id("function_call"), call, "completed") for call in answer.calls]
        self.answer = answer
        self.final = self._response(self._status(done), output, done)
        return self.final

    # --- the stream ---

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return sse.event(data, kind)

    def start(self) -> list[bytes]:
        snapshot = self._response("in_progress", [], None)
        return [
            self._event("response.created", response=snapshot),
            self._event("response.in_progress", response=snapshot),
        ]

    def _index(self) -> int:
        return len(self._items)

    def _begin(self, item: dict[str, Any]) -> list[bytes]:
        chunks = self._end()
        self._open, self._open_text = item, ""
        chunks.append(self._event("response.output_item.added", output_index=self._index(), item=item))
        if item["type"] == "message":
            chunks.append(self._part("response.content_part.added", _text_part("")))
        elif item["type"] == "reasoning":
            chunks.append(self._part("response.content_part.added", {"type": "reasoning_text", "text": ""}))
        return chunks

    def _part(self, kind: str, part: dict[str, Any]) -> bytes:
        assert self._open is not None
        ids = {"item_id": self._open["id"], "output_index": self._index(), "content_index": 0}
        return self._event(kind, **ids, part=part)

    def _end(self) -> list[bytes]:
        item, text = self._open, self._open_text
        if item is None:
            return []
        ids = {"item_id": item["id"], "output_index": self._index()}
        chunks = []
        if item["type"] == "message":
            done = _message_item(item["id"], text, "completed")
            chunks.append(self._event("response.output_text.done", **ids, content_index=0, text=text, logprobs=[]))
            chunks.append(self._part("response.content_part.done", _text_part(text)))
        elif item["type"] == "reasoning":
            done = _reasoning_item(item["id"], text, "completed")
            chunks.append(self._event("response.reasoning_text.done", **ids, content_index=0, text=text))
            chunks.append(self._part("response.content_part.done", {"type": "reasoning_text", "text": text}))
        else:
            call = ToolCall(id=item["call_id"], name=item["name"], arguments=text)
            done = _call_item(item["id"], call, "completed")
            chunks.append(self._event("response.function_call_arguments.done", **ids, name=call.name, arguments=text))
        chunks.append(self._event("response.output_item.done", output_index=self._index(), item=done))
        self._items.append(done)
        self._open = None
        return chunks

    def text(self, delta: Delta) -> list[bytes]:
        self.answer.add(delta)
        chunks = (
            []
            if self._open and self._open["type"] == "message"
            else self._begin(_message_item(_item_id("message"), "", "in_progress"))
        )
        return [*chunks, self._delta("response.output_text.delta", delta.text, logprobs=[])]

    def reasoning(self, delta: ReasoningDelta) -> list[bytes]:
        self.answer.add(delta)
        chunks = (
            []
            if self._open and self._open["type"] == "reasoning"
            else self._begin(_reasoning_item(_item_id("reasoning"), "", "in_progress"))
        )
        return [*chunks, self._delta("response.reasoning_text.delta", delta.text)]

    def _delta(self, kind: str, text: str, **fields: Any) -> bytes:
        assert self._open is not None
        self._open_text += text
        content = {} if self._open["type"] == "function_call" else {"content_index": 0}
        return self._event(kind, item_id=self._open["id"], output_index=self._index(), **content, delta=text, **fields)

    def tool_call(self, delta: ToolCallDelta) -> list[bytes]:
        self.answer.add(delta)
        chunks = []
        if delta.id is not None:
            call = ToolCall(id=delta.id, name=delta.name or "", arguments="")
            chunks = self._begin(_call_item(_item_id("function_call"), call, "in_progress"))
        if delta.arguments:
            chunks.append(self._delta("response.function_call_arguments.delta", delta.arguments))
        return chunks

    def finish(self, done: Done) -> list[bytes]:
        chunks = self._end()
        if not self._items:  # never an empty output
            chunks += self._begin(_message_item(_item_id("message"), "", "in_progress")) + self._end()
        status = self._status(done)
        self.final = self._response(status, self._items, done)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return [*chunks, self._event(kind, response=self.final)]

    def fail(self, exc: CortexError) -> list[bytes]:
        snapshot = self._response("failed", self._items, None)
        snapshot["error"] = {"code": exc.code.value, "message": describe(exc)[0]}
        return [self._event("response.failed", response=snapshot)]

    def keepalive(self) -> bytes:
        return b": loading the model\n\n"


def _choice(choice: Literal["auto", "none", "required"] | FunctionChoice | None) -> Any:
    if isinstance(choice, FunctionChoice):
        return choice.model_dump()
    return choice or "auto"
