"""Incremental detokenization: text deltas that are always whole characters.

Decoding token by token breaks multi-byte characters (one emoji may span several byte-level
tokens) and, for SentencePiece vocabularies, drops the leading space of a word. So each step
decodes a short window and emits only what the window adds, holding back a trailing U+FFFD
until the bytes that complete it arrive.
"""

from __future__ import annotations

from typing import Protocol

_CONTEXT_TOKENS = 5


class _Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: _Decoder, prompt_ids: list[int], drop: frozenset[int] | None = None) -> None:
        """`drop`: the special tokens to leave out of the text; None leaves out every special token."""
        self._tok = tokenizer
        self._drop = drop
        # A few prompt tokens as left context, so the first generated word keeps its space.
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, start: int, end: int | None = None) -> str:
        if self._drop is None:
            return self._tok.decode(self._ids[start:end], skip_special_tokens=True)
        return self._tok.decode([i for i in self._ids[start:end] if i not in self._drop], skip_special_tokens=False)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._decode(self._prefix, self._read)
        after = self._decode(self._prefix)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """What is still held back at the end of generation, less a character cut off by the end."""
        before = self._decode(self._prefix, self._read)
        after = self._decode(self._prefix)
        self._prefix = self._read = len(self._ids)
        return after[len(before) :].rstrip("\ufffd")
