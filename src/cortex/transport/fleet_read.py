"""Read-only snapshots of the fleet's KV buckets, for `cortex status` and the gateway's /fleet page.

Nothing here creates a bucket: a reader with the ops credentials may not be allowed to, and a
bucket that does not exist yet means no neuron (or no pin) ever wrote to this NATS server.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import nats.js.errors
from nats.aio.client import Client
from nats.js.kv import KeyValue
from pydantic import ValidationError

from cortex.placement.report import Sighting
from cortex.protocol.catalogue import Catalogue
from cortex.protocol.errors import ErrorCode, TransportError
from cortex.protocol.messages import Heartbeat, ModelSpec
from cortex.protocol.subjects import model_id_from_key
from cortex.transport.nats import map_nats_errors, watch_bucket

_SNAPSHOT_TIMEOUT_S = 5.0


async def existing_bucket(nc: Client, bucket: str) -> KeyValue | None:
    """The bucket, or None when it does not exist."""
    with map_nats_errors(f"opening KV bucket {bucket}"):
        try:
            return await nc.jetstream().key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            return None


async def snapshot(kv: KeyValue) -> dict[str, bytes]:
    """Every key's current value, read once (a watch stopped after its initial replay)."""
    values: dict[str, bytes] = {}
    try:
        async with asyncio.timeout(_SNAPSHOT_TIMEOUT_S):
            async with contextlib.aclosing(watch_bucket(kv)) as updates:
                async for update in updates:
                    if update is None:
                        break
                    key, value = update
                    if value is None:
                        values.pop(key, None)
                    else:
                        values[key] = value
    except TimeoutError:
        raise TransportError(
            f"reading KV bucket {kv._name}: NATS did not answer within {_SNAPSHOT_TIMEOUT_S:g}s",
            code=ErrorCode.timeout,
        ) from None
    return values


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
