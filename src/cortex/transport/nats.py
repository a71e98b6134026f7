"""Connection lifetime, the job stream over a shared reply inbox, and NATS error mapping."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy, KeyValueConfig
from nats.js.kv import KeyValue

from cortex.protocol.errors import (
    CortexError,
    ErrorCode,
    InvalidRequest,
    NoCapacity,
    TransportError,
)
from cortex.protocol.messages import (
    JOB_EVENT,
    Accepted,
    CancelReply,
    CancelRequest,
    Done,
    Failed,
    FleetEvent,
    InferenceJob,
)
from cortex.protocol.subjects import NODES_BUCKET, PINS_BUCKET, PLACEMENT_BUCKET, Subjects

log = logging.getLogger(__name__)

_STATUS = "Status"
_LIVENESS_CHECK_S = 1.0
_NO_RESPONDERS = "503"
WATCH_HEARTBEAT_S = 1.0
WATCH_INACTIVE_S = 10.0
_WATCH_RETRY_FIRST_S = 0.2

# Who wants to hear that a connection made by `connect()` is back: the one place that knows
# about reconnects. Weak keys: a closed and dropped client takes its listeners with it.
_reconnect_listeners: weakref.WeakKeyDictionary[Client, list[Callable[[], None]]] = weakref.WeakKeyDictionary()
# Who wants to hear of a publish the server refused: nats-py tells only the error callback, as text.
_refusal_listeners: weakref.WeakKeyDictionary[Client, list[Callable[[str], None]]] = weakref.WeakKeyDictionary()
_REFUSED_PUBLISH = re.compile(r'permissions violation for publish to "([^"]+)"', re.IGNORECASE)


class Reconnected(TransportError):
    """A KV watch's connection came back: its consumer may be gone (the server restarted, maybe
    empty), so the watch ends and `keep_watching` starts it again at once, replaying every key."""


def on_reconnect(nc: Client, callback: Callable[[], None]) -> Callable[[], None]:
    """Calls `callback` (plain, quick: start a task for real work) each time `nc` reconnects.

    Only connections made by `connect()` report. Returns a function that stops the calls.
    """
    return _listen(_reconnect_listeners, nc, callback)


def on_refused_publish(nc: Client, callback: Callable[[str], None]) -> Callable[[], None]:
    """Calls `callback(subject)` (plain, quick) each time the server refuses a publish of `nc`'s
    (a permissions violation); nats-py reports the subject lowercased.

    Only connections made by `connect()` report. Returns a function that stops the calls.
    """
    return _listen(_refusal_listeners, nc, callback)


def _listen(registry: weakref.WeakKeyDictionary[Client, list[Any]], nc: Client, callback: Any) -> Callable[[], None]:
    listeners = registry.setdefault(nc, [])
    listeners.append(callback)

    def stop() -> None:
        with contextlib.suppress(ValueError):
            listeners.remove(callback)

    return stop


@contextlib.contextmanager
def map_nats_errors(what: str) -> Iterator[None]:
    """Turn nats-py's exceptions into cortex's, naming what we were doing."""
    try:
        yield
    except CortexError:
        raise
    except nats.errors.NoRespondersError as exc:
        raise NoCapacity(f"{what}: nobody is listening") from exc
    except (TimeoutError, nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError) as exc:
        raise TransportError(f"{what}: NATS did not answer in time", code=ErrorCode.timeout) from exc
    except nats.errors.OutboundBufferLimitError as exc:
        # A fail-fast connection (see `connect`) refusing to buffer while it reconnects.
        raise TransportError(f"{what}: NATS is unreachable (reconnecting); retry shortly") from exc
    except (nats.errors.ConnectionClosedError, nats.errors.NoServersError, OSError) as exc:
        raise TransportError(f"{what}: NATS is unreachable ({exc})") from exc
    except nats.errors.Error as exc:
        raise TransportError(f"{what}: {exc}") from exc


async def connect(
    servers: list[str], name: str, *, first_timeout: float = 10.0, fail_fast: bool = False, **options: Any
) -> Client:
    """Connects, retrying for `first_timeout` seconds; once connected, reconnects forever.

    `fail_fast`: while reconnecting, a publish (and so a request) raises at once instead of
    waiting in nats-py's buffer for the server to come back: for a gateway, whose callers are
    HTTP clients better served by a quick 503 than by a request that hangs for its timeout.
    Without it (a neuron), a short outage loses nothing: a job's events wait and then go.
    """
    if fail_fast:
        options["pending_size"] = 0  # nats-py: no reconnect buffer, OutboundBufferLimitError instead
    client: list[Client] = []

    async def _error_cb(exc: Exception) -> None:
        if client:  # before the first connection, the timeout error below says it once
            log.warning("nats: %s", exc)
        refused = _REFUSED_PUBLISH.search(str(exc))
        if refused and client:
            for callback in list(_refusal_listeners.get(client[0], ())):
                try:
                    callback(refused.group(1))
                except Exception:
                    log.exception("a refused-publish listener failed")

    async def _disconnected_cb() -> None:
        if not (client and client[0].is_closed):  # a close we asked for is not news
            log.warning("nats: disconnected")

    async def _reconnected_cb() -> None:
        log.info("nats: reconnected")
        # Without this, watches would wait for their consumer's missed heartbeats (seconds) or,
        # on a server that came back empty, stay silent for good; and a node's key for its next beat.
        for callback in list(_reconnect_listeners.get(client[0], ())) if client else ():
            try:
                callback()
            except Exception:
                log.exception("a reconnect listener failed")

    try:
        nc = await asyncio.wait_for(
            nats.connect(
                servers=servers,
                name=name,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                connect_timeout=5,
                error_cb=_error_cb,
                disconnected_cb=_disconnected_cb,
                reconnected_cb=_reconnected_cb,
                **options,
            ),
            first_timeout,
        )
    except TimeoutError:
        raise TransportError(
            f"cannot reach NATS at {', '.join(servers)} within {first_timeout:g}s: is nats-server running "
            "there? (`cortex up` starts one for development)"
        ) from None
    except nats.errors.Error as exc:
        raise TransportError(f"connecting to NATS at {', '.join(servers)} failed: {exc}") from exc
    client.append(nc)
    return nc


async def open_bucket(nc: Client, bucket: str, description: str, *, replicas: int = 1, ttl: bool = False) -> KeyValue:
    """A KV bucket, created on first use. `ttl` allows per-key TTLs and turns on limit markers,
    so an expired key reaches watchers as a delete."""
    js = nc.jetstream()
    with map_nats_errors(f"opening KV bucket {bucket}"):
        try:
            return await js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            pass
        config = KeyValueConfig(
            bucket=bucket,
            description=description,
            history=1,
            replicas=replicas,
            limit_marker_ttl=1.0 if ttl else None,
        )
        try:
            return await js.create_key_value(config)
        except nats.js.errors.BadRequestError:
            # Another process created it between our look-up and our create.
            return await js.key_value(bucket)


async def nodes_bucket(nc: Client, *, replicas: int = 1) -> KeyValue:
    """Heartbeats, one key per node; a dead node's key expires and every gateway sees it go."""
    return await open_bucket(
        nc, NODES_BUCKET, "cortex neuron heartbeats, one key per node", replicas=replicas, ttl=True
    )


