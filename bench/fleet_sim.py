"""`python -m bench fleet [--nodes 10,100,1000]`: a simulated fleet in front of one gateway.

N synthetic nodes heartbeat into the `cortex_nodes` bucket from a few processes, with the content
real neurons send: 1-8 GPUs, 2-8 models of a 200-model catalogue in mixed states (most ready,
some loading, failed or unloading) with their load, and an estimate for every catalogue model.
For each N, with no requests: how stale the gateway's view is (`cortex_heartbeat_lag_seconds`:
a heartbeat's sending to its entering the view), the gateway's CPU, the heartbeat bytes per
second, the latency of `/v1/models`, `/fleet.json` and `cortex status`, and, once every node
stops, how long the gateway takes to drop them all.

This is the first part of the scaling issue's simulator: one nats-server, one gateway, no churn
and no requests yet (see the README's "Scaling out" once it exists).

    python -m bench.fleet_sim publish --nats URL --first 0 --count 250 --interval 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.stack import Stack, wait_for
from cortex import __version__
from cortex.devstack import natsserver
from cortex.protocol.messages import DeviceInfo, Estimate, Heartbeat, ModelState, ModelStatus
from cortex.protocol.subjects import NODES_BUCKET, model_key

RESULTS = Path(__file__).parent / "results"
CATALOGUE = [f"sim/model-{i:03d}" for i in range(200)]
INTERVAL_S = 2.0  # a neuron's default heartbeat_interval
PUBLISHERS = 4
MEASURE_S = 20.0
_SENT_AT = b'"sent_at":0.0'
_STATES = [ModelState.ready] * 16 + [ModelState.loading, ModelState.loading, ModelState.failed, ModelState.unloading]


def heartbeat(node: str, rng: random.Random, started: float, sent_at: float) -> Heartbeat:
    """A plausible heartbeat of a GPU node (the same `rng` seed: the same devices, models and load)."""
    gpus = rng.randint(1, 8)
    devices = [
        DeviceInfo(
            id=f"cuda:{i}", kind="cuda", name="NVIDIA H100 80GB HBM3", total_mb=79_000, free_mb=rng.randint(0, 79_000)
        )
        for i in range(gpus)
    ]
    models = [
        ModelStatus(
            id=model,
            key=model_key(model),
            state=(state := rng.choice(_STATES)),
            since=started,
            device=f"cuda:{rng.randrange(gpus)}",
            memory_mb=rng.randint(500, 70_000),
            engine="transformers",
            parallel=8,
            in_flight=rng.randint(0, 8) if state is ModelState.ready else 0,
            tokens_per_s=rng.uniform(0, 2_000) if state is ModelState.ready else 0.0,
            last_used=time.time() - rng.uniform(0, 600),
            error="CUDA out of memory" if state is ModelState.failed else None,
        )
        for model in rng.sample(CATALOGUE, rng.randint(2, 8))
    ]
    estimates = [
        Estimate(
            model=model,
            memory_mb=(w := rng.randint(300, 140_000)) + 2_000,
            weights_mb=w,
            kv_mb=2_000,
            format="safetensors",
            engine="transformers",
        )
        for model in CATALOGUE
    ]
    return Heartbeat(
        node=node,
        version=__version__,
        started_at=started,
        sent_at=sent_at,
        interval_s=INTERVAL_S,
        max_batch=8,
        max_queue=16,
        devices=devices,
        models=models,
        estimates=estimates,
    )


async def publish(nats_url: str, first: int, count: int, interval: float) -> dict[str, float]:
    """Heartbeats of nodes `first`..`first+count-1`, each every `interval`, spread over it, until SIGTERM;
    how many went out, their bytes, and over how long."""
    from cortex.transport.connection import connect

    connection = await connect([nats_url], f"fleet-sim {first}")
    js = connection.client.jetstream()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    nodes = [f"sim-{i:05d}" for i in range(first, first + count)]
    started = time.time()
    # Built once (the content stays as it is); only the time of sending changes, so that the
    # publishers keep up with a thousand nodes on a small machine.
    templates = {node: heartbeat(node, random.Random(node), started, sent_at=0.0).to_bytes() for node in nodes}
    sent = sent_bytes = 0
    begun = time.monotonic()
    try:
        while not stop.is_set():
            tick = time.monotonic()
            for i, node in enumerate(nodes):
                # Spread over the interval, as independent nodes are.
                await asyncio.sleep(max(0.0, tick + interval * i / len(nodes) - time.monotonic()))
                payload = templates[node].replace(_SENT_AT, f'"sent_at":{time.time()}'.encode(), 1)
                await js.publish(f"$KV.{NODES_BUCKET}.{node}", payload, msg_ttl=int(3 * interval))
                sent, sent_bytes = sent + 1, sent_bytes + len(payload)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, tick + interval - time.monotonic()))
    finally:
        await connection.aclose()
    return {"heartbeats": sent, "bytes": sent_bytes, "seconds": time.monotonic() - begun}


def _catalogue(root: Path) -> Path:
    path = root / "models.toml"
    path.write_text("".join(f'[[models]]\nid = "{m}"\nsource = "hf:{m}"\n\n' for m in CATALOGUE))
    return path


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _latency_ms(url: str, times: int = 30) -> tuple[float, float]:
    samples = []
    with httpx.Client(timeout=30) as client:
        for _ in range(times):
            start = time.perf_counter()
            client.get(url).raise_for_status()
            samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(0.99 * (len(samples) - 1))]


def _lag_quantiles(metrics_text: str) -> tuple[float, float]:
    """p50 and p99 of cortex_heartbeat_lag_seconds (the upper bound of the bucket they fall in)."""
    buckets = []
    for line in metrics_text.splitlines():
        if line.startswith("cortex_heartbeat_lag_seconds_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(le), float(line.rsplit(" ", 1)[1])))
    total = buckets[-1][1] if buckets else 0.0

    def quantile(q: float) -> float:
        return next((le for le, count in buckets if count >= q * total), float("inf"))

    return quantile(0.5), quantile(0.99)


def measure(stack: Stack, url: str, metrics_url: str, n: int, root: Path, seconds: float) -> dict[str, float]:
    """Starts N nodes, measures with them in view, then stops them and times their leaving."""
    per = -(-n // PUBLISHERS)
    names = []
    for p, first in enumerate(range(0, n, per)):
        name = f"publisher-{n}-{p}"
        stats = root / f"{name}.json"
        args = ["bench.fleet_sim", "publish", "--nats", stack.nats_url, "--first", str(first)]
        args += ["--count", str(min(per, n - first)), "--interval", str(INTERVAL_S), "--stats", str(stats)]
        stack.spawn(name, args)
        names.append((name, stats))

    def nodes_in_view() -> int:
        return sum(1 for node in httpx.get(f"{url}/fleet.json", timeout=30).json()["nodes"] if node["status"] != "lost")

    wait_for(lambda: nodes_in_view() >= n, 120, f"{n} nodes in the gateway's view")
    time.sleep(2 * INTERVAL_S)
    before = httpx.get(metrics_url, timeout=10).text
    cpu_before, began = _cpu_seconds(stack.pid("gateway")), time.monotonic()
    time.sleep(seconds)
    cpu = (_cpu_seconds(stack.pid("gateway")) - cpu_before) / (time.monotonic() - began)
    lag = _lag_quantiles(_diff_histogram(before, httpx.get(metrics_url, timeout=10).text))
    models = _latency_ms(f"{url}/v1/models")
    fleet = _latency_ms(f"{url}/fleet.json")
    start = time.perf_counter()
    status = subprocess.run(
        [sys.executable, "-m", "cortex.cli", "status", "--nats", stack.nats_url], capture_output=True, env=stack.env
    )
    # Exit status 1: the report lists problems (the simulated fleet has failed loads); it is still whole.
    assert status.returncode in (0, 1) and f"sim-{n - 1:05d}" in status.stdout.decode(), status.stderr.decode()
    status_ms = (time.perf_counter() - start) * 1000
    stopped = time.monotonic()
    for name, _ in names:
        stack.stop(name)
    wait_for(lambda: nodes_in_view() == 0, 120, "every stopped node to leave the view")
    dropped = time.monotonic() - stopped
    sent = [json.loads(stats.read_text()) for _, stats in names]
    bytes_per_s = sum(s["bytes"] for s in sent) / max(s["seconds"] for s in sent)
    return {
        "nodes": n,
        "lag_p50_ms": lag[0] * 1000,
        "lag_p99_ms": lag[1] * 1000,
        "gateway_cpu_pct": cpu * 100,
        "heartbeat_kb_s": bytes_per_s / 1024,
        "heartbeat_kb": sum(s["bytes"] for s in sent) / max(sum(s["heartbeats"] for s in sent), 1) / 1024,
        "models_p50_ms": models[0],
        "models_p99_ms": models[1],
        "fleet_p50_ms": fleet[0],
        "fleet_p99_ms": fleet[1],
        "status_ms": status_ms,
        "dropped_s": dropped,
    }


def _diff_histogram(before: str, after: str) -> str:
    """The lag histogram's buckets counted between two scrapes, as scrape text."""

    def counts(text: str) -> dict[str, float]:
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("cortex_heartbeat_lag_seconds_bucket{")
        }

    old, new = counts(before), counts(after)
    return "\n".join(f"{key} {value - old.get(key, 0.0)}" for key, value in new.items())


