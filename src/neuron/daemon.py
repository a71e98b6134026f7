"""The neuron daemon: the composition root. Everything it starts, its exit stack stops.

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
import time

from nats.aio.client import Client

from cortex.protocol.catalogue import Catalogue, CatalogueError
from cortex.protocol.config import split_host_port
from cortex.protocol.errors import ErrorCode
from cortex.protocol.messages import (
    CancelReply,
    CancelRequest,
    CountReply,
    CountRequest,
    DeviceInfo,
    Estimate,
    FleetEvent,
    Heartbeat,
    LoadRequest,
    ModelSpec,
    ModelState,
    ModelStatus,
    StatusReply,
    UnloadRequest,
)
from cortex.protocol.subjects import PINS_BUCKET, Subjects
from cortex.telemetry.http import TelemetryServer
from cortex.transport.nats import connect, nodes_bucket, on_reconnect, pins_bucket, reopen_on_reconnect
from neuron import __version__
from neuron.config import NeuronSettings
from neuron.control.service import ControlError, start_control
from neuron.devices.discovery import budgeted, discover, refresh
from neuron.engine import backends
from neuron.engine.chat import PromptRejected
from neuron.engine.worker import DeviceWorker
from neuron.fit import check_fit, choose_devices
from neuron.heartbeat import Heartbeater
from neuron.jobs import JobRelay
from neuron.keeper import Keeper
from neuron.metrics import NeuronMetrics
from neuron.models import LoadError, ModelEntry, ModelTable
from neuron.sources.inspect import SourceRefused, SourceUnavailable
from neuron.sources.preflight import Plan, preflight, refusal_estimate
from neuron.systemd import notify

log = logging.getLogger(__name__)


class Neuron:
    """Implements the control service's verbs and the model table's hooks over one NATS connection."""

    def __init__(
        self,
        settings: NeuronSettings,
        nc: Client,
        workers: dict[str, DeviceWorker],
        catalogue: Catalogue,
        metrics: NeuronMetrics,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.subjects = Subjects(settings.nats.prefix)
        self.started_at = time.time()
        self.catalogue = catalogue
        self.estimates: dict[str, Estimate] = {}
        self._nc = nc
        self._workers = workers
        self.models = ModelTable(
            workers,
            hooks=self,
            cache_dir=settings.hf_cache_dir,
            converted_dir=settings.converted_dir,
            offline=settings.offline,
            defrag_after_cycles=settings.defrag_after_cycles,
            metrics=metrics,
        )
        self.keeper = Keeper(self, settings.node, catalogue)
        self.relay = JobRelay(
            nc,
            settings.node,
            self.subjects,
            self.models,
            max_batch=settings.max_batch,
            max_queue=settings.max_queue,
            metrics=metrics,
            publish_event=self.publish_event,
        )
        self.heartbeat: Heartbeater | None = None

    # --- snapshot -------------------------------------------------------------------------

    def device_views(self) -> dict[str, DeviceInfo]:
        """Each device as placement sees it: budget, less what the models here take."""
        s = self.settings
        return {
            d: budgeted(refresh(w.device), self.models.used_mb(d), s.memory_mb, s.memory_reserve_mb)
            for d, w in self._workers.items()
        }

    def model_status(self, entry: ModelEntry, tokens_per_s: float = 0.0) -> ModelStatus:
        running, queued = self.relay.in_flight(entry.spec.id)
        return entry.status(
            running + queued, queued, pinned=self.keeper.pinned(entry.spec.id), tokens_per_s=tokens_per_s
        )

    def snapshot(self) -> Heartbeat:
        rates = self.metrics.decode_rates.rates()
        heartbeat = Heartbeat(
            node=self.settings.node,
            version=__version__,
            started_at=self.started_at,
            sent_at=time.time(),
            interval_s=self.settings.heartbeat_interval,
            draining=self.relay.draining,
            max_batch=self.settings.max_batch,
            max_queue=self.settings.max_queue,
            devices=list(self.device_views().values()),
            models=[self.model_status(e, rates.get(e.spec.id, 0.0)) for e in self.models.entries()],
            estimates=list(self.estimates.values()),
        )
        self.metrics.observe(heartbeat)
        return heartbeat

    def health(self) -> tuple[bool, dict[str, object]]:
        """For /healthz, on the telemetry thread: plain attribute reads only."""
        connected, draining = self._nc.is_connected, self.relay.draining
        body = {"node": self.settings.node, "nats_connected": connected, "draining": draining}
        return connected and not draining, {"status": "ok" if connected and not draining else "unavailable", **body}

    # --- model table hooks ------------------------------------------------------------------

    async def model_ready(self, spec: ModelSpec) -> None:
        if self.relay.draining:
            raise LoadError(f"node {self.settings.node} is shutting down")
        await self.relay.subscribe(spec.id)

    async def model_leaving(self, spec: ModelSpec) -> None:
        await self.relay.end_model(spec.id, self.settings.drain_timeout)

    async def model_changed(self, kind: str, model: str | None, detail: str | None, reason: str | None = None) -> None:
        entry = self.models.get(model) if kind == "loaded" and model else None
        if entry is not None and model in self.estimates:
            # What the model really took beats the estimate, for the next placement here.
            self.estimates[model] = self.estimates[model].model_copy(
                update={"memory_mb": entry.memory_mb, "measured": True}
            )
        await self.publish_event(kind, model=model, detail=detail, reason=reason)
        await self.beat()

    async def beat(self) -> None:
        if self.heartbeat is not None:
            with contextlib.suppress(Exception):  # the periodic beat reports NATS trouble
                await self.heartbeat.beat()

    async def publish_event(
        self,
        kind: str,
        model: str | None = None,
        detail: str | None = None,
        reason: str | None = None,
        job_id: str | None = None,
    ) -> None:
        node = self.settings.node
        event = FleetEvent(kind=kind, node=node, model=model, detail=detail, reason=reason, job_id=job_id)  # type: ignore[arg-type]
        with contextlib.suppress(Exception):
            await self._nc.publish(self.subjects.node_event(kind, node), event.to_bytes())

    # --- preflight and memory estimates -------------------------------------------------------

    def _device_kind(self, device: str | None) -> str:
        if device is not None:
            return self._workers[device].device.kind if device in self._workers else "cpu"
        return "cuda" if any(w.device.kind == "cuda" for w in self._workers.values()) else "cpu"

    def preflight(self, spec: ModelSpec, device: str | None = None) -> Plan:
        """The load plan, from the source's metadata; blocking (it may ask the hub), so run it in a thread."""
        kind = self._device_kind(device)
        return preflight(
            spec,
            device_kind=kind,
            device_count=sum(1 for w in self._workers.values() if w.device.kind == kind),
            max_batch=self.settings.max_batch,
            cache_dir=self.settings.hf_cache_dir,
            offline=self.settings.offline,
        )

    async def survey(self) -> None:
        """Estimates every catalogue model once, so gateways can place and list them without asking."""
        for spec in self.catalogue.models:
            try:
                estimate = (await asyncio.to_thread(self.preflight, spec)).estimate()
            except SourceRefused as exc:
                estimate = refusal_estimate(spec, exc)
            except Exception as exc:  # a hub hiccup must not stop the survey
                log.warning("cannot estimate %s: %s", spec.id, exc)
                continue
            self.estimates[spec.id] = estimate
        log.info("memory estimates: %s", {e.model: e.memory_mb for e in self.estimates.values()})
        await self.beat()

    async def start_load(self, spec: ModelSpec, device: str | None = None) -> ModelEntry:
        """Preflight, then the fit on this node's devices, then the load. Raises SourceRefused."""
        if (entry := self.models.active(spec.id)) is not None:
            return entry
        load_plan = await asyncio.to_thread(self.preflight, spec, device)
        self.estimates[spec.id] = load_plan.estimate()
        if (entry := self.models.active(spec.id)) is not None:
            return entry  # another request started it while we read the source
        views = self.device_views()
        workers = choose_devices(self._workers, views, spec, device)
        check_fit(load_plan, [views[w.device.id] for w in workers])
        return self.models.load(load_plan, workers)

    # --- control verbs ----------------------------------------------------------------------

    async def load(self, request: LoadRequest) -> ModelStatus:
        if self.relay.draining:
            raise ControlError(503, ErrorCode.shutting_down, f"node {self.settings.node} is shutting down")
        try:
            entry = await self.start_load(request.model, request.device)
        except SourceRefused as exc:
            log.warning("refused to load %s: %s", request.model.id, exc.refusal.log_fields())
            raise ControlError(422, ErrorCode.preflight_failed, str(exc), exc.refusal) from None
        except LoadError as exc:
            raise ControlError(400, ErrorCode.invalid_request, str(exc)) from None
        except SourceUnavailable as exc:
            raise ControlError(503, ErrorCode.load_failed, str(exc)) from None
        if request.wait:
            await entry.done.wait()
            if entry.state is ModelState.failed:
                raise ControlError(422, ErrorCode.load_failed, entry.error or "load failed")
        return self.model_status(entry)

    async def unload(self, request: UnloadRequest) -> ModelStatus:
        if request.reason == "evicted" and self.keeper.pinned(request.model):
            raise ControlError(409, ErrorCode.invalid_request, f"{request.model} is pinned on {self.settings.node}")
        try:
            entry = await self.models.unload(request.model, request.reason, request.detail)
        except LoadError as exc:
            raise ControlError(409, ErrorCode.invalid_request, str(exc)) from None
        if entry is None:
            raise ControlError(404, ErrorCode.model_not_found, f"{request.model} is not loaded on {self.settings.node}")
        return entry.status()

    def status(self) -> StatusReply:
        return StatusReply(heartbeat=self.snapshot(), jobs=self.relay.statuses())

    def cancel(self, request: CancelRequest) -> CancelReply:
        return CancelReply(job_id=request.job_id, found=self.relay.cancel(request.job_id))

    async def count(self, request: CountRequest) -> CountReply:
        entry = self.models.ready(request.model)
        if entry is None or entry.loaded is None:
            raise ControlError(
                404, ErrorCode.model_not_loaded, f"{request.model} is not loaded on {self.settings.node}"
            )
        try:
            tokens = await asyncio.to_thread(entry.loaded.chat.count, request.messages, request.tools)
        except PromptRejected as exc:
            raise ControlError(400, ErrorCode.invalid_request, str(exc)) from exc
        return CountReply(model=entry.spec.id, input_tokens=tokens)


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
        kv = await nodes_bucket(nc, replicas=settings.nats.kv_replicas)
        devices = discover(settings.devices)
        metrics = NeuronMetrics(settings.node)
        workers = {d.id: DeviceWorker(d, max_batch=settings.max_batch, metrics=metrics) for d in devices}
        for worker in workers.values():
            worker.start()
            stack.callback(worker.stop)
        neuron = Neuron(settings, nc, workers, catalogue, metrics)
        if settings.metrics_listen:
            telemetry = TelemetryServer(*split_host_port(settings.metrics_listen), metrics.registry, neuron.health)
            if telemetry.start():
                stack.callback(telemetry.stop)
        stack.push_async_callback(neuron.models.aclose)
        await neuron.relay.start()
        service = await start_control(nc, settings.node, neuron.subjects, neuron)
        stack.push_async_callback(service.stop)
        replicas = settings.nats.kv_replicas
        neuron.heartbeat = heartbeat = Heartbeater(
            nc,
            kv,
            settings.node,
            settings.heartbeat_interval,
            neuron.snapshot,
            reopen=lambda: nodes_bucket(nc, replicas=replicas),
        )
        await heartbeat.beat()
        beating = asyncio.create_task(heartbeat.run())
        # Back from a NATS outage: our key first (gateways are re-reading the bucket right now), and
        # the pins bucket again, in case the server came back empty (the keeper's watch retries).
        stack.callback(on_reconnect(nc, heartbeat.wake))
        stack.callback(reopen_on_reconnect(nc, lambda: pins_bucket(nc, replicas=replicas), PINS_BUCKET))
        await neuron.publish_event("node_up", detail=", ".join(d.id for d in devices))
        log.info("neuron %s ready on %s: devices %s", settings.node, settings.nats.servers, [d.id for d in devices])
        log.info(backends.describe())
        if ready is not None:
            ready.set()
        for spec in defaults:
            await neuron.keeper.load(spec, "default model")
        background = [
            asyncio.create_task(_tell_systemd_when_loaded(neuron, defaults)),
            asyncio.create_task(neuron.survey()),
            asyncio.create_task(neuron.keeper.run(await pins_bucket(nc, replicas=settings.nats.kv_replicas))),
        ]

        await stop.wait()
        notify("STOPPING=1")

        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
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


async def _tell_systemd_when_loaded(neuron: Neuron, defaults: list[ModelSpec]) -> None:
    """READY=1 once the default models are loaded (or have failed): `systemctl start neuron`
    returns when the node serves what it was configured to, and TimeoutStartSec bounds that."""
    for spec in defaults:
        entry = neuron.models.get(spec.id)
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
