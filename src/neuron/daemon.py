"""The neuron daemon: the composition root. Everything it starts, its exit stack stops.

Start: NATS, the heartbeat bucket, one worker thread per device, the control service,
the first heartbeat; only then is the daemon ready, and it loads its default models.
Stop (SIGTERM/SIGINT): mark draining, stop taking jobs, let in-flight jobs finish within
`drain_timeout` (cancel the rest), remove the heartbeat, close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time

from nats.aio.client import Client

from cortex.protocol.catalogue import Catalogue, CatalogueError
from cortex.protocol.errors import ErrorCode
from cortex.protocol.messages import (
    CancelReply,
    CancelRequest,
    FleetEvent,
    Heartbeat,
    LoadRequest,
    ModelSpec,
    ModelState,
    ModelStatus,
    StatusReply,
    UnloadRequest,
)
from cortex.protocol.subjects import Subjects
from cortex.transport.nats import connect, nodes_bucket
from neuron import __version__
from neuron.config import NeuronSettings
from neuron.control.service import ControlError, start_control
from neuron.devices.discovery import discover, refresh
from neuron.engine.worker import DeviceWorker
from neuron.heartbeat import Heartbeater
from neuron.jobs import JobRelay
from neuron.models import LoadError, ModelTable

log = logging.getLogger(__name__)


class Neuron:
    """Implements the control service's verbs and the model table's hooks over one NATS connection."""

    def __init__(self, settings: NeuronSettings, nc: Client, workers: dict[str, DeviceWorker]) -> None:
        self.settings = settings
        self.subjects = Subjects(settings.nats.prefix)
        self.started_at = time.time()
        self._nc = nc
        self._workers = workers
        self.models = ModelTable(workers, hooks=self, cache_dir=settings.hf_cache_dir, offline=settings.offline)
        self.relay = JobRelay(
            nc,
            settings.node,
            self.subjects,
            self.models,
            max_batch=settings.max_batch,
            max_queue=settings.max_queue,
        )
        self.heartbeat: Heartbeater | None = None

    # --- snapshot -------------------------------------------------------------------------

    def snapshot(self) -> Heartbeat:
        models = []
        for entry in self.models.entries():
            running, queued = self.relay.in_flight(entry.spec.id)
            models.append(entry.status(running + queued, queued))
        return Heartbeat(
            node=self.settings.node,
            version=__version__,
            started_at=self.started_at,
            sent_at=time.time(),
            interval_s=self.settings.heartbeat_interval,
            draining=self.relay.draining,
            max_batch=self.settings.max_batch,
            max_queue=self.settings.max_queue,
            devices=[refresh(w.device) for w in self._workers.values()],
            models=models,
        )

    # --- model table hooks ------------------------------------------------------------------

    async def model_ready(self, spec: ModelSpec) -> None:
        if self.relay.draining:
            raise LoadError(f"node {self.settings.node} is shutting down")
        await self.relay.subscribe(spec.id)

    async def model_leaving(self, spec: ModelSpec) -> None:
        await self.relay.end_model(spec.id, self.settings.drain_timeout)

    async def model_changed(self, kind: str, spec: ModelSpec, detail: str | None) -> None:
        await self.publish_event(kind, model=spec.id, detail=detail)
        if self.heartbeat is not None:
            await self.heartbeat.beat()

    async def publish_event(self, kind: str, model: str | None = None, detail: str | None = None) -> None:
        event = FleetEvent(kind=kind, node=self.settings.node, model=model, detail=detail)  # type: ignore[arg-type]
        await self._nc.publish(self.subjects.events(kind), event.to_bytes())

    # --- control verbs ----------------------------------------------------------------------

    async def load(self, request: LoadRequest) -> ModelStatus:
        if self.relay.draining:
            raise ControlError(503, ErrorCode.shutting_down, f"node {self.settings.node} is shutting down")
        try:
            entry = self.models.load(request.model, request.device)
        except LoadError as exc:
            raise ControlError(400, ErrorCode.invalid_request, str(exc)) from None
        if request.wait:
            await entry.done.wait()
            if entry.state is ModelState.failed:
                raise ControlError(422, ErrorCode.load_failed, entry.error or "load failed")
        return entry.status()

    async def unload(self, request: UnloadRequest) -> ModelStatus:
        entry = await self.models.unload(request.model)
        if entry is None:
            raise ControlError(404, ErrorCode.model_not_found, f"{request.model} is not loaded on {self.settings.node}")
        return entry.status()

    def status(self) -> StatusReply:
        return StatusReply(heartbeat=self.snapshot(), jobs=self.relay.statuses())

    def cancel(self, request: CancelRequest) -> CancelReply:
        return CancelReply(job_id=request.job_id, found=self.relay.cancel(request.job_id))


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
        stack.push_async_callback(nc.close)
        kv = await nodes_bucket(nc)
        devices = discover(settings.devices)
        workers = {d.id: DeviceWorker(d, max_batch=settings.max_batch) for d in devices}
        for worker in workers.values():
            worker.start()
            stack.callback(worker.stop)
        neuron = Neuron(settings, nc, workers)
        stack.push_async_callback(neuron.models.aclose)
        await neuron.relay.start()
        service = await start_control(nc, settings.node, neuron.subjects, neuron)
        stack.push_async_callback(service.stop)
        neuron.heartbeat = heartbeat = Heartbeater(nc, kv, settings.node, settings.heartbeat_interval, neuron.snapshot)
        await heartbeat.beat()
        beating = asyncio.create_task(heartbeat.run())
        await neuron.publish_event("node_up", detail=", ".join(d.id for d in devices))
        log.info("neuron %s ready on %s: devices %s", settings.node, settings.nats.servers, [d.id for d in devices])
        if ready is not None:
            ready.set()
        for spec in defaults:
            neuron.models.load(spec)

        await stop.wait()

        log.info("draining: no new jobs; in-flight jobs have %.0fs to finish", settings.drain_timeout)
        neuron.relay.draining = True
        await neuron.relay.unsubscribe_all()
        # Telling the fleet is best effort: NATS may be the reason we are stopping.
        with contextlib.suppress(Exception):
            await heartbeat.beat()
            await neuron.publish_event("node_draining")
        await neuron.relay.drain(settings.drain_timeout)
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
        await heartbeat.remove()
        with contextlib.suppress(Exception):
            await neuron.publish_event("node_down", detail="shutdown")
            await nc.flush(timeout=2)
        log.info("neuron %s stopped", settings.node)


def run(settings: NeuronSettings) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    asyncio.run(main())
