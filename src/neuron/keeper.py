"""Keeper: pinned models stay loaded on this node; idle models leave after their keep_alive.

Pins come from the catalogue (`pinned_on` naming this node) and from KV `cortex_pins`
(keys `<node>.<model_key>`, written by `cortex pin`), which the keeper watches: a put
loads and pins the model, a delete unpins it (it stays loaded, now evictable). Both
are read again when the node starts, so a node that comes back loads its pins again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from nats.js.kv import KeyValue
from pydantic import ValidationError

from cortex.protocol.catalogue import Catalogue
from cortex.protocol.messages import ModelSpec, ModelState
from cortex.protocol.subjects import PINS_BUCKET
from cortex.transport.nats import keep_watching, watch_bucket
from neuron.models import LoadError
from neuron.sources.inspect import SourceRefused

if TYPE_CHECKING:
    from neuron.daemon import Neuron

log = logging.getLogger(__name__)

_REAP_EVERY_S = 1.0


class Keeper:
    def __init__(self, neuron: Neuron, node: str, catalogue: Catalogue) -> None:
        self._neuron = neuron
        self._node = node
        self._configured = {s.id: s for s in catalogue.models if node in s.pinned_on}
        self._runtime: dict[str, ModelSpec] = {}  # KV key -> the pinned model

    def pinned(self, model_id: str) -> bool:
        return model_id in self._configured or any(s.id == model_id for s in self._runtime.values())

    async def load(self, spec: ModelSpec, why: str) -> None:
        """Starts loading; a refusal is logged on one line with its kind (there is no caller to tell)."""
        try:
            await self._neuron.start_load(spec)
        except SourceRefused as exc:
            log.error("cannot load %s (%s): %s", spec.id, why, exc.refusal.log_fields())
            self._neuron.models.refused(spec, exc.refusal)
            await self._neuron.model_changed("load_failed", spec.id, exc.refusal.detail, exc.refusal.kind)
        except LoadError as exc:
            log.error("cannot load %s (%s): %s", spec.id, why, exc)
        except Exception as exc:  # a hub outage, a corrupt file: the keeper must keep going
            log.exception("cannot load %s (%s): %s", spec.id, why, exc)

    async def run(self, pins: KeyValue) -> None:
        for spec in self._configured.values():
            await self.load(spec, "pinned in models.toml")
        await asyncio.gather(keep_watching(lambda: self._watch_pins(pins), PINS_BUCKET), self._reap())

    async def _watch_pins(self, pins: KeyValue) -> None:
        async for update in watch_bucket(pins, f"{self._node}.*"):
            if update is not None:
                await self._apply(*update)

    async def _apply(self, key: str, value: bytes | None) -> None:
        if value is None:
            spec = self._runtime.pop(key, None)
            if spec is not None:
                log.info("unpinned %s", spec.id)
                await self._neuron.model_changed("unpinned", spec.id, None)
            return
        try:
            spec = ModelSpec.model_validate_json(value)
        except ValidationError as exc:
            log.warning("ignoring pin %s: not a model spec (%s)", key, exc.errors()[0]["msg"])
            return
        if key in self._runtime:
            return
        self._runtime[key] = spec
        log.info("pinned %s", spec.id)
        await self._neuron.model_changed("pinned", spec.id, None)
        await self.load(spec, "pinned at runtime")

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(_REAP_EVERY_S)
            now = time.time()
            for entry in self._neuron.models.entries():
                keep = entry.spec.keep_alive
                if keep is None or entry.state is not ModelState.ready or self.pinned(entry.spec.id):
                    continue
                if sum(self._neuron.relay.in_flight(entry.spec.id)) or now - (entry.last_used or now) < keep:
                    continue
                detail = f"idle for {now - (entry.last_used or now):.0f}s, keep_alive {keep:g}s"
                try:
                    await self._neuron.models.unload(entry.spec.id, "keep_alive", detail)
                except LoadError:
                    pass  # already on its way out
                except Exception:
                    log.exception("unloading idle %s failed", entry.spec.id)
