"""The gateway's two owners: `build_gateway` (the long-lived state, built whole and closed once) and
`ExchangeMiddleware` (each request: its id, and one record of how it ended)."""

from __future__ import annotations

import time

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from fastapi.testclient import TestClient
from prometheus_client import generate_latest

from cortex.config.gateway import CortexSettings
from cortex.config.nats_settings import NatsSettings
from cortex.gateway import errors
from cortex.gateway.exchange import ExchangeMiddleware, exchange
from cortex.gateway.metrics import GatewayMetrics
from cortex.gateway.service import build_gateway
from cortex.protocol.catalogue import Catalogue
from cortex.protocol.errors import CortexError, ErrorCode, TransportError


def _sample(metrics: GatewayMetrics, name: str, labels: dict[str, str]) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_build_gateway_returns_it_running_and_aclose_closes_it_once(nats_url: str) -> None:
    metrics = GatewayMetrics()
    settings = CortexSettings(nats=NatsSettings(servers=[nats_url]))
    gateway = await build_gateway(settings, Catalogue([]), metrics)
    assert gateway.connected
    assert b"cortex_node_up" in generate_latest(metrics.registry)  # the fleet's gauges are reported
    await gateway.aclose()
    assert not gateway.connected
    assert b"cortex_node_up" not in generate_latest(metrics.registry)
    await gateway.aclose()  # a second close is a no-op
    async with await build_gateway(settings, Catalogue([]), metrics) as again:  # the same metrics, again
        assert again.connected
    assert not again.connected


async def test_a_gateway_that_cannot_reach_nats_does_not_start() -> None:
    settings = CortexSettings(nats=NatsSettings(servers=["nats://127.0.0.1:1"]))
    started = time.monotonic()
    with pytest.raises(TransportError):
        await build_gateway(settings, Catalogue([]), GatewayMetrics())
    assert time.monotonic() - started < 30


def _app(metrics: GatewayMetrics) -> FastAPI:
    app = FastAPI()
    app.add_middleware(ExchangeMiddleware, metrics=metrics)
    errors.install(app)

    @app.get("/ok")
    async def ok() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @app.get("/refused")
    async def refused() -> PlainTextResponse:
        raise CortexError("no", code=ErrorCode.forbidden)

    @app.get("/served")
    async def served(request: Request) -> PlainTextResponse:
        exchange(request).serve("m", "openai.chat", "")
        raise CortexError("busy", code=ErrorCode.busy)

    @app.get("/left")
    async def left(request: Request) -> PlainTextResponse:
        exchange(request).serve("m", "openai.chat", "").client_left()
        return PlainTextResponse("", status_code=499)

    @app.get("/boom")
    async def boom() -> PlainTextResponse:
        raise RuntimeError("a bug")

    return app


def test_every_response_carries_the_request_id_the_client_sent_or_a_new_one() -> None:
    client = TestClient(_app(GatewayMetrics()), raise_server_exceptions=False)
    assert client.get("/ok", headers={"x-request-id": "trace-1"}).headers["x-request-id"] == "trace-1"
    assert client.get("/refused", headers={"x-request-id": "trace-2"}).headers["x-request-id"] == "trace-2"
    assert client.get("/boom", headers={"x-request-id": "trace-3"}).headers["x-request-id"] == "trace-3"
    made = client.get("/ok").headers["x-request-id"]
    assert len(made) == 32 and made != client.get("/ok").headers["x-request-id"]
    assert len(client.get("/ok", headers={"x-request-id": "x" * 300}).headers["x-request-id"]) == 128


def test_each_request_is_counted_once_however_it_ended() -> None:
    metrics = GatewayMetrics()
    client = TestClient(_app(metrics), raise_server_exceptions=False)
    assert client.get("/ok").status_code == 200
    assert client.get("/refused").status_code == 403
    assert client.get("/served").status_code == 429
    assert client.get("/left").status_code == 499
    assert client.get("/boom").status_code == 500
    assert client.get("/nowhere").status_code == 404
    # Not an inference request: counted only when it failed, with no model.
    assert _sample(metrics, "cortex_request_errors_total", {"model": "", "code": "forbidden"}) == 1
    assert _sample(metrics, "cortex_request_errors_total", {"model": "", "code": "http_500"}) == 1
    assert _sample(metrics, "cortex_request_errors_total", {"model": "", "code": "http_404"}) == 1
    # An inference request: by its model, however it ended.
    served = {"model": "m", "node": "none", "api": "openai.chat"}
    assert _sample(metrics, "cortex_requests_total", {**served, "status": "429"}) == 1
    assert _sample(metrics, "cortex_requests_total", {**served, "status": "499"}) == 1
    assert _sample(metrics, "cortex_request_errors_total", {"model": "m", "code": "busy"}) == 1
    assert _sample(metrics, "cortex_request_errors_total", {"model": "m", "code": "client_closed_request"}) == 1
    assert _sample(metrics, "cortex_request_duration_seconds_count", {"model": "m", "api": "openai.chat"}) == 2