async def placement_bucket(nc: Client, *, replicas: int = 1) -> KeyValue:
    """Placement leases, one key per model being loaded; a lease expires if its gateway dies."""
    return await open_bucket(nc, PLACEMENT_BUCKET, "cortex placement leases", replicas=replicas, ttl=True)


async def pins_bucket(nc: Client, *, replicas: int = 1) -> KeyValue:
    """Runtime pins, key `<node>.<model_key>`, value the ModelSpec; the node keeps them loaded."""
    return await open_bucket(nc, PINS_BUCKET, "cortex runtime pins: <node>.<model_key>", replicas=replicas)


class JobStream:
    """The events of one submitted job, in order, ending at the empty end marker.

    Iterating raises `NoCapacity` when nobody holds the subject (NATS no-responders),
    `TransportError` when the neuron goes quiet for longer than the timeouts allow, and
    yields `Failed` events as they come (the caller decides what they mean).
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
        self._next_seq = 0

    def __aiter__(self) -> AsyncIterator[Accepted | Any]:
        return self._events()

    async def _events(self) -> AsyncIterator[Any]:
        try:
            while True:
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
                    return
                event = JOB_EVENT.validate_json(msg.data)
                if event.seq != self._next_seq:
                    raise TransportError(
                        f"job {self.job.job_id}: event {event.seq} arrived, expected {self._next_seq}",
                        code=ErrorCode.internal,
                    )
                self._next_seq += 1
                if isinstance(event, Accepted):
                    self.node = event.node
                if isinstance(event, Done | Failed):
                    self.finished = True
                yield event
        finally:
            self._client._forget(self)

    async def _next_message(self) -> Msg | FleetEvent:
        """Waits for the next message, giving up early when the job's node leaves the fleet."""
        if self.pending:  # the common case mid-stream: no timer needed
            return self._queue.get_nowait()
        timeout = self._accept_timeout if self.node is None else self._idle_timeout
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a cancellation that
                # lands in the instant the event arrives, and the request then outlives its client.
                async with asyncio.timeout(min(left, _LIVENESS_CHECK_S)):
                    return await self._queue.get()
            except TimeoutError:
                node = self.node or self.target
                if node is not None and not self._node_alive(node):
                    raise TransportError(
                        f"node {node} left the fleet while running job {self.job.job_id}", code=ErrorCode.node_lost
                    ) from None
                if left <= _LIVENESS_CHECK_S:
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

    async def cancel(self) -> bool:
        """Ask the node to stop this job. Returns whether the node still had it."""
        if self.finished:
            return False
        return await self._client.cancel(self.node or self.target, self.job.job_id)


