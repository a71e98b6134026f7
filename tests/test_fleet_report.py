"""The fleet-health rules of FleetReport, on constructed heartbeats."""

from __future__ import annotations

import time

from cortex.fleet_report.report import Sighting, build_report
from cortex.fleet_report.text import memory_bar, render
from cortex.placement.fleet import FleetView
from cortex.protocol.messages import DeviceInfo, Heartbeat, ModelState, ModelStatus, PrefixCacheStatus


def model(model_id: str = "org/m", state: ModelState = ModelState.ready, **fields: object) -> ModelStatus:
    return ModelStatus(id=model_id, key=model_id.replace("/", "_2F"), state=state, device="cuda:0", **fields)


def heartbeat(node: str = "a", *models: ModelStatus, draining: bool = False, stalled: bool = False) -> Heartbeat:
    now = time.time()
    return Heartbeat(
        node=node,
        version="0.1.0",
        started_at=now - 3600,
        sent_at=now,
        interval_s=2.0,
        draining=draining,
        stalled=stalled,
        max_batch=8,
        max_queue=64,
        devices=[DeviceInfo(id="cuda:0", kind="cuda", name="NVIDIA H200", total_mb=8192, free_mb=5000)],
        models=list(models),
    )


def seen(hb: Heartbeat, age_s: float = 0.5) -> Sighting:
    return Sighting(hb, age_s)


def test_a_fresh_node_with_a_ready_model_is_healthy() -> None:
    report = build_report([seen(heartbeat("a", model()))])
    assert report.healthy
    assert report.problems == []
    assert report.nodes[0].status == "up"


def test_no_node_at_all_is_unhealthy() -> None:
    report = build_report([])
    assert not report.healthy
    assert len(report.problems) == 1
    assert "No neuron is in the fleet" in report.problems[0]


def test_a_heartbeat_older_than_three_intervals_makes_the_node_stale() -> None:
    report = build_report([seen(heartbeat("a", model()), age_s=7.5)])  # interval 2 s: 6 s + 1 s grace
    assert report.nodes[0].status == "stale"
    assert not report.healthy
    assert report.problems == [
        "Node a last sent a heartbeat 8s ago (every 2s expected): check that its neuron is running and can reach NATS."
    ]


def test_a_heartbeat_within_three_intervals_is_not_stale() -> None:
    report = build_report([seen(heartbeat("a", model()), age_s=6.5)])
    assert report.nodes[0].status == "up"
    assert report.healthy


def test_a_failed_model_is_a_problem_naming_node_model_and_error() -> None:
    failed = model("org/broken", ModelState.failed, error="CUDA out of memory")
    report = build_report([seen(heartbeat("gpu1", model(), failed))])
    assert not report.healthy
    assert report.problems == ["org/broken failed on node gpu1: CUDA out of memory; see the neuron's log there."]


def test_a_pin_on_a_node_not_in_the_fleet_is_a_problem() -> None:
    report = build_report([seen(heartbeat("a", model()))], {"ghost": ["org/m"]})
    assert not report.healthy
    assert report.problems == [
        "org/m is pinned on node ghost, which is not in the fleet: start its neuron, or "
        "`cortex unpin org/m --node ghost`."
    ]


def test_a_pinned_model_not_loaded_on_its_node_is_a_problem() -> None:
    report = build_report([seen(heartbeat("a", model("org/other")))], {"a": ["org/m"]})
    assert not report.healthy
    assert report.problems == ["org/m is pinned on node a but not loaded there: check the neuron's log on a."]


def test_a_pinned_model_still_loading_is_a_problem() -> None:
    loading = model("org/m", ModelState.loading, pinned=True, phase="download", progress=0.4)
    report = build_report([seen(heartbeat("a", loading))])
    assert not report.healthy
    assert "org/m is pinned on node a but is loading there, not ready" in report.problems[0]


def test_a_pinned_ready_model_is_healthy_and_marked_pinned() -> None:
    report = build_report([seen(heartbeat("a", model("org/m")))], {"a": ["org/m"]})
    assert report.healthy
    assert report.nodes[0].models[0].pinned


def test_a_draining_node_is_reported_but_healthy() -> None:
    report = build_report([seen(heartbeat("a", model(), draining=True))])
    assert report.nodes[0].status == "draining"
    assert report.healthy


def test_devices_report_used_memory() -> None:
    device = build_report([seen(heartbeat("a"))]).nodes[0].devices[0]
    assert (device.total_mb, device.used_mb, device.free_mb) == (8192, 3192, 5000)


def test_totals_add_load_over_fresh_nodes_only() -> None:
    busy = model("org/m", in_flight=3, queued=2, tokens_per_s=41.25)
    other = model("org/n", in_flight=1, tokens_per_s=10.0)
    dead = model("org/m", in_flight=5, tokens_per_s=99.0)
    report = build_report([seen(heartbeat("a", busy)), seen(heartbeat("b", other)), seen(heartbeat("c", dead), 60)])
    totals = report.totals
    assert (totals.nodes, totals.nodes_up, totals.models_ready) == (3, 2, 2)
    assert (totals.in_flight, totals.queued, totals.tokens_per_s) == (4, 2, 51.2)
    assert (totals.memory_total_mb, totals.memory_used_mb) == (2 * 8192, 2 * 3192)


def test_caller_problems_come_first_and_make_it_unhealthy() -> None:
    report = build_report([seen(heartbeat("a", model()))], problems=["The bucket is gone."])
    assert report.problems == ["The bucket is gone."]
    assert not report.healthy


def test_memory_bar_draws_used_over_total() -> None:
    assert memory_bar(3174, 8192, width=12) == "[#####.......] 3.1/8.0 GB"


def test_table_names_node_device_and_model() -> None:
    text = render(build_report([seen(heartbeat("gpu1", model("org/m", tokens_per_s=12.5)))]), at=0)
    assert "HEALTHY" in text
    assert "gpu1  up  v0.1.0" in text
    assert "cuda:0   NVIDIA H200" in text
    assert "org/m" in text and "ready" in text and "12.5" in text


def test_a_models_prefix_cache_shows_its_size_and_hit_rate() -> None:
    cache = PrefixCacheStatus(tokens=7400, mb=168.2, prompt_tokens=1000, reused_tokens=820, hit_rate=0.82)
    report = build_report([seen(heartbeat("gpu1", model("org/m", prefix_cache=cache), model("org/loading")))])
    loading, cached = report.nodes[0].models  # by id
    assert (cached.cache_tokens, cached.cache_mb, cached.cache_hit_rate) == (7400, 168.2, 0.82)
    assert loading.cache_tokens is None
    assert "7.4k tok 168 MB, 82% hit" in render(report, at=0)


def test_a_stalled_node_is_reported_so() -> None:
    report = build_report([seen(heartbeat("a", model(), stalled=True))])
    assert report.nodes[0].status == "stalled"


def test_a_stalled_node_holds_no_model_for_routing_until_it_recovers() -> None:
    fleet = FleetView()
    fleet.apply("a", heartbeat("a", model("org/m"), stalled=True).to_bytes())
    fleet.apply("b", heartbeat("b", model("org/m")).to_bytes())
    assert [h.node for h in fleet.holders("org/m")] == ["b"]
    fleet.apply("a", heartbeat("a", model("org/m")).to_bytes())
    assert sorted(h.node for h in fleet.holders("org/m")) == ["a", "b"]
