"""Sends a job to a node that holds its model and opens its event stream.

Retries the next holder while the job has produced nothing: on no-responders, a retryable
error (`busy`, `model_not_loaded`, `shutting_down`), an accept timeout, or its node dying;
then, once, holders that appeared meanwhile. Errors that
surface before the first token become HTTP statuses; later ones are in-band events.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Iterator

import anyio

from cortex.placement.fleet import FleetView, Holder
from cortex.placement.policy import rank_holders
from cortex.placement.usage import LocalUsage
from cortex.protocol.errors import ErrorCode, JobFailed, NoCapacity, TransportError
from cortex.protocol.messages import Accepted, Failed, InferenceJob, JobEvent
from cortex.protocol.prefix import prefix_chain
from cortex.transport.job_client import JobClient, JobStream

log = logging.getLogger(__name__)

Events = AsyncGenerator[JobEvent, None]


async def _abandon(stream: JobStream, events: Events) -> None:
    """Stops a job that will not be used, wherever it got to, and stops listening to it."""
    with contextlib.suppress(TransportError, NoCapacity):
        await stream.cancel()
    await events.aclose()


class OpenJob:
    """A job a node accepted and started. Iterate `events()`; always `aclose()`."""

    def __init__(self, stream: JobStream, events: Events, first: JobEvent, usage: LocalUsage) -> None:
        self.stream = stream
        self.node = stream.node or "?"
        self._events = events
        self._first: JobEvent | None = first
        self._usage = usage
        self._closed = False

    async def events(self) -> AsyncIterator[JobEvent]:
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
        self._usage.finished(self.node, self.stream.job.model)
        await self._events.aclose()


class Dispatcher:
    """Picks the node for each job (this gateway's jobs in flight count: `usage`) and opens it there."""

    def __init__(
        self,
        client: JobClient,
        fleet: FleetView,
        usage: LocalUsage,
        *,
        accept_timeout: float,
        idle_timeout: float,
        cache_aware: bool = True,
    ) -> None:
        """`cache_aware`: send a job to the holder of its prefix (placement.policy); else least loaded."""
        self._client = client
        self._cache_aware = cache_aware
        self._fleet = fleet
        self._usage = usage
        self._accept_timeout = accept_timeout
        self._idle_timeout = idle_timeout

    def best_holder(self, model: str) -> str | None:
        """The node a request for the model should go to now (least loaded first); None if none holds it."""
        ranked = self._ranked(self._fleet.holders(model), model, [])
        return ranked[0] if ranked else None

    async def open(self, job: InferenceJob) -> OpenJob:
        if not self._client.connected:
            raise TransportError("the gateway has lost its NATS connection; retry shortly")
        holders = self._fleet.holders(job.model)
        chain = prefix_chain(job) if self._cache_aware else []
        busy = 0
        for node in self._candidates(job.model, holders, chain):
            # Counted from the moment it is sent, so that jobs sent within one prefill spread out.
            if node is not None:
                self._usage.started(node, job.model)
            stream = await self._client.submit(
                job,
                node,
                accept_timeout=self._accept_timeout,
                idle_timeout=self._idle_timeout,
                node_alive=self._fleet.alive,
            )
            events: Events = aiter(stream)
            try:
                first = await self._first_output(events)
            except (NoCapacity, TransportError) as exc:
                log.info("job %s not taken by %s: %s", job.job_id, node or "the queue group", exc)
                self._withdraw(node, job.model)
                await _abandon(stream, events)
                continue
            except JobFailed as exc:
                self._withdraw(node, job.model)
                await events.aclose()
                if not exc.retryable:
                    raise
                busy += exc.code is ErrorCode.busy
                log.info("job %s refused by %s: %s", job.job_id, node, exc.message)
                continue
            except BaseException:
                # Cancelled (the client left) while the job waited in a queue or in prefill.
                self._withdraw(node, job.model)
                with anyio.CancelScope(shield=True):
                    await _abandon(stream, events)
                raise
            if node is None:  # sent to the queue group: counted once we know who took it
                self._usage.started(stream.node or "?", job.model)
            return OpenJob(stream, events, first, self._usage)
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

    def _withdraw(self, node: str | None, model: str) -> None:
        if node is not None:
            self._usage.withdrawn(node, model)

    def _ranked(self, holders: list[Holder], model: str, chain: list[str]) -> list[str]:
        return rank_holders(holders, self._usage.in_flight(model), chain)

    def _candidates(self, model: str, holders: list[Holder], chain: list[str]) -> Iterator[str | None]:
        """The holders in rank order (the one holding the job's prefix warm first, if not much busier;
        then least loaded first); then, once, any that appeared while those were tried (a job whose
        node died before its first token goes to a node that has loaded the model since)."""
        ranked = self._ranked(holders, model, chain)
        # With no holder in view (a gateway that just started, say), the queue group may still have one.
        if ranked:
            yield from ranked
        else:
            yield None
        yield from (n for n in self._ranked(self._fleet.holders(model), model, chain) if n not in ranked)

    async def _first_output(self, events: Events) -> JobEvent:
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
