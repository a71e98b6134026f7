"""The transformers engine's prefix cache: keys and values of past prompts, in blocks of tokens.

A sequence's tokens are cut into blocks of BLOCK_TOKENS; block i is found by a hash of block i-1's
key and its own tokens, so a block stands for the whole prefix up to its end (as in vLLM's
automatic prefix caching). At prefill, a prompt's longest run of cached blocks is read back as
its past, and only the rest is computed; when a sequence leaves its batch, its blocks (prompt and
answer) are stored. The store is bounded by the model's KV budget, less what running sequences
take, and gives way least recently used first, the descendants of a block before the block.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from neuron.engine.prefix import PrefixStats

BLOCK_TOKENS = 32

# Per layer: keys and values, each [kv_heads, tokens, head_dim].
LayerKV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class _Block:
    key: int
    parent: int | None
    tokens: tuple[int, ...]
    kv: LayerKV
    nbytes: int


class PrefixBlocks:
    def __init__(self, capacity_bytes: int, stats: PrefixStats) -> None:
        self.capacity = capacity_bytes
        self.stats = stats
        self._blocks: OrderedDict[int, _Block] = OrderedDict()  # least recently used first
        self.bytes = 0
        self.bytes_per_token = 0  # known once a block is stored

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def lookup(self, ids: list[int]) -> list[_Block]:
        """The cached blocks that begin `ids`, leaving at least its last token to compute."""
        found: list[_Block] = []
        parent: int | None = None
        for start in range(0, len(ids) - 1 - BLOCK_TOKENS + 1, BLOCK_TOKENS):
            tokens = tuple(ids[start : start + BLOCK_TOKENS])
            block = self._blocks.get(hash((parent, tokens)))
            if block is None or block.tokens != tokens or block.parent != parent:
                break
            found.append(block)
            parent = block.key
        self._touch([block.key for block in found])
        return found

    @staticmethod
    def past(blocks: list[_Block]) -> LayerKV:
        """The blocks' keys and values joined, per layer, as one row: [1, kv_heads, tokens, head_dim]."""
        layers = len(blocks[0].kv)
        return [
            (
                torch.cat([b.kv[layer][0] for b in blocks], dim=1).unsqueeze(0),
                torch.cat([b.kv[layer][1] for b in blocks], dim=1).unsqueeze(0),
            )
            for layer in range(layers)
        ]

    def store(self, ids: list[int], kv: LayerKV, chain: list[str]) -> None:
        """Keeps the whole blocks of a sequence whose keys and values (per layer [kv_heads, len(ids),
        head_dim]) are `kv`; `chain`: its job's prefix fingerprints, advertised while its last block stays."""
        if not self.enabled:
            return
        keys: list[int] = []
        parent: int | None = None
        for start in range(0, len(ids) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
            tokens = tuple(ids[start : start + BLOCK_TOKENS])
            key = hash((parent, tokens))
            if key not in self._blocks:
                part = [
                    (k[:, start : start + BLOCK_TOKENS].clone(), v[:, start : start + BLOCK_TOKENS].clone())
                    for k, v in kv
                ]
                nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in part)
                self._blocks[key] = _Block(key, parent, tokens, part, nbytes)
                self.bytes += nbytes
                self.bytes_per_token = nbytes // BLOCK_TOKENS
            keys.append(key)
            parent = key
        if keys:
            self.stats.mark(keys[-1], chain)
        self._touch(keys)
        self.make_room(0)

    def make_room(self, nbytes: int) -> None:
        """Drops blocks, least recently used first, until `nbytes` more fit in the budget."""
        while self._blocks and self.bytes + nbytes > self.capacity:
            key, block = self._blocks.popitem(last=False)
            self.bytes -= block.nbytes
            self.stats.unmark(key)
        self._report()

    def clear(self) -> None:
        self._blocks.clear()
        self.bytes = 0
        self.stats.clear_marks()
        self._report()

    def _touch(self, keys: list[int]) -> None:
        # The first block of a run ends most recent: it goes last, after everything that hangs from it.
        for key in reversed(keys):
            self._blocks.move_to_end(key)

    def _report(self) -> None:
        self.stats.held(len(self._blocks) * BLOCK_TOKENS, self.bytes)
