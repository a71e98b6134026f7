"""Runs one request's job to the end for an HTTP client, streaming or not, warm or cold.

A client that leaves is an event, not a surprise: the job is cancelled on its node at once. A
node that is lost mid-answer is one too: the answer goes on on another holder (`Dispatcher.move`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Protocol, TypeVar

import anyio
from prometheus_client import Histogram
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from cortex.dialects.common import Answer
from cortex.gateway.dispatch import Dispatcher, OpenJob
from cortex.gateway.exchange import Outcome
from cortex.gateway.metrics import GatewayMetrics
from cortex.protocol.errors import CortexError, ErrorCode, JobFailed, TransportError
from cortex.protocol.messages import Delta, Done, Failed, InferenceJob, ReasoningDelta, ToolCallDelta
from cortex.transport.job_client import NodeSilent

Piece = Delta | ReasoningDelta | ToolCallDelta
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


class ServedJob:
    """One request's job, warm or cold alike: `open()` sends it to a node (once its model is
    served), `events()` relays its answer, and both keep the request's Outcome; `finish()` stops
    and releases whatever is left. `finish()` is safe to call twice, and before `open()`."""

    def __init__(self, job: InferenceJob, dispatcher: Dispatcher, outcome: Outcome, metrics: GatewayMetrics) -> None:
        self.job = job
        self.outcome = outcome
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._opened: OpenJob | None = None  # None until a node took the job
        self._finished = False
        self._inter_token: Histogram | None = None  # its model's, once the job is open
        self._last_piece_at: float | None = None
        self._generated: list[int] = []  # the token ids of the pieces relayed: where a moved job resumes

    async def open(self) -> OpenJob:
        """Sends the job to a node that serves its model; raises CortexError when none takes it."""
        if self._opened is None:
            opened = await self._dispatcher.open(self.job)
            self._opened, self.outcome.node = opened, opened.node
            self._inter_token = self._metrics.inter_token.labels(self.outcome.model)
            self._metrics.in_flight.inc()
        return self._opened

    async def open_once_loaded(self, loading: asyncio.Task[None], every: float) -> AsyncIterator[None]:
        """Opens the job once its model's load (`loading`) has finished; yields every `every` seconds
        while it waits. A failed load, or a job no node takes, raises CortexError (recorded)."""
        try:
            while not (await asyncio.wait({loading}, timeout=every))[0]:
                yield
            loading.result()
            await self.open()
        except CortexError as exc:
            self.outcome.failed(exc.code)
            raise

    @property
    def pending(self) -> bool:
        """More of the job's events have arrived and wait to be read."""
        return self._opened is not None and self._opened.stream.pending

    async def events(self) -> AsyncIterator[Piece | Done]:
        """The answer's pieces, then its Done; opens the job first if need be. A failure (no node
        takes it, an in-band error, an end without a result) raises CortexError, and the outcome
        says so."""
        try:
            opened = await self.open()
            while True:
                try:
                    event = await opened.next()
                except TransportError as exc:
                    if exc.code is not ErrorCode.node_lost:
                        raise
                    opened = await self._move(opened, exc)
                    continue
                if event is None:
                    break
                if isinstance(event, Delta | ReasoningDelta | ToolCallDelta):
                    self._generated += event.ids
                    self._timed(time.perf_counter())
                    yield event
                elif isinstance(event, Done):
                    self.outcome.done = event
                    yield event
                elif isinstance(event, Failed):
                    raise JobFailed(f"the model failed mid-answer: {event.message}", code=event.code)
            if self.outcome.done is None:
                raise JobFailed("the job ended without a result", code=ErrorCode.node_lost)
        except CortexError as exc:
            self.outcome.failed(exc.code)
            raise

    async def _move(self, lost: OpenJob, why: TransportError) -> OpenJob:
        """Goes on with the answer on another holder, after the tokens the client already has. With
        none to take it, a node that fell silent is waited on still (it may be slow, not dead); one
        that is lost for sure fails the answer."""
        moved = await self._dispatcher.move(self.job, self._generated, lost, silent=isinstance(why, NodeSilent))
        if moved is None:
            if isinstance(why, NodeSilent):
                return lost
            raise why
        reason = "silent" if isinstance(why, NodeSilent) else "lost"
        log.warning(
            "job %s moved from %s to %s after %d tokens (%s): %s",
            self.job.job_id,
            lost.node,
            moved.node,
            len(self._generated),
            reason,
            why.message,
        )
        self._metrics.moved.labels(self.outcome.model, reason).inc()
        await lost.abandon()
        self._opened, self.outcome.node = moved, moved.node
        return moved

    def _timed(self, now: float) -> None:
        if self.outcome.first_token_at is None:
            self.outcome.first_token_at = now
        if self._last_piece_at is not None and self._inter_token is not None:
            self._inter_token.observe(now - self._last_piece_at)
        self._last_piece_at = now

    async def finish(self) -> None:
        # Shielded: this also runs while a disconnect is cancelling the request's task.
        with anyio.CancelScope(shield=True):
            if self._finished:
                return
            self._finished = True
            if self.outcome.done is None:
                self.outcome.client_left()  # unless it failed: then the client did not leave early
            if self._opened is None:
                return
            if self.outcome.done is None:
                await self._opened.cancel()
            await self._opened.aclose()
            self._metrics.in_flight.dec()


