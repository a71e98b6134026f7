"""Gateway: the long-lived state behind the HTTP app. NATS, the fleet view, the dispatcher."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable

from nats.aio.client import Client
from nats.js.kv import KeyValue

from cortex.config import CortexSettings
from cortex.gateway.auth import Keyring
from cortex.gateway.dispatch import Dispatcher
from cortex.gateway.metrics import GatewayMetrics
from cortex.gateway.placer import Placer
from cortex.placement.fleet import FleetView
from cortex.placement.lease import Leases
from cortex.protocol.catalogue import Catalogue
from cortex.protocol.config import split_host_port
from cortex.protocol.errors import ModelNotFound
from cortex.protocol.subjects import NODES_BUCKET, PINS_BUCKET, PLACEMENT_BUCKET, Subjects
from cortex.telemetry.http import TelemetryServer
from cortex.transport.control import ControlClient
from cortex.transport.nats import (
    JobClient,
    connect,
    keep_watching,
    nodes_bucket,
    pins_bucket,
    placement_bucket,
    reopen_on_reconnect,
    watch_bucket,
)

log = logging.getLogger(__name__)


class Gateway:
    def __init__(self, settings: CortexSettings, catalogue: Catalogue) -> None:
        self.settings = settings
        self.catalogue = catalogue
        self.keyring = Keyring(settings.auth)
        self.subjects = Subjects(settings.nats.prefix)
        self.fleet = FleetView()
        self.metrics = GatewayMetrics()
        self.metrics.watch_fleet(self.fleet)
        self.name = f"{socket.gethostname()}-{os.getpid()}"
        self.nc: Client | None = None
        self.dispatcher: Dispatcher | None = None
        self.placer: Placer | None = None
        self.control: ControlClient | None = None
        self.pins: KeyValue | None = None
        self.pin_values: dict[str, bytes] = {}  # KV cortex_pins as it is now, kept by a watch
        self._client: JobClient | None = None
        self._watches: list[asyncio.Task[None]] = []
        self._stop_reopening: Callable[[], None] = lambda: None
        self._telemetry: TelemetryServer | None = None

    async def start(self) -> None:
        nats = self.settings.nats
        # fail_fast: while NATS is away, requests get a 503 at once, cold starts included.
        self.nc = await connect(nats.servers, "cortex gateway", fail_fast=True, **nats.connect_options())
        await nodes_bucket(self.nc, replicas=nats.kv_replicas)  # fail the start here, not in the watch
        self._watches.append(asyncio.create_task(keep_watching(self._follow_nodes, NODES_BUCKET)))
        self._client = JobClient(self.nc, self.subjects)
        await self._client.start()
        gw = self.settings.gateway
        self.dispatcher = Dispatcher(
            self._client, self.fleet, accept_timeout=gw.accept_timeout, idle_timeout=gw.idle_timeout
        )
        self.control = ControlClient(self.nc, self.subjects)
        self.pins = await pins_bucket(self.nc, replicas=nats.kv_replicas)
        self._watches.append(asyncio.create_task(keep_watching(self._mirror_pins, PINS_BUCKET)))
        leases = Leases(await placement_bucket(self.nc, replicas=nats.kv_replicas), self.name, ttl=gw.load_timeout + 30)
        # A server that came back empty has no placement bucket; the watches reopen theirs themselves.
        nc, replicas = self.nc, nats.kv_replicas
        self._stop_reopening = reopen_on_reconnect(
            nc, lambda: placement_bucket(nc, replicas=replicas), PLACEMENT_BUCKET
        )
        self.placer = Placer(
            fleet=self.fleet,
            control=self.control,
            leases=leases,
            catalogue=self.catalogue,
            metrics=self.metrics,
            usage=self.dispatcher.usage,
            strategy=self.settings.eviction.strategy,
            load_timeout=gw.load_timeout,
            unload_timeout=self.settings.eviction.unload_timeout,
        )
        if gw.metrics_listen:
            telemetry = TelemetryServer(*split_host_port(gw.metrics_listen), self.metrics.registry, self.health)
            self._telemetry = telemetry if telemetry.start() else None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await self.fleet.synced.wait()
        log.info("gateway connected to %s; fleet: %s", nats.servers, self.fleet.ready_models() or "no models yet")

    async def _follow_nodes(self) -> None:
        # Opened (created, if gone) on every (re)start: a NATS server may have come back empty.
        assert self.nc is not None
        kv = await nodes_bucket(self.nc, replicas=self.settings.nats.kv_replicas)
        await self.fleet.follow(watch_bucket(kv))

    async def _mirror_pins(self) -> None:
        assert self.nc is not None
        self.pins = kv = await pins_bucket(self.nc, replicas=self.settings.nats.kv_replicas)
        values: dict[str, bytes] = {}
        async for update in watch_bucket(kv):
            if update is None:
                self.pin_values = values  # a (re)started watch has replayed every key: swap in whole
            elif update[1] is None:
                values.pop(update[0], None)
            else:
                values[update[0]] = update[1]

    async def aclose(self) -> None:
        self._stop_reopening()
        for task in self._watches:
            task.cancel()
        await asyncio.gather(*self._watches, return_exceptions=True)
        self._watches = []
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.drain()
            self.nc = None
        if self._telemetry is not None:
            self._telemetry.stop()
            self._telemetry = None

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    def health(self) -> tuple[bool, dict[str, object]]:
        """Also read by the telemetry thread: plain reads only."""
        body = {"status": "ok" if self.connected else "nats_disconnected", "gateway": self.name}
        return self.connected, {**body, "nodes": len(self.fleet.nodes())}

    def model_names(self, model_id: str) -> tuple[str, ...]:
        """The names an API key's `models` may match: the id and the catalogue's aliases."""
        spec = self.catalogue.resolve(model_id)
        return (model_id, *spec.aliases) if spec else (model_id,)

    def resolve_model(self, name: str) -> str:
        spec = self.catalogue.resolve(name)
        if spec is not None:
            return spec.id
        if name in self.fleet.known_models():
            return name
        raise ModelNotFound(f"the model `{name}` does not exist; GET /v1/models lists the models served here")
