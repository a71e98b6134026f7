"""Overload: ten times what the fleet can hold at once. The excess gets 429 with Retry-After at
once; every request that was accepted completes; queues and memory stay bounded."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import Gateway, Proc, nats_request, wait_until

MAX_BATCH, MAX_QUEUE = 4, 16  # the neuron's defaults: 20 jobs held at once per model per node
CAPACITY = MAX_BATCH + MAX_QUEUE


async def _one(client: httpx.AsyncClient, i: int) -> httpx.Response:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": f"request {i}"}],
        "max_tokens": 48,
        "temperature": 0,
    }
    return await client.post("/v1/chat/completions", json=body)


async def _flood(url: str, n: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        return await asyncio.gather(*(_one(client, i) for i in range(n)))


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@dataclass
class Flood:
    responses: list[httpx.Response]
    rss_growth_mb: dict[str, float]


@pytest.fixture(scope="module")
def flood(gateway: Gateway, neuron: Proc) -> Flood:
    procs = {"gateway": gateway.proc.popen.pid, "neuron": neuron.popen.pid}
    before = {name: _rss_mb(pid) for name, pid in procs.items()}
    responses = asyncio.run(_flood(gateway.url, 10 * CAPACITY))
    growth = {name: _rss_mb(pid) - before[name] for name, pid in procs.items()}
    codes = [r.status_code for r in responses]
    print(f"\n{len(codes)} requests: {codes.count(200)} answered, {codes.count(429)} refused; RSS growth {growth}")
    return Flood(responses, growth)


def test_the_excess_gets_429_with_retry_after(flood: Flood) -> None:
    refused = [r for r in flood.responses if r.status_code == 429]
    assert refused, "ten times the capacity was all accepted: nothing is bounded"
    for r in refused:
        assert r.headers["retry-after"].isdigit()
        assert r.json()["error"]["type"] == "rate_limit_error" or r.json()["error"]["code"] == "busy"


def test_every_request_is_answered_or_refused_nothing_else(flood: Flood) -> None:
    assert {r.status_code for r in flood.responses} <= {200, 429}, sorted({r.status_code for r in flood.responses})


def test_every_accepted_request_completes(flood: Flood) -> None:
    accepted = [r for r in flood.responses if r.status_code == 200]
    assert len(accepted) >= CAPACITY
    for r in accepted:
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 48


def test_nothing_is_left_queued_after_the_flood(flood: Flood, nats_url: str) -> None:
    wait_until(lambda: nats_request(nats_url, "cortex.node.t1.status")["jobs"] == [], 10, "an empty node")


def test_the_gateway_serves_normally_after_the_flood(flood: Flood, gateway: Gateway) -> None:
    resp = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4},
        timeout=30,
    )
    assert resp.status_code == 200


def test_memory_stays_bounded(flood: Flood) -> None:
    # 200 requests held at once: the gateway keeps no per-request state after the answer, and the
    # neuron holds at most max_batch + max_queue jobs. Growth is allocator slack, not a backlog.
    assert flood.rss_growth_mb["gateway"] < 100, flood.rss_growth_mb
    assert flood.rss_growth_mb["neuron"] < 300, flood.rss_growth_mb
