"""This node as the fleet sees it: its devices (each one's budget, less what the models here
take), each model's status, and the memory estimates: the heartbeat and the estimates record.

Only reads: the model table, the job relay and the pins own what is shown here.
"""

from __future__ import annotations

import time
from typing import Protocol

from cortex.protocol.messages import DeviceInfo, Estimate, Heartbeat, ModelStatus, NodeEstimates
from cortex.transport.connection import Connection
from neuron import __version__
from neuron.config import NeuronSettings
from neuron.devices.discovery import budgeted, refresh
from neuron.engine.worker import DeviceWorker
from neuron.metrics import NeuronMetrics
from neuron.models import ModelEntry, ModelTable
from neuron.pins import Pins


class JobCounts(Protocol):
    """What the view reads of the job relay."""

    @property
    def draining(self) -> bool: ...

    def in_flight(self, model_id: str) -> tuple[int, int]: ...


class Estimates:
    """Each model's memory estimate on this node, by id: preflight's (of the whole catalogue, at
    start, and of each load), then what the model really took once loaded."""

    def __init__(self) -> None:
        self._by_model: dict[str, Estimate] = {}

    def values(self) -> list[Estimate]:
        return list(self._by_model.values())

    def record(self, estimate: Estimate) -> None:
        self._by_model[estimate.model] = estimate

    def measured(self, model: str, memory_mb: int) -> None:
        """What the model really took beats the estimate, for the next placement here."""
        if model in self._by_model:
            self._by_model[model] = self._by_model[model].model_copy(update={"memory_mb": memory_mb, "measured": True})


class NodeView:
    def __init__(
        self,
        settings: NeuronSettings,
        connection: Connection,
        workers: dict[str, DeviceWorker],
        models: ModelTable,
        jobs: JobCounts,
        pins: Pins,
        estimates: Estimates,
        metrics: NeuronMetrics,
    ) -> None:
        self._settings = settings
        self._connection = connection
        self._workers = workers
        self._models = models
        self._jobs = jobs
        self._pins = pins
        self._estimates = estimates
        self._metrics = metrics
        self._started_at = time.time()

    def device_views(self) -> dict[str, DeviceInfo]:
        """Each device as placement sees it: budget, less what the models here take."""
        s = self._settings
        return {
            d: budgeted(refresh(w.device), self._models.used_mb(d), s.memory_mb, s.memory_reserve_mb)
            for d, w in self._workers.items()
        }

    def model_status(self, entry: ModelEntry, tokens_per_s: float = 0.0) -> ModelStatus:
        running, queued = self._jobs.in_flight(entry.spec.id)
        return entry.status(
            running + queued, queued, pinned=self._pins.pinned(entry.spec.id), tokens_per_s=tokens_per_s
        )

    @property
    def stalled(self) -> bool:
        """Whether a device's running jobs have stopped making progress (engine/progress.py)."""
        return any(w.progress.stalled for w in self._workers.values())

    def snapshot(self) -> Heartbeat:
        rates = self._metrics.decode_rates.rates()
        heartbeat = Heartbeat(
            node=self._settings.node,
            version=__version__,
            started_at=self._started_at,
            sent_at=time.time(),
            interval_s=self._settings.heartbeat_interval,
            draining=self._jobs.draining,
            stalled=self.stalled,
            max_batch=self._settings.max_batch,
            max_queue=self._settings.max_queue,
            devices=list(self.device_views().values()),
            models=[self.model_status(e, rates.get(e.spec.id, 0.0)) for e in self._models.entries()],
        )
        self._metrics.observe(heartbeat)
        return heartbeat

    def estimates(self) -> NodeEstimates:
        return NodeEstimates(node=self._settings.node, estimates=self._estimates.values())

    def health(self) -> tuple[bool, dict[str, object]]:
        """For /healthz, on the telemetry thread: plain attribute reads only."""
        connected, draining = self._connection.is_connected, self._jobs.draining
        body = {"node": self._settings.node, "nats_connected": connected, "draining": draining}
        return connected and not draining, {"status": "ok" if connected and not draining else "unavailable", **body}
