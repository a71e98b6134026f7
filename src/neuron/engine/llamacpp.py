"""The llama.cpp engine: GGUF weights run as stored (quantized), several sequences per step.

llama-cpp-python's low-level bindings give one llama_context per loaded model with
`n_seq_max` sequences, each with its own slice of the KV cache (`context` tokens). A step feeds
one token of every running sequence in one llama_batch and reads each sequence's logits
back; new prompts are fed the same way, several per batch. Everything else about a job
(chat template, tokenizer, sampling, detokenization, stops, tool-call parsing) is the shared
Generation's, so both engines answer alike; only the forward passes differ.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Any

import numpy as np
import torch

from neuron.engine.batch import each_row
from neuron.engine.generation import Generation
from neuron.engine.runtime import Capabilities, LoadedModel

log = logging.getLogger(__name__)

# Prompt tokens per llama_decode call; llama.cpp splits it further into micro-batches.
PREFILL_TOKENS = 2048
_MB = 2**20


def _llama() -> Any:
    import llama_cpp

    return llama_cpp


_log_callback: Any = None


def _route_logs() -> None:
    """llama.cpp prints to stderr by default; its warnings and errors go to our log instead."""
    global _log_callback
    if _log_callback is not None:
        return
    llama_cpp = _llama()
    callback = llama_cpp.llama_log_callback(_log_line)
    _log_callback = callback  # kept alive: llama.cpp holds a pointer to it
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def _log_line(level: int, text: bytes, _: ctypes.c_void_p) -> None:
    if level in (3, 4) and text.strip():  # GGML_LOG_LEVEL_WARN, _ERROR
        level = logging.WARNING if level == 3 else logging.ERROR
        log.log(level, "llama.cpp: %s", text.decode(errors="replace").strip())


def decode_threads() -> int:
    """Physical cores: a decode step is bound by memory bandwidth, and hyperthreads only contend."""
    import psutil

    return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)


class LlamaCppRuntime:
    """One GGUF file in llama.cpp: the weights, a context of `sequences` x `context` tokens, and
    which sequence slots are free. Used only on its device's worker thread."""

    def __init__(self, path: str, *, context: int, sequences: int, gpu_layers: int, threads: int) -> None:
        llama_cpp = _llama()
        from llama_cpp import _internals

        _route_logs()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = gpu_layers
        # llama-cpp-python's own objects (an optional extra, typed or not depending on its version).
        self._model: Any = _internals.LlamaModel(path_model=path, params=params, verbose=False)
        try:
            ctx = llama_cpp.llama_context_default_params()
            ctx.n_ctx = context * sequences
            ctx.n_seq_max = sequences
            ctx.kv_unified = False  # each sequence gets its own `context` tokens
            ctx.n_batch = min(PREFILL_TOKENS, ctx.n_ctx)
            ctx.n_ubatch = min(512, ctx.n_batch)
            ctx.n_threads = ctx.n_threads_batch = threads
            self._ctx: Any = _internals.LlamaContext(model=self._model, params=ctx, verbose=False)
        except Exception:
            self._model.close()
            raise
        self.n_vocab: int = self._model.n_vocab()
        self.n_batch = int(ctx.n_batch)
        self.weights_bytes: int = self._model.size()
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._free = list(range(sequences))
        self._capabilities = Capabilities("llama.cpp", sequences)

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def weights_mb(self) -> int:
        return -(-self.weights_bytes // _MB)

    def new_batch(self, model: LoadedModel) -> LlamaBatch:
        return LlamaBatch(model, self)

    def float_weights(self) -> None:
        return None  # llama.cpp runs the file's own quantized weights: nothing dequantized to save

    def take_sequence(self) -> int:
        if not self._free:
            raise RuntimeError("every llama.cpp sequence slot is taken; the worker admitted too many jobs")
        return self._free.pop()

    def release_sequence(self, seq: int) -> None:
        """Forgets the sequence's KV cache and frees its slot."""
        if self._batch is not None:  # after close, the context and its cache are gone
            _llama().llama_memory_seq_rm(self._ctx.memory, seq, -1, -1)
        self._free.append(seq)

    def decode(self, tokens: list[tuple[int, int, int, bool]]) -> None:
        """One forward pass over (token, position, sequence, wants logits) entries, at most n_batch."""
        batch = self._batch
        if batch is None:  # a job outlived its model's unload: it ends, where native code would crash
            raise RuntimeError("the model was unloaded")
        for i, (token, position, seq, logits) in enumerate(tokens):
            batch.token[i], batch.pos[i] = token, position
            batch.seq_id[i][0], batch.n_seq_id[i] = seq, 1
            batch.logits[i] = logits
        batch.n_tokens = len(tokens)
        code = _llama().llama_decode(self._ctx.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode failed with code {code} ({'no KV cache slot' if code == 1 else 'error'})")

    def logits(self, i: int) -> torch.Tensor:
        """The logits of the last decode's entry i. A view: valid until the next decode."""
        pointer = _llama().llama_get_logits_ith(self._ctx.ctx, i)
        return torch.from_numpy(np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)))

    def close(self) -> None:
        if self._batch is None:
            return  # closed already
        _llama().llama_batch_free(self._batch)
        self._batch = None
        self._ctx.close()
        self._model.close()


