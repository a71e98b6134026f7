"""The llama.cpp engine: GGUF weights run as stored (quantized), several sequences per step.

llama-cpp-python's low-level bindings give one llama_context per loaded model, its KV cache one
unified pool of `context x max_batch` cells shared by all its sequences (engine/kv_pool.py keeps
the books: a finished sequence's cells stay, and the next prompt that starts alike reuses them).
A step feeds one token of every running sequence in one llama_batch, with the next chunk of the
prompts going in (from where their cached prefix ends; engine/chunking.py sizes the chunk so
running streams keep going), and reads each sequence's logits back. Everything else about a job
(chat template, tokenizer, sampling, detokenization, stops, tool-call parsing) is the shared
Generation's, so both engines answer alike; only the forward passes differ.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

import numpy as np
import torch

from neuron.engine.batch import each_row
from neuron.engine.chunking import PrefillBudget, Prompt, queue_prompt
from neuron.engine.generation import Generation
from neuron.engine.kv_pool import KvPool
from neuron.engine.prefix import PrefixStats
from neuron.engine.runtime import Capabilities, LoadedModel

log = logging.getLogger(__name__)

# Prompt tokens per llama_decode call; llama.cpp splits it further into micro-batches.
PREFILL_TOKENS = 2048
# Sequences beyond the running ones, each keeping a finished conversation's cells for its next turn.
KEPT_SEQUENCES = 16
# Jobs decoding at once, at most: a batched step costs little more per row on a CPU, far less on a GPU.
MAX_PARALLEL = 64
_MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ
_MB = 2**20


def parallel(cells: int, context: int, max_batch: int) -> int:
    """Jobs decoding at once in a pool of `cells`: as many as it holds of the usual job (half a context,
    up to 2,048 tokens: a prompt and its answer), at least `max_batch`. A job that needs more cells
    than are free waits (or steps back, to be computed again later: LlamaBatch), so none fails."""
    usual = max(1, min(2048, context // 2))
    return max(max_batch, min(cells // usual, MAX_PARALLEL))


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


class LlamaCppRuntime:
    """One GGUF file in llama.cpp: the weights, a context of `cells` shared by its sequences, and the
    pool's books. Used only on its device's worker thread."""

    def __init__(
        self,
        path: str,
        *,
        cells: int,
        sequences: int,
        gpu_layers: int,
        threads: int,
        kv_mb: int,
        prefix_cache: bool = True,
        prefill_chunk: int = 0,
    ) -> None:
        """`cells`: the pool's size in tokens; `sequences`: jobs decoding at once; `kv_mb`: what the
        pool's cells take (the plan's estimate);
        `prefill_chunk`: prompt tokens per step beside decoding rows (0: sized by chunking.PrefillBudget)."""
        llama_cpp = _llama()
        from llama_cpp import _internals

        _route_logs()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = gpu_layers
        # llama-cpp-python's own objects (an optional extra, typed or not depending on its version).
        self._model: Any = _internals.LlamaModel(path_model=path, params=params, verbose=False)
        try:
            ctx = llama_cpp.llama_context_default_params()
            ctx.n_ctx = cells
            ctx.n_seq_max = min(sequences + KEPT_SEQUENCES, _MAX_SEQUENCES)
            ctx.kv_unified = True  # one pool: cells are shared between sequences, and kept after a job
            ctx.n_batch = min(PREFILL_TOKENS, ctx.n_ctx)
            ctx.n_ubatch = min(512, ctx.n_batch)
            ctx.n_threads = ctx.n_threads_batch = threads
            self._ctx: Any = _internals.LlamaContext(model=self._model, params=ctx, verbose=False)
        except Exception:
            self._model.close()
            raise
        self.n_vocab: int = self._model.n_vocab()
        self.n_batch = int(ctx.n_batch)
        self.budget = PrefillBudget(self.n_batch, prefill_chunk)
        self.weights_bytes: int = self._model.size()
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._capabilities = Capabilities("llama.cpp", sequences)
        self.prefix = PrefixStats()
        self.pool = KvPool(
            self,
            sequences=int(ctx.n_seq_max),
            capacity=cells,
            bytes_per_token=kv_mb * _MB // cells,
            reuse=prefix_cache,
            stats=self.prefix,
        )

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

    def remove(self, seq: int, start: int) -> bool:
        """(kv_pool.Cells) Drops the sequence's cells from `start` on."""
        if self._batch is None:  # after close, the context and its cache are gone
            return True
        return bool(_llama().llama_memory_seq_rm(self._ctx.memory, seq, start, -1))

    def clear(self) -> None:
        """(kv_pool.Cells) Empties the context's cache."""
        if self._batch is not None:
            _llama().llama_memory_clear(self._ctx.memory, True)

    def share(self, source: int, target: int, length: int) -> None:
        """(kv_pool.Cells) In a unified pool a copy tags the same cells with `target`: nothing is copied."""
        if self._batch is not None:
            _llama().llama_memory_seq_cp(self._ctx.memory, source, target, 0, length)

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

    def set_threads(self, threads: int) -> None:
        if self._batch is not None:
            _llama().llama_set_n_threads(self._ctx.ctx, threads, threads)

    def close(self) -> None:
        if self._batch is None:
            return  # closed already
        _llama().llama_batch_free(self._batch)
        self._batch = None
        self._ctx.close()
        self._model.close()


