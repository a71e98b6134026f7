"""One job's generation, on the device's worker thread: its prompt, its sampling, and what each
token it gets becomes (text, reasoning, tool calls, stop sequences, the end).

The forward passes are a `Batch`'s (engine/batch.py on transformers, engine/llamacpp.py on
llama.cpp): it feeds the prompt in chunks between decode steps, then one token a step, and hands
each row its logits (`first`, then `advance`). A generation reads its model through `JobModel`, which
engine/runtime.LoadedModel is, so this module needs nothing of the engines.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from functools import cached_property
from typing import Any, Protocol

import torch

from cortex.protocol.errors import ErrorCode
from cortex.protocol.messages import InferenceJob, ModelSpec, TokenLogprob, TopLogprob
from cortex.protocol.prefix import prefix_chain
from neuron.engine.chat import ChatFormat, PromptRejected, Rendered
from neuron.engine.constraint import Constraint, Constraints, GrammarRejected, plan
from neuron.engine.detokenize import IncrementalDetokenizer
from neuron.engine.outputs import Crashed, Finished, FinishReason, Output, Reasoning, Text, ToolCallPart
from neuron.engine.parsing.output import Call, Content, Parsed, Parser, PlainText, Thought
from neuron.engine.parsing.syntax import THINK_OPEN
from neuron.engine.replay import Replay, ReplaySampler
from neuron.engine.sampling import BadLogitBias, Sampler, SamplingDefaults
from neuron.engine.stops import StopMatcher


class JobModel(Protocol):
    """What a generation reads of its loaded model (engine/runtime.LoadedModel)."""

    @property
    def spec(self) -> ModelSpec: ...

    @property
    def tokenizer(self) -> Any: ...  # a transformers tokenizer

    @property
    def device(self) -> torch.device: ...  # where its logits are

    @property
    def context(self) -> int: ...

    @property
    def parallel(self) -> int:
        """Jobs of it that decode at once."""
        ...

    @property
    def eos_ids(self) -> frozenset[int]: ...

    @property
    def sampling(self) -> SamplingDefaults: ...

    @property
    def chat(self) -> ChatFormat: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def replay(self) -> Replay | None: ...

    @property
    def constraints(self) -> Constraints: ...

    def new_batch(self) -> Batch:
        """An empty batch of this model's sequences, on its engine."""
        ...


class Batch(Protocol):
    """The sequences of one loaded model; used only on its device's worker thread.

    A batch takes new jobs (`add`), then steps: each step feeds the next chunk of the prompts going
    in and one token of every row decoding; a prompt wholly in gets its first token and decodes from
    the next step on. Jobs that finish leave at once; a job's own failure ends that job only.
    """

    @property
    def model(self) -> JobModel: ...

    @property
    def rows(self) -> list[Generation]:
        """The jobs decoding."""
        ...

    @property
    def jobs(self) -> list[Generation]:
        """Every job it holds: decoding, and with prompts going in."""
        ...

    @property
    def batchable(self) -> bool:
        """Whether it takes more than one job."""
        ...

    def __len__(self) -> int:
        """Jobs it holds (`jobs`)."""
        ...

    def can_join(self, gen: Generation) -> bool: ...

    def add(self, gens: list[Generation]) -> None:
        """Takes new jobs (renders their prompts); a prompt that cannot run ends its own job."""
        ...

    def step(self) -> None:
        """One step: prompt chunks in, a token for every row decoding; jobs that finish leave."""
        ...

    def fail(self, exc: BaseException) -> None:
        """The batch's forward pass failed: every job ends with the error."""
        ...


def encode_prompt(job: InferenceJob, model: JobModel) -> Rendered:
    rendered = model.chat.render(job)
    if len(rendered.ids) >= model.context:
        raise PromptRejected(
            f"the prompt is {len(rendered.ids)} tokens; model {model.spec.id} takes at most {model.context - 1} "
            "so that one token can be generated; shorten the prompt"
        )
    return rendered


