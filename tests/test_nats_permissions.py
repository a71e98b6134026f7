"""deploy/nats/accounts.conf's permissions, role by role, on one nats-server that runs it as shipped.

Each role connects with its own user, as the gateway, a neuron (node `gpu-a`, one of the file's
example nodes) and an operator would, and the tests check what the server refuses: a node may not
write another node's heartbeat, take its addressed jobs or answer its control subjects, nor read
the gateway's inbox; the gateway may not write heartbeats; ops may look but not submit jobs or read
anyone's replies. Then a real gateway and a real neuron, each logged in as its own user, serve
requests through the same server: the narrowed permissions are enough for jobs, heartbeats,
control (load, unload, cancel) and the operator's view.

nats-server answers a refused publish or subscribe with an asynchronous `-ERR 'Permissions
Violation ...'` (nats-py hands it, lowercased, to `error_cb`) and otherwise drops it silently: a
refusal is asserted by that error, an allowance by a message that arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from pydantic import ValidationError

from cortex.config.nats_settings import NatsSettings
from cortex.devstack import natsserver
from cortex.protocol.subjects import NODES_BUCKET, Subjects, model_key
from cortex.transport.connection import connect
from cortex.transport.kv import nodes_bucket
from tests.conftest import Gateway, Proc, start_gateway, start_neuron, wait_until
from tests.test_deploy import NATS_PASSWORDS, install_nats_configs, nats_password

pytestmark = pytest.mark.timeout(60)

NODE, OTHER = "gpu-a", "gpu-b"  # example nodes of accounts.conf
MODEL, SECOND = "test/tiny-llama", "test/tiny-llama-b"
KEY = model_key(MODEL)
REFUSAL_WAIT_S = 2.0


@dataclass
class Server:
    url: str
    monitor: str  # http://host:port of its monitoring endpoints


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One nats-server with JetStream and deploy/nats/accounts.conf included as shipped (the cluster
    files are copied beside it, unused: a lone server cannot form their cluster)."""
    root = tmp_path_factory.mktemp("nats-permissions")
    etc = install_nats_configs(root / "etc", root / "tls", root / "store")
    config = etc / "single.conf"
    config.write_text(f'jetstream {{ store_dir: "{root / "store"}" }}\nmax_payload: 8MB\ninclude ./accounts.conf\n')
    port, http_port = natsserver.free_port(), natsserver.free_port()
    with pytest.MonkeyPatch.context() as env:
        for name, value in NATS_PASSWORDS.items():
            env.setenv(name, value)  # accounts.conf reads its passwords from the environment
        proc = natsserver.start(port=port, http_port=http_port, workdir=root, config=config, log_file=root / "nats.log")
    try:
        yield Server(f"nats://127.0.0.1:{port}", f"http://127.0.0.1:{http_port}")
    finally:
        natsserver.stop(proc)


@pytest.fixture(scope="module")
def server(nats_server: Server) -> str:
    return nats_server.url


@dataclass
class Session:
    nc: Client
    errors: list[str]

    async def refused(self, what: str) -> bool:
        """Whether the server reported a permissions violation naming `what` (within a short wait)."""
        await self.nc.flush()  # the -ERR comes before the flush's PONG; error_cb may still be pending
        deadline = time.monotonic() + REFUSAL_WAIT_S
        while time.monotonic() < deadline:
            if any("permissions violation" in e and what.lower() in e for e in self.errors):
                return True
            await asyncio.sleep(0.02)
        return False


