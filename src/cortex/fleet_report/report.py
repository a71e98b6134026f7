"""FleetReport: the fleet's health in one document, for `cortex status` and the gateway's /fleet page.

Pure: it is built from heartbeats (with how long ago each was seen) and the pins, so the
CLI (reading KV itself) and the gateway (from its FleetView) judge health by the same rules:

- no node at all;
- a node whose last heartbeat is older than three of its intervals (plus a grace second;
  the gateway passes its FleetView's verdict, which also rides out a fleet-wide silence);
- a pinned model that is not `ready` on its node (the node missing counts);
- a model in state `failed`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from cortex.placement.fleet import allowance
from cortex.protocol.messages import Heartbeat, ModelState, ModelStatus


@dataclass(frozen=True)
class Sighting:
    """A node's latest heartbeat and how many seconds ago it was received (or sent)."""

    heartbeat: Heartbeat
    age_s: float
    alive: bool | None = None  # the gateway's FleetView verdict; None: judged here by age alone


class DeviceReport(BaseModel):
    id: str
    kind: str
    name: str
    total_mb: int
    used_mb: int
    free_mb: int


class ModelReport(BaseModel):
    id: str
    state: ModelState
    device: str
    devices: list[str] = Field(default_factory=list)
    memory_mb: int
    engine: str | None = None
    parallel: int | None = None
    in_flight: int
    queued: int
    tokens_per_s: float = Field(
        description="Tokens generated per second over the last ~5 seconds, as the node reports it."
    )
    pinned: bool
    phase: str | None = None
    progress: float | None = None
    error: str | None = None
    cache_tokens: int | None = Field(None, description="Tokens its prefix cache keeps for reuse (None: not loaded).")
    cache_mb: float | None = None
    cache_hit_rate: float | None = Field(None, description="Prompt tokens read from the cache / prompt tokens.")


class NodeReport(BaseModel):
    name: str
    version: str
    status: Literal["up", "draining", "stalled", "stale"]
    age_s: float = Field(description="Seconds since its last heartbeat.")
    interval_s: float
    uptime_s: float = Field(description="Seconds since the neuron started, as of its last heartbeat.")
    devices: list[DeviceReport]
    models: list[ModelReport]
    tokens_per_s: float
    in_flight: int
    queued: int


class FleetTotals(BaseModel):
    nodes: int
    nodes_up: int = Field(description="Nodes with a fresh heartbeat (draining ones included).")
    models_ready: int
    in_flight: int
    queued: int
    tokens_per_s: float
    memory_total_mb: int
    memory_used_mb: int


class FleetReport(BaseModel):
    healthy: bool
    problems: list[str] = Field(description="One sentence each: what is wrong, where, and what to check.")
    totals: FleetTotals
    nodes: list[NodeReport]


def build_report(
    sightings: Iterable[Sighting],
    pins: Mapping[str, Iterable[str]] | None = None,
    *,
    problems: Iterable[str] = (),
) -> FleetReport:
    """`pins`: node -> pinned model ids (KV cortex_pins, catalogue `pinned_on`).
    `problems`: found by the caller before any heartbeat was read (a missing bucket, say)."""
    pinned = {node: set(ids) for node, ids in (pins or {}).items()}
    found = list(problems)
    nodes = [_node(s, pinned.get(s.heartbeat.node, set())) for s in sorted(sightings, key=lambda s: s.heartbeat.node)]
    if not nodes:
        found.append(
            "No neuron is in the fleet (no heartbeat in KV cortex_nodes): start `neuron serve` and check that it "
            "reaches this NATS server."
        )
    for node in nodes:
        found.extend(_node_problems(node, pinned.get(node.name, set())))
    by_name = {n.name for n in nodes}
    for node_name in sorted(set(pinned) - by_name):
        for model_id in sorted(pinned[node_name]):
            found.append(
                f"{model_id} is pinned on node {node_name}, which is not in the fleet: start its neuron, "
                f"or `cortex unpin {model_id} --node {node_name}`."
            )
    fresh = [n for n in nodes if n.status != "stale"]
    devices = [d for n in fresh for d in n.devices]
    totals = FleetTotals(
        nodes=len(nodes),
        nodes_up=len(fresh),
        models_ready=sum(1 for n in fresh for m in n.models if m.state is ModelState.ready),
        in_flight=sum(n.in_flight for n in fresh),
        queued=sum(n.queued for n in fresh),
        tokens_per_s=round(sum(n.tokens_per_s for n in fresh), 1),
        memory_total_mb=sum(d.total_mb for d in devices),
        memory_used_mb=sum(d.used_mb for d in devices),
    )
    return FleetReport(healthy=not found, problems=found, totals=totals, nodes=nodes)


