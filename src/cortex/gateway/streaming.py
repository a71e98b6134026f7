"""Runs one opened job to the end for an HTTP client, streaming or not.

A client that leaves is an event, not a surprise: the job is cancelled on its node at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
from starlette.requests import Request

from cortex.dialects import sse
from cortex.dialects.openai import ChunkWriter, error_body
from cortex.gateway.dispatch import OpenJob
from cortex.gateway.errors import status_for
from cortex.gateway.metrics import GatewayMetrics
from cortex.protocol.errors import CortexError, ErrorCode, JobFailed
from cortex.protocol.messages import Delta, Done, Failed

log = logging.getLogger(__name__)
T = TypeVar("T")


class ClientGone(Exception):
    pass


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work`; if the client disconnects first, cancels it and raises ClientGone."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_until_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
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
        metrics.duration.labels(self.model).observe(now - self.started)
        if self.first_token_at is not None:
            metrics.ttft.labels(self.model).observe(self.first_token_at - self.started)
        if self.done is not None:
            usage = self.done.usage
            metrics.prompt_tokens.labels(self.model).inc(usage.prompt_tokens)
            metrics.completion_tokens.labels(self.model).inc(usage.completion_tokens)
            if self.done.timings.decode_ms > 0 and usage.completion_tokens > 1:
                rate = (usage.completion_tokens - 1) / (self.done.timings.decode_ms / 1000)
                metrics.tokens_per_second.labels(self.model).observe(rate)


async def _finish(job: OpenJob, outcome: Outcome, metrics: GatewayMetrics) -> None:
    # Shielded: this runs while the request's task is being cancelled by a disconnect.
    with anyio.CancelScope(shield=True):
        if outcome.done is None:
            await job.cancel()
        await job.aclose()
        outcome.record(metrics, job.node)
        metrics.in_flight.dec()


async def collect(job: OpenJob, outcome: Outcome, metrics: GatewayMetrics) -> tuple[str, Done]:
    metrics.in_flight.inc()
    parts: list[str] = []
    try:
        async for event in job.events():
            if isinstance(event, Delta):
                if outcome.first_token_at is None:
                    outcome.first_token_at = time.perf_counter()
                parts.append(event.text)
            elif isinstance(event, Done):
                outcome.done = event
            elif isinstance(event, Failed):
                outcome.status = str(status_for(event.code)[0])
                raise JobFailed(f"the model failed mid-answer: {event.message}", code=event.code)
        if outcome.done is None:
            raise JobFailed("the job ended without a result", code=ErrorCode.node_lost)
        return "".join(parts), outcome.done
    except CortexError as exc:
        outcome.status = str(status_for(exc.code)[0])
        raise
    except BaseException:
        outcome.status = "499"
        raise
    finally:
        await _finish(job, outcome, metrics)


async def stream_chat(
    job: OpenJob, outcome: Outcome, metrics: GatewayMetrics, writer: ChunkWriter
) -> AsyncIterator[bytes]:
    metrics.in_flight.inc()
    try:
        yield sse.event(writer.role())
        async for event in job.events():
            if isinstance(event, Delta):
                if outcome.first_token_at is None:
                    outcome.first_token_at = time.perf_counter()
                yield sse.event(writer.content(event.text))
            elif isinstance(event, Done):
                outcome.done = event
                for chunk in writer.finish(event):
                    yield sse.event(chunk)
            elif isinstance(event, Failed):
                outcome.status = str(status_for(event.code)[0])
                yield sse.event(
                    error_body(f"the model failed mid-answer: {event.message}", "server_error", event.code.value)
                )
        if outcome.done is None and outcome.status == "200":
            outcome.status = "502"
            yield sse.event(error_body("the job ended without a result", "server_error", "node_lost"))
        yield sse.event("[DONE]")
    except CortexError as exc:
        outcome.status = str(status_for(exc.code)[0])
        log.warning("stream of job %s broke: %s", job.stream.job.job_id, exc.message)
        yield sse.event(error_body(exc.message, "server_error", exc.code.value))
        yield sse.event("[DONE]")
    except BaseException:
        outcome.status = "499"
        raise
    finally:
        await _finish(job, outcome, metrics)
