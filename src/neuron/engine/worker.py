"""DeviceWorker: one thread owns one device. Loads, unloads and every forward pass run on it.

The asyncio side talks to it through a queue: `call()` runs a function there and awaits
the result; `start_job()` queues a job and returns a JobHandle whose outputs stream back.
Between commands the thread admits waiting jobs (into their model's batch, up to `max_batch`
each) and steps every batch once, round-robin: each step feeds a chunk of the prompts going in
beside a token of every decoding row, so models on a device share it fairly, a long prompt does
not stop the streams running, and a cancelled job leaves at the next step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import torch

from cortex.protocol.messages import DeviceInfo, InferenceJob
from neuron.engine.generation import Batch, Generation, JobModel
from neuron.engine.outputs import Crashed, Finished, Output, coalesced
from neuron.engine.progress import Progress
from neuron.engine.runtime import LoadedModel
from neuron.metrics import NeuronMetrics

log = logging.getLogger(__name__)
T = TypeVar("T")

_STOP = object()


class JobHandle:
    """One submitted job: its outputs as an async stream, and a way to stop it."""

    def __init__(self, generation: Generation) -> None:
        self._generation = generation
        self._outputs: deque[Output] = deque()
        self._arrived = asyncio.Event()

    @property
    def running(self) -> bool:
        return self._generation.state == "running"

    @property
    def generated(self) -> int:
        return self._generation.generated

    def cancel(self) -> None:
        """Thread-safe; generation stops before its next token and ends with `cancelled`."""
        self._generation.cancel()

    def deliver(self, outputs: list[Output]) -> None:
        """On the event loop: outputs the device thread produced."""
        self._outputs.extend(outputs)
        self._arrived.set()

    async def outputs(self, quiet_after: float | None = None) -> AsyncIterator[Output | None]:
        """Text pieces, then exactly one Finished or Crashed. Pieces that arrived together and follow
        one another come as one (outputs.coalesced). With `quiet_after`, a None each time nothing
        came for that many seconds."""
        while True:
            while not self._outputs:
                self._arrived.clear()
                try:
                    async with asyncio.timeout(quiet_after):
                        await self._arrived.wait()
                except TimeoutError:
                    yield None
            output = coalesced(self._outputs)
            yield output
            if isinstance(output, Finished | Crashed):
                return


class _Outbox:
    """What the device thread hands to one event loop: the outputs of its jobs, in order, with one
    wake-up of the loop for all that pile up before it runs (not one per token: a step of eight
    rows makes eight outputs)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[JobHandle, Output]] = []

    def put(self, handle: JobHandle, output: Output) -> None:
        """On the device thread."""
        with self._lock:
            self._items.append((handle, output))
            if len(self._items) > 1:
                return  # a wake-up is on its way
        self._loop.call_soon_threadsafe(self._hand_over)

    def _hand_over(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        by_handle: dict[JobHandle, list[Output]] = {}
        for handle, output in items:
            by_handle.setdefault(handle, []).append(output)
        for handle, outputs in by_handle.items():
            handle.deliver(outputs)


class DeviceWorker:
    def __init__(self, device: DeviceInfo, *, max_batch: int, metrics: NeuronMetrics | None = None) -> None:
        self.device = device
        self._metrics = metrics
        self.torch_device = torch.device(device.id)
        self.max_batch = max_batch
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._batches: list[Batch] = []
        self._waiting: deque[Generation] = deque()
        self.progress = Progress()
        self._outboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Outbox] = weakref.WeakKeyDictionary()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"device-{self.device.id}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Safe to call twice. Jobs still running are cancelled."""
        if self._thread is None:
            return
        self._inbox.put(_STOP)
        self._thread.join(timeout)
        self._thread = None

    def runs_at_once(self, model: JobModel) -> int:
        """Jobs of `model` this device runs at once: its engine's parallel sequences (llama.cpp's pool
        takes more than max_batch), at least max_batch (a model that decodes one sequence at a time
        runs that many batches of one, in turn)."""
        return max(self.max_batch, model.parallel)

    def batch_sizes(self) -> dict[str, int]:
        """Sequences decoding now, per model (read from any thread)."""
        sizes: dict[str, int] = {}
        for batch in list(self._batches):
            sizes[batch.model.spec.id] = sizes.get(batch.model.spec.id, 0) + len(batch)
        return sizes

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._inbox.put((fn, args, future))
        return await asyncio.wrap_future(future)

    def start_job(self, job: InferenceJob, model: LoadedModel) -> JobHandle:
        """Queues a job on this device; call from the event loop that will read its outputs."""
        loop = asyncio.get_running_loop()
        outbox = self._outboxes.get(loop)
        if outbox is None:
            outbox = self._outboxes[loop] = _Outbox(loop)
        handle: JobHandle
        generation = Generation(job, model, lambda output: outbox.put(handle, output))
        handle = JobHandle(generation)
        self._inbox.put(generation)
        return handle

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                if not self._take_commands():
                    break
                self._admit()
                self._step_all()
        for gen in [*(g for b in self._batches for g in b.jobs), *self._waiting]:
            self._end_cancelled(gen)
        self._refuse_leftovers()

    def _refuse_leftovers(self) -> None:
        """After stop, nothing waits forever on a device that is gone."""
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, Generation):
                self._end_cancelled(item)
            elif item is not _STOP:
                item[2].set_exception(RuntimeError(f"device worker {self.device.id} has stopped"))

    def _take_commands(self) -> bool:
        """Runs what is in the inbox; blocks only when there is nothing to step. False on stop."""
        block = not self._batches and not self._waiting
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if item is _STOP:
                return False
            if isinstance(item, Generation):
                self._waiting.append(item)
                continue
            fn, args, future = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:
                    future.set_exception(exc)

    def _admit(self) -> None:
        if not self._waiting:
            return
        running: dict[str, int] = {}
        for batch in self._batches:
            running[batch.model.spec.id] = running.get(batch.model.spec.id, 0) + len(batch)
        still_waiting: deque[Generation] = deque()
        admitted: dict[int, list[Generation]] = {}  # by model (the loaded object: one per load)
        for gen in self._waiting:
            model_id = gen.model.spec.id
            if gen.cancelled:
                self._end_cancelled(gen)
            elif running.get(model_id, 0) < self.runs_at_once(gen.model):
                running[model_id] = running.get(model_id, 0) + 1
                admitted.setdefault(id(gen.model), []).append(gen)
            else:
                still_waiting.append(gen)
        self._waiting = still_waiting
        for gens in admitted.values():
            try:
                batch = self._batch_for(gens[0])
                for group in [gens] if batch.batchable else [[g] for g in gens]:
                    batch = self._batch_for(group[0])
                    batch.add(group)  # a prompt that cannot run ends its own job there
                    if self._metrics is not None:
                        self._metrics.prefilled(group[0].model.spec.id, sum(g.prompt_tokens for g in group))
                    if not batch:
                        self._batches.remove(batch)
            except Exception as exc:  # the batch itself could not be made: these jobs end, the thread lives
                log.exception("jobs of %s could not start on the device thread", gens[0].model.spec.id)
                for gen in gens:
                    if not gen.finished:
                        gen.fail(exc)

    def _batch_for(self, gen: Generation) -> Batch:
        batch = next((b for b in self._batches if b.can_join(gen)), None)
        if batch is None:
            batch = gen.model.new_batch()
            self._batches.append(batch)
        return batch

    def _step_all(self) -> None:
        decoding = False
        for batch in list(self._batches):
            timed = bool(batch.rows)  # a step with rows decoding is what a stall is measured on
            if timed:
                decoding = True
                self.progress.begin()
                if self._metrics is not None:
                    self._metrics.stepped(batch.model.spec.id, len(batch.rows))
            try:
                batch.step()
            except Exception as exc:
                log.exception("a decode step of %s failed on the device thread", batch.model.spec.id)
                batch.fail(exc)
            finally:
                if timed:
                    self.progress.end()
            if not batch:
                self._batches.remove(batch)
        if not decoding:
            self.progress.idle()

    def _end_cancelled(self, gen: Generation) -> None:
        """Cancels the generation (if not already) and lets it report `cancelled` now."""
        gen.cancel()
        self._guard(gen, gen.check)

    @staticmethod
    def _guard(gen: Generation, action: Callable[[], object]) -> bool:
        try:
            action()
            return True
        except Exception as exc:
            log.exception("job %s failed on the device thread", gen.job.job_id)
            gen.fail(exc)
            return False
