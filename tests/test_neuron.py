"""A neuron on a real nats-server: jobs over NATS, the control service, heartbeats."""

from __future__ import annotations

import asyncio
import json

import nats
import pytest

from cortex.protocol.errors import ErrorCode
from cortex.protocol.messages import (
    JOB_EVENT,
    Accepted,
    ChatMessage,
    Delta,
    Done,
    InferenceJob,
    Refusal,
    SamplingParams,
)
from cortex.protocol.subjects import Subjects, model_key
from cortex.transport.connection import connect
from neuron.control import errors
from neuron.events import EventPublisher
from tests.conftest import nats_request

TINY = "test/tiny-llama"


async def _run_job(nats_url: str, job: InferenceJob, subject: str) -> tuple[list, list[bytes]]:
    """Publishes a job and returns (parsed events, raw payloads) up to and including the end marker."""
    nc = await nats.connect(nats_url)
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(subject, job.to_bytes(), reply=inbox)
    raw: list[bytes] = []
    try:
        while True:
            msg = await sub.next_msg(timeout=30)
            raw.append(msg.data)
            if not msg.data:
                break
    finally:
        await nc.close()
    return [JOB_EVENT.validate_json(r) for r in raw[:-1]], raw


def _job(job_id: str, max_tokens: int = 12) -> InferenceJob:
    return InferenceJob(
        job_id=job_id,
        request_id=f"req-{job_id}",
        model=TINY,
        messages=[ChatMessage(role="user", content="Count to five.")],
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0),
    )


async def test_job_over_nats_streams_ordered_gap_free_events_then_the_end_marker(nats_url, neuron) -> None:
    events, raw = await _run_job(nats_url, _job("order-1"), Subjects().infer(TINY))
    assert raw[-1] == b"", "the stream ends with an empty message"
    assert [e.seq for e in events] == list(range(len(events)))
    assert isinstance(events[0], Accepted) and events[0].node == "t1"
    assert all(isinstance(e, Delta) for e in events[1:-1])
    done = events[-1]
    assert isinstance(done, Done)
    assert done.finish_reason == "length"
    assert done.usage.completion_tokens == 12
    assert sum(e.tokens for e in events[1:-1]) == 12, "deltas account for every generated token"


async def test_node_addressed_subject_reaches_that_node(nats_url, neuron) -> None:
    events, _ = await _run_job(nats_url, _job("addressed-1", 3), Subjects().infer_node(TINY, "t1"))
    assert events[0].node == "t1"
    assert isinstance(events[-1], Done)


async def test_job_for_a_model_nobody_serves_gets_no_responders(nats_url, neuron) -> None:
    nc = await nats.connect(nats_url)
    try:
        with pytest.raises(nats.errors.NoRespondersError):
            await nc.request(Subjects().infer("nobody/serves-this"), _job("nr").to_bytes(), timeout=5)
    finally:
        await nc.close()


def test_greedy_generation_is_deterministic(nats_url, neuron) -> None:
    texts = []
    for i in range(2):
        events, _ = asyncio.run(_run_job(nats_url, _job(f"det-{i}"), Subjects().infer(TINY)))
        texts.append("".join(e.text for e in events if isinstance(e, Delta)))
    assert texts[0] == texts[1]
    assert texts[0]


async def test_micro_service_is_discoverable_like_nats_micro_ls(nats_url, neuron) -> None:
    # `nats micro ls` sends $SRV.INFO and collects every reply.
    nc = await nats.connect(nats_url)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish("$SRV.INFO.neuron", b"", reply=inbox)
        info = json.loads((await sub.next_msg(timeout=5)).data)
    finally:
        await nc.close()
    assert info["name"] == "neuron"
    assert info["metadata"]["node"] == "t1"
    subjects = {e["subject"] for e in info["endpoints"]}
    assert subjects == {f"cortex.node.t1.{v}" for v in ("load", "unload", "status", "cancel", "count")}


def test_status_reports_the_ready_model_and_devices(nats_url, neuron) -> None:
    status = nats_request(nats_url, "cortex.node.t1.status")
    hb = status["heartbeat"]
    assert hb["node"] == "t1"
    assert any(d["id"] == "cpu" and d["total_mb"] > 0 for d in hb["devices"])
    model = next(m for m in hb["models"] if m["id"] == TINY)
    assert model["state"] == "ready"
    assert model["key"] == model_key(TINY)
    assert model["memory_mb"] > 0


