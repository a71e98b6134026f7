"""Cold starts: request -> first token for the default model when it is not loaded anywhere.

Three cases, one stack (nats-server, one neuron, one gateway), one run:
  cold      the first load ever: the GGUF is dequantized by transformers
  repeated  unloaded, then asked for again: the dequantized weights come from the converted cache
  warm      already loaded (and past its first request): for reference

    python -m bench coldstart [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.stack import wait_for
from cortex import natsserver

MODEL = "smollm2"
PROMPT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
RESULTS = Path(__file__).parent / "results"


def _spawn(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT, env=env)


def _first_token_s(url: str) -> float:
    body = {"model": MODEL, "messages": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True}
    sent = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    return time.perf_counter() - sent
    raise SystemExit(f"no token came back: {resp.status_code}")


def _unload(url: str) -> None:
    httpx.post(f"{url}/admin/models/unload", json={"model": MODEL}, timeout=60).raise_for_status()
    wait_for(lambda: not httpx.get(f"{url}/v1/models/{MODEL}", timeout=5).json()["loaded"], 30, "the unload")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench coldstart")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)

    cold, repeated, warm = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        converted = root / "converted"
        env = {**os.environ, "NEURON_CONVERTED_DIR": str(converted), "TOKENIZERS_PARALLELISM": "false"}
        port = natsserver.free_port()
        nats_url = f"nats://127.0.0.1:{port}"
        nats = natsserver.start(port=port, http_port=natsserver.free_port(), workdir=root, log_file=root / "nats.log")
        url = f"http://127.0.0.1:{natsserver.free_port()}"
        procs = [
            _spawn(["neuron.cli", "serve", "--nats", nats_url, "--node", "bench"], root / "neuron.log", env),
            _spawn(
                ["cortex.cli", "serve", "--nats", nats_url, "--listen", url.removeprefix("http://")],
                root / "gateway.log",
                {**env, "CORTEX_GATEWAY__METRICS_LISTEN": ""},
            ),
        ]
        try:
            # Ready when the node has surveyed the catalogue: the gateway can place the model.
            wait_for(lambda: httpx.get(f"{url}/v1/models/{MODEL}", timeout=5).json()["placeable_on"], 120, "the fleet")
            for i in range(args.runs):
                shutil.rmtree(converted, ignore_errors=True)
                cold.append(_first_token_s(url))
                _first_token_s(url)  # the first forward passes after a load set up kernels
                warm.append(_first_token_s(url))
                wait_for(lambda: any(p.is_dir() and ".partial" not in p.name for p in converted.iterdir()), 60, "cache")
                _unload(url)
                repeated.append(_first_token_s(url))
                _unload(url)
                print(f"run {i + 1}: cold {cold[-1]:.2f}s, repeated {repeated[-1]:.2f}s, warm {warm[-1]:.3f}s")
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(60)
            natsserver.stop(nats)

    def row(name: str, values: list[float]) -> str:
        return f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |"

    table = "\n".join(
        [
            f"SmolLM2-135M-Instruct (Q4_1 GGUF -> float32), CPU x{os.cpu_count()}, request -> first token, "
            f"{args.runs} runs, seconds",
            "",
            "| case | median | min | max |",
            "|---|---|---|---|",
            row("cold: first load, GGUF dequantized", cold),
            row("repeated: load from the converted cache", repeated),
            row("warm: already loaded", warm),
        ]
    )
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "coldstart.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
