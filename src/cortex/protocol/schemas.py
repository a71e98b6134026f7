"""Generates `schemas/*.json` from the wire models: `cortex schemas` writes, `--check` compares."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter

from cortex.protocol import messages as m

# file stem -> the model (or union) it documents
SCHEMAS: dict[str, type[BaseModel] | TypeAdapter[Any]] = {
    "job": m.InferenceJob,
    "job-event": m.JOB_EVENT,
    "heartbeat": m.Heartbeat,
    "node-estimates": m.NodeEstimates,
    "control-load-request": m.LoadRequest,
    "control-unload-request": m.UnloadRequest,
    "control-cancel-request": m.CancelRequest,
    "control-count-request": m.CountRequest,
    "control-count-reply": m.CountReply,
    "control-model-reply": m.ModelReply,
    "control-cancel-reply": m.CancelReply,
    "control-status-reply": m.StatusReply,
    "control-error": m.ServiceErrorBody,
    "fleet-event": m.FleetEvent,
    "placement-lease": m.PlacementLease,
    "pin": m.ModelSpec,
    "stored-response": m.StoredResponse,
}


def render() -> dict[str, str]:
    out = {}
    for stem, model in SCHEMAS.items():
        schema = model.json_schema() if isinstance(model, TypeAdapter) else model.model_json_schema()
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": f"{stem}.json", **schema}
        out[f"{stem}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written


def drift(directory: Path) -> list[str]:
    """Names of schema files that are missing, stale, or no longer generated."""
    rendered = render()
    stale = [n for n, text in rendered.items() if not (directory / n).exists() or (directory / n).read_text() != text]
    orphans = [p.name for p in directory.glob("*.json") if p.name not in rendered]
    return sorted(stale + orphans)
