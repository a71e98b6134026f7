"""Anthropic Messages (`/v1/messages`) <-> InferenceJob. Pure functions and builders, no I/O.

Served: `system` as a string or text blocks, and `system` turns inside `messages` (Claude Code's
mid-conversation system messages); `text`, `tool_use`, `tool_result` and (dropped from the history,
as Anthropic's own models do) `thinking` blocks; `tools` with `input_schema`, and deferred tools
(`defer_loading`), left out of the prompt until a `tool_reference` block names them;
`tool_choice`; `thinking` (`adaptive` leaves the model's default); `output_config` (`effort`, and
`format`: JSON by constrained decoding); `context_management` with `clear_thinking_*` edits (past
thinking is never replayed, so they hold already); `max_tokens` (required); `stop_sequences`;
`temperature`, `top_p`, `top_k`; `metadata`; `cache_control` anywhere (a hint); an assistant turn
last, which the model continues (a prefill). Images, documents, Anthropic's server tools and
context edits that would need the prompt's token count (`clear_tool_uses_*`) are refused by name.
"""

from __future__ import annotations

import json
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
    http_status,
    join_text,
    json_output,
    stop_list,
)
from cortex.protocol.errors import CortexError, InvalidRequest
from cortex.protocol.messages import (
    ChatMessage,
    Delta,
    Done,
    InferenceJob,
    NamedTool,
    ReasoningDelta,
    SamplingParams,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    Usage,
)


