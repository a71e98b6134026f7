"""Quickstart figures: seconds from `cortex up` to the first answer, and single-stream decode
speed of the default model through the gateway against plain `model.generate` on the same
weights, in the same run.

    python -m bench quickstart [--runs 5] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from cortex.devstack.natsserver import free_port

PROMPT = [{"role": "user", "content": "Write a long, detailed story about a dragon who learns to bake bread."}]
RESULTS = Path(__file__).parent / "results"


@dataclass
class Run:
    ttft_s: float
    tokens: int
    decode_tok_s: float


def _start_stack(state: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    args = [sys.executable, "-m", "cortex.cli", "up", "--state-dir", str(state), "--listen", f"127.0.0.1:{port}"]
    args += ["--metrics-listen", f"127.0.0.1:{free_port()}", "--nats-port", str(free_port())]
    args += ["--nats-http-port", str(free_port())]
    log = (state / "up.log").open("wb")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT), f"http://127.0.0.1:{port}"


def _first_answer(url: str, proc: subprocess.Popen[bytes], started: float) -> float:
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 8}
    while True:
        if proc.poll() is not None:
            raise SystemExit("cortex up exited before answering")
        try:
            if httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).status_code == 200:
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.1)


def _gateway_run(url: str, max_tokens: int) -> Run:
    body = {
        "model": "smollm2",
        "messages": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    first = last = 0.0
    tokens = 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return Run(first - sent, tokens, (tokens - 1) / (last - first))


class _Baseline:
    """Plain `model.generate` on the same weights, loaded once in this process."""

    def __init__(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from cortex.protocol.catalogue import DEFAULT_MODEL
        from neuron.sources.preflight import preflight
        from neuron.sources.resolve import resolve

        self._torch = torch
        src = resolve(preflight(DEFAULT_MODEL, device_kind="cpu", device_count=1, max_batch=1))
        tok = AutoTokenizer.from_pretrained(str(src.directory), gguf_file=src.gguf_file)
        self._model = AutoModelForCausalLM.from_pretrained(
            str(src.directory), gguf_file=src.gguf_file, dtype=torch.float32
        )
        self._ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)

    def run(self, max_tokens: int) -> Run:
        with self._torch.inference_mode():
            t0 = time.perf_counter()
            self._model.generate(**self._ids, max_new_tokens=1, do_sample=False)
            ttft = time.perf_counter() - t0
            t0 = time.perf_counter()
            gen = self._model.generate(**self._ids, max_new_tokens=max_tokens, do_sample=False)
            total = time.perf_counter() - t0
        n = gen.shape[1] - self._ids["input_ids"].shape[1]
        return Run(ttft, n, (n - 1) / max(total - ttft, 1e-9))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench quickstart")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        started = time.perf_counter()
        proc, url = _start_stack(state)
        try:
            first_answer = _first_answer(url, proc, started)
            baseline = _Baseline()  # loaded while the stack idles, so the runs below can alternate
            baseline.run(8)
            _gateway_run(url, 8)
            # Alternating the two paths spreads this shared machine's drift evenly over both.
            through_gateway, direct = [], []
            for _ in range(args.runs):
                through_gateway.append(_gateway_run(url, args.max_tokens))
                direct.append(baseline.run(args.max_tokens))
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)

    def row(name: str, runs: list[Run]) -> str:
        ttft = statistics.median(r.ttft_s for r in runs) * 1000
        rate = statistics.median(r.decode_tok_s for r in runs)
        return f"| {name} | {statistics.median(r.tokens for r in runs):.0f} | {ttft:.0f} | {rate:.1f} |"

    ratio = statistics.median(r.decode_tok_s for r in through_gateway) / statistics.median(
        r.decode_tok_s for r in direct
    )
    table = "\n".join(
        [
            f"SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32), CPU x{os.cpu_count()}, "
            f"greedy, {args.runs} alternating runs each, medians",
            "",
            f"seconds from `cortex up` to the first answer: {first_answer:.1f}",
            "",
            "| path | tokens | TTFT ms | decode tok/s |",
            "|---|---|---|---|",
            row("gateway -> NATS -> neuron (stream)", through_gateway),
            row("transformers model.generate, in process", direct),
            "",
            f"gateway path decode rate / generate: {ratio:.2f}",
        ]
    )
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quickstart.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
