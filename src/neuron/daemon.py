"""The neuron daemon: the composition root. It builds the node (neuron.node), serves it, and
stops it; everything it starts, its exit stack stops.

Start: NATS, the heartbeat bucket, one worker thread per device, the control service,
the first heartbeat; only then is the daemon ready, and it loads its default and pinned
models. The catalogue's memory estimates are worked out in the background and join the
heartbeat as they come.
Stop (SIGTERM/SIGINT): mark draining, stop taking jobs, let in-flight jobs finish within
`drain_timeout` (cancel the rest), remove the heartbeat, close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from cortex.config.addresses import split_host_port
from cortex.protocol.catalogue import Catalogue, CatalogueError
from cortex.protocol.messages import ModelSpec
from cortex.protocol.subjects import PINS_BUCKET
from cortex.telemetry.http import TelemetryServer
from cortex.transport.connection import connect
from cortex.transport.kv import nodes_bucket, pins_bucket, reopen_on_reconnect
from neuron.config import NeuronSettings
from neuron.control.service import start_control
from neuron.control.verbs import ControlVerbs
from neuron.cpu_share import CpuShare
from neuron.devices.discovery import discover
from neuron.engine import backends
from neuron.engine.worker import DeviceWorker
from neuron.keeper import Keeper
from neuron.metrics import NeuronMetrics
from neuron.models import ModelTable
from neuron.node import Node
from neuron.pins import Pins
from neuron.systemd import notify

log = logging.getLogger(__name__)


async def serve(settings: NeuronSettings, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
    catalogue = Catalogue.load(settings.models_config)
    defaults = []
    for name in settings.default_models:
        spec = catalogue.resolve(name)
        if spec is None:
            raise CatalogueError(f"default model {name!r} is not in the catalogue; known: {catalogue.names()}")
        defaults.append(spec)

    async with contextlib.AsyncExitStack() as stack:
        nc = await connect(settings.nats.servers, f"neuron {settings.node}", **settings.nats.connect_options())
        stack.push_async_callback(nc.aclose)
        kv = await nodes_bucket(nc, replicas=settings.nats.kv_replicas)
        devices = discover(settings.devices)
        metrics = NeuronMetrics(settings.node)
        workers = {d.id: DeviceWorker(d, max_batch=settings.max_batch, metrics=metrics) for d in devices}
        for worker in workers.values():
            worker.start()
            stack.callback(worker.stop)
        pins = Pins(settings.node, catalogue)
        cores = stack.enter_context(CpuShare(settings.threads))
        threads = cores.threads()
        log.info("CPU threads per engine: %d (%s)", threads, "set" if settings.threads else "this node's share")
        node = Node(settings, nc, workers, kv, threads=threads, pins=pins, metrics=metrics)
        keeper = Keeper(node, node.models, settings.node, pins)
        if settings.metrics_listen:
            telemetry = TelemetryServer(*split_host_port(settings.metrics_listen), metrics.registry, node.view.health)
            if telemetry.start():
                stack.callback(telemetry.stop)
        stack.push_async_callback(node.models.aclose)
        await node.relay.start()
        verbs = ControlVerbs(settings.node, node.models, node.relay, node.planner, node.view, pins)
        service = await start_control(nc, settings.node, node.subjects, verbs)
        stack.push_async_callback(service.aclose)
        replicas = settings.nats.kv_replicas
        heartbeat = node.heartbeat
        await heartbeat.beat()
        beating = asyncio.create_task(heartbeat.run())
        # Back from a NATS outage: our key first (gateways are re-reading the bucket right now), and
        # the pins bucket again, in case the server came back empty (the keeper's watch retries).
        stack.callback(nc.on_reconnect(heartbeat.wake))
        stack.callback(reopen_on_reconnect(nc, lambda: pins_bucket(nc, replicas=replicas), PINS_BUCKET))
        await node.events.publish("node_up", detail=", ".join(d.id for d in devices))
        log.info("neuron %s ready on %s: devices %s", settings.node, settings.nats.servers, [d.id for d in devices])
        log.info(backends.describe())
        if ready is not None:
            ready.set()
        for spec in defaults:
            await keeper.load(spec, "default model")
        background = [
            asyncio.create_task(_tell_systemd_when_loaded(node.models, defaults)),
            asyncio.create_task(node.survey(catalogue)),
            asyncio.create_task(keeper.run(await pins_bucket(nc, replicas=settings.nats.kv_replicas))),
            asyncio.create_task(node.watch_cores(cores)),
        ]

        await stop.wait()
        notify("STOPPING=1")

        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        log.info("draining: no new jobs; in-flight jobs have %.0fs to finish", settings.drain_timeout)
        await node.relay.start_draining()
        # Telling the fleet is best effort: NATS may be the reason we are stopping.
        with contextlib.suppress(Exception):
            await heartbeat.beat()
            await node.events.publish("node_draining")
        await node.relay.drain(settings.drain_timeout)
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
        await heartbeat.remove()
        with contextlib.suppress(Exception):
            await node.events.publish("node_down", detail="shutdown")
            await nc.flush(timeout=2)
        log.info("neuron %s stopped", settings.node)


async def _tell_systemd_when_loaded(models: ModelTable, defaults: list[ModelSpec]) -> None:
    """READY=1 once the default models are loaded (or have failed): `systemctl start neuron`
    returns when the node serves what it was configured to, and TimeoutStartSec bounds that."""
    for spec in defaults:
        entry = models.get(spec.id)
        if entry is not None and not entry.done.is_set():
            notify(f"STATUS=loading {spec.id}")
            await entry.done.wait()
    notify("READY=1")


def run(settings: NeuronSettings) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    asyncio.run(main())
