"""The neuron's model table on a real device worker and the tiny model."""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from cortex.protocol.messages import DeviceInfo, ModelSpec, ModelState
from neuron.engine.worker import DeviceWorker
from neuron.models import LoadError, ModelTable
from neuron.sources.preflight import Plan, preflight


class _SlowLeaving:
    """Hooks whose model_leaving takes a while, as draining in-flight jobs does."""

    def __init__(self) -> None:
        self.events: list[str] = []

    async def model_ready(self, spec: ModelSpec) -> None:
        self.events.append(f"ready {spec.id}")

    async def model_leaving(self, spec: ModelSpec) -> None:
        await asyncio.sleep(0.3)

    async def model_changed(self, kind: str, model: str | None, detail: str | None, reason: str | None = None) -> None:
        self.events.append(f"{kind} {model}")


class _Recording(_SlowLeaving):
    def __init__(self) -> None:
        super().__init__()
        self.details: list[tuple[str, str | None]] = []

    async def model_leaving(self, spec: ModelSpec) -> None:
        pass

    async def model_changed(self, kind: str, model: str | None, detail: str | None, reason: str | None = None) -> None:
        self.details.append((kind, detail))


def _plan(spec: ModelSpec) -> Plan:
    return preflight(spec, device_kind="cpu", device_count=1, max_batch=2)


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
    await table.load(_plan(spec), [worker]).done.wait()
    assert table.ready("t/tiny") is not None

    unloading = asyncio.create_task(table.unload("t/tiny"))
    await asyncio.sleep(0.05)
    with pytest.raises(LoadError, match="being unloaded"):
        table.load(_plan(spec), [worker])
    await unloading

    entry = table.load(_plan(spec), [worker])
    await entry.done.wait()
    assert entry.state is ModelState.ready
    assert table.ready("t/tiny") is entry
    loads = ["loading t/tiny", "ready t/tiny", "loaded t/tiny"]
    assert hooks.events == [*loads, "unloaded t/tiny", *loads]


async def test_a_failed_load_reports_why(worker: DeviceWorker, tiny_model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    hooks = _SlowLeaving()
    table = ModelTable({"cpu": worker}, hooks=hooks)
    entry = table.load(_plan(ModelSpec(id="t/broken", source=f"file:{broken}")), [worker])
    await entry.done.wait()
    assert entry.state is ModelState.failed
    assert "no-such-architecture" in entry.error
    assert entry.memory_mb == 0
    assert hooks.events == ["loading t/broken", "load_failed t/broken"]


async def test_after_n_load_unload_cycles_the_device_releases_cached_memory(
    worker: DeviceWorker, tiny_model_dir: Path
) -> None:
    hooks = _Recording()
    table = ModelTable({"cpu": worker}, hooks=hooks, defrag_after_cycles=2)
    spec = ModelSpec(id="t/tiny", source=f"file:{tiny_model_dir}")
    for _ in range(3):
        await table.load(_plan(spec), [worker]).done.wait()
        await table.unload("t/tiny")
    defrags = [detail for kind, detail in hooks.details if kind == "defrag"]
    assert len(defrags) == 1  # after the 2nd cycle, not the 1st or 3rd
    assert re.fullmatch(r"cpu: free \d+ MB -> \d+ MB after 2 load/unload cycles", defrags[0])
