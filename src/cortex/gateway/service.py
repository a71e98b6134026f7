"""The Gateway: what every request needs, connected and running. `build_gateway` makes it whole.

`build_gateway` connects to NATS, opens the buckets, starts the watches and builds each
collaborator once, in order, on one AsyncExitStack; a step that fails closes what the steps
before it opened. The Gateway it returns has no field that is None and needs no `start()`;
`aclose()` (safe twice) closes it all in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Coroutine
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, Self

from starlette.requests import Request

from cortex.config.addresses import split_host_port
from cortex.config.gateway import CortexSettings
from cortex.gateway.catalogue_view import model_entries
from cortex.gateway.dispatch import Dispatcher
from cortex.gateway.metrics import GatewayMetrics
from cortex.gateway.model_listing import ModelListing
from cortex.gateway.placer import Placer
from cortex.gateway.response_store import ResponseStore
from cortex.placement.fleet import FleetView
from cortex.placement.lease import Leases
from cortex.placement.pins import Pins
from cortex.placement.usage import LocalUsage
from cortex.protocol.catalogue import Catalogue
from cortex.protocol.errors import CortexError, ModelNotFound
from cortex.protocol.subjects import NODES_BUCKET, PINS_BUCKET, PLACEMENT_BUCKET, Subjects
from cortex.telemetry.http import TelemetryServer
from cortex.transport.connection import Connection, connect
from cortex.transport.control import ControlClient
from cortex.transport.job_client import JobClient
from cortex.transport.kv import nodes_bucket, placement_bucket, reopen_on_reconnect
from cortex.transport.watch import keep_watching, watch_bucket

log = logging.getLogger(__name__)

_FIRST_SYNC_S = 2.0  # how long a start waits for the fleet's first snapshot before serving anyway


class Gateway:
    """The gateway's long-lived state. Made only by `build_gateway`; closed by `aclose()`."""

    def __init__(
        self,
        *,
        settings: CortexSettings,
        catalogue: Catalogue,
        name: str,
        connection: Connection,
        fleet: FleetView,
        metrics: GatewayMetrics,
        usage: LocalUsage,
        dispatcher: Dispatcher,
        placer: Placer,
        control: ControlClient,
        pins: Pins,
        responses: ResponseStore,
        stack: AsyncExitStack,
    ) -> None:
        self.settings = settings
        self.catalogue = catalogue
        self.name = name
        self.connection = connection
        self.fleet = fleet
        self.metrics = metrics
        self.usage = usage  # this gateway's jobs in flight: the dispatcher writes it, the placer reads it
        self.dispatcher = dispatcher
        self.placer = placer
        self.control = control
        self.pins = pins
        self.responses = responses  # stored /v1/responses, in NATS
        self.listing = ModelListing(lambda: model_entries(catalogue, fleet, self.model_ids()))
        self._stack = stack
        self._closed = False

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._stack.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    @property
    def connected(self) -> bool:
        return not self._closed and self.connection.is_connected

    def health(self) -> tuple[bool, dict[str, object]]:
        """Also read by the telemetry thread: plain reads only."""
        body = {"status": "ok" if self.connected else "nats_disconnected", "gateway": self.name}
        return self.connected, {**body, "nodes": len(self.fleet.nodes())}

    def model_ids(self) -> list[str]:
        """Every model /v1/models lists: the catalogue's and whatever the nodes report."""
        return sorted({s.id for s in self.catalogue.models} | self.fleet.known_models())

    def model_names(self, model_id: str) -> tuple[str, ...]:
        """The names an API key's `models` may match: the id and the catalogue's aliases."""
        spec = self.catalogue.resolve(model_id)
        return (model_id, *spec.aliases) if spec else (model_id,)

    def resolve_model(self, name: str) -> str:
        spec = self.catalogue.resolve(name)
        if spec is not None:
            return spec.id
        if self.fleet.knows(name):
            return name
        raise ModelNotFound(f"the model `{name}` does not exist; GET /v1/models lists the models served here")


def gateway_for(request: Request) -> Gateway:
    """The running Gateway behind the app that took `request` (its lifespan put it there)."""
    gateway: Gateway = request.app.state.gateway
    return gateway


