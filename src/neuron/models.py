"""The neuron's model table: the one owner of which models are loading, ready or failed here.

A load starts from a preflight plan (see neuron.sources.preflight) and the devices chosen
for it: the files are fetched off the event loop (downloads can take minutes), then loaded
on the first device's worker thread. The table counts load/unload cycles per device and,
every `defrag_after_cycles`, returns cached allocator memory and reports free memory
before and after.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Protocol

from cortex.protocol.messages import EventKind, ModelSpec, ModelState, ModelStatus, Refusal, UnloadReason
from cortex.protocol.subjects import model_key
from neuron.devices.discovery import refresh
from neuron.engine.backends import Engine
from neuron.engine.runtime import DEFAULT_OPTIONS, EngineOptions, LoadedModel
from neuron.engine.worker import DeviceWorker
from neuron.metrics import NeuronMetrics
from neuron.sources import loader
from neuron.sources.preflight import Plan
from neuron.sources.resolve import SourceError, resolve

log = logging.getLogger(__name__)


class TableHooks(Protocol):
    async def model_ready(self, spec: ModelSpec) -> None:
        """Before the model is marked ready: start taking its jobs."""

    async def model_leaving(self, spec: ModelSpec) -> None:
        """Before its weights are freed: stop taking jobs, end those in flight."""

    async def model_changed(
        self, kind: EventKind, model: str | None, detail: str | None, reason: str | None = None
    ) -> None:
        """After a change of state (of a model, or of a device for `defrag`): tell the fleet."""


class LoadError(Exception):
    pass


@dataclass
class ModelEntry:
    spec: ModelSpec
    state: ModelState
    workers: list[DeviceWorker]
    memory_mb: int  # the plan's estimate until loaded, then measured
    engine: Engine = "transformers"
    loaded: LoadedModel | None = None
    error: str | None = None
    refusal: Refusal | None = None
    last_used: float | None = None
    phase: Literal["download", "load"] | None = "download"
    progress: float | None = None
    since: float = field(default_factory=time.time)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def enter(self, state: ModelState, error: str | None = None) -> None:
        self.state, self.error, self.since = state, error, time.time()

    @property
    def worker(self) -> DeviceWorker:
        return self.workers[0]

    @property
    def device_ids(self) -> list[str]:
        return [w.device.id for w in self.workers]

    def status(
        self, in_flight: int = 0, queued: int = 0, *, pinned: bool = False, tokens_per_s: float = 0.0
    ) -> ModelStatus:
        loading = self.state is ModelState.loading
        return ModelStatus(
            id=self.spec.id,
            key=model_key(self.spec.id),
            state=self.state,
            since=self.since,
            device=self.worker.device.id,
            devices=self.device_ids if len(self.workers) > 1 else [],
            memory_mb=self.memory_mb,
            engine=self.engine if self.state is not ModelState.failed else None,
            parallel=self.loaded.parallel if self.loaded is not None else None,
            in_flight=in_flight,
            queued=queued,
            tokens_per_s=round(tokens_per_s, 2),
            last_used=self.last_used,
            pinned=pinned,
            priority=self.spec.priority,
            phase=self.phase if loading else None,
            progress=self.progress if loading else None,
            error=self.error,
            refusal=self.refusal,
            prefix_cache=self.loaded.runtime.prefix.status() if self.loaded is not None else None,
        )


class ModelTable:
    def __init__(
        self,
        workers: dict[str, DeviceWorker],
        *,
        hooks: TableHooks,
        cache_dir: Path | None = None,
        converted_dir: Path | None = None,
        offline: bool = False,
        defrag_after_cycles: int = 0,
        engine: EngineOptions = DEFAULT_OPTIONS,
        metrics: NeuronMetrics | None = None,
    ) -> None:
        self._workers = workers
        self._metrics = metrics
        self._hooks = hooks
        self._cache_dir = cache_dir
        self._converted_dir = converted_dir
        self._offline = offline
        self._defrag_after = defrag_after_cycles
        self._engine = engine
        self._cycles: Counter[str] = Counter()
        self._entries: dict[str, ModelEntry] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._saving: set[Path] = set()

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    async def set_threads(self, threads: int) -> None:
        """The CPU threads of every engine from now on: the models loaded, and the next loads."""
        self._engine = replace(self._engine, threads=threads)
        for entry in self.entries():
            if entry.loaded is not None:
                await entry.worker.call(entry.loaded.runtime.set_threads, threads)

    def get(self, name: str) -> ModelEntry | None:
        entry = self._entries.get(name)
        if entry is None:
            entry = next((e for e in self._entries.values() if name in e.spec.aliases), None)
        return entry

    def active(self, model_id: str) -> ModelEntry | None:
        """The entry of a model loading or loaded here: a new load of it would be a duplicate."""
        entry = self._entries.get(model_id)
        return entry if entry is not None and entry.state in (ModelState.loading, ModelState.ready) else None

    def ready(self, name: str) -> ModelEntry | None:
        entry = self.get(name)
        return entry if entry is not None and entry.state is ModelState.ready else None

    def used_mb(self, device_id: str) -> int:
        """Memory the models on a device take (a model over several devices counts a share on each)."""
        return sum(e.memory_mb // len(e.workers) for e in self._entries.values() if device_id in e.device_ids)

    def load(self, plan: Plan, workers: list[DeviceWorker]) -> ModelEntry:
        """Starts loading (or returns the entry already loading or loaded). Await `entry.done`."""
        spec = plan.spec
        if (active := self.active(spec.id)) is not None:
            return active
        entry = self._entries.get(spec.id)
        if entry is not None and entry.state is ModelState.unloading:
            raise LoadError(f"{spec.id} is being unloaded; load it again once that has finished")
        entry = ModelEntry(
            spec=spec, state=ModelState.loading, workers=workers, memory_mb=plan.memory_mb, engine=plan.engine
        )
        self._entries[spec.id] = entry
        self._spawn(self._load(entry, plan))
        return entry

    def refused(self, spec: ModelSpec, refusal: Refusal) -> ModelEntry:
        """Records a load that preflight refused, so the heartbeat shows it failed, and why."""
        entry = ModelEntry(
            spec=spec, state=ModelState.failed, workers=[next(iter(self._workers.values()))], memory_mb=0
        )
        entry.error = f"{refusal.detail}" + (f"; {refusal.suggestion}" if refusal.suggestion else "")
        entry.refusal = refusal
        entry.done.set()
        current = self._entries.get(spec.id)
        if current is None or current.state is ModelState.failed:
            self._entries[spec.id] = entry
        return entry

    async def unload(self, name: str, reason: UnloadReason = "admin", detail: str | None = None) -> ModelEntry | None:
        entry = self.get(name)
        if entry is None:
            return None
        if entry.state is ModelState.loading:
            await entry.done.wait()
        if entry.state is ModelState.unloading:
            raise LoadError(f"{entry.spec.id} is already being unloaded")
        entry.enter(ModelState.unloading)
        try:
            await self._hooks.model_leaving(entry.spec)
        finally:
            # Whatever failed above, the weights go and the entry with them: one stuck in `unloading`
            # would refuse every later load and unload of the model.
            try:
                if entry.loaded is not None:
                    await entry.worker.call(loader.unload, entry.loaded)
            finally:
                entry.loaded = None
                if self._entries.get(entry.spec.id) is entry:
                    del self._entries[entry.spec.id]
        log.info("unloaded %s: reason=%s%s", entry.spec.id, reason, f" ({detail})" if detail else "")
        await self._hooks.model_changed("evicted" if reason == "evicted" else "unloaded", entry.spec.id, detail, reason)
        for worker in entry.workers:
            await self._count_cycle(worker)
        return entry

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, work: Coroutine[object, object, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _count_cycle(self, worker: DeviceWorker) -> None:
        device = worker.device.id
        self._cycles[device] += 1
        if not self._defrag_after or self._cycles[device] % self._defrag_after:
            return
        before = refresh(worker.device).free_mb
        await worker.call(loader.release_cached_memory, worker.torch_device)
        after = refresh(worker.device).free_mb
        detail = f"{device}: free {before} MB -> {after} MB after {self._cycles[device]} load/unload cycles"
        log.info("released cached memory on %s", detail)
        await self._hooks.model_changed("defrag", None, detail)

    async def _load(self, entry: ModelEntry, plan: Plan) -> None:
        started = time.perf_counter()
        await self._hooks.model_changed("loading", entry.spec.id, ", ".join(entry.device_ids))
        try:
            await self._bring_up(entry, plan)
        finally:
            entry.done.set()
            if self._metrics is not None:
                outcome = "ready" if entry.state is ModelState.ready else "failed"
                self._metrics.load_seconds.labels(entry.spec.id, outcome).observe(time.perf_counter() - started)
        if entry.state is ModelState.ready:
            assert entry.loaded is not None
            seconds = time.perf_counter() - started
            cached = ", from converted cache" if entry.loaded.from_cache else ""
            detail = f"{', '.join(entry.device_ids)}, {seconds:.1f}s, {entry.memory_mb} MB{cached}"
            log.info("loaded %s: %s", entry.spec.id, detail)
            await self._hooks.model_changed("loaded", entry.spec.id, detail)
            target = entry.loaded.convert_to
            if target is not None and target not in self._saving:
                self._saving.add(target)
                self._spawn(self._save_converted(entry.loaded, target))
        else:
            await self._hooks.model_changed("load_failed", entry.spec.id, entry.error)

    async def _bring_up(self, entry: ModelEntry, plan: Plan) -> None:
        """Fetches, loads and subscribes; leaves the entry `ready`, or `failed` with the reason."""
        spec = entry.spec
        log.info("loading %s from %s on %s", spec.id, spec.source, ", ".join(entry.device_ids))

        def progress(done: int, total: int) -> None:  # called from the download thread
            entry.progress = done / total

        try:
            source = await asyncio.to_thread(
                resolve, plan, cache_dir=self._cache_dir, offline=self._offline, progress=progress
            )
            entry.phase, entry.progress = "load", None
            devices = [w.torch_device for w in entry.workers]
            share = plan.memory_mb // len(entry.workers) + 1
            options = self._engine
            entry.loaded = await entry.worker.call(
                loader.load, plan, source, devices, [share] * len(devices), self._converted_dir, options
            )
            if self._engine.threads != options.threads:  # the host's share changed while it loaded
                await entry.worker.call(entry.loaded.runtime.set_threads, self._engine.threads)
            entry.memory_mb = entry.loaded.memory_mb
            await self._hooks.model_ready(spec)
        except asyncio.CancelledError:
            entry.enter(ModelState.failed, "load cancelled")
            raise
        except (SourceError, LoadError) as exc:
            self._failed(entry, str(exc))
        except Exception as exc:
            log.exception("loading %s failed", spec.id)
            self._failed(entry, f"{type(exc).__name__}: {exc}")
        else:
            entry.enter(ModelState.ready)
            entry.last_used = time.time()
            return
        if entry.loaded is not None:
            await entry.worker.call(loader.unload, entry.loaded)
            entry.loaded = None

    async def _save_converted(self, loaded: LoadedModel, target: Path) -> None:
        started = time.perf_counter()
        try:
            await asyncio.to_thread(loader.save_converted, loaded)
        except Exception as exc:
            log.warning("could not cache the converted weights of %s: %s", loaded.spec.id, exc)
            return
        finally:
            self._saving.discard(target)
        seconds = time.perf_counter() - started
        log.info("cached converted weights of %s in %s (%.1fs)", loaded.spec.id, target, seconds)

    def _failed(self, entry: ModelEntry, message: str) -> None:
        entry.enter(ModelState.failed, message)
        entry.memory_mb = 0
        log.error("cannot load %s: %s", entry.spec.id, message)
