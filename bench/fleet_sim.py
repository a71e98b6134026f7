"""`python -m bench fleet [--nodes 10,100,1000]`: a simulated fleet in front of three gateways.

Three nats-servers clustered on loopback (the KV buckets replicated on all three), a gateway on
each, and N simulated nodes heartbeating into `cortex_nodes` from a few processes, with the
content real neurons send: 1-8 GPUs, 2-8 models of a 200-model catalogue in mixed states (most
ready, some loading, failed or unloading) with their load, and an estimates record with an
estimate for every catalogue model (written once, as a neuron does while they do not change).
The simulated nodes answer `load` and `unload` for themselves and then serve what they loaded
(bench.synthetic's engine); one more node (bench.synthetic) serves a model from the start.

For each N: how stale every gateway's view is (`cortex_heartbeat_lag_seconds`: a heartbeat's
sending to its entering a view), a gateway's CPU with no requests, the bytes per second the
nodes send NATS, requests per second to the served model through one gateway and the routing
decision each took (`cortex_routing_decision_seconds`), a cold placement over the N nodes (timed
in process), the latency of `/v1/models`, `/fleet.json` and `cortex status`; then churn (a share
of the nodes change their models every interval) while 3 gateways x 50 clients ask at once for
each of three models no node holds, counting the load requests on the wire (one per model is
right); then half the nodes die (SIGKILL: their heartbeats stop) and the rest leave (their keys
deleted), and the time each takes to show.

    python -m bench.fleet_sim publish --nats URL --first 0 --count 250 --interval 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import nats
from nats.aio.msg import Msg

from bench.loadgen import HttpConnection, chat_body, closed_loop
from bench.stack import Stack, wait_for
from bench.synthetic import SyntheticEngine
from cortex import __version__
from cortex.devstack import natsserver
from cortex.placement import planner
from cortex.protocol.errors import NoCapacity
from cortex.protocol.messages import (
    DeviceInfo,
    Estimate,
    Heartbeat,
    LoadRequest,
    ModelReply,
    ModelSpec,
    ModelState,
    ModelStatus,
    NodeEstimates,
    UnloadRequest,
)
from cortex.protocol.subjects import JOB_QUEUE_GROUP, NODES_BUCKET, Subjects, estimates_key, model_key
from neuron.heartbeat import ESTIMATES_TTL_S

RESULTS = Path(__file__).parent / "results"
UNHELD = [f"sim/unheld-{i}" for i in range(3)]  # every node estimates them; none holds one until asked
HELD = [f"sim/model-{i:03d}" for i in range(200 - len(UNHELD))]
CATALOGUE = HELD + UNHELD
INTERVAL_S = 2.0  # a neuron's default heartbeat_interval
PUBLISHERS = 4
SERVERS = GATEWAYS = 3
MEASURE_S = 20.0
SERVED = "synthetic/echo"  # the model the one synthetic node serves from the start
CONCURRENCY = 16
REQUESTS = 1500
COLD_CLIENTS = 50  # per gateway, at once, for each model no node holds
LOAD_S = 1.0  # a simulated node's load: `loading` this long, then `ready`
CHURN = 0.02  # the share of nodes whose models change each interval, once churning (SIGUSR1)
_SENT_AT = b'"sent_at":0.0'
_JSON = {"Content-Type": "application/json"}
_UNLIMITED = httpx.Limits(max_connections=None)
_STATES = [ModelState.ready] * 16 + [ModelState.loading, ModelState.loading, ModelState.failed, ModelState.unloading]


def heartbeat(node: str, rng: random.Random, started: float, sent_at: float) -> tuple[Heartbeat, NodeEstimates]:
    """A plausible heartbeat of a GPU node, and its estimates record (the same `rng` seed: the same
    devices, models and load)."""
    gpus = rng.randint(1, 8)
    devices = [
        DeviceInfo(
            id=f"cuda:{i}", kind="cuda", name="NVIDIA H100 80GB HBM3", total_mb=79_000, free_mb=rng.randint(0, 79_000)
        )
        for i in range(gpus)
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
    beat = Heartbeat(
        node=node,
        version=__version__,
        started_at=started,
        sent_at=sent_at,
        interval_s=INTERVAL_S,
        max_batch=8,
        max_queue=16,
        devices=devices,
        models=_models(rng, started, gpus),
    )
    return beat, NodeEstimates(node=node, estimates=estimates)


def _models(rng: random.Random, since: float, gpus: int) -> list[ModelStatus]:
    return [
        ModelStatus(
            id=model,
            key=model_key(model),
            state=(state := rng.choice(_STATES)),
            since=since,
            device=f"cuda:{rng.randrange(gpus)}",
            memory_mb=rng.randint(500, 70_000),
            engine="transformers",
            parallel=8,
            in_flight=rng.randint(0, 8) if state is ModelState.ready else 0,
            tokens_per_s=rng.uniform(0, 2_000) if state is ModelState.ready else 0.0,
            last_used=time.time() - rng.uniform(0, 600),
            error="CUDA out of memory" if state is ModelState.failed else None,
        )
        for model in rng.sample(HELD, rng.randint(2, 8))
    ]


class SimNodes:
    """Some simulated nodes, in one process: their heartbeats (rendered once, and again only when
    they change: only the time of sending is put in each, so that a few processes keep up with a
    thousand nodes on a small machine), answers to `load` and `unload` for themselves, and the jobs
    of what they loaded."""

    def __init__(self, nc: nats.NATS, nodes: list[str], interval: float) -> None:
        self._nc = nc
        self._ttl = int(3 * interval)
        self._tasks: set[asyncio.Task[None]] = set()
        self._js = nc.jetstream()
        self._subjects = Subjects()
        started = time.time()
        built = {node: heartbeat(node, random.Random(node), started, sent_at=0.0) for node in nodes}
        self.beats = {node: beat for node, (beat, _) in built.items()}
        self.estimates = {node: estimates for node, (_, estimates) in built.items()}
        self._loaded: dict[str, dict[str, ModelStatus]] = {node: {} for node in nodes}  # asked for, by model
        self._rendered: dict[str, bytes] = {}
        self._engines: list[SyntheticEngine] = []
        self._changes = 0

    async def start(self) -> None:
        # As a neuron does: its estimates once (they change only with the catalogue or a measurement).
        for node, estimates in self.estimates.items():
            await self._put(estimates_key(node), estimates.to_bytes(), ESTIMATES_TTL_S)
        for verb in ("load", "unload"):
            await self._nc.subscribe(self._subjects.control("*", verb), cb=self._on_control)

    async def beat(self, node: str) -> None:
        if node not in self._rendered:
            beat = self.beats[node]
            models = [*beat.models, *self._loaded[node].values()]
            self._rendered[node] = beat.model_copy(update={"models": models}).to_bytes()
        payload = self._rendered[node].replace(_SENT_AT, f'"sent_at":{time.time()}'.encode(), 1)
        await self._put(node, payload, self._ttl)

    def churn(self, rng: random.Random) -> None:
        """Some nodes' models change (loaded, unloaded, failed), as in a fleet at work."""
        for node in rng.sample(list(self.beats), max(1, int(CHURN * len(self.beats)))):
            self._changes += 1
            beat = self.beats[node]
            models = _models(random.Random(f"{node}/{self._changes}"), time.time(), len(beat.devices))
            self.beats[node] = beat.model_copy(update={"models": models})
            self._rendered.pop(node, None)

    async def leave(self) -> None:
        """As a stopping neuron does: its keys deleted."""
        for node in self.beats:
            await self._js.publish(f"$KV.{NODES_BUCKET}.{node}", b"", headers={"KV-Operation": "DEL"})
            await self._js.publish(f"$KV.{NODES_BUCKET}.{estimates_key(node)}", b"", headers={"KV-Operation": "DEL"})

    async def _put(self, key: str, payload: bytes, ttl: int) -> None:
        # Not waiting for JetStream's ack, as a neuron does: a few processes stand for a thousand
        # nodes on 2 cores, and the acks would be a good part of their work.
        await self._nc.publish(f"$KV.{NODES_BUCKET}.{key}", payload, headers={"Nats-TTL": str(ttl)})

    async def _on_control(self, msg: Msg) -> None:
        node, verb = msg.subject.split(".")[-2:]
        if node not in self.beats:
            return  # another process's node
        if verb == "load":
            model = LoadRequest.model_validate_json(msg.data).model.id
            status = self._loaded[node][model] = self._status(node, model, ModelState.loading)
            task = asyncio.create_task(self._ready_later(node, model))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            model = UnloadRequest.model_validate_json(msg.data).model
            status = self._loaded[node].pop(model, None) or self._status(node, model, ModelState.unloading)
        self._rendered.pop(node, None)
        await msg.respond(ModelReply(model=status).to_bytes())
        await self.beat(node)

    async def _ready_later(self, node: str, model: str) -> None:
        await asyncio.sleep(LOAD_S)
        engine = SyntheticEngine(self._nc, node, model, 0.0)
        self._engines.append(engine)  # it keeps the tasks of its answers
        await self._nc.subscribe(self._subjects.infer(model), queue=JOB_QUEUE_GROUP, cb=engine.on_job)
        await self._nc.subscribe(self._subjects.infer_node(model, node), cb=engine.on_job)
        self._loaded[node][model] = self._status(node, model, ModelState.ready)
        self._rendered.pop(node, None)
        await self.beat(node)

    def _status(self, node: str, model: str, state: ModelState) -> ModelStatus:
        device = self.beats[node].devices[0].id
        return ModelStatus(id=model, key=model_key(model), state=state, since=time.time(), device=device, parallel=8)


