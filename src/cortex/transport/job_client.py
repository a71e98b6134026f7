"""The gateway's half of the job protocol: submit a job, read its events in order, cancel it.

Every job's events come back on one wildcard inbox subscription (`<inbox>.<token>`), in `seq`
order from 0, ending at an empty message; `transport.job_replies` is the neuron's half.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from cortex.protocol.errors import ErrorCode, InvalidRequest, NoCapacity, TransportError
from cortex.protocol.messages import (
    JOB_EVENT,
    Accepted,
    Alive,
    CancelReply,
    CancelRequest,
    Done,
    Failed,
    FleetEvent,
    InferenceJob,
    JobEvent,
)
from cortex.protocol.subjects import Subjects
from cortex.transport.connection import Connection
from cortex.transport.errors import map_nats_errors

_STATUS = "Status"
_LIVENESS_CHECK_S = 1.0
# A node that promised an event every `alive_every_s` is silent after this many of them missed
# (at least SILENT_FLOOR_S): 1 s with a neuron's 0.25 s.
SILENT_ALIVES = 4
SILENT_FLOOR_S = 0.5
# A timer that fires this much late means this event loop was stalled: silence seen then is not the node's.
_LOOP_LAG_S = 0.25
_NO_RESPONDERS = "503"


class NodeSilent(TransportError):
    """The job's node promised an event every `alive_every_s` and has sent none for several of
    those: it is frozen, dead, or cut off. The stream stays open (reading on waits again)."""


class JobStream:
    """The events of one submitted job, in order, ending at the empty end marker.

    `next()` raises `NoCapacity` when nobody holds the subject (NATS no-responders),
    `TransportError` when the neuron goes quiet for longer than the timeouts allow, `NodeSilent`
    when it breaks its promise of an event every so often, and returns `Failed` events as they
    come (the caller decides what they mean). `alive` events are read here, never returned.
    """

    def __init__(
        self,
        client: JobClient,
        job: InferenceJob,
        token: str,
        queue: asyncio.Queue[Msg | FleetEvent],
        target: str | None,
        accept_timeout: float,
        idle_timeout: float,
        node_alive: Callable[[str], bool],
    ) -> None:
        self.job = job
        self.node: str | None = None
        self.target = target  # the node it was addressed to, if any
        self.finished = False
        self._client = client
        self.token = token
        self._queue = queue
        self._accept_timeout = accept_timeout
        self._idle_timeout = idle_timeout
        self._node_alive = node_alive
        self._silent_after: float | None = None  # set by `accepted`, from the node's promise
        self._heard_at = 0.0  # the loop's time of the last message read, or of the last NodeSilent
        self._next_seq = 0

    def close(self) -> None:
        """Stops listening to the job (its later events are dropped). Safe to call twice."""
        self._client._forget(self)

    async def next(self) -> JobEvent | None:
        """The next event; None once the end marker came."""
        while not self.finished or self.pending:
            msg = await self._next_message()
            if isinstance(msg, FleetEvent):
                raise TransportError(
                    f"node {msg.node} can no longer send job {self.job.job_id} its events "
                    f"({msg.reason}: its NATS connection was replaced mid-job)",
                    code=ErrorCode.node_lost,
                )
            if msg.headers and msg.headers.get(_STATUS) == _NO_RESPONDERS:
                raise NoCapacity(f"no neuron is subscribed for model {self.job.model}")
            if not msg.data:
                self.finished = True
                return None
            event = JOB_EVENT.validate_json(msg.data)
            if event.seq != self._next_seq:
                # Core NATS does not keep what a node published while a server was down.
                raise TransportError(
                    f"job {self.job.job_id}: event {event.seq} arrived, expected {self._next_seq} "
                    "(events were lost on the way: a NATS reconnect?)",
                    code=ErrorCode.node_lost,
                )
            self._next_seq += 1
            if isinstance(event, Alive):
                continue
            if isinstance(event, Accepted):
                self.node = event.node
                if event.alive_every_s:
                    self._silent_after = max(SILENT_ALIVES * event.alive_every_s, SILENT_FLOOR_S)
            if isinstance(event, Done | Failed):
                self.finished = True
            return event
        return None

    async def _next_message(self) -> Msg | FleetEvent:
        """Waits for the next message, giving up early when the job's node leaves the fleet or,
        once it promised to speak every so often, falls silent."""
        loop = asyncio.get_running_loop()
        if self.pending:  # the common case mid-stream: no timer needed
            self._heard_at = loop.time()
            return self._queue.get_nowait()
        timeout = self._accept_timeout if self.node is None else self._idle_timeout
        deadline = loop.time() + timeout
        while True:
            now = loop.time()
            wait = min(deadline - now, _LIVENESS_CHECK_S)
            if self._silent_after is not None:
                wait = min(wait, self._heard_at + self._silent_after - now)
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a cancellation that
                # lands in the instant the event arrives, and the request then outlives its client.
                async with asyncio.timeout(max(wait, 0.0)):
                    msg = await self._queue.get()
                self._heard_at = loop.time()
                return msg
            except TimeoutError:
                woke = loop.time()
                if woke - now > max(wait, 0.0) + _LOOP_LAG_S or not self._client.connected:
                    # This loop was stalled, or NATS is down for us: the silence is ours, not the
                    # node's. (What it sent meanwhile may be lost: a gap in `seq` will say so.)
                    self._heard_at = max(self._heard_at, woke - _LOOP_LAG_S)
                    continue
                node = self.node or self.target
                if node is not None and not self._node_alive(node):
                    raise TransportError(
                        f"node {node} left the fleet while running job {self.job.job_id}", code=ErrorCode.node_lost
                    ) from None
                if self._silent_after is not None and woke - self._heard_at >= self._silent_after:
                    self._heard_at = woke  # the next read waits a whole silence again
                    raise NodeSilent(
                        f"node {self.node} sent nothing for job {self.job.job_id} in {self._silent_after:g}s "
                        "although it promised to",
                        code=ErrorCode.node_lost,
                    ) from None
                if woke >= deadline:
                    where = f"node {self.node}" if self.node else "any neuron"
                    raise TransportError(
                        f"no answer from {where} for job {self.job.job_id} within {timeout:g}s",
                        code=ErrorCode.timeout if self.node is None else ErrorCode.node_lost,
                    ) from None

    def lost(self, event: FleetEvent) -> None:
        """Its node says it can no longer send this job's events: the next read fails."""
        self._queue.put_nowait(event)

    @property
    def pending(self) -> bool:
        """More of this job's messages have arrived and wait to be read."""
        return not self._queue.empty()

    async def cancel(self, *, wait: bool = True) -> bool:
        """Ask the node to stop this job. Returns whether the node still had it (`wait=False`: sends
        the cancel without waiting for the node's answer, and returns False)."""
        if self.finished:
            return False
        return await self._client.cancel(self.node or self.target, self.job.job_id, wait=wait)


