"""`python -m bench fleet --quick`, as CI runs it: a hundred simulated nodes and one serving node in
front of a gateway. Every step checks what it needs before it is timed (every node in view with its
estimates, requests answered, the dead nodes noticed, the stopped ones gone), so a fleet the
gateway loses track of fails here; the timings themselves are the benchmark's, not asserted."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from bench import fleet_sim

pytestmark = pytest.mark.timeout(180)


def test_a_hundred_nodes_are_seen_routed_around_and_dropped_when_they_die_or_leave(tmp_path: Path) -> None:
    [row] = fleet_sim.main(["--quick", "--root", str(tmp_path)])
    assert row["nodes"] == 100 and row["requests_per_s"] > 0
    # The gateway timed its routing decisions and heard the heartbeats (finite: some bucket held them all).
    assert math.isfinite(row["route_p99_us"]) and math.isfinite(row["lag_p99_ms"])
    assert row["heartbeat_kb_s"] > 0
