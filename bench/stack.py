"""The processes a benchmark runs against: a nats-server of its own, neurons or engines, a gateway."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from cortex.devstack import natsserver


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if predicate():
                return
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


class Stack:
    """Started in a work folder; every process it spawned is stopped when it closes.

    `servers`: one nats-server, or that many clustered on loopback (JetStream over all of them).
    """

    def __init__(self, root: Path, servers: int = 1) -> None:
        self.root = root
        self.env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        # (client, monitoring, cluster) ports of each server
        self._ports = [(natsserver.free_port(), natsserver.free_port(), natsserver.free_port()) for _ in range(servers)]
        self.nats_urls = [f"nats://127.0.0.1:{client}" for client, _, _ in self._ports]
        self.nats_url = self.nats_urls[0]
        self.monitor_urls = [f"http://127.0.0.1:{http}" for _, http, _ in self._ports]  # /varz, /connz ...
        self.monitor_url = self.monitor_urls[0]
        self._nats: list[subprocess.Popen[bytes]] = []
        self.nats_up()
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def nats_up(self) -> None:
        """Starts the nats-server(s) (again: same ports, same store)."""
        if len(self._ports) == 1:
            port, http_port, _ = self._ports[0]
            log = self.root / "nats.log"
            self._nats = [natsserver.start(port=port, http_port=http_port, workdir=self.root, log_file=log)]
            return
        for i, (port, http_port, _) in enumerate(self._ports):
            workdir = self.root / f"nats-{i}"
            workdir.mkdir(parents=True, exist_ok=True)
            config = workdir / "nats.conf"
            config.write_text(self._cluster_config(i))
            log = workdir / "nats.log"
            self._nats.append(
                natsserver.start(port=port, http_port=http_port, workdir=workdir, config=config, log_file=log)
            )

        def meta_leader(url: str) -> bool:
            return bool(httpx.get(f"{url}/jsz", timeout=2).json().get("meta_cluster", {}).get("leader"))

        wait_for(lambda: all(meta_leader(url) for url in self.monitor_urls), 60, "a JetStream meta leader")

    def _cluster_config(self, i: int) -> str:
        routes = ", ".join(f'"nats-route://127.0.0.1:{c}"' for j, (_, _, c) in enumerate(self._ports) if j != i)
        return (
            f'server_name: "s{i}"\njetstream {{ store_dir: "store" }}\n'
            f'cluster {{ name: "cortex-bench", listen: "127.0.0.1:{self._ports[i][2]}", routes: [{routes}] }}\n'
        )

    def nats_down(self) -> None:
        """Kills the nats-server(s) (SIGKILL: nothing said to the clients)."""
        for proc in self._nats:
            proc.kill()
            proc.wait(10)
        self._nats = []

    @property
    def nats_pids(self) -> list[int]:
        return [proc.pid for proc in self._nats]

    def signal(self, name: str, sig: int) -> None:
        self._procs[name].send_signal(sig)

    def reap(self, name: str, timeout: float = 60.0) -> None:
        """Waits for a process that was told to end (a signal), and forgets it."""
        proc = self._procs.pop(name)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        with (self.root / f"{name}.log").open("wb") as out:
            self._procs[name] = subprocess.Popen(
                [sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT, env={**self.env, **(env or {})}
            )

    def pid(self, name: str) -> int:
        return self._procs[name].pid

    def stop(self, name: str) -> None:
        proc = self._procs.pop(name)
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()

    def gateway(
        self,
        models_toml: Path | None = None,
        env: dict[str, str] | None = None,
        *,
        name: str = "gateway",
        nats_url: str | None = None,
    ) -> tuple[str, int]:
        """Starts a gateway (`env`: its settings, CORTEX_GATEWAY__...; on `nats_url`, else the first
        server); its (host, port) once it answers /health."""
        port = natsserver.free_port()
        args = ["cortex.cli", "serve", "--nats", nats_url or self.nats_url, "--listen", f"127.0.0.1:{port}"]
        if models_toml is not None:
            args += ["--models-config", str(models_toml)]
        self.spawn(name, args, {"CORTEX_GATEWAY__METRICS_LISTEN": "", **(env or {})})
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200, 60, "the gateway")
        return "127.0.0.1", port

    def close(self) -> None:
        for name in list(self._procs):
            self.stop(name)
        for proc in self._nats:
            natsserver.stop(proc)


@contextlib.contextmanager
def llama_cpp_server(gguf: Path, root: Path, *args: str) -> Iterator[int | None]:
    """llama-cpp-python's OpenAI server on `gguf` (more `args` for it), its port once it answers; None
    (saying why) where it does not start, so that the rest of a table stands."""
    port = natsserver.free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--n_threads", str(os.cpu_count() or 1), *args]
    log = root / "llama-cpp-server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:

        def up() -> bool:
            if proc.poll() is not None:  # its server extra is missing, say
                raise RuntimeError(log.read_text()[-400:])
            return httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200

        try:
            wait_for(up, 120, "llama-cpp-python's server")
        except RuntimeError as exc:
            print(f"  llama-cpp-python's server did not start (pip install 'llama-cpp-python[server]'): {exc}")
            yield None
            return
        yield port
    finally:
        proc.terminate()
        proc.wait(30)


@contextlib.contextmanager
def stack(root: Path) -> Iterator[Stack]:
    s = Stack(root)
    try:
        yield s
    finally:
        s.close()
