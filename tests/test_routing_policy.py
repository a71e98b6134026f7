"""rank_holders: least loaded first, except that the holder of the job's prefix goes first while
it is not much busier (the rule written in cortex.placement.policy)."""

from __future__ import annotations

from cortex.placement.fleet import Holder
from cortex.placement.policy import AFFINITY_SLACK, rank_holders
from cortex.protocol.messages import ModelState, ModelStatus, PrefixCacheStatus

CHAIN = ["sys", "sys+u1", "sys+u1+a1", "sys+u1+a1+u2"]


def _holder(node: str, in_flight: int = 0, prefixes: list[str] | None = None, last_used: float = 0.0) -> Holder:
    cache = PrefixCacheStatus(prefixes=prefixes) if prefixes is not None else None
    status = ModelStatus(
        id="m",
        key="m",
        state=ModelState.ready,
        device="cpu",
        in_flight=in_flight,
        last_used=last_used,
        prefix_cache=cache,
    )
    return Holder(node, status)


def test_without_a_prefix_the_least_loaded_goes_first() -> None:
    holders = [_holder("a", 3), _holder("b", 1), _holder("c", 2)]
    assert rank_holders(holders, {}) == ["b", "c", "a"]


def test_the_holder_of_the_longest_prefix_goes_first() -> None:
    holders = [_holder("a", 0, ["sys"]), _holder("b", 2, ["sys", "sys+u1+a1"]), _holder("c", 1)]
    assert rank_holders(holders, {}, CHAIN) == ["b", "a", "c"]


def test_a_warm_holder_much_busier_than_the_least_loaded_loses() -> None:
    holders = [_holder("a", 0), _holder("b", AFFINITY_SLACK + 1, ["sys+u1+a1"])]
    assert rank_holders(holders, {}, CHAIN) == ["a", "b"]


def test_this_gateways_own_jobs_count_in_the_load() -> None:
    holders = [_holder("a", 0), _holder("b", 0, ["sys+u1+a1"])]
    assert rank_holders(holders, {"b": AFFINITY_SLACK}, CHAIN) == ["b", "a"]
    assert rank_holders(holders, {"b": AFFINITY_SLACK + 1}, CHAIN) == ["a", "b"]


def test_a_prefix_nobody_holds_changes_nothing() -> None:
    holders = [_holder("a", 2, ["other"]), _holder("b", 1, ["else"])]
    assert rank_holders(holders, {}, CHAIN) == ["b", "a"]


def test_equal_holders_rank_the_same_whatever_order_they_come_in() -> None:
    holders = [_holder("a", 1, ["sys"], last_used=5.0), _holder("b", 1, ["sys"], last_used=5.0), _holder("c", 1)]
    assert rank_holders(holders, {}, CHAIN) == rank_holders(list(reversed(holders)), {}, CHAIN) == ["a", "c", "b"]


def test_a_suspected_holder_goes_last_however_warm_or_idle() -> None:
    holders = [_holder("a", 0, ["sys+u1+a1"]), _holder("b", 2), _holder("c", 1)]
    assert rank_holders(holders, {}, CHAIN, suspects={"a"}) == ["c", "b", "a"]
