"""The chaos run, short: two neurons and a gateway under load (bench/chaos.py's clients, the openai
SDK with its retries off) while a neuron is killed, frozen and stopped, and NATS goes down and
comes back. No request may fail and none may hang; the answers on the faulty node move."""

from __future__ import annotations

from pathlib import Path

from bench import chaos


def test_no_request_fails_or_hangs_while_a_node_or_nats_fails(tmp_path: Path, models_toml: Path) -> None:
    schedule = chaos.faults(stop_s=3.0, nats_s=2.0)
    outcomes = chaos.run(tmp_path, models_toml, "test/tiny-move", schedule, max_tokens=400, settle_s=2.0)
    print("\n" + chaos.table(outcomes))
    assert [o.fault for o in outcomes] == [f.name for f in schedule]
    for outcome in outcomes:
        assert outcome.requests > 0, outcome
        assert (outcome.failed, outcome.hung) == (0, 0), (outcome.fault, outcome.errors)
    assert outcomes[0].moved >= 1, "nothing was running on the killed node: the run proves nothing"
