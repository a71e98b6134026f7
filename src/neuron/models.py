"""The neuron's model table: the one owner of which models are loading, ready or failed here.

Loads resolve the source off the event loop (downloads can take minutes), then load on the
chosen device's worker thread. A ready model is announced on `<prefix>.events.loaded` and
its job subjects are subscribed by the relay (through `on_ready`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cortex.protocol.messages import ModelSpec, ModelState, ModelStatus
from cortex.protocol.subjects import model_key
from neuron.engine.worker import DeviceWorker
from neuron.sources import loader
from neuron.sources.loader import LoadedModel
from neuron.sources.resolve import SourceError, resolve

log = logging.getLogger(__name__)


class TableHooks(Protocol):
    async def model_ready(self, spec: ModelSpec) -> None:
        """Before the model is marked ready: start taking its jobs."""

    async def model_leaving(self, spec: ModelSpec) -> None:
        """Before its weights are freed: stop taking jobs, end those in flight."""

    async def model_changed(self, kind: str, spec: ModelSpec, detail: str | None) -> None:
        """After a change of state: tell the fleet."""


class LoadError(Exception):
    pass


@dataclass
class ModelEntry:
    spec: ModelSpec
    state: ModelState
    worker: DeviceWorker | None = None
    loaded: LoadedModel | None = None
    error: str | None = None
    last_used: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def status(self, in_flight: int = 0, queued: int = 0) -> ModelStatus:
        return ModelStatus(
            id=self.spec.id,
            key=model_key(self.spec.id),
            state=self.state,
            device=self.worker.device.id if self.worker else "",
            memory_mb=self.loaded.memory_mb if self.loaded else 0,
            in_flight=in_flight,
            queued=queued,
            last_used=self.last_used,
            error=self.error,
        )


class ModelTable:
    def __init__(
        self,
        workers: dict[str, DeviceWorker],
        *,
        hooks: TableHooks,
        cache_dir: Path | None = None,
        offline: bool = False,
    ) -> None:
        self._workers = workers
        self._hooks = hooks
        self._cache_dir = cache_dir
        self._offline = offline
        self._entries: dict[str, ModelEntry] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def get(self, name: str) -> ModelEntry | None:
        entry = self._entries.get(name)
        if entry is None:
            entry = next((e for e in self._entries.values() if name in e.spec.aliases), None)
        return entry

    def ready(self, name: str) -> ModelEntry | None:
        entry = self.get(name)
        return entry if entry is not None and entry.state is ModelState.ready else None

    def load(self, spec: ModelSpec, device: str | None = None) -> ModelEntry:
        """Starts loading (or returns the entry already loading or loaded). Await `entry.done`."""
        entry = self._entries.get(spec.id)
        if entry is not None and entry.state in (ModelState.loading, ModelState.ready):
            return entry
        if entry is not None and entry.state is ModelState.unloading:
            raise LoadError(f"{spec.id} is being unloaded; load it again once that has finished")
        worker = self._pick_worker(device)
        entry = ModelEntry(spec=spec, state=ModelState.loading, worker=worker)
        self._entries[spec.id] = entry
        task = asyncio.create_task(self._load(entry))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return entry

    async def unload(self, name: str) -> ModelEntry | None:
        entry = self.get(name)
        if entry is None:
            return None
        if entry.state is ModelState.loading:
            await entry.done.wait()
        if entry.state is ModelState.unloading:
            raise LoadError(f"{entry.spec.id} is already being unloaded")
        entry.state = ModelState.unloading
        await self._hooks.model_leaving(entry.spec)
        if entry.loaded is not None and entry.worker is not None:
            await entry.worker.call(loader.unload, entry.loaded)
        entry.loaded = None
        if self._entries.get(entry.spec.id) is entry:
            del self._entries[entry.spec.id]
        log.info("unloaded %s", entry.spec.id)
        await self._hooks.model_changed("unloaded", entry.spec, None)
        return entry

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _pick_worker(self, device: str | None) -> DeviceWorker:
        if device is not None:
            if device not in self._workers:
                raise LoadError(f"device {device} is not served by this neuron; it has {sorted(self._workers)}")
            return self._workers[device]
        # The freest GPU, else the CPU (workers are ordered GPUs first).
        gpus = [w for w in self._workers.values() if w.device.kind == "cuda"]
        if gpus:
            return max(gpus, key=lambda w: w.device.free_mb)
        return next(iter(self._workers.values()))

    async def _load(self, entry: ModelEntry) -> None:
        started = time.perf_counter()
        try:
            await self._bring_up(entry)
        finally:
            entry.done.set()
        if entry.state is ModelState.ready:
            assert entry.loaded is not None and entry.worker is not None
            seconds = time.perf_counter() - started
            detail = f"{entry.worker.device.id}, {seconds:.1f}s, {entry.loaded.memory_mb} MB"
            log.info("loaded %s: %s", entry.spec.id, detail)
            await self._hooks.model_changed("loaded", entry.spec, detail)
        else:
            await self._hooks.model_changed("load_failed", entry.spec, entry.error)

    async def _bring_up(self, entry: ModelEntry) -> None:
        """Resolves, loads and subscribes; leaves the entry `ready`, or `failed` with the reason."""
        spec, worker = entry.spec, entry.worker
        assert worker is not None
        log.info("loading %s from %s on %s", spec.id, spec.source, worker.device.id)
        try:
            source = await asyncio.to_thread(resolve, spec, cache_dir=self._cache_dir, offline=self._offline)
            entry.loaded = await worker.call(loader.load, spec, source, worker.torch_device)
            await self._hooks.model_ready(spec)
        except asyncio.CancelledError:
            entry.state, entry.error = ModelState.failed, "load cancelled"
            raise
        except (SourceError, LoadError) as exc:
            self._failed(entry, str(exc))
        except Exception as exc:
            log.exception("loading %s failed", spec.id)
            self._failed(entry, f"{type(exc).__name__}: {exc}")
        else:
            entry.state = ModelState.ready
            entry.last_used = time.time()
            return
        if entry.loaded is not None:
            await worker.call(loader.unload, entry.loaded)
            entry.loaded = None

    def _failed(self, entry: ModelEntry, message: str) -> None:
        entry.state, entry.error = ModelState.failed, message
        log.error("cannot load %s: %s", entry.spec.id, message)
