"""Chunked prefill on a real device worker, on both engines: a long prompt goes in a chunk a step
beside the streams that are decoding, so they keep producing tokens while it does, and what it
answers is what it answers fed whole."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterator

import pytest

from cortex.protocol.messages import ChatMessage, InferenceJob, SamplingParams
from neuron.engine.chunking import MIN_CHUNK, STALL_RATIO, PrefillBudget
from neuron.engine.runtime import EngineOptions, LoadedModel
from neuron.sources.loader import unload
from tests.conftest import needs_llama_cpp
from tests.engine_kit import ENGINES, answer, cpu_worker, load_model

CHUNK = 32
LONG = "Here is the design document of a build system, section by section. " * 60  # ~900 tokens


def _job(prompt: str, **sampling) -> InferenceJob:
    params = SamplingParams(**{"max_tokens": 8, "temperature": 0.0, **sampling})
    return InferenceJob(model="tiny", messages=[ChatMessage(role="user", content=prompt)], sampling=params)


@pytest.fixture(scope="module", params=ENGINES)
def model(request, tiny_model_dir) -> Iterator[LoadedModel]:
    options = EngineOptions(max_batch=4, prefix_cache=False, prefill_chunk=CHUNK)
    loaded = load_model(request.param, tiny_model_dir, options)
    yield loaded
    unload(loaded)


def test_a_running_stream_gets_a_token_for_every_chunk_of_a_long_prompt(worker, model) -> None:
    no_end = {eos: -100.0 for eos in model.eos_ids}

    async def go():
        running = worker.start_job(_job("Tell me a story.", max_tokens=2000, logit_bias=no_end), model)
        await anext(running.outputs())  # it is decoding
        before = running.generated
        _, done = await answer(worker.start_job(_job(LONG), model))
        during = running.generated - before
        running.cancel()
        await answer(running)
        return done, during

    done, during = asyncio.run(go())
    assert done.prompt_tokens > 800
    # Fed whole, the prompt would have stopped the stream for its whole prefill (a token or two at most).
    assert during >= math.ceil(done.prompt_tokens / CHUNK)


def test_a_prompt_fed_in_chunks_answers_as_it_does_fed_whole(worker, model) -> None:
    no_end = {eos: -100.0 for eos in model.eos_ids}

    async def beside_a_stream():
        running = worker.start_job(_job("Tell me a story.", max_tokens=2000, logit_bias=no_end), model)
        await anext(running.outputs())
        result = await answer(worker.start_job(_job(LONG), model))
        running.cancel()
        await answer(running)
        return result

    async def alone():
        return await answer(worker.start_job(_job(LONG), model))  # nothing decodes: it goes in whole

    chunked, whole = asyncio.run(beside_a_stream()), asyncio.run(alone())
    assert chunked[0] == whole[0]
    assert chunked[1].completion_tokens == whole[1].completion_tokens == 8


def test_the_chunk_is_sized_so_a_step_takes_a_few_decode_steps() -> None:
    budget = PrefillBudget(most=2048)
    assert budget.tokens(decoding=0) == 2048  # nothing decodes: as much as one pass takes
    assert budget.tokens(decoding=3) == MIN_CHUNK  # not measured yet
    budget.measured(decoding=3, fed=0, seconds=0.010)  # a decode step: 10 ms
    budget.measured(decoding=3, fed=32, seconds=0.042)  # 32 prompt tokens more: 1 ms each
    assert budget.tokens(decoding=3) == int((STALL_RATIO - 1) * 10)
    assert PrefillBudget(most=2048, fixed=64).tokens(decoding=3) == 64


@needs_llama_cpp
def test_jobs_beyond_the_kv_pools_room_step_back_and_all_finish(tiny_model_dir, caplog) -> None:
    # 2 contexts of 512 cells: four jobs of ~450 tokens each cannot all hold their cells at once.
    small = load_model("llama.cpp", tiny_model_dir, EngineOptions(max_batch=2, prefix_cache=False), context=512)
    assert small.parallel == 4  # the pool holds four usual jobs (half a context each)
    no_end = {eos: -100.0 for eos in small.eos_ids}
    jobs = [_job(f"Story {i}: tell me about a lighthouse.", max_tokens=400, logit_bias=no_end) for i in range(4)]

    async def go():
        return await asyncio.gather(*(answer(worker.start_job(job, small)) for job in jobs))

    try:
        with cpu_worker(max_batch=2) as worker, caplog.at_level(logging.INFO, logger="neuron.engine.llamacpp"):
            ends = [done for _, done in asyncio.run(go())]
    finally:
        unload(small)
    assert [(d.finish_reason, d.completion_tokens) for d in ends] == [("length", 400)] * 4
    assert "steps back" in caplog.text