class StreamWriter(Protocol):
    """One dialect's framing of a streamed answer (see dialects.openai, dialects.anthropic)."""

    def start(self) -> list[bytes]: ...
    def text(self, delta: Delta) -> list[bytes]: ...
    def reasoning(self, delta: ReasoningDelta) -> list[bytes]: ...
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

    def __init__(self, served: ServedJob, content: AsyncIterator[bytes], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._served = served

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._served.finish()


async def stream_answer(
    served: ServedJob, writer: StreamWriter, loading: asyncio.Task[None] | None, keepalive: float
) -> AsyncIterator[bytes]:
    """The answer in the client's dialect (the writer decides the framing). A cold start
    (`loading`: its model's load) sends keep-alives until the model is served, so proxies and
    clients keep the connection, then opens the job; a warm one was opened before its 200.

    Events that have already arrived go out in one write: under load that is what lets one
    gateway relay tens of thousands of tokens a second; idle, every event goes out at once.
    The job is finished here as the answer ends (its node's usage released, for the next
    request's routing), and by the response too, if the client left before it began.
    """
    try:
        if loading is not None:
            try:
                async for _ in served.open_once_loaded(loading, keepalive):
                    yield writer.keepalive()
            except CortexError as exc:
                log.warning("cold start of %s failed: %s", served.outcome.model, exc.message)
                for chunk in writer.fail(exc):
                    yield chunk
                return
        ready: list[bytes] = []
        if start := writer.start():
            yield b"".join(start)
        try:
            async for event in served.events():
                ready += writer.finish(event) if isinstance(event, Done) else _piece(writer, event)
                if ready and (len(ready) >= _MOST_PER_WRITE or not served.pending):
                    yield b"".join(ready)
                    ready = []
                    await asyncio.sleep(0)  # let the other streams write too
        except CortexError as exc:
            log.warning("stream of job %s broke: %s", served.job.job_id, exc.message)
            ready += writer.fail(exc)
        if ready:
            yield b"".join(ready)
    finally:
        await served.finish()  # as soon as the answer is whole: before its last bytes go out


async def collect(served: ServedJob) -> tuple[Answer, Done]:
    """The whole answer, for a response that is one body."""
    answer, done = Answer(), None
    try:
        async for event in served.events():
            if isinstance(event, Done):
                done = event
            else:
                answer.add(event)
    finally:
        await served.finish()
    if done is None:  # events() raises first; this is for the type checker
        raise JobFailed("the job ended without a result", code=ErrorCode.node_lost)
    return answer, done


def _piece(writer: StreamWriter, event: Piece) -> list[bytes]:
    if isinstance(event, Delta):
        return writer.text(event)
    if isinstance(event, ReasoningDelta):
        return writer.reasoning(event)
    return writer.tool_call(event)
