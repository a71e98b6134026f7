"""A single nats-server restarts: a request that arrives during a short outage waits for NATS and
is answered; one that waits longer than `reconnect_wait` gets a 503 (OpenAI error envelope,
Retry-After); an answer under way when NATS went down is finished; and once NATS is back the
gateway and the neuron reconnect and serve again within 5 s, both when the server kept its
JetStream store (the buckets survive) and when it came back empty (the neuron and the gateway
create the buckets again).

The server is this module's own (the session's must not be restarted), on fixed free ports so
that clients find it again; the tests run in file order and each leaves NATS up and serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import nats
import nats.js.errors
import openai
import pytest

from cortex.devstack import natsserver
from cortex.protocol.subjects import NODES_BUCKET, PINS_BUCKET, PLACEMENT_BUCKET, estimates_key
from tests.conftest import Gateway, Proc, start_gateway, start_neuron, wait_until

pytestmark = pytest.mark.timeout(120)

MODEL = "test/tiny-llama"
COLD_MODEL = "test/tiny-llama-b"  # in the catalogue, loaded nowhere: a request for it is a cold start
NODE = "r1"
RECONNECT_WAIT_S = 2.0  # the gateway's reconnect_wait here
FAIL_FAST_S = 2.0  # a request while NATS stays down is answered within this after RECONNECT_WAIT_S
RECOVERY_S = 5.0  # a request succeeds again within this of NATS accepting connections


@dataclass
class NatsServer:
    """One nats-server on fixed ports; `start(workdir)` again with a new workdir = an empty store."""

    root: Path
    port: int = field(default_factory=natsserver.free_port)
    http_port: int = field(default_factory=natsserver.free_port)
    popen: subprocess.Popen[bytes] | None = None
    lives: int = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, *, empty: bool = False) -> float:
        """Starts the server (its store kept, or a new empty one); returns when it accepts connections."""
        self.lives += empty
        workdir = self.root / f"store-{self.lives}"
        self.popen = natsserver.start(
            port=self.port, http_port=self.http_port, workdir=workdir, log_file=workdir / "nats.log"
        )
        return time.monotonic()

    def down(self, sig: int) -> None:
        assert self.popen is not None
        self.popen.send_signal(sig)
        self.popen.wait(10)


@dataclass
class Fleet:
    nats: NatsServer
    gateway: Gateway
    neuron: Proc


@pytest.fixture(scope="module")
def tiny_models_toml(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    # Only the tiny model: conftest's models_toml would also build the 224 MB dense one.
    path = tmp_path_factory.mktemp("restart-config") / "models.toml"
    path.write_text(
        f'[[models]]\nid = "{MODEL}"\nsource = "file:{tiny_model_dir}"\naliases = ["tiny"]\n'
        f'[[models]]\nid = "{COLD_MODEL}"\nsource = "file:{tiny_model_dir}"\n'
    )
    return path


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, spawn: Callable[..., Proc], tiny_models_toml: Path
) -> Iterator[Fleet]:
    server = NatsServer(tmp_path_factory.mktemp("nats-restart"))
    server.start()
    gateway = neuron = None
    try:
        gateway = start_gateway(
            spawn,
            server.url,
            tiny_models_toml,
            name="gateway-restart",
            CORTEX_GATEWAY__RECONNECT_WAIT=str(RECONNECT_WAIT_S),
        )
        neuron = start_neuron(spawn, server.url, tiny_models_toml, NODE, "tiny")
        gateway.wait_for_model(MODEL)
        yield Fleet(server, gateway, neuron)
    finally:
        for proc in (gateway.proc if gateway else None, neuron):
            if proc is not None:
                proc.stop()
        if server.popen is not None:
            natsserver.stop(server.popen)


def client(fleet: Fleet, timeout: float) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{fleet.gateway.url}/v1", api_key="unused", max_retries=0, timeout=timeout)


def chat(fleet: Fleet, *, stream: bool = False, timeout: float = 10.0, model: str = "tiny") -> str:
    messages = [{"role": "user", "content": "Hello"}]
    api = client(fleet, timeout).chat.completions
    if stream:
        chunks = api.create(model=model, messages=messages, max_tokens=4, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reply = api.create(model=model, messages=messages, max_tokens=4, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length")
    return reply.choices[0].message.content or ""


def gateway_disconnected(fleet: Fleet) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{fleet.gateway.url}/health", timeout=1).json()["status"] == "nats_disconnected"
    return False


@contextlib.contextmanager
def outage(fleet: Fleet, sig: int = signal.SIGKILL) -> Iterator[None]:
    """NATS down (the gateway has noticed) for the block; up again, same store, and serving after it."""
    fleet.nats.down(sig)
    wait_until(lambda: gateway_disconnected(fleet), 5, "the gateway to notice NATS is gone", interval=0.05)
    try:
        yield
    finally:
        fleet.nats.start()
        seconds_until_served(fleet, since=time.monotonic(), limit=15)


def seconds_until_served(fleet: Fleet, since: float, limit: float) -> float:
    """Seconds from `since` until a chat request succeeds, trying every 0.1 s for up to `limit`."""

    def succeeds() -> bool:
        with contextlib.suppress(openai.OpenAIError):
            return isinstance(chat(fleet, timeout=limit), str)
        return False

    wait_until(succeeds, limit, "a chat request to succeed after NATS came back", interval=0.1)
    return time.monotonic() - since


def heartbeat_age(fleet: Fleet) -> float:
    """Seconds since the gateway last received the node's heartbeat through its KV watch (its own clock)."""
    with contextlib.suppress(httpx.HTTPError):
        nodes = httpx.get(f"{fleet.gateway.url}/fleet.json", timeout=1).json()["nodes"]
        return next((n["age_s"] for n in nodes if n["name"] == NODE), float("inf"))
    return float("inf")