async def publish(nats_url: str, first: int, count: int, interval: float) -> None:
    """Nodes `first`..`first+count-1`, each heartbeating every `interval`, spread over it, until SIGTERM
    (they leave) or SIGKILL (they die); churning once sent SIGUSR1."""
    from cortex.transport.connection import connect

    connection = await connect([nats_url], f"fleet-sim {first}")
    loop = asyncio.get_running_loop()
    stop, churning = asyncio.Event(), asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, churning.set)
    nodes = SimNodes(connection.client, [f"sim-{i:05d}" for i in range(first, first + count)], interval)
    rng = random.Random(first)
    try:
        await nodes.start()
        while not stop.is_set():
            tick = time.monotonic()
            if churning.is_set():
                nodes.churn(rng)
            for i, node in enumerate(list(nodes.beats)):
                # Spread over the interval, as independent nodes are.
                await asyncio.sleep(max(0.0, tick + interval * i / count - time.monotonic()))
                await nodes.beat(node)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, tick + interval - time.monotonic()))
        await nodes.leave()
    finally:
        await connection.aclose()


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


def _buckets(metrics_text: str, name: str) -> Counter[float]:
    """A histogram's cumulative bucket counts by upper bound, summed over its label sets."""
    counts: Counter[float] = Counter()
    for line in metrics_text.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            le = float(line.split('le="', 1)[1].split('"', 1)[0])
            counts[le] += float(line.rsplit(" ", 1)[1])
    return counts


