"""Heartbeats: the node's snapshot, put in KV `cortex_nodes` under its name with a TTL.

Each put carries a per-message TTL of three intervals; the bucket has limit markers, so if
the neuron dies its key expires and every watching gateway sees a delete.

The node's memory estimates (one per catalogue model: most of what a heartbeat would weigh)
go under `<node>.estimates`, put after a heartbeat when they changed, and again every
`ESTIMATES_REFRESH_S` under a TTL of `ESTIMATES_TTL_S`, so that a dead node's record goes too.

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
from cortex.protocol.messages import Heartbeat, NodeEstimates
from cortex.protocol.subjects import NODES_BUCKET, estimates_key
from cortex.transport.kv import Bucket, BucketMissing

log = logging.getLogger(__name__)

_WARN_EVERY_S = 10.0  # while heartbeats keep failing: retried 4x a second, logged this often
ESTIMATES_TTL_S = 3600
ESTIMATES_REFRESH_S = 600.0
_ESTIMATES_RETRY_S = 30.0


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
        estimates: Callable[[], NodeEstimates],
        reopen: Callable[[], Awaitable[Bucket]] | None = None,
    ):
        """`reopen` opens the bucket, creating it if it is gone (a NATS server restarted empty)."""
        self._kv = kv
        self._node = node
        self._interval = interval
        self._snapshot = snapshot
        self._estimates = estimates
        self._estimates_put: tuple[bytes, float] | None = None  # what was last put, and when (monotonic)
        self._estimates_task: asyncio.Task[None] | None = None
        self._estimates_retry_at = 0.0
        self._reopen = reopen
        self._ttl = ttl_seconds(interval)
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Beat now, not at the next interval: NATS is back and gateways are re-reading the bucket
        (which may have come back empty: the estimates are put again too)."""
        self._estimates_lost()
        self._wake.set()

    def _estimates_lost(self) -> None:
        """The bucket may no longer hold our estimates (NATS came back, maybe empty; the bucket was
        made again): the next beat puts them at once, and a put from before is dropped."""
        self._estimates_put = None
        self._estimates_retry_at = 0.0
        if self._estimates_task is not None:
            self._estimates_task.cancel()

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
                self._estimates_lost()
                await self._kv.put(self._node, payload, ttl=self._ttl)
            self._put_estimates_if_due()

    def _put_estimates_if_due(self) -> None:
        """Puts the estimates record, when it changed, is due again or was lost, in a task of its own:
        a put that fails or hangs (NATS permissions without this node's `.estimates` key, say)
        must never hold up a heartbeat."""
        now = time.monotonic()
        if (self._estimates_task is not None and not self._estimates_task.done()) or now < self._estimates_retry_at:
            return
        payload, last = self._estimates().to_bytes(), self._estimates_put
        if last is None or last[0] != payload or now - last[1] >= ESTIMATES_REFRESH_S:
            self._estimates_task = asyncio.create_task(self._put_estimates(payload))

    async def _put_estimates(self, payload: bytes) -> None:
        try:
            await self._kv.put(estimates_key(self._node), payload, ttl=ESTIMATES_TTL_S)
        except Exception as exc:  # whatever it is, the heartbeats go on; logged, and tried again
            self._estimates_retry_at = time.monotonic() + _ESTIMATES_RETRY_S
            log.warning(
                "this node's memory estimates could not be written to KV %s (%s); gateways place models "
                "here by the catalogue's memory_mb until they are. If NATS permissions refuse it, allow "
                "$KV.%s.%s for this node (deploy/nats/accounts.conf). Trying again in %gs",
                NODES_BUCKET,
                exc,
                NODES_BUCKET,
                estimates_key(self._node),
                _ESTIMATES_RETRY_S,
            )
            return
        self._estimates_put = (payload, time.monotonic())

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
            if self._estimates_task is not None:
                self._estimates_task.cancel()  # a put still under way must not write the key back
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._estimates_task
            with contextlib.suppress(CortexError, asyncio.TimeoutError):
                await self._kv.delete(self._node)
                await self._kv.delete(estimates_key(self._node))
