"""The llama.cpp engine's KV pool: one unified set of cells shared by every sequence of a model.

A sequence that finishes keeps its cells (what it read and wrote), so the next job whose prompt
starts the same way reads that prefix instead of computing it again. A new job takes the
sequence holding the longest common token prefix with its prompt: in place when that sequence
is idle and most of what it holds is reused (only the diverging tail is dropped), otherwise by
sharing its cells from a sequence of its own (llama.cpp's sequence copy tags the same cells
with a second sequence, so a system prompt used by concurrent sessions is held once, and the
conversation that held it first keeps it). Idle sequences give their cells back, least recently used first, when
running ones need room.

This module only keeps the books (which sequence holds which tokens in which cells); the
`Cells` it is given does the work in llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from neuron.engine.prefix import PrefixStats, common_prefix


class Cells(Protocol):
    """llama.cpp's memory API for one context (LlamaCppRuntime)."""

    def remove(self, seq: int, start: int) -> bool:
        """Drops the sequence's cells from position `start` on; False if the model cannot cut there."""
        ...

    def share(self, source: int, target: int, length: int) -> None:
        """The target sequence (empty) takes the source's first `length` cells as its own."""
        ...

    def clear(self) -> None:
        """Empties the pool (every sequence holds nothing already), so the next job's cells start at the
        first one again."""
        ...


@dataclass
class _Sequence:
    seq: int
    tokens: list[int] = field(default_factory=list)  # by position: what its cells hold
    cells: list[int] = field(default_factory=list)  # by position: which cell (our numbering)
    busy: bool = False
    released_at: int = 0


class KvPool:
    def __init__(
        self, cells: Cells, *, sequences: int, capacity: int, bytes_per_token: int, reuse: bool, stats: PrefixStats
    ) -> None:
        """`sequences`: llama.cpp sequence ids (running and kept); `capacity`: cells in the context."""
        self._cells = cells
        self._sequences = [_Sequence(seq) for seq in range(sequences)]
        self.capacity = capacity
        self._bytes_per_token = bytes_per_token
        self._reuse = reuse
        self._stats = stats
        self._refs: dict[int, int] = {}  # cell -> sequences holding it
        self._next_cell = 0
        self._clock = 0

    @property
    def used(self) -> int:
        """Cells holding something (a cell shared by several sequences counts once)."""
        return len(self._refs)

    @property
    def positions(self) -> int:
        """Positions the sequences hold, all told: more than `used` where they share cells."""
        return sum(len(s.tokens) for s in self._sequences)

    def claim(self, prompt: list[int], chain: list[str]) -> tuple[int, int]:
        """A sequence for a new job, holding as much of the prompt as the pool had: (seq, tokens
        reused). At least the prompt's last token is left to compute: its logits start the answer."""
        best, matched = None, 0
        if self._reuse:
            for sequence in self._sequences:
                n = common_prefix(sequence.tokens, prompt)
                if n > matched:
                    best, matched = sequence, n
        reused = min(matched, len(prompt) - 1)
        others = [s for s in self._sequences if not s.busy and s is not best]
        if best is not None and not best.busy and (2 * matched >= len(best.tokens) or not others):
            target = best  # most of what it holds is reused (or no other is free): only its tail goes
            reused = self._cut(target, reused)
        elif not others:
            raise RuntimeError("every llama.cpp sequence is taken; the worker admitted too many jobs")
        else:
            target = min(others, key=lambda s: (bool(s.tokens), s.released_at))  # an empty one, else the oldest
            self._cut(target, 0)
            if best is not None and reused > 0:
                self._cells.share(best.seq, target.seq, reused)
                target.tokens, target.cells = best.tokens[:reused], best.cells[:reused]
                for cell in target.cells:
                    self._refs[cell] += 1
        target.busy = True
        self._stats.started(len(prompt), reused)
        self._stats.mark(target.seq, chain)
        self._report()
        return target.seq, reused

    def fed(self, seq: int, tokens: list[int]) -> None:
        """The sequence's next positions now hold these tokens (a forward pass wrote them)."""
        sequence = self._sequences[seq]
        sequence.tokens.extend(tokens)
        for _ in tokens:
            sequence.cells.append(self._next_cell)
            self._refs[self._next_cell] = 1
            self._next_cell += 1

    def fits(self, tokens: int) -> bool:
        """Whether `tokens` more cells can be had beside what running sequences hold (kept ones giving
        theirs back)."""
        held = {cell for s in self._sequences if s.busy for cell in s.cells}
        return len(held) + tokens <= self.capacity

    def make_room(self, tokens: int) -> bool:
        """Frees cells of idle sequences, least recently used first, until `tokens` more fit."""
        while self.used + tokens > self.capacity:
            kept = [s for s in self._sequences if not s.busy and s.tokens]
            if not kept:
                return False
            oldest = min(kept, key=lambda s: s.released_at)
            self._cut(oldest, 0)
            self._stats.unmark(oldest.seq)
            self._report()
        return True

    def release(self, seq: int, *, keep: bool = True) -> None:
        """The job on `seq` ended: its cells stay for the next prompt that starts alike (unless not `keep`)."""
        sequence = self._sequences[seq]
        sequence.busy = False
        self._clock += 1
        sequence.released_at = self._clock
        if not keep or not self._reuse:
            self._cut(sequence, 0)
            self._stats.unmark(seq)
        if not self._refs:
            # Where a job's cells lie changes the order llama.cpp sums its attention in: an empty pool
            # starts over from the first cell, so that with nothing kept a job answers as it did alone.
            self._cells.clear()
        self._report()

    def clear(self) -> None:
        """Forgets every idle sequence's cells (the model is going, or memory is short)."""
        for sequence in self._sequences:
            if not sequence.busy:
                self._cut(sequence, 0)
                self._stats.unmark(sequence.seq)
        self._report()

    def _cut(self, sequence: _Sequence, start: int) -> int:
        """Drops the sequence's positions from `start` on; returns where it now ends."""
        if start >= len(sequence.tokens):
            return len(sequence.tokens)
        if not self._cells.remove(sequence.seq, start):
            start = 0
            self._cells.remove(sequence.seq, 0)
        for cell in sequence.cells[start:]:
            left = self._refs[cell] - 1
            if left:
                self._refs[cell] = left
            else:
                del self._refs[cell]
        del sequence.tokens[start:], sequence.cells[start:]
        return start

    def _report(self) -> None:
        kept = {cell for s in self._sequences if not s.busy for cell in s.cells}
        self._stats.held(len(kept), len(kept) * self._bytes_per_token)
