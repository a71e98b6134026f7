"""Which engine runs a model, and what each can do on this node.

transformers runs everything it can read (dense weights, and GGUF dequantized to floats);
llama.cpp (`llama-cpp-python`, an optional extra that compiles on install) runs GGUF files as
they are, quantized. `auto` prefers llama.cpp for a GGUF file wherever it is installed and can
use the device. In-place quantization of dense weights (`quant = "int8" | "int4"`) is
bitsandbytes' work, on the transformers engine.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Literal

Engine = Literal["transformers", "llama.cpp"]


@dataclass(frozen=True)
class Sizing:
    """How preflight estimates an engine's memory before anything is allocated."""

    gguf_as_stored: bool  # a GGUF file runs quantized (its size is its weights'), not dequantized
    kv_bytes: int | None  # the width of a KV cache element, where the engine fixes it (else the dtype's)


SIZING: dict[Engine, Sizing] = {
    "transformers": Sizing(gguf_as_stored=False, kv_bytes=None),
    "llama.cpp": Sizing(gguf_as_stored=True, kv_bytes=2),  # llama.cpp keeps its KV cache in float16
}

# quant values that quantize dense weights on load rather than pick a GGUF file.
IN_PLACE_QUANTS: dict[str, float] = {"int8": 8.0, "int4": 4.5}  # bits per weight, scales included


@functools.cache
def llama_cpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


@functools.cache
def llama_cpp_offloads() -> bool:
    """Whether this llama-cpp-python was built with a GPU backend (CUDA, Metal, ...)."""
    if not llama_cpp_installed():
        return False
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


@functools.cache
def bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


class EngineRefused(Exception):
    """(kind, detail, suggestion) of a refusal; preflight turns it into its own SourceRefused."""

    def __init__(self, kind: str, detail: str, suggestion: str) -> None:
        super().__init__(detail)
        self.kind, self.detail, self.suggestion = kind, detail, suggestion


LLAMA_INSTALL = "pip install 'cortex-fleet[llamacpp]' on the node (it compiles llama.cpp)"


def choose(wanted: str, *, gguf: bool, device_kind: str, where: str) -> Engine:
    """The engine for a catalogue entry's `engine` setting, or EngineRefused naming the fix."""
    if wanted == "transformers":
        return "transformers"
    usable = llama_cpp_installed() and (device_kind == "cpu" or llama_cpp_offloads())
    if wanted == "auto":
        return "llama.cpp" if gguf and usable else "transformers"
    if not gguf:
        raise EngineRefused(
            "engine_unsupported",
            f"engine = llama.cpp runs GGUF files, but {where} holds dense weights",
            "set engine = auto (or transformers), or point source at a GGUF file",
        )
    if not llama_cpp_installed():
        raise EngineRefused(
            "engine_unavailable",
            "engine = llama.cpp, but llama-cpp-python is not installed on this node",
            f"{LLAMA_INSTALL}, or set engine = auto to run it on transformers",
        )
    if not usable:
        raise EngineRefused(
            "engine_unavailable",
            f"engine = llama.cpp on a {device_kind} device, but this llama-cpp-python was built without GPU support",
            "reinstall it with CMAKE_ARGS=-DGGML_CUDA=on, or set engine = auto to run it on transformers",
        )
    return "llama.cpp"


def check_in_place_quant(quant: str, device_kind: str) -> None:
    """Raises EngineRefused where `quant = int8 | int4` cannot run here."""
    if not bitsandbytes_installed():
        raise EngineRefused(
            "quant_unsupported",
            f"quant = {quant!r} quantizes the weights with bitsandbytes, which is not installed on this node",
            "pip install 'cortex-fleet[quant]' on the node, or remove `quant` to load the weights as they are",
        )
    if device_kind not in ("cpu", "cuda"):
        raise EngineRefused(
            "quant_unsupported",
            f"quant = {quant!r} (bitsandbytes) does not run on {device_kind} devices",
            "remove `quant`, or use a GGUF file of the model with engine = llama.cpp",
        )


def describe() -> str:
    """One line for the neuron's start-up log: which engines this node has."""
    if not llama_cpp_installed():
        return (
            "engines: transformers; llama.cpp is not installed, so GGUF models run on transformers, "
            f"dequantized ({LLAMA_INSTALL})"
        )
    from importlib.metadata import version

    gpu = "with GPU offload" if llama_cpp_offloads() else "CPU only"
    quant = "" if bitsandbytes_installed() else "; int8/int4 need bitsandbytes"
    return f"engines: transformers, llama.cpp (llama-cpp-python {version('llama-cpp-python')}, {gpu}){quant}"
