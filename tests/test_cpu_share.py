"""The host's cores shared by the neurons on it (neuron.cpu_share), and the stall watch on a
device's decode steps (neuron.engine.progress) that the heartbeat carries."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import pytest

from neuron.cpu_share import CpuShare, host_cores
from neuron.engine import progress
from neuron.engine.progress import Progress


def _enter_other(registry, pid: int, cpus: list[int]) -> None:
    started = psutil.Process(pid).create_time()
    (registry / str(pid)).write_text(json.dumps({"started": started, "cpus": cpus}))


@pytest.fixture
def sleeper():
    """Another live process, standing for a second neuron on this host."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_neuron_alone_takes_every_core(tmp_path) -> None:
    with CpuShare(registry=tmp_path) as share:
        assert share.neighbours() == 1
        assert share.threads() == host_cores()
    assert not list(tmp_path.iterdir())  # it leaves the registry when it stops


def test_two_neurons_on_the_same_cores_take_half_each(tmp_path, sleeper) -> None:
    with CpuShare(registry=tmp_path) as share:
        _enter_other(tmp_path, sleeper.pid, sorted(os.sched_getaffinity(0)))
        assert share.neighbours() == 2
        assert share.threads() == max(1, host_cores() // 2)


def test_a_neuron_pinned_to_other_cores_is_not_counted(tmp_path, sleeper) -> None:
    with CpuShare(registry=tmp_path) as share:
        _enter_other(tmp_path, sleeper.pid, [max(os.sched_getaffinity(0)) + 1])
        assert share.neighbours() == 1


def test_the_entry_of_a_neuron_that_is_gone_is_removed(tmp_path, sleeper) -> None:
    with CpuShare(registry=tmp_path) as share:
        _enter_other(tmp_path, sleeper.pid, sorted(os.sched_getaffinity(0)))
        sleeper.kill()
        sleeper.wait()
        assert share.neighbours() == 1
        assert not (tmp_path / str(sleeper.pid)).exists()


def test_a_set_thread_count_wins(tmp_path, sleeper) -> None:
    with CpuShare(threads=3, registry=tmp_path) as share:
        _enter_other(tmp_path, sleeper.pid, sorted(os.sched_getaffinity(0)))
        assert share.threads() == 3


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> _Clock:
    clock = _Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    return clock


def _steps(watch: Progress, clock: _Clock, seconds: float, n: int = 10) -> None:
    for _ in range(n):
        watch.begin()
        clock.now += seconds
        watch.end()


def test_steps_at_their_usual_pace_are_not_a_stall(clock) -> None:
    watch = Progress()
    _steps(watch, clock, 0.02)
    assert not watch.stalled


def test_steps_many_times_their_usual_length_are_a_stall_until_they_are_quick_again(clock) -> None:
    watch = Progress()
    _steps(watch, clock, 0.2)
    _steps(watch, clock, 5.0, n=1)  # 25x the usual step, and over the 2 s floor
    assert watch.stalled
    _steps(watch, clock, 0.2, n=1)
    assert not watch.stalled


def test_a_step_that_does_not_end_is_a_stall_while_it_runs(clock) -> None:
    watch = Progress()
    _steps(watch, clock, 0.05)
    watch.begin()
    clock.now += 1.0
    assert not watch.stalled  # under the floor
    clock.now += 2.0
    assert watch.stalled


def test_a_device_with_nothing_decoding_is_not_stalled(clock) -> None:
    watch = Progress()
    _steps(watch, clock, 40.0, n=1)  # over the ceiling, with no usual step to compare
    assert watch.stalled
    watch.idle()
    assert not watch.stalled


def test_a_registry_that_cannot_be_written_leaves_the_neuron_its_cores(tmp_path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    with CpuShare(registry=blocked / "cortex-neurons") as share:  # its parent is a file
        assert share.threads() == host_cores()