@contextlib.asynccontextmanager
async def login(url: str, user: str) -> AsyncIterator[Session]:
    """Connects as `user` the way gateways and neurons do: NatsSettings' options, its inbox prefix included."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())  # nats-py lowercases the server's -ERR text anyway

    settings = NatsSettings(servers=[url], user=user, password=nats_password(user))
    nc = await nats.connect(
        servers=settings.servers,
        error_cb=on_error,
        max_reconnect_attempts=0,
        connect_timeout=5,
        **settings.connect_options(),
    )
    try:
        yield Session(nc, errors)
    finally:
        await nc.close()


# --- the inbox prefix ---------------------------------------------------------------------------


def test_the_inbox_prefix_is_the_users_own_by_default() -> None:
    assert NatsSettings(user=NODE).connect_options()["inbox_prefix"] == f"_INBOX.{NODE}"
    assert NatsSettings().connect_options()["inbox_prefix"] == "_INBOX"  # no user: nats-py's default
    assert NatsSettings(user="a.b").connect_options()["inbox_prefix"] == "_INBOX"  # not one subject token
    assert NatsSettings(user=NODE, inbox_prefix="_R.x").connect_options()["inbox_prefix"] == "_R.x"
    with pytest.raises(ValidationError):
        NatsSettings(inbox_prefix="_INBOX.>")


# --- what each role is refused ------------------------------------------------------------------

REFUSED_PUBLISH = [
    (NODE, f"$KV.{NODES_BUCKET}.{OTHER}"),  # another node's heartbeat
    (NODE, f"$KV.{NODES_BUCKET}.{OTHER}.estimates"),  # or its estimates
    (NODE, f"$JS.API.STREAM.PURGE.KV_{NODES_BUCKET}"),  # every node's heartbeat at once
    (NODE, f"$JS.API.STREAM.DELETE.KV_{NODES_BUCKET}"),
    (NODE, f"$JS.API.STREAM.UPDATE.KV_{NODES_BUCKET}"),
    (NODE, f"$JS.API.STREAM.MSG.DELETE.KV_{NODES_BUCKET}"),
    (NODE, "$KV.cortex_pins.gpu-a.x"),  # pins are the operator's, through the gateway
    (NODE, f"cortex.infer.{KEY}"),  # submitting jobs
    (NODE, f"cortex.node.{OTHER}.unload"),  # controlling another node
    (NODE, f"cortex.node.{OTHER}.infer.{KEY}"),  # sending another node a job
    (NODE, f"cortex.events.job_lost.{OTHER}"),  # failing another node's jobs at their gateway
    (NODE, "_INBOX.gateway.forged.1"),  # an event into a job's stream it was not sent
    ("gateway", f"$KV.{NODES_BUCKET}.{NODE}"),  # heartbeats are the neurons' word
    ("ops", f"cortex.infer.{KEY}"),
    ("ops", f"cortex.node.{NODE}.infer.{KEY}"),
    ("ops", f"cortex.node.{NODE}.unload"),
    ("ops", "cortex.cancel"),
    ("ops", f"$KV.{NODES_BUCKET}.{NODE}"),
]


@pytest.mark.parametrize(("user", "subject"), REFUSED_PUBLISH)
async def test_publish_is_refused(server: str, user: str, subject: str) -> None:
    async with login(server, user) as session:
        await session.nc.publish(subject, b"{}")
        assert await session.refused(f'publish to "{subject}"'), session.errors


REFUSED_SUBSCRIBE = [
    (NODE, f"cortex.node.{OTHER}.infer.{KEY}", ""),  # another node's addressed jobs
    (NODE, f"cortex.node.{OTHER}.infer.{KEY}", "neurons"),
    (NODE, "cortex.node.*.infer.>", "neurons"),
    (NODE, "cortex.node.>", ""),
    (NODE, f"cortex.infer.{KEY}", ""),  # every job of a model, outside the queue group: every prompt
    (NODE, f"cortex.node.{OTHER}.>", ""),  # another node's control subjects
    (NODE, f"cortex.node.{OTHER}.load", "q"),  # ... in nats micro's queue group
    (NODE, "_INBOX.gateway.>", ""),  # the gateway's replies: every job's events
    (NODE, f"_INBOX.{OTHER}.>", ""),
    (NODE, "_INBOX.>", ""),
    ("gateway", f"_INBOX.{NODE}.>", ""),
    ("gateway", "_INBOX.ops.>", ""),
    ("gateway", f"cortex.infer.{KEY}", "neurons"),
    ("ops", "_INBOX.gateway.>", ""),  # the token streams of every request
    ("ops", f"_INBOX.{NODE}.>", ""),
    ("ops", "_INBOX.>", ""),
    ("ops", "cortex.infer.>", ""),
]


@pytest.mark.parametrize(("user", "subject", "queue"), REFUSED_SUBSCRIBE)
async def test_subscribe_is_refused(server: str, user: str, subject: str, queue: str) -> None:
    async with login(server, user) as session:
        await session.nc.subscribe(subject, queue=queue)
        assert await session.refused(f'subscription to "{subject}"'), session.errors


# --- what a node may do ---------------------------------------------------------------------------


async def test_a_node_writes_its_own_heartbeat(server: str) -> None:
    async with login(server, NODE) as node, login(server, "ops") as ops:
        settings = NatsSettings(servers=[server], user=NODE, password=nats_password(NODE))
        async with await connect(settings.servers, f"neuron {NODE}", **settings.connect_options()) as connection:
            await nodes_bucket(connection)  # opens or creates it, as the neuron does
        ack = await node.nc.jetstream().publish(f"$KV.{NODES_BUCKET}.{NODE}", b'{"beat": 1}', timeout=5)
        assert ack.stream == f"KV_{NODES_BUCKET}"
        entry = await (await ops.nc.jetstream().key_value(NODES_BUCKET)).get(NODE)
        assert entry.value == b'{"beat": 1}'
        await (await node.nc.jetstream().key_value(NODES_BUCKET)).delete(NODE)  # as a neuron leaving does
        assert node.errors == []


async def test_a_node_receives_its_own_jobs_control_requests_and_cancels(server: str) -> None:
    async with login(server, NODE) as node, login(server, "gateway") as gateway:
        got: list[str] = []
        all_in = asyncio.Event()

        async def on_msg(msg: Msg) -> None:
            got.append(msg.subject)
            if len(got) == len(subjects):
                all_in.set()

        subjects = {
            f"cortex.infer.{KEY}": "neurons",
            f"cortex.node.{NODE}.infer.{KEY}": "",
            f"cortex.node.{NODE}.status": "q",
            "cortex.cancel": "",
        }
        for subject, queue in subjects.items():
            await node.nc.subscribe(subject, queue=queue, cb=on_msg)
        await node.nc.flush()
        for subject in subjects:
            await gateway.nc.publish(subject, b"{}")
        await gateway.nc.flush()
        await asyncio.wait_for(all_in.wait(), 5)
        assert sorted(got) == sorted(subjects)
        assert node.errors == [] and gateway.errors == []


async def test_a_node_streams_many_replies_to_one_request(server: str) -> None:
    """A job's events are many messages to one reply subject: allow_responses must allow more than one."""
    events = 300
    async with login(server, NODE) as node, login(server, "gateway") as gateway:

        async def answer(msg: Msg) -> None:
            for i in range(events):
                await node.nc.publish(msg.reply, str(i).encode())
            await node.nc.publish(msg.reply, b"")

        await node.nc.subscribe(f"cortex.node.{NODE}.infer.{KEY}", cb=answer)
        await node.nc.flush()
        inbox = gateway.nc.new_inbox()
        assert inbox.startswith("_INBOX.gateway.")
        sub = await gateway.nc.subscribe(inbox)
        await gateway.nc.publish(f"cortex.node.{NODE}.infer.{KEY}", b"{}", reply=inbox)
        received = []
        while (msg := await sub.next_msg(timeout=5)).data:
            received.append(int(msg.data))
        assert received == list(range(events))
        assert node.errors == []