class JobClient:
    """Submits jobs and demultiplexes their events from one wildcard inbox subscription.

    One subscription for all jobs means no SUB/UNSUB round trip per request. A second one hears
    `job_lost` fleet events: a node that may no longer answer a job (NATS permissions tie replies
    to the connection a job came on) says so there, and the job fails now, not at idle_timeout.
    """

    def __init__(self, connection: Connection, subjects: Subjects) -> None:
        self._nc = connection.client
        self._subjects = subjects
        self._prefix = self._nc.new_inbox()
        self._queues: dict[str, asyncio.Queue[Msg | FleetEvent]] = {}
        self._streams: dict[str, JobStream] = {}  # job id -> its latest stream, for job_lost events
        self._subs: list[Subscription] = []  # the inbox and job_lost: from `open` until `aclose`
        self._counter = 0

    @classmethod
    async def open(cls, connection: Connection, subjects: Subjects) -> JobClient:
        """A client already listening on its inbox and for `job_lost`."""
        client = cls(connection, subjects)
        client._subs = [
            await client._nc.subscribe(f"{client._prefix}.*", cb=client._on_msg),
            await client._nc.subscribe(subjects.job_lost("*"), cb=client._on_lost),
        ]
        return client

    async def aclose(self) -> None:
        """Stops listening. Safe to call twice."""
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def _on_msg(self, msg: Msg) -> None:
        token = msg.subject[len(self._prefix) + 1 :]
        queue = self._queues.get(token)
        if queue is not None:
            queue.put_nowait(msg)

    async def _on_lost(self, msg: Msg) -> None:
        try:
            event = FleetEvent.model_validate_json(msg.data)
        except ValueError:
            return
        stream = self._streams.get(event.job_id or "")
        # Only the node running the job may say it lost it: the subject's last token is the
        # sender's node (NATS lets each node publish only its own), and the same job id may
        # have been tried on another node first.
        node = msg.subject.rsplit(".", 1)[-1]
        if stream is not None and not stream.finished and node == event.node == (stream.node or stream.target):
            stream.lost(event)

    def _forget(self, stream: JobStream) -> None:
        self._queues.pop(stream.token, None)
        if self._streams.get(stream.job.job_id) is stream:
            del self._streams[stream.job.job_id]

    async def submit(
        self,
        job: InferenceJob,
        node: str | None = None,
        *,
        accept_timeout: float = 5.0,
        idle_timeout: float = 300.0,
        node_alive: Callable[[str], bool] = lambda _: True,
    ) -> JobStream:
        subject = self._subjects.infer_node(job.model, node) if node else self._subjects.infer(job.model)
        payload = job.to_bytes()
        if len(payload) > self._nc.max_payload:
            raise InvalidRequest(
                f"the request is {len(payload)} bytes as a job; NATS max_payload is {self._nc.max_payload} bytes. "
                "Shorten the conversation, or raise max_payload in nats.conf",
                code=ErrorCode.payload_too_large,
            )
        self._counter += 1
        token = str(self._counter)
        queue: asyncio.Queue[Msg | FleetEvent] = asyncio.Queue()
        self._queues[token] = queue
        try:
            with map_nats_errors(f"publishing job {job.job_id}"):
                await self._nc.publish(subject, payload, reply=f"{self._prefix}.{token}")
        except BaseException:
            self._queues.pop(token, None)
            raise
        stream = JobStream(self, job, token, queue, node, accept_timeout, idle_timeout, node_alive)
        self._streams[job.job_id] = stream
        return stream

    @property
    def connected(self) -> bool:
        return self._nc.is_connected

    async def cancel(self, node: str | None, job_id: str, *, wait: bool = True) -> bool:
        """Stops a job on its node; with no node known, asks every neuron. True if a node had it.
        `wait=False`: sends the cancel and returns False at once (the node may be frozen or gone;
        its answer goes to an inbox token no job has)."""
        body = CancelRequest(job_id=job_id).to_bytes()
        with map_nats_errors(f"cancelling job {job_id} on {node or 'any node'}"):
            if node is None:
                await self._nc.publish(self._subjects.cancel_any(), body)
                return False
            subject = self._subjects.control(node, "cancel")
            if not wait:
                await self._nc.publish(subject, body, reply=f"{self._prefix}.cancel")
                return False
            reply = await self._nc.request(subject, body, timeout=2.0)
        return CancelReply.model_validate_json(reply.data).found
