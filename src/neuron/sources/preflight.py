"""Preflight: decide from a source's listing whether and how a model can load, before allocating.

Classifies the source (GGUF only, dense safetensors, mixed, empty), matches the `quant`
selector against the GGUF files (suggesting the nearest on a miss: `q6k` -> `Q6_K`), picks
the engine (engine/backends.py), refuses combinations that cannot work (a GGUF over several
devices, llama.cpp where it is not installed, int4 where bitsandbytes cannot run), and
estimates the memory the engine will really take: a GGUF's file size under llama.cpp (it
runs quantized) or its parameters at the dtype the device will use under transformers
(which dequantizes), dense weights at int8/int4 where asked, plus the KV cache for
`context` tokens times the node's concurrent sequences (16-bit under llama.cpp). The fit
against free memory is checked by the caller, which knows the devices.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cortex.protocol.messages import Estimate, ModelSpec
from neuron.engine.backends import IN_PLACE_QUANTS, SIZING, Engine, EngineRefused, check_in_place_quant, choose
from neuron.sources.inspect import (
    Listing,
    Shape,
    SourceRefused,
    config_parameters,
    config_shape,
    gguf_metadata,
    list_source,
    refuse,
)

_MB = 2**20
_QUANT_TOKEN = re.compile(r"(?<![A-Za-z0-9])(I?Q\d+(?:_[A-Za-z0-9]+)*|BF16|F16|F32|FP16)(?![A-Za-z0-9])", re.I)
# Bits per weight of common GGUF types, for sizing a remote GGUF whose header we cannot read.
_BITS = {"q2": 2.6, "q3": 3.4, "q4": 4.5, "q5": 5.5, "q6": 6.6, "q8": 8.5, "f16": 16, "bf16": 16, "f32": 32}

Format = Literal["gguf", "safetensors", "other"]


@dataclass
class Plan:
    spec: ModelSpec
    format: Format
    gguf_file: str | None
    weights_mb: int
    kv_mb: int
    engine: Engine = "transformers"
    layers: int | None = None  # for llama.cpp's partial GPU offload
    context: int | None = None  # the model's, capped by the catalogue's: llama.cpp sizes its context by it

    @property
    def in_place_quant(self) -> str | None:
        return self.spec.quant if self.format != "gguf" and self.spec.quant in IN_PLACE_QUANTS else None

    @property
    def memory_mb(self) -> int:
        return self.spec.memory_mb or self.weights_mb + self.kv_mb

    def estimate(self) -> Estimate:
        return Estimate(
            model=self.spec.id,
            memory_mb=self.memory_mb,
            weights_mb=self.weights_mb,
            kv_mb=self.kv_mb,
            format=self.format,
            engine=self.engine,
        )


def dtype_bytes(spec: ModelSpec, device_kind: str) -> int:
    if spec.dtype == "float32":
        return 4
    if spec.dtype in ("float16", "bfloat16"):
        return 2
    return 2 if device_kind == "cuda" else 4  # see loader.pick_dtype


def classify(listing: Listing) -> Literal["gguf", "safetensors", "mixed", "empty", "other"]:
    gguf, dense = bool(listing.named(".gguf")), bool(listing.named(".safetensors"))
    if gguf and dense:
        return "mixed"
    if gguf:
        return "gguf"
    if dense:
        return "safetensors"
    return "other" if listing.has_weights else "empty"


def plan(spec: ModelSpec, listing: Listing, *, device_kind: str, device_count: int, max_batch: int) -> Plan:
    """The load plan, or SourceRefused naming the problem and the fix."""
    kind = classify(listing)
    if kind == "empty":
        raise refuse(
            "source_empty",
            spec,
            f"{listing.where} holds no weights (no .safetensors, .gguf or .bin file)",
            "check the path or repository, and its revision",
        )
    gguf_file = None
    in_place = spec.quant in IN_PLACE_QUANTS and kind in ("safetensors", "mixed", "other")
    if kind == "gguf" or (kind == "mixed" and spec.quant and not in_place):
        gguf_file = pick_gguf(spec, listing)
    elif spec.quant and not in_place:
        raise refuse(
            "quant_unsupported",
            spec,
            f"quant {spec.quant!r} picks a .gguf file, but {listing.where} holds only dense weights",
            f"set quant to one of {', '.join(IN_PLACE_QUANTS)} to quantize them on load, remove `quant`, "
            "or point `source` at a GGUF repository",
        )
    try:
        engine = choose(spec.engine, gguf=gguf_file is not None, device_kind=device_kind, where=listing.where)
        if in_place and spec.quant is not None:  # dense weights: `choose` has refused llama.cpp already
            check_in_place_quant(spec.quant, device_kind)
    except EngineRefused as exc:
        raise refuse(exc.kind, spec, exc.detail, exc.suggestion) from None
    if spec.devices > 1 and gguf_file is not None:
        raise refuse(
            "gguf_multi_device",
            spec,
            f"a GGUF model loads on one device; devices = {spec.devices} was asked",
            "set devices = 1, or use a dense safetensors source to span several devices",
        )
    if spec.devices > device_count:
        raise refuse(
            "not_enough_devices",
            spec,
            f"devices = {spec.devices}, but this node has {device_count} {device_kind} device(s)",
            f"set devices to at most {device_count}, or place it on a node with more devices",
        )
    element = dtype_bytes(spec, device_kind)
    parameters, shape = _size(spec, listing, gguf_file)
    if shape is not None and spec.context:
        shape.context = min(shape.context, spec.context)
    sizing = SIZING[engine]
    kv_element = sizing.kv_bytes or element
    kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * shape.context * max_batch * kv_element if shape else 0
    if sizing.gguf_as_stored and gguf_file is not None:
        weights = listing.files[gguf_file]  # mapped as stored, quantized
    elif in_place:
        weights = _quantized_bytes(parameters, listing.config or {}, element, IN_PLACE_QUANTS[spec.quant or ""])
    else:
        weights = parameters * element
    return Plan(
        spec=spec,
        format="gguf" if gguf_file else ("safetensors" if kind in ("safetensors", "mixed") else "other"),
        gguf_file=gguf_file,
        weights_mb=_ceil_mb(weights),
        kv_mb=_ceil_mb(kv),
        engine=engine,
        layers=shape.layers if shape else None,
        context=shape.context if shape else spec.context,
    )


def preflight(
    spec: ModelSpec,
    *,
    device_kind: str,
    device_count: int,
    max_batch: int,
    cache_dir: Path | None = None,
    offline: bool = False,
) -> Plan:
    """Lists the source (metadata only) and plans the load. Blocking: the hub may be asked."""
    listing = list_source(spec, cache_dir=cache_dir, offline=offline)
    return plan(spec, listing, device_kind=device_kind, device_count=device_count, max_batch=max_batch)


def refusal_estimate(spec: ModelSpec, exc: SourceRefused) -> Estimate:
    return Estimate(model=spec.id, memory_mb=spec.memory_mb, refusal=exc.refusal)


def _size(spec: ModelSpec, listing: Listing, gguf_file: str | None) -> tuple[int, Shape | None]:
    shape = config_shape(listing.config) if listing.config else None
    if gguf_file is not None:
        if listing.local_dir is not None:
            parameters, gguf_shape = gguf_metadata(listing.local_dir / gguf_file)
            return parameters, gguf_shape or shape
        return int(listing.files[gguf_file] * 8 / _bits(gguf_file)), shape
    if listing.parameters:
        return listing.parameters, shape
    from_config = config_parameters(listing.config) if listing.config else None
    if from_config:
        return from_config, shape
    # Weights of unknown layout: assume 16-bit storage.
    return sum(size for name, size in listing.files.items() if name.endswith((".bin", ".pt", ".pth"))) // 2, shape


def _quantized_bytes(parameters: int, config: dict[str, object], element: int, bits: float) -> int:
    """Linear layers at `bits` a weight; the embeddings (and an untied output head), which
    bitsandbytes leaves alone, at the dtype's width."""
    nested = config.get("text_config")
    text: dict[str, object] = nested if isinstance(nested, dict) else config
    vocab, width = text.get("vocab_size"), text.get("hidden_size")
    embeddings = vocab * width if isinstance(vocab, int) and isinstance(width, int) else 0
    if embeddings and not text.get("tie_word_embeddings", True):
        embeddings *= 2
    embeddings = min(embeddings, parameters)
    return int(embeddings * element + (parameters - embeddings) * bits / 8)


