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
    """Started in a work folder; every process it spawned is stopped when it closes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        self._ports = natsserver.free_port(), natsserver.free_port()
        self.nats_url = f"nats://127.0.0.1:{self._ports[0]}"
        self._nats: subprocess.Popen[bytes] | None = None
        self.nats_up()
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def nats_up(self) -> None:
        """Starts the nats-server (again: same ports, same store)."""
        port, http_port = self._ports
        log = self.root / "nats.log"
        self._nats = natsserver.start(port=port, http_port=http_port, workdir=self.root, log_file=log)

    def nats_down(self) -> None:
        """Kills the nats-server (SIGKILL: nothing said to the clients)."""
        if self._nats is not None:
            self._nats.kill()
            self._nats.wait(10)
            self._nats = None

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

    def gateway(self, models_toml: Path | None = None, env: dict[str, str] | None = None) -> tuple[str, int]:
        """Starts the gateway (`env`: its settings, CORTEX_GATEWAY__...); its (host, port) once it answers /health."""
        port = natsserver.free_port()
        args = ["cortex.cli", "serve", "--nats", self.nats_url, "--listen", f"127.0.0.1:{port}"]
        if models_toml is not None:
            args += ["--models-config", str(models_toml)]
        self.spawn("gateway", args, {"CORTEX_GATEWAY__METRICS_LISTEN": "", **(env or {})})
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200, 60, "the gateway")
        return "127.0.0.1", port

    def close(self) -> None:
        for name in list(self._procs):
            self.stop(name)
        if self._nats is not None:
            natsserver.stop(self._nats)


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
