"""What an operator sees with the `nats` CLI, reproduced byte for byte with a raw nats-py connection.

Each helper sends what natscli sends (read from its source, cli/micro_command.go, cli/util.go
`doReqAsync`, cli/kv_command.go + nats.go `jetstream/kv.go` `WatchFiltered`, cli/sub_command.go,
cli/req_command.go) and renders what it prints. None of cortex's own client helpers are used:
these tests check that the fleet is legible to a stock tool, not to our code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from cortex.devstack import natsserver
from tests.conftest import HEARTBEAT_S, Proc, wait_until

TINY = "test/tiny-llama"
TINY_KEY = "test_2Ftiny-llama"  # model_key("test/tiny-llama"), computed by hand as the README says
SECOND_NODE = "cli2"
SECOND_MODEL = "test/tiny-llama-b"
# The job JSON an operator types: nothing they would have to invent (job_id, request_id).
MINIMAL_JOB = (
    '{"model": "test/tiny-llama", "messages": [{"role": "user", "content": "Hello"}], "sampling": {"max_tokens": 16}}'
)

# natscli's `doReqAsync` (used by `nats micro ...`): with waitFor=0 it stops 300 ms after the
# last reply (the "finisher" timer), or at --timeout (5 s default) when none comes.
_GATHER_QUIET_S = 0.3
_CLI_TIMEOUT_S = 5.0


async def _connect(url: str) -> Client:
    return await nats.connect(url, name="natscli-replica")


# --- nats micro ls / info / stats ---------------------------------------------------------------


async def micro_request(
    nc: Client, verb: str, service: str = "", instance: str = "", wait_for: int = 0, timeout: float = _CLI_TIMEOUT_S
) -> list[dict]:
    """`$SRV.<VERB>[.<service>[.<id>]]` with body `{}` and `Accept-Encoding: snappy`, as natscli sends it;
    gathers replies until `wait_for` arrived, or 300 ms of quiet, or the timeout."""
    subject = ".".join(part for part in ("$SRV", verb, service, instance) if part)
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(subject, b"{}", reply=inbox, headers={"Accept-Encoding": "snappy"})
    replies: list[dict] = []
    deadline = time.monotonic() + timeout
    wait = timeout
    try:
        while time.monotonic() < deadline and not (wait_for and len(replies) >= wait_for):
            try:
                msg = await sub.next_msg(timeout=min(wait, deadline - time.monotonic()))
            except nats.errors.TimeoutError:
                break
            if msg.headers and msg.headers.get("Status") == "503":
                raise nats.errors.NoRespondersError
            assert not (msg.headers or {}).get("Content-Encoding"), "micro replies are plain JSON"
            replies.append(json.loads(msg.data))
            wait = _GATHER_QUIET_S
    finally:
        await sub.unsubscribe()
    return replies


def render_micro_ls(infos: list[dict]) -> str:
    """The table `nats micro ls` prints (columns Name, Version, ID, Description)."""
    rows = sorted((i["name"], i["version"], i["id"], i["description"]) for i in infos)
    return "\n".join(" | ".join(row) for row in [("Name", "Version", "ID", "Description"), *rows])


# --- nats kv watch ------------------------------------------------------------------------------


@dataclass
class KvEntry:
    op: str  # PUT, DELETE or PURGE, as `nats kv watch` prints it
    key: str
    value: bytes
    revision: int
    created: float

    def render(self, bucket: str) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.created))
        if self.op == "PUT":
            return f"[{when}] PUT {bucket} > {self.key}: {self.value.decode()}"
        return f"[{when}] {self.op} {bucket} > {self.key}"


@contextlib.asynccontextmanager
async def kv_watch(nc: Client, bucket: str, key: str = ">") -> AsyncIterator[asyncio.Queue[KvEntry | None]]:
    """`nats kv watch <bucket>`: nats.go's KV watcher, an ordered push consumer on the bucket's stream
    that delivers the last value per key, then every change. Yields a queue of entries, with `None`
    once the initial values are in (nats.go's init marker)."""
    deliver = nc.new_inbox()
    entries: asyncio.Queue[KvEntry | None] = asyncio.Queue()
    state = {"pending": 0, "received": 0, "init_done": False}
    # Deliveries can beat the create reply; like nats.go (which holds a lock), count them only once
    # the initial pending count is known.
    created_seen = asyncio.Event()
    prefix = f"$KV.{bucket}."

    async def on_msg(msg: Msg) -> None:
        headers = msg.headers or {}
        if headers.get("Status") == "100":
            # Idle heartbeat (no reply) or flow control request (answer it, or delivery stalls).
            if msg.reply:
                await nc.publish(msg.reply, b"")
            return
        await created_seen.wait()
        tokens = msg.reply.split(".")
        # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>, or the v2 form
        # with <domain>.<account hash> after $JS.ACK.
        base = 2 if len(tokens) == 9 else 4
        revision, created_ns, pending = int(tokens[base + 3]), int(tokens[base + 5]), int(tokens[base + 6])
        op = {"DEL": "DELETE", "PURGE": "PURGE"}.get(headers.get("KV-Operation", ""), "PUT")
        if headers.get("Nats-Marker-Reason") in ("MaxAge", "Purge"):
            op = "PURGE"
        elif headers.get("Nats-Marker-Reason") == "Remove":
            op = "DELETE"
        entries.put_nowait(KvEntry(op, msg.subject[len(prefix) :], msg.data, revision, created_ns / 1e9))
        if not state["init_done"]:
            state["received"] += 1
            if state["received"] >= state["pending"] or pending == 0:
                state["init_done"] = True
                entries.put_nowait(None)

    sub = await nc.subscribe(deliver, cb=on_msg)
    # nats.go's OrderedConsumer(): no acks, one delivery, flow control, 5 s idle heartbeats, R1 in
    # memory; DeliverLastPerSubject() because `nats kv watch` does not ask for history.
    config = {
        "deliver_subject": deliver,
        "deliver_policy": "last_per_subject",
        "ack_policy": "none",
        "max_deliver": 1,
        "ack_wait": 22 * 3600 * 10**9,
        "filter_subject": f"{prefix}{key}",
        "replay_policy": "instant",
        "flow_control": True,
        "idle_heartbeat": 5 * 10**9,
        "mem_storage": True,
        "num_replicas": 1,
    }
    stream = f"KV_{bucket}"
    reply = await nc.request(
        f"$JS.API.CONSUMER.CREATE.{stream}", json.dumps({"stream_name": stream, "config": config}).encode(), timeout=5
    )
    created = json.loads(reply.data)
    assert "error" not in created, created
    state["pending"] = created["num_pending"]
    if state["pending"] == 0:
        state["init_done"] = True
        entries.put_nowait(None)
    created_seen.set()
    try:
        yield entries
    finally:
        await sub.unsubscribe()


# --- nats sub -------------------------------------------------------------------------------------


def render_sub(n: int, msg: Msg) -> str:
    """What `nats sub` prints for one message."""
    return f'[#{n}] Received on "{msg.subject}"\n{msg.data.decode()}\n'


# --- nats req --replies=0 --wait-for-empty --------------------------------------------------------


async def request_stream(nc: Client, subject: str, body: str, timeout: float = 30.0) -> tuple[list[Msg], list[str]]:
    """`nats req <subject> '<body>' --replies=0 --wait-for-empty --timeout=<timeout>`: one message with
    a reply inbox, then every reply until one with an empty body, within the overall timeout.
    Returns the replies and what the CLI prints for each."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(subject, body.encode(), reply=inbox)
    replies: list[Msg] = []
    printed: list[str] = []
    start = time.monotonic()
    try:
        while True:
            left = timeout - (time.monotonic() - start)
            assert left > 0, f"no empty end marker within {timeout}s: {[m.data for m in replies]}"
            msg = await sub.next_msg(timeout=left)
            if msg.headers and msg.headers.get("Status") == "503":
                printed.append("No responders are available")
                break
            replies.append(msg)
            headers = "".join(f"{k}: {v}\n" for k, v in (msg.headers or {}).items())
            shown = msg.data.decode() if msg.data else "nil body"
            printed.append(f"Received with rtt {(time.monotonic() - start) * 1000:.2f}ms\n{headers}{shown}\n")
            if not msg.data:
                break
    finally:
        await sub.unsubscribe()
    return replies, printed


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def second_node(spawn: Callable[..., Proc], nats_url: str, models_toml: Path, neuron: Proc) -> Proc:
    """A second neuron, `cli2`, with no model: a fleet of two for `micro ls`, and a node to load on."""
    args = ["serve", "--nats", nats_url, "--node", SECOND_NODE, "--models-config", str(models_toml)]
    args += ["--heartbeat-interval", str(HEARTBEAT_S), "--metrics-listen", f"127.0.0.1:{natsserver.free_port()}"]
    proc = spawn(f"neuron-{SECOND_NODE}", "neuron.cli", *args)

    def listed() -> bool:
        assert proc.popen.poll() is None, proc.output()
        infos = asyncio.run(_micro_ls(nats_url))
        return any(i["metadata"].get("node") == SECOND_NODE for i in infos)

    wait_until(listed, 60, f"{SECOND_NODE} in `nats micro ls`", interval=0.5)
    return proc


async def _micro_ls(nats_url: str) -> list[dict]:
    nc = await _connect(nats_url)
    try:
        return await micro_request(nc, "INFO")
    finally:
        await nc.close()


# --- tests ----------------------------------------------------------------------------------------


async def test_micro_ls_lists_one_neuron_instance_per_node(nats_url, second_node) -> None:
    nc = await _connect(nats_url)
    try:
        infos = await micro_request(nc, "INFO", "neuron")
    finally:
        await nc.close()
    print(render_micro_ls(infos))
    by_node = {i["metadata"]["node"]: i for i in infos}
    assert sorted(by_node) == ["cli2", "t1"], "one instance per node, named by its metadata"
    for node, info in by_node.items():
        assert info["type"] == "io.nats.micro.v1.info_response"
        assert info["name"] == "neuron"
        assert info["version"]
        assert info["description"] == f"cortex neuron on node {node}"
    assert len({i["id"] for i in infos}) == 2, "each instance has its own id"


async def test_micro_info_lists_the_control_endpoints_and_their_subjects(nats_url, neuron) -> None:
    nc = await _connect(nats_url)
    try:
        # `nats micro info neuron` takes the first reply only.
        info = (await micro_request(nc, "INFO", "neuron", wait_for=1))[0]
        node = info["metadata"]["node"]
        # ...then asks that instance for its stats, as the CLI does to fill in the rest of the page.
        stats = await micro_request(nc, "STATS", "neuron", info["id"], wait_for=1)
    finally:
        await nc.close()
    print(json.dumps(info, indent=1))
    endpoints = {e["name"]: e["subject"] for e in info["endpoints"]}
    assert endpoints == {v: f"cortex.node.{node}.{v}" for v in ("load", "unload", "status", "cancel", "count")}
    assert {e["name"] for e in stats[0]["endpoints"]} == set(endpoints)
    # natscli validates both replies against the micro v1 JSON schemas (jsm.go) before printing.
    assert re.fullmatch(r"\d+\.\d+\.\d+", info["version"]), "a semver version"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", stats[0]["started"]), "RFC 3339"
    assert all(isinstance(e["data"], dict) for e in stats[0]["endpoints"]), "`data` must be an object, not null"
    assert all(isinstance(e["last_error"], str) for e in stats[0]["endpoints"])


async def test_micro_stats_counts_requests_and_errors_per_endpoint(nats_url, neuron) -> None:
    nc = await _connect(nats_url)
    try:

        async def t1_stats() -> dict[str, dict]:
            stats = await micro_request(nc, "STATS", "neuron")
            infos = {i["id"]: i["metadata"]["node"] for i in await micro_request(nc, "INFO", "neuron")}
            mine = next(s for s in stats if infos[s["id"]] == "t1")
            assert mine["type"] == "io.nats.micro.v1.stats_response"
            return {e["name"]: e for e in mine["endpoints"]}

        before = await t1_stats()
        # `nats req cortex.node.t1.status ''` and a cancel whose body is not JSON.
        ok = await nc.request("cortex.node.t1.status", b"", timeout=5)
        bad = await nc.request("cortex.node.t1.cancel", b"not json", timeout=5)
        after = await t1_stats()
    finally:
        await nc.close()
    for name, e in after.items():  # the rows of `nats micro stats neuron` for t1
        print(f"{name:8} requests={e['num_requests']} errors={e['num_errors']} last_error={e['last_error'][:60]!r}")
    assert json.loads(ok.data)["heartbeat"]["node"] == "t1"
    assert bad.headers["Nats-Service-Error-Code"] == "400"
    assert after["status"]["num_requests"] == before["status"]["num_requests"] + 1
    assert after["status"]["num_errors"] == before["status"]["num_errors"]
    assert after["cancel"]["num_requests"] == before["cancel"]["num_requests"] + 1
    assert after["cancel"]["num_errors"] == before["cancel"]["num_errors"] + 1, "an error reply counts as an error"
    assert "invalid request" in after["cancel"]["last_error"]


async def test_kv_watch_shows_each_nodes_heartbeat_then_a_new_revision(nats_url, neuron) -> None:
    nc = await _connect(nats_url)
    try:
        async with kv_watch(nc, "cortex_nodes") as entries:
            initial: list[KvEntry] = []
            while (entry := await asyncio.wait_for(entries.get(), 5)) is not None:
                initial.append(entry)
            latest = {e.key: e for e in initial}
            first = latest["t1"]
            # The next beat of t1 must come within about one interval.
            deadline = time.monotonic() + 3 * HEARTBEAT_S
            while True:
                entry = await asyncio.wait_for(entries.get(), max(0.1, deadline - time.monotonic()))
                if entry is not None and entry.key == "t1":
                    break
    finally:
        await nc.close()
    print(first.render("cortex_nodes")[:900], "...")
    assert first.op == "PUT"
    beat = json.loads(first.value)
    assert beat["node"] == "t1"
    assert any(m["id"] == TINY and m["state"] == "ready" for m in beat["models"])
    assert entry.op == "PUT"
    assert entry.revision > first.revision
    assert json.loads(entry.value)["sent_at"] > beat["sent_at"]


async def test_sub_events_shows_loaded_then_unloaded(nats_url, second_node, tiny_model_dir) -> None:
    nc = await _connect(nats_url)
    sub = await nc.subscribe("cortex.events.>")
    try:
        load = {"model": {"id": SECOND_MODEL, "source": f"file:{tiny_model_dir}"}, "wait": True}
        reply = await nc.request(f"cortex.node.{SECOND_NODE}.load", json.dumps(load).encode(), timeout=60)
        assert json.loads(reply.data)["model"]["state"] == "ready", reply.data
        unload = {"model": SECOND_MODEL}
        reply = await nc.request(f"cortex.node.{SECOND_NODE}.unload", json.dumps(unload).encode(), timeout=30)
        assert not (reply.headers or {}).get("Nats-Service-Error-Code"), reply.data
        seen: list[Msg] = []
        while not any(m.subject == "cortex.events.unloaded" for m in seen):
            seen.append(await sub.next_msg(timeout=10))
    finally:
        await nc.close()
    for n, msg in enumerate(seen, 1):
        print(render_sub(n, msg))
    mine = [json.loads(m.data) | {"subject": m.subject} for m in seen]
    mine = [e for e in mine if e.get("model") == SECOND_MODEL and e["node"] == SECOND_NODE]
    kinds = [e["kind"] for e in mine]
    assert "loaded" in kinds and "unloaded" in kinds
    assert kinds.index("loaded") < kinds.index("unloaded")
    assert all(e["subject"] == f"cortex.events.{e['kind']}" for e in mine), "the subject names the kind"
    assert next(e for e in mine if e["kind"] == "unloaded")["reason"] == "admin"


async def test_req_with_a_hand_typed_job_streams_a_readable_answer_then_the_end_marker(nats_url, neuron) -> None:
    nc = await _connect(nats_url)
    try:
        replies, printed = await request_stream(nc, f"cortex.infer.{TINY_KEY}", MINIMAL_JOB)
    finally:
        await nc.close()
    print("\n".join(printed))
    assert replies[-1].data == b"", "the stream ends with the empty end marker that --wait-for-empty stops at"
    assert all(not m.headers for m in replies), "nothing the operator must read hides in headers"
    bodies = [m.data.decode() for m in replies[:-1]]
    assert all("\n" not in b for b in bodies), "each event prints as one line"
    events = [json.loads(b) for b in bodies]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "accepted" and kinds[-1] == "done"
    assert set(kinds[1:-1]) == {"delta"}
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert len({e["job_id"] for e in events}) == 1 and len(events[0]["job_id"]) == 32, "a generated uuid4 hex"
    assert events[0]["node"] == "t1"
    done = events[-1]
    assert done["finish_reason"] in ("stop", "length")
    deltas = events[1:-1]
    assert "".join(d["text"] for d in deltas), "the deltas carry the answer's text"
    assert sum(d["tokens"] for d in deltas) == done["usage"]["completion_tokens"] <= 16
    assert done["usage"]["prompt_tokens"] > 0


async def test_req_for_a_model_nobody_serves_prints_no_responders(nats_url, neuron) -> None:
    nc = await _connect(nats_url)
    try:
        body = MINIMAL_JOB.replace("test/tiny-llama", "nobody/serves-this")
        replies, printed = await request_stream(nc, "cortex.infer.nobody_2Fserves-this", body, timeout=5)
    finally:
        await nc.close()
    assert replies == []
    assert printed == ["No responders are available"]


async def test_kv_watch_shows_a_stopped_node_leave(nats_url, second_node) -> None:
    # Last in this file: it stops the module's second node.
    nc = await _connect(nats_url)
    try:
        async with kv_watch(nc, "cortex_nodes") as entries:
            while await asyncio.wait_for(entries.get(), 5) is not None:
                pass
            second_node.stop()
            while True:
                entry = await asyncio.wait_for(entries.get(), 10)
                if entry is not None and entry.key == SECOND_NODE and entry.op != "PUT":
                    break
    finally:
        await nc.close()
    print(entry.render("cortex_nodes"))
    assert entry.op in ("DELETE", "PURGE")
    assert entry.value == b""