def _bits(gguf_file: str) -> float:
    found = re.match(r"I?(Q\d|BF16|FP16|F16|F32)", quant_token(gguf_file) or "")
    return _BITS.get(found.group(1).lower().replace("fp16", "f16"), 4.5) if found else 4.5


def _ceil_mb(size: int) -> int:
    return -(-size // _MB)


# --- quant selectors ------------------------------------------------------------------------


def quant_token(filename: str) -> str | None:
    found = _QUANT_TOKEN.findall(filename.removesuffix(".gguf"))
    return found[-1].upper() if found else None


def pick_gguf(spec: ModelSpec, listing: Listing) -> str:
    names = listing.named(".gguf")
    tokens = {name: quant_token(name) for name in names}
    available = sorted({t for t in tokens.values() if t})
    if not spec.quant:
        if len(names) == 1:
            return names[0]
        raise refuse(
            "quant_ambiguous",
            spec,
            f"{listing.where} holds {len(names)} .gguf files and no `quant` picks one",
            f"set quant to one of: {', '.join(available) or ', '.join(names)}",
        )
    quant = spec.quant
    wanted = quant.upper()
    exact = [n for n, t in tokens.items() if t == wanted]
    matches = exact or [n for n in names if quant.lower() in n.lower()]
    if len({tokens[n] or n for n in matches}) == 1:
        return matches[0]
    if matches:
        raise refuse(
            "quant_ambiguous",
            spec,
            f"quant {spec.quant!r} matches several files: {', '.join(matches)}",
            f"set quant to one of: {', '.join(sorted({tokens[n] or n for n in matches}))}",
        )
    nearest = min(available, key=lambda t: _distance(t.lower(), quant.lower()), default=None)
    raise refuse(
        "quant_not_found",
        spec,
        f"no .gguf file in {listing.where} matches quant {spec.quant!r}; it has {', '.join(available) or names}",
        f"did you mean quant = {nearest!r}?" if nearest else None,
    )


def _distance(a: str, b: str) -> int:
    """Levenshtein distance."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]
