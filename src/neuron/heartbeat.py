"""Heartbeats: the node's snapshot, put in KV `cortex_nodes` under its name with a TTL.

Each put carries a per-message TTL of three intervals; the bucket has limit markers, so if
the neuron dies its key expires and every watching gateway sees a delete.

After a NATS outage the node beats as soon as it reconnects (`wake`), so gateways see its key
again at once; a server that came back empty has no bucket, and the beat creates it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable

from cortex.protocol.errors import CortexError, TransportError
from cortex.protocol.messages import Heartbeat
from cortex.protocol.subjects import NODES_BUCKET
from cortex.transport.kv import Bucket, BucketMissing

log = logging.getLogger(__name__)

_WARN_EVERY_S = 10.0  # while heartbeats keep failing: retried 4x a second, logged this often


def ttl_seconds(interval: float) -> int:
    # Nats-TTL is whole seconds, and a TTL under 1s is not allowed.
    return max(1, math.ceil(3 * interval))


class Heartbeater:
    def __init__(
        self,
        kv: Bucket,
        node: str,
        interval: float,
        snapshot: Callable[[], Heartbeat],
        reopen: Callable[[], Awaitable[Bucket]] | None = None,
    ):
        """`reopen` opens the bucket, creating it if it is gone (a NATS server restarted empty)."""
        self._kv = kv
        self._node = node
        self._interval = interval
        self._snapshot = snapshot
        self._reopen = reopen
        self._ttl = ttl_seconds(interval)
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Beat now, not at the next interval: NATS is back and gateways are re-reading the bucket."""
        self._wake.set()

    async def beat(self) -> None:
        async with self._lock:
            payload = self._snapshot().to_bytes()
            try:
                await self._kv.put(self._node, payload, ttl=self._ttl)
            except BucketMissing:
                # No stream took it: the bucket is gone (or JetStream is still starting; then
                # opening fails too, and the next beat, a quarter second on, tries again).
                if self._reopen is None:
                    raise
                self._kv = await self._reopen()
                log.info("heartbeat bucket %s opened again", NODES_BUCKET)
                await self._kv.put(self._node, payload, ttl=self._ttl)

    async def run(self) -> None:
        failing_since: float | None = None
        warned_at = 0.0
        while True:
            try:
                await self.beat()
                pause = self._interval
                if failing_since is not None:
                    log.info("heartbeats reach NATS again after %.1fs", time.monotonic() - failing_since)
                    failing_since = None
            except (TimeoutError, TransportError) as exc:
                now = time.monotonic()
                if failing_since is None or now - warned_at >= _WARN_EVERY_S:
                    log.warning("heartbeat failed: %s", exc)
                    warned_at = now
                failing_since = failing_since or now
                # Soon again: a stream electing a new leader takes seconds, and our key's TTL runs.
                pause = min(self._interval, 0.25)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), pause)
            self._wake.clear()

    async def remove(self) -> None:
        async with self._lock:
            with contextlib.suppress(CortexError, asyncio.TimeoutError):
                await self._kv.delete(self._node)
