"""Which models are pinned to this node: the catalogue's (`pinned_on` naming it) and the pins
bucket's (keys `<node>.<model_key>`, written by `cortex pin`). The keeper writes it, as the
bucket changes; the heartbeat and the control verbs read it."""

from __future__ import annotations

from cortex.protocol.catalogue import Catalogue
from cortex.protocol.messages import ModelSpec


class Pins:
    def __init__(self, node: str, catalogue: Catalogue) -> None:
        self._configured = {s.id: s for s in catalogue.models if node in s.pinned_on}
        self._runtime: dict[str, ModelSpec] = {}  # KV key -> the pinned model

    @property
    def configured(self) -> list[ModelSpec]:
        return list(self._configured.values())

    def pinned(self, model_id: str) -> bool:
        return model_id in self._configured or any(s.id == model_id for s in self._runtime.values())

    def add(self, key: str, spec: ModelSpec) -> bool:
        """Pins a model under a bucket key; False if that key pins one already."""
        if key in self._runtime:
            return False
        self._runtime[key] = spec
        return True

    def remove(self, key: str) -> ModelSpec | None:
        """The model the key pinned, now unpinned (None: it pinned nothing)."""
        return self._runtime.pop(key, None)