def _quantiles(counts: Counter[float]) -> tuple[float, float]:
    """p50 and p99 (the upper bound of the bucket each falls in) of cumulative bucket counts."""
    buckets = sorted(counts.items())
    total = buckets[-1][1] if buckets else 0.0

    def quantile(q: float) -> float:
        return next((le for le, count in buckets if count >= q * total and total > 0), float("inf"))

    return quantile(0.5), quantile(0.99)


@dataclass(frozen=True)
class Gateway:
    name: str
    port: int
    metrics_url: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metrics(self) -> str:
        return httpx.get(self.metrics_url, timeout=10).text

    def statuses(self) -> dict[str, str]:
        """Each node in this gateway's view and its status there: `up`, or `stale` once silent too long."""
        report = httpx.get(f"{self.url}/fleet.json", timeout=30).json()
        return {node["name"]: node["status"] for node in report["nodes"]}


def _requests(port: int, concurrency: int, count: int) -> float:
    """Requests per second for the synthetic node's model, `concurrency` at a time, `count` in all."""

    async def go() -> float:
        conns = [HttpConnection("127.0.0.1", port) for _ in range(concurrency)]
        body = chat_body(SERVED, 4, False)
        try:
            timings, wall = await closed_loop(concurrency, count, lambda i: conns[i].post("/v1/chat/completions", body))
        finally:
            for conn in conns:
                await conn.close()
        return len(timings) / wall

    return asyncio.run(go())


