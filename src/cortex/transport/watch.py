"""Following a KV bucket: every key, then each change; started again when it breaks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable

import nats.errors
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from cortex.protocol.errors import ErrorCode, TransportError
from cortex.transport.errors import map_nats_errors
from cortex.transport.kv import Bucket

log = logging.getLogger(__name__)

WATCH_HEARTBEAT_S = 1.0
WATCH_INACTIVE_S = 10.0
_WATCH_RETRY_FIRST_S = 0.2
_SNAPSHOT_TIMEOUT_S = 5.0


class Reconnected(TransportError):
    """A KV watch's connection came back: its consumer may be gone (the server restarted, maybe
    empty), so the watch ends and `keep_watching` starts it again at once, replaying every key."""


async def watch_bucket(
    bucket: Bucket, keys: str = ">", *, heartbeat_s: float = WATCH_HEARTBEAT_S
) -> AsyncGenerator[tuple[str, bytes | None] | None, None]:
    """Every key's current value, then `None` (initial snapshot done), then each change.

    A deleted, purged or expired key yields `(key, None)`.

    This is nats-py's `KeyValue.watch` (an ordered push consumer, last value per key) with a
    short idle heartbeat. The consumer lives on one server; when that server dies, nats-py
    re-creates it from the last sequence seen once two heartbeats are missed. Its default
    5 s heartbeat meant 10-20 s of silence, long enough for a gateway to think every node
    had left; at 1 s the watch resumes in 2-4 s, inside a node's liveness allowance.

    When the bucket's connection reconnects, the watch raises `Reconnected`: the server may
    have restarted, and its consumer with it; `keep_watching` starts again.
    """
    js, prefix, stream = bucket.internals.js, bucket.internals.prefix, bucket.internals.stream
    # None in the queue: the connection came back (queued behind whatever arrived before).
    updates: asyncio.Queue[Msg | None] = asyncio.Queue()

    async def on_msg(msg: Msg) -> None:
        updates.put_nowait(msg)

    # Listening before subscribing: a reconnect while the subscribe is in flight is not missed.
    stop_listening = bucket.connection.on_reconnect(lambda: updates.put_nowait(None))
    try:
        with map_nats_errors(f"watching KV bucket {bucket.name}"):
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
        with map_nats_errors(f"watching KV bucket {bucket.name}"):
            info = await sub.consumer_info()
        # Nothing pending and nothing delivered: the bucket is empty. Anything the server delivered
        # before it answered may not have reached `updates` yet (nats-py hands messages to our
        # callback from a task of its own), so then the end of the snapshot is the message that
        # says nothing is pending after it.
        delivered = info.delivered.consumer_seq if info.delivered is not None else 0
        snapshot_done = info.num_pending == 0 and delivered == 0
        if snapshot_done:
            yield None
        while True:
            msg = await updates.get()
            if msg is None:
                raise Reconnected(f"watching KV bucket {bucket.name}: NATS reconnected")
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


async def snapshot(bucket: Bucket, keys: str = ">") -> dict[str, bytes]:
    """Every key's current value (of those matching `keys`), read once (a watch stopped after its
    initial replay)."""
    values: dict[str, bytes] = {}
    try:
        async with asyncio.timeout(_SNAPSHOT_TIMEOUT_S):
            async with contextlib.aclosing(watch_bucket(bucket, keys)) as updates:
                async for update in updates:
                    if update is None:
                        break
                    key, value = update
                    if value is None:
                        values.pop(key, None)
                    else:
                        values[key] = value
    except TimeoutError:
        raise TransportError(
            f"reading KV bucket {bucket.name}: NATS did not answer within {_SNAPSHOT_TIMEOUT_S:g}s",
            code=ErrorCode.timeout,
        ) from None
    return values


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
