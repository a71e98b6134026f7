"""Cache-aware routing, end to end: two nodes and two gateways on a NATS server of their own.

Sessions start wherever load sends them; each later turn (through either gateway) goes to the
node that holds the conversation warm, which reads it from its prefix cache instead of computing
it again (`usage.prompt_tokens_details.cached_tokens`). With two equal nodes, a turn that went
by chance would find nothing cached half the time: eight later turns all warm cannot be luck.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from openai import OpenAI

from tests.conftest import HEARTBEAT_S, Gateway, running_nats, start_gateway, start_neuron

pytestmark = pytest.mark.timeout(180)

MODEL = "test/tiny-llama-b"
SYSTEM = "You review pull requests for a team that writes a fleet manager. " * 10
SESSIONS = 4


@pytest.fixture(scope="module")
def gateways(spawn, models_toml: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Gateway]]:
    with running_nats(tmp_path_factory.mktemp("nats-routing")) as url:
        for node in ("warm-1", "warm-2"):
            start_neuron(spawn, url, models_toml, node, MODEL)
        both = [start_gateway(spawn, url, models_toml, name=f"gateway-{name}") for name in ("a", "b")]
        for gateway in both:
            gateway.wait_for_model(MODEL)
        wait_until_both_serve(both[0])
        yield both


def wait_until_both_serve(gateway: Gateway) -> None:
    deadline = time.monotonic() + 60
    while len(gateway.models().get(MODEL, [])) < 2:
        assert time.monotonic() < deadline, "both nodes never showed the model"
        time.sleep(0.2)


def _turn(gateway: Gateway, history: list[dict[str, str]]) -> tuple[str, int, int]:
    client = OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=60)
    reply = client.chat.completions.create(model=MODEL, messages=history, max_tokens=12, temperature=0)
    usage = reply.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    return reply.choices[0].message.content or "", usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens or 0


def test_each_later_turn_goes_to_the_node_holding_its_conversation(gateways) -> None:
    histories = [
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Session {i}: review my first change."}]
        for i in range(SESSIONS)
    ]
    cached: list[tuple[int, int]] = []  # (the previous turn's prompt tokens, what this turn read from cache)
    previous = [0] * SESSIONS
    with ThreadPoolExecutor(SESSIONS) as pool:
        for turn in range(3):
            # Turns alternate gateways: the second gateway routes each session where the first sent it.
            gateway = gateways[turn % 2]
            results = list(pool.map(_turn, [gateway] * SESSIONS, histories))
            for i, (text, prompt_tokens, cached_tokens) in enumerate(results):
                if turn:
                    cached.append((previous[i], cached_tokens))
                previous[i] = prompt_tokens
                histories[i] += [{"role": "assistant", "content": text}, {"role": "user", "content": "And next?"}]
            time.sleep(2.5 * HEARTBEAT_S)  # the nodes advertise what they now hold
    # Each session's own turns differ from the start ("Session i"): only its own node holds them.
    assert all(c >= p - 32 for p, c in cached), cached