class JobClient:
    """Submits jobs and demultiplexes their events from one wildcard inbox subscription.

    One subscription for all jobs means no SUB/UNSUB round trip per request. A second one hears
    `job_lost` fleet events: a node that may no longer answer a job (NATS permissions tie replies
    to the connection a job came on) says so there, and the job fails now, not at idle_timeout.
    """

    def __init__(self, nc: Client, subjects: Subjects) -> None:
        self._nc = nc
        self._subjects = subjects
        self._prefix = nc.new_inbox()
        self._queues: dict[str, asyncio.Queue[Msg | FleetEvent]] = {}
        self._streams: dict[str, JobStream] = {}  # job id -> its latest stream, for job_lost events
        self._sub: Any = None
        self._lost_sub: Any = None
        self._counter = 0

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(f"{self._prefix}.*", cb=self._on_msg)
        self._lost_sub = await self._nc.subscribe(self._subjects.job_lost("*"), cb=self._on_lost)

    async def aclose(self) -> None:
        for sub in (self._sub, self._lost_sub):
            if sub is not None:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()
        self._sub = self._lost_sub = None

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

    async def cancel(self, node: str | None, job_id: str) -> bool:
        """Stops a job on its node; with no node known, asks every neuron. True if a node had it."""
        body = CancelRequest(job_id=job_id).to_bytes()
        with map_nats_errors(f"cancelling job {job_id} on {node or 'any node'}"):
            if node is None:
                await self._nc.publish(self._subjects.cancel_any(), body)
                return False
            reply = await self._nc.request(self._subjects.control(node, "cancel"), body, timeout=2.0)
        return CancelReply.model_validate_json(reply.data).found


async def keep_watching(follow: Callable[[], Awaitable[None]], what: str, retry_s: float = 1.0) -> None:
    """Runs `follow` (a KV watch) for good: a broken watch is started again, and replays every key first.

    A watch ended by a reconnect starts again at once; one that fails is retried after 0.2 s,
    doubling up to `retry_s`: a server that has just come back may need a moment for JetStream.
    """
    pause = _WATCH_RETRY_FIRST_S
    while True:
        try:
            await follow()
        except asyncio.CancelledError:
            raise
        except Reconnected:
            log.info("NATS is back: watching %s again", what)
            pause = _WATCH_RETRY_FIRST_S
            continue
        except Exception as exc:
            log.warning("watching %s failed (%s); watching again in %gs", what, exc, pause)
        await asyncio.sleep(pause)
        pause = min(2 * pause, retry_s)


