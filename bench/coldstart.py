"""Cold starts: request -> first token for the default model when it is not loaded anywhere, on
each engine, side by side in one stack (nats-server, one neuron, one gateway) and one run:
  cold      the first load ever: transformers dequantizes the GGUF; llama.cpp maps it, and reads
            the tokenizer out of it (transformers' GGUF reader: seconds for 49k tokens)
  repeated  unloaded, then asked for again: the dequantized weights (transformers) or the
            tokenizer (llama.cpp) come from the converted cache
  warm      already loaded (and past its first request): for reference

    python -m bench coldstart [--runs 3]
"""

from __future__ import annotations

import argparse
import importlib.util
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
from cortex.devstack import natsserver
from cortex.protocol.catalogue import DEFAULT_MODEL

ENGINES = ["transformers", *(["llama.cpp"] if importlib.util.find_spec("llama_cpp") else [])]
PROMPT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
RESULTS = Path(__file__).parent / "results"


def _spawn(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT, env=env)


def _first_token_s(url: str, model: str) -> float:
    body = {"model": model, "messages": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True}
    sent = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    return time.perf_counter() - sent
    raise SystemExit(f"no token came back: {resp.status_code}")


def _unload(url: str, model: str) -> None:
    httpx.post(f"{url}/admin/models/unload", json={"model": model}, timeout=60).raise_for_status()
    wait_for(lambda: not httpx.get(f"{url}/v1/models/{model}", timeout=5).json()["loaded"], 30, "the unload")


def _catalogue(path: Path) -> Path:
    entry = DEFAULT_MODEL.model_dump(include={"source", "temperature", "top_p"})
    path.write_text(
        "".join(
            f'[[models]]\nid = "{e}"\nsource = "{entry["source"]}"\nengine = "{e}"\n'
            f"temperature = {entry['temperature']}\ntop_p = {entry['top_p']}\n\n"
            for e in ENGINES
        )
    )
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench coldstart")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)

    times: dict[str, dict[str, list[float]]] = {e: {"cold": [], "repeated": [], "warm": []} for e in ENGINES}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        converted = root / "converted"
        toml = str(_catalogue(root / "models.toml"))
        env = {**os.environ, "NEURON_CONVERTED_DIR": str(converted), "TOKENIZERS_PARALLELISM": "false"}
        port = natsserver.free_port()
        nats_url = f"nats://127.0.0.1:{port}"
        nats = natsserver.start(port=port, http_port=natsserver.free_port(), workdir=root, log_file=root / "nats.log")
        url = f"http://127.0.0.1:{natsserver.free_port()}"
        procs = [
            _spawn(
                ["neuron.cli", "serve", "--nats", nats_url, "--node", "bench", "--models-config", toml],
                root / "neuron.log",
                env,
            ),
            _spawn(
                ["cortex.cli", "serve", "--nats", nats_url, "--models-config", toml, "--listen", url[7:]],
                root / "gateway.log",
                {**env, "CORTEX_GATEWAY__METRICS_LISTEN": ""},
            ),
        ]
        try:
            for engine in ENGINES:  # ready when the node has surveyed the catalogue: the gateway can place it
                model_url = f"{url}/v1/models/{engine}"
                wait_for(lambda u=model_url: httpx.get(u, timeout=5).json()["placeable_on"], 120, "the fleet")
            for i in range(args.runs):
                for engine, t in times.items():
                    shutil.rmtree(converted, ignore_errors=True)
                    t["cold"].append(_first_token_s(url, engine))
                    _first_token_s(url, engine)  # the first forward passes after a load set up kernels
                    t["warm"].append(_first_token_s(url, engine))
                    wait_for(
                        lambda: any(p.is_dir() and ".partial" not in p.name for p in converted.iterdir()), 60, "cache"
                    )
                    _unload(url, engine)
                    t["repeated"].append(_first_token_s(url, engine))
                    _unload(url, engine)
                    print(
                        f"run {i + 1}, {engine}: cold {t['cold'][-1]:.2f}s, repeated {t['repeated'][-1]:.2f}s, "
                        f"warm {t['warm'][-1]:.3f}s"
                    )
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(60)
            natsserver.stop(nats)

    def row(engine: str, case: str, values: list[float]) -> str:
        return f"| {engine} | {case} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |"

    cases = {
        "cold": "cold: first load",
        "repeated": "repeated: load with the converted cache",
        "warm": "warm: already loaded",
    }
    table = "\n".join(
        [
            f"SmolLM2-135M-Instruct (Q4_1 GGUF), CPU x{os.cpu_count()}, request -> first token, "
            f"{args.runs} runs, seconds",
            "",
            "| engine | case | median | min | max |",
            "|---|---|---|---|---|",
            *(row(e, label, times[e][case]) for case, label in cases.items() for e in ENGINES),
        ]
    )
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "coldstart.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
