"""Continuous batching: the sequences of one model decode together, one forward pass a step.

Jobs that arrive together are prefilled together (prompts left-padded to the longest, one
forward pass, each its first token), then join the running batch at the next step and leave
it the step they finish, so nobody waits for the slowest. The batch keeps one KV cache for all
its rows, right-aligned: a row shorter than the longest is padded on the left, and the
attention mask hides the padding. Each row samples from its own logits with its own settings
(temperature, seed, stops, max_tokens, tool-call parsing).

A prompt that starts like an earlier sequence reads that prefix's keys and values from the
model's prefix cache (engine/prefix_blocks.py) and computes only the rest, in a pass of its own;
each row's blocks are stored when it leaves. The padded layout gives every row its own copy of
its past, so rows of one batch do not share cached memory: the cache holds one copy of a prefix,
and each row that reads it copies it in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from neuron.engine.generation import Generation
from neuron.engine.prefix import waves
from neuron.engine.prefix_blocks import LayerKV, PrefixBlocks
from neuron.engine.runtime import LoadedModel

log = logging.getLogger(__name__)
# The most prompt tokens (padding included) one prefill pass takes: its activations must fit
# beside the weights, and every decoding row waits for it.
PREFILL_TOKENS = 4096


class Weights(Protocol):
    """What a DecodeBatch runs its passes on (a TransformersRuntime, which makes the batches)."""

    @property
    def model(self) -> PreTrainedModel:
        """The model; raises once the weights are freed."""
        ...

    @property
    def blocks(self) -> PrefixBlocks:
        """The model's prefix cache."""
        ...


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """[B, H, L, D] -> [B, H, length, D], zeros in front."""
    return F.pad(t, (0, 0, length - t.shape[-2], 0)) if t.shape[-2] < length else t


def _similar_lengths(prompts: list[tuple[Generation, list[int]]]) -> list[list[tuple[Generation, list[int]]]]:
    """Prompts (sorted by length) in groups whose padding stays small (a long prompt is not padded
    into many short ones' forward pass, nor they into its) and whose size stays under PREFILL_TOKENS."""
    groups: list[list[tuple[Generation, list[int]]]] = []
    for prompt in prompts:
        group = groups[-1] if groups else None
        padded = len(prompt[1]) * (len(group or []) + 1)  # sorted: this prompt is the group's longest
        if (
            group is not None
            and padded <= PREFILL_TOKENS
            and padded <= 2 * sum(len(ids) for _, ids in [*group, prompt]) + 64
        ):
            group.append(prompt)
        else:
            groups.append([prompt])
    return groups


def _filled(cache: DynamicCache) -> list[tuple[DynamicLayer, torch.Tensor, torch.Tensor]]:
    """Each layer of a batch's cache, with its keys and values. Only a cache of plain growing layers
    (see TransformersRuntime) ever holds more than one row, so only such a one is merged or sliced."""
    filled = []
    for layer in cache.layers:
        assert isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None
        filled.append((layer, layer.keys, layer.values))
    return filled


def each_row(gens: list[Generation], action: Callable[[Generation, int], None]) -> None:
    """Runs action(gen, row) for each row; a row's own failure (its sampling, its parser) ends
    that row, not the batch."""
    for row, gen in enumerate(gens):
        try:
            action(gen, row)
        except Exception as exc:
            log.exception("job %s failed on the device thread", gen.job.job_id)
            gen.fail(exc)


