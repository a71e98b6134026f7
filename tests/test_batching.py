"""Continuous batching on a real device worker, on both engines (the tiny model on transformers,
SmolLM2's GGUF on llama.cpp): jobs decode together, each with its own settings, and a job's
output in a batch is its output alone. The prefix cache is off here: a job run alone first would
leave its prompt cached for the batch (tests/test_prefix_cache.py covers reuse)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from cortex.protocol.messages import ChatMessage, InferenceJob, SamplingParams
from neuron.engine.outputs import Crashed, Finished, Text
from neuron.engine.runtime import EngineOptions, LoadedModel
from neuron.engine.worker import DeviceWorker
from neuron.sources.loader import unload
from tests.engine_kit import ENGINES, answer, load_model

PROMPTS = [
    "Hi",
    "Tell me a long story about a dragon who lived in the mountains.",
    "What is 2 + 2?",
    "Name three colours of the rainbow, then three more, then explain why the sky is blue.",
]


def _load(engine: str, tiny_model_dir, converted) -> LoadedModel:
    return load_model(engine, tiny_model_dir, EngineOptions(max_batch=4, prefix_cache=False), converted=converted)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return tmp_path_factory.mktemp("converted")


@pytest.fixture(scope="module", params=ENGINES)
def tiny(request, tiny_model_dir, converted) -> Iterator[LoadedModel]:
    loaded = _load(request.param, tiny_model_dir, converted)
    yield loaded
    unload(loaded)


def _job(i: int, prompt: str, **sampling) -> InferenceJob:
    params = SamplingParams(**{"max_tokens": 24, "temperature": 0.0, **sampling})
    messages = [ChatMessage(role="user", content=prompt)]
    return InferenceJob(job_id=f"j{i}", request_id="r", model="tiny", messages=messages, sampling=params)


def _run(worker: DeviceWorker, model: LoadedModel, jobs: list[InferenceJob]) -> list[tuple[str, Finished]]:
    async def go():
        handles = [worker.start_job(job, model) for job in jobs]
        return await asyncio.gather(*(answer(h) for h in handles))

    return asyncio.run(go())


def _reference(worker: DeviceWorker, model: LoadedModel, jobs: list[InferenceJob]) -> list[str]:
    """What the batch must answer: each job's answer alone on transformers. llama.cpp's unified KV
    pool lays several sequences' cells side by side, and its attention then sums in another order
    (as in llama.cpp's own server with a unified cache), so there it is the same batch run again."""
    if model.engine == "transformers":
        return [_run(worker, model, [job])[0][0] for job in jobs]
    return [text for text, _ in _run(worker, model, jobs)]


def test_greedy_output_in_a_batch_is_the_output_alone(worker, tiny) -> None:
    # Different prompt lengths (the batch pads them) and different max_tokens (rows leave at different steps).
    no_end = {eos: -100.0 for eos in tiny.eos_ids}  # a real model would end some answers early
    jobs = [_job(i, p, max_tokens=12 + 6 * i, logit_bias=no_end) for i, p in enumerate(PROMPTS)]
    expected = _reference(worker, tiny, jobs)
    together = _run(worker, tiny, jobs)
    assert [text for text, _ in together] == expected
    assert [d.completion_tokens for _, d in together] == [12, 18, 24, 30]


def test_seeded_sampling_in_a_batch_is_the_same_as_alone(worker, tiny) -> None:
    jobs = [_job(i, p, temperature=1.0, seed=100 + i) for i, p in enumerate(PROMPTS)]
    expected = _reference(worker, tiny, jobs)
    assert [text for text, _ in _run(worker, tiny, jobs)] == expected


def test_a_job_joins_a_running_batch_at_the_next_step(worker, tiny) -> None:
    async def go():
        first = worker.start_job(_job(0, PROMPTS[1], max_tokens=60), tiny)
        outputs = first.outputs()
        await anext(outputs)  # the first job is decoding
        late = worker.start_job(_job(1, PROMPTS[2], max_tokens=10), tiny)
        late_outputs = [o async for o in late.outputs()]
        rest = [o async for o in outputs]
        return late_outputs, rest

    late_outputs, rest = asyncio.run(go())
    late_text = "".join(o.text for o in late_outputs if isinstance(o, Text))
    late_done = late_outputs[-1]
    assert late_done.completion_tokens == 10 and late_done.finish_reason == "length"
    assert isinstance(rest[-1], Finished) and rest[-1].completion_tokens == 60  # the first ran on, undisturbed
    alone = _run(worker, tiny, [_job(1, PROMPTS[2], max_tokens=10)])[0][0]
    assert late_text == alone


def test_jobs_of_one_model_share_one_batch(worker, tiny) -> None:
    async def go():
        no_end = {eos: -100.0 for eos in tiny.eos_ids}  # so none of them ends early
        jobs = [_job(i, PROMPTS[i], max_tokens=400, logit_bias=no_end) for i in range(3)]
        handles = [worker.start_job(job, tiny) for job in jobs]
        for handle in handles:
            outputs = handle.outputs()
            await anext(outputs)  # the prefill's token
            await anext(outputs)  # a decode step's: it is in the batch
        sizes = worker.batch_sizes()
        for handle in handles:
            handle.cancel()
        await asyncio.gather(*(answer(h) for h in handles))
        return sizes

    assert asyncio.run(go()) == {"tiny": 3}


def test_a_cancelled_job_frees_its_slot_for_a_waiting_one(worker, tiny) -> None:
    async def go():
        # As many as decode at once (llama.cpp's pool takes more than the worker's max_batch), none
        # ending on its own before it is cancelled.
        no_end = {eos: -100.0 for eos in tiny.eos_ids}
        jobs = [_job(i, PROMPTS[0], max_tokens=2000, logit_bias=no_end) for i in range(tiny.parallel)]
        running = [worker.start_job(job, tiny) for job in jobs]
        waiting = worker.start_job(_job(9, PROMPTS[2], max_tokens=3), tiny)
        await anext(running[0].outputs())
        assert not waiting.running  # every slot is taken: it waits
        running[0].cancel()
        waited = await asyncio.wait_for(answer(waiting), timeout=30)
        for handle in running[1:]:
            handle.cancel()
        done = [await answer(h) for h in running]
        return waited, done

    (_, done), cancelled = asyncio.run(go())
    assert done.completion_tokens == 3
    assert [d.finish_reason for _, d in cancelled] == ["cancelled"] * tiny.parallel


@pytest.mark.parametrize("engine", ENGINES)
def test_a_job_that_outlives_its_models_unload_fails_and_the_worker_goes_on(
    worker, tiny_model_dir, converted, engine
) -> None:
    gone = _load(engine, tiny_model_dir, converted)
    asyncio.run(worker.call(unload, gone))
    (text, failure) = asyncio.run(_fails(worker, _job(0, PROMPTS[0]), gone))
    assert failure.code == "internal" and text == ""
    assert asyncio.run(worker.call(lambda: "alive")) == "alive"


async def _fails(worker: DeviceWorker, job: InferenceJob, model: LoadedModel) -> tuple[str, Crashed]:
    outputs = [out async for out in worker.start_job(job, model).outputs()]
    assert isinstance(outputs[-1], Crashed), outputs
    return "".join(o.text for o in outputs if isinstance(o, Text)), outputs[-1]
