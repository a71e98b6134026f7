"""Continuous batching: the sequences of one model decode together, one forward pass a step.

Short prompts that arrive together are prefilled together (left-padded to the longest, one
forward pass, each its first token); a long one goes in a chunk a step beside the decoding rows
(engine/chunking.py), so running streams keep going. Each joins the running batch at the next
step and leaves it the step it finishes, so nobody waits for the slowest. The batch keeps one KV cache for all
its rows, right-aligned: a row shorter than the longest is padded on the left, and the
attention mask hides the padding. Each row samples from its own logits with its own settings
(temperature, seed, stops, max_tokens, tool-call parsing).

A prompt that starts like an earlier sequence reads that prefix's keys and values from the
model's prefix cache (engine/prefix_blocks.py) and computes only the rest, in passes of its own;
each row's blocks are stored when it leaves. The padded layout gives every row its own copy of
its past, so rows of one batch do not share cached memory: the cache holds one copy of a prefix,
and each row that reads it copies it in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from neuron.engine.chunking import PrefillBudget, Prompt, queue_prompt
from neuron.engine.generation import Generation
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

    @property
    def budget(self) -> PrefillBudget:
        """How many prompt tokens a step feeds beside the decoding rows."""
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
    """The sequences of one transformers model (the `Batch` of engine/runtime.py).

    Each step decodes a token of every row (one forward pass), then feeds the prompts going in, as
    many tokens as the model's PrefillBudget allows beside the rows (all of them when none decode):
    short new prompts that fit whole go in together, left-padded in passes of similar lengths; a
    long one, or one whose prefix is cached, goes in a chunk a pass into a cache of its own, from
    where its cached prefix ends. A prompt wholly in gets its first token and joins the rows."""

    def __init__(self, model: LoadedModel, runtime: Weights) -> None:
        self.model = model
        self._runtime = runtime
        self._blocks = runtime.blocks
        self._budget = runtime.budget
        self.rows: list[Generation] = []
        self._prompts: list[Prompt[DynamicCache]] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [B, L]: 1 where a row has a real token
        self.batchable = model.parallel > 1

    def __len__(self) -> int:
        return len(self.rows) + len(self._prompts)

    @property
    def jobs(self) -> list[Generation]:
        return [*self.rows, *(prompt.gen for prompt in self._prompts)]

    def can_join(self, gen: Generation) -> bool:
        return gen.model is self.model and (not self or self.batchable)

    def add(self, gens: list[Generation]) -> None:
        """Takes new jobs; their prompts go in over the next steps (chunking.queue_prompt)."""
        for gen in gens:
            if (ids := gen.start()) is not None:
                queue_prompt(self._prompts, gen, ids, shares=self._blocks.enabled)
        running = self._mask.shape[1] * len(self.rows) if self._mask is not None else 0
        waiting = sum(prompt.left for prompt in self._prompts)
        self._blocks.make_room((running + waiting) * self._blocks.bytes_per_token)

    def step(self) -> None:
        """One step: a token for every row decoding, then the next chunk of the prompts going in."""
        self._keep([gen.check() for gen in self.rows])
        self._prompts = [prompt for prompt in self._prompts if prompt.gen.check()]
        decoding = len(self.rows)
        room = self._budget.tokens(decoding)
        start = time.perf_counter()
        if self.rows:
            self._decode()
        fed = self._feed(room)
        self._budget.measured(decoding, fed, time.perf_counter() - start)

    def _feed(self, room: int) -> int:
        """Feeds up to `room` prompt tokens, in the prompts' order of arrival; returns how many."""
        whole: list[Prompt[DynamicCache]] = []
        fed = 0
        for prompt in list(self._prompts):
            if fed >= room:
                break
            if prompt.slot is None:
                if prompt.waits():
                    continue
                cached = self._blocks.lookup(prompt.ids) if self._blocks.enabled else []
                if not cached and len(prompt.ids) <= room - fed:
                    whole.append(prompt)
                    fed += len(prompt.ids)
                    continue
                past = self._blocks.past(cached) if cached else []
                prompt.slot = self._new_cache(past)
                prompt.at = prompt.reused = past[0][0].shape[-2] if past else 0
                prompt.gen.reused(prompt.reused)
            n = min(room - fed, prompt.left)
            self._run(self._chunk, [(prompt.gen, prompt.ids)], prompt, n)
            fed += n
        for group in _similar_lengths(sorted(((p.gen, p.ids) for p in whole), key=lambda p: len(p[1]))):
            self._run(self._prefill, group)
        for prompt in whole:  # in: a prompt waiting on one of these reads its blocks from the next step on
            prompt.at = len(prompt.ids)
        self._prompts = [prompt for prompt in self._prompts if prompt.left and not prompt.gen.finished]
        return fed

    def _run(self, prefill: Callable[..., None], prompts: list[tuple[Generation, list[int]]], *args: Any) -> None:
        """A prefill pass; one that fails ends its own jobs only, and the batch is left as it was."""
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

    def _new_cache(self, past: LayerKV) -> DynamicCache:
        """A cache of one row holding `past` (a cached prefix's keys and values), or nothing."""
        cache = DynamicCache(config=self._runtime.model.config)
        for layer, (keys, values) in zip(cache.layers, past, strict=False):
            assert isinstance(layer, DynamicLayer)  # only such a cache keeps blocks (TransformersRuntime)
            layer.update(keys, values)  # blocks stay on their layer's device (a model over several GPUs)
        return cache

    def _chunk(self, prompts: list[tuple[Generation, list[int]]], prompt: Prompt[DynamicCache], n: int) -> None:
        """The next `n` tokens of one prompt into its own cache; once it is all in, its first token."""
        assert prompt.slot is not None
        gen, ids, at = prompt.gen, prompt.ids, prompt.at
        device = self.model.device
        out = self._forward(
            input_ids=torch.tensor([ids[at : at + n]], device=device),
            position_ids=torch.arange(at, at + n, device=device).unsqueeze(0),
            cache=prompt.slot,
            use_cache=True,
            logits_to_keep=1,
        )
        prompt.at += n
        if prompt.left:
            return
        self._blocks.stats.started(len(ids), prompt.reused)
        if self._blocks.enabled:
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

    def _decode(self) -> None:
        """One token for every row; rows that finish leave."""
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
        """The batch's forward pass failed: every job ends with the error."""
        for gen in self.jobs:
            if not gen.finished:
                gen.fail(exc)
        self.rows, self._prompts, self._cache, self._mask = [], [], None, None

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
