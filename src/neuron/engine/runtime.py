"""The engine seam: a loaded model and the `Runtime` that runs its forward passes, making the
`Batch`es (engine/generation.py) of its sequences decoding together.

Everything about a job that is not a forward pass (chat template, tokenizer, sampling,
detokenization, stops, tool-call parsing) is the shared Generation's, so both engines answer
alike. What differs between engines is behind two protocols: a `Runtime` (one per loaded model:
transformers' `TransformersRuntime`, llama.cpp's `LlamaCppRuntime`) makes `Batch`es
(`DecodeBatch`, `LlamaBatch`) and frees the weights. The device worker and the model table
talk only to these; which runtime a catalogue's `engine` name gets is decided once, by the
loader (neuron.sources.loader).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from cortex.protocol.messages import ModelSpec
from neuron.engine.backends import Engine
from neuron.engine.chat import ChatFormat
from neuron.engine.constraint import Constraints
from neuron.engine.generation import Batch
from neuron.engine.prefix import PrefixStats
from neuron.engine.replay import Replay
from neuron.engine.sampling import SamplingDefaults

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class EngineOptions:
    """How a node runs every model it loads (neuron.toml)."""

    max_batch: int = 1  # jobs of a model decoding at once
    prefix_cache: bool = True  # keep past prompts' keys and values for reuse (within the plan's KV budget)
    prefill_chunk: int = 0  # prompt tokens a step feeds beside decoding rows (0: sized by chunking.PrefillBudget)
    threads: int = 0  # CPU threads of its forward passes (0: the host's cores; see neuron.cpu_share)


DEFAULT_OPTIONS = EngineOptions()


@dataclass(frozen=True)
class Capabilities:
    """What a runtime can do with its model, as the node reports it and the worker uses it."""

    engine: Engine  # its name, as the catalogue and the heartbeat spell it
    parallel: int  # sequences it decodes at once (1: each job decodes alone)


class Runtime(Protocol):
    """A model's weights in one engine; used only on its device's worker thread."""

    @property
    def capabilities(self) -> Capabilities: ...

    @property
    def prefix(self) -> PrefixStats:
        """Its prompt cache's figures (written on the worker thread, read anywhere)."""
        ...

    @property
    def weights_mb(self) -> int:
        """The memory its weights take (the KV cache is the plan's estimate, added by the loader)."""
        ...

    def new_batch(self, model: LoadedModel) -> Batch:
        """An empty batch of `model`'s sequences (`model` is the LoadedModel around this runtime)."""
        ...

    def set_threads(self, threads: int) -> None:
        """The CPU threads its forward passes run on, from the next one on."""
        ...

    def close(self) -> None:
        """Frees the weights; safe to call twice. A batch still holding them fails its next pass."""
        ...

    def float_weights(self) -> PreTrainedModel | None:
        """The live model as plain float weights that can be saved as a model folder, where this
        runtime holds it so (transformers, after dequantizing a GGUF file); None otherwise or once
        closed. Only read: safe off the device thread."""
        ...


@dataclass
class LoadedModel:
    spec: ModelSpec
    runtime: Runtime
    tokenizer: Any  # a transformers tokenizer (read from the GGUF file under llama.cpp)
    device: torch.device  # where its logits are
    context: int
    eos_ids: frozenset[int]
    memory_mb: int
    sampling: SamplingDefaults
    chat: ChatFormat
    vocab_size: int  # the logits' width: what a logit_bias token id must stay under
    replay: Replay | None = None
    convert_to: Path | None = None  # where to save the dequantized weights, if not done yet
    from_cache: bool = False

    @cached_property
    def constraints(self) -> Constraints:
        """Compiles this model's grammars (structured outputs); its tokenizer's index is built on first use."""
        return Constraints(self.tokenizer, self.vocab_size, self.eos_ids)

    @property
    def engine(self) -> Engine:
        return self.runtime.capabilities.engine

    @property
    def parallel(self) -> int:
        return self.runtime.capabilities.parallel

    def new_batch(self) -> Batch:
        return self.runtime.new_batch(self)
