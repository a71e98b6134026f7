"""Sends a job to a node that holds its model and opens its event stream; moves it when its node is lost.

Retries the next holder while the job has produced nothing: on no-responders, a retryable
error (`busy`, `model_not_loaded`, `shutting_down`), an accept timeout, its node dying or
falling silent; then, once, holders that appeared meanwhile. Errors that surface before the
first token become HTTP statuses. Later, a lost node's job goes on elsewhere (`move`): the
other holder resumes after the tokens the client already has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterator

import anyio

from cortex.gateway.metrics import GatewayMetrics
from cortex.placement.fleet import FleetView, Holder
from cortex.placement.policy import rank_holders
from cortex.placement.usage import LocalUsage
from cortex.protocol.errors import CortexError, ErrorCode, JobFailed, NoCapacity, TransportError
from cortex.protocol.messages import Accepted, Failed, InferenceJob, JobEvent
from cortex.protocol.prefix import prefix_chain
from cortex.transport.control import ControlClient, still_has
from cortex.transport.job_client import JobClient, JobStream, NodeSilent

log = logging.getLogger(__name__)

_CONNECTION_POLL_S = 0.05
_ASK_S = 0.5  # how long a silent node has to say whether it still has a job
_RESUBSCRIBE_S = 1.0  # a node reconnects every 0.5 s and subscribes again at once
# A node that fell silent on one of this gateway's jobs, or did not accept one in time, is tried
# last for this long: it is frozen or cut off until its heartbeat says otherwise (or expires).
_SUSPECT_S = 10.0


class _NobodySubscribed(NoCapacity):
    """Every holder the job was sent to had no subscription for it (NATS: no responders)."""


async def _abandon(stream: JobStream) -> None:
    """Stops a job that will not be used, wherever it got to, without waiting on its node (which
    may be frozen or gone), and stops listening to it."""
    with contextlib.suppress(TransportError, NoCapacity):
        await stream.cancel(wait=False)
    stream.close()


class OpenJob:
    """A job a node accepted and started. Read `next()` until None; always `aclose()`."""

    def __init__(self, stream: JobStream, first: JobEvent, usage: LocalUsage) -> None:
        self.stream = stream
        self.node = stream.node or "?"
        self._first: JobEvent | None = first
        self._usage = usage
        self._closed = False

    async def next(self) -> JobEvent | None:
        """The job's next event (the first output, then the rest); None after its end. Raises as
        JobStream.next does: a `NodeSilent` leaves the job open."""
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await self.stream.next()

    async def cancel(self) -> None:
        """Stops generation on the node if the job is still running there."""
        if not self.stream.finished:
            with contextlib.suppress(TransportError, NoCapacity):
                if await self.stream.cancel():
                    log.info("job %s cancelled on %s: the client left", self.stream.job.job_id, self.node)

    async def abandon(self) -> None:
        """The job went elsewhere: stop it here without waiting on this node, and release it."""
        if not self._closed:
            await _abandon(self.stream)
            await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._usage.finished(self.node, self.stream.job.model)
        self.stream.close()


class Dispatcher:
    """Picks the node for each job (this gateway's jobs in flight count: `usage`) and opens it there."""

    def __init__(
        self,
        client: JobClient,
        fleet: FleetView,
        usage: LocalUsage,
        control: ControlClient,
        metrics: GatewayMetrics,
        *,
        accept_timeout: float,
        idle_timeout: float,
        reconnect_wait: float = 0.0,
        cache_aware: bool = True,
    ) -> None:
        """`cache_aware`: send a job to the holder of its prefix (placement.policy); else least loaded.
        `reconnect_wait`: how long a job waits for a NATS connection being re-established."""
        self._client = client
        self._control = control
        self._metrics = metrics
        self._suspects: dict[str, float] = {}  # node -> when it last fell silent on a job of ours
        self._reconnect_wait = reconnect_wait
        self._cache_aware = cache_aware
        self._fleet = fleet
        self._usage = usage
        self._accept_timeout = accept_timeout
        self._idle_timeout = idle_timeout

    def best_holder(self, model: str) -> str | None:
        """The node a request for the model should go to now (least loaded first); None if none holds it."""
        ranked = self._ranked(self._fleet.holders(model), model, [])
        return ranked[0] if ranked else None

    async def open(self, job: InferenceJob, avoid: str | None = None) -> OpenJob:
        """Sends the job to the best holder that takes it (never `avoid`), and reads it up to its first
        output. A holder that accepts the job and then falls silent is set aside while the others are
        tried; if none of them takes it, it is waited on again (a node may be slow, not dead)."""
        try:
            return await self._try_holders(job, avoid)
        except _NobodySubscribed:
            # Every holder in view answered "no responders": right after a NATS reconnect (this
            # gateway's came back first) the nodes may not have subscribed again yet. Once more,
            # after they have had the time to.
            await asyncio.sleep(_RESUBSCRIBE_S)
            return await self._try_holders(job, avoid)

    async def _try_holders(self, job: InferenceJob, avoid: str | None) -> OpenJob:
        began = time.perf_counter()
        holders = self._fleet.holders(job.model)
        chain = prefix_chain(job) if self._cache_aware else []
        ranked = self._ranked(holders, job.model, chain)
        self._metrics.decisions.labels("route").observe(time.perf_counter() - began)
        busy = sent = unsubscribed = 0
        silent: list[tuple[str | None, JobStream]] = []
        try:
            for node in self._candidates(job.model, ranked, chain):
                if node is not None and node == avoid:
                    continue
                if (stream := await self._send(job, node)) is None:
                    continue
                sent += 1
                try:
                    opened = await self._opened(stream, node)
                except NodeSilent as exc:
                    log.info("job %s: %s; trying the other holders", job.job_id, exc.message)
                    self._suspect(node)
                    silent.append((node, stream))
                    continue
                except JobFailed as exc:
                    if not exc.retryable:
                        raise
                    busy += exc.code is ErrorCode.busy
                    log.info("job %s refused by %s: %s", job.job_id, node, exc.message)
                    continue
                except (NoCapacity, TransportError) as exc:
                    log.info("job %s not taken by %s: %s", job.job_id, node or "the queue group", exc)
                    unsubscribed += isinstance(exc, NoCapacity)  # NATS: no responders
                    if exc.code is ErrorCode.timeout:  # it did not even accept
                        self._suspect(node)
                    continue
                return opened
            while silent:
                node, stream = silent.pop(0)
                with contextlib.suppress(NoCapacity, TransportError):
                    return await self._opened(stream, node, patient=True)
        finally:
            for node, stream in silent:  # another took the job, or it failed
                await self._drop(stream, node)
        if busy:
            raise NoCapacity(
                f"every node serving {job.model} is at capacity; retry shortly", code=ErrorCode.busy, retryable=True
            )
        if holders and sent and unsubscribed == sent:
            raise _NobodySubscribed(f"the nodes serving {job.model} did not accept the job; retry shortly")
        if holders:
            raise NoCapacity(f"the nodes serving {job.model} did not accept the job; retry shortly")
        raise NoCapacity(
            f"{job.model} is not loaded on any node; add it to a neuron's default_models "
            "or load it with `nats req cortex.node.<node>.load`"
        )

    async def _send(self, job: InferenceJob, node: str | None) -> JobStream | None:
        """Publishes the job to `node` (None: the queue group); None if the connection dropped just then."""
        await self.until_connected()
        # Counted from the moment it is sent, so that jobs sent within one prefill spread out.
        if node is not None:
            self._usage.started(node, job.model)
        try:
            return await self._client.submit(
                job,
                node,
                accept_timeout=self._accept_timeout,
                idle_timeout=self._idle_timeout,
                node_alive=self._fleet.alive,
            )
        except TransportError as exc:
            log.info("job %s not sent to %s: %s", job.job_id, node or "the queue group", exc.message)
            self._withdraw(node, job.model)
            return None

    async def until_connected(self) -> None:
        """Returns once the NATS connection is up: at once, or after a reconnect of at most
        `reconnect_wait` seconds (a server restarting, a cluster failing over)."""
        waited = 0.0
        while not self._client.connected:
            if waited >= self._reconnect_wait:
                raise TransportError(
                    f"the gateway has had no NATS connection for {waited:.1f}s; retry shortly",
                    retryable=True,
                )
            await asyncio.sleep(_CONNECTION_POLL_S)
            waited += _CONNECTION_POLL_S

    async def move(self, job: InferenceJob, generated: list[int], lost: OpenJob, silent: bool) -> OpenJob | None:
        """Runs the rest of a job whose node was lost (`silent`: fell silent) elsewhere: a continuation
        after the tokens it `generated` (InferenceJob.resume), on another holder if one takes it; else
        on its own node again, if that is not plainly still running it (a silent node that still has
        the job, or does not answer, is slow or frozen: None, keep waiting on it)."""
        again = job.model_copy(update={"job_id": uuid.uuid4().hex, "resume": generated or None})
        if silent:
            self._suspect(lost.node)
        try:
            return await self.open(again, avoid=lost.node)
        except CortexError as exc:
            log.info("job %s cannot move off %s: %s", job.job_id, lost.node, exc.message)
        # A node that answered but no longer has the job finished or lost it while its events could
        # not reach us (NATS restarted in between): asked again, it goes on from what we have.
        if silent and await still_has(self._control, lost.node, lost.stream.job.job_id, _ASK_S) is not False:
            return None
        try:
            return await self.open(again)
        except CortexError as exc:
            log.info("job %s cannot run again: %s", job.job_id, exc.message)
            return None

    async def _opened(self, stream: JobStream, node: str | None, patient: bool = False) -> OpenJob:
        """The job open on its node once its first output came; `patient`: silence is no reason to give
        up. Whatever else keeps the job from its first output stops it there and raises."""
        try:
            first = await self._first_output(stream, patient)
        except NodeSilent:
            raise  # still counted and running: the caller decides
        except BaseException:
            # Refused, failed, lost, or cancelled (the client left) while the job waited or prefilled.
            await self._drop(stream, node)
            raise
        if node is None:  # sent to the queue group: counted once we know who took it
            self._usage.started(stream.node or "?", stream.job.model)
        return OpenJob(stream, first, self._usage)

    async def _drop(self, stream: JobStream, node: str | None) -> None:
        """A job sent to `node` that will not be used: no longer counted there, and stopped (shielded:
        this also runs while the request is being cancelled)."""
        self._withdraw(node, stream.job.model)
        with anyio.CancelScope(shield=True):
            await _abandon(stream)

    def _withdraw(self, node: str | None, model: str) -> None:
        if node is not None:
            self._usage.withdrawn(node, model)

    def _ranked(self, holders: list[Holder], model: str, chain: list[str]) -> list[str]:
        now = time.monotonic()
        self._suspects = {node: at for node, at in self._suspects.items() if now - at < _SUSPECT_S}
        return rank_holders(holders, self._usage.in_flight(model), chain, suspects=self._suspects.keys())

    def _suspect(self, node: str | None) -> None:
        if node is not None:
            self._suspects[node] = time.monotonic()

    def _candidates(self, model: str, ranked: list[str], chain: list[str]) -> Iterator[str | None]:
        """The holders in rank order (`ranked`: the one holding the job's prefix warm first, if not much
        busier; then least loaded first); then, once, any that appeared while those were tried (a job
        whose node died before its first token goes to a node that has loaded the model since)."""
        # With no holder in view (a gateway that just started, say), the queue group may still have one.
        if ranked:
            yield from ranked
        else:
            yield None
        yield from (n for n in self._ranked(self._fleet.holders(model), model, chain) if n not in ranked)

    @staticmethod
    async def _first_output(stream: JobStream, patient: bool) -> JobEvent:
        """Reads `accepted` and the event after it; a failure among them raises JobFailed (a refusal,
        before `accepted`, may be retryable; a failure after it is not)."""
        while True:
            try:
                event = await stream.next()
            except NodeSilent:
                if patient:
                    continue
                raise
            if event is None:
                raise TransportError("the job ended without a result", code=ErrorCode.internal)
            if isinstance(event, Failed):
                retryable = event.retryable and stream.node is None
                raise JobFailed(event.message, code=event.code, retryable=retryable)
            if stream.node is None:
                raise TransportError(f"expected `accepted` first, got `{event.type}`", code=ErrorCode.internal)
            if not isinstance(event, Accepted):
                return event
