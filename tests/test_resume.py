"""A job resumed from the tokens an earlier try generated (InferenceJob.resume, what the gateway
sends when a node is lost mid-answer), on both engines: it sends nothing for those tokens and goes
on exactly as the undisturbed job did."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from cortex.protocol.messages import ChatMessage, InferenceJob, SamplingParams
from neuron.engine.outputs import Finished, Text
from neuron.engine.runtime import EngineOptions, LoadedModel
from neuron.engine.worker import DeviceWorker
from neuron.sources.loader import unload
from tests.engine_kit import ENGINES, cpu_worker, load_model


def _job(max_tokens: int = 40) -> InferenceJob:
    return InferenceJob(
        model="tiny",
        messages=[ChatMessage(role="user", content="Write a short story about a lighthouse keeper.")],
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0),
    )


@pytest.fixture(scope="module", params=ENGINES)
def model(request, tiny_model_dir) -> Iterator[LoadedModel]:
    loaded = load_model(request.param, tiny_model_dir, EngineOptions(max_batch=4))
    yield loaded
    unload(loaded)


@pytest.fixture
def worker() -> Iterator[DeviceWorker]:
    with cpu_worker(max_batch=4) as worker:
        yield worker


def _run(worker: DeviceWorker, model: LoadedModel, job: InferenceJob) -> tuple[list[Text], Finished]:
    async def go() -> tuple[list[Text], Finished]:
        outputs = [out async for out in worker.start_job(job, model).outputs()]
        end = outputs[-1]
        assert isinstance(end, Finished), end
        return [out for out in outputs if isinstance(out, Text)], end

    return asyncio.run(go())


def _ids(pieces: list[Text]) -> list[int]:
    return [token for piece in pieces for token in piece.ids]


def test_a_resumed_job_writes_what_the_undisturbed_one_wrote_after_the_cut(worker, model) -> None:
    whole, done = _run(worker, model, _job())
    assert len(whole) >= 4, whole
    cut = len(whole) // 2
    rest, resumed_done = _run(worker, model, _job().model_copy(update={"resume": _ids(whole[:cut])}))
    assert "".join(p.text for p in rest) == "".join(p.text for p in whole[cut:])
    assert _ids(rest) == _ids(whole[cut:])
    assert (resumed_done.finish_reason, resumed_done.completion_tokens) == (done.finish_reason, done.completion_tokens)
    assert resumed_done.prompt_tokens == done.prompt_tokens


def test_the_pieces_ids_are_every_token_generated(worker, model) -> None:
    whole, done = _run(worker, model, _job(max_tokens=24))
    assert done.finish_reason == "length"
    assert len(_ids(whole)) == sum(p.tokens for p in whole) == done.completion_tokens == 24


def test_a_resumed_job_that_had_reached_its_limit_only_ends(worker, model) -> None:
    whole, _ = _run(worker, model, _job(max_tokens=12))
    rest, done = _run(worker, model, _job(max_tokens=12).model_copy(update={"resume": _ids(whole)}))
    assert rest == []
    assert (done.finish_reason, done.completion_tokens) == ("length", 12)