async def test_a_wildcard_queue_subscription_catches_no_other_nodes_addressed_jobs(server: str) -> None:
    """nats-server lets `cortex.infer.>` through the `cortex.infer.* neurons` permission (its `*` matches
    the token `>`); addressed jobs live under the node's own subjects, so it catches none of them."""
    async with login(server, NODE) as node, login(server, "gateway") as gateway:
        sub = await node.nc.subscribe("cortex.infer.>", queue="neurons")
        await node.nc.flush()
        await gateway.nc.publish(Subjects().infer_node(MODEL, OTHER), b"{}")
        await gateway.nc.publish(Subjects().infer(MODEL), b"{}")  # un-addressed: any node may take it
        await gateway.nc.flush()
        assert (await sub.next_msg(timeout=5)).subject == f"cortex.infer.{KEY}"
        with pytest.raises(nats.errors.TimeoutError):
            await sub.next_msg(timeout=0.5)


# --- a real gateway and neuron, each with its own user --------------------------------------------


@dataclass
class Fleet:
    gateway: Gateway
    neuron: Proc


@pytest.fixture(scope="module")
def fleet(server: str, spawn: Callable[..., Proc], tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    models = tmp_path_factory.mktemp("permissions-config") / "models.toml"
    models.write_text(
        f'[[models]]\nid = "{MODEL}"\nsource = "file:{tiny_model_dir}"\naliases = ["tiny"]\n\n'
        f'[[models]]\nid = "{SECOND}"\nsource = "file:{tiny_model_dir}"\n'
    )
    gateway = start_gateway(
        spawn,
        server,
        models,
        name="gateway-permissions",
        CORTEX_NATS__USER="gateway",
        CORTEX_NATS__PASSWORD=nats_password("gateway"),
    )
    env = {"NEURON_NATS__USER": NODE, "NEURON_NATS__PASSWORD": nats_password(NODE)}
    neuron = start_neuron(spawn, server, models, NODE, "tiny", env=env)
    try:
        gateway.wait_for_model(MODEL, timeout=60)
        yield Fleet(gateway, neuron)
    finally:
        gateway.proc.stop()
        neuron.stop()


def test_a_chat_completion_is_served_through_the_narrowed_permissions(fleet: Fleet) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{fleet.gateway.url}/v1", api_key="unused", max_retries=0, timeout=30)
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
    )
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0, stream=True
        )
    )
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_the_gateway_loads_and_unloads_over_the_nodes_control_subjects(fleet: Fleet) -> None:
    url = fleet.gateway.url
    loaded = httpx.post(f"{url}/admin/models/load", json={"model": SECOND, "node": NODE}, timeout=30)
    assert loaded.status_code == 200, loaded.text
    fleet.gateway.wait_for_model(SECOND, timeout=10)
    unloaded = httpx.post(f"{url}/admin/models/unload", json={"model": SECOND}, timeout=30)
    assert unloaded.status_code == 200, unloaded.text
    assert unloaded.json()["unloaded_from"] == [NODE]


