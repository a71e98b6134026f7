"""What this gateway has sent each node since its last heartbeat: jobs in flight and last use.

Heartbeats lag by up to an interval; routing and eviction must not act on a model's use
from before the request this gateway sent a moment ago. One per gateway, made by
`build_gateway`: the dispatcher writes it (a job opened, a job closed) and ranks holders by it,
the placer plans with heartbeats merged with it. A job counts from the moment it is sent.
"""

from __future__ import annotations

import time
from collections import Counter, deque

from cortex.protocol.messages import Heartbeat

_KEEP_FINISHES_S = 60.0  # heartbeats come every few seconds; older finishes are in them


class LocalUsage:
    def __init__(self) -> None:
        self._in_flight: Counter[tuple[str, str]] = Counter()
        self._last_used: dict[tuple[str, str], float] = {}
        self._finished: dict[tuple[str, str], deque[float]] = {}

    def started(self, node: str, model: str) -> None:
        self._in_flight[node, model] += 1
        self._last_used[node, model] = time.time()

    def withdrawn(self, node: str, model: str) -> None:
        """A job sent to the node that it did not take: it never counted in the node's heartbeats."""
        self._in_flight[node, model] -= 1
        if self._in_flight[node, model] <= 0:
            del self._in_flight[node, model]

    def finished(self, node: str, model: str) -> None:
        self.withdrawn(node, model)
        now = self._last_used[node, model] = time.time()
        recent = self._finished.setdefault((node, model), deque())
        recent.append(now)
        while recent and now - recent[0] > _KEEP_FINISHES_S:
            recent.popleft()

    def in_flight(self, model: str) -> dict[str, int]:
        """node -> this gateway's jobs in flight there for the model."""
        return {node: n for (node, m), n in self._in_flight.items() if m == model}

    def merged(self, heartbeat: Heartbeat) -> Heartbeat:
        """The heartbeat with each model's in-flight count and last use at least what we know."""
        if not any((heartbeat.node, status.id) in self._last_used for status in heartbeat.models):
            return heartbeat  # nothing sent there by this gateway (most nodes, in a large fleet)
        models = []
        for status in heartbeat.models:
            key = (heartbeat.node, status.id)
            local_use = self._last_used.get(key)
            # Jobs of ours that finished after the node sent this heartbeat are still counted in it.
            done_since = sum(1 for t in self._finished.get(key, ()) if t > heartbeat.sent_at)
            models.append(
                status.model_copy(
                    update={
                        "in_flight": max(status.in_flight - done_since, self._in_flight.get(key, 0)),
                        "last_used": max(status.last_used or 0.0, local_use or 0.0) or None,
                    }
                )
            )
        return heartbeat.model_copy(update={"models": models})
