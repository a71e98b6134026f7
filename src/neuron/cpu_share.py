"""The host's CPU cores, shared by the neurons running on it.

An engine on a CPU runs as many threads as it is told; two neurons on one machine that each
take every core run twice as many threads as there are cores, and both crawl (a decode step is
bound by memory bandwidth: threads that wait on each other only add to it). Each neuron enters
itself in a registry on the host (a file per process in shared memory) and takes its share of
the cores it may run on: those cores divided by the live neurons that may run on them too. The
share is checked again every heartbeat interval, so a neuron that starts or stops beside it
changes the threads of the models already loaded. A `threads` setting overrides it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


def _default_registry() -> Path:
    shm = Path("/dev/shm")  # per boot, and shared by services that have their own /tmp
    return (shm if shm.is_dir() else Path(tempfile.gettempdir())) / "cortex-neurons"


def host_cores() -> int:
    """Physical cores (hyperthreads only contend in a memory-bound decode step), and no more than the
    CPUs this process may run on (a neuron pinned with taskset or a cgroup cpuset)."""
    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return max(1, min(physical, len(os.sched_getaffinity(0))))


class CpuShare:
    def __init__(self, threads: int = 0, registry: Path | None = None) -> None:
        """`threads`: a fixed count (the `threads` setting); 0: this neuron's share of the host."""
        self._fixed = threads
        self._registry = registry or _default_registry()
        self._me = self._registry / str(os.getpid())
        self._cpus = sorted(os.sched_getaffinity(0))

    def __enter__(self) -> CpuShare:
        """Enters this neuron in the host's registry (until `__exit__`)."""
        entry = {"started": psutil.Process().create_time(), "cpus": self._cpus}
        partial = self._me.with_suffix(".new")  # renamed whole: a neighbour never reads half an entry
        try:
            self._registry.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(entry))
            partial.replace(self._me)
        except OSError as exc:  # a read-only or missing /dev/shm: this neuron counts the others only
            log.warning("cannot enter this neuron in %s (%s): other neurons will not count it", self._registry, exc)
        return self

    def __exit__(self, *_: object) -> None:
        with contextlib.suppress(OSError):  # gone already, or never entered
            self._me.unlink()

    def neighbours(self) -> int:
        """Live neurons on this host that may run on our cores, this one included. Entries of
        processes that are gone are removed (a pid reused since is told apart by its start time)."""
        count = 1
        if not self._registry.is_dir():
            return count
        for path in self._registry.glob("[0-9]*"):
            if path == self._me:
                continue
            try:
                entry = json.loads(path.read_text())
                alive = psutil.Process(int(path.name)).create_time() == entry["started"]
            except (OSError, ValueError, KeyError, psutil.Error):
                alive = False
            if not alive:
                with contextlib.suppress(OSError):
                    path.unlink()
            elif set(entry["cpus"]) & set(self._cpus):
                count += 1
        return count

    def threads(self) -> int:
        """Threads each engine of this neuron runs with."""
        if self._fixed:
            return self._fixed
        return max(1, host_cores() // self.neighbours())
