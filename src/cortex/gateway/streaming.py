"""Runs one opened job to the end for an HTTP client, streaming or not.

A client that leaves is an event, not a surprise: the job is cancelled on its node at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse

from cortex.dialects.common import Answer, http_status
from cortex.gateway.dispatch import OpenJob
from cortex.gateway.metrics import GatewayMetrics
from cortex.protocol.errors import CortexError, ErrorCode, JobFailed
from cortex.protocol.messages import Delta, Done, Failed, ReasoningDelta, ToolCallDelta

_PIECES = (Delta, ReasoningDelta, ToolCallDelta)
_MOST_PER_WRITE = 64  # events joined into one write at most, so a busy stream still flows

log = logging.getLogger(__name__)
T = TypeVar("T")


class ClientGone(Exception):
    pass


async def _cancel_on_disconnect(request: Request, scope: anyio.CancelScope) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work`; if the client disconnects first, cancels it and raises ClientGone.

    The work runs in a cancel scope rather than a task cancelled once: a single `task.cancel()`
    can be swallowed (on Python 3.11, `asyncio.wait_for`, which a job stream uses for each event,
    returns its result instead of raising when that result is ready in the instant it is
    cancelled), and the job then ran to max_tokens for nobody. A cancelled scope cancels again
    at every await until the work ends, and leaves the work's shielded clean-ups alone. Work that
    still returns a result is returned: the caller's next step sees the (sticky) disconnect.
    """
    with anyio.CancelScope() as scope:
        watcher = asyncio.create_task(_cancel_on_disconnect(request, scope))
        try:
            return await work
        except Exception as exc:
            if scope.cancel_called:  # failing because it was stopped: the client left first
                raise ClientGone from exc
            raise
        finally:
            watcher.cancel()
    raise ClientGone


@dataclass
class Outcome:
    """What a finished request tells the metrics."""

    model: str
    api: str
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    done: Done | None = None
    status: str = "200"
    code: str | None = None
    key: str = ""  # the API key's name; "" while the gateway needs none

    def failed(self, code: ErrorCode) -> None:
        self.status = str(http_status(code))
        self.code = code.value

    def client_left(self) -> None:
        if self.status == "200":
            self.status, self.code = "499", "client_closed_request"

    def record(self, metrics: GatewayMetrics, node: str) -> None:
        now = time.perf_counter()
        usage = self.done.usage if self.done else None
        log.info(
            "request %s %s model=%s node=%s status=%s tokens=%s+%s ttft=%s total=%.0fms",
            self.request_id,
            self.api,
            self.model,
            node,
            self.status,
            usage.prompt_tokens if usage else "-",
            usage.completion_tokens if usage else "-",
            f"{(self.first_token_at - self.started) * 1000:.0f}ms" if self.first_token_at else "-",
            (now - self.started) * 1000,
        )
        metrics.requests.labels(self.model, node, self.api, self.status).inc()
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
            metrics.completion_tokens.labels(self.model).inc(usage.completion_tokens)
            if self.key:
                metrics.key_tokens.labels(self.key, self.model, "prompt").inc(usage.prompt_tokens)
                metrics.key_tokens.labels(self.key, self.model, "completion").inc(usage.completion_tokens)
            metrics.queue_wait.labels(self.model).observe(self.done.timings.queue_ms / 1000)
            if self.done.timings.decode_ms > 0 and usage.completion_tokens > 1:
                rate = (usage.completion_tokens - 1) / (self.done.timings.decode_ms / 1000)
                metrics.tokens_per_second.labels(self.model).observe(rate)


class ServedJob:
    """One HTTP request's job, from `open` to its metrics. `finish()` is safe to call twice."""

    def __init__(self, job: OpenJob, outcome: Outcome, metrics: GatewayMetrics) -> None:
        self.job = job
        self.outcome = outcome
        self._metrics = metrics
        self._finished = False
        self._inter_token = metrics.inter_token.labels(outcome.model)
        self._last_piece_at: float | None = None
        metrics.in_flight.inc()

    def observe(self, event: Any) -> None:
        if isinstance(event, _PIECES):
            now = time.perf_counter()
            if self.outcome.first_token_at is None:
                self.outcome.first_token_at = now
            if self._last_piece_at is not None:
                self._inter_token.observe(now - self._last_piece_at)
            self._last_piece_at = now
        elif isinstance(event, Done):
            self.outcome.done = event
        elif isinstance(event, Failed):
            self.outcome.failed(event.code)

    async def finish(self) -> None:
        # Shielded: this also runs while a disconnect is cancelling the request's task.
        with anyio.CancelScope(shield=True):
            if self._finished:
                return
            self._finished = True
            if self.outcome.done is None:
                self.outcome.client_left()  # unless it failed: then the client did not leave early
                await self.job.cancel()
            await self.job.aclose()
            self.outcome.record(self._metrics, self.job.node)
            self._metrics.in_flight.dec()