def _cold_loads(nats_url: str, gateways: list[Gateway], models: list[str], clients: int) -> tuple[int, float]:
    """`clients` requests per gateway at once for each model, none of which any node holds: the load
    requests seen on the wire (any node, any gateway), and the slowest answer's seconds. Raises if
    a request fails or a model was loaded other than once."""

    async def go() -> tuple[Counter[str], float]:
        loads: Counter[str] = Counter()
        nc = await nats.connect(nats_url)

        async def seen(msg: Msg) -> None:
            loads[LoadRequest.model_validate_json(msg.data).model.id] += 1

        await nc.subscribe(Subjects().control("*", "load"), cb=seen)
        await nc.flush()
        began = time.perf_counter()
        try:
            async with contextlib.AsyncExitStack() as stack:
                # A client per gateway and model: one pool of hundreds of connections is slow to open.
                pools = [
                    await stack.enter_async_context(httpx.AsyncClient(timeout=120, limits=_UNLIMITED))
                    for _ in range(len(gateways) * len(models))
                ]
                answers = await asyncio.gather(
                    *(
                        pool.post(f"{gw.url}/v1/chat/completions", content=chat_body(model, 4, False), headers=_JSON)
                        for i, (model, gw) in enumerate((m, g) for m in models for g in gateways)
                        for pool in [pools[i]]
                        for _ in range(clients)
                    )
                )
            slowest = time.perf_counter() - began
        finally:
            await nc.drain()
        failed = [a.text for a in answers if a.status_code != 200]
        assert not failed, f"{len(failed)} cold requests failed, e.g. {failed[0]}"
        return loads, slowest

    loads, slowest = asyncio.run(go())
    assert loads == Counter(dict.fromkeys(models, 1)), f"loads per model: {dict(loads)} (one each is right)"
    return sum(loads.values()), slowest


def _joined(n: int) -> list[Heartbeat]:
    """The N nodes' heartbeats as a gateway's view holds them: each joined to its estimates."""
    nodes = []
    for i in range(n):
        beat, estimates = heartbeat(f"sim-{i:05d}", random.Random(f"sim-{i:05d}"), time.time(), time.time())
        beat.join(estimates)
        nodes.append(beat)
    return nodes


def _placeable_on(spec: ModelSpec, n: int) -> list[str]:
    """Where a gateway should say a model no node holds could go: every node's estimate of it, weighed
    against the room that node could make."""
    return [hb.node for hb in _joined(n) if planner.fits(hb, planner.need_on(spec, hb), planner.room(hb, spec.devices))]


def _placement_ms(n: int, times: int = 30) -> tuple[float, float]:
    """What a gateway's placer runs for a model loaded nowhere (planner.plan over every node), here
    in process over the same N nodes."""
    nodes = _joined(n)
    spec = ModelSpec(id=UNHELD[0], source=f"hf:{UNHELD[0]}")
    samples = []
    for _ in range(times):
        start = time.perf_counter()
        with contextlib.suppress(NoCapacity):
            planner.plan(spec, nodes, "lru")
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(0.99 * (len(samples) - 1))]


def _sent_bytes(stack: Stack) -> float:
    """What the simulated nodes' connections have sent the servers so far."""
    total = 0.0
    for url in stack.monitor_urls:
        for conn in httpx.get(f"{url}/connz", params={"limit": 1024}, timeout=10).json()["connections"] or []:
            if conn.get("name", "").startswith("fleet-sim"):
                total += conn["in_bytes"]
    return total


