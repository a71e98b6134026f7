"""Cold loads: the one owner, in a gateway, of deciding where a model goes and making room.

`prepare(model)` answers at once: None when the model is served now, else a task that
finishes when it is. Whatever can be known at once raises right there (unknown model,
preflight refusal, no room anywhere), so the HTTP layer can still answer 422/503 before
it commits to a stream. Starting a load is serialized in this gateway (decisions about
room must not interleave); across gateways the KV lease makes exactly one of them load,
and the others wait for the heartbeat that says `ready`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from cortex.gateway.metrics import GatewayMetrics
from cortex.placement import planner
from cortex.placement.fleet import FleetView
from cortex.placement.lease import Leases
from cortex.placement.planner import Placement, Strategy
from cortex.placement.usage import LocalUsage
from cortex.protocol.catalogue import Catalogue
from cortex.protocol.errors import CortexError, ErrorCode, JobFailed, NoCapacity, Refused, TransportError
from cortex.protocol.messages import LoadRequest, ModelReply, ModelSpec, ModelState, UnloadRequest
from cortex.transport.control import ControlClient

log = logging.getLogger(__name__)

_CONTROL_TIMEOUT_S = 30.0
_LEASE_CHECK_S = 2.0


class Placer:
    def __init__(
        self,
        *,
        fleet: FleetView,
        control: ControlClient,
        leases: Leases,
        catalogue: Catalogue,
        metrics: GatewayMetrics,
        usage: LocalUsage,
        strategy: Strategy,
        load_timeout: float,
        unload_timeout: float,
    ) -> None:
        self._fleet = fleet
        self._control = control
        self._leases = leases
        self._catalogue = catalogue
        self._metrics = metrics
        self._usage = usage
        self._strategy = strategy
        self._load_timeout = load_timeout
        self._unload_timeout = unload_timeout
        self._loads: dict[str, asyncio.Task[None]] = {}
        self._deciding = asyncio.Lock()

    async def prepare(self, model_id: str) -> asyncio.Task[None] | None:
        if self._fleet.holders(model_id):
            return None
        pending = self._loads.get(model_id)
        if pending is not None:
            return pending
        spec = self._catalogue.resolve(model_id)
        if spec is None:
            raise NoCapacity(f"{model_id} is not loaded on any node, and it is not in the catalogue")
        if not self._fleet.statuses(spec.id, ModelState.loading):
            self._plan(spec)  # what can be known now (refused, no room) is answered now; the task decides again
        pending = asyncio.create_task(self._load_and_wait(spec))
        self._loads[model_id] = pending
        pending.add_done_callback(lambda task: self._settle(model_id, task))
        return pending

    def _plan(self, spec: ModelSpec) -> Placement:
        began = time.perf_counter()
        try:
            return planner.plan(spec, [self._usage.merged(hb) for hb in self._fleet.nodes()], self._strategy)
        finally:
            self._metrics.decisions.labels("place").observe(time.perf_counter() - began)

    async def _load_and_wait(self, spec: ModelSpec) -> None:
        # One decision about room at a time in this gateway: two loads must not count the same free memory.
        async with self._deciding:
            if self._fleet.holders(spec.id):
                return
            started = await self._start(spec)
        await self._until_ready(spec, *started)

    def _settle(self, model_id: str, task: asyncio.Task[None]) -> None:
        self._loads.pop(model_id, None)
        if not task.cancelled() and task.exception() is not None:
            # Every waiter got the error; this keeps asyncio from reporting it again when all had left.
            log.info("loading %s did not succeed: %s", model_id, task.exception())

    async def place(self, model_id: str) -> None:
        """Loads the model somewhere if it is not served, and waits until it is."""
        pending = await self.prepare(model_id)
        if pending is not None:
            await asyncio.shield(pending)

    async def _start(self, spec: ModelSpec) -> tuple[str | None, float, bool]:
        """Starts the load: (node, since, whether we hold the lease); node None = another gateway's load."""
        loading = self._fleet.statuses(spec.id, ModelState.loading)
        if loading:
            node, status = loading[0]
            return node, status.since, False
        placement = self._plan(spec)
        if not await self._leases.acquire(spec.id, placement.node):
            holder = await self._leases.holder(spec.id)
            log.info("%s is being placed by %s; waiting", spec.id, holder.gateway if holder else "another gateway")
            return None, time.time() - 1.0, False
        try:
            return placement.node, await self._load(spec, placement), True
        except BaseException:
            await self._leases.release(spec.id)
            raise

    async def _load(self, spec: ModelSpec, placement: Placement) -> float:
        node = placement.node
        for victim in placement.victims:
            log.info("evicting %s from %s to make room for %s (%s)", victim.id, node, spec.id, self._strategy)
            request = UnloadRequest(model=victim.id, reason="evicted", detail=f"to make room for {spec.id}")
            try:
                await self._control.call(node, "unload", request, ModelReply, timeout=self._unload_timeout)
            except CortexError as exc:
                if exc.code is not ErrorCode.model_not_found:  # gone already is what we wanted
                    raise NoCapacity(
                        f"could not make room for {spec.id} on {node}: {exc.message}; retry", retryable=True
                    ) from exc
            self._metrics.evictions.labels(self._strategy).inc()
        device = placement.devices[0] if len(placement.devices) == 1 else None
        try:
            reply = await self._control.call(
                node, "load", LoadRequest(model=spec, device=device), ModelReply, timeout=_CONTROL_TIMEOUT_S
            )
        except Refused as exc:
            if exc.refusal.kind != "insufficient_memory":
                raise
            # The heartbeat we planned on was stale: the room is gone now.
            raise NoCapacity(exc.message, code=ErrorCode.insufficient_capacity, retryable=True) from exc
        except JobFailed as exc:
            if exc.code is not ErrorCode.invalid_request:
                raise
            raise NoCapacity(f"{node} cannot load {spec.id} now: {exc.message}; retry", retryable=True) from exc
        self._metrics.cold_starts.labels(spec.id).inc()
        evicted = f", evicting {[v.id for v in placement.victims]}" if placement.victims else ""
        log.info("placing %s on %s (%s, %d MB%s)", spec.id, node, device or "auto", placement.need_mb, evicted)
        return reply.model.since

    async def _until_ready(self, spec: ModelSpec, node: str | None, since: float, leased: bool) -> None:
        started = time.monotonic()

        def settled(fleet: FleetView) -> bool:
            return bool(fleet.holders(spec.id) or _failure(fleet, spec.id, node, since) or _lost(fleet, node))

        try:
            while not await self._settled_within(settled, _LEASE_CHECK_S):
                if time.monotonic() - started > self._load_timeout:
                    raise TransportError(
                        f"{spec.id} did not finish loading within {self._load_timeout:g}s; it may still be loading: "
                        "retry later, or raise [gateway] load_timeout",
                        code=ErrorCode.timeout,
                    )
                # Checked again after the lease read: the load may have finished meanwhile.
                if node is None and not await self._elsewhere(spec.id) and not settled(self._fleet):
                    raise NoCapacity(f"another gateway's load of {spec.id} did not start; retry", retryable=True)
            failure = _failure(self._fleet, spec.id, node, since)
            if failure is not None:
                raise JobFailed(f"loading {spec.id} on {failure[0]} failed: {failure[1]}", code=ErrorCode.load_failed)
            if not self._fleet.holders(spec.id):
                raise NoCapacity(f"node {node} left the fleet while loading {spec.id}; retry", retryable=True)
            log.info("%s ready after %.1fs", spec.id, time.monotonic() - started)
        finally:
            if leased:
                await self._leases.release(spec.id)

    async def _settled_within(self, settled: Callable[[FleetView], bool], seconds: float) -> bool:
        try:
            return await self._fleet.wait_for(settled, seconds)
        except TimeoutError:
            return False

    async def _elsewhere(self, model_id: str) -> bool:
        """Whether another gateway's load is still on: its lease stands, or a node shows the model loading."""
        return (
            bool(self._fleet.statuses(model_id, ModelState.loading)) or await self._leases.holder(model_id) is not None
        )


def _failure(fleet: FleetView, model_id: str, node: str | None, since: float) -> tuple[str, str] | None:
    """A failed load of ours: on the node we asked (after we asked), or anywhere if it was not ours."""
    for where, m in fleet.statuses(model_id, ModelState.failed):
        if (node is None or where == node) and m.since >= since:
            return where, m.error or "load failed"
    return None


def _lost(fleet: FleetView, node: str | None) -> bool:
    return node is not None and not fleet.alive(node)
