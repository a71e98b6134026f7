"""What a model's prompt cache reports: its size, its hit rate, and the conversations it holds warm.

Each engine keeps its own cache (llama.cpp: cells of a unified KV pool, engine/kv_pool.py;
transformers: blocks of keys and values, engine/prefix_blocks.py) and tells a `PrefixStats`
what it reused, what it holds, and which cache entry holds which job's prefix fingerprints
(cortex.protocol.prefix). The device thread writes; the heartbeat reads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

from cortex.protocol.messages import PrefixCacheStatus

ADVERTISED = 32  # fingerprints per model in a heartbeat (two per cache entry: its first and its last)
# A prompt sharing at least this many tokens with one going in waits to read them (chunking.queue_prompt).
SHARED_MIN_TOKENS = 64
_MB = 2**20


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.prompt_tokens = 0
        self.reused_tokens = 0
        self.tokens = 0
        self.bytes = 0
        self._marks: OrderedDict[Hashable, tuple[str, ...]] = OrderedDict()

    def started(self, prompt_tokens: int, reused: int) -> None:
        self.prompt_tokens += prompt_tokens
        self.reused_tokens += reused

    def held(self, tokens: int, nbytes: int) -> None:
        self.tokens, self.bytes = tokens, nbytes

    def mark(self, entry: Hashable, chain: list[str]) -> None:
        """`entry` now holds the prefix of a job with this fingerprint chain (its first fingerprint: the
        system prompt and tools others share; its last: this very conversation)."""
        if not chain:
            self.unmark(entry)
            return
        with self._lock:
            self._marks[entry] = (chain[0], chain[-1]) if len(chain) > 1 else (chain[0],)
            self._marks.move_to_end(entry)

    def unmark(self, entry: Hashable) -> None:
        with self._lock:
            self._marks.pop(entry, None)

    def clear_marks(self) -> None:
        with self._lock:
            self._marks.clear()

    def status(self) -> PrefixCacheStatus:
        with self._lock:
            marks = list(self._marks.values())
        prefixes: dict[str, None] = {}
        for fingerprints in reversed(marks):
            for fingerprint in reversed(fingerprints):
                prefixes.setdefault(fingerprint)
        prompt, reused = self.prompt_tokens, self.reused_tokens
        return PrefixCacheStatus(
            tokens=self.tokens,
            mb=round(self.bytes / _MB, 1),
            prompt_tokens=prompt,
            reused_tokens=reused,
            hit_rate=round(reused / prompt, 4) if prompt else 0.0,
            prefixes=list(prefixes)[:ADVERTISED],
        )
