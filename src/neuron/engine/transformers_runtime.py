"""The transformers engine: a causal LM in torch, its sequences decoded by engine/batch.DecodeBatch."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from neuron.engine.batch import PREFILL_TOKENS, DecodeBatch
from neuron.engine.chunking import PrefillBudget
from neuron.engine.prefix import PrefixStats
from neuron.engine.prefix_blocks import PrefixBlocks
from neuron.engine.runtime import Capabilities

if TYPE_CHECKING:
    from neuron.engine.runtime import LoadedModel

_MB = 2**20


class TransformersRuntime:
    """A transformers model, on one device or spread over several. Used only on its device's
    worker thread (reading its weights to save them is safe elsewhere)."""

    def __init__(self, model: PreTrainedModel, *, max_batch: int, cache_mb: int = 0, prefill_chunk: int = 0) -> None:
        """`cache_mb`: the prefix cache's budget (the plan's KV budget; 0: no prefix cache);
        `prefill_chunk`: prompt tokens per step beside decoding rows (0: sized by chunking.PrefillBudget)."""
        self._model: PreTrainedModel | None = model
        # Decoding several sequences at once, and keeping blocks of a sequence, need a cache whose
        # rows can be padded, stacked and sliced: sliding-window and hybrid ones cannot.
        paddable = _paddable_cache(model)
        self._capabilities = Capabilities("transformers", max_batch if paddable else 1)
        self._weights_mb = _weights_mb(model)
        self.prefix = PrefixStats()
        self.blocks = PrefixBlocks(cache_mb * _MB if paddable else 0, self.prefix)
        # A sliding-window or hybrid cache is not fed in chunks: its prompt goes in whole.
        self.budget = PrefillBudget(PREFILL_TOKENS, prefill_chunk if paddable else PREFILL_TOKENS)

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def weights_mb(self) -> int:
        return self._weights_mb

    @property
    def model(self) -> PreTrainedModel:
        if self._model is None:  # a job outlived its model's unload: it ends here
            raise RuntimeError("the model was unloaded")
        return self._model

    def new_batch(self, model: LoadedModel) -> DecodeBatch:
        return DecodeBatch(model, self)

    def set_threads(self, threads: int) -> None:
        # torch's thread count is the process's, and each thread reads it when it starts a parallel
        # region: the device thread (where this runs) takes it from its next pass on.
        torch.set_num_threads(threads)

    def float_weights(self) -> PreTrainedModel | None:
        return self._model

    def close(self) -> None:
        # Dropping the one reference frees the weights (the caller collects and empties caches).
        self._model = None
        self.blocks.clear()


def _paddable_cache(model: PreTrainedModel) -> bool:
    """Plain growing caches can be padded and stacked into one batch; sliding-window or hybrid ones
    cannot, so such a model decodes one sequence at a time."""
    cache = DynamicCache(config=model.config)
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _weights_mb(model: PreTrainedModel) -> int:
    total = sum(t.numel() * t.element_size() for t in model.parameters())
    total += sum(t.numel() * t.element_size() for t in model.buffers())
    return -(-total // _MB)
