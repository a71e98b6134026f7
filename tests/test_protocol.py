"""The wire contract: models round-trip, subjects encode, schemas match the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from cortex.protocol import schemas
from cortex.protocol.catalogue import DEFAULT_MODEL, Catalogue, CatalogueError
from cortex.protocol.messages import (
    JOB_EVENT,
    Accepted,
    ChatMessage,
    DeviceInfo,
    Done,
    Failed,
    Heartbeat,
    InferenceJob,
    ModelState,
    ModelStatus,
    SamplingParams,
    Timings,
    Usage,
)
from cortex.protocol.subjects import Subjects, model_id_from_key, model_key

ROOT = Path(__file__).resolve().parent.parent


def test_job_round_trips_through_json() -> None:
    job = InferenceJob(
        job_id="j1",
        request_id="r1",
        model="org/model",
        messages=[ChatMessage(role="user", content="héllo 👋")],
        sampling=SamplingParams(max_tokens=7, temperature=0.0, stop=["\n\n"], seed=3),
    )
    assert InferenceJob.model_validate_json(job.to_bytes()) == job


def test_job_needs_exactly_one_of_messages_or_prompt() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        InferenceJob(job_id="j", request_id="r", model="m")
    with pytest.raises(ValidationError, match="exactly one"):
        InferenceJob(job_id="j", request_id="r", model="m", prompt="x", messages=[])


@pytest.mark.parametrize(
    "event",
    [
        Accepted(job_id="j", seq=0, node="n1", device="cpu"),
        Failed(job_id="j", seq=1, code="busy", message="full", retryable=True),
        Done(
            job_id="j",
            seq=2,
            finish_reason="stop",
            stop_sequence="END",
            usage=Usage(prompt_tokens=3, completion_tokens=4),
            timings=Timings(queue_ms=1, prefill_ms=2, decode_ms=3, ttft_ms=4),
        ),
    ],
)
def test_events_parse_back_to_their_own_type(event) -> None:
    parsed = JOB_EVENT.validate_json(event.to_bytes())
    assert type(parsed) is type(event)
    assert parsed == event


def test_heartbeat_round_trips() -> None:
    hb = Heartbeat(
        node="n1",
        version="0",
        started_at=1.0,
        sent_at=2.0,
        interval_s=2.0,
        max_batch=4,
        max_queue=8,
        devices=[DeviceInfo(id="cpu", kind="cpu", name="x86", total_mb=100, free_mb=50)],
        models=[ModelStatus(id="a/b", key=model_key("a/b"), state=ModelState.ready, device="cpu")],
    )
    assert Heartbeat.model_validate_json(hb.to_bytes()) == hb


@pytest.mark.parametrize(
    ("model_id", "key"),
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB_2FSmolLM2-135M-Instruct"),
        ("qwen2.5:7b", "qwen2_2E5_3A7b"),
        ("a_b", "a_5Fb"),
        ("a/b", "a_2Fb"),
        ("é", "_C3_A9"),
    ],
)
def test_model_key_is_the_documented_encoding(model_id: str, key: str) -> None:
    assert model_key(model_id) == key
    assert model_id_from_key(key) == model_id


def test_model_keys_do_not_collide_when_ids_differ_only_by_escapes() -> None:
    ids = ["a/b", "a_2Fb", "a.b", "a_b", "a-b"]
    assert len({model_key(i) for i in ids}) == len(ids)


def test_subjects_are_single_tokens_per_model() -> None:
    s = Subjects("cortex")
    assert s.infer("a.b/c") == "cortex.infer.a_2Eb_2Fc"
    assert s.infer_node("a.b/c", "gpu1") == "cortex.node.gpu1.infer.a_2Eb_2Fc"
    assert s.control("gpu1", "load") == "cortex.node.gpu1.load"


def test_schema_files_match_the_code() -> None:
    assert schemas.drift(ROOT / "schemas") == [], "run `cortex schemas` and commit schemas/"


def test_schema_drift_is_detected(tmp_path: Path) -> None:
    schemas.write(tmp_path)
    (tmp_path / "job.json").write_text("{}")
    (tmp_path / "stale.json").write_text("{}")
    assert schemas.drift(tmp_path) == ["job.json", "stale.json"]


def test_catalogue_resolves_ids_and_aliases() -> None:
    catalogue = Catalogue.default()
    assert catalogue.resolve("smollm2") == DEFAULT_MODEL
    assert catalogue.resolve(DEFAULT_MODEL.id) == DEFAULT_MODEL
    assert catalogue.resolve("nope") is None


def test_catalogue_errors_name_file_model_and_field(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text('[[models]]\nid = "m1"\nsource = "file:/x"\ndtype = "float8"\n')
    with pytest.raises(CatalogueError, match=r"models\.toml: model m1: field `dtype`"):
        Catalogue.load(path)


@pytest.mark.parametrize(
    ("line", "field", "message"),
    [
        ('keep_alive = "soon"', "keep_alive", "not a duration"),
        ('pinned_on = ["bad node"]', "pinned_on.0", "should match pattern"),
        ("devices = 0", "devices", "greater than or equal to 1"),
        ("memory_mb = -5", "memory_mb", "greater than or equal to 1"),
        ("prority = 3", "prority", "Extra inputs are not permitted"),
    ],
)
def test_catalogue_lifecycle_fields_are_validated(tmp_path: Path, line: str, field: str, message: str) -> None:
    path = tmp_path / "models.toml"
    path.write_text(f'[[models]]\nid = "m1"\nsource = "file:/x"\n{line}\n')
    with pytest.raises(CatalogueError, match=rf"models\.toml: model m1: field `{re.escape(field)}`: .*{message}"):
        Catalogue.load(path)


def test_keep_alive_reads_durations(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text('[[models]]\nid = "a"\nsource = "file:/x"\nkeep_alive = "10m"\npriority = 5\n')
    spec = Catalogue.load(path).resolve("a")
    assert spec.keep_alive == 600.0 and spec.priority == 5


def test_catalogue_rejects_an_alias_used_twice(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(
        '[[models]]\nid = "a"\nsource = "file:/x"\naliases = ["x"]\n'
        '[[models]]\nid = "b"\nsource = "file:/y"\naliases = ["x"]\n'
    )
    with pytest.raises(CatalogueError, match="'x' is used by both 'a' and 'b'"):
        Catalogue.load(path)
