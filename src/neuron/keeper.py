"""Keeper: pinned models stay loaded on this node; idle models leave after their keep_alive.

Pins come from the catalogue (`pinned_on` naming this node) and from KV `cortex_pins`
(keys `<node>.<model_key>`, written by `cortex pin`), which the keeper watches: a put
loads and pins the model, a delete unpins it (it stays loaded, now evictable). Both
are read again when the node starts, so a node that comes back loads its pins again.
The keeper is the one writer of the node's Pins.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from pydantic import ValidationError

from cortex.protocol.messages import EventKind, ModelSpec, ModelState
from cortex.protocol.subjects import PINS_BUCKET
from cortex.transport.kv import Bucket
from cortex.transport.watch import keep_watching, watch_bucket
from neuron.models import LoadError, ModelEntry, ModelTable
from neuron.pins import Pins
from neuron.sources.inspect import SourceRefused

log = logging.getLogger(__name__)

_REAP_EVERY_S = 1.0


class KeptModels(Protocol):
    """What the keeper needs of its node (neuron.node.Node) beside the model table it reads."""

    async def start_load(self, spec: ModelSpec) -> ModelEntry:
        """Preflight, fit, load; raises SourceRefused or LoadError."""
        ...

    async def model_changed(
        self, kind: EventKind, model: str | None, detail: str | None, reason: str | None = None
    ) -> None:
        """Tells the fleet."""
        ...

    def in_flight(self, model_id: str) -> tuple[int, int]:
        """(running, queued) jobs of a model."""
        ...


class Keeper:
    def __init__(self, node: KeptModels, models: ModelTable, name: str, pins: Pins) -> None:
        self._node = node
        self._models = models
        self._name = name
        self._pins = pins

    async def load(self, spec: ModelSpec, why: str) -> None:
        """Starts loading; a refusal is logged on one line with its kind (there is no caller to tell)."""
        try:
            await self._node.start_load(spec)
        except SourceRefused as exc:
            log.error("cannot load %s (%s): %s", spec.id, why, exc.refusal.log_fields())
            self._models.refused(spec, exc.refusal)
            await self._node.model_changed("load_failed", spec.id, exc.refusal.detail, exc.refusal.kind)
        except LoadError as exc:
            log.error("cannot load %s (%s): %s", spec.id, why, exc)
        except Exception as exc:  # a hub outage, a corrupt file: the keeper must keep going
            log.exception("cannot load %s (%s): %s", spec.id, why, exc)

    async def run(self, pins: Bucket) -> None:
        for spec in self._pins.configured:
            await self.load(spec, "pinned in models.toml")
        await asyncio.gather(keep_watching(lambda: self._watch_pins(pins), PINS_BUCKET), self._reap())

    async def _watch_pins(self, pins: Bucket) -> None:
        async for update in watch_bucket(pins, f"{self._name}.*"):
            if update is not None:
                await self._apply(*update)

    async def _apply(self, key: str, value: bytes | None) -> None:
        if value is None:
            spec = self._pins.remove(key)
            if spec is not None:
                log.info("unpinned %s", spec.id)
                await self._node.model_changed("unpinned", spec.id, None)
            return
        try:
            spec = ModelSpec.model_validate_json(value)
        except ValidationError as exc:
            log.warning("ignoring pin %s: not a model spec (%s)", key, exc.errors()[0]["msg"])
            return
        if not self._pins.add(key, spec):
            return
        log.info("pinned %s", spec.id)
        await self._node.model_changed("pinned", spec.id, None)
        await self.load(spec, "pinned at runtime")

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(_REAP_EVERY_S)
            now = time.time()
            for entry in self._models.entries():
                keep = entry.spec.keep_alive
                if keep is None or entry.state is not ModelState.ready or self._pins.pinned(entry.spec.id):
                    continue
                if sum(self._node.in_flight(entry.spec.id)) or now - (entry.last_used or now) < keep:
                    continue
                detail = f"idle for {now - (entry.last_used or now):.0f}s, keep_alive {keep:g}s"
                try:
                    await self._models.unload(entry.spec.id, "keep_alive", detail)
                except LoadError:
                    pass  # already on its way out
                except Exception:
                    log.exception("unloading idle %s failed", entry.spec.id)
