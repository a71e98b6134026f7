"""Where a model that is not loaded should go: pure functions over heartbeats, no I/O.

A node where it fits now (the one with the most room left), else one where it fits after
evicting models that may be displaced (fewest evictions, then the least valuable ones),
else `insufficient_capacity` with the numbers. Pinned models, models still loading, and
models with jobs in flight are never displaced. Under `lru` the least recently used goes
first; under `priority` the lowest priority, ties by least recent use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cortex.protocol.errors import ErrorCode, NoCapacity, Refused
from cortex.protocol.messages import DeviceInfo, Heartbeat, ModelSpec, ModelState, ModelStatus, Refusal

Strategy = Literal["lru", "priority"]


@dataclass(frozen=True)
class Placement:
    node: str
    need_mb: int
    devices: list[str]
    victims: list[ModelStatus] = field(default_factory=list)


def need_on(spec: ModelSpec, node: Heartbeat) -> int | Refusal | None:
    """Memory the model needs on this node: measured there before, else the catalogue's figure, else
    the node's estimate.

    A refusal when the node's preflight refused it; None when the node has no estimate (it
    does not know the model): then the node checks the fit itself when asked to load.
    """
    estimate = node.estimate(spec.id)
    if estimate is not None and estimate.refusal is not None:
        return estimate.refusal
    if estimate is not None and estimate.measured:
        return estimate.memory_mb  # what it took when last loaded there beats any figure
    if spec.memory_mb:
        return spec.memory_mb
    return estimate.memory_mb if estimate is not None else None


def eviction_order(models: list[ModelStatus], strategy: Strategy) -> list[ModelStatus]:
    """The models that may be displaced, the first to go first."""
    movable = [m for m in models if evictable(m)]
    if strategy == "priority":
        return sorted(movable, key=lambda m: (m.priority, m.last_used or 0.0))
    return sorted(movable, key=lambda m: m.last_used or 0.0)


def evictable(model: ModelStatus) -> bool:
    return model.state is ModelState.ready and not model.pinned and model.in_flight == 0


def _on(model: ModelStatus, devices: list[str]) -> bool:
    return bool({model.device, *model.devices} & set(devices))


def _freed(model: ModelStatus, devices: list[str]) -> int:
    """What evicting the model frees on these devices (a model over several counts a share on each)."""
    spans = [model.device, *[d for d in model.devices if d != model.device]]
    return model.memory_mb * len(set(spans) & set(devices)) // len(spans)


@dataclass(frozen=True)
class _Option:
    placement: Placement
    rank: tuple[float, ...]


def _option(node: Heartbeat, spec: ModelSpec, need: int, strategy: Strategy) -> _Option | None:
    """The best way to fit the model on this node: on each device (or group, for several) in turn."""
    options = [o for g in _device_groups(node.devices, spec.devices) if (o := _fit(node, g, need, strategy))]
    return min(options, key=lambda o: o.rank, default=None)


def _option_now(node: Heartbeat, spec: ModelSpec, need: int) -> _Option | None:
    """The best way to fit the model on this node without evicting anything."""
    options = [o for g in _device_groups(node.devices, spec.devices) if (o := _fit_now(node, g, need))]
    return min(options, key=lambda o: o.rank, default=None)


def _fit_now(node: Heartbeat, devices: list[DeviceInfo], need: int) -> _Option | None:
    free = sum(d.free_mb for d in devices)
    if need <= free:
        return _Option(Placement(node.node, need, [d.id for d in devices]), (0, 0, 0, 0.0, -(free - need)))
    return None


def _fit(node: Heartbeat, devices: list[DeviceInfo], need: int, strategy: Strategy) -> _Option | None:
    if (now := _fit_now(node, devices, need)) is not None:
        return now
    ids = [d.id for d in devices]
    free = sum(d.free_mb for d in devices)
    victims: list[ModelStatus] = []
    for model in eviction_order([m for m in node.models if _on(m, ids)], strategy):
        victims.append(model)
        free += _freed(model, ids)
        if need <= free:
            # Across nodes, displace the least valuable: the lowest priority (under `priority`), then the
            # least recently used.
            worth = max(v.priority for v in victims) if strategy == "priority" else 0
            recency = max(v.last_used or 0.0 for v in victims)
            return _Option(Placement(node.node, need, ids, victims), (1, len(victims), worth, recency, -(free - need)))
    return None


def _device_groups(devices: list[DeviceInfo], count: int) -> list[list[DeviceInfo]]:
    """Where the model could go: each device alone, or for several, the `count` roomiest of one kind
    (GPUs preferred, as the node itself chooses)."""
    if count == 1:
        gpus = [d for d in devices if d.kind == "cuda"]
        return [[d] for d in (gpus or devices)]
    group = _device_group(devices, count)
    return [group] if group else []


def _device_group(devices: list[DeviceInfo], count: int) -> list[DeviceInfo] | None:
    """The `count` roomiest devices of one kind, GPUs preferred; None if the node has too few."""
    for kind in ("cuda", "cpu"):
        of_kind = sorted((d for d in devices if d.kind == kind), key=lambda d: d.free_mb, reverse=True)
        if len(of_kind) >= count:
            return of_kind[:count]
    return None


def room(node: Heartbeat, devices: int) -> int | None:
    """The most memory the node could make for a model over `devices` devices: what is free plus
    what evicting every model that may be displaced frees, on its best device (group); None when
    it has too few devices. Evicting in any order frees the same in the end, so the strategy
    does not matter here."""
    best = None
    for group in _device_groups(node.devices, devices):
        ids = [d.id for d in group]
        made = sum(d.free_mb for d in group) + sum(_freed(m, ids) for m in node.models if evictable(m) and _on(m, ids))
        best = made if best is None else max(best, made)
    return best


def fits(node: Heartbeat, need: int | Refusal | None, room_mb: int | None) -> bool:
    """Whether a model could be placed on this node now, evicting what may be displaced. `need`:
    `need_on(spec, node)`; `room_mb`: `room(node, spec.devices)`: a caller asking about many
    models works each out once."""
    if not node.takes_work or isinstance(need, Refusal) or room_mb is None:
        return False
    return (need or 0) <= room_mb


def plan(spec: ModelSpec, nodes: list[Heartbeat], strategy: Strategy) -> Placement:
    """The best placement, or Refused (every node's preflight says no) or NoCapacity (no room)."""
    candidates = [n for n in nodes if n.takes_work]
    if not candidates:
        why = "start a neuron"
        if nodes:
            why = "every node is stopping or stalled (its jobs make no progress); retry shortly"
        message = f"{spec.id} is not loaded, and no node is up to load it; {why}"
        raise NoCapacity(message, code=ErrorCode.model_not_loaded)
    refusals: list[Refusal] = []
    sizes: dict[str, int] = {}
    needs = [(node, need_on(spec, node)) for node in candidates]
    known = [n for _, n in needs if isinstance(n, int)]
    for node, need in needs:
        if isinstance(need, Refusal):
            refusals.append(need)
            continue
        # A node that has not sized the model yet: assume what the others found (it checks the fit itself).
        sizes[node.node] = need if need is not None else max(known, default=0)
    sized = [n for n in candidates if n.node in sizes]
    # Room now anywhere beats any eviction (every such option ranks first): with a thousand nodes,
    # working out evictions on each is most of the time a cold load's decision would take.
    options = [o for n in sized if (o := _option_now(n, spec, sizes[n.node]))]
    if not options:
        options = [o for n in sized if (o := _option(n, spec, sizes[n.node], strategy))]
    if options:
        return min(options, key=lambda o: o.rank).placement
    if refusals and not sizes:
        raise Refused(refusals[0])
    raise _no_room(spec, sized, sizes)


def _no_room(spec: ModelSpec, nodes: list[Heartbeat], sizes: dict[str, int]) -> NoCapacity:
    def capacity(node: Heartbeat) -> int:
        group = _device_group(node.devices, spec.devices) or []
        return sum(d.total_mb for d in group)

    largest = max(nodes, key=capacity)
    group = [d.id for d in _device_group(largest.devices, spec.devices) or []]
    stuck = sum(m.memory_mb for m in largest.models if _on(m, group) and not evictable(m))
    need = sizes[largest.node]
    return NoCapacity(
        f"{spec.id} needs {need} MB and fits on no node, even after evictions: the largest, {largest.node}, "
        f"has {capacity(largest)} MB on {', '.join(group) or 'no device'}, of which {stuck} MB is held by "
        "models that cannot be evicted (pinned, loading or busy). Lower its `context`, or add a node with more memory",
        code=ErrorCode.insufficient_capacity,
        retryable=stuck > 0,
    )
