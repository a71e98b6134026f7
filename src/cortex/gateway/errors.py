"""Errors at the HTTP boundary: every failure leaves in OpenAI's error envelope."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cortex.dialects.openai import error_body
from cortex.protocol.errors import CortexError, ErrorCode, Refused

log = logging.getLogger(__name__)

# code -> (HTTP status, OpenAI error type)
_STATUS: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.invalid_request: (400, "invalid_request_error"),
    ErrorCode.payload_too_large: (413, "invalid_request_error"),
    ErrorCode.model_not_found: (404, "invalid_request_error"),
    ErrorCode.preflight_failed: (422, "invalid_request_error"),
    ErrorCode.insufficient_capacity: (503, "service_unavailable_error"),
    ErrorCode.load_failed: (502, "server_error"),
    ErrorCode.unauthorized: (401, "authentication_error"),
    ErrorCode.forbidden: (403, "permission_error"),
    ErrorCode.busy: (429, "rate_limit_error"),
    ErrorCode.model_not_loaded: (503, "service_unavailable_error"),
    ErrorCode.shutting_down: (503, "service_unavailable_error"),
    ErrorCode.transport: (503, "service_unavailable_error"),
    ErrorCode.timeout: (504, "timeout_error"),
    ErrorCode.node_lost: (502, "server_error"),
    ErrorCode.cancelled: (499, "server_error"),
}


def status_for(code: ErrorCode) -> tuple[int, str]:
    return _STATUS.get(code, (500, "server_error"))


def _id_header(request: Request) -> dict[str, str]:
    """The request id, on errors too: the one the route assigned, else the client's own."""
    rid = getattr(request.state, "request_id", None) or request.headers.get("x-request-id", "")[:128]
    return {"x-request-id": rid} if rid and rid.isprintable() else {}


def error_payload(exc: CortexError) -> dict[str, Any]:
    """The OpenAI envelope; a preflight refusal adds its structured form (kind, model, detail, suggestion)."""
    body = error_body(exc.message, status_for(exc.code)[1], exc.code.value)
    if isinstance(exc, Refused):
        body["error"].update(exc.refusal.model_dump(exclude_none=True))
        if exc.refusal.suggestion:
            body["error"]["message"] = f"{exc.message}; {exc.refusal.suggestion}"
    return body


def error_response(request: Request, exc: CortexError) -> JSONResponse:
    status = status_for(exc.code)[0]
    headers = _id_header(request)
    if status in (429, 503):
        headers["Retry-After"] = "1"
    if isinstance(exc, Refused):
        log.warning("refused %s: reason=%s detail=%s", exc.refusal.model, exc.refusal.kind, exc.refusal.detail)
    return JSONResponse(error_payload(exc), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('msg')}", None
    if first.get("type") == "extra_forbidden":
        return f"unrecognized request argument supplied: {'.'.join(loc)}", ".".join(loc)
    field = ".".join(loc) or "body"
    return f"invalid `{field}`: {first.get('msg')}", field


def install(app: FastAPI) -> None:
    @app.exception_handler(CortexError)
    async def _cortex(request: Request, exc: CortexError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        body = error_body(message, "invalid_request_error", None, param)
        return JSONResponse(body, status_code=400, headers=_id_header(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = error_body(str(exc.detail), "invalid_request_error", None)
        return JSONResponse(body, status_code=exc.status_code, headers=_id_header(request))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        body = error_body(f"internal error: {type(exc).__name__}", "server_error")
        return JSONResponse(body, status_code=500, headers=_id_header(request))
