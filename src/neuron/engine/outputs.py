"""What a generation reports to the asyncio side. The job relay turns these into wire events."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

from cortex.protocol.errors import ErrorCode
from cortex.protocol.messages import TokenLogprob


class _Piece:
    """A piece of the answer covers the generated tokens `ids` (those that produced nothing of
    their own yet count into the next piece): with them a job can resume on another node."""

    __slots__ = ()
    ids: tuple[int, ...]

    @property
    def tokens(self) -> int:
        return len(self.ids)


@dataclass(frozen=True, slots=True)
class Text(_Piece):
    text: str
    ids: tuple[int, ...]
    logprobs: list[TokenLogprob] | None = None

    def then(self, later: Text) -> Text:
        """This piece and the next as one."""
        logprobs = None
        if self.logprobs is not None or later.logprobs is not None:
            logprobs = [*(self.logprobs or []), *(later.logprobs or [])]
        return Text(self.text + later.text, self.ids + later.ids, logprobs)


@dataclass(frozen=True, slots=True)
class Reasoning(_Piece):
    text: str
    ids: tuple[int, ...]

    def then(self, later: Reasoning) -> Reasoning:
        return Reasoning(self.text + later.text, self.ids + later.ids)


@dataclass(frozen=True, slots=True)
class ToolCallPart(_Piece):
    index: int
    id: str | None
    name: str | None
    arguments: str
    ids: tuple[int, ...]


FinishReason = Literal["stop", "length", "tool_calls", "cancelled"]


@dataclass(frozen=True, slots=True)
class Finished:
    finish_reason: FinishReason
    stop_sequence: str | None
    prompt_tokens: int
    cached_tokens: int  # of prompt_tokens, read from the prefix cache
    completion_tokens: int
    queue_ms: float
    prefill_ms: float
    decode_ms: float
    ttft_ms: float


@dataclass(frozen=True, slots=True)
class Crashed:
    code: ErrorCode
    message: str


Output = Text | Reasoning | ToolCallPart | Finished | Crashed


def coalesced(ready: deque[Output]) -> Output:
    """Takes the first output ready, with the pieces of the same kind right behind it joined to it
    (pieces a busy event loop finds waiting together go out as one message)."""
    first = ready.popleft()
    while ready:
        later = ready[0]
        if isinstance(first, Text) and isinstance(later, Text):
            first = first.then(later)
        elif isinstance(first, Reasoning) and isinstance(later, Reasoning):
            first = first.then(later)
        else:
            break
        ready.popleft()
    return first
