"""Answers that move: a node killed or frozen mid-answer, with another holder of the model. The
answer goes on there from where it was (a continuation after the tokens the client has), and a
greedy answer is the very one an undisturbed run gives."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import Gateway, Proc, nats_request, start_neuron, wait_until

MODEL = "test/tiny-move"
BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Tell me everything."}],
    "max_tokens": 1500,
    "temperature": 0,
}


NODES = ("mv1", "mv2")


@pytest.fixture(scope="module")
def fleet_nodes(spawn, nats_url, models_toml, gateway) -> Iterator[dict[str, Proc]]:
    nodes: dict[str, Proc] = {}
    yield nodes
    for proc in nodes.values():
        proc.stop(signal.SIGKILL)
    wait_until(lambda: MODEL not in gateway.models(), 10, "the nodes to leave the view")


@pytest.fixture
def holders(fleet_nodes, spawn, nats_url, models_toml, gateway) -> dict[str, Proc]:
    """Both nodes serving MODEL: started, or started again where a test killed one."""
    for name in NODES:
        if name not in fleet_nodes or fleet_nodes[name].popen.poll() is not None:
            wait_until(lambda name=name: name not in gateway.models().get(MODEL, []), 10, f"{name} to leave")
            fleet_nodes[name] = start_neuron(spawn, nats_url, models_toml, name, MODEL)
    wait_until(lambda: sorted(gateway.models().get(MODEL, [])) == list(NODES), 60, f"{MODEL} on both nodes")
    return fleet_nodes


def _undisturbed(gateway: Gateway) -> str:
    resp = httpx.post(f"{gateway.url}/v1/chat/completions", json=BODY, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["finish_reason"] == "length"
    return resp.json()["choices"][0]["message"]["content"]


def _running_on(nats_url: str, nodes: dict[str, Proc]) -> str:
    def find() -> str | None:
        for name in nodes:
            if nats_request(nats_url, f"cortex.node.{name}.status")["jobs"]:
                return name
        return None

    found = wait_until(find, 10, "the job running on a node")
    assert isinstance(found, str)
    return found


def _moved(gateway: Gateway, reason: str = "") -> float:
    """Answers of MODEL moved so far (for `reason`, or any)."""
    text = httpx.get(gateway.metrics_url, timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("cortex_jobs_moved_total{") and f'model="{MODEL}"' in line and f'reason="{reason}' in line
    )


def _stream_while(gateway: Gateway, fault) -> tuple[str, list[dict]]:
    """Streams BODY, applies `fault` once the answer has begun, and returns the text and the chunks."""
    chunks: list[dict] = []
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json={**BODY, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunks.append(json.loads(line[len("data: ") :]))
            if len(chunks) == 3:
                fault()
    assert all("error" not in chunk for chunk in chunks), chunks[-1]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    return text, chunks


def test_a_stream_whose_node_is_killed_goes_on_on_the_other_holder_word_for_word(holders, gateway, nats_url) -> None:
    expected = _undisturbed(gateway)
    moved_before = _moved(gateway)
    text, chunks = _stream_while(gateway, lambda: holders[_running_on(nats_url, holders)].stop(signal.SIGKILL))
    assert text == expected
    assert [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")][-1] == "length"
    assert _moved(gateway) == moved_before + 1


def test_a_stream_whose_node_freezes_goes_on_on_the_other_holder_word_for_word(holders, gateway, nats_url) -> None:
    expected = _undisturbed(gateway)
    silent_before = _moved(gateway, "silent")
    frozen: list[Proc] = []

    def freeze() -> None:
        victim = holders[_running_on(nats_url, holders)]
        victim.popen.send_signal(signal.SIGSTOP)
        frozen.append(victim)

    try:
        text, _ = _stream_while(gateway, freeze)
    finally:
        for proc in frozen:
            proc.popen.send_signal(signal.SIGCONT)
    assert text == expected
    # Noticed by its silence, before its heartbeat could expire.
    assert _moved(gateway, "silent") == silent_before + 1


def test_a_whole_answer_whose_node_is_killed_is_the_undisturbed_answer(holders, gateway, nats_url) -> None:
    expected = _undisturbed(gateway)
    answer: list[httpx.Response] = []
    client = threading.Thread(
        target=lambda: answer.append(httpx.post(f"{gateway.url}/v1/chat/completions", json=BODY, timeout=60))
    )
    client.start()
    holders[_running_on(nats_url, holders)].stop(signal.SIGKILL)
    client.join(60)
    assert answer and answer[0].status_code == 200, answer[0].text if answer else "no answer"
    body = answer[0].json()
    assert body["choices"][0]["message"]["content"] == expected
    assert body["usage"]["completion_tokens"] == BODY["max_tokens"]
