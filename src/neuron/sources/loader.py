"""Loads resolved weights with transformers. Runs only on the device's worker thread.

A GGUF file is dequantized by transformers on load, which takes most of a cold start
(about 20 s for SmolLM2 on a CPU). The dequantized weights are then saved once as
safetensors under `converted_dir`, keyed on the file's identity and the dtype, and
later loads read those instead.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import logging
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cortex.protocol.messages import ModelSpec
from cortex.protocol.subjects import model_key
from neuron.engine.chat import ChatFormat
from neuron.engine.replay import Replay
from neuron.engine.sampling import SamplingDefaults
from neuron.sources.preflight import Plan
from neuron.sources.resolve import ResolvedSource

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MB = 2**20


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
    chat: ChatFormat
    replay: Replay | None = None
    convert_to: Path | None = None  # where to save the dequantized weights, if not done yet
    from_cache: bool = False


def pick_dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
    if spec.dtype != "auto":
        return _DTYPES[spec.dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # Half precision on the CPU is slower than float32 for most kernels.
    return torch.float32


def converted_path(converted_dir: Path, spec: ModelSpec, source: ResolvedSource, dtype: torch.dtype) -> Path:
    digest = hashlib.sha256(f"{source.identity}|{dtype}".encode()).hexdigest()[:16]
    return converted_dir / f"{model_key(spec.id)}-{digest}"


def load(
    plan: Plan,
    source: ResolvedSource,
    devices: list[torch.device],
    limits_mb: list[int],
    converted_dir: Path | None = None,
) -> LoadedModel:
    spec, device = plan.spec, devices[0]
    dtype = pick_dtype(spec, device)
    directory, kwargs = str(source.directory), {"gguf_file": source.gguf_file} if source.gguf_file else {}
    convert_to = None
    if source.gguf_file and converted_dir is not None:
        cached = converted_path(converted_dir, spec, source, dtype)
        if (cached / "config.json").exists():
            directory, kwargs = str(cached), {}
        else:
            convert_to = cached
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    if len(devices) > 1:
        # Spread over several devices, each held to its share of the node's budget.
        max_memory = {d.index: f"{mb}MiB" for d, mb in zip(devices, limits_mb, strict=True)}
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, device_map="auto", max_memory=max_memory, **kwargs
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kwargs)
        model.to(device)
    model.eval()
    config = model.config
    context = spec.context or getattr(config, "max_position_embeddings", None) or 2048
    eos = _eos_ids(model, tokenizer)
    return LoadedModel(
        spec=spec,
        model=model,
        tokenizer=tokenizer,
        device=device,
        context=int(context),
        eos_ids=eos,
        memory_mb=_weights_mb(model) + plan.kv_mb,
        sampling=SamplingDefaults.for_model(spec, getattr(model, "generation_config", None)),
        chat=ChatFormat(spec, tokenizer),
        replay=Replay.from_file(spec.replay, tokenizer, min(eos)) if spec.replay and eos else None,
        convert_to=convert_to,
        from_cache=not kwargs and source.gguf_file is not None,
    )


def save_converted(loaded: LoadedModel) -> Path | None:
    """Writes the dequantized weights as a plain model folder; safe to run off the device thread.

    The live model is only read: transformers refuses `save_pretrained` on a model loaded
    from GGUF (its quantizer is marked not serializable), though its weights are plain floats.
    """
    from safetensors.torch import save_model

    target, model = loaded.convert_to, loaded.model
    if target is None or model is None:
        return None
    if (target / "config.json").exists():
        return target  # another process saved it meanwhile
    partial = target.with_name(f"{target.name}.partial-{uuid.uuid4().hex}")
    partial.mkdir(parents=True)
    save_model(model, str(partial / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(partial)
    loaded.tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)  # atomic: a reader sees all of it or none of it
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)  # another process won the race; its copy is as good
    loaded.convert_to = None
    return target


def unload(loaded: LoadedModel) -> None:
    loaded.model = None
    gc.collect()
    if loaded.device.type == "cuda":
        torch.cuda.empty_cache()


def release_cached_memory(device: torch.device) -> None:
    """Returns freed memory to the device (CUDA's caching allocator) or to the OS (glibc's heap)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


def _weights_mb(model: Any) -> int:
    total = sum(t.numel() * t.element_size() for t in model.parameters())
    total += sum(t.numel() * t.element_size() for t in model.buffers())
    return -(-total // _MB)
