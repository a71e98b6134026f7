"""This node's models and their jobs, built together: the model table, the job relay that takes
each ready model's jobs, the view of both, the heartbeat that carries the view, and the load
planner.

They form a loop: the table's hooks start and end a model's jobs on the relay and beat the
heartbeat; the relay admits jobs by the table; the heartbeat shows both. So one object builds
them in one go (none is ever missing), and is the table's hooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from cortex.protocol.catalogue import Catalogue
from cortex.protocol.messages import EventKind, ModelSpec
from cortex.protocol.subjects import Subjects
from cortex.transport.connection import Connection
from cortex.transport.kv import Bucket, nodes_bucket
from neuron.config import NeuronSettings
from neuron.cpu_share import CpuShare
from neuron.engine.runtime import EngineOptions
from neuron.engine.worker import DeviceWorker
from neuron.events import EventPublisher
from neuron.heartbeat import Heartbeater
from neuron.jobs import JobRelay
from neuron.metrics import NeuronMetrics
from neuron.models import LoadError, ModelEntry, ModelTable
from neuron.node_view import Estimates, NodeView
from neuron.pins import Pins
from neuron.planning import LoadPlanner

log = logging.getLogger(__name__)


class Node:
    def __init__(
        self,
        settings: NeuronSettings,
        connection: Connection,
        workers: dict[str, DeviceWorker],
        heartbeats: Bucket,
        *,
        threads: int,
        pins: Pins,
        metrics: NeuronMetrics,
    ) -> None:
        self._node = settings.node
        self._threads = threads
        self._interval = settings.heartbeat_interval
        self._drain_timeout = settings.drain_timeout
        self.subjects = Subjects(settings.nats.prefix)
        self.events = EventPublisher(connection, self.subjects, settings.node)
        self._estimates = Estimates()
        self.models = ModelTable(
            workers,
            hooks=self,
            cache_dir=settings.hf_cache_dir,
            converted_dir=settings.converted_dir,
            offline=settings.offline,
            defrag_after_cycles=settings.defrag_after_cycles,
            engine=EngineOptions(
                max_batch=settings.max_batch,
                prefix_cache=settings.prefix_cache,
                prefill_chunk=settings.prefill_chunk,
                threads=threads,
            ),
            metrics=metrics,
        )
        self.relay = JobRelay(
            connection,
            settings.node,
            self.subjects,
            self.models,
            max_queue=settings.max_queue,
            metrics=metrics,
            events=self.events,
        )
        self.view = NodeView(settings, connection, workers, self.models, self.relay, pins, self._estimates, metrics)
        self.planner = LoadPlanner(settings, workers, self.models, self.view, self._estimates)
        replicas = settings.nats.kv_replicas
        self.heartbeat = Heartbeater(
            heartbeats,
            settings.node,
            settings.heartbeat_interval,
            self.view.snapshot,
            self.view.estimates,
            reopen=lambda: nodes_bucket(connection, replicas=replicas),
        )

    # --- the model table's hooks ------------------------------------------------------------

    async def model_ready(self, spec: ModelSpec) -> None:
        if self.relay.draining:
            raise LoadError(f"node {self._node} is shutting down")
        await self.relay.subscribe(spec.id)

    async def model_leaving(self, spec: ModelSpec) -> None:
        await self.relay.end_model(spec.id, self._drain_timeout)

    async def model_changed(
        self, kind: EventKind, model: str | None, detail: str | None, reason: str | None = None
    ) -> None:
        entry = self.models.get(model) if kind == "loaded" and model else None
        if entry is not None and model is not None:
            self._estimates.measured(model, entry.memory_mb)
        await self.events.publish(kind, model=model, detail=detail, reason=reason)
        await self.beat()

    # --- for the keeper (see neuron.keeper.KeptModels) ----------------------------------------

    async def start_load(self, spec: ModelSpec) -> ModelEntry:
        return await self.planner.start_load(spec)

    def in_flight(self, model_id: str) -> tuple[int, int]:
        return self.relay.in_flight(model_id)

    # ---------------------------------------------------------------------------------------

    async def watch_cores(self, share: CpuShare) -> None:
        """Every heartbeat interval: this node's share of the host's cores (neurons start and stop
        beside it), given to its engines when it changes; and whether its jobs are stalled, told to
        the fleet at once when that changes."""
        threads, stalled = self._threads, False
        while True:
            await asyncio.sleep(self._interval)
            now = await asyncio.to_thread(share.threads)
            if now != threads:
                log.info("CPU threads per engine: %d -> %d (neurons sharing this host's cores changed)", threads, now)
                await self.models.set_threads(now)
                threads = now
            if (now_stalled := self.view.stalled) != stalled:
                stalled = now_stalled
                log.warning("running jobs %s", "make no progress: no new work" if stalled else "make progress again")
                await self.beat()

    async def beat(self) -> None:
        """A heartbeat now, for a change the fleet should see at once."""
        with contextlib.suppress(Exception):  # the periodic beat reports NATS trouble
            await self.heartbeat.beat()

    async def survey(self, catalogue: Catalogue) -> None:
        """Estimates every catalogue model once, then beats, so gateways can place and list them."""
        await self.planner.survey(catalogue)
        await self.beat()
