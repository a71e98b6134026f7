"""The neuron's heartbeats and its estimates record: a record that cannot be written never holds up
a heartbeat (NATS permissions that lack a node's `.estimates` key make its puts time out)."""

from __future__ import annotations

import asyncio

from cortex.protocol.messages import Estimate, Heartbeat, NodeEstimates
from neuron.heartbeat import Heartbeater


class _StuckEstimates:
    """Stands in for KV cortex_nodes: takes heartbeats, and never answers a put of the estimates key."""

    def __init__(self) -> None:
        self.heartbeats = 0
        self.estimates_puts = 0
        self._never = asyncio.Event()

    async def put(self, key: str, value: bytes, *, ttl: int | None = None) -> None:
        if key.endswith(".estimates"):
            self.estimates_puts += 1
            await self._never.wait()
        self.heartbeats += 1


def _heartbeat() -> Heartbeat:
    return Heartbeat(
        node="n1", version="t", started_at=0, sent_at=0, interval_s=1, max_batch=1, max_queue=1, devices=[], models=[]
    )


async def test_heartbeats_go_out_while_the_estimates_put_hangs() -> None:
    bucket = _StuckEstimates()
    estimates = NodeEstimates(node="n1", estimates=[Estimate(model="m", memory_mb=10)])
    beater = Heartbeater(bucket, "n1", 1.0, _heartbeat, lambda: estimates)  # type: ignore[arg-type]
    for _ in range(5):
        await beater.beat()  # would wait forever behind the estimates
        await asyncio.sleep(0)  # the estimates' task starts
    assert bucket.heartbeats == 5
    assert bucket.estimates_puts == 1  # one put under way is not started again at each beat
