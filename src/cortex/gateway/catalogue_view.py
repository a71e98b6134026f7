"""The `/v1/models` entry of one model: the catalogue's view merged with the fleet's.

OpenAI's fields (`id`, `object`, `created`, `owned_by`) come first; cortex adds where the
model is loaded and in what state, where it could be placed now (with evictions if need
be), and its memory: measured where it is loaded, else the catalogue's `memory_mb`,
else the nodes' estimates.
"""

from __future__ import annotations

from typing import Any

from cortex.placement import planner
from cortex.placement.fleet import FleetView
from cortex.protocol.catalogue import Catalogue
from cortex.protocol.messages import Heartbeat, ModelSpec, ModelState, ModelStatus, Refusal


def model_entry(catalogue: Catalogue, fleet: FleetView, model_id: str) -> dict[str, Any]:
    return model_entries(catalogue, fleet, [model_id])[0]


def model_entries(catalogue: Catalogue, fleet: FleetView, model_ids: list[str]) -> list[dict[str, Any]]:
    """Entries for many models from one look at the fleet: its models indexed by id, and the room
    each node could make worked out once, not once per model (a listing asks about every
    catalogue model on every node)."""
    at_once = _Fleet(fleet.nodes())
    return [_entry(catalogue, at_once, model_id) for model_id in model_ids]


class _Fleet:
    def __init__(self, nodes: list[Heartbeat]) -> None:
        self.nodes = nodes
        self.loaded: dict[str, list[tuple[str, ModelStatus]]] = {}
        for hb in sorted(nodes, key=lambda hb: hb.node):
            for m in hb.models:
                self.loaded.setdefault(m.id, []).append((hb.node, m))
        self._rooms: dict[tuple[str, int], int | None] = {}

    def placeable_on(self, spec: ModelSpec, needs: dict[str, int | Refusal | None]) -> list[str]:
        """`needs`: node -> `planner.need_on(spec, node)`."""
        return sorted(hb.node for hb in self.nodes if planner.fits(hb, needs[hb.node], self._room(hb, spec.devices)))

    def _room(self, hb: Heartbeat, devices: int) -> int | None:
        key = (hb.node, devices)
        if key not in self._rooms:
            self._rooms[key] = planner.room(hb, devices)
        return self._rooms[key]


def _entry(catalogue: Catalogue, fleet: _Fleet, model_id: str) -> dict[str, Any]:
    spec = catalogue.resolve(model_id)
    nodes = fleet.nodes
    loaded = fleet.loaded.get(model_id, [])
    entry: dict[str, Any] = {
        "id": model_id,
        "object": "model",
        "created": 0,
        "owned_by": "cortex",
        "aliases": spec.aliases if spec else [],
        "nodes": [node for node, m in loaded if m.state is ModelState.ready],
        "loaded": [{"node": node, **_status(m)} for node, m in loaded],
    }
    measured = [m.memory_mb for _, m in loaded if m.state is ModelState.ready and m.memory_mb]
    entry["memory_mb"], entry["memory_source"] = None, None
    if measured:
        entry["memory_mb"], entry["memory_source"] = max(measured), "measured"
    if spec is None:
        return entry
    needs = {hb.node: planner.need_on(spec, hb) for hb in nodes}
    estimates = [n for n in needs.values() if isinstance(n, int)]
    if entry["memory_mb"] is None and estimates:
        entry["memory_mb"] = max(estimates)
        was_measured = any((e := hb.estimate(model_id)) is not None and e.measured for hb in nodes)
        entry["memory_source"] = "catalogue" if spec.memory_mb else "measured" if was_measured else "estimate"
    entry["placeable_on"] = fleet.placeable_on(spec, needs)
    refusals = [n for n in needs.values() if isinstance(n, Refusal)]
    if refusals and len(refusals) == len(needs):
        entry["refusal"] = refusals[0].model_dump(exclude_none=True)
    entry.update(spec.model_dump(include=_SPEC_FIELDS))
    return entry


def _status(m: ModelStatus) -> dict[str, Any]:
    out = m.model_dump(include=_STATUS_FIELDS, exclude_none=True)
    if not out.get("devices"):
        out.pop("devices", None)
    return out


_SPEC_FIELDS = {"source", "quant", "engine", "context", "devices", "pinned_on", "priority", "keep_alive"}
_STATUS_FIELDS = {
    "state",
    "engine",
    "parallel",
    "device",
    "devices",
    "memory_mb",
    "in_flight",
    "queued",
    "pinned",
    "phase",
    "progress",
    "error",
}
