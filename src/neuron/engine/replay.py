"""Replays recorded model outputs instead of sampling: for tests and demos of the tool and
reasoning paths with a model too small (or too random) to call tools by itself.

Everything else stays real: the chat template renders the prompt, the model runs its forward
passes, and the recorded tokens go through detokenization, stop sequences and the output parser.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, TypeAdapter

from cortex.protocol.messages import InferenceJob


class Recording(BaseModel):
    output: str
    when_last: Literal["user", "tool", "assistant", "any"] = "any"


_RECORDINGS = TypeAdapter(list[Recording])


class Replay:
    def __init__(self, recordings: list[Recording], tokenizer: Any, eos_id: int) -> None:
        self._recordings = recordings
        self._tok = tokenizer
        self._eos = eos_id

    @classmethod
    def from_file(cls, path: str, tokenizer: Any, eos_id: int) -> Replay:
        return cls(_RECORDINGS.validate_python(json.loads(Path(path).read_text())), tokenizer, eos_id)

    def tokens(self, job: InferenceJob) -> list[int]:
        """The recorded answer for this conversation (chosen by the role of its last message that is not
        a system turn: Claude Code puts one after the user's), then EOS."""
        turns = [m.role for m in job.messages or [] if m.role != "system"]
        last = turns[-1] if turns else "user"
        for recording in self._recordings:
            if recording.when_last in (last, "any"):
                return [*self._tok(recording.output, add_special_tokens=False)["input_ids"], self._eos]
        return [self._eos]


class ReplaySampler:
    """Stands in for the Sampler: the next recorded token, whatever the logits say."""

    def __init__(self, tokens: list[int]) -> None:
        self._tokens = tokens
        self._at = 0

    def __call__(self, logits: object) -> int:
        token = self._tokens[min(self._at, len(self._tokens) - 1)]
        self._at += 1
        return token

    def seen(self, token: int) -> None:
        """A resumed job's earlier token: the recording goes on after it."""
        self._at += 1
