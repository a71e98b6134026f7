"""Loads resolved weights with transformers. Runs only on the device's worker thread."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cortex.protocol.messages import ModelSpec
from neuron.engine.sampling import SamplingDefaults
from neuron.sources.resolve import ResolvedSource

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: Any
    tokenizer: Any
    device: torch.device
    context: int
    eos_ids: frozenset[int]
    memory_mb: int
    sampling: SamplingDefaults


def pick_dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
    if spec.dtype != "auto":
        return _DTYPES[spec.dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # Half precision on the CPU is slower than float32 for most kernels.
    return torch.float32


def load(spec: ModelSpec, source: ResolvedSource, device: torch.device) -> LoadedModel:
    dtype = pick_dtype(spec, device)
    kwargs: dict[str, Any] = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(str(source.directory), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(source.directory), dtype=dtype, **kwargs)
    model.to(device)
    model.eval()
    config = model.config
    context = spec.context or getattr(config, "max_position_embeddings", None) or 2048
    return LoadedModel(
        spec=spec,
        model=model,
        tokenizer=tokenizer,
        device=device,
        context=int(context),
        eos_ids=_eos_ids(model, tokenizer),
        memory_mb=_memory_mb(model),
        sampling=SamplingDefaults.for_model(spec, getattr(model, "generation_config", None)),
    )


def unload(loaded: LoadedModel) -> None:
    loaded.model = None
    gc.collect()
    if loaded.device.type == "cuda":
        torch.cuda.empty_cache()


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


def _memory_mb(model: Any) -> int:
    total = sum(t.numel() * t.element_size() for t in model.parameters())
    total += sum(t.numel() * t.element_size() for t in model.buffers())
    return int(total / 2**20) + 1
