"""The HTTP status of each error code: the same in both dialects (each names its own error types)."""

from __future__ import annotations

from typing import Any

from cortex.protocol.errors import CortexError, ErrorCode, Refused

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
