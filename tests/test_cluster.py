"""A 3-node NATS cluster on loopback, configured by deploy/nats itself: a neuron and a gateway
spread over it keep serving when the gateway's NATS server dies, then (rolling) the neuron's.
The tests run in file order and share the cluster: each failover test leaves one server dead.

The servers run the repository's deploy/nats files, not a cluster config written for the test:
the per-role permissions, TLS on clients and routes, and passwords from env vars are what
production gets, so the gateway and the neuron prove those permissions are enough. Only the
addresses (client, route and monitoring ports on 127.0.0.1), the TLS file paths (a throwaway CA)
and the store dir are rewritten. nats-py shuffles its server list (no `dont_randomize` in our
`connect()`), so the test asks each server's /connz which one a client is on instead of assuming.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import nats
import pytest

from cortex.config.nats_settings import NatsSettings
from cortex.devstack import natsserver
from cortex.protocol.subjects import NODES_BUCKET, PINS_BUCKET, PLACEMENT_BUCKET, model_key
from tests.conftest import HEARTBEAT_S, Proc, wait_until
from tests.test_deploy import NATS_PASSWORDS, install_nats_configs, make_tls, nats_password

pytestmark = pytest.mark.timeout(180)

MODEL = "test/tiny-llama"
NODE = "gpu-a"  # a node of deploy/nats/accounts.conf: it logs in as its own user


@dataclass
class NatsNode:
    name: str
    port: int
    http_port: int
    workdir: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with pytest.MonkeyPatch.context() as env:
            for name, value in NATS_PASSWORDS.items():
                env.setenv(name, value)  # the servers read their passwords from the environment
            # -p/-m/-a (natsserver.start) override the client and monitoring addresses.
            self.popen = natsserver.start(
                port=self.port,
                http_port=self.http_port,
                workdir=self.workdir,
                config=self.workdir / "etc" / f"{self.name}.conf",
                log_file=self.workdir / "nats.log",
            )

    def kill(self) -> None:
        """SIGKILL: no lame duck mode, no goodbye to clients or routes."""
        assert self.popen is not None
        self.popen.kill()
        self.popen.wait()

    def healthy(self) -> bool:
        """Serving, JetStream included and caught up with the cluster (/healthz answers 200)."""
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"http://127.0.0.1:{self.http_port}/healthz", timeout=2).status_code == 200
        return False

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def monitor(self, path: str) -> dict:
        return httpx.get(f"http://127.0.0.1:{self.http_port}{path}", timeout=2).json()

    def client_names(self) -> set[str]:
        with contextlib.suppress(httpx.HTTPError):
            return {c.get("name", "") for c in self.monitor("/connz?limit=1000")["connections"]}
        return set()


@dataclass
class Cluster:
    nodes: list[NatsNode]
    ca: Path

    def server_of(self, client_name: str) -> NatsNode | None:
        """The live server `client_name` is connected to."""
        return next((n for n in self.nodes if n.alive and client_name in n.client_names()), None)

    def urls(self, first: int) -> list[str]:
        return [self.nodes[(first + i) % 3].url for i in range(3)]


def meta_leader(node: NatsNode) -> str | None:
    with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
        return node.monitor("/jsz")["meta_cluster"].get("leader")
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("nats-cluster")
    tls = make_tls(root / "tls")
    route_ports = [natsserver.free_port() for _ in range(3)]
    nodes = [
        NatsNode(f"nats-{i + 1}", natsserver.free_port(), natsserver.free_port(), root / f"nats-{i + 1}")
        for i in range(3)
    ]
    routes = {
        f"nats-route://nats-{i + 1}.internal:6222": f"nats-route://127.0.0.1:{port}"
        for i, port in enumerate(route_ports)
    }
    for node, route_port in zip(nodes, route_ports, strict=True):
        own = {**routes, "listen: 0.0.0.0:6222": f"listen: 127.0.0.1:{route_port}"}
        install_nats_configs(node.workdir / "etc", tls, node.workdir / "store", own)
        node.start()
    try:
        wait_until(lambda: all(meta_leader(n) for n in nodes), 30, "a JetStream meta leader on all three servers")
        wait_until(lambda: all(n.healthy() for n in nodes), 30, "all three servers healthy")
        yield Cluster(nodes, tls / "ca.pem")
    finally:
        for node in nodes:
            if node.popen is not None:
                natsserver.stop(node.popen)


@pytest.fixture(scope="module")
def tiny_models_toml(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    # Only the tiny model: conftest's models_toml would also build the 224 MB dense one.
    path = tmp_path_factory.mktemp("cluster-config") / "models.toml"
    path.write_text(f'[[models]]\nid = "{MODEL}"\nsource = "file:{tiny_model_dir}"\naliases = ["tiny"]\n')
    return path


def client_env(prefix: str, user: str, cluster: Cluster, first: int) -> dict[str, str]:
    return {
        f"{prefix}_NATS__SERVERS": json.dumps(cluster.urls(first)),
        f"{prefix}_NATS__USER": user,
        f"{prefix}_NATS__PASSWORD": nats_password(user),
        f"{prefix}_NATS__TLS_CA": str(cluster.ca),
        f"{prefix}_NATS__KV_REPLICAS": "3",
    }


@dataclass
class Fleet:
    url: str
    gateway: Proc
    neuron: Proc


@pytest.fixture(scope="module")
def fleet(cluster: Cluster, spawn: Callable[..., Proc], tiny_models_toml: Path) -> Iterator[Fleet]:
    neuron_env = {
        **client_env("NEURON", NODE, cluster, first=0),
        "NEURON_METRICS_LISTEN": f"127.0.0.1:{natsserver.free_port()}",
    }
    neuron = spawn(
        f"neuron-cluster-{NODE}",
        "neuron.cli",
        *("serve", "--node", NODE, "--models-config", str(tiny_models_toml)),
        *("--heartbeat-interval", str(HEARTBEAT_S), "--model", "tiny"),
        env=neuron_env,
    )
    port = natsserver.free_port()
    gateway_env = {
        **client_env("CORTEX", "gateway", cluster, first=1),
        "CORTEX_GATEWAY__METRICS_LISTEN": f"127.0.0.1:{natsserver.free_port()}",
    }
    gateway = spawn(
        "gateway-cluster",
        "cortex.cli",
        *("serve", "--listen", f"127.0.0.1:{port}", "--models-config", str(tiny_models_toml)),
        env=gateway_env,
    )
    url = f"http://127.0.0.1:{port}"

    def serving() -> bool:
        assert gateway.popen.poll() is None, gateway.output()
        assert neuron.popen.poll() is None, neuron.output()
        with contextlib.suppress(httpx.HTTPError):
            models = httpx.get(f"{url}/v1/models", timeout=2).json()["data"]
            return any(m["id"] == MODEL and m["nodes"] for m in models)
        return False

    wait_until(serving, 90, f"{MODEL} served through the gateway")
    yield Fleet(url, gateway, neuron)
    gateway.stop()
    neuron.stop()


def chat(fleet: Fleet, timeout: float = 20.0) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=f"{fleet.url}/v1", api_key="unused", max_retries=0, timeout=timeout)
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0
    )
    assert reply.choices[0].finish_reason in ("stop", "length")
    return reply.choices[0].message.content or ""


async def connect_as(cluster: Cluster, user: str, errors: list[str] | None = None) -> nats.NATS:
    import ssl

    async def on_error(exc: Exception) -> None:
        if errors is not None:
            errors.append(str(exc))

    return await nats.connect(
        servers=[n.url for n in cluster.nodes if n.alive],
        user=user,
        password=nats_password(user),
        inbox_prefix=NatsSettings(user=user).effective_inbox_prefix(),  # the only inbox it may read
        tls=ssl.create_default_context(cafile=str(cluster.ca)),
        error_cb=on_error,
        connect_timeout=5,
        max_reconnect_attempts=0,
    )


async def test_buckets_are_replicated_on_all_three_servers(cluster: Cluster, fleet: Fleet) -> None:
    nc = await connect_as(cluster, "ops")
    try:
        js = nc.jetstream()
        for bucket in (NODES_BUCKET, PLACEMENT_BUCKET, PINS_BUCKET):
            info = await js.stream_info(f"KV_{bucket}")
            assert info.config.num_replicas == 3, bucket
            assert info.cluster is not None and info.cluster.leader
            assert len(info.cluster.replicas or []) == 2, bucket  # the two followers
    finally:
        await nc.close()


def test_chat_through_the_cluster(fleet: Fleet) -> None:
    assert isinstance(chat(fleet), str)


async def test_ops_user_can_look_but_not_submit_jobs_or_write_state(cluster: Cluster, fleet: Fleet) -> None:
    errors: list[str] = []
    nc = await connect_as(cluster, "ops", errors)
    try:
        kv = await nc.jetstream().key_value(NODES_BUCKET)
        assert (await kv.get(NODE)).value  # the neuron's heartbeat
        status = await nc.request(f"cortex.node.{NODE}.status", b"{}", timeout=5)
        assert json.loads(status.data)["heartbeat"]["node"] == NODE
        ping = await nc.request("$SRV.PING.neuron", b"", timeout=5)  # nats micro ls
        assert json.loads(ping.data)["name"] == "neuron"

        await nc.publish(f"cortex.infer.{model_key(MODEL)}", b"{}")
        await nc.publish(f"$KV.{NODES_BUCKET}.{NODE}", b"{}")
        await nc.flush()
        await asyncio.sleep(0.5)  # the server answers a refused publish with -ERR, asynchronously
        refused = " ".join(errors).lower()  # nats-py lowercases the server's -ERR text
        assert f'permissions violation for publish to "cortex.infer.{model_key(MODEL)}"'.lower() in refused
        assert f'permissions violation for publish to "$kv.{NODES_BUCKET}.{NODE}"' in refused
    finally:
        await nc.close()


def test_cortex_status_reads_the_fleet_as_the_ops_user(cluster: Cluster, fleet: Fleet, tmp_path: Path) -> None:
    config = tmp_path / "cortex.toml"
    config.write_text("")  # [nats] from the env vars below, as on an operator's machine
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CORTEX_")},
        **client_env("CORTEX", "ops", cluster, first=0),
    }

    def status() -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "cortex.cli", "status", "--json", "--config", str(config)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)

    # A heartbeat lives 3 intervals (3 s here): on a loaded 2-core machine a beat can come late and
    # the node drop out of view for a moment, as `cortex status` would then say; so read until it shows.
    for _ in range(5):
        result = status()
        if result.returncode == 0:
            break
        time.sleep(1)
    assert result.returncode == 0, result.stdout + result.stderr
    assert NODE in result.stdout and MODEL in result.stdout


def test_requests_survive_losing_the_gateways_nats_server(cluster: Cluster, fleet: Fleet) -> None:
    victim = cluster.server_of("cortex gateway")
    assert victim is not None, "the gateway is connected to none of the three servers"
    victim.kill()
    recovered_s = serving_again(fleet, "the gateway's NATS server died")
    now = cluster.server_of("cortex gateway")
    assert now is not None and now is not victim
    print(f"\ngateway failed over from {victim.name} to {now.name}; serving again after {recovered_s:.1f}s")


def test_requests_survive_a_rolling_loss_of_the_neurons_server(cluster: Cluster, fleet: Fleet) -> None:
    """The killed server comes back and catches up; then the neuron's server dies: 2 of 3 keep quorum."""
    revive(cluster)
    victim = cluster.server_of(f"neuron {NODE}")
    assert victim is not None, "the neuron is connected to none of the three servers"
    victim.kill()
    recovered_s = serving_again(fleet, "the neuron's NATS server died")
    now = cluster.server_of(f"neuron {NODE}")
    assert now is not None and now is not victim
    print(f"\nneuron failed over from {victim.name} to {now.name}; serving again after {recovered_s:.1f}s")


