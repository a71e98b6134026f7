"""Placement leases in KV `cortex_placement`: one load of a model at a time, across all gateways.

The lease is created with `kv.create` (which fails if the key exists), so exactly one
gateway wins; it carries a TTL, so a gateway that dies while loading does not block the
model for longer than that.
"""

from __future__ import annotations

import contextlib
import math

from pydantic import ValidationError

from cortex.protocol.errors import CortexError
from cortex.protocol.messages import PlacementLease
from cortex.protocol.subjects import model_key
from cortex.transport.kv import Bucket


class Leases:
    def __init__(self, kv: Bucket, owner: str, ttl: float) -> None:
        self._kv = kv
        self._owner = owner
        self._ttl = max(1, math.ceil(ttl))

    async def acquire(self, model: str, node: str) -> bool:
        lease = PlacementLease(model=model, node=node, gateway=self._owner)
        return await self._kv.create(
            model_key(model), lease.to_bytes(), ttl=self._ttl, what=f"taking the placement lease for {model}"
        )

    async def holder(self, model: str) -> PlacementLease | None:
        value = await self._kv.get(model_key(model), what=f"reading the placement lease for {model}")
        if not value:
            return None
        with contextlib.suppress(ValidationError):
            return PlacementLease.model_validate_json(value)
        return None

    async def release(self, model: str) -> None:
        with contextlib.suppress(CortexError, TimeoutError):
            await self._kv.delete(model_key(model))
