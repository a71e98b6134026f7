"""Graceful shutdown of the gateway: SIGTERM lets open streams finish within a bound, then exits."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.conftest import Proc, nats_request, start_gateway, wait_until

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 0, "stream": True}


def test_sigterm_lets_an_open_stream_finish_then_the_gateway_exits(
    spawn: Callable[..., Proc], nats_url: str, models_toml: Path, neuron: Proc
) -> None:
    gw = start_gateway(spawn, nats_url, models_toml, "gateway-sigterm")
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json={**BODY, "max_tokens": 200}, timeout=30) as r:
        lines = r.iter_lines()
        next(lines)
        gw.proc.popen.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert any('"finish_reason":"length"' in line for line in rest), "the stream ran to its end"
    # uvicorn re-raises the SIGTERM it caught once it is done: systemd counts that as a clean stop.
    assert gw.proc.popen.wait(20) in (0, -signal.SIGTERM)


def test_sigterm_cuts_streams_that_outlast_the_bound_and_cancels_their_jobs(
    spawn: Callable[..., Proc], nats_url: str, models_toml: Path, neuron: Proc
) -> None:
    gw = start_gateway(spawn, nats_url, models_toml, "gateway-bounded", CORTEX_GATEWAY__SHUTDOWN_TIMEOUT="1")
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json={**BODY, "max_tokens": 20000}, timeout=30) as r:
        lines = r.iter_lines()
        assert r.status_code == 200 and "chat.completion.chunk" in next(lines)
        gw.proc.popen.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        with contextlib.suppress(httpx.HTTPError):  # the server may close mid-chunk
            for _ in lines:
                pass
    assert gw.proc.popen.wait(20) in (0, -signal.SIGTERM)
    assert time.monotonic() - stopped < 10, "the gateway waited for the stream instead of its 1 s bound"
    # The node does not go on generating for nobody.
    wait_until(lambda: not nats_request(nats_url, "cortex.node.t1.status")["jobs"], 10, "t1 to have no jobs")
