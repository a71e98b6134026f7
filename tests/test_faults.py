"""Clients that leave, neurons that die or are stopped."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import threading
import time

import httpx
import nats
import nats.js.errors
import pytest
from starlette.requests import Request

from cortex.gateway.streaming import ClientGone, unless_disconnected
from tests.conftest import HEARTBEAT_S, nats_request, start_gateway, start_neuron, wait_until

TINY = "test/tiny-llama"
# Greedy: the random model then never samples its end-of-sequence token by chance.
LONG = {
    "model": TINY,
    "messages": [{"role": "user", "content": "Go on forever."}],
    "max_tokens": 8000,
    "temperature": 0,
}


def _jobs(nats_url: str, node: str) -> list[dict]:
    return nats_request(nats_url, f"cortex.node.{node}.status")["jobs"]


def test_client_disconnect_mid_stream_stops_generation_on_the_neuron(gateway, neuron, nats_url) -> None:
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json={**LONG, "stream": True}, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(5):
            next(lines)
        running = _jobs(nats_url, "t1")
        assert len(running) == 1 and running[0]["state"] == "running"
        left_at = time.monotonic()
    # Leaving the `with` closed the connection after a handful of the 8000 tokens.
    wait_until(lambda: _jobs(nats_url, "t1") == [], 10.0, "the neuron to drop the job")
    assert time.monotonic() - left_at < 3.0
    assert "cancelled (request" in neuron.output()


def test_client_disconnect_while_waiting_for_a_whole_answer_stops_generation(gateway, neuron, nats_url) -> None:
    # A raw socket, so that "the client left" is exactly a closed connection after 1.5 s.
    host, port = gateway.url.removeprefix("http://").split(":")
    body = json.dumps(LONG).encode()
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_until(lambda: len(_jobs(nats_url, "t1")) == 1, 5, "the job to start")
        sock.shutdown(socket.SHUT_RDWR)
    wait_until(lambda: _jobs(nats_url, "t1") == [], 10.0, "the neuron to drop the job")


async def test_a_client_that_leaves_stops_work_that_swallowed_one_cancellation() -> None:
    # Python 3.11's asyncio.wait_for returns its inner result instead of raising when that result
    # is ready in the instant it is cancelled; the job stream then read on, for nobody.
    left = asyncio.Event()

    async def receive() -> dict:
        await left.wait()
        return {"type": "http.disconnect"}

    async def work() -> str:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(30)
        await asyncio.sleep(30)  # the next event of a job that nobody reads any more
        return "ran on"

    waiting = asyncio.create_task(unless_disconnected(Request({"type": "http"}, receive), work()))
    await asyncio.sleep(0.05)
    left.set()
    with pytest.raises(ClientGone):
        await asyncio.wait_for(waiting, 2)


def test_killed_neuron_ends_its_streams_leaves_the_fleet_and_its_model_moves(
    spawn, nats_url, models_toml, gateway, neuron
) -> None:
    victim = start_neuron(spawn, nats_url, models_toml, "victim", "test/tiny-llama-b")
    gateway.wait_for_model("test/tiny-llama-b")
    body = {**LONG, "model": "test/tiny-llama-b", "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        next(lines)
        victim.stop(signal.SIGKILL)
        killed_at = time.monotonic()
        rest = [line for line in lines if line]
        stream_ended_at = time.monotonic()
    # TTL is 3 heartbeats; the KV marker (or the gateway's own staleness check) follows within ~1s.
    budget = 3 * HEARTBEAT_S + 2.0
    assert stream_ended_at - killed_at <= budget
    assert rest[-1] == "data: [DONE]"
    assert '"code":"node_lost"' in rest[-2]
    wait_until(lambda: "test/tiny-llama-b" not in gateway.models(), budget, "the dead node's model to leave")
    assert time.monotonic() - killed_at <= budget
    # The next request loads the model on the surviving node.
    resp = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": "test/tiny-llama-b", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    assert gateway.models()["test/tiny-llama-b"] == ["t1"]
    nats_request(nats_url, "cortex.node.t1.unload", {"model": "test/tiny-llama-b"})


def test_sigterm_finishes_in_flight_jobs_then_removes_the_heartbeat(spawn, nats_url, models_toml, gateway) -> None:
    node = start_neuron(spawn, nats_url, models_toml, "leaving", "test/tiny-llama-c")
    gateway.wait_for_model("test/tiny-llama-c")
    body = {"model": "test/tiny-llama-c", "messages": [{"role": "user", "content": "x"}], "max_tokens": 300}
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json={**body, "stream": True}, timeout=30) as r:
        lines = r.iter_lines()
        next(lines)
        node.popen.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert any('"finish_reason":"length"' in line for line in rest), "the in-flight job ran to its end"
    assert node.popen.wait(20) == 0
    assert "test/tiny-llama-c" not in gateway.models()
    assert asyncio.run(_heartbeat_key_exists(nats_url, "leaving")) is False


async def _heartbeat_key_exists(nats_url: str, node: str) -> bool:
    nc = await nats.connect(nats_url)
    try:
        kv = await nc.jetstream().key_value("cortex_nodes")
        await kv.get(node)
        return True
    except nats.js.errors.KeyNotFoundError:  # KeyDeletedError is a subclass
        return False
    finally:
        await nc.close()


def test_client_that_leaves_while_its_job_is_queued_frees_the_queue_slot(gateway, neuron, nats_url) -> None:
    # Fill the node's max_batch (4) with long streams, so the next job waits in the queue.
    readers = []  # a line iterator that is dropped closes its response, so keep them
    with contextlib.ExitStack() as streams:
        for _ in range(4):
            resp = streams.enter_context(
                httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json={**LONG, "stream": True}, timeout=30)
            )
            readers.append(resp.iter_lines())
            next(readers[-1])
        wait_until(lambda: len(_jobs(nats_url, "t1")) == 4, 5, "four running jobs")
        try:
            httpx.post(f"{gateway.url}/v1/chat/completions", json=LONG, timeout=1.5)
        except httpx.ReadTimeout:
            pass
        wait_until(
            lambda: [j["state"] for j in _jobs(nats_url, "t1")] == ["running"] * 4,
            3.0,
            "the queued job of the client that left to be dropped",
        )
    wait_until(lambda: _jobs(nats_url, "t1") == [], 10.0, "the streams' jobs to be dropped")


def test_client_that_leaves_a_full_batch_hands_its_slot_to_the_queued_job(gateway, neuron, nats_url) -> None:
    """Under load (max_batch running, one more queued), a client that leaves frees its batch row at
    the next step: the queued job starts, and nothing generates for the client that left."""
    first_line: list[str] = []

    def queued_client() -> None:  # its response starts only once its job produces output
        body = {**LONG, "stream": True, "max_tokens": 16}
        with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=30) as resp:
            first_line.append(next(resp.iter_lines()))

    with contextlib.ExitStack() as streams:
        running = [
            streams.enter_context(
                httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json={**LONG, "stream": True}, timeout=30)
            )
            for _ in range(4)  # max_batch
        ]
        readers = [resp.iter_lines() for resp in running]  # kept: a dropped iterator closes its response
        for lines in readers:
            next(lines)
        fifth = threading.Thread(target=queued_client)
        fifth.start()
        wait_until(
            lambda: sorted(j["state"] for j in _jobs(nats_url, "t1")) == ["queued"] + ["running"] * 4,
            5,
            "four running jobs and one queued",
        )
        running[0].close()  # the first client leaves
        left_at = time.monotonic()
        fifth.join(10)
        took = time.monotonic() - left_at
        assert first_line and "chat.completion.chunk" in first_line[0], "the queued job took the freed slot"
        assert len(_jobs(nats_url, "t1")) <= 4
    wait_until(lambda: _jobs(nats_url, "t1") == [], 10.0, "the streams' jobs to be dropped")
    assert took < 3


def test_a_killed_gateways_jobs_are_cancelled_and_a_new_gateway_serves_at_once(
    spawn, nats_url, models_toml, neuron
) -> None:
    """Gateway restarted: its streams end with it, the node stops generating for nobody (NATS tells
    it that the reply inbox has no subscriber any more), and a new gateway finds everything in NATS."""
    old = start_gateway(spawn, nats_url, models_toml, "gateway-killed")
    with httpx.stream("POST", f"{old.url}/v1/chat/completions", json={**LONG, "stream": True}, timeout=30) as r:
        lines = r.iter_lines()
        next(lines)
        assert len(_jobs(nats_url, "t1")) == 1
        old.proc.stop(signal.SIGKILL)
        killed_at = time.monotonic()
        with contextlib.suppress(httpx.HTTPError):
            for _ in lines:
                pass
    wait_until(lambda: _jobs(nats_url, "t1") == [], 5, "the node to cancel the dead gateway's job")
    assert time.monotonic() - killed_at < 2
    assert "its gateway is gone" in neuron.output()

    new = start_gateway(spawn, nats_url, models_toml, "gateway-restarted")
    resp = httpx.post(
        f"{new.url}/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    new.proc.stop()


def test_a_job_whose_node_dies_before_its_first_token_is_retried_on_another_holder(
    spawn, nats_url, models_toml, gateway
) -> None:
    model = "test/tiny-retry"
    first = start_neuron(spawn, nats_url, models_toml, "k1", model)
    gateway.wait_for_model(model)
    answer: list[httpx.Response] = []

    def queued_client() -> None:
        body = {"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 8}
        answer.append(httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=60))

    with contextlib.ExitStack() as streams:
        body = {**LONG, "model": model, "stream": True}
        running = [
            streams.enter_context(httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=30))
            for _ in range(4)  # k1's max_batch: the next job waits in k1's queue, with no token yet
        ]
        readers = [resp.iter_lines() for resp in running]  # kept: a dropped iterator closes its response
        for lines in readers:
            next(lines)
        client = threading.Thread(target=queued_client)
        client.start()
        wait_until(lambda: "queued" in [j["state"] for j in _jobs(nats_url, "k1")], 5, "a job queued on k1")
        second = start_neuron(spawn, nats_url, models_toml, "k2", model)
        wait_until(lambda: "k2" in gateway.models().get(model, []), 60, f"{model} ready on k2")
        first.stop(signal.SIGKILL)
        client.join(30)
    assert answer and answer[0].status_code == 200, answer[0].text if answer else "no answer"
    assert answer[0].json()["usage"]["completion_tokens"] == 8
    second.stop()


def test_a_whole_answer_whose_node_dies_mid_way_is_a_502_envelope(spawn, nats_url, models_toml, gateway) -> None:
    model = "test/tiny-lost"
    victim = start_neuron(spawn, nats_url, models_toml, "lost1", model)
    gateway.wait_for_model(model)
    answer: list[httpx.Response] = []
    client = threading.Thread(
        target=lambda: answer.append(
            httpx.post(f"{gateway.url}/v1/chat/completions", json={**LONG, "model": model}, timeout=60)
        )
    )
    client.start()
    wait_until(lambda: [j["state"] for j in _jobs(nats_url, "lost1")] == ["running"], 10, "the job running")
    victim.stop(signal.SIGKILL)
    killed_at = time.monotonic()
    client.join(30)
    assert answer, "the client is still waiting"
    assert time.monotonic() - killed_at <= 3 * HEARTBEAT_S + 2.0
    assert answer[0].status_code == 502, answer[0].text
    error = answer[0].json()["error"]
    assert error["code"] == "node_lost", error
    wait_until(lambda: model not in gateway.models(), 3 * HEARTBEAT_S + 2.0, "the dead node to leave the view")