# Greedy: the random model then never samples its end-of-sequence token by chance.
LONG = {"model": MODEL, "messages": [{"role": "user", "content": "Go on."}], "max_tokens": 8000, "temperature": 0}


def jobs_on_node(server: str) -> list[dict] | None:
    """The node's running jobs, as ops asks for them; None while it does not answer."""

    async def ask() -> list[dict]:
        async with login(server, "ops") as ops:
            reply = await ops.nc.request(f"cortex.node.{NODE}.status", b"{}", timeout=2)
            return json.loads(reply.data)["jobs"]

    with contextlib.suppress(nats.errors.Error, TimeoutError):
        return asyncio.run(ask())
    return None


@contextlib.contextmanager
def streaming_job(fleet: Fleet, server: str, max_tokens: int = LONG["max_tokens"]) -> Iterator[Iterator[str]]:
    """A long streamed completion, held open while the node generates it; yields the rest of its lines."""
    body = {**LONG, "stream": True, "max_tokens": max_tokens}
    with httpx.stream("POST", f"{fleet.gateway.url}/v1/chat/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        for _ in range(5):
            next(lines)
        assert len(jobs_on_node(server) or []) == 1
        yield lines


def test_a_client_that_leaves_has_its_job_cancelled_on_the_node(fleet: Fleet, server: str) -> None:
    with streaming_job(fleet, server):
        pass
    wait_until(lambda: jobs_on_node(server) == [], 10, "the node to drop the job")
    assert "cancelled (request" in fleet.neuron.output()


async def test_ops_watches_the_heartbeats(fleet: Fleet, server: str) -> None:
    async with login(server, "ops") as ops:
        kv = await ops.nc.jetstream().key_value(NODES_BUCKET)
        watcher = await kv.watch(NODE)
        try:
            entry = await watcher.updates(timeout=5)
            if entry is None:  # nats-py's end-of-snapshot marker can overtake the first entry
                entry = await watcher.updates(timeout=5)
            assert entry is not None and json.loads(entry.value)["node"] == NODE
        finally:
            await watcher.stop()
        assert ops.errors == []


async def test_ops_sees_the_nodes_micro_service_and_status(fleet: Fleet, server: str) -> None:
    async with login(server, "ops") as ops:
        info = json.loads((await ops.nc.request("$SRV.INFO.neuron", b"", timeout=5)).data)
        assert info["metadata"]["node"] == NODE
        status = json.loads((await ops.nc.request(f"cortex.node.{NODE}.status", b"{}", timeout=5)).data)
        assert status["heartbeat"]["node"] == NODE
        assert ops.errors == []


def test_nothing_the_gateway_or_the_neuron_did_was_refused(fleet: Fleet) -> None:
    """After the fleet has served, loaded, unloaded and cancelled: their logs name no refusal (a
    refused publish or subscribe is otherwise silent, and might only have slowed something down)."""
    for proc in (fleet.gateway.proc, fleet.neuron):
        assert "permissions violation" not in proc.output().lower(), proc.output()


def kick(server: Server, client_name: str) -> None:
    """Closes a client's connection from the server's side (the system account's KICK); it reconnects."""
    connections = httpx.get(f"{server.monitor}/connz", timeout=2).json()["connections"]
    cid = next(c["cid"] for c in connections if c.get("name") == client_name)
    server_id = httpx.get(f"{server.monitor}/varz", timeout=2).json()["server_id"]

    async def request() -> None:
        async with login(server.url, "sys") as sys:
            await sys.nc.request(f"$SYS.REQ.SERVER.{server_id}.KICK", json.dumps({"cid": cid}).encode(), timeout=2)

    asyncio.run(request())


def test_a_node_that_reconnects_mid_job_drops_the_job_it_may_no_longer_answer_and_it_goes_on(
    fleet: Fleet, nats_server: Server
) -> None:
    """Last: it leaves a refusal in the neuron's log. The answers a node may send belong to its
    connection (allow_responses); after a reconnect the rest of a running job's events are refused,
    so the node stops generating them (instead of running to max_tokens for nobody) and tells the
    gateway on cortex.events.job_lost. The gateway sends the rest of the job again, as a
    continuation, over the node's new connection: the client's answer goes on to its end."""
    with streaming_job(fleet, nats_server.url, max_tokens=2000) as lines:
        first = jobs_on_node(nats_server.url)
        assert first is not None
        kick(nats_server, f"neuron {NODE}")
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert '"error"' not in "".join(rest)
    assert any('"finish_reason":"length"' in line for line in rest[-3:])
    assert "NATS refuses its events" in fleet.neuron.output()
    assert f"job {first[0]['job_id']}" in fleet.neuron.output()
    assert "moved from" in fleet.gateway.proc.output()
