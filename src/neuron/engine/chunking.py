"""Chunked prefill: how many prompt tokens one step may feed beside the rows that are decoding.

A long prompt fed whole stops every running stream of its model (and of the other models on
its device) for as long as it takes: seconds to minutes on a CPU. Both engines feed prompts in
chunks between decode steps instead, and a `PrefillBudget` sizes each chunk so that a step with
one takes at most `STALL_RATIO` times a step without: a running stream's worst gap between two
tokens stays a few times its usual one, while the prompt still goes in as fast as that allows.
With nothing decoding, a step feeds as much as the engine takes in one pass.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

from neuron.engine.generation import Generation
from neuron.engine.prefix import SHARED_MIN_TOKENS, common_prefix

# A step that feeds prompt tokens may take this many times a decode-only step.
STALL_RATIO = 4.0
# The fewest prompt tokens a step feeds. Small: far into a long prompt, one prompt token (its
# attention reads every token before it) costs about what a decode step of a few rows does.
MIN_CHUNK = 8
_SMOOTHING = 0.3  # weight of the newest measurement in the running estimates

S = TypeVar("S")


@dataclass(eq=False)
class Prompt(Generic[S]):
    """A job whose prompt is going in, a chunk a step; `slot` is where its keys and values go
    (the engine's: a llama.cpp sequence, a transformers cache), once it has started."""

    gen: Generation
    ids: list[int]
    after: list[tuple[Prompt[S], int]]  # earlier prompts sharing a prefix with this one, and its length
    slot: S | None = None
    at: int = 0  # the next position to feed
    reused: int = 0  # positions read from the prefix cache
    resumed: bool = False  # a job that stepped back (the cache was full): its tokens so far go in again

    @property
    def left(self) -> int:
        return len(self.ids) - self.at

    def waits(self) -> bool:
        """Whether an earlier prompt is still computing what this one will read from the cache."""
        return any(other.at < shared and not other.gen.finished for other, shared in self.after)


def queue_prompt(queue: list[Prompt[S]], gen: Generation, ids: list[int], shares: bool = True) -> None:
    """Appends a new prompt. One sharing SHARED_MIN_TOKENS or more with an earlier one (where
    `shares`) waits until that one has computed the shared part, then reads it from the cache:
    eight sessions starting at once on one system prompt compute it once."""
    after = [(p, n) for p in queue if (n := common_prefix(p.ids, ids)) >= SHARED_MIN_TOKENS] if shares else []
    queue.append(Prompt(gen, ids, after))


class PrefillBudget:
    """One model's chunk sizing; used on its device's worker thread only."""

    def __init__(self, most: int, fixed: int = 0) -> None:
        """`most`: the engine's largest pass; `fixed`: a chunk size that overrides the estimate (0: none)."""
        self.most = most
        self.fixed = min(fixed, most)
        self._step_s = 0.0  # a decode-only step
        self._token_s = 0.0  # one prompt token more in a step

    def tokens(self, decoding: int) -> int:
        """Prompt tokens the next step may feed while `decoding` rows decode in it."""
        if not decoding:
            return self.most
        if self.fixed:
            return self.fixed
        if not self._step_s or not self._token_s:
            return MIN_CHUNK  # measured on the first steps, then sized
        chunk = int((STALL_RATIO - 1.0) * self._step_s / self._token_s)
        return max(MIN_CHUNK, min(chunk, self.most))

    @contextmanager
    def timed(self, decoding: int, fed: int) -> Iterator[None]:
        """Times one step of `decoding` rows and `fed` prompt tokens, and updates the estimates."""
        start = time.perf_counter()
        yield
        self.measured(decoding, fed, time.perf_counter() - start)

    def measured(self, decoding: int, fed: int, seconds: float) -> None:
        if not fed:
            if decoding:
                self._step_s = _smooth(self._step_s, seconds)
            return
        # A prompt token's cost grows with its position (attention reads every earlier one): the
        # running estimate follows a long prompt as it goes in.
        extra = seconds - (self._step_s if decoding else 0.0)
        self._token_s = _smooth(self._token_s, max(extra, 0.0) / fed)


def _smooth(estimate: float, value: float) -> float:
    return value if not estimate else (1.0 - _SMOOTHING) * estimate + _SMOOTHING * value
