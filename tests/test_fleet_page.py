"""The gateway's /fleet.json report and the /fleet page, rendered by a real headless Chromium."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import pin_on_missing_node, wait_until

MODEL = "test/tiny-llama"
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
# CI installs Chromium and sets REQUIRE_CHROMIUM=1: there the page test must run, not skip.
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("REQUIRE_CHROMIUM"), reason="chromium is not installed"
)


def test_fleet_json_reports_the_node_and_its_model(gateway, neuron) -> None:
    resp = httpx.get(f"{gateway.url}/fleet.json", timeout=10)
    assert resp.status_code == 200
    report = resp.json()
    assert set(report) == {"healthy", "problems", "totals", "nodes"}
    node = next(n for n in report["nodes"] if n["name"] == "t1")
    assert node["status"] == "up"
    assert node["age_s"] < 5
    device = node["devices"][0]
    assert device["used_mb"] + device["free_mb"] == device["total_mb"] > 0
    entry = next(m for m in node["models"] if m["id"] == MODEL)
    assert entry["state"] == "ready"
    assert isinstance(entry["tokens_per_s"], float)
    assert report["totals"]["nodes_up"] >= 1


def test_fleet_json_follows_the_pins_bucket(gateway, neuron, nats_url: str) -> None:
    def report() -> dict:
        return httpx.get(f"{gateway.url}/fleet.json", timeout=10).json()

    with pin_on_missing_node(nats_url, "ghost"):
        wait_until(lambda: not report()["healthy"], 5, "the ghost pin in /fleet.json")
        assert any("pinned on node ghost" in p for p in report()["problems"])
    wait_until(lambda: report()["healthy"], 5, "the fleet healthy again once the pin is gone")


def test_fleet_page_is_served_as_html(gateway) -> None:
    resp = httpx.get(f"{gateway.url}/fleet", timeout=10)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    assert 'fetch("fleet.json"' in resp.text


@needs_chromium
def test_fleet_page_draws_the_fleet_in_a_browser(gateway, neuron, tmp_path: Path) -> None:
    assert CHROMIUM is not None, "REQUIRE_CHROMIUM is set but chromium is not installed"
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless=new",
            "--disable-gpu",
            "--no-sandbox",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            f"{gateway.url}/fleet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    dom = result.stdout
    assert 'data-node="t1"' in dom, result.stderr[-2000:]
    assert f'data-model="{MODEL}"' in dom
    assert 'class="state s-ready">ready<' in dom
    assert 'class="bar"' in dom and 'class="fill' in dom and "width: " in dom
