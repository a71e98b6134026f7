"""What both dialects share: the HTTP status of each error code (each dialect names its own error
types), how an error is described, and the checks on content parts and stop sequences."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from cortex.protocol.errors import CortexError, ErrorCode, InvalidRequest, Refused

_STATUS: dict[ErrorCode, int] = {
    ErrorCode.invalid_request: 400,
    ErrorCode.payload_too_large: 413,
    ErrorCode.model_not_found: 404,
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


def stop_list(value: str | list[str] | None, field: str) -> list[str]:
    stop = [value] if isinstance(value, str) else list(value or [])
    if len(stop) > 16 or any(not s for s in stop):
        raise InvalidRequest(f"`{field}` takes at most 16 non-empty strings")
    return stop
