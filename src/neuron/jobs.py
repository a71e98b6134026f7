"""Admits the jobs NATS brings, hands them to the device worker, and streams the events back.

`cortex.transport.job_replies` takes the jobs off NATS and numbers the replies; this module
decides what to do with each job and turns the worker's outputs into events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from cortex.protocol.errors import ErrorCode, TransportError
from cortex.protocol.messages import (
    Accepted,
    Alive,
    Delta,
    Done,
    Failed,
    InferenceJob,
    JobStatus,
    ReasoningDelta,
    Timings,
    ToolCallDelta,
    Usage,
)
from cortex.protocol.subjects import Subjects
from cortex.telemetry import logs
from cortex.transport.connection import Connection
from cortex.transport.job_replies import JobInbox, Reply
from neuron.engine.outputs import Crashed, Finished, Reasoning, Text, ToolCallPart
from neuron.engine.worker import JobHandle
from neuron.events import EventPublisher
from neuron.metrics import NeuronMetrics
from neuron.models import ModelEntry, ModelTable

log = logging.getLogger(__name__)

# While a job has nothing to send, an `alive` goes to its requester this often: a gateway takes a
# silence of a few of these for a lost node (frozen, killed, cut off) and moves the job, in about a
# second rather than the three heartbeat intervals a node takes to leave the fleet.
ALIVE_EVERY_S = 0.25


@dataclass
class _Running:
    job: InferenceJob
    entry: ModelEntry
    handle: JobHandle
    task: asyncio.Task[None] | None = None


class JobRelay:
    """The `JobHandler` of the node's `JobInbox`: admission, and relaying a job's outputs."""

    def __init__(
        self,
        connection: Connection,
        node: str,
        subjects: Subjects,
        models: ModelTable,
        *,
        max_queue: int,
        metrics: NeuronMetrics,
        events: EventPublisher,
    ) -> None:
        self._metrics = metrics
        self._node = node
        self._subjects = subjects
        self._models = models
        self._max_queue = max_queue
        self._inbox = JobInbox(connection, node, subjects, self)
        self._jobs: dict[str, _Running] = {}
        # Cancels that arrived before their job (they travel on another subscription).
        self._early_cancels: dict[str, float] = {}
        self._events = events
        self._telling: set[asyncio.Task[None]] = set()
        self._draining = False

    async def start(self) -> None:
        await self._inbox.start()

    @property
    def draining(self) -> bool:
        """The node is stopping: no new job is taken, nor a new model's subscription."""
        return self._draining

    async def start_draining(self) -> None:
        """Takes no new jobs from now on: every model's subscription goes, and a job that still
        arrives is refused as `shutting_down`. Those in flight go on (see `drain`)."""
        self._draining = True
        await self._inbox.unsubscribe_all()

    def replies_refused(self, job_id: str, subject: str) -> None:
        """The server refused an event of a job: under deploy/nats's permissions a node may answer
        only requests delivered on its current connection, so after a reconnect (its NATS server
        died) the rest of the answers it had in hand would go nowhere. Stop generating them."""
        running = self._jobs.get(job_id)
        if running is None:
            return
        log.warning(
            "job %s: NATS refuses its events (%s; allowed replies do not outlive a reconnect); cancelling",
            job_id,
            subject,
        )
        running.handle.cancel()
        self._tell_lost(running.job)

    def _tell_lost(self, job: InferenceJob) -> None:
        """Its requester waits on events it will never get; a `job_lost` event any gateway may hear."""
        lost = self._events.publish("job_lost", model=job.model, reason="reply_refused", job_id=job.job_id)
        task = asyncio.create_task(lost)
        self._telling.add(task)
        task.add_done_callback(self._telling.discard)

    def requester_gone(self, job_id: str) -> None:
        running = self._jobs.get(job_id)
        if running is not None:
            log.info("job %s: nobody reads its answer any more (its gateway is gone); cancelling", job_id)
            running.handle.cancel()

    # --- subscriptions, driven by the model table -------------------------------------------

    async def subscribe(self, model_id: str) -> None:
        await self._inbox.subscribe(model_id)

    async def unsubscribe(self, model_id: str) -> None:
        await self._inbox.unsubscribe(model_id)

    # --- jobs -----------------------------------------------------------------------------

    def in_flight(self, model_id: str) -> tuple[int, int]:
        """(running, queued) for a model."""
        handles = [r.handle for r in self._jobs.values() if r.entry.spec.id == model_id]
        running = sum(1 for h in handles if h.running)
        return running, len(handles) - running

    def statuses(self) -> list[JobStatus]:
        return [
            JobStatus(
                job_id=r.job.job_id,
                request_id=r.job.request_id,
                model=r.job.model,
                state="running" if r.handle.running else "queued",
                generated_tokens=r.handle.generated,
            )
            for r in self._jobs.values()
        ]

    def cancel(self, job_id: str) -> bool:
        running = self._jobs.get(job_id)
        if running is None:
            now = time.monotonic()
            self._early_cancels = {j: t for j, t in self._early_cancels.items() if now - t < 60.0}
            self._early_cancels[job_id] = now
            return False
        running.handle.cancel()
        log.info("job %s cancelled (request %s)", job_id, running.job.request_id)
        return True

    async def end_model(self, model_id: str, timeout: float) -> None:
        """Stops taking a model's jobs, lets running ones finish for `timeout`, cancels the rest."""
        await self.unsubscribe(model_id)
        await self._wait([r for r in self._jobs.values() if r.entry.spec.id == model_id], timeout)

    async def drain(self, timeout: float) -> None:
        """Waits for running jobs to finish; cancels what is left after `timeout`."""
        await self._wait(list(self._jobs.values()), timeout)

    async def _wait(self, jobs: list[_Running], timeout: float) -> None:
        tasks = [r.task for r in jobs if r.task is not None]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        if pending:
            log.warning("cancelling %d jobs still running after %.0fs", len(pending), timeout)
            for running in jobs:
                running.handle.cancel()
            await asyncio.wait(pending, timeout=5.0)

    async def take(self, job: InferenceJob, reply: Reply) -> None:
        # Every log line about this job, here and in the task relaying it (which copies this
        # context), carries both ids; reset after, as nats-py runs every callback in one task.
        tokens = logs.request_id.set(job.request_id), logs.job_id.set(job.job_id)
        try:
            await self._take(job, reply)
        finally:
            logs.request_id.reset(tokens[0])
            logs.job_id.reset(tokens[1])

    async def _take(self, job: InferenceJob, reply: Reply) -> None:
        entry = self._models.ready(job.model)
        if self.draining:
            await reply.fail(ErrorCode.shutting_down, f"node {self._node} is shutting down", retryable=True)
        elif entry is None or entry.loaded is None:
            await reply.fail(ErrorCode.model_not_loaded, f"{job.model} is not loaded on {self._node}", retryable=True)
        elif job.job_id in self._jobs:
            await reply.fail(ErrorCode.invalid_request, f"job id {job.job_id} is already running")
        elif self._early_cancels.pop(job.job_id, None) is not None:
            await reply.fail(ErrorCode.cancelled, f"job {job.job_id} was cancelled before it arrived")
        elif sum(self.in_flight(entry.spec.id)) >= (capacity := self._running(entry) + self._max_queue):
            await reply.fail(
                ErrorCode.busy, f"{job.model} on {self._node} has {capacity} jobs in flight", retryable=True
            )
        else:
            self._start(job, entry, reply)

    @staticmethod
    def _running(entry: ModelEntry) -> int:
        """Jobs of the model that run at once; the rest of its jobs here wait in the device's queue."""
        assert entry.loaded is not None
        return entry.worker.runs_at_once(entry.loaded)

    def _start(self, job: InferenceJob, entry: ModelEntry, reply: Reply) -> None:
        assert entry.loaded is not None and entry.worker is not None
        queued = max(0, sum(self.in_flight(entry.spec.id)) - self._running(entry) + 1)
        accepted = Accepted(
            job_id=job.job_id,
            seq=0,
            node=self._node,
            device=entry.worker.device.id,
            queue_position=queued,
            alive_every_s=ALIVE_EVERY_S,
        )
        running = _Running(job, entry, entry.worker.start_job(job, entry.loaded))
        self._jobs[job.job_id] = running
        self._inbox.watch(reply)
        entry.last_used = time.time()
        running.task = asyncio.create_task(self._relay(running, reply, accepted))

    async def _relay(self, running: _Running, reply: Reply, accepted: Accepted) -> None:
        job = running.job
        log.info("job %s accepted: model=%s request=%s", job.job_id, job.model, job.request_id)
        try:
            await reply.send(accepted)
            async for out in running.handle.outputs(quiet_after=ALIVE_EVERY_S):
                if out is None:  # queued, or a long prompt going in: the requester must not take silence for death
                    await reply.send(Alive(job_id=job.job_id, seq=reply.seq))
                elif isinstance(out, Text | Reasoning | ToolCallPart):
                    await reply.send(_piece(job.job_id, reply.seq, out))
                elif isinstance(out, Finished):
                    self._metrics.jobs.labels(running.entry.spec.id, out.finish_reason).inc()
                    await reply.send(_done(job.job_id, reply.seq, out))
                    log.info(
                        "job %s %s: %d (%d cached)+%d tokens, ttft %.0f ms",
                        job.job_id,
                        out.finish_reason,
                        out.prompt_tokens,
                        out.cached_tokens,
                        out.completion_tokens,
                        out.ttft_ms,
                    )
                elif isinstance(out, Crashed):
                    self._metrics.jobs.labels(running.entry.spec.id, out.code.value).inc()
                    await reply.send(Failed(job_id=job.job_id, seq=reply.seq, code=out.code, message=out.message))
                    log.warning("job %s failed: %s", job.job_id, out.message)
            await reply.end()
        except (TransportError, asyncio.CancelledError) as exc:
            # NATS is gone, or the daemon is stopping: nobody will read the rest, so stop generating.
            log.warning("job %s: cannot relay its events (%r); cancelling", job.job_id, exc)
            running.handle.cancel()
            if isinstance(exc, asyncio.CancelledError):
                raise
        except Exception as exc:  # an event that cannot be built must still end the job, not hang it
            log.exception("job %s: relaying its events failed; cancelling", job.job_id)
            running.handle.cancel()
            with contextlib.suppress(TransportError):
                await reply.fail(ErrorCode.internal, f"the node could not relay the answer: {type(exc).__name__}")
        finally:
            self._inbox.unwatch(reply)
            self._jobs.pop(job.job_id, None)
            running.entry.last_used = time.time()


def _piece(job_id: str, seq: int, out: Text | Reasoning | ToolCallPart) -> Delta | ReasoningDelta | ToolCallDelta:
    ids = list(out.ids)
    if isinstance(out, Text):
        return Delta(job_id=job_id, seq=seq, text=out.text, tokens=len(ids), ids=ids, logprobs=out.logprobs)
    if isinstance(out, Reasoning):
        return ReasoningDelta(job_id=job_id, seq=seq, text=out.text, tokens=len(ids), ids=ids)
    return ToolCallDelta(
        job_id=job_id,
        seq=seq,
        index=out.index,
        id=out.id,
        name=out.name,
        arguments=out.arguments,
        tokens=len(ids),
        ids=ids,
    )


def _done(job_id: str, seq: int, out: Finished) -> Done:
    return Done(
        job_id=job_id,
        seq=seq,
        finish_reason=out.finish_reason,
        stop_sequence=out.stop_sequence,
        usage=Usage(
            prompt_tokens=out.prompt_tokens, cached_tokens=out.cached_tokens, completion_tokens=out.completion_tokens
        ),
        timings=Timings(queue_ms=out.queue_ms, prefill_ms=out.prefill_ms, decode_ms=out.decode_ms, ttft_ms=out.ttft_ms),
    )
