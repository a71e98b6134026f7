"""The neuron's model table on a real device worker and the tiny model."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from cortex.protocol.messages import DeviceInfo, ModelSpec, ModelState
from neuron.engine.worker import DeviceWorker
from neuron.models import LoadError, ModelTable


class _SlowLeaving:
    """Hooks whose model_leaving takes a while, as draining in-flight jobs does."""

    def __init__(self) -> None:
        self.events: list[str] = []

    async def model_ready(self, spec: ModelSpec) -> None:
        self.events.append(f"ready {spec.id}")

    async def model_leaving(self, spec: ModelSpec) -> None:
        await asyncio.sleep(0.3)

    async def model_changed(self, kind: str, spec: ModelSpec, detail: str | None) -> None:
        self.events.append(f"{kind} {spec.id}")


@pytest.fixture
def worker() -> Iterator[DeviceWorker]:
    w = DeviceWorker(DeviceInfo(id="cpu", kind="cpu", name="cpu", total_mb=1, free_mb=1), max_batch=2)
    w.start()
    yield w
    w.stop()


async def test_a_load_during_an_unload_is_refused_and_the_reload_afterwards_sticks(
    worker: DeviceWorker, tiny_model_dir: Path
) -> None:
    hooks = _SlowLeaving()
    table = ModelTable({"cpu": worker}, hooks=hooks)
    spec = ModelSpec(id="t/tiny", source=f"file:{tiny_model_dir}")
    await table.load(spec).done.wait()
    assert table.ready("t/tiny") is not None

    unloading = asyncio.create_task(table.unload("t/tiny"))
    await asyncio.sleep(0.05)
    with pytest.raises(LoadError, match="being unloaded"):
        table.load(spec)
    await unloading

    entry = table.load(spec)
    await entry.done.wait()
    assert entry.state is ModelState.ready
    assert table.ready("t/tiny") is entry
    assert hooks.events == ["ready t/tiny", "loaded t/tiny", "unloaded t/tiny", "ready t/tiny", "loaded t/tiny"]


async def test_a_failed_load_reports_why(worker: DeviceWorker, tmp_path: Path) -> None:
    hooks = _SlowLeaving()
    table = ModelTable({"cpu": worker}, hooks=hooks)
    entry = table.load(ModelSpec(id="t/missing", source=f"file:{tmp_path}/nothing"))
    await entry.done.wait()
    assert entry.state is ModelState.failed
    assert "does not exist" in entry.error
    assert hooks.events == ["load_failed t/missing"]
