"""`cortex up` (what `make run` starts): ready banner, a working endpoint, a clean stop."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from cortex.devstack.natsserver import free_port
from tests.conftest import wait_until


def _up(tmp_path: Path, models_toml: Path, model: str) -> tuple[subprocess.Popen[str], str, Path, int]:
    port, nats_port = free_port(), free_port()
    log = tmp_path / "up.log"
    args = [sys.executable, "-m", "cortex.cli", "up", "--model", model, "--models-config", str(models_toml)]
    args += ["--state-dir", str(tmp_path / "state"), "--listen", f"127.0.0.1:{port}"]
    args += ["--metrics-listen", f"127.0.0.1:{free_port()}", "--nats-port", str(nats_port)]
    args += ["--nats-http-port", str(free_port())]
    with log.open("w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, text=True)
    return proc, f"http://127.0.0.1:{port}", log, nats_port


def _running_with(*needles: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if any(n in line for n in needles)]


def test_up_prints_where_to_go_answers_and_stops_cleanly_on_ctrl_c(tmp_path: Path, models_toml: Path) -> None:
    proc, url, log, nats_port = _up(tmp_path, models_toml, "tiny")
    try:
        wait_until(lambda: "cortex is ready" in log.read_text() or proc.poll() is not None, 60, "the banner")
        banner = log.read_text()
        assert "cortex is ready: test/tiny-llama (alias tiny) on node" in banner, banner
        assert "engine transformers" in banner, banner
        assert f"{url}/v1" in banner
        assert "nats -s nats://127.0.0.1:" in banner and "sub 'cortex.>'" in banner
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        resp = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        assert resp.status_code == 200
        assert resp.json()["usage"]["completion_tokens"] == 4
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    assert log.read_text().rstrip().endswith("stopped")
    state = tmp_path / "state"
    assert (state / "jetstream").is_dir(), "JetStream kept its store in the state dir"
    # nats-server is started with its log in the state dir, the neuron with the NATS URL.
    assert _running_with(str(state), f"nats://127.0.0.1:{nats_port}") == []


def test_up_exits_with_the_reason_when_the_model_cannot_load(tmp_path: Path, models_toml: Path) -> None:
    broken = tmp_path / "models.toml"
    broken.write_text(
        models_toml.read_text() + '\n[[models]]\nid = "test/broken"\nsource = "file:/nonexistent/model"\n'
    )
    proc, _, log, nats_port = _up(tmp_path, broken, "test/broken")
    started = time.monotonic()
    try:
        assert proc.wait(60) == 1, log.read_text()  # the log says which way it went
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
    assert time.monotonic() - started < 60
    assert "test/broken failed to load: /nonexistent/model does not exist on this node; fix the path" in log.read_text()
    assert _running_with(str(tmp_path / "state"), f"nats://127.0.0.1:{nats_port}") == []