def _node(sighting: Sighting, pinned: set[str]) -> NodeReport:
    hb = sighting.heartbeat
    stale = not sighting.alive if sighting.alive is not None else sighting.age_s > allowance(hb.interval_s)
    models = [_model(m, m.id in pinned) for m in sorted(hb.models, key=lambda m: m.id)]
    return NodeReport(
        name=hb.node,
        version=hb.version,
        status="stale" if stale else "draining" if hb.draining else "stalled" if hb.stalled else "up",
        age_s=round(max(sighting.age_s, 0.0), 1),
        interval_s=hb.interval_s,
        uptime_s=round(max(hb.sent_at - hb.started_at, 0.0), 1),
        devices=[
            DeviceReport(
                id=d.id,
                kind=d.kind,
                name=d.name,
                total_mb=d.total_mb,
                used_mb=max(d.total_mb - d.free_mb, 0),
                free_mb=d.free_mb,
            )
            for d in hb.devices
        ],
        models=models,
        tokens_per_s=round(sum(m.tokens_per_s for m in models), 1),
        in_flight=sum(m.in_flight for m in models),
        queued=sum(m.queued for m in models),
    )


def _model(m: ModelStatus, pinned: bool) -> ModelReport:
    return ModelReport(
        id=m.id,
        state=m.state,
        device=m.device,
        devices=m.devices,
        memory_mb=m.memory_mb,
        engine=m.engine,
        parallel=m.parallel,
        in_flight=m.in_flight,
        queued=m.queued,
        tokens_per_s=round(m.tokens_per_s, 1),
        pinned=m.pinned or pinned,
        phase=m.phase,
        progress=m.progress,
        error=m.error or (m.refusal.detail if m.refusal else None),
        cache_tokens=m.prefix_cache.tokens if m.prefix_cache else None,
        cache_mb=m.prefix_cache.mb if m.prefix_cache else None,
        cache_hit_rate=m.prefix_cache.hit_rate if m.prefix_cache else None,
    )


def _node_problems(node: NodeReport, pinned: set[str]) -> list[str]:
    found = []
    if node.status == "stale":
        found.append(
            f"Node {node.name} last sent a heartbeat {node.age_s:.0f}s ago (every {node.interval_s:g}s expected): "
            "check that its neuron is running and can reach NATS."
        )
    states = {m.id: m for m in node.models}
    # The node's own flag covers pins it knows of that the caller may not (catalogue `pinned_on`).
    pinned = pinned | {m.id for m in node.models if m.pinned}
    for m in node.models:
        if m.state is ModelState.failed:
            found.append(
                f"{m.id} failed on node {node.name}: {m.error or 'no reason given'}; see the neuron's log there."
            )
    for model_id in sorted(pinned):
        held = states.get(model_id)
        if held is None:
            found.append(
                f"{model_id} is pinned on node {node.name} but not loaded there: check the neuron's log on {node.name}."
            )
        elif held.state not in (ModelState.ready, ModelState.failed):  # failed is reported above
            found.append(
                f"{model_id} is pinned on node {node.name} but is {held.state.value} there, not ready: "
                "wait for it, or check the neuron's log."
            )
    return found
