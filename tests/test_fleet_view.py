"""The gateway's fleet view: heartbeats joined to each node's estimates record, and models' holders
indexed as heartbeats come (what routing asks on every request)."""

from __future__ import annotations

from cortex.placement.fleet import FleetView
from cortex.protocol.messages import Estimate, ModelState, NodeEstimates
from cortex.protocol.subjects import estimates_key
from tests.test_fleet_report import heartbeat, model


def _estimates(node: str, mb: int) -> bytes:
    return NodeEstimates(node=node, estimates=[Estimate(model="org/big", memory_mb=mb)]).to_bytes()


def _estimate_mb(fleet: FleetView, node: str) -> int | None:
    [beat] = [hb for hb in fleet.nodes() if hb.node == node]
    estimate = beat.estimate("org/big")
    return estimate.memory_mb if estimate else None


def test_a_nodes_estimates_join_its_heartbeats_whichever_comes_first() -> None:
    fleet = FleetView()
    fleet.apply(estimates_key("a"), _estimates("a", 9000))
    fleet.apply("a", heartbeat("a").to_bytes())
    fleet.apply("b", heartbeat("b").to_bytes())
    fleet.apply(estimates_key("b"), _estimates("b", 7000))
    assert (_estimate_mb(fleet, "a"), _estimate_mb(fleet, "b")) == (9000, 7000)


def test_new_estimates_replace_the_old_and_outlive_later_heartbeats() -> None:
    fleet = FleetView()
    fleet.apply(estimates_key("a"), _estimates("a", 9000))
    fleet.apply("a", heartbeat("a").to_bytes())
    assert _estimate_mb(fleet, "a") == 9000  # read once: the index of the old list is built
    fleet.apply(estimates_key("a"), _estimates("a", 5000))
    assert _estimate_mb(fleet, "a") == 5000
    fleet.apply("a", heartbeat("a").to_bytes())
    assert _estimate_mb(fleet, "a") == 5000


def test_estimates_removed_from_the_bucket_leave_the_view() -> None:
    fleet = FleetView()
    fleet.apply(estimates_key("a"), _estimates("a", 9000))
    fleet.apply(estimates_key("a"), None)
    fleet.apply("a", heartbeat("a").to_bytes())
    assert _estimate_mb(fleet, "a") is None and [hb.node for hb in fleet.nodes()] == ["a"]


def test_holders_follow_each_heartbeat_of_a_model_state() -> None:
    fleet = FleetView()
    fleet.apply("a", heartbeat("a", model("org/m")).to_bytes())
    fleet.apply("b", heartbeat("b", model("org/m"), model("org/n")).to_bytes())
    assert sorted(h.node for h in fleet.holders("org/m")) == ["a", "b"]
    fleet.apply("b", heartbeat("b", model("org/m", ModelState.unloading), model("org/n")).to_bytes())
    fleet.apply("a", None)
    assert fleet.holders("org/m") == [] and [h.node for h in fleet.holders("org/n")] == ["b"]
    assert fleet.ready_models() == {"org/n": ["b"]}


def test_a_draining_node_holds_nothing_for_routing() -> None:
    fleet = FleetView()
    fleet.apply("a", heartbeat("a", model("org/m")).to_bytes())
    fleet.apply("a", heartbeat("a", model("org/m"), draining=True).to_bytes())
    assert fleet.holders("org/m") == []
    fleet.apply("a", heartbeat("a", model("org/m")).to_bytes())
    assert [h.node for h in fleet.holders("org/m")] == ["a"]


def test_a_model_a_node_no_longer_reports_is_not_found_there() -> None:
    fleet = FleetView()
    fleet.apply("a", heartbeat("a", model("org/m"), model("org/n")).to_bytes())
    fleet.apply("a", heartbeat("a", model("org/n")).to_bytes())
    assert fleet.statuses("org/m") == [] and not fleet.knows("org/m") and fleet.known_models() == {"org/n"}


def test_a_node_that_left_and_came_back_holds_only_what_it_reports_now() -> None:
    fleet = FleetView()
    fleet.apply("a", heartbeat("a", model("org/m")).to_bytes())
    fleet.apply("a", None)
    fleet.apply("a", heartbeat("a").to_bytes())
    assert fleet.holders("org/m") == [] and fleet.statuses("org/m") == []