class LlamaBatch:
    """The running sequences of one llama.cpp model (the `Batch` of engine/runtime.py)."""

    batchable = True

    def __init__(self, model: LoadedModel, runtime: LlamaCppRuntime) -> None:
        self.model = model
        self._llama = runtime
        self.rows: list[Generation] = []
        self._seqs: dict[int, int] = {}  # id(generation) -> its sequence slot

    def __len__(self) -> int:
        return len(self.rows)

    def can_join(self, gen: Generation) -> bool:
        return gen.model is self.model

    def prefill(self, gens: list[Generation]) -> None:
        """Feeds the new prompts, several per llama_decode call, and gives each its first token."""
        started = []
        for gen in gens:
            ids = gen.start()
            if ids is not None:
                self._seqs[id(gen)] = self._llama.take_sequence()
                started.append((gen, ids))
        entries = [
            (token, position, self._seqs[id(gen)], position == len(ids) - 1, gen)
            for gen, ids in started
            for position, token in enumerate(ids)
        ]
        try:
            for start in range(0, len(entries), self._llama.n_batch):
                chunk = entries[start : start + self._llama.n_batch]
                self._llama.decode([entry[:4] for entry in chunk])
                ends = {id(gen): i for i, (*_, last, gen) in enumerate(chunk) if last}

                def first(gen: Generation, _: int, ends: dict[int, int] = ends) -> None:
                    gen.first(self._llama.logits(ends[id(gen)]))

                each_row([gen for gen, _ in started if id(gen) in ends], first)
        except Exception as exc:
            log.exception("the prefill of %d jobs of %s failed", len(started), self.model.spec.id)
            for gen, _ in started:
                if not gen.finished:
                    gen.fail(exc)
        self.rows.extend(gen for gen, _ in started)
        self._keep([not gen.finished for gen in self.rows])

    def step(self) -> None:
        """One token for every row still going; rows that finish leave."""
        self._keep([gen.check() for gen in self.rows])
        if not self.rows:
            return
        self._llama.decode([(gen.next_input, gen.position, self._seqs[id(gen)], True) for gen in self.rows])
        each_row(self.rows, lambda gen, row: gen.advance(self._llama.logits(row)))
        self._keep([not gen.finished for gen in self.rows])

    def fail(self, exc: BaseException) -> None:
        for gen in self.rows:
            gen.fail(exc)
        self._keep([False] * len(self.rows))

    def _keep(self, keep: list[bool]) -> None:
        for gen, k in zip(list(self.rows), keep, strict=True):
            if not k:
                self._llama.release_sequence(self._seqs.pop(id(gen)))
        self.rows = [gen for gen, k in zip(self.rows, keep, strict=True) if k]
