"""The fleet's KV buckets, read by the caller, as the report's inputs: heartbeats aged, pins by node.

Pure: `cortex status` reads the buckets through cortex.transport, the gateway keeps its own copies
(its FleetView and pins watch); both turn the raw values into a report's inputs here.
"""

from __future__ import annotations

import time

from pydantic import ValidationError

from cortex.fleet_report.report import Sighting
from cortex.protocol.catalogue import Catalogue
from cortex.protocol.messages import Heartbeat, ModelSpec
from cortex.protocol.subjects import model_id_from_key


def sightings(values: dict[str, bytes], now: float | None = None) -> list[Sighting]:
    """Heartbeats, aged by their `sent_at` against this machine's clock (keep clocks in sync, e.g. NTP).

    A value that is not a heartbeat (a newer or broken writer) is skipped.
    """
    now = time.time() if now is None else now
    out = []
    for payload in values.values():
        try:
            heartbeat = Heartbeat.model_validate_json(payload)
        except ValidationError:
            continue
        out.append(Sighting(heartbeat, now - heartbeat.sent_at))
    return out


def pins(values: dict[str, bytes]) -> dict[str, list[str]]:
    """KV cortex_pins (`<node>.<model_key>` -> ModelSpec) as node -> pinned model ids."""
    out: dict[str, list[str]] = {}
    for key, payload in values.items():
        node, _, key_part = key.partition(".")
        try:
            model_id = ModelSpec.model_validate_json(payload).id
        except ValidationError:
            model_id = _model_id(key_part)
        out.setdefault(node, []).append(model_id)
    return out


def _model_id(key_part: str) -> str:
    try:
        return model_id_from_key(key_part)
    except (ValueError, IndexError):  # not written by `cortex pin`: show the key as it is
        return key_part


def with_catalogue_pins(pinned: dict[str, list[str]], catalogue: Catalogue) -> dict[str, list[str]]:
    """Adds the catalogue's `pinned_on` to runtime pins: those nodes are expected to hold those models too."""
    out = {node: list(ids) for node, ids in pinned.items()}
    for spec in catalogue.models:
        for node in spec.pinned_on:
            if spec.id not in out.setdefault(node, []):
                out[node].append(spec.id)
    return out
