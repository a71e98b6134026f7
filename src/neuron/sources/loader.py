"""Loads resolved weights into the plan's engine. Runs only on the device's worker thread.

transformers: dense weights at the device's dtype, or quantized on load by bitsandbytes
(`quant = "int8" | "int4"`). A GGUF file is dequantized by transformers, which takes most of
a cold start (about 20 s for SmolLM2 on a CPU); the dequantized weights are then saved once
as safetensors under `converted_dir`, keyed on the file's identity and the dtype, and later
loads read those instead.

llama.cpp: the GGUF file is mapped as it is, quantized, with as many layers on the GPU as its
free memory holds. The tokenizer and chat template still come from transformers (read from
the same file, then cached under `converted_dir`: reading a GGUF's vocabulary takes seconds),
so prompts and outputs are handled alike on both engines.

Which loader a plan gets is decided here once, from its engine's name (`LOADERS`); what is
loaded is a LoadedModel around that engine's runtime (neuron.engine.runtime), and nothing
past this module asks which engine it is.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import logging
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cortex.protocol.messages import ModelSpec
from cortex.protocol.subjects import model_key
from neuron.cpu_share import host_cores
from neuron.engine.backends import Engine
from neuron.engine.chat import ChatFormat
from neuron.engine.llamacpp import LlamaCppRuntime, parallel
from neuron.engine.replay import Replay
from neuron.engine.runtime import DEFAULT_OPTIONS, EngineOptions, LoadedModel
from neuron.engine.sampling import SamplingDefaults
from neuron.engine.transformers_runtime import TransformersRuntime
from neuron.sources.preflight import Plan
from neuron.sources.resolve import ResolvedSource

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MB = 2**20
# What llama.cpp allocates on the GPU beside the weights and the KV cache (compute buffers).
LLAMA_CPP_BUFFERS_MB = 512


def pick_dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
    if spec.dtype != "auto":
        return _DTYPES[spec.dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # Half precision on the CPU is slower than float32 for most kernels.
    return torch.float32


def converted_path(converted_dir: Path, spec: ModelSpec, source: ResolvedSource, variant: str) -> Path:
    """Where what was derived from a GGUF file (its weights at a dtype, its tokenizer) is kept."""
    digest = hashlib.sha256(f"{source.identity}|{variant}".encode()).hexdigest()[:16]
    return converted_dir / f"{model_key(spec.id)}-{digest}"


class Loader(Protocol):
    def __call__(
        self,
        plan: Plan,
        source: ResolvedSource,
        devices: list[torch.device],
        limits_mb: list[int],
        converted_dir: Path | None,
        options: EngineOptions,
    ) -> LoadedModel: ...


def load(
    plan: Plan,
    source: ResolvedSource,
    devices: list[torch.device],
    limits_mb: list[int],
    converted_dir: Path | None = None,
    options: EngineOptions = DEFAULT_OPTIONS,
) -> LoadedModel:
    return LOADERS[plan.engine](plan, source, devices, limits_mb, converted_dir, options)


def _load_transformers(
    plan: Plan,
    source: ResolvedSource,
    devices: list[torch.device],
    limits_mb: list[int],
    converted_dir: Path | None,
    options: EngineOptions,
) -> LoadedModel:
    spec, device = plan.spec, devices[0]
    dtype = pick_dtype(spec, device)
    directory, kwargs = str(source.directory), {"gguf_file": source.gguf_file} if source.gguf_file else {}
    convert_to = None
    if source.gguf_file and converted_dir is not None:
        cached = converted_path(converted_dir, spec, source, str(dtype))
        if (cached / "config.json").exists():
            directory, kwargs = str(cached), {}
        else:
            convert_to = cached
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    quantization = _quantization(plan.in_place_quant, dtype)
    if len(devices) > 1:
        # Spread over several devices, each held to its share of the node's budget.
        max_memory = {d.index: f"{mb}MiB" for d, mb in zip(devices, limits_mb, strict=True)}
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, device_map="auto", max_memory=max_memory, quantization_config=quantization, **kwargs
        )
    elif quantization is not None:  # quantized weights cannot be moved after loading
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, device_map={"": device}, quantization_config=quantization, **kwargs
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kwargs)
        # transformers types its `to` (torch's, through functools.wraps) as if unbound: self is missing.
        model.to(device)  # type: ignore[arg-type]
    model.eval()
    if quantization is not None:
        release_cached_memory(device)  # the float copies quantization went through
    config = model.config
    context = spec.context or getattr(config, "max_position_embeddings", None) or 2048
    eos = _eos_ids(model, tokenizer)
    runtime = TransformersRuntime(
        model,
        max_batch=options.max_batch,
        cache_mb=plan.kv_mb if options.prefix_cache else 0,
        prefill_chunk=options.prefill_chunk,
    )
    runtime.set_threads(options.threads or host_cores())
    return LoadedModel(
        spec=spec,
        runtime=runtime,
        tokenizer=tokenizer,
        device=device,
        context=int(context),
        eos_ids=eos,
        memory_mb=runtime.weights_mb + plan.kv_mb,
        sampling=SamplingDefaults.for_model(spec, getattr(model, "generation_config", None)),
        chat=ChatFormat(spec, tokenizer),
        vocab_size=_vocab_size(model),
        replay=Replay.from_file(spec.replay, tokenizer, min(eos)) if spec.replay and eos else None,
        convert_to=convert_to,
        from_cache=not kwargs and source.gguf_file is not None,
    )


def _quantization(quant: str | None, dtype: torch.dtype) -> Any:
    if quant is None:
        return None
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    # int4: NF4 (4-bit NormalFloat, blocks of 64 with their own scale), computed at the model's dtype.
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def _load_llama_cpp(
    plan: Plan,
    source: ResolvedSource,
    devices: list[torch.device],
    limits_mb: list[int],
    converted_dir: Path | None,
    options: EngineOptions,
) -> LoadedModel:
    """One device (preflight refuses a GGUF over several), its layers offloaded as free memory allows;
    `limits_mb` is not used: llama.cpp sizes itself by the plan."""
    spec, device = plan.spec, devices[0]
    assert source.gguf_file is not None
    path = source.directory / source.gguf_file
    tokenizer = _gguf_tokenizer(spec, source, converted_dir)
    context = plan.context or 2048  # the GGUF header's, capped by the catalogue's, read by preflight
    gpu_layers = _gpu_layers(plan, device)
    cells = context * options.max_batch  # the KV memory the plan counts
    runtime = LlamaCppRuntime(
        str(path),
        cells=cells,
        sequences=parallel(cells, context, options.max_batch),
        gpu_layers=gpu_layers,
        threads=options.threads or host_cores(),
        kv_mb=plan.kv_mb,
        prefix_cache=options.prefix_cache,
        prefill_chunk=options.prefill_chunk,
    )
    eos = _eos_ids(None, tokenizer)  # the tokenizer was read from the GGUF: its end token is the file's
    return LoadedModel(
        spec=spec,
        runtime=runtime,
        tokenizer=tokenizer,
        device=torch.device("cpu"),  # logits come back to host memory
        context=context,
        eos_ids=eos,
        memory_mb=runtime.weights_mb + plan.kv_mb,
        sampling=SamplingDefaults.for_model(spec, None),
        chat=ChatFormat(spec, tokenizer),
        vocab_size=runtime.n_vocab,
        replay=Replay.from_file(spec.replay, tokenizer, min(eos)) if spec.replay and eos else None,
    )


def _gguf_tokenizer(spec: ModelSpec, source: ResolvedSource, converted_dir: Path | None) -> Any:
    """The transformers tokenizer of a GGUF file, saved once under converted_dir and read from there."""
    directory, gguf_file = str(source.directory), source.gguf_file
    if converted_dir is None:
        return AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    cached = converted_path(converted_dir, spec, source, "tokenizer")
    if (cached / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(cached))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    try:
        _write_folder(cached, tokenizer.save_pretrained)
    except OSError as exc:  # a cache we cannot write costs the next load time, nothing else
        log.warning("could not cache the tokenizer of %s in %s: %s", spec.id, cached, exc)
    return tokenizer


def _gpu_layers(plan: Plan, device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    layers = offload_layers(free // _MB, plan)
    if layers >= 0:
        log.info("%s: %d of %d layers fit on %s; the rest run on the CPU", plan.spec.id, layers, plan.layers, device)
    return layers


def offload_layers(free_mb: int, plan: Plan) -> int:
    """How many layers llama.cpp puts on a GPU with free_mb free: all (-1) where the weights fit
    beside the KV cache and the compute buffers, else as many as fit (the rest stay on the CPU)."""
    room = free_mb - plan.kv_mb - LLAMA_CPP_BUFFERS_MB
    if room >= plan.weights_mb or not plan.layers:
        return -1
    per_layer = plan.weights_mb / (plan.layers + 1)  # the output layer is about one more
    return max(0, int(room / per_layer))


def save_converted(loaded: LoadedModel) -> Path | None:
    """Writes the dequantized weights as a plain model folder; safe to run off the device thread.

    The live model is only read: transformers refuses `save_pretrained` on a model loaded
    from GGUF (its quantizer is marked not serializable), though its weights are plain floats.
    """
    from safetensors.torch import save_model

    target, model = loaded.convert_to, loaded.runtime.float_weights()
    if target is None or model is None:
        return None
    if (target / "config.json").exists():
        return target  # another process saved it meanwhile

    def write(folder: Path) -> None:
        save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(folder)
        loaded.tokenizer.save_pretrained(folder)

    _write_folder(target, write)
    loaded.convert_to = None
    return target


def _write_folder(target: Path, write: Callable[[Path], object]) -> None:
    """Writes a folder under a temporary name, then renames it into place (atomic: a reader sees
    all of it or none of it). Of two processes racing, one wins; the other's copy is as good."""
    partial = target.with_name(f"{target.name}.partial-{uuid.uuid4().hex}")
    partial.mkdir(parents=True)
    try:
        write(partial)
        partial.rename(target)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
        if not target.exists():
            raise
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def unload(loaded: LoadedModel) -> None:
    loaded.runtime.close()
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
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


def _vocab_size(model: Any) -> int:
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


# The one place an engine's name picks its code: the catalogue's `engine`, as preflight chose it.
LOADERS: dict[Engine, Loader] = {"transformers": _load_transformers, "llama.cpp": _load_llama_cpp}
