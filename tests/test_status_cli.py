"""`cortex status` as a user runs it: a subprocess reading the session's NATS, with a neuron serving."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import pytest

from cortex.devstack import natsserver
from tests.conftest import pin_on_missing_node

MODEL = "test/tiny-llama"
MEMORY_BAR = re.compile(r"^  \S+ .* \[[#.]{20}\] \d+\.\d/\d+\.\d GB$")


def cortex_status(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cortex.cli", "status", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def fleet(nats_url: str, neuron) -> str:
    """The session's NATS URL, once node t1 serves the tiny model."""
    return nats_url


def test_table_shows_node_device_and_model(fleet: str) -> None:
    result = cortex_status("--nats", fleet)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("cortex fleet at ") and "HEALTHY" in lines[0]
    assert any(line.startswith("t1  up  v") for line in lines)
    assert any(MEMORY_BAR.search(line) for line in lines), result.stdout
    model_row = next(line for line in lines if line.strip().startswith(MODEL))
    assert " ready " in model_row


def test_json_names_the_node_and_the_model(fleet: str) -> None:
    result = cortex_status("--nats", fleet, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    node = next(n for n in report["nodes"] if n["name"] == "t1")
    assert node["status"] == "up"
    assert {"id": MODEL, "state": "ready"}.items() <= next(m for m in node["models"] if m["id"] == MODEL).items()
    assert report["healthy"] is True
    assert report["problems"] == []


def test_a_pin_on_a_missing_node_exits_1_and_says_so(fleet: str) -> None:
    with pin_on_missing_node(fleet, "ghost"):
        result = cortex_status("--nats", fleet)
    assert result.returncode == 1
    assert "UNHEALTHY" in result.stdout
    assert f"{MODEL} is pinned on node ghost, which is not in the fleet" in result.stderr


def test_unreachable_nats_exits_2_naming_the_url() -> None:
    url = f"nats://127.0.0.1:{natsserver.free_port()}"
    result = cortex_status("--nats", url, "--timeout", "1")
    assert result.returncode == 2
    assert f"cannot read the fleet from NATS at {url}" in result.stderr
    assert "--nats" in result.stderr
    assert result.stdout == ""


def test_watch_redraws_until_interrupted(fleet: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cortex.cli", "status", "--nats", fleet, "--watch", "0.3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        refreshes = 0
        assert proc.stdout is not None
        for line in proc.stdout:  # not a terminal: each refresh is printed after the last
            refreshes += line.startswith("cortex fleet at ")
            if refreshes == 2:
                break
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert refreshes == 2
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
