"""Which holder gets a job: pure functions over a snapshot, no I/O."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from cortex.placement.fleet import Holder
from cortex.protocol.prefix import longest_match

# How many more jobs than the least-loaded holder a holder of the job's prefix may have and still get
# it. Within it, reading the prefix from cache (a prefill of only what is new) beats a queue that
# short; past it, waiting behind other jobs costs more than computing the prompt again.
AFFINITY_SLACK = 4


def rank_holders(
    holders: list[Holder],
    local_in_flight: Mapping[str, int],
    chain: list[str] | None = None,
    *,
    suspects: Collection[str] = (),
    affinity_slack: int = AFFINITY_SLACK,
) -> list[str]:
    """Holders in the order a job should try them.

    A holder's load is what it last reported (in flight + queued) plus what this gateway has
    sent it since, which the heartbeat cannot show yet. With a prefix chain (cortex.protocol.prefix),
    the first is the holder advertising the longest part of it among those whose load is within
    `affinity_slack` of the least loaded (ties: the less loaded); every other holder follows,
    least loaded first. Ties between equal loads go to the node that used the model longest ago,
    spreading work across equal nodes; every gateway that sees the same heartbeats ranks alike.
    `suspects` (nodes this gateway has seen fall silent: frozen or cut off, their heartbeats not yet
    expired) go last, in the same order among themselves.
    """

    def load(h: Holder) -> int:
        # The heartbeat's in_flight already counts the queued jobs.
        return h.model.in_flight + local_in_flight.get(h.node, 0)

    ranked = sorted(holders, key=lambda h: (load(h), h.model.last_used or 0.0, h.node))
    if chain and ranked:
        within = load(ranked[0]) + affinity_slack

        def warmth(h: Holder) -> int:
            held = h.model.prefix_cache.prefixes if h.model.prefix_cache is not None else []
            return longest_match(chain, set(held)) if load(h) <= within else 0

        best = max(ranked, key=warmth)  # max keeps the first of equals: the least loaded
        if warmth(best):
            ranked.remove(best)
            ranked.insert(0, best)
    return sorted((h.node for h in ranked), key=lambda node: node in suspects)  # stable