class Generation:
    def __init__(self, job: InferenceJob, model: JobModel, sink: Callable[[Output], None]) -> None:
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
        self._reused = 0
        self.tokens: list[int] = []  # the prompt's, then each one sampled
        self._last = 0
        self._emitted_tokens = 0
        self._logprobs: list[TokenLogprob] = []
        self._parser: Parser = PlainText()
        self._constraint: Constraint | None = None
        self._resuming = False  # taking a resumed job's earlier tokens (InferenceJob.resume)

    @property
    def prompt_tokens(self) -> int:
        """Known once started (prefilled)."""
        return self._prompt_len

    @cached_property
    def prefix_chain(self) -> list[str]:
        """The job's prefix fingerprints (cortex.protocol.prefix), which its cache entry advertises."""
        return prefix_chain(self.job)

    def reused(self, tokens: int) -> None:
        """The batch found the prompt's first `tokens` in the model's prefix cache: they were not computed."""
        self._reused = tokens

    def cancel(self) -> None:
        """Thread-safe: the worker sees it before the next token."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def start(self) -> list[int] | None:
        """Renders the prompt and readies sampling; the prompt's ids, or None if the job ended here."""
        self.state = "running"
        self._prefill_at = time.perf_counter()
        try:
            rendered = encode_prompt(self.job, self.model)
            self._sampler: Sampler | ReplaySampler = Sampler(
                self.job.sampling, self.model.sampling, self.model.device, self.model.vocab_size
            )
            self._constraint = self._constrain(rendered)
        except (PromptRejected, BadLogitBias, GrammarRejected) as exc:
            self._crash(ErrorCode.invalid_request, str(exc))
            return None
        ids = rendered.ids
        if self.model.replay is not None:
            self._sampler = ReplaySampler(self.model.replay.tokens(self.job))
        self._prompt_len = len(ids)
        self.tokens = list(ids)
        self._parser = rendered.parser
        self._resuming = bool(self.job.resume)  # a continuation: the client has what the template prefilled
        self._send(rendered.prefilled)
        self._detok = IncrementalDetokenizer(self.model.tokenizer, ids, self.model.chat.drop_ids)
        self._stops = StopMatcher(self.job.sampling.stop)
        self._resume(self.job.resume or [])
        return None if self.finished else list(self.tokens)

    def _resume(self, generated: list[int]) -> None:
        """Takes the tokens an earlier try generated as if sampled here, silently: the detokenizer,
        stop matcher, parser, grammar and penalties end up as they were there, so what follows
        continues the client's answer with nothing repeated or missing."""
        try:
            for token in generated:
                self._sampler.seen(token)
                self._accept(token)
                if self.finished:  # it had ended there; only its end was lost
                    break
        finally:
            self._resuming = False

    def _constrain(self, rendered: Rendered) -> Constraint | None:
        """The job's grammar, compiled now (a schema the library cannot take ends the job before any
        forward pass); none for a replayed model, whose tokens are recorded, not sampled."""
        chat = self.model.chat
        if self.model.replay is not None:
            return None
        syntax = chat.syntax if chat.syntax_known else None
        wanted = plan(self.job, syntax, chat.reasons, rendered.text.rstrip().endswith(THINK_OPEN))
        return Constraint(wanted, self.model.constraints) if wanted else None

    def first(self, logits: torch.Tensor) -> None:
        """The prompt's last logits, from the prefill: the first token."""
        self._decode_at = time.perf_counter()
        self._accept(self._sample(logits))

    def check(self) -> bool:
        """Before a decode step: ends the job if it was cancelled or passed its deadline. True: go on."""
        if self._cancel.is_set():
            self._finish("cancelled", None)
        elif self.job.deadline is not None and time.time() > self.job.deadline:
            self._crash(ErrorCode.timeout, f"job {self.job.job_id} passed its deadline")
        return not self.finished

    @property
    def next_input(self) -> int:
        """The token the next decode step feeds in: the last one sampled."""
        return self._last

    @property
    def position(self) -> int:
        """The position of `next_input` in the sequence."""
        return self._prompt_len + self.generated - 1

    def advance(self, logits: torch.Tensor) -> None:
        """One decode step's logits for this sequence: sample, detokenize, report."""
        self._accept(self._sample(logits))

    def fail(self, exc: BaseException) -> None:
        self._crash(ErrorCode.internal, f"generation failed: {type(exc).__name__}: {exc}")

    def _sample(self, logits: torch.Tensor) -> int:
        token = self._sampler(self._constraint.mask(logits) if self._constraint else logits)
        if self.job.sampling.logprobs is not None:
            self._logprobs.append(self._logprob(logits, token, self.job.sampling.logprobs))
        return token

    def _logprob(self, logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
        """The model's own distribution (before temperature and the other sampling settings)."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        alternatives = []
        if top:
            values, ids = torch.topk(logprobs, top)
            alternatives = [self._top(int(i), float(v)) for v, i in zip(values, ids, strict=True)]
        chosen = self._top(token, float(logprobs[token]))
        return TokenLogprob(**chosen.model_dump(), top_logprobs=alternatives)

    def _top(self, token: int, logprob: float) -> TopLogprob:
        text = self.model.tokenizer.decode([token])
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    def _accept(self, token: int) -> None:
        self.generated += 1
        self._last = token
        self.tokens.append(token)
        if not self._first_at and not self._resuming:
            self._first_at = time.perf_counter()
        if token in self.model.eos_ids:
            self._emit(self._stops.push(self._detok.flush())[0] + self._stops.flush(), final=True)
            self._finish("stop", None)
            return
        piece = self._detok.push(token)
        if self._constraint is not None:
            self._constraint.accept(token, piece)
        text, matched = self._stops.push(piece)
        if matched is not None:
            self._emit(text, final=True)
            self._finish("stop", matched)
            return
        self._emit(text)
        if self._parser.ended:  # the one call a request without parallel tool calls may make
            self._emit("", final=True)
            self._finish("stop", None)
        elif self.generated >= self.job.sampling.max_tokens or self._prompt_len + self.generated >= self.model.context:
            tail, matched = self._stops.push(self._detok.flush())
            self._emit(tail + ("" if matched else self._stops.flush()), final=True)
            self._finish("stop" if matched else "length", matched)

    def _emit(self, text: str, final: bool = False) -> None:
        pieces = self._parser.push(text) if text else []
        if final:
            pieces += self._parser.finish()
        self._send(pieces)

    def _send(self, pieces: list[Parsed]) -> None:
        # Tokens that produced nothing yet (a partial character, a possible stop or marker) are
        # counted into the next piece, so the pieces' tokens add up to what was generated.
        for piece in pieces:
            start, self._emitted_tokens = self._emitted_tokens, self.generated
            if self._resuming:
                continue  # the client has this text from the try that generated it
            ids = tuple(self.tokens[self._prompt_len + start : self._prompt_len + self.generated])
            if isinstance(piece, Content):
                logprobs, self._logprobs = (self._logprobs or None), []
                self._sink(Text(piece.text, ids, logprobs))
            elif isinstance(piece, Thought):
                self._logprobs = []  # logprobs describe the answer's tokens only
                self._sink(Reasoning(piece.text, ids))
            elif isinstance(piece, Call):
                self._logprobs = []
                self._sink(ToolCallPart(piece.index, piece.id, piece.name, piece.arguments, ids))

    def _finish(self, reason: FinishReason, stop: str | None) -> None:
        now = time.perf_counter()
        first = self._first_at or now
        self.finished = True
        if reason == "stop" and stop is None and self._parser.calls:
            reason = "tool_calls"
        self._sink(
            Finished(
                finish_reason=reason,
                stop_sequence=stop,
                prompt_tokens=self._prompt_len,
                cached_tokens=self._reused,
                completion_tokens=self.generated,
                queue_ms=_ms(self._accepted_at, self._prefill_at or now),
                prefill_ms=_ms(self._prefill_at or now, self._decode_at or now),
                decode_ms=_ms(self._decode_at or now, now),
                ttft_ms=_ms(self._accepted_at, first),
            )
        )

    def _crash(self, code: ErrorCode, message: str) -> None:
        self.finished = True
        self._sink(Crashed(code, message))


def _ms(start: float, end: float) -> float:
    return round(max(end - start, 0.0) * 1000.0, 3)
