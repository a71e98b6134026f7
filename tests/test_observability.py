"""What operators see: the gateway's and the neuron's Prometheus metrics, /healthz, and logs
that carry one request id from the gateway into the neuron."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Gateway, Proc, start_gateway, start_neuron, wait_until

MODEL = "test/tiny-llama"


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample as (name, labels) -> value."""
    text = httpx.get(url, timeout=5).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum over the samples of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


@pytest.fixture(scope="module")
def served(openai_client, gateway: Gateway) -> dict:
    """One streamed chat request, then the gateway's metrics."""
    stream = openai_client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Count to ten."}],
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    usage = chunks[-1].usage
    pieces = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
    return {"usage": usage, "pieces": pieces, "metrics": scrape(gateway.metrics_url)}


def test_gateway_counts_the_request_with_its_labels(served: dict) -> None:
    labels = {"model": MODEL, "node": "t1", "api": "openai.chat", "status": "200"}
    assert value(served["metrics"], "cortex_requests_total", **labels) >= 1


def test_gateway_counts_tokens_as_the_usage_says(served: dict) -> None:
    m = served["metrics"]
    assert value(m, "cortex_completion_tokens_total", model=MODEL) >= served["usage"].completion_tokens
    assert value(m, "cortex_prompt_tokens_total", model=MODEL) >= served["usage"].prompt_tokens


def test_gateway_times_first_token_gaps_and_queue(served: dict) -> None:
    m = served["metrics"]
    assert value(m, "cortex_time_to_first_token_seconds_count", model=MODEL) >= 1
    assert value(m, "cortex_request_duration_seconds_count", model=MODEL, api="openai.chat") >= 1
    assert value(m, "cortex_queue_wait_seconds_count", model=MODEL) >= 1
    # One gap per streamed piece after the first (tokens that were ready together went as one piece).
    assert value(m, "cortex_inter_token_latency_seconds_count", model=MODEL) >= served["pieces"] - 1
    assert value(m, "cortex_tokens_per_second_count", model=MODEL) >= 1


def test_gateway_reports_the_fleet_from_heartbeats(served: dict) -> None:
    m = served["metrics"]
    assert value(m, "cortex_node_up", node="t1") == 1
    assert value(m, "cortex_model_state", node="t1", model=MODEL, state="ready") == 1
    assert value(m, "cortex_model_state", node="t1", model=MODEL, state="loading") == 0
    assert value(m, "cortex_device_memory_total_bytes", node="t1", device="cpu") > 0
    assert value(m, "cortex_model_memory_bytes", node="t1", model=MODEL) > 0


def test_gateway_times_how_fresh_its_view_of_the_fleet_is(served: dict) -> None:
    m = served["metrics"]
    seen = value(m, "cortex_heartbeat_lag_seconds_count")
    assert seen >= 1  # every heartbeat of t1 since the gateway started
    # On one host (one clock) a heartbeat reaches the view in milliseconds: none is counted as late.
    assert value(m, "cortex_heartbeat_lag_seconds_bucket", le="5.0") == seen


def test_error_labels_never_carry_the_clients_model_name(openai_client, gateway: Gateway) -> None:
    import openai

    with pytest.raises(openai.NotFoundError):
        openai_client.chat.completions.create(
            model="no-such-model-x7", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    m = scrape(gateway.metrics_url)
    assert value(m, "cortex_request_errors_total", model="", code="model_not_found") >= 1
    assert not any("no-such-model-x7" in str(labels) for _, labels in m)


def test_gateway_shows_live_tokens_per_second_from_the_heartbeat(openai_client, gateway: Gateway) -> None:
    openai_client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Write a story."}], max_tokens=64, temperature=0
    )
    # The node's rate covers the last few seconds; its next heartbeat carries it.
    wait_until(
        lambda: value(scrape(gateway.metrics_url), "cortex_model_tokens_per_second", node="t1", model=MODEL) > 0,
        5,
        "a tokens/s above zero in the heartbeat",
    )


