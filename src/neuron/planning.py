"""Loads on this node, planned: preflight against its devices (from the source's metadata, before
anything is allocated), the fit on their free memory, then the model table's load. Each plan's
estimate is kept, and the whole catalogue's are worked out once at start (`survey`), so
gateways can place and list models without asking."""

from __future__ import annotations

import asyncio
import logging

from cortex.protocol.catalogue import Catalogue
from cortex.protocol.messages import ModelSpec
from neuron.config import NeuronSettings
from neuron.engine.worker import DeviceWorker
from neuron.fit import check_fit, choose_devices
from neuron.models import ModelEntry, ModelTable
from neuron.node_view import Estimates, NodeView
from neuron.sources.inspect import SourceRefused
from neuron.sources.preflight import Plan, preflight, refusal_estimate

log = logging.getLogger(__name__)


class LoadPlanner:
    def __init__(
        self,
        settings: NeuronSettings,
        workers: dict[str, DeviceWorker],
        models: ModelTable,
        view: NodeView,
        estimates: Estimates,
    ) -> None:
        self._settings = settings
        self._workers = workers
        self._models = models
        self._view = view
        self._estimates = estimates

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
            max_batch=self._settings.max_batch,
            cache_dir=self._settings.hf_cache_dir,
            offline=self._settings.offline,
        )

    async def survey(self, catalogue: Catalogue) -> None:
        """Estimates every catalogue model once."""
        for spec in catalogue.models:
            try:
                estimate = (await asyncio.to_thread(self.preflight, spec)).estimate()
            except SourceRefused as exc:
                estimate = refusal_estimate(spec, exc)
            except Exception as exc:  # a hub hiccup must not stop the survey
                log.warning("cannot estimate %s: %s", spec.id, exc)
                continue
            self._estimates.record(estimate)
        log.info("memory estimates: %s", {e.model: e.memory_mb for e in self._estimates.values()})

    async def start_load(self, spec: ModelSpec, device: str | None = None) -> ModelEntry:
        """Preflight, then the fit on this node's devices, then the load. Raises SourceRefused."""
        if (entry := self._models.active(spec.id)) is not None:
            return entry
        load_plan = await asyncio.to_thread(self.preflight, spec, device)
        self._estimates.record(load_plan.estimate())
        if (entry := self._models.active(spec.id)) is not None:
            return entry  # another request started it while we read the source
        views = self._view.device_views()
        workers = choose_devices(self._workers, views, spec, device)
        check_fit(load_plan, [views[w.device.id] for w in workers])
        return self._models.load(load_plan, workers)