class LlamaBatch:
    """The running sequences of one llama.cpp model (the `Batch` of engine/runtime.py).

    Each step is one llama_decode: a token of every decoding row, and as many prompt tokens of
    the jobs being prefilled as the model's PrefillBudget allows beside them (all it takes in one
    pass when nothing decodes); a prompt whose last token went in gets its first token and decodes
    from the next step on."""

    batchable = True

    def __init__(self, model: LoadedModel, runtime: LlamaCppRuntime) -> None:
        self.model = model
        self._llama = runtime
        self._pool = runtime.pool
        self._budget = runtime.budget
        self.rows: list[Generation] = []
        self._prompts: list[Prompt[int]] = []
        self._seqs: dict[int, int] = {}  # id(generation) -> its sequence, for the decoding rows

    def __len__(self) -> int:
        return len(self.rows) + len(self._prompts)

    @property
    def jobs(self) -> list[Generation]:
        return [*self.rows, *(prompt.gen for prompt in self._prompts)]

    def can_join(self, gen: Generation) -> bool:
        return gen.model is self.model

    def add(self, gens: list[Generation]) -> None:
        """Takes new jobs; their prompts go in over the next steps (chunking.queue_prompt)."""
        for gen in gens:
            if (ids := gen.start()) is not None:
                queue_prompt(self._prompts, gen, ids)

    def step(self) -> None:
        """One pass: a token for every decoding row, and the next chunk of the prompts going in."""
        self._keep([gen.check() for gen in self.rows])
        self._drop_ended_prompts()
        while self.rows and not self._pool.make_room(len(self.rows)):
            self._step_back(self.rows[-1])
        decoding = [(gen.next_input, gen.position, self._seqs[id(gen)], True) for gen in self.rows]
        room = min(self._budget.tokens(len(decoding)), self._llama.n_batch - len(decoding))
        feeding = self._chunk(room, len(decoding))
        fed = sum(n for _, _, n in feeding)
        if not decoding and not fed:
            return
        entries = list(decoding)
        for prompt, seq, n in feeding:
            last = -1 if prompt.resumed else len(prompt.ids) - 1  # a resumed job has its next token
            entries += [(prompt.ids[p], p, seq, p == last) for p in range(prompt.at, prompt.at + n)]
        with self._budget.timed(len(decoding), fed):
            self._llama.decode(entries)
            for token, _, seq, _ in decoding:
                self._pool.fed(seq, [token])
            each_row(self.rows, lambda gen, row: gen.advance(self._llama.logits(row)))
            self._feed(feeding, len(decoding))
        self._keep([not gen.finished for gen in self.rows])

    def _chunk(self, room: int, decoding: int) -> list[tuple[Prompt[int], int, int]]:
        """The prompts this step feeds, with their sequence and how many tokens of each, in their order
        of arrival. A
        prompt starts once the pool can hold all of it beside what the running jobs hold (the first
        that cannot holds back those behind it), and a chunk goes in only where its cells can be had."""
        feeding = []
        planned = decoding
        for prompt in self._prompts:
            if room <= 0:
                break
            seq = prompt.slot
            if seq is None:
                if prompt.waits():
                    continue
                if not self._pool.fits(planned + len(prompt.ids)):
                    break
                seq, reused = self._pool.claim(prompt.ids, prompt.gen.prefix_chain)
                prompt.slot, prompt.at = seq, reused
                if not prompt.resumed:
                    prompt.gen.reused(reused)
            n = min(room, prompt.left)
            if not self._pool.make_room(planned + n):
                break
            feeding.append((prompt, seq, n))
            room -= n
            planned += n
        return feeding

    def _feed(self, feeding: list[tuple[Prompt[int], int, int]], offset: int) -> None:
        """Books the chunks the pass wrote; a prompt now wholly in takes its first token (a resumed job
        has it already) and decodes."""
        done: list[tuple[Generation, int]] = []
        resumed: list[Generation] = []
        for prompt, seq, n in feeding:
            self._pool.fed(seq, prompt.ids[prompt.at : prompt.at + n])
            prompt.at += n
            offset += n
            if prompt.left:
                continue
            self._seqs[id(prompt.gen)] = seq
            if prompt.resumed:
                resumed.append(prompt.gen)
            else:
                done.append((prompt.gen, offset - 1))
        if done or resumed:
            ends = dict(done)
            self._prompts = [p for p in self._prompts if p.left]
            each_row([gen for gen, _ in done], lambda gen, _: gen.first(self._llama.logits(ends[gen])))
            self.rows.extend([*resumed, *(gen for gen, _ in done)])

    def _step_back(self, gen: Generation) -> None:
        """The pool is full and the running jobs need another cell each: the youngest steps back. Its
        cells are kept like a finished job's (those the others need go first), and it goes in again,
        first in line, from what is still cached: its output goes on as if it had not stopped."""
        log.info("the KV pool of %s is full: job %s steps back, to go on later", self.model.spec.id, gen.job.job_id)
        self.rows.remove(gen)
        self._pool.release(self._seqs.pop(id(gen)))
        fed = gen.tokens[:-1]  # the last token sampled is not in the cache yet: it goes in at the next step
        self._prompts.insert(0, Prompt(gen, fed, [], resumed=True))

    def _drop_ended_prompts(self) -> None:
        """Prompts of jobs cancelled (or past their deadline) while going in leave; what went in stays cached."""
        for prompt in self._prompts:
            if not prompt.gen.check() and prompt.slot is not None:
                self._pool.release(prompt.slot)
        self._prompts = [p for p in self._prompts if not p.gen.finished]

    def fail(self, exc: BaseException) -> None:
        seqs = [*self._seqs.values(), *(p.slot for p in self._prompts if p.slot is not None)]
        for gen in self.jobs:
            if not gen.finished:
                gen.fail(exc)
        for seq in seqs:
            self._pool.release(seq, keep=False)  # what its cells hold is unknown
        self.rows, self._prompts, self._seqs = [], [], {}

    def _keep(self, keep: list[bool]) -> None:
        for gen, k in zip(list(self.rows), keep, strict=True):
            if not k:
                self._pool.release(self._seqs.pop(id(gen)))
        self.rows = [gen for gen, k in zip(self.rows, keep, strict=True) if k]