def table(rows: list[dict[str, float]]) -> str:
    head = (
        "| nodes | view lag p50 / p99 ms | gateway CPU % (no requests) | heartbeats KB/s (KB each) "
        "| /v1/models p50 / p99 ms | /fleet.json p50 / p99 ms | cortex status ms | all dropped after s |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['nodes']:.0f} | {r['lag_p50_ms']:.0f} / {r['lag_p99_ms']:.0f} | {r['gateway_cpu_pct']:.1f} "
            f"| {r['heartbeat_kb_s']:.0f} ({r['heartbeat_kb']:.1f}) "
            f"| {r['models_p50_ms']:.1f} / {r['models_p99_ms']:.1f} "
            f"| {r['fleet_p50_ms']:.0f} / {r['fleet_p99_ms']:.0f} | {r['status_ms']:.0f} | {r['dropped_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench fleet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="10,100,1000", help="fleet sizes, comma-separated")
    parser.add_argument("--root", type=Path, default=Path("/tmp/cortex-bench-fleet"))
    parser.add_argument("--seconds", type=float, default=MEASURE_S, help="measured with each fleet in view")
    args = parser.parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    stack = Stack(args.root)
    rows = []
    try:
        metrics_port = natsserver.free_port()
        _, port = stack.gateway(_catalogue(args.root), {"CORTEX_GATEWAY__METRICS_LISTEN": f"127.0.0.1:{metrics_port}"})
        url, metrics_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"
        for n in (int(x) for x in args.nodes.split(",")):
            rows.append(measure(stack, url, metrics_url, n, args.root, args.seconds))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    finally:
        stack.close()
    text = table(rows)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    header = (
        f"cortex fleet simulation, {time.strftime('%Y-%m-%d')}: one nats-server and one gateway on 2 cores, "
        f"N synthetic nodes in {PUBLISHERS} processes, a heartbeat every {INTERVAL_S:g} s each, "
        f"{len(CATALOGUE)} catalogue models, no requests\n\n"
    )
    (RESULTS / "fleet.md").write_text(header + text + "\n")


def _publish_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_sim publish")
    parser.add_argument("--nats", required=True)
    parser.add_argument("--first", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--interval", type=float, default=INTERVAL_S)
    parser.add_argument("--stats", type=Path, required=True)
    args = parser.parse_args(argv)
    stats = asyncio.run(publish(args.nats, args.first, args.count, args.interval))
    args.stats.write_text(json.dumps(stats))


if __name__ == "__main__":
    if sys.argv[1:2] == ["publish"]:
        _publish_main(sys.argv[2:])
    else:
        main(sys.argv[1:])
