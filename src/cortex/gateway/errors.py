"""Errors at the HTTP boundary: every failure leaves in the envelope of the dialect that was called
(OpenAI's, or Anthropic's under /v1/messages), with the status that fits its code. Each handler
tells the request's Exchange it refused, and the Exchange counts it (once, with the rest)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cortex.dialects import anthropic, openai
from cortex.dialects.common import http_status
from cortex.gateway.exchange import exchange
from cortex.protocol.errors import CortexError, Refused

log = logging.getLogger(__name__)


def anthropic_path(request: Request) -> bool:
    """Errors leave in the dialect of the endpoint that was called."""
    return request.url.path.startswith("/v1/messages")


def _plain(request: Request, status: int, message: str, param: str | None = None) -> JSONResponse:
    """An error raised before any job: in the caller's dialect."""
    exchange(request).refused(status, "invalid_request" if status in (400, 422) else f"http_{status}")
    return _envelope(request, status, message, param)


def _envelope(
    request: Request, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    if anthropic_path(request):
        body = anthropic.error_body(message, anthropic.error_type(status))
    else:
        body = openai.error_body(message, openai.error_type(status), None, param)
    return JSONResponse(body, status_code=status, headers=headers)


def error_response(request: Request, exc: CortexError) -> JSONResponse:
    status = http_status(exc.code)
    exchange(request).refused(status, exc.code.value)
    headers: dict[str, str] = {}
    if status in (429, 503):
        headers["Retry-After"] = "1"
    if isinstance(exc, Refused):
        log.warning("refused %s: %s", exc.refusal.model, exc.refusal.log_fields())
    body = anthropic.error_payload(exc) if anthropic_path(request) else openai.error_payload(exc)
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('msg')}", None
    if first.get("type") == "extra_forbidden":
        return f"unrecognized request argument supplied: {'.'.join(loc)}", ".".join(loc)
    field = ".".join(loc) or "body"
    return f"invalid `{field}`: {first.get('msg')}", field


def _body_error(cause: BaseException | None) -> str | None:
    """FastAPI answers every body it cannot parse, other than bad JSON syntax, with one vague message;
    this names what was wrong from the exception beneath it."""
    if isinstance(cause, UnicodeDecodeError):
        return f"the request body is not valid UTF-8: byte {cause.start} is {cause.object[cause.start]:#04x}"
    if isinstance(cause, RecursionError):
        return "the request body's JSON nests too deeply to parse"
    return None


def install(app: FastAPI) -> None:
    @app.exception_handler(CortexError)
    async def _cortex(request: Request, exc: CortexError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _plain(request, 400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _plain(request, exc.status_code, _body_error(exc.__cause__) or str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette answers this outside the middleware, which has counted the request already
        # (a 500) and cannot add the id header to this response: it goes on here.
        log.exception("unhandled error")
        headers = {"x-request-id": exchange(request).request_id}
        return _envelope(request, 500, f"internal error: {type(exc).__name__}", headers=headers)