class DecodeBatch:
    """The running sequences of one transformers model (the `Batch` of engine/runtime.py)."""

    def __init__(self, model: LoadedModel, runtime: Weights) -> None:
        self.model = model
        self._runtime = runtime
        self._blocks = runtime.blocks
        self.rows: list[Generation] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [B, L]: 1 where a row has a real token
        self.batchable = model.parallel > 1

    def __len__(self) -> int:
        return len(self.rows)

    def can_join(self, gen: Generation) -> bool:
        return gen.model is self.model and (not self.rows or self.batchable)

    def prefill(self, gens: list[Generation]) -> None:
        """Feeds the new sequences' prompts and gives each its first token: a prompt with a cached
        prefix alone, from where the prefix ends; the others in forward passes of similar lengths
        (left-padded to the longest of each group); prompts sharing a prefix in rounds (prefix.waves).
        A pass that fails ends its own jobs only; the batch is left as it was."""
        prompts = sorted(((gen, ids) for gen in gens if (ids := gen.start()) is not None), key=lambda p: len(p[1]))
        running = self._mask.shape[1] * len(self.rows) if self._mask is not None else 0
        self._blocks.make_room((running + sum(len(ids) for _, ids in prompts)) * self._blocks.bytes_per_token)
        for wave in waves(prompts) if self._blocks.enabled else [prompts]:
            self._prefill_wave(wave)

    def _prefill_wave(self, prompts: list[tuple[Generation, list[int]]]) -> None:
        fresh = []
        for gen, ids in prompts:
            cached = self._blocks.lookup(ids) if self._blocks.enabled else []
            if cached:
                self._run(self._prefill_cached, [(gen, ids)], self._blocks.past(cached))
            else:
                fresh.append((gen, ids))
        for group in _similar_lengths(fresh):
            self._run(self._prefill, group)

    def _run(self, prefill: Callable[..., None], prompts: list[tuple[Generation, list[int]]], *args: LayerKV) -> None:
        try:
            prefill(prompts, *args)
        except Exception as exc:
            log.exception("the prefill of %d jobs of %s failed", len(prompts), self.model.spec.id)
            for gen, _ in prompts:
                if not gen.finished:
                    gen.fail(exc)

    def _forward(self, **inputs: Any) -> Any:
        """A forward pass. Out of device memory while the prefix cache holds some, the cache goes first
        (before any job fails, and long before the gateway would evict a model) and the pass runs again."""
        try:
            return self._runtime.model(**inputs)
        except torch.OutOfMemoryError:
            if not self._blocks.bytes:
                raise
            log.warning(
                "%s is out of device memory: dropping its prefix cache (%d MB) and trying again",
                self.model.spec.id,
                self._blocks.bytes // 2**20,
            )
            self._blocks.clear()
            if self.model.device.type == "cuda":
                torch.cuda.empty_cache()
            return self._runtime.model(**inputs)

    def _prefill_cached(self, prompts: list[tuple[Generation, list[int]]], past: LayerKV) -> None:
        """One prompt whose first tokens' keys and values are `past`: computes the rest."""
        [(gen, ids)] = prompts
        device = self.model.device
        lm = self._runtime.model
        reused = past[0][0].shape[-2]
        cache = DynamicCache(config=lm.config)
        for layer, (keys, values) in zip(cache.layers, past, strict=True):
            assert isinstance(layer, DynamicLayer)  # only such a cache keeps blocks (TransformersRuntime)
            layer.update(keys, values)  # blocks stay on their layer's device (a model over several GPUs)
        out = self._forward(
            input_ids=torch.tensor([ids[reused:]], device=device),
            position_ids=torch.arange(reused, len(ids), device=device).unsqueeze(0),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        gen.reused(reused)
        self._blocks.stats.started(len(ids), reused)
        self._store(gen, ids, [(keys[0], values[0]) for _, keys, values in _filled(out.cache)])
        each_row([gen], lambda gen, _: gen.first(out.logits[0, -1]))
        self._join([gen], out.cache, torch.ones(1, len(ids), dtype=torch.long, device=device))

    def _prefill(self, prompts: list[tuple[Generation, list[int]]]) -> None:
        device = self.model.device
        length = max(len(ids) for _, ids in prompts)
        input_ids = torch.zeros(len(prompts), length, dtype=torch.long, device=device)
        mask = torch.zeros(len(prompts), length, dtype=torch.long, device=device)
        for row, (_, ids) in enumerate(prompts):
            input_ids[row, length - len(ids) :] = torch.tensor(ids, device=device)
            mask[row, length - len(ids) :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        lm = self._runtime.model
        out = self._forward(
            input_ids=input_ids,
            attention_mask=mask if len(prompts) > 1 else None,
            position_ids=positions,
            cache=DynamicCache(config=lm.config),
            use_cache=True,
            logits_to_keep=1,
        )
        gens = [gen for gen, _ in prompts]
        if self._blocks.enabled:
            layers = _filled(out.cache)
            for row, (gen, ids) in enumerate(prompts):
                self._store(
                    gen,
                    ids,
                    [
                        (keys[row, :, length - len(ids) :], values[row, :, length - len(ids) :])
                        for _, keys, values in layers
                    ],
                )
        for _, ids in prompts:
            self._blocks.stats.started(len(ids), 0)
        each_row(gens, lambda gen, row: gen.first(out.logits[row, -1]))
        self._join(gens, out.cache, mask)

    def _store(self, gen: Generation, ids: list[int], kv: LayerKV) -> None:
        self._blocks.store(ids, kv, gen.prefix_chain)

    def _join(self, gens: list[Generation], cache: DynamicCache, mask: torch.Tensor) -> None:
        if self._cache is None or self._mask is None:
            self.rows, self._cache, self._mask = gens, cache, mask
        else:
            # Every new tensor is built before any is assigned: a failure (out of memory, say) leaves
            # the batch as it was.
            length = max(self._mask.shape[1], mask.shape[1])
            layers = _filled(self._cache)
            merged = [
                (
                    torch.cat([_left_pad(my_keys, length), _left_pad(their_keys, length)]),
                    torch.cat([_left_pad(my_values, length), _left_pad(their_values, length)]),
                )
                for (_, my_keys, my_values), (_, their_keys, their_values) in zip(layers, _filled(cache), strict=True)
            ]
            joined = torch.cat(
                [F.pad(self._mask, (length - self._mask.shape[1], 0)), F.pad(mask, (length - mask.shape[1], 0))]
            )
            for (layer, _, _), (keys, values) in zip(layers, merged, strict=True):
                layer.keys, layer.values = keys, values
            self._mask, self.rows = joined, [*self.rows, *gens]
        self._keep([not gen.finished for gen in self.rows])

    def step(self) -> None:
        """One token for every row still going; rows that finish leave."""
        self._keep([gen.check() for gen in self.rows])
        if not self.rows:
            return
        assert self._cache is not None and self._mask is not None
        device = self.model.device
        input_ids = torch.tensor([[gen.next_input] for gen in self.rows], device=device)
        positions = torch.tensor([[gen.position] for gen in self.rows], device=device)
        mask = torch.cat([self._mask, torch.ones(len(self.rows), 1, dtype=torch.long, device=device)], dim=1)
        self._blocks.make_room(mask.numel() * self._blocks.bytes_per_token)  # the rows grow into the budget
        out = self._forward(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            cache=self._cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self._cache, self._mask = out.cache, mask
        logits = out.logits[:, -1]
        each_row(self.rows, lambda gen, row: gen.advance(logits[row]))
        self._keep([not gen.finished for gen in self.rows])

    def fail(self, exc: BaseException) -> None:
        """The batch's forward pass failed: every row ends with the error."""
        for gen in self.rows:
            gen.fail(exc)
        self.rows, self._cache, self._mask = [], None, None

    def _keep(self, keep: list[bool]) -> None:
        if all(keep):
            return
        assert self._cache is not None and self._mask is not None
        if self._blocks.enabled:
            self._store_leaving([row for row, k in enumerate(keep) if not k])
        rows = [gen for gen, k in zip(self.rows, keep, strict=True) if k]
        if not rows:
            self.rows, self._cache, self._mask = [], None, None
            return
        kept = [i for i, k in enumerate(keep) if k]
        layers = _filled(self._cache)
        # One index per device: a model spread over several GPUs keeps each layer's cache where it is.
        index: dict[torch.device, torch.Tensor] = {}
        for t in (self._mask, *(keys for _, keys, _ in layers)):
            if t.device not in index:
                index[t.device] = torch.tensor(kept, device=t.device)
        mask = self._mask[index[self._mask.device]]
        # Columns that are padding in every row left with the rows that went: drop them.
        start = int((mask.sum(dim=0) > 0).nonzero()[0])
        sliced = [
            (keys[index[keys.device], :, start:], values[index[keys.device], :, start:]) for _, keys, values in layers
        ]
        for (layer, _, _), (keys, values) in zip(layers, sliced, strict=True):
            layer.keys, layer.values = keys, values
        self.rows, self._mask = rows, mask[:, start:]

    def _store_leaving(self, leaving: list[int]) -> None:
        """Stores the blocks of rows that leave: their prompt and what they generated (all but the
        last token, which no pass has fed yet), for the conversation's next turn."""
        assert self._cache is not None and self._mask is not None
        layers = _filled(self._cache)
        for row in leaving:
            gen = self.rows[row]
            fed = gen.tokens[:-1] if gen.generated else gen.tokens
            held = int(self._mask[row].sum())
            if held != len(fed) or not fed:
                continue  # a row that failed midway: what its cache holds is not known
            self._store(gen, fed, [(keys[row, :, -held:], values[row, :, -held:]) for _, keys, values in layers])
