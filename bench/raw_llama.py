"""llama.cpp with nothing around it: the low-level API (llama-cpp-python's bindings), greedy
decoding of N sequences in one llama_batch a step, argmax in numpy. What our engine's per-token
path is measured against (bench/node.py)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def raw_decode(gguf: Path, prompt: list[int], sequences: int, tokens: int, threads: int) -> float:
    """Tokens per second, all sequences together, decoding `tokens` tokens each after their prompt
    (prefilled first, not timed)."""
    import llama_cpp
    from llama_cpp import _internals

    from neuron.engine.llamacpp import _route_logs

    _route_logs()  # llama.cpp's own log goes to ours (warnings only), not to stderr
    params = llama_cpp.llama_model_default_params()
    model = _internals.LlamaModel(path_model=str(gguf), params=params, verbose=False)
    ctx_params = llama_cpp.llama_context_default_params()
    ctx_params.n_ctx = (len(prompt) + tokens + 8) * sequences
    ctx_params.n_seq_max = sequences
    ctx_params.kv_unified = True
    ctx_params.n_batch = ctx_params.n_ubatch = max(512, sequences)
    ctx_params.n_threads = ctx_params.n_threads_batch = threads
    ctx = _internals.LlamaContext(model=model, params=ctx_params, verbose=False)
    n_vocab = model.n_vocab()
    batch = llama_cpp.llama_batch_init(max(512, sequences), 0, 1)

    def decode(entries: list[tuple[int, int, int, bool]]) -> None:
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.seq_id[i][0], batch.n_seq_id[i], batch.logits[i] = (
                token,
                pos,
                seq,
                1,
                logits,
            )
        batch.n_tokens = len(entries)
        assert llama_cpp.llama_decode(ctx.ctx, batch) == 0

    def argmax(i: int) -> int:
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx.ctx, i), shape=(n_vocab,))))

    try:
        nexts = []
        for seq in range(sequences):
            decode([(t, p, seq, p == len(prompt) - 1) for p, t in enumerate(prompt)])
            nexts.append(argmax(len(prompt) - 1))
        start = time.perf_counter()
        for step in range(tokens):
            decode([(nexts[seq], len(prompt) + step, seq, True) for seq in range(sequences)])
            nexts = [argmax(seq) for seq in range(sequences)]
        return sequences * tokens / (time.perf_counter() - start)
    finally:
        llama_cpp.llama_batch_free(batch)
        ctx.close()
        model.close()