def test_neuron_metrics_count_steps_prefill_jobs_and_loads(served: dict, neuron: Proc) -> None:
    m = scrape(f"{neuron.telemetry}/metrics")
    assert value(m, "neuron_decode_tokens_total", model=MODEL) >= served["usage"].completion_tokens - 1
    assert value(m, "neuron_prefill_tokens_total", model=MODEL) >= served["usage"].prompt_tokens
    assert value(m, "neuron_batch_size_count", model=MODEL) >= served["usage"].completion_tokens - 1
    assert value(m, "neuron_jobs_total", model=MODEL) >= 1
    assert value(m, "neuron_model_load_seconds_count", model=MODEL, outcome="ready") == 1
    assert value(m, "neuron_device_memory_total_bytes", device="cpu") > 0
    assert value(m, "neuron_model_memory_bytes", model=MODEL, state="ready") > 0
    assert value(m, "neuron_up") == 1


def test_neuron_healthz_names_the_node(neuron: Proc) -> None:
    reply = httpx.get(f"{neuron.telemetry}/healthz", timeout=5)
    assert reply.status_code == 200
    assert reply.json() == {"status": "ok", "node": "t1", "nats_connected": True, "draining": False}


def _json_lines(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def test_json_logs_carry_the_request_id_from_gateway_into_neuron(
    spawn: Callable[..., Proc], nats_url: str, models_toml: Path
) -> None:
    gw = start_gateway(spawn, nats_url, models_toml, "gateway-json", CORTEX_LOG_FORMAT="json")
    node = start_neuron(spawn, nats_url, models_toml, "logs1", "test/tiny-logs", env={"NEURON_LOG_FORMAT": "json"})
    try:
        gw.wait_for_model("test/tiny-logs")
        reply = httpx.post(
            f"{gw.url}/v1/chat/completions",
            json={"model": "test/tiny-logs", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            headers={"x-request-id": "trace-me-0042"},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        assert reply.headers["x-request-id"] == "trace-me-0042"
        wait_until(
            lambda: any(r.get("request_id") == "trace-me-0042" for r in _json_lines(gw.proc.log)),
            5,
            "the gateway's log line",
        )
        gateway_lines = [r for r in _json_lines(gw.proc.log) if r.get("request_id") == "trace-me-0042"]
        neuron_lines = [r for r in _json_lines(node.log) if r.get("request_id") == "trace-me-0042"]
        assert any("status=200" in r["msg"] for r in gateway_lines)
        assert {r["service"] for r in neuron_lines} == {"neuron logs1"}
        # Accepted and finished: both carry the job id the gateway made.
        assert len({r["job_id"] for r in neuron_lines}) == 1
        assert any("accepted" in r["msg"] for r in neuron_lines)
        assert all({"ts", "level", "logger", "msg"} <= r.keys() for r in neuron_lines)
    finally:
        node.stop()
        gw.proc.stop()


def test_token_rates_cover_the_last_window_only() -> None:
    from neuron.metrics import TokenRates

    rates = TokenRates(window_s=5.0)
    assert rates.rates(now=100.0) == {}
    rates.add("m", 50)
    assert rates.rates(now=101.0) == {"m": 50.0}  # 50 tokens in the 1 s since the first sample
    rates.add("m", 100)
    assert rates.rates(now=102.0) == {"m": 75.0}  # 150 tokens over 2 s
    # Nothing more for a while: once the window has passed, the rate falls to zero.
    rates.rates(now=104.0)
    rates.rates(now=108.0)
    assert rates.rates(now=113.0) == {"m": 0.0}


def test_alert_rules_use_only_metrics_that_exist(served: dict, gateway: Gateway, neuron: Proc) -> None:
    import re

    import yaml

    rules = yaml.safe_load((Path(__file__).parents[1] / "deploy/prometheus/alerts.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    used = {name for expr in exprs for name in re.findall(r"\b((?:cortex|neuron)_[a-z_]+)\b", expr)}
    exposed = set()
    for url in (gateway.metrics_url, f"{neuron.telemetry}/metrics"):
        exposed |= set(re.findall(r"^# TYPE (\S+)", httpx.get(url, timeout=5).text, re.M))
        exposed |= {name for name, _ in scrape(url)}
    assert used and used <= exposed, used - exposed