def test_load_of_a_missing_source_is_refused_with_a_reason(nats_url, neuron, tmp_path) -> None:
    request = {"model": {"id": "ghost/model", "source": f"file:{tmp_path}/missing"}, "wait": True}
    reply = nats_request(nats_url, "cortex.node.t1.load", request, timeout=30)
    assert reply["code"] == "preflight_failed"
    assert reply["refusal"] == {
        "kind": "source_missing",
        "model": "ghost/model",
        "detail": f"{tmp_path}/missing does not exist on this node",
        "suggestion": "fix the path in models.toml",
    }


def test_heartbeat_is_in_the_kv_bucket(nats_url, neuron) -> None:
    async def read() -> dict:
        nc = await nats.connect(nats_url)
        try:
            kv = await nc.jetstream().key_value("cortex_nodes")
            return json.loads((await kv.get("t1")).value)
        finally:
            await nc.close()

    hb = asyncio.run(read())
    assert hb["node"] == "t1"
    assert hb["interval_s"] == 1.0


def test_estimates_are_a_key_of_their_own_written_when_they_change(nats_url, neuron) -> None:
    async def read() -> tuple:
        nc = await nats.connect(nats_url)
        try:
            kv = await nc.jetstream().key_value("cortex_nodes")
            before = await kv.get("t1.estimates"), await kv.get("t1")
            await asyncio.sleep(2.5)  # two and a half heartbeat intervals
            return before, (await kv.get("t1.estimates"), await kv.get("t1"))
        finally:
            await nc.close()

    (estimates, beat), (estimates_after, beat_after) = asyncio.run(read())
    assert beat_after.revision > beat.revision and estimates_after.revision == estimates.revision
    assert "test/tiny-llama" in [e["model"] for e in json.loads(estimates.value)["estimates"]]
    assert "estimates" not in json.loads(beat_after.value)


async def test_broadcast_cancel_stops_a_job_whose_node_the_sender_does_not_know(nats_url, neuron) -> None:
    nc = await nats.connect(nats_url)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish(Subjects().infer(TINY), _job("bcast-1", max_tokens=8000).to_bytes(), reply=inbox)
        assert isinstance(JOB_EVENT.validate_json((await sub.next_msg(timeout=10)).data), Accepted)
        await nc.publish("cortex.cancel", json.dumps({"job_id": "bcast-1"}).encode())
        while True:
            data = (await sub.next_msg(timeout=5)).data
            event = JOB_EVENT.validate_json(data)
            if isinstance(event, Done):
                break
    finally:
        await nc.close()
    assert event.finish_reason == "cancelled"
    assert event.usage.completion_tokens < 8000


async def test_a_cancel_that_arrives_before_its_job_still_applies(nats_url, neuron) -> None:
    nc = await nats.connect(nats_url)
    try:
        await nc.request("cortex.node.t1.cancel", json.dumps({"job_id": "early-1"}).encode(), timeout=5)
        reply = await nc.request(Subjects().infer_node(TINY, "t1"), _job("early-1").to_bytes(), timeout=5)
    finally:
        await nc.close()
    event = JOB_EVENT.validate_json(reply.data)
    assert (event.type, event.code) == ("error", "cancelled")


@pytest.mark.parametrize(
    ("error", "code", "status"),
    [
        (errors.InvalidVerb("bad"), ErrorCode.invalid_request, 400),
        (errors.Conflict("pinned"), ErrorCode.invalid_request, 409),
        (errors.ModelNotFound("gone"), ErrorCode.model_not_found, 404),
        (errors.ModelNotLoaded("gone"), ErrorCode.model_not_loaded, 404),
        (errors.ShuttingDown("bye"), ErrorCode.shutting_down, 503),
        (
            errors.PreflightRefused("no", Refusal(kind="source_empty", model="m", detail="no")),
            ErrorCode.preflight_failed,
            422,
        ),
        (errors.LoadFailed("failed"), ErrorCode.load_failed, 422),
        (errors.SourceUnreachable("hub down"), ErrorCode.load_failed, 503),
        (errors.VerbError("?"), ErrorCode.internal, 500),
    ],
)
def test_a_failed_verb_answers_the_code_and_status_its_kind_has_on_the_wire(
    error: errors.VerbError, code: ErrorCode, status: int
) -> None:
    assert (error.code, error.status) == (code, status)
    assert (error.refusal is not None) == isinstance(error, errors.PreflightRefused)


async def test_an_event_nats_will_not_take_is_logged_not_raised(nats_url, caplog) -> None:
    connection = await connect([nats_url], "events-test")
    await connection.aclose()
    await EventPublisher(connection, Subjects(), "n1").publish("unloaded", model="m")
    assert "could not tell the fleet unloaded of m" in caplog.text
