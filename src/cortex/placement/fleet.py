"""FleetView: every node's latest heartbeat, from the KV watcher, held in memory, joined to the
node's estimates record (`<node>.estimates`, written only when it changes), with each model's
nodes indexed as heartbeats arrive: routing asks on every request, and must not walk the fleet.

Liveness is judged by local receive time, not the sender's clock: a node whose heartbeat
has not been refreshed for three of its intervals (plus a grace second) is treated as gone
even before its key's TTL marker arrives, but only while other heartbeats keep arriving.
When every node falls silent at once the silence is most likely ours (the watch's server
died, or the bucket's stream is electing a leader after a NATS server failure): the view
is kept until heartbeats resume, a key's TTL marker arrives, or `FLEET_SILENCE_S` passes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from pydantic import ValidationError

from cortex.protocol.messages import Heartbeat, ModelState, ModelStatus, NodeEstimates
from cortex.protocol.subjects import estimates_node

log = logging.getLogger(__name__)

_GRACE_S = 1.0
FLEET_SILENCE_S = 30.0


def allowance(interval_s: float) -> float:
    """How long a node may stay silent: three of its heartbeat intervals, plus a second of jitter."""
    return 3 * interval_s + _GRACE_S


@dataclass(frozen=True)
class NodeRecord:
    heartbeat: Heartbeat
    seen_at: float

    def alive(self, now: float, last_heard: float) -> bool:
        """`last_heard`: when the latest heartbeat of any node arrived."""
        limit = allowance(self.heartbeat.interval_s)
        if now - self.seen_at <= limit:
            return True
        others_heard = last_heard - self.seen_at > limit
        return not others_heard and now - self.seen_at <= FLEET_SILENCE_S


@dataclass(frozen=True)
class Holder:
    node: str
    model: ModelStatus


class FleetView:
    def __init__(self, on_heartbeat: Callable[[Heartbeat], None] = lambda _: None) -> None:
        """`on_heartbeat`: told of each heartbeat as it enters the view (a gateway times its lag)."""
        self._on_heartbeat = on_heartbeat
        self._nodes: dict[str, NodeRecord] = {}
        # Each node's estimates record (`<node>.estimates`), kept apart from its heartbeats: it is
        # written only when it changes, so it may come before the node's first heartbeat.
        self._estimates: dict[str, NodeEstimates] = {}
        # model id -> node -> its status there, whatever its state: routing asks for a model's
        # holders on every request, and must not walk the whole fleet.
        self._by_model: dict[str, dict[str, ModelStatus]] = {}
        # Nodes that left -> lost (True) or stopped cleanly (False: their last heartbeat said draining).
        self._gone: dict[str, bool] = {}
        self._last_heard = 0.0
        self.synced = asyncio.Event()
        self._changed = asyncio.Condition()

    def apply(self, key: str, payload: bytes | None) -> None:
        """One change of KV cortex_nodes: a node's heartbeat (key: the node), or its estimates."""
        node = estimates_node(key)
        if node is not None:
            self._apply_estimates(node, payload)
        elif payload is None:
            self._remove(key)
        else:
            self._apply_heartbeat(key, payload)

    def _apply_heartbeat(self, node: str, payload: bytes) -> None:
        try:
            heartbeat = Heartbeat.model_validate_json(payload)
        except ValidationError as exc:
            log.warning("ignoring malformed heartbeat of %s: %s", node, exc.errors()[0]["msg"])
            return
        if node not in self._nodes:
            log.info("node %s joined the fleet", node)
        self._gone.pop(node, None)
        self._last_heard = time.monotonic()
        estimates = self._estimates.get(node)
        if estimates is not None:
            heartbeat.join(estimates)  # just parsed, seen by no one yet: no copy needed
        self._index(node, heartbeat)
        self._nodes[node] = NodeRecord(heartbeat, self._last_heard)
        self._on_heartbeat(heartbeat)

    def _remove(self, node: str) -> None:
        record = self._nodes.pop(node, None)
        if record is not None:
            log.info("node %s left the fleet", node)
            self._gone[node] = not record.heartbeat.draining
            self._unindex(node, record.heartbeat.models)

    def _apply_estimates(self, node: str, payload: bytes | None) -> None:
        if payload is None:
            self._estimates.pop(node, None)
            return
        try:
            estimates = NodeEstimates.model_validate_json(payload)
        except ValidationError as exc:
            log.warning("ignoring malformed estimates of %s: %s", node, exc.errors()[0]["msg"])
            return
        self._estimates[node] = estimates
        record = self._nodes.get(node)
        if record is not None:
            heartbeat = record.heartbeat.model_copy()  # the one in the view may be in a reader's hands
            heartbeat.join(estimates)
            self._nodes[node] = NodeRecord(heartbeat, record.seen_at)

    def _index(self, node: str, heartbeat: Heartbeat) -> None:
        previous = self._nodes.get(node)
        if previous is not None:
            models = {m.id for m in heartbeat.models}
            self._unindex(node, [m for m in previous.heartbeat.models if m.id not in models])
        for m in heartbeat.models:
            self._by_model.setdefault(m.id, {})[node] = m

    def _unindex(self, node: str, models: list[ModelStatus]) -> None:
        for m in models:
            nodes = self._by_model.get(m.id)
            if nodes is not None and nodes.pop(node, None) is not None and not nodes:
                del self._by_model[m.id]

    def _live(self, model_id: str) -> list[tuple[NodeRecord, ModelStatus]]:
        """Every live node that has the model (in any state), with its status there."""
        now, last = time.monotonic(), self._last_heard
        # list(): a metrics scrape reads this from another thread while heartbeats arrive.
        return [
            (record, m)
            for node, m in list(self._by_model.get(model_id, {}).items())
            if (record := self._nodes.get(node)) is not None and record.alive(now, last)
        ]

    async def follow(self, updates: AsyncIterator[tuple[str, bytes | None] | None]) -> None:
        async for update in updates:
            if update is None:
                self.synced.set()
            else:
                self.apply(*update)
            async with self._changed:
                self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[FleetView], bool], timeout: float) -> bool:
        """Waits until `predicate(self)` holds after some heartbeat: True; raises TimeoutError after `timeout`."""
        async with asyncio.timeout(timeout):
            async with self._changed:
                await self._changed.wait_for(lambda: predicate(self))
        return True

    def nodes(self) -> list[Heartbeat]:
        now = time.monotonic()
        # list(): a metrics scrape reads this from another thread while heartbeats arrive.
        return [r.heartbeat for r in list(self._nodes.values()) if r.alive(now, self._last_heard)]

    def records(self) -> list[tuple[Heartbeat, float, bool]]:
        """Every node's latest heartbeat, its age by local receive time, and whether it counts as
        alive by the rules above; silent ones too."""
        now, last = time.monotonic(), self._last_heard
        return [(r.heartbeat, now - r.seen_at, r.alive(now, last)) for r in list(self._nodes.values())]

    def census(self) -> tuple[list[Heartbeat], list[str]]:
        """(live nodes' heartbeats, nodes lost), from one look: for a scrape on another thread.

        Lost: silent, or gone without a clean stop (a node that drained and then removed its
        key was stopped, not lost). A lost node stays listed until it comes back.
        """
        now, last = time.monotonic(), self._last_heard
        records = list(self._nodes.items())
        live = [r.heartbeat for _, r in records if r.alive(now, last)]
        silent = [name for name, r in records if not r.alive(now, last)]
        lost = [name for name, was_lost in list(self._gone.items()) if was_lost]
        return live, sorted({*lost, *silent})

    def alive(self, node: str) -> bool:
        """False once a node has left (key deleted or expired, or heartbeats stopped).

        A node never seen counts as alive: a gateway that has just started may not have its
        heartbeat yet, and the job's own timeouts still apply.
        """
        record = self._nodes.get(node)
        if record is None:
            return node not in self._gone
        return record.alive(time.monotonic(), self._last_heard)

    def holders(self, model_id: str) -> list[Holder]:
        """Every live node where the model is ready and which takes jobs (not stopping, not stalled)."""
        return [
            Holder(r.heartbeat.node, m)
            for r, m in self._live(model_id)
            if m.state is ModelState.ready and r.heartbeat.takes_work
        ]

    def ready_models(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for model_id in list(self._by_model):
            if holders := self.holders(model_id):
                out[model_id] = [h.node for h in holders]
        return out

    def known_models(self) -> set[str]:
        """Every model some live node reports, in any state."""
        return {model_id for model_id in list(self._by_model) if self.knows(model_id)}

    def knows(self, model_id: str) -> bool:
        """Whether some live node reports the model, in any state."""
        return bool(self._live(model_id))

    def statuses(self, model_id: str, state: ModelState | None = None) -> list[tuple[str, ModelStatus]]:
        """(node, status) for every live node that has the model, in `state` if given."""
        return [(r.heartbeat.node, m) for r, m in self._live(model_id) if state is None or m.state is state]

    def failed_on(self, model_id: str) -> list[tuple[str, str]]:
        """(node, error) for every node where loading the model failed."""
        return [(node, m.error or "load failed") for node, m in self.statuses(model_id, ModelState.failed)]
