"""Placement leases in KV `cortex_placement`: one load of a model at a time, across all gateways.

The lease is created with `kv.create` (which fails if the key exists), so exactly one
gateway wins; it carries a TTL, so a gateway that dies while loading does not block the
model for longer than that.
"""

from __future__ import annotations

import contextlib
import math

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue
from pydantic import ValidationError

from cortex.protocol.messages import PlacementLease
from cortex.protocol.subjects import model_key
from cortex.transport.nats import map_nats_errors


class Leases:
    def __init__(self, kv: KeyValue, owner: str, ttl: float) -> None:
        self._kv = kv
        self._owner = owner
        self._ttl = max(1, math.ceil(ttl))

    async def acquire(self, model: str, node: str) -> bool:
        lease = PlacementLease(model=model, node=node, gateway=self._owner)
        with map_nats_errors(f"taking the placement lease for {model}"):
            try:
                await self._kv.create(model_key(model), lease.to_bytes(), msg_ttl=self._ttl)
            except nats.js.errors.KeyWrongLastSequenceError:
                return False
        return True

    async def holder(self, model: str) -> PlacementLease | None:
        with map_nats_errors(f"reading the placement lease for {model}"):
            try:
                entry = await self._kv.get(model_key(model))
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                return None
        if not entry.value:
            return None
        with contextlib.suppress(ValidationError):
            return PlacementLease.model_validate_json(entry.value)
        return None

    async def release(self, model: str) -> None:
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await self._kv.delete(model_key(model))
