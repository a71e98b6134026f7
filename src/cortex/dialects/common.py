"""What both dialects share: the HTTP status of each error code (each dialect names its own error
types), how an error is described, and the checks on content parts and stop sequences."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

from cortex.protocol.errors import CortexError, ErrorCode, InvalidRequest, Refused
from cortex.protocol.messages import (
    Delta,
    OutputFormat,
    ReasoningDelta,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
)

_STATUS: dict[ErrorCode, int] = {
    ErrorCode.invalid_request: 400,
    ErrorCode.payload_too_large: 413,
    ErrorCode.model_not_found: 404,
    ErrorCode.response_not_found: 404,
    ErrorCode.preflight_failed: 422,
    ErrorCode.insufficient_capacity: 503,
    ErrorCode.load_failed: 502,
    ErrorCode.unauthorized: 401,
    ErrorCode.forbidden: 403,
    ErrorCode.busy: 429,
    ErrorCode.model_not_loaded: 503,
    ErrorCode.shutting_down: 503,
    ErrorCode.transport: 503,
    ErrorCode.timeout: 504,
    ErrorCode.node_lost: 502,
    ErrorCode.cancelled: 499,
}


def http_status(code: ErrorCode) -> int:
    return _STATUS.get(code, 500)


def describe(exc: CortexError) -> tuple[str, dict[str, Any]]:
    """The message for the client and, for a preflight refusal, its structured fields
    (kind, model, detail, suggestion), which both dialects add to their error object."""
    if not isinstance(exc, Refused):
        return exc.message, {}
    message = f"{exc.message}; {exc.refusal.suggestion}" if exc.refusal.suggestion else exc.message
    return message, exc.refusal.model_dump(exclude_none=True)


class Part(BaseModel):
    """A content part (OpenAI) or block (Anthropic); only `text` is understood, others are refused by name."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


def join_text(content: str | list[Part], where: str, noun: str) -> str:
    """The text of a message's content; `noun` is what the dialect calls a part (`part`, `block`)."""
    if isinstance(content, str):
        return content
    texts = []
    for i, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise InvalidRequest(f"`{where}[{i}]` is a {part.type!r} {noun}; only text {noun}s are supported yet")
        texts.append(part.text)
    return "".join(texts)


# Token counts the engines take (int32): larger ones used to reach a node and fail there as
# internal errors. Both dialects bound max_tokens (and Anthropic's top_k) by it.
MAX_TOKENS_LIMIT = 2**31 - 1


def stop_list(value: str | list[str] | None, field: str) -> list[str]:
    stop = [value] if isinstance(value, str) else list(value or [])
    if len(stop) > 16 or any(not s for s in stop):
        raise InvalidRequest(f"`{field}` takes at most 16 non-empty strings")
    return stop


def check_tools(tools: list[Tool] | None, choice: ToolChoice, field: str) -> None:
    """A named or required tool_choice needs tools, and a named one must be among them."""
    names = {t.name for t in tools or []}
    if len(names) != len(tools or []):
        raise InvalidRequest("`tools` names a tool twice; tool names must be unique")
    if choice == "auto" or choice == "none":
        return
    if not names:
        raise InvalidRequest(f"`{field}` forces a tool call but the request has no `tools`")
    if not isinstance(choice, str) and choice.name not in names:
        raise InvalidRequest(f"`{field}` names tool {choice.name!r}, which is not among `tools`: {sorted(names)}")


def thinking_for(effort: str | None) -> bool | None:
    """OpenAI's reasoning effort on the model's thinking switch: none and minimal turn it off, the
    others on; unset leaves the model's default."""
    return None if effort is None else effort not in ("none", "minimal")


def json_output(kind: str, schema: dict[str, Any] | None, name: str | None, field: str) -> OutputFormat | None:
    """A dialect's ask for JSON output (`text`: none), as the job's constraint."""
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputFormat(type="json_object")
    if kind != "json_schema":
        raise InvalidRequest(f"`{field}.type` is {kind!r}; it takes text, json_object or json_schema")
    if not isinstance(schema, dict):
        raise InvalidRequest(f"`{field}` of type json_schema needs its schema (a JSON object)")
    return OutputFormat(type="json_schema", json_schema=schema, name=name)


@dataclass
class Answer:
    """A whole answer gathered from a job's events, for a non-streaming response."""

    text: str = ""
    reasoning: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    reasoning_tokens: int = 0

    def add(self, event: Delta | ReasoningDelta | ToolCallDelta) -> None:
        if isinstance(event, Delta):
            self.text += event.text
            if event.logprobs is not None:
                self.logprobs = (self.logprobs or []) + event.logprobs
        elif isinstance(event, ReasoningDelta):
            self.reasoning += event.text
            self.reasoning_tokens += event.tokens
        else:
            while len(self.calls) <= event.index:
                call_id = event.id or f"call_{len(self.calls)}"
                self.calls.append(ToolCall(id=call_id, name=event.name or "", arguments=""))
            self.calls[event.index].arguments += event.arguments
