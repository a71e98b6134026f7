"""Prefix reuse on a real device worker, on both engines (the tiny model on transformers, SmolLM2's
GGUF on llama.cpp): a turn that starts like an earlier one computes only what is new, answers as
it would have without the cache, and the cache gives way when running sequences need the room."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import torch

from cortex.protocol.messages import ChatMessage, InferenceJob, SamplingParams
from cortex.protocol.prefix import prefix_chain
from neuron.engine.outputs import Finished
from neuron.engine.runtime import EngineOptions, LoadedModel
from neuron.engine.worker import DeviceWorker
from neuron.sources.loader import unload
from tests.engine_kit import ENGINES, answer, cpu_worker, load_model

SYSTEM = "You are a careful assistant for a team of engineers. " * 12


def _load(engine: str, tiny_model_dir, *, prefix_cache: bool = True, context: int = 2048) -> LoadedModel:
    return load_model(engine, tiny_model_dir, EngineOptions(max_batch=2, prefix_cache=prefix_cache), context=context)


@pytest.fixture(scope="module", params=ENGINES)
def engine(request) -> str:
    return request.param


@pytest.fixture
def model(engine, tiny_model_dir) -> Iterator[LoadedModel]:
    loaded = _load(engine, tiny_model_dir)
    yield loaded
    unload(loaded)


@pytest.fixture
def worker() -> Iterator[DeviceWorker]:
    with cpu_worker(max_batch=2) as worker:
        yield worker


def _job(*turns: str, max_tokens: int = 16, system: str = SYSTEM) -> InferenceJob:
    messages = [ChatMessage(role="system", content=system)]
    for i, text in enumerate(turns):
        messages.append(ChatMessage(role="user" if i % 2 == 0 else "assistant", content=text))
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return InferenceJob(model="tiny", messages=messages, sampling=sampling)


def _run(worker: DeviceWorker, model: LoadedModel, *jobs: InferenceJob) -> list[tuple[str, Finished]]:
    async def go():
        return await asyncio.gather(*(answer(worker.start_job(job, model)) for job in jobs))

    return asyncio.run(go())


def _conversation(worker: DeviceWorker, model: LoadedModel) -> list[tuple[str, Finished]]:
    """Three turns, each the last one's conversation plus its answer and a new question."""
    questions = ["What is a build cache?", "And why does it matter?", "Give one example."]
    turns: list[str] = []
    results = []
    for question in questions:
        turns.append(question)
        [(text, done)] = _run(worker, model, _job(*turns))
        results.append((text, done))
        turns.append(text)
    return results


def _unload(worker: DeviceWorker, loaded: LoadedModel) -> None:
    """On the device thread, as the neuron does: the step that finished the last job may still be
    releasing its cache there (freeing the model under it crashed llama.cpp)."""
    asyncio.run(worker.call(unload, loaded))


def _settled(worker: DeviceWorker) -> None:
    """Waits until the device thread is past the step that finished the last job (and stored it)."""
    asyncio.run(worker.call(lambda: None))


def test_a_later_turn_computes_only_what_is_new(worker, model) -> None:
    results = _conversation(worker, model)
    first, *later = [done for _, done in results]
    assert first.cached_tokens == 0
    for done, before in zip(later, [first, *later], strict=False):
        # The earlier turn's prompt at least (its answer too, where the template renders it as generated).
        assert done.cached_tokens >= before.prompt_tokens - 32  # transformers keeps whole blocks of 32
        assert done.prompt_tokens - done.cached_tokens < 64


def test_answers_are_the_same_without_the_cache(engine, tiny_model_dir, worker, model) -> None:
    cold = _load(engine, tiny_model_dir, prefix_cache=False)
    try:
        without = _conversation(worker, cold)
    finally:
        _unload(worker, cold)
    with_cache = _conversation(worker, model)
    assert [text for text, _ in with_cache] == [text for text, _ in without]
    assert all(done.cached_tokens == 0 for _, done in without)
    assert all(done.cached_tokens > 0 for _, done in with_cache[1:])