def test_the_gateway_keeps_its_fleet_view_when_its_watchs_server_dies(cluster: Cluster, fleet: Fleet) -> None:
    """The server holding the gateway's KV watch (an R1 consumer) dies, and with it, often, the
    bucket's stream leader: heartbeats stop reaching the gateway for a few seconds while the
    neuron is fine. The watch resumes (a reconnect restarts it; otherwise two missed 1 s idle
    heartbeats), and a silence that hits every node at once does not count against them."""
    revive(cluster)
    wait_until(lambda: serves_model(fleet), 30, f"{MODEL} listed again")
    # After the earlier kills the watch may still be moving to a live server: wait for it to settle.
    host = wait_until(
        lambda: asyncio.run(watch_consumer_host(cluster)), 20, "the gateway's watch on one server", interval=0.5
    )
    victim = next(n for n in cluster.nodes if n.name == host)
    victim.kill()
    killed = time.monotonic()
    # Requests keep working (a blip is possible: if the stream's leader election outlasts the
    # heartbeat's TTL, the key expires and the node is out of view until its next beat).
    serving_again(fleet, "the server holding the gateway's watch died")
    # And the watch itself resumed: heartbeats reach the gateway again (their local age is fresh),
    # well before FleetView would stop riding out the silence.
    wait_until(lambda: heartbeat_age(fleet) < 2 * HEARTBEAT_S, 15, "a fresh heartbeat through the resumed watch")
    print(f"\ngateway's watch moved off {victim.name}; heartbeats fresh again {time.monotonic() - killed:.1f}s after")


