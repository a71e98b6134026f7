"""Which holder gets a job: pure functions over a snapshot, no I/O."""

from __future__ import annotations

from collections.abc import Mapping

from cortex.placement.fleet import Holder


def rank_holders(holders: list[Holder], local_in_flight: Mapping[str, int]) -> list[str]:
    """Holders ordered least-loaded first.

    The load is what the node last reported (in flight + queued) plus what this gateway
    has sent it since, which the heartbeat cannot show yet. Ties go to the node that
    has used the model longest ago, spreading work across equal nodes.
    """

    def load(h: Holder) -> tuple[int, float]:
        # The heartbeat's in_flight already counts the queued jobs.
        return h.model.in_flight + local_in_flight.get(h.node, 0), h.model.last_used or 0.0

    return [h.node for h in sorted(holders, key=load)]