class Block(BaseModel):
    """A content block; which fields matter depends on `type` (see `_user_turns`, `_assistant_turn`)."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    content: str | list[Part] | None = None
    is_error: bool | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "assistant", "system"]
    content: str | list[Block]


class Metadata(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: str | None = None


class ToolDef(BaseModel):
    model_config = ConfigDict(extra="allow")  # cache_control and the like: hints, no effect on output
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,128}$")
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None
    strict: bool = False
    # Not in the prompt until a tool_reference block (a tool search's result) names it.
    defer_loading: bool = False


class ToolChoiceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class ThinkingIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=1024)
    display: Literal["summarized", "omitted"] | None = None  # the thinking blocks' text is the model's own


class ContextEdit(BaseModel):
    model_config = ConfigDict(extra="allow")  # each edit type has its own settings
    type: str


class ContextManagement(BaseModel):
    model_config = ConfigDict(extra="forbid")
    edits: list[ContextEdit] = Field(default_factory=list)


class OutputFormatIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    effort: Literal["low", "medium", "high", "max"] | None = None
    format: OutputFormatIn | None = None


class _Conversation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    system: str | list[Part] | None = None
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoiceIn | None = None
    thinking: ThinkingIn | None = None
    context_management: ContextManagement | None = None
    output_config: OutputConfig | None = None


class MessagesRequest(_Conversation):
    max_tokens: int = Field(ge=1, le=MAX_TOKENS_LIMIT)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)  # an int32 too
    metadata: Metadata | None = None
    stream: bool = False
    service_tier: str | None = None  # a label here


class CountTokensRequest(_Conversation):
    pass


def _tool_result(block: Block, where: str) -> str:
    content = block.content if block.content is not None else ""
    if isinstance(content, list):  # a tool search answers with tool_reference blocks
        content = [
            Part(type="text", text=f"Tool {_reference(part)} is loaded.") if _reference(part) else part
            for part in content
        ]
    text = join_text(content, f"{where}.content", "block")
    return f"Error: {text}" if block.is_error else text


def _reference(part: Part) -> str | None:
    """The tool a `tool_reference` block names (a deferred tool that a tool search loaded)."""
    name = getattr(part, "tool_name", None) if part.type == "tool_reference" else None
    return name if isinstance(name, str) else None


def _referenced(req: MessagesRequest | CountTokensRequest) -> set[str]:
    names: set[str] = set()
    for m in req.messages:
        for block in m.content if isinstance(m.content, list) else []:
            if block.type == "tool_result" and isinstance(block.content, list):
                names.update(n for part in block.content if (n := _reference(part)))
    return names


def _user_turns(blocks: list[Block], where: str) -> list[ChatMessage]:
    """Tool results become tool messages, in order; the text around them, user messages."""
    out: list[ChatMessage] = []
    texts: list[str] = []
    for j, block in enumerate(blocks):
        if block.type == "tool_result":
            if not block.tool_use_id:
                raise InvalidRequest(f"`{where}[{j}].tool_use_id` is required on a tool_result block")
            if texts:
                out.append(ChatMessage(role="user", content="".join(texts)))
                texts = []
            result = _tool_result(block, f"{where}[{j}]")
            out.append(ChatMessage(role="tool", content=result, tool_call_id=block.tool_use_id))
        elif block.type == "text" and block.text is not None:
            texts.append(block.text)
        else:
            raise InvalidRequest(
                f"`{where}[{j}]` is a {block.type!r} block; user turns take text and tool_result blocks"
            )
    if texts or not out:
        out.append(ChatMessage(role="user", content="".join(texts)))
    return out


def _assistant_turn(blocks: list[Block], where: str) -> ChatMessage:
    texts: list[str] = []
    calls: list[ToolCall] = []
    for j, block in enumerate(blocks):
        if block.type == "text" and block.text is not None:
            texts.append(block.text)
        elif block.type == "tool_use":
            if not block.id or not block.name:
                raise InvalidRequest(f"`{where}[{j}]` needs `id` and `name` on a tool_use block")
            calls.append(ToolCall(id=block.id, name=block.name, arguments=json.dumps(block.input or {})))
        elif block.type not in ("thinking", "redacted_thinking"):  # past reasoning is not replayed
            raise InvalidRequest(f"`{where}[{j}]` is a {block.type!r} block; assistant turns take text and tool_use")
    return ChatMessage(role="assistant", content="".join(texts), tool_calls=calls or None)


def _check_context_management(req: MessagesRequest | CountTokensRequest) -> None:
    for i, edit in enumerate(req.context_management.edits if req.context_management else []):
        if edit.type.startswith("clear_thinking_"):
            continue  # past thinking blocks never reach the prompt: the edit holds already
        raise InvalidRequest(
            f"`context_management.edits[{i}]` is {edit.type!r}, which this server does not apply: it clears "
            "parts of the history by the prompt's token count, which only the node knows; leave the edit out "
            "and trim the history in the client (clear_thinking_* edits are accepted)"
        )


# Claude Code (2.1.36 on) opens `system` with a block `x-anthropic-billing-header: cc_version=...;
# cc_entrypoint=cli; cch=<5 hex>;` whose `cch` changes every request. It is telemetry for
# Anthropic's billing, nothing the model should read, and at the very start of the prompt it would
# make every turn's prompt new to the prefix cache (and to cache-aware routing): it is left out.
_ATTRIBUTION = "x-anthropic-billing-header:"


def _without_attribution(system: str | list[Part] | None) -> str | list[Part] | None:
    if not isinstance(system, list):
        return system
    return [part for part in system if not (part.type == "text" and (part.text or "").startswith(_ATTRIBUTION))]


def to_messages(req: MessagesRequest | CountTokensRequest) -> list[ChatMessage]:
    """The conversation; a system turn inside `messages` stays where it is (the node renders it as a
    system turn where the chat template allows one there, else joins it to an adjacent user turn)."""
    _check_context_management(req)
    if all(m.role == "system" for m in req.messages):
        raise InvalidRequest(
            "`messages` holds only system turns; put the system prompt in `system` and send at least one user turn"
        )
    messages = []
    system = _without_attribution(req.system)
    if system:
        messages.append(ChatMessage(role="system", content=join_text(system, "system", "block")))
    for i, m in enumerate(req.messages):
        where = f"messages[{i}].content"
        if m.role == "system":
            blocks = m.content if isinstance(m.content, str) else [Part(type=b.type, text=b.text) for b in m.content]
            messages.append(ChatMessage(role="system", content=join_text(blocks, where, "block")))
        elif isinstance(m.content, str):
            messages.append(ChatMessage(role=m.role, content=m.content))
        elif m.role == "user":
            messages.extend(_user_turns(m.content, where))
        else:
            messages.append(_assistant_turn(m.content, where))
    return messages


# Anthropic's tool_choice types as the job spells them (OpenAI's words).
_TOOL_CHOICE: dict[str, ToolChoice] = {"auto": "auto", "any": "required", "none": "none"}


def to_tools(req: MessagesRequest | CountTokensRequest) -> tuple[list[Tool] | None, ToolChoice, bool]:
    """The tools, the choice among them, and whether several calls may come in one turn."""
    tools = []
    referenced = _referenced(req)
    for i, t in enumerate(req.tools or []):
        if t.defer_loading and t.name not in referenced:
            continue
        if t.type not in (None, "custom"):
            raise InvalidRequest(
                f"`tools[{i}]` is Anthropic's server tool {t.type!r}, which this server does not run; "
                "declare it as a custom tool with an input_schema"
            )
        if t.input_schema is None:
            raise InvalidRequest(f"`tools[{i}].input_schema` is required")
        tools.append(Tool(name=t.name, description=t.description, parameters=t.input_schema, strict=t.strict))
    choice: ToolChoice = "auto"
    parallel = True
    if req.tool_choice is not None:
        parallel = not req.tool_choice.disable_parallel_tool_use
        kind = req.tool_choice.type
        if kind == "tool":
            if not req.tool_choice.name:
                raise InvalidRequest("`tool_choice.name` is required when its type is tool")
            choice = NamedTool(name=req.tool_choice.name)
        else:
            choice = _TOOL_CHOICE[kind]
    check_tools(tools, choice, "tool_choice")
    return tools or None, choice, parallel


def to_job(req: MessagesRequest, model_id: str, *, job_id: str, request_id: str) -> InferenceJob:
    stops = stop_list(req.stop_sequences, "stop_sequences")
    sampling = SamplingParams(
        max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, stop=stops
    )
    messages = to_messages(req)
    prefill = messages[-1].role == "assistant"
    if prefill and messages[-1].content != messages[-1].content.rstrip():
        raise InvalidRequest("the final assistant content (a prefill) cannot end with trailing whitespace")
    if prefill and messages[-1].tool_calls:
        raise InvalidRequest("the final assistant turn holds tool_use blocks; send their tool_result in a user turn")
    tools, choice, parallel = to_tools(req)
    if req.thinking and req.thinking.budget_tokens and req.thinking.budget_tokens >= req.max_tokens:
        raise InvalidRequest("`thinking.budget_tokens` must be less than `max_tokens`")
    config = req.output_config or OutputConfig()
    output_format = None
    if config.format is not None:
        output_format = json_output("json_schema", config.format.schema_, None, "output_config.format")
    return InferenceJob(
        job_id=job_id,
        request_id=request_id,
        model=model_id,
        messages=messages,
        sampling=sampling,
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=parallel,
        reasoning=_reasoning(req.thinking, config.effort),
        continue_final=prefill,
        output_format=output_format,
    )


# `output_config.effort` on the model's thinking switch: low turns it off, high and max on, medium
# (and no effort) leave the model's default. An explicit `thinking` enabled/disabled wins.
_EFFORT: dict[str, bool] = {"low": False, "high": True, "max": True}


def _reasoning(thinking: ThinkingIn | None, effort: str | None) -> bool | None:
    if thinking is not None and thinking.type != "adaptive":
        return thinking.type == "enabled"
    return _EFFORT.get(effort or "")


# --- responses -------------------------------------------------------------------------------------


def _stop_reason(done: Done) -> str:
    if done.finish_reason == "length":
        return "max_tokens"
    if done.finish_reason == "tool_calls":
        return "tool_use"
    return "stop_sequence" if done.stop_sequence else "end_turn"


def _usage(done: Done | None) -> dict[str, int]:
    """Anthropic counts input three ways, adding up to the prompt: read from the cache, written to it,
    and neither. Every prompt is kept here without being asked (no `cache_control` needed, nothing
    extra to pay), so nothing is reported as written: what was not read counts as plain input."""
    usage = done.usage if done is not None else Usage(prompt_tokens=0, completion_tokens=0)
    return {
        "input_tokens": usage.prompt_tokens - usage.cached_tokens,
        "cache_read_input_tokens": usage.cached_tokens,
        "cache_creation_input_tokens": 0,
        "output_tokens": usage.completion_tokens,
    }


def message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def _input(arguments: str) -> dict[str, Any]:
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


class MessageWriter:
    """One message, whole or as Anthropic's stream: message_start, then one content block per run
    of text, thinking or tool use (start, deltas, stop; a ping after the first start), message_delta
    with the stop reason and usage, message_stop.

    The prompt's token count is known once the node has encoded it, so message_start carries
    `input_tokens: 0` and message_delta the real count (the SDKs take the later figure).
    """

    def __init__(self, message_id: str, model: str) -> None:
        self._id = message_id
        self._model = model
        self._index = -1
        self._block: str | None = None  # the type of the open block

    def _message(self, content: list[dict[str, Any]], done: Done | None) -> dict[str, Any]:
        return {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": content,
            "stop_reason": _stop_reason(done) if done else None,
            "stop_sequence": done.stop_sequence if done else None,
            "usage": _usage(done),
        }

    @staticmethod
    def _event(data: dict[str, Any]) -> bytes:
        return sse.event(data, data["type"])

    def _close(self) -> list[bytes]:
        if self._block is None:
            return []
        self._block = None
        return [self._event({"type": "content_block_stop", "index": self._index})]

    def _open(self, block: dict[str, Any]) -> list[bytes]:
        chunks = self._close()
        self._index += 1
        self._block = block["type"]
        chunks.append(self._event({"type": "content_block_start", "index": self._index, "content_block": block}))
        if self._index == 0:
            chunks.append(self.keepalive())  # where Anthropic's own streams send their first ping
        return chunks

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return self._event({"type": "content_block_delta", "index": self._index, "delta": delta})

    def start(self) -> list[bytes]:
        return [self._event({"type": "message_start", "message": self._message([], None)})]

    def text(self, delta: Delta) -> list[bytes]:
        chunks = self._open({"type": "text", "text": ""}) if self._block != "text" else []
        return [*chunks, self._delta({"type": "text_delta", "text": delta.text})]

    def reasoning(self, delta: ReasoningDelta) -> list[bytes]:
        chunks = self._open({"type": "thinking", "thinking": "", "signature": ""}) if self._block != "thinking" else []
        return [*chunks, self._delta({"type": "thinking_delta", "thinking": delta.text})]

    def tool_call(self, delta: ToolCallDelta) -> list[bytes]:
        chunks = []
        if delta.id is not None:
            chunks = self._open({"type": "tool_use", "id": delta.id, "name": delta.name, "input": {}})
        if delta.arguments:
            chunks.append(self._delta({"type": "input_json_delta", "partial_json": delta.arguments}))
        return chunks

    def finish(self, done: Done) -> list[bytes]:
        chunks = self._open({"type": "text", "text": ""}) if self._index < 0 else []  # never an empty message
        delta = {"stop_reason": _stop_reason(done), "stop_sequence": done.stop_sequence}
        return [
            *chunks,
            *self._close(),
            self._event({"type": "message_delta", "delta": delta, "usage": _usage(done)}),
            self._event({"type": "message_stop"}),
        ]

    def fail(self, exc: CortexError) -> list[bytes]:
        return [self._event(error_payload(exc))]

    def keepalive(self) -> bytes:
        return self._event({"type": "ping"})

    def response(self, answer: Answer, done: Done) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if answer.reasoning:
            content.append({"type": "thinking", "thinking": answer.reasoning, "signature": ""})
        if answer.text or not answer.calls:
            content.append({"type": "text", "text": answer.text})
        for call in answer.calls:
            content.append({"type": "tool_use", "id": call.id, "name": call.name, "input": _input(call.arguments)})
        return self._message(content, done)


# --- errors ---------------------------------------------------------------------------------------

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "api_error")


class AnthropicErrorDetail(BaseModel):
    """The error object, as documented in /openapi.json; a preflight refusal adds kind, model, detail, suggestion."""

    model_config = ConfigDict(extra="allow")
    type: str
    message: str


class AnthropicError(BaseModel):
    """The body of every error response; only documents it (error_body builds it)."""

    type: Literal["error"]
    error: AnthropicErrorDetail


def error_body(message: str, type_: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": type_, "message": message}}


def error_payload(exc: CortexError) -> dict[str, Any]:
    """Anthropic's envelope; a preflight refusal adds its structured form."""
    message, extra = describe(exc)
    body = error_body(message, error_type(http_status(exc.code)))
    body["error"].update(extra)
    return body
