"""KV buckets: opening (created on first use) and reading or writing keys, errors mapped.

A `Bucket` is the only handle on a bucket outside this package; `watch.watch_bucket` follows one.
After a reconnect, `reopen_on_reconnect` opens a bucket again (a server may have come back empty).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import nats.js.errors
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from cortex.protocol.errors import TransportError
from cortex.protocol.subjects import NODES_BUCKET, PINS_BUCKET, PLACEMENT_BUCKET, RESPONSES_BUCKET
from cortex.transport._natspy import KvInternals, kv_internals
from cortex.transport.connection import Connection
from cortex.transport.errors import map_nats_errors

log = logging.getLogger(__name__)


class BucketMissing(TransportError):
    """No stream took a write: the bucket is gone (a server came back empty), or JetStream is still
    starting. Opening the bucket again creates it."""


class Bucket:
    """One KV bucket on one connection. Every method raises cortex errors, never nats-py's."""

    def __init__(self, connection: Connection, kv: KeyValue) -> None:
        self.connection = connection
        self._kv = kv
        self.internals: KvInternals = kv_internals(kv)  # for watch.py
        self.name = self.internals.name

    async def get(self, key: str, *, what: str | None = None) -> bytes | None:
        """The key's value; None when it does not exist or was deleted."""
        with map_nats_errors(what or f"reading {key} in KV bucket {self.name}"):
            try:
                entry = await self._kv.get(key)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                return None
        return entry.value or b""

    async def create(self, key: str, value: bytes, *, ttl: float | None = None, what: str | None = None) -> bool:
        """Writes the key only if it does not exist (or was deleted): False when it does.
        `ttl`: seconds until the server removes it (the bucket must allow per-key TTLs)."""
        with map_nats_errors(what or f"creating {key} in KV bucket {self.name}"):
            try:
                await self._kv.create(key, value, msg_ttl=ttl)
            except nats.js.errors.KeyWrongLastSequenceError:
                return False
        return True

    async def put(self, key: str, value: bytes, *, ttl: int | None = None, what: str | None = None) -> None:
        """Writes the key. `ttl`: whole seconds until the server removes it (the bucket must allow
        per-key TTLs; nats-py's `KeyValue.put` takes none, hence the publish to the key's subject).
        Raises `BucketMissing` when no stream took it."""
        what = what or f"writing {key} in KV bucket {self.name}"
        with map_nats_errors(what):
            try:
                if ttl is None:
                    await self._kv.put(key, value)
                else:
                    await self.internals.js.publish(f"{self.internals.prefix}{key}", value, msg_ttl=ttl)
            except nats.js.errors.NoStreamResponseError as exc:
                raise BucketMissing(f"{what}: {exc}") from exc

    async def delete(self, key: str, *, what: str | None = None) -> None:
        with map_nats_errors(what or f"deleting {key} in KV bucket {self.name}"):
            await self._kv.delete(key)


async def open_bucket(
    connection: Connection,
    bucket: str,
    description: str,
    *,
    replicas: int = 1,
    ttl: bool = False,
    max_age: float | None = None,
) -> Bucket:
    """A KV bucket, created on first use. `ttl` allows per-key TTLs and turns on limit markers,
    so an expired key reaches watchers as a delete. `max_age`: seconds each key lives (set when the
    bucket is created; an existing bucket keeps its own)."""
    js = connection.client.jetstream()
    with map_nats_errors(f"opening KV bucket {bucket}"):
        try:
            return Bucket(connection, await js.key_value(bucket))
        except nats.js.errors.BucketNotFoundError:
            pass
        config = KeyValueConfig(
            bucket=bucket,
            description=description,
            history=1,
            replicas=replicas,
            limit_marker_ttl=1.0 if ttl else None,
            ttl=max_age,
        )
        try:
            return Bucket(connection, await js.create_key_value(config))
        except nats.js.errors.BadRequestError:
            # Another process created it between our look-up and our create.
            return Bucket(connection, await js.key_value(bucket))


async def existing_bucket(connection: Connection, bucket: str) -> Bucket | None:
    """The bucket, or None when it does not exist: for readers that may not (or should not) create it."""
    with map_nats_errors(f"opening KV bucket {bucket}"):
        try:
            return Bucket(connection, await connection.client.jetstream().key_value(bucket))
        except nats.js.errors.BucketNotFoundError:
            return None


async def nodes_bucket(connection: Connection, *, replicas: int = 1) -> Bucket:
    """Heartbeats, one key per node; a dead node's key expires and every gateway sees it go."""
    return await open_bucket(
        connection, NODES_BUCKET, "cortex neuron heartbeats, one key per node", replicas=replicas, ttl=True
    )


async def placement_bucket(connection: Connection, *, replicas: int = 1) -> Bucket:
    """Placement leases, one key per model being loaded; a lease expires if its gateway dies."""
    return await open_bucket(connection, PLACEMENT_BUCKET, "cortex placement leases", replicas=replicas, ttl=True)


async def responses_bucket(connection: Connection, *, max_age: float, replicas: int = 1) -> Bucket:
    """Stored Responses API responses, one key per response id, each removed `max_age` seconds after
    it was written."""
    return await open_bucket(
        connection,
        RESPONSES_BUCKET,
        "cortex stored responses (/v1/responses), one key per response id",
        replicas=replicas,
        max_age=max_age,
    )


async def pins_bucket(connection: Connection, *, replicas: int = 1) -> Bucket:
    """Runtime pins, key `<node>.<model_key>`, value the ModelSpec; the node keeps them loaded."""
    return await open_bucket(connection, PINS_BUCKET, "cortex runtime pins: <node>.<model_key>", replicas=replicas)


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


def reopen_on_reconnect(
    connection: Connection, reopen: Callable[[], Awaitable[object]], what: str
) -> Callable[[], None]:
    """After each reconnect, runs `reopen` (open a bucket, creating it when the server came back
    empty) until it succeeds, as `keep_trying` does. Returns a function that stops listening and
    cancels an attempt still running."""
    attempts: set[asyncio.Task[None]] = set()

    def start() -> None:
        task = asyncio.create_task(keep_trying(reopen, what))
        attempts.add(task)
        task.add_done_callback(attempts.discard)

    stop_listening = connection.on_reconnect(start)

    def stop() -> None:
        stop_listening()
        for task in list(attempts):
            task.cancel()

    return stop
