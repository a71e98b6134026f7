"""What a generation reports to the asyncio side. The job relay turns these into wire events."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cortex.protocol.errors import ErrorCode
from cortex.protocol.messages import TokenLogprob


@dataclass(frozen=True, slots=True)
class Text:
    text: str
    tokens: int
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True, slots=True)
class Reasoning:
    text: str
    tokens: int


@dataclass(frozen=True, slots=True)
class ToolCallPart:
    index: int
    id: str | None
    name: str | None
    arguments: str
    tokens: int


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