async def keep_trying(
    attempt: Callable[[], Awaitable[object]], what: str, *, every_s: float = 0.25, for_s: float = 10.0
) -> None:
    """Runs `attempt` until it succeeds, for at most `for_s` seconds: for work a reconnect starts
    (opening a bucket again) while the server that just came back may still be starting JetStream."""
    deadline = asyncio.get_running_loop().time() + for_s
    while True:
        try:
            await attempt()
            return
        except Exception as exc:  # a reconnect hook's task must end quietly, not with an unread error
            if asyncio.get_running_loop().time() >= deadline:
                log.warning("%s: still failing after %gs, giving up (%s)", what, for_s, exc)
                return
        await asyncio.sleep(every_s)


def reopen_on_reconnect(nc: Client, reopen: Callable[[], Awaitable[object]], what: str) -> Callable[[], None]:
    """After each reconnect of `nc`, runs `reopen` (open a bucket, creating it when the server came
    back empty) until it succeeds, as `keep_trying` does. Returns a function that stops listening
    and cancels an attempt still running."""
    attempts: set[asyncio.Task[None]] = set()

    def start() -> None:
        task = asyncio.create_task(keep_trying(reopen, what))
        attempts.add(task)
        task.add_done_callback(attempts.discard)

    stop_listening = on_reconnect(nc, start)

    def stop() -> None:
        stop_listening()
        for task in list(attempts):
            task.cancel()

    return stop


async def watch_bucket(
    kv: KeyValue, keys: str = ">", *, heartbeat_s: float = WATCH_HEARTBEAT_S
) -> AsyncIterator[tuple[str, bytes | None] | None]:
    """Every key's current value, then `None` (initial snapshot done), then each change.

    A deleted, purged or expired key yields `(key, None)`.

    This is nats-py's `KeyValue.watch` (an ordered push consumer, last value per key) with a
    short idle heartbeat. The consumer lives on one server; when that server dies, nats-py
    re-creates it from the last sequence seen once two heartbeats are missed. Its default
    5 s heartbeat meant 10-20 s of silence, long enough for a gateway to think every node
    had left; at 1 s the watch resumes in 2-4 s, inside a node's liveness allowance.

    When the connection (made by `connect()`) reconnects, the watch raises `Reconnected`:
    the server may have restarted, and its consumer with it; `keep_watching` starts again.
    """
    # The KeyValue's own subject prefix, stream and JetStream context: a bucket's, not ours to guess.
    js, prefix, stream = kv._js, kv._pre, kv._stream
    # None in the queue: the connection came back (queued behind whatever arrived before).
    updates: asyncio.Queue[Msg | None] = asyncio.Queue()

    async def on_msg(msg: Msg) -> None:
        updates.put_nowait(msg)

    # Listening before subscribing: a reconnect while the subscribe is in flight is not missed.
    stop_listening = on_reconnect(js._nc, lambda: updates.put_nowait(None))
    try:
        with map_nats_errors(f"watching KV bucket {kv._name}"):
            sub = await js.subscribe(
                f"{prefix}{keys}",
                stream=stream,
                cb=on_msg,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                idle_heartbeat=heartbeat_s,
                # A watch that is stopped, or replaced after a failover, leaves its consumer behind
                # (unsubscribing does not delete it); the server drops it once nobody listens.
                inactive_threshold=WATCH_INACTIVE_S,
            )
    except BaseException:
        stop_listening()
        raise
    try:
        with map_nats_errors(f"watching KV bucket {kv._name}"):
            info = await sub.consumer_info()
        # Only data reaches `updates` (nats-py's own delivered count includes idle heartbeats).
        snapshot_done = info.num_pending == 0 and updates.empty()
        if snapshot_done:
            yield None
        while True:
            msg = await updates.get()
            if msg is None:
                raise Reconnected(f"watching KV bucket {kv._name}: NATS reconnected")
            key = msg.subject[len(prefix) :]
            yield key, (None if _kv_removal(msg) else msg.data)
            if not snapshot_done and msg.metadata.num_pending == 0:
                snapshot_done = True
                yield None
    finally:
        stop_listening()
        with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
            await sub.unsubscribe()


def _kv_removal(msg: Msg) -> bool:
    """A delete or purge by a client (KV-Operation), or a key the server expired (nats-server >= 2.11)."""
    headers = msg.headers or {}
    return headers.get("KV-Operation") in ("DEL", "PURGE") or headers.get("Nats-Marker-Reason") in (
        "MaxAge",
        "Purge",
        "Remove",
    )
