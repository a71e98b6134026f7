"""The `/v1/models` entry of one model: the catalogue's view merged with the fleet's.

OpenAI's fields (`id`, `object`, `created`, `owned_by`) come first; cortex adds where the
model is loaded and in what state, where it could be placed now (with evictions if need
be), and its memory: measured where it is loaded, else the catalogue's `memory_mb`,
else the nodes' estimates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cortex.placement import planner
from cortex.protocol.messages import ModelState, ModelStatus, Refusal

if TYPE_CHECKING:
    from cortex.gateway.service import Gateway


def model_entry(gw: Gateway, model_id: str) -> dict[str, Any]:
    spec = gw.catalogue.resolve(model_id)
    nodes = gw.fleet.nodes()
    loaded = [(hb.node, m) for hb in nodes for m in hb.models if m.id == model_id]
    entry: dict[str, Any] = {
        "id": model_id,
        "object": "model",
        "created": 0,
        "owned_by": "cortex",
        "aliases": spec.aliases if spec else [],
        "nodes": sorted(node for node, m in loaded if m.state is ModelState.ready),
        "loaded": [{"node": node, **_status(m)} for node, m in sorted(loaded, key=lambda x: x[0])],
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
    entry["placeable_on"] = sorted(hb.node for hb in nodes if planner.fits(spec, hb, gw.settings.eviction.strategy))
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