def test_sessions_that_share_a_system_prompt_reuse_it(worker, model) -> None:
    _run(worker, model, _job("Hello there."))
    others = _run(worker, model, _job("A different question, from someone else."), _job("And a third one, too."))
    # The system prompt is ~130 tokens; the later sessions read it from the first one's cache.
    assert all(done.cached_tokens >= 96 for _, done in others)
    if model.engine == "llama.cpp":  # and their sequences hold it in the same cells
        _settled(worker)
        pool = model.runtime.pool
        assert pool.positions - pool.used >= 96


def test_sessions_arriving_together_compute_their_shared_prompt_once(worker, model) -> None:
    jobs = [_job(f"Session {i} asks its first question.") for i in range(3)]

    async def together():
        # The device thread sleeps while the three arrive, so that it admits them in one go.
        pause = asyncio.ensure_future(worker.call(time.sleep, 0.5))
        await asyncio.sleep(0)
        handles = [worker.start_job(job, model) for job in jobs]
        await pause
        return [[out async for out in handle.outputs()][-1] for handle in handles]

    ends = asyncio.run(together())
    assert all(isinstance(end, Finished) for end in ends)
    reused = sorted(end.cached_tokens for end in ends)
    assert reused[0] == 0 and reused[1] >= 96 and reused[2] >= 96  # the first computed it for the others


def test_the_cache_reports_its_size_hit_rate_and_fingerprints(worker, model) -> None:
    job = _job("What is a build cache?")
    _run(worker, model, job)
    _run(worker, model, job)
    _settled(worker)
    status = model.runtime.prefix.status()
    assert status.tokens > 0 and status.mb > 0
    assert status.reused_tokens > 0 and 0 < status.hit_rate < 1
    chain = prefix_chain(job)
    assert chain[0] in status.prefixes and chain[-1] in status.prefixes


def test_running_sequences_take_the_room_of_kept_prefixes(engine, tiny_model_dir, worker) -> None:
    # A KV budget of 2 x 512 tokens (rounded up to whole MB): eight conversations of ~330 cannot all stay.
    small = _load(engine, tiny_model_dir, context=512)

    def conversation(i: int) -> InferenceJob:
        return _job(f"Question number {i} about caches.", system=f"{i} is the system prompt here. " * 40)

    try:
        for i in range(8):
            _run(worker, small, conversation(i))
        _settled(worker)
        kv_budget_mb = small.memory_mb - small.runtime.weights_mb
        assert small.runtime.prefix.status().mb <= kv_budget_mb  # inside the model's own KV budget
        [(_, again)] = _run(worker, small, conversation(0))
        assert again.cached_tokens < 32  # at most the template's opening: the oldest gave its room away
        [(_, kept)] = _run(worker, small, conversation(7))
        assert kept.cached_tokens > 300
    finally:
        _unload(worker, small)


class _OutOfMemoryOnce:
    """The model, except that its first forward pass finds the device full (a fault, injected)."""

    def __init__(self, model) -> None:
        self._model = model
        self.raised = False

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def __call__(self, **inputs):
        if not self.raised:
            self.raised = True
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return self._model(**inputs)


def test_out_of_device_memory_drops_the_cache_before_failing_a_job(tiny_model_dir, worker) -> None:
    model = _load("transformers", tiny_model_dir)
    try:
        before = _job("What is a build cache?")
        _run(worker, model, before)
        _settled(worker)
        assert prefix_chain(before)[-1] in model.runtime.prefix.status().prefixes
        full = _OutOfMemoryOnce(model.runtime.model)
        model.runtime._model = full
        after = _job("Something else entirely.", system="Another system prompt. " * 10)
        [(_, done)] = _run(worker, model, after)  # no Crashed: the job went through
        _settled(worker)
        assert full.raised and done.completion_tokens > 0
        held = model.runtime.prefix.status().prefixes
        assert prefix_chain(before)[-1] not in held and prefix_chain(after)[-1] in held
    finally:
        _unload(worker, model)
