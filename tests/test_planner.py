"""Placement decisions: pure functions over heartbeats, checked on hand-built fleets."""

from __future__ import annotations

import pytest

from cortex.placement import planner
from cortex.protocol.errors import NoCapacity, Refused
from cortex.protocol.messages import DeviceInfo, Estimate, Heartbeat, ModelSpec, ModelState, ModelStatus, Refusal

SPEC = ModelSpec(id="new", source="file:/m")


def _gpu(index: int, total: int, free: int) -> DeviceInfo:
    return DeviceInfo(id=f"cuda:{index}", kind="cuda", name="gpu", total_mb=total, free_mb=free)


def _model(model_id: str, device: str, mb: int, *, used: float = 0.0, **kw) -> ModelStatus:
    return ModelStatus(
        id=model_id, key=model_id, state=ModelState.ready, device=device, memory_mb=mb, last_used=used, **kw
    )


def _node(name: str, devices: list[DeviceInfo], models: list[ModelStatus], need: int | None = 1000, **kw) -> Heartbeat:
    estimates = [Estimate(model="new", memory_mb=need)] if need is not None else []
    return Heartbeat(
        node=name,
        version="t",
        started_at=0,
        sent_at=0,
        interval_s=1,
        max_batch=1,
        max_queue=1,
        devices=devices,
        models=models,
        estimates=estimates,
        **kw,
    )


def test_the_roomiest_device_that_fits_now_wins() -> None:
    a = _node("a", [_gpu(0, 8000, 1500)], [])
    b = _node("b", [_gpu(0, 8000, 5000)], [])
    placement = planner.plan(SPEC, [a, b], "lru")
    assert (placement.node, placement.devices, placement.victims) == ("b", ["cuda:0"], [])


def test_eviction_happens_on_the_device_where_it_makes_room() -> None:
    # cuda:0 has more free memory but only a pinned model; cuda:1 has an idle model to displace.
    node = _node(
        "a",
        [_gpu(0, 8000, 800), _gpu(1, 8000, 500)],
        [_model("pinned", "cuda:0", 7000, pinned=True), _model("idle", "cuda:1", 7000)],
    )
    placement = planner.plan(SPEC, [node], "lru")
    assert placement.devices == ["cuda:1"] and [v.id for v in placement.victims] == ["idle"]


def test_lru_and_priority_pick_different_victims_across_nodes() -> None:
    old_important = _node("a", [_gpu(0, 1000, 0)], [_model("old", "cuda:0", 1000, used=1.0, priority=10)])
    new_unimportant = _node("b", [_gpu(0, 1000, 0)], [_model("recent", "cuda:0", 1000, used=9.0, priority=-1)])
    assert planner.plan(SPEC, [old_important, new_unimportant], "lru").victims[0].id == "old"
    assert planner.plan(SPEC, [old_important, new_unimportant], "priority").victims[0].id == "recent"


def test_busy_and_pinned_models_are_never_victims_and_the_error_says_so() -> None:
    node = _node(
        "a",
        [_gpu(0, 2000, 0)],
        [_model("busy", "cuda:0", 1000, in_flight=1), _model("pinned", "cuda:0", 1000, pinned=True)],
    )
    with pytest.raises(NoCapacity) as caught:
        planner.plan(SPEC, [node], "lru")
    assert caught.value.retryable
    assert "new needs 1000 MB" in caught.value.message
    assert "has 2000 MB on cuda:0, of which 2000 MB is held by models that cannot be evicted" in caught.value.message


def test_a_refusal_wins_over_the_catalogues_memory_figure() -> None:
    refusal = Refusal(kind="quant_not_found", model="new", detail="no file", suggestion="Q4_K_M")
    node = _node("a", [_gpu(0, 8000, 8000)], [], need=None)
    node.estimates.append(Estimate(model="new", refusal=refusal))
    with pytest.raises(Refused) as caught:
        planner.plan(SPEC.model_copy(update={"memory_mb": 100}), [node], "lru")
    assert caught.value.refusal.kind == "quant_not_found"


def test_a_node_that_has_not_sized_the_model_is_assumed_to_need_what_others_found() -> None:
    sized = _node("a", [_gpu(0, 1000, 500)], [])
    with pytest.raises(NoCapacity):  # were b's need taken as 0, b would look free
        planner.plan(SPEC, [sized, _node("b", [_gpu(0, 8000, 800)], [], need=None)], "lru")
    placement = planner.plan(SPEC, [sized, _node("b", [_gpu(0, 8000, 1200)], [], need=None)], "lru")
    assert (placement.node, placement.need_mb) == ("b", 1000)


def test_a_stalled_node_gets_no_load() -> None:
    roomy = _node("a", [_gpu(0, 8000, 6000)], [], stalled=True)
    tight = _node("b", [_gpu(0, 8000, 1500)], [])
    assert planner.plan(SPEC, [roomy, tight], "lru").node == "b"
    assert not planner.fits(roomy, planner.need_on(SPEC, roomy), planner.room(roomy, SPEC.devices))
    with pytest.raises(NoCapacity, match="stopping or stalled"):
        planner.plan(SPEC, [roomy], "lru")


@pytest.mark.parametrize(
    ("models", "free"),
    [
        ([], 1500),  # fits now
        ([], 500),  # no room, nothing to evict
        ([_model("idle", "cuda:0", 700)], 500),  # fits once the idle model goes
        ([_model("pinned", "cuda:0", 700, pinned=True)], 500),  # a pinned model stays
        ([_model("busy", "cuda:0", 700, in_flight=1)], 500),  # so does a busy one
        ([_model("idle", "cuda:1", 700)], 500),  # evicting on another device makes no room here
    ],
)
def test_fits_by_the_room_a_node_could_make_agrees_with_planning(models: list[ModelStatus], free: int) -> None:
    node = _node("a", [_gpu(0, 8000, free), _gpu(1, 8000, 0)], models)
    try:
        planner.plan(SPEC, [node], "lru")
        placed = True
    except NoCapacity:
        placed = False
    assert planner.fits(node, planner.need_on(SPEC, node), planner.room(node, SPEC.devices)) is placed
