"""One job's generation: prefill once, then one token per `step()`, on the device's worker thread.

Kept step-wise (not one `model.generate` call) so the worker can interleave jobs, check the
cancel flag between tokens, and so a batching scheduler can later replace the stepping.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch
from transformers import DynamicCache

from cortex.protocol.errors import ErrorCode
from cortex.protocol.messages import ChatMessage, InferenceJob
from neuron.engine.detokenize import IncrementalDetokenizer
from neuron.engine.outputs import Crashed, Finished, Output, Text
from neuron.engine.sampling import Sampler
from neuron.engine.stops import StopMatcher
from neuron.sources.loader import LoadedModel


class PromptTooLong(ValueError):
    pass


def tokenize_prompt(messages: list[ChatMessage] | None, prompt: str | None, model: LoadedModel) -> list[int]:
    """The prompt's token ids: chat messages through the model's own chat template, a raw prompt as it is."""
    tok = model.tokenizer
    if messages is not None:
        turns = [m.model_dump(exclude_none=True) for m in messages]
        return list(tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=False))
    return list(tok(prompt, add_special_tokens=True)["input_ids"])


def encode_prompt(job: InferenceJob, model: LoadedModel) -> list[int]:
    ids = tokenize_prompt(job.messages, job.prompt, model)
    if len(ids) >= model.context:
        raise PromptTooLong(
            f"the prompt is {len(ids)} tokens; model {model.spec.id} takes at most {model.context - 1} "
            "so that one token can be generated; shorten the prompt"
        )
    return ids


class Generation:
    def __init__(self, job: InferenceJob, model: LoadedModel, sink: Callable[[Output], None]) -> None:
        self.job = job
        self.model = model
        self.generated = 0
        self.finished = False
        self.state = "queued"
        self._sink = sink
        self._cancel = threading.Event()
        self._accepted_at = time.perf_counter()
        self._prefill_at = 0.0
        self._first_at = 0.0
        self._decode_at = 0.0
        self._prompt_len = 0
        self._last = 0
        self._emitted_tokens = 0
        self._cache: DynamicCache | None = None

    def cancel(self) -> None:
        """Thread-safe: the worker sees it before the next token."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def prefill(self) -> None:
        self.state = "running"
        self._prefill_at = time.perf_counter()
        try:
            ids = encode_prompt(self.job, self.model)
        except PromptTooLong as exc:
            self._crash(ErrorCode.invalid_request, str(exc))
            return
        self._prompt_len = len(ids)
        self._detok = IncrementalDetokenizer(self.model.tokenizer, ids)
        self._stops = StopMatcher(self.job.sampling.stop)
        self._sampler = Sampler(self.job.sampling, self.model.sampling, self.model.device)
        self._cache = DynamicCache()
        logits = self._forward(torch.tensor([ids], device=self.model.device))
        self._decode_at = time.perf_counter()
        self._accept(self._sampler(logits))

    def step(self) -> None:
        if self._cancel.is_set():
            self._finish("cancelled", None)
            return
        if self.job.deadline is not None and time.time() > self.job.deadline:
            self._crash(ErrorCode.timeout, f"job {self.job.job_id} passed its deadline")
            return
        logits = self._forward(torch.tensor([[self._last]], device=self.model.device))
        self._accept(self._sampler(logits))

    def fail(self, exc: BaseException) -> None:
        self._crash(ErrorCode.internal, f"generation failed: {type(exc).__name__}: {exc}")

    def _forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # logits_to_keep=1: the prefill needs the last position's logits only.
        out = self.model.model(input_ids=input_ids, cache=self._cache, use_cache=True, logits_to_keep=1)
        self._cache = out.cache
        return out.logits[0, -1]

    def _accept(self, token: int) -> None:
        self.generated += 1
        self._last = token
        if self.generated == 1:
            self._first_at = time.perf_counter()
        if token in self.model.eos_ids:
            self._emit(self._stops.push(self._detok.flush())[0] + self._stops.flush())
            self._finish("stop", None)
            return
        text, matched = self._stops.push(self._detok.push(token))
        self._emit(text)
        if matched is not None:
            self._finish("stop", matched)
        elif self.generated >= self.job.sampling.max_tokens or self._prompt_len + self.generated >= self.model.context:
            tail, matched = self._stops.push(self._detok.flush())
            self._emit(tail + ("" if matched else self._stops.flush()))
            self._finish("stop" if matched else "length", matched)

    def _emit(self, text: str) -> None:
        # Tokens that produced no text yet (a partial character, a possible stop) are counted
        # into the next delta, so the deltas' token counts add up to `generated`.
        if text:
            self._sink(Text(text, self.generated - self._emitted_tokens))
            self._emitted_tokens = self.generated

    def _finish(self, reason: str, stop: str | None) -> None:
        now = time.perf_counter()
        first = self._first_at or now
        self.finished = True
        self._cache = None
        self._sink(
            Finished(
                finish_reason=reason,  # type: ignore[arg-type]
                stop_sequence=stop,
                prompt_tokens=self._prompt_len,
                completion_tokens=self.generated,
                queue_ms=_ms(self._accepted_at, self._prefill_at or now),
                prefill_ms=_ms(self._prefill_at or now, self._decode_at or now),
                decode_ms=_ms(self._decode_at or now, now),
                ttft_ms=_ms(self._accepted_at, first),
            )
        )

    def _crash(self, code: ErrorCode, message: str) -> None:
        self.finished = True
        self._cache = None
        self._sink(Crashed(code, message))


def _ms(start: float, end: float) -> float:
    return round(max(end - start, 0.0) * 1000.0, 3)
