"""One HTTP request's owner: its id, its log context, and the one record of how it ended.

`ExchangeMiddleware` gives every request an `Exchange` before any route runs and records it
once, as the response's last bytes go out (or when the app failed, or the client left, first).
The others only say what happened: an inference route that it serves a model (`serve`, which
returns the `Outcome` its job fills in: streaming.ServedJob, up to the client leaving), an
error handler that it was refused (`refused`). Nothing else counts a request.

What is counted: an inference request, however it ended, in `cortex_requests_total` and the
request log line (with its errors under its model); any other request only when it failed,
in `cortex_request_errors_total` with no model (its model, if it named one, was not resolved).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cortex.dialects.common import http_status
from cortex.gateway.metrics import GatewayMetrics
from cortex.protocol.errors import ErrorCode
from cortex.protocol.messages import Done
from cortex.telemetry import logs

log = logging.getLogger(__name__)

_ID_HEADER = "x-request-id"
_LONGEST_ID = 128


@dataclass
class Outcome:
    """How an inference request ended, as its metrics and its log line tell it."""

    model: str
    api: str
    request_id: str
    key: str = ""  # the API key's name; "" while the gateway needs none
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    done: Done | None = None
    node: str = "none"  # the node that ran the job; "none" until one took it
    status: str = "200"
    code: str | None = None

    def failed(self, code: ErrorCode) -> None:
        self.status = str(http_status(code))
        self.code = code.value

    def client_left(self) -> None:
        if self.status == "200":
            self.status, self.code = "499", "client_closed_request"

    def record(self, metrics: GatewayMetrics) -> None:
        now = time.perf_counter()
        usage = self.done.usage if self.done else None
        log.info(
            "request %s %s model=%s node=%s status=%s tokens=%s+%s cached=%s ttft=%s total=%.0fms",
            self.request_id,
            self.api,
            self.model,
            self.node,
            self.status,
            usage.prompt_tokens if usage else "-",
            usage.completion_tokens if usage else "-",
            usage.cached_tokens if usage else "-",
            f"{(self.first_token_at - self.started) * 1000:.0f}ms" if self.first_token_at else "-",
            (now - self.started) * 1000,
        )
        metrics.requests.labels(self.model, self.node, self.api, self.status).inc()
        if self.key:
            metrics.key_requests.labels(self.key, self.model, self.status).inc()
        if self.code is not None:
            metrics.errors.labels(self.model, self.code).inc()
        metrics.duration.labels(self.model, self.api).observe(now - self.started)
        if self.first_token_at is not None:
            metrics.ttft.labels(self.model).observe(self.first_token_at - self.started)
        if self.done is not None:
            usage = self.done.usage
            metrics.prompt_tokens.labels(self.model).inc(usage.prompt_tokens)
            metrics.prompt_node_tokens.labels(self.model, self.node).inc(usage.prompt_tokens)
            metrics.prompt_cached_tokens.labels(self.model, self.node).inc(usage.cached_tokens)
            metrics.completion_tokens.labels(self.model).inc(usage.completion_tokens)
            if self.key:
                metrics.key_tokens.labels(self.key, self.model, "prompt").inc(usage.prompt_tokens)
                metrics.key_tokens.labels(self.key, self.model, "completion").inc(usage.completion_tokens)
            metrics.queue_wait.labels(self.model).observe(self.done.timings.queue_ms / 1000)
            if self.done.timings.decode_ms > 0 and usage.completion_tokens > 1:
                rate = (usage.completion_tokens - 1) / (self.done.timings.decode_ms / 1000)
                metrics.tokens_per_second.labels(self.model).observe(rate)


class Exchange:
    """One request, from arrival to its record. Made only by `ExchangeMiddleware`."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.outcome: Outcome | None = None  # an inference request's, from `serve` on
        self._refused_code: str | None = None  # another request's error, if it failed
        self._recorded = False

    def serve(self, model: str, api: str, key: str) -> Outcome:
        """The request runs a job for `model`: from here it is counted as an inference request."""
        self.outcome = Outcome(model=model, api=api, request_id=self.request_id, key=key)
        return self.outcome

    def refused(self, status: int, code: str) -> None:
        """It was answered with an error (`code`: the error envelope's)."""
        if self.outcome is not None:
            self.outcome.status, self.outcome.code = str(status), code
        else:
            self._refused_code = code

    def record(self, metrics: GatewayMetrics) -> None:
        if self._recorded:
            return
        self._recorded = True
        if self.outcome is not None:
            self.outcome.record(metrics)
        elif self._refused_code is not None:
            metrics.errors.labels("", self._refused_code).inc()


def exchange(request: Request) -> Exchange:
    """The request's Exchange (ExchangeMiddleware put it in the request's state)."""
    found: Exchange = request.state.exchange
    return found


def _request_id(scope: Scope) -> str:
    """The client's own id when it sent a usable one, else a new one."""
    given = Headers(scope=scope).get(_ID_HEADER, "")
    return given[:_LONGEST_ID] if given and given.isprintable() else uuid.uuid4().hex


class ExchangeMiddleware:
    """Makes each HTTP request's Exchange, stamps its id on the log lines written while serving it
    and on the response, and records it once, as the response ends.

    Pure ASGI (not BaseHTTPMiddleware): streamed responses and the disconnect watch in
    `streaming.unless_disconnected` see the server's own `receive`. An exception no handler took
    leaves through here before Starlette's ServerErrorMiddleware answers it with a 500 (that
    answer, outside this middleware, sets the id header itself: errors.install).
    """

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self._app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        current = Exchange(_request_id(scope))
        scope.setdefault("state", {})["exchange"] = current
        # Not reset afterwards: the 500 handler outside this middleware logs with it too, and the
        # request's task (and its context) ends with the request.
        logs.request_id.set(current.request_id)
        answered = False

        async def send_with_id(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start":
                answered = True
                headers = MutableHeaders(scope=message)
                if _ID_HEADER not in headers:
                    headers.append(_ID_HEADER, current.request_id)
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                # Before the client can see the end: a scrape right after it finds the request counted.
                current.record(self._metrics)
            await send(message)

        try:
            await self._app(scope, receive, send_with_id)
        except Exception:
            if not answered:
                current.refused(500, "http_500")
            raise
        finally:
            current.record(self._metrics)  # if the end was never sent: the client left, or the app failed