def seconds_until_fresh(fleet: Fleet, since: float, limit: float) -> float:
    """Seconds from `since` until the gateway's watch has delivered a heartbeat sent after it."""
    wait_until(
        lambda: heartbeat_age(fleet) < time.monotonic() - since, limit, "a heartbeat through the new watch", 0.05
    )
    return time.monotonic() - since


def assert_fast_503(fleet: Fleet, *, stream: bool = False, model: str = "tiny") -> None:
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        chat(fleet, stream=stream, timeout=10, model=model)
    took = time.monotonic() - started
    assert caught.value.status_code == 503, caught.value
    assert RECONNECT_WAIT_S <= took < RECONNECT_WAIT_S + FAIL_FAST_S, f"the 503 took {took:.1f}s"
    assert caught.value.response.headers.get("retry-after")
    error = caught.value.body
    assert isinstance(error, dict) and error.get("message") and error.get("type"), error  # the OpenAI envelope


def test_a_chat_request_while_nats_stays_down_gets_503_after_the_reconnect_wait(fleet: Fleet) -> None:
    with outage(fleet):
        assert_fast_503(fleet)


def test_a_streaming_request_while_nats_stays_down_gets_503_after_the_reconnect_wait(fleet: Fleet) -> None:
    with outage(fleet, signal.SIGTERM):
        assert_fast_503(fleet, stream=True)


def test_a_request_during_a_short_outage_waits_for_nats_and_is_answered(fleet: Fleet) -> None:
    answers: list[str] = []
    with outage(fleet):
        client = threading.Thread(target=lambda: answers.append(chat(fleet, timeout=20)))
        client.start()
        time.sleep(0.5)
    client.join(20)
    assert answers and isinstance(answers[0], str)


def test_an_answer_under_way_when_nats_restarts_is_finished(fleet: Fleet) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Go on."}], "max_tokens": 1500, "temperature": 0}
    expected = httpx.post(f"{fleet.gateway.url}/v1/chat/completions", json=body, timeout=60).json()
    text = []
    with httpx.stream(
        "POST", f"{fleet.gateway.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60
    ) as r:
        lines = (json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {"))
        for i, chunk in enumerate(lines):
            assert "error" not in chunk, chunk
            text.append(chunk["choices"][0]["delta"].get("content") or "" if chunk["choices"] else "")
            if i == 2:
                fleet.nats.down(signal.SIGKILL)
                time.sleep(1.0)
                fleet.nats.start()
    assert "".join(text) == expected["choices"][0]["message"]["content"]


def test_a_cold_start_while_nats_is_down_gets_503_at_once(fleet: Fleet) -> None:
    with outage(fleet):
        assert_fast_503(fleet, model=COLD_MODEL)
        assert_fast_503(fleet, model=COLD_MODEL, stream=True)  # not a 200 stream that can only fail
    assert COLD_MODEL not in fleet.gateway.models()  # and nothing was left half-placed


def test_requests_succeed_within_5s_of_nats_restarting_with_its_store(fleet: Fleet) -> None:
    fleet.nats.down(signal.SIGKILL)
    wait_until(lambda: gateway_disconnected(fleet), 5, "the gateway to notice NATS is gone", interval=0.05)
    time.sleep(2)  # an outage longer than the watch's missed-heartbeat allowance
    back = fleet.nats.start()
    took = seconds_until_served(fleet, since=back, limit=15)
    fresh = seconds_until_fresh(fleet, since=back, limit=15)
    print(f"\nNATS restarted with its store: serving after {took:.2f}s, fleet view fresh after {fresh:.2f}s")
    assert took <= RECOVERY_S
    assert fresh <= RECOVERY_S
    assert isinstance(chat(fleet, stream=True), str)


def test_requests_succeed_within_5s_of_nats_restarting_empty(fleet: Fleet) -> None:
    fleet.nats.down(signal.SIGTERM)
    wait_until(lambda: gateway_disconnected(fleet), 5, "the gateway to notice NATS is gone", interval=0.05)
    time.sleep(2)
    back = fleet.nats.start(empty=True)
    took = seconds_until_served(fleet, since=back, limit=15)
    fresh = seconds_until_fresh(fleet, since=back, limit=15)
    print(f"\nNATS restarted empty: serving after {took:.2f}s, fleet view fresh after {fresh:.2f}s")
    assert took <= RECOVERY_S
    assert fresh <= RECOVERY_S
    assert NODE in fleet.gateway.models().get(MODEL, [])
    # The node writes its heartbeat and its estimates again (the estimates just after a heartbeat).
    again = {NODES_BUCKET: [NODE, estimates_key(NODE)], PINS_BUCKET: [], PLACEMENT_BUCKET: []}
    wait_until(lambda: asyncio.run(buckets_and_nodes(fleet.nats.url)) == again, 5, "the buckets made again")


async def buckets_and_nodes(url: str) -> dict[str, list[str]]:
    """Every cortex bucket on the server, with its keys: the clients created them again."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        out = {}
        for bucket in (NODES_BUCKET, PINS_BUCKET, PLACEMENT_BUCKET):
            kv = await js.key_value(bucket)  # raises BucketNotFoundError if nobody created it again
            try:
                out[bucket] = sorted(await kv.keys())
            except nats.js.errors.NoKeysError:
                out[bucket] = []
        return out
    finally:
        await nc.close()