async def build_gateway(settings: CortexSettings, catalogue: Catalogue, metrics: GatewayMetrics) -> Gateway:
    """Connects and builds a running Gateway; raises CortexError (having closed what it opened)
    when NATS cannot be reached or a bucket cannot be opened."""
    stack = AsyncExitStack()
    try:
        return await _build(stack, settings, catalogue, metrics)
    except BaseException:
        await stack.aclose()
        raise


async def _build(
    stack: AsyncExitStack, settings: CortexSettings, catalogue: Catalogue, metrics: GatewayMetrics
) -> Gateway:
    nats, gw = settings.nats, settings.gateway
    subjects = Subjects(nats.prefix)
    name = f"{socket.gethostname()}-{os.getpid()}"
    # fail_fast: while NATS is away, requests get a 503 at once, cold starts included.
    connection = await connect(nats.servers, "cortex gateway", fail_fast=True, **nats.connect_options())
    stack.push_async_callback(_drain, connection)

    fleet = FleetView(on_heartbeat=metrics.heartbeat_seen)
    stack.callback(metrics.watch_fleet(fleet))
    await nodes_bucket(connection, replicas=nats.kv_replicas)  # fail the start here, not in the watch

    async def follow_nodes() -> None:
        # Opened (created, if gone) on every (re)start: a NATS server may have come back empty.
        await fleet.follow(watch_bucket(await nodes_bucket(connection, replicas=nats.kv_replicas)))

    _run(stack, keep_watching(follow_nodes, NODES_BUCKET))

    client = await JobClient.open(connection, subjects)
    stack.push_async_callback(client.aclose)
    usage = LocalUsage()
    control = ControlClient(connection, subjects)
    dispatcher = Dispatcher(
        client,
        fleet,
        usage,
        control,
        metrics,
        accept_timeout=gw.accept_timeout,
        idle_timeout=gw.idle_timeout,
        reconnect_wait=gw.reconnect_wait,
        cache_aware=gw.routing == "cache_aware",
    )

    pins = await Pins.open(connection, subjects, replicas=nats.kv_replicas)
    _run(stack, keep_watching(pins.follow, PINS_BUCKET))
    responses = await ResponseStore.open(connection, max_age=gw.responses_ttl, replicas=nats.kv_replicas)

    leases = Leases(await placement_bucket(connection, replicas=nats.kv_replicas), name, ttl=gw.load_timeout + 30)
    # A server that came back empty has no placement bucket; the watches reopen theirs themselves.
    stack.callback(
        reopen_on_reconnect(
            connection, lambda: placement_bucket(connection, replicas=nats.kv_replicas), PLACEMENT_BUCKET
        )
    )
    placer = Placer(
        fleet=fleet,
        control=control,
        leases=leases,
        catalogue=catalogue,
        metrics=metrics,
        usage=usage,
        strategy=settings.eviction.strategy,
        load_timeout=gw.load_timeout,
        unload_timeout=settings.eviction.unload_timeout,
    )
    gateway = Gateway(
        settings=settings,
        catalogue=catalogue,
        name=name,
        connection=connection,
        fleet=fleet,
        metrics=metrics,
        usage=usage,
        dispatcher=dispatcher,
        placer=placer,
        control=control,
        pins=pins,
        responses=responses,
        stack=stack,
    )
    if gw.metrics_listen:
        telemetry = TelemetryServer(*split_host_port(gw.metrics_listen), metrics.registry, gateway.health)
        if telemetry.start():
            stack.callback(telemetry.stop)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_FIRST_SYNC_S):
            await fleet.synced.wait()
    log.info("gateway connected to %s; fleet: %s", nats.servers, fleet.ready_models() or "no models yet")
    return gateway


def _run(stack: AsyncExitStack, work: Coroutine[Any, Any, None]) -> None:
    """Runs `work` in a task until the stack closes."""
    task = asyncio.create_task(work)

    async def stop() -> None:
        # Cancelled until it ends: a watch (re)opening its bucket waits in nats-py's
        # asyncio.wait_for, which on Python 3.11 drops a cancellation that lands as the reply
        # arrives, and the watch would then run on with nobody to stop it.
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        if not task.cancelled() and task.exception() is not None:
            log.warning("%s ended with %r", task.get_name(), task.exception())

    stack.push_async_callback(stop)


async def _drain(connection: Connection) -> None:
    # The gateway is closing either way; a drain that fails (NATS gone) had nothing left to deliver.
    with contextlib.suppress(CortexError):
        await connection.drain()
