"""Admission control end to end: a node runs `max_batch` jobs of a model, queues `max_queue` more,
and answers `busy` beyond that, which the gateway turns into a 429 with Retry-After."""

from __future__ import annotations

import threading

import httpx

from tests.conftest import wait_until

MODEL = "test/tiny-admission"
# Long answers (the end tokens barred), so the first two jobs are still there when the third comes.
BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Tell me a story."}],
    "max_tokens": 4000,
    "logit_bias": {"0": -100, "1": -100, "2": -100},
}


def _jobs_on_node(gateway) -> int:
    entry = httpx.get(f"{gateway.url}/v1/models/{MODEL}", timeout=5).json()
    return sum(s.get("in_flight", 0) + s.get("queued", 0) for s in entry["loaded"])


def test_beyond_max_batch_and_max_queue_the_node_answers_busy(spawn, nats_url, models_toml, gateway) -> None:
    args = ["serve", "--nats", nats_url, "--node", "adm1", "--models-config", str(models_toml)]
    args += ["--heartbeat-interval", "1", "--model", MODEL]
    proc = spawn("neuron-adm1", "neuron.cli", *args, env={"NEURON_MAX_BATCH": "1", "NEURON_MAX_QUEUE": "1"})
    url = f"{gateway.url}/v1/chat/completions"
    try:
        gateway.wait_for_model(MODEL)
        with httpx.Client(timeout=120) as client:
            with client.stream("POST", url, json={**BODY, "stream": True}) as running:
                assert running.status_code == 200
                lines = running.iter_lines()  # kept: a dropped iterator would close the stream
                next(lines)  # generating
                # The second waits in the node's queue; its answer starts only when it runs.
                queued = threading.Thread(target=lambda: httpx.post(url, json={**BODY, "max_tokens": 2}, timeout=120))
                queued.start()
                wait_until(lambda: _jobs_on_node(gateway) >= 2, 10, "a running and a queued job")
                refused = httpx.post(url, json=BODY, timeout=30)
        queued.join(60)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        error = refused.json()["error"]
        assert error["code"] == "busy" and "at capacity" in error["message"]
    finally:
        proc.stop()