class Finishing(Protocol):
    async def finish(self) -> None: ...


class StreamWriter(Protocol):
    """One dialect's framing of a streamed answer (see dialects.openai, dialects.anthropic)."""

    def start(self) -> list[bytes]: ...
    def text(self, delta: Delta) -> list[bytes]: ...
    def reasoning(self, text: str) -> list[bytes]: ...
    def tool_call(self, delta: ToolCallDelta) -> list[bytes]: ...
    def finish(self, done: Done) -> list[bytes]: ...
    def fail(self, exc: CortexError) -> list[bytes]: ...
    def keepalive(self) -> bytes: ...


class AnswerWriter(StreamWriter, Protocol):
    def response(self, answer: Answer, done: Done) -> dict[str, Any]: ...


class ServedStreamResponse(StreamingResponse):
    """A streaming response that finishes its job however the response ends.

    The body generator's own `finally` does not run if the client leaves before the first
    chunk is pulled, so the response owns the clean-up.
    """

    def __init__(self, served: Finishing, content: AsyncIterator[bytes], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._served = served

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._served.finish()


class ColdStart:
    """A stream that waits for its model's cold load before its job exists."""

    def __init__(self, outcome: Outcome, metrics: GatewayMetrics) -> None:
        self.outcome = outcome
        self.served: ServedJob | None = None
        self._metrics = metrics
        self._recorded = False

    async def finish(self) -> None:
        if self.served is not None:
            await self.served.finish()
        elif not self._recorded:
            self._recorded = True
            self.outcome.client_left()  # while the model loaded, unless the load failed
            self.outcome.record(self._metrics, "none")

    async def stream(
        self,
        pending: asyncio.Task[None],
        open_job: Callable[[], Awaitable[OpenJob]],
        writer: StreamWriter,
        keepalive: float,
    ) -> AsyncIterator[bytes]:
        """Keep-alives while the load runs (so proxies and clients keep the connection), then the stream."""
        try:
            while not (await asyncio.wait({pending}, timeout=keepalive))[0]:
                yield writer.keepalive()
            pending.result()
            self.served = ServedJob(await open_job(), self.outcome, self._metrics)
        except CortexError as exc:
            self.outcome.failed(exc.code)
            log.warning("cold start of %s failed: %s", self.outcome.model, exc.message)
            for chunk in writer.fail(exc):
                yield chunk
            return
        async for chunk in stream_events(self.served, writer):
            yield chunk


async def collect(served: ServedJob) -> tuple[Answer, Done]:
    answer = Answer()
    try:
        async for event in served.job.events():
            served.observe(event)
            if isinstance(event, _PIECES):
                answer.add(event)
            elif isinstance(event, Failed):
                raise JobFailed(f"the model failed mid-answer: {event.message}", code=event.code)
        if served.outcome.done is None:
            raise JobFailed("the job ended without a result", code=ErrorCode.node_lost)
        return answer, served.outcome.done
    except CortexError as exc:
        served.outcome.failed(exc.code)
        raise
    finally:
        await served.finish()


async def stream_events(served: ServedJob, writer: StreamWriter) -> AsyncIterator[bytes]:
    """The job's events in the client's dialect (the writer decides the framing).

    Events that have already arrived go out in one write: under load that is what lets one
    gateway relay tens of thousands of tokens a second; idle, every event goes out at once.
    """
    ready: list[bytes] = []
    try:
        if start := writer.start():
            yield b"".join(start)
        try:
            async for event in served.job.events():
                served.observe(event)
                if isinstance(event, _PIECES):
                    ready += _piece(writer, event)
                elif isinstance(event, Done):
                    ready += writer.finish(event)
                elif isinstance(event, Failed):
                    raise JobFailed(f"the model failed mid-answer: {event.message}", code=event.code)
                if ready and (len(ready) >= _MOST_PER_WRITE or not served.job.stream.pending):
                    yield b"".join(ready)
                    ready = []
                    await asyncio.sleep(0)  # let the other streams write too
            if served.outcome.done is None:
                raise JobFailed("the job ended without a result", code=ErrorCode.node_lost)
        except CortexError as exc:
            served.outcome.failed(exc.code)
            log.warning("stream of job %s broke: %s", served.job.stream.job.job_id, exc.message)
            ready += writer.fail(exc)
        if ready:
            yield b"".join(ready)
    finally:
        await served.finish()


def _piece(writer: StreamWriter, event: Delta | ReasoningDelta | ToolCallDelta) -> list[bytes]:
    if isinstance(event, Delta):
        return writer.text(event)
    if isinstance(event, ReasoningDelta):
        return writer.reasoning(event.text)
    return writer.tool_call(event)