def revive(cluster: Cluster) -> None:
    """Restarts the one dead server (same store) and waits until JetStream has caught up."""
    dead = [n for n in cluster.nodes if not n.alive]
    assert len(dead) == 1, "runs after a failover test"
    dead[0].start()
    wait_until(lambda: all(n.healthy() for n in cluster.nodes), 30, f"{dead[0].name} back and caught up")


async def watch_consumer_host(cluster: Cluster) -> str | None:
    """The server that runs the gateway's watch of cortex_nodes: the bucket's one consumer with a
    subscriber (a watch abandoned by a failover lingers, unbound, until its inactivity threshold).
    None while there is not exactly one such consumer with a leader."""
    nc = await connect_as(cluster, "ops")
    try:
        consumers = [c for c in await nc.jetstream().consumers_info(f"KV_{NODES_BUCKET}") if c.push_bound]
        if len(consumers) != 1 or consumers[0].cluster is None:
            return None
        return consumers[0].cluster.leader
    finally:
        await nc.close()


def heartbeat_age(fleet: Fleet) -> float:
    """Seconds since the gateway last received the node's heartbeat (its own clock)."""
    nodes = httpx.get(f"{fleet.url}/fleet.json", timeout=2).json()["nodes"]
    return next((n["age_s"] for n in nodes if n["name"] == NODE), float("inf"))


def serves_model(fleet: Fleet) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        models = httpx.get(f"{fleet.url}/v1/models", timeout=2).json()["data"]
        return any(m["id"] == MODEL and NODE in m["nodes"] for m in models)
    return False


def serving_again(fleet: Fleet, after: str) -> float:
    """Seconds until a chat request succeeds again (at most 15); then five more must all succeed."""
    started = time.monotonic()

    def succeeds() -> bool:
        with contextlib.suppress(Exception):
            return isinstance(chat(fleet, timeout=5), str)
        return False

    wait_until(succeeds, 15, f"a chat request to succeed after {after}", interval=0.5)
    took = time.monotonic() - started
    assert all(isinstance(chat(fleet), str) for _ in range(5))
    return took
