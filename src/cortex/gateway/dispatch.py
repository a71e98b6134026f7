"""Sends a job to a node that holds its model and opens its event stream.

Retries the next holder while the job has produced nothing: on no-responders, a retryable
error (`busy`, `model_not_loaded`, `shutting_down`), an accept timeout, or its node dying;
then, once, holders that appeared meanwhile. Errors that
surface before the first token become HTTP statuses; later ones are in-band events.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio

from cortex.placement.fleet import FleetView, Holder
from cortex.placement.policy import rank_holders
from cortex.placement.usage import LocalUsage
from cortex.protocol.errors import ErrorCode, JobFailed, NoCapacity, TransportError
from cortex.protocol.messages import Accepted, Failed, InferenceJob
from cortex.transport.nats import JobClient, JobStream

log = logging.getLogger(__name__)


async def _abandon(stream: JobStream, events: AsyncIterator[Any]) -> None:
    """Stops a job that will not be used, wherever it got to, and stops listening to it."""
    with contextlib.suppress(TransportError, NoCapacity):
        await stream.cancel()
    await events.aclose()  # type: ignore[attr-defined]


class OpenJob:
    """A job a node accepted and started. Iterate `events()`; always `aclose()`."""

    def __init__(self, dispatcher: Dispatcher, stream: JobStream, events: AsyncIterator[Any], first: Any) -> None:
        self.stream = stream
        self.node = stream.node or "?"
        self._dispatcher = dispatcher
        self._events = events
        self._first = first
        self._closed = False

    async def events(self) -> AsyncIterator[Any]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        async for event in self._events:
            yield event

    async def cancel(self) -> None:
        """Stops generation on the node if the job is still running there."""
        if not self.stream.finished:
            with contextlib.suppress(TransportError, NoCapacity):
                if await self.stream.cancel():
                    log.info("job %s cancelled on %s: the client left", self.stream.job.job_id, self.node)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._dispatcher.usage.finished(self.node, self.stream.job.model)
        await self._events.aclose()  # type: ignore[attr-defined]


class Dispatcher:
    def __init__(self, client: JobClient, fleet: FleetView, *, accept_timeout: float, idle_timeout: float) -> None:
        self._client = client
        self._fleet = fleet
        self._accept_timeout = accept_timeout
        self._idle_timeout = idle_timeout
        self.usage = LocalUsage()

    async def open(self, job: InferenceJob) -> OpenJob:
        if not self._client.connected:
            raise TransportError("the gateway has lost its NATS connection; retry shortly")
        holders = self._fleet.holders(job.model)
        busy = 0
        for node in self._candidates(job.model, holders):
            stream = await self._client.submit(
                job,
                node,
                accept_timeout=self._accept_timeout,
                idle_timeout=self._idle_timeout,
                node_alive=self._fleet.alive,
            )
            events = aiter(stream)
            try:
                first = await self._first_output(events)
            except (NoCapacity, TransportError) as exc:
                log.info("job %s not taken by %s: %s", job.job_id, node or "the queue group", exc)
                await _abandon(stream, events)
                continue
            except JobFailed as exc:
                await events.aclose()  # type: ignore[attr-defined]
                if not exc.retryable:
                    raise
                busy += exc.code is ErrorCode.busy
                log.info("job %s refused by %s: %s", job.job_id, node, exc.message)
                continue
            except BaseException:
                # Cancelled (the client left) while the job waited in a queue or in prefill.
                with anyio.CancelScope(shield=True):
                    await _abandon(stream, events)
                raise
            self.usage.started(stream.node or "?", job.model)
            return OpenJob(self, stream, events, first)
        if busy:
            raise NoCapacity(
                f"every node serving {job.model} is at capacity; retry shortly", code=ErrorCode.busy, retryable=True
            )
        if holders:
            raise NoCapacity(f"the nodes serving {job.model} did not accept the job; retry shortly")
        raise NoCapacity(
            f"{job.model} is not loaded on any node; add it to a neuron's default_models "
            "or load it with `nats req cortex.node.<node>.load`"
        )

    def _candidates(self, model: str, holders: list[Holder]) -> Iterator[str | None]:
        """The holders, least loaded first; then, once, any that appeared while those were tried (a
        job whose node died before its first token goes to a node that has loaded the model since)."""
        ranked = rank_holders(holders, self.usage.in_flight(model))
        # With no holder in view (a gateway that just started, say), the queue group may still have one.
        yield from ranked or [None]
        yield from (n for n in rank_holders(self._fleet.holders(model), self.usage.in_flight(model)) if n not in ranked)

    async def _first_output(self, events: AsyncIterator[Any]) -> Any:
        """Reads `accepted` and the event after it; a failure among them raises JobFailed."""
        first = await anext(events)
        if isinstance(first, Failed):
            raise JobFailed(first.message, code=first.code, retryable=first.retryable)
        if not isinstance(first, Accepted):
            raise TransportError(f"expected `accepted` first, got `{first.type}`", code=ErrorCode.internal)
        second = await anext(events, None)
        if second is None:
            raise TransportError("the job ended without a result", code=ErrorCode.internal)
        if isinstance(second, Failed):
            raise JobFailed(second.message, code=second.code, retryable=False)
        return second