def _all(statuses: dict[str, str], nodes: list[str], holds: Callable[[str | None], bool]) -> bool:
    """Whether each node's status in one view (None: not in it) is as `holds` wants."""
    return all(holds(statuses.get(node)) for node in nodes)


class Fleet:
    """The NATS cluster, a gateway on each server (its metrics on a port of their own) and the one
    synthetic node that serves from the start."""

    def __init__(self, root: Path, servers: int = SERVERS) -> None:
        shutil.rmtree(root, ignore_errors=True)  # a cluster's old store would elect its old streams first
        root.mkdir(parents=True)
        self.stack = Stack(root, servers=servers)
        try:
            self.gateways = [self._gateway(root, i, servers) for i in range(servers)]
            self.stack.spawn("synthetic", ["bench.synthetic", "--nats", self.stack.nats_url, "--model", SERVED])

            def served() -> bool:
                return all(SERVED in httpx.get(f"{gw.url}/health", timeout=5).json()["models"] for gw in self.gateways)

            wait_for(served, 60, "the served model in every gateway's view")
        except BaseException:
            self.stack.close()
            raise

    def _gateway(self, root: Path, i: int, replicas: int) -> Gateway:
        metrics_port = natsserver.free_port()
        env = {"CORTEX_GATEWAY__METRICS_LISTEN": f"127.0.0.1:{metrics_port}", "CORTEX_NATS__KV_REPLICAS": str(replicas)}
        name = f"gateway-{i}"
        _, port = self.stack.gateway(_catalogue(root), env, name=name, nats_url=self.stack.nats_urls[i])
        return Gateway(name, port, f"http://127.0.0.1:{metrics_port}/metrics")

    def requests_per_s(self, count: int) -> float:
        return _requests(self.gateways[0].port, CONCURRENCY, count)

    def close(self) -> None:
        self.stack.close()

    def measure(self, n: int, seconds: float, requests: int, cold: list[str]) -> dict[str, float]:
        """Starts N nodes, measures with them in view; asks for the models no node holds through
        every gateway at once while the nodes churn; then kills half of the nodes (their heartbeats
        stop) and times their being noticed, and stops the rest (they delete their keys) and times
        their leaving."""
        stack, first = self.stack, self.gateways[0]
        per = -(-n // PUBLISHERS)
        publishers: list[tuple[str, list[str]]] = []
        for p, begin in enumerate(range(0, n, per)):
            name, count = f"publisher-{n}-{p}", min(per, n - begin)
            server = stack.nats_urls[p % len(stack.nats_urls)]
            args = ["bench.fleet_sim", "publish", "--nats", server, "--first", str(begin), "--count", str(count)]
            stack.spawn(name, [*args, "--interval", str(INTERVAL_S)])
            publishers.append((name, [f"sim-{i:05d}" for i in range(begin, begin + count)]))
        simulated = [node for _, nodes in publishers for node in nodes]

        def seen() -> bool:
            return all(_all(gw.statuses(), simulated, lambda status: status == "up") for gw in self.gateways)

        wait_for(seen, 120, f"{n} nodes in every gateway's view")
        time.sleep(2 * INTERVAL_S)
        # Every node's estimates reached the views too, joined to its heartbeats: each gateway would
        # place a model no node holds just where those estimates say it fits.
        spec = ModelSpec(id=UNHELD[0], source=f"hf:{UNHELD[0]}")
        expected = _placeable_on(spec, n)
        for gw in self.gateways:
            entry = httpx.get(f"{gw.url}/v1/models/{spec.id}", timeout=30).json()
            placeable = [node for node in entry["placeable_on"] if node.startswith("sim-")]
            assert entry["memory_source"] == "estimate" and placeable == expected, (gw.name, entry)

        before = [gw.metrics() for gw in self.gateways]
        sent_before = _sent_bytes(stack)
        others = [*stack.nats_pids, *(stack.pid(name) for name, _ in publishers)]
        gateway_pids = [stack.pid(gw.name) for gw in self.gateways]
        cpu_before = [_cpu_seconds(pid) for pid in gateway_pids]
        others_before = sum(_cpu_seconds(pid) for pid in others)
        began = time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - began
        cpu = max(_cpu_seconds(pid) - was for pid, was in zip(gateway_pids, cpu_before, strict=True)) / elapsed
        # What the simulator (its publishers) and the nats-servers take of the same 2 cores.
        others_cpu = (sum(_cpu_seconds(pid) for pid in others) - others_before) / elapsed
        traffic = (_sent_bytes(stack) - sent_before) / elapsed
        lag: Counter[float] = Counter()
        for gw, text in zip(self.gateways, before, strict=True):
            lag.update(_buckets(gw.metrics(), "cortex_heartbeat_lag_seconds"))
            lag.subtract(_buckets(text, "cortex_heartbeat_lag_seconds"))
        lag_q = _quantiles(lag)

        before_route = _buckets(first.metrics(), "cortex_routing_decision_seconds")
        rate = _requests(first.port, CONCURRENCY, requests)
        route = _buckets(first.metrics(), "cortex_routing_decision_seconds")
        route.subtract(before_route)
        route_q = _quantiles(route)
        place = _placement_ms(n)
        models = _latency_ms(f"{first.url}/v1/models")
        fleet = _latency_ms(f"{first.url}/fleet.json")
        start = time.perf_counter()
        status = subprocess.run(
            [sys.executable, "-m", "cortex.cli", "status", "--nats", stack.nats_url], capture_output=True, env=stack.env
        )
        # Exit status 1: the report lists problems (the simulated fleet has failed loads); it is still whole.
        assert status.returncode in (0, 1) and simulated[-1] in status.stdout.decode(), status.stderr.decode()
        status_ms = (time.perf_counter() - start) * 1000

        for name, _ in publishers:
            stack.signal(name, signal.SIGUSR1)
        loads, cold_s = _cold_loads(stack.nats_url, self.gateways, cold, COLD_CLIENTS)

        dying, leaving = publishers[: len(publishers) // 2], publishers[len(publishers) // 2 :]
        killed = time.monotonic()
        for name, _ in dying:
            stack.signal(name, signal.SIGKILL)
            stack.reap(name)
        dead = [node for _, nodes in dying for node in nodes]

        def noticed() -> bool:
            return all(_all(gw.statuses(), dead, lambda status: status in (None, "stale")) for gw in self.gateways)

        wait_for(noticed, 120, "the dead nodes to be noticed by every gateway")
        noticed_s = time.monotonic() - killed
        stopped = time.monotonic()
        for name, _ in leaving:
            stack.stop(name)
        left = {node for _, nodes in leaving for node in nodes}
        wait_for(lambda: all(not left & set(gw.statuses()) for gw in self.gateways), 120, "the stopped nodes to leave")
        return {
            "nodes": n,
            "lag_p50_ms": lag_q[0] * 1000,
            "lag_p99_ms": lag_q[1] * 1000,
            "gateway_cpu_pct": cpu * 100,
            "others_cpu_pct": others_cpu * 100,
            "heartbeat_kb_s": traffic / 1024,
            "heartbeat_kb": traffic / (n / INTERVAL_S) / 1024,
            "requests_per_s": rate,
            "route_p50_us": route_q[0] * 1e6,
            "route_p99_us": route_q[1] * 1e6,
            "place_p50_ms": place[0],
            "place_p99_ms": place[1],
            "models_p50_ms": models[0],
            "models_p99_ms": models[1],
            "fleet_p50_ms": fleet[0],
            "fleet_p99_ms": fleet[1],
            "status_ms": status_ms,
            "loads": loads,
            "cold_s": cold_s,
            "noticed_s": noticed_s,
            "left_s": time.monotonic() - stopped,
        }


COLUMNS = [
    ("nodes", "{nodes:.0f}"),
    ("view lag p50 / p99 ms", "{lag_p50_ms:.0f} / {lag_p99_ms:.0f}"),
    ("gateway CPU % (no requests)", "{gateway_cpu_pct:.1f}"),
    ("NATS + simulator CPU %", "{others_cpu_pct:.0f}"),
    ("nodes' KB/s (per heartbeat)", "{heartbeat_kb_s:.0f} ({heartbeat_kb:.2f})"),
    ("requests/s", "{requests_per_s:.0f}"),
    ("route p50 / p99 us", "{route_p50_us:.0f} / {route_p99_us:.0f}"),
    ("place p50 / p99 ms", "{place_p50_ms:.2f} / {place_p99_ms:.2f}"),
    ("/v1/models p50 / p99 ms", "{models_p50_ms:.1f} / {models_p99_ms:.1f}"),
    ("/fleet.json p50 / p99 ms", "{fleet_p50_ms:.0f} / {fleet_p99_ms:.0f}"),
    ("cortex status ms", "{status_ms:.0f}"),
    ("loads, for 3 models x 50 requests per gateway at once (s)", "{loads:.0f} ({cold_s:.1f})"),
    ("dead noticed after s", "{noticed_s:.1f}"),
    ("left after s", "{left_s:.1f}"),
]


def table(rows: list[dict[str, float]]) -> str:
    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |", "|" + "---:|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(f.format(**r) for _, f in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(prog="python -m bench fleet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="10,100,1000", help="fleet sizes, comma-separated")
    parser.add_argument("--root", type=Path, default=Path("/tmp/cortex-bench-fleet"))
    parser.add_argument("--seconds", type=float, default=MEASURE_S, help="measured with each fleet in view")
    parser.add_argument("--requests", type=int, default=REQUESTS, help="requests sent with each fleet in view")
    parser.add_argument("--servers", type=int, default=SERVERS, help="nats-servers, clustered, with a gateway on each")
    parser.add_argument(
        "--quick", action="store_true", help="CI: 100 nodes, briefly; checks every step, saves no results"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.nodes, args.seconds, args.requests = "100", 2.0, 100
    fleet = Fleet(args.root, args.servers)
    rows = []
    try:
        alone = fleet.requests_per_s(args.requests)
        print(f"requests/s with the serving node alone: {alone:.0f}", flush=True)
        for n in (int(x) for x in args.nodes.split(",")):
            rows.append(fleet.measure(n, args.seconds, args.requests, UNHELD[:1] if args.quick else UNHELD))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    finally:
        fleet.close()
    text = table(rows)
    print(text)
    if args.quick:
        return rows
    RESULTS.mkdir(exist_ok=True)
    servers = (
        f"{args.servers} nats-servers clustered on loopback and a gateway on each"
        if args.servers > 1
        else "one nats-server and one gateway"
    )
    header = (
        f"cortex fleet simulation, {time.strftime('%Y-%m-%d')}: {servers}, on 2 cores; N simulated nodes in "
        f"{PUBLISHERS} processes, a heartbeat every {INTERVAL_S:g} s each, {len(CATALOGUE)} catalogue models; "
        f"one synthetic node serving `{SERVED}`, "
        f"{CONCURRENCY} requests at a time through one gateway ({args.requests} per row; {alone:.0f} requests/s "
        "with that node alone in view)\n\n"
    )
    name = "fleet" if args.servers == SERVERS else f"fleet-{args.servers}-server"
    (RESULTS / f"{name}.md").write_text(header + text + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps({"alone_requests_per_s": alone, "rows": rows}, indent=1) + "\n")
    return rows


def _publish_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_sim publish")
    parser.add_argument("--nats", required=True)
    parser.add_argument("--first", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--interval", type=float, default=INTERVAL_S)
    args = parser.parse_args(argv)
    asyncio.run(publish(args.nats, args.first, args.count, args.interval))


if __name__ == "__main__":
    if sys.argv[1:2] == ["publish"]:
        _publish_main(sys.argv[2:])
    else:
        main(sys.argv[1:])
