"""A job resumed from the tokens an earlier try generated (InferenceJob.resume, what the gateway
sends when a node is lost mid-answer), on both engines: it sends nothing for those tokens and goes
on exactly as the undisturbed job did."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import torch

from cortex.protocol.messages import ChatMessage, InferenceJob, ModelSpec, SamplingParams, Tool
from neuron.engine.outputs import Finished, Reasoning, Text, ToolCallPart
from neuron.engine.runtime import EngineOptions, LoadedModel
from neuron.engine.worker import DeviceWorker
from neuron.sources.loader import load, unload
from neuron.sources.preflight import preflight
from neuron.sources.resolve import resolve
from tests.engine_kit import ENGINES, cpu_worker, load_model

Piece = Text | Reasoning | ToolCallPart


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


@pytest.mark.parametrize("model_id", ["test/tools", "test/thinker"])
def test_a_resumed_answer_goes_on_inside_reasoning_and_tool_calls(replay_models, model_id: str) -> None:
    """Cut a recorded answer with reasoning or a tool call here and there (and where one kind of piece
    gives way to another): what the resumed job
    sends is what followed the cut (the parser, reading the earlier tokens again, is where it was)."""
    folder, script = replay_models[model_id]
    spec = ModelSpec(id=model_id, source=f"file:{folder}", replay=str(script))
    plan = preflight(spec, device_kind="cpu", device_count=1, max_batch=4)
    loaded = load(plan, resolve(plan), [torch.device("cpu")], [100_000], None, EngineOptions(max_batch=4))
    tools = [Tool(name="get_weather", parameters={"type": "object", "properties": {"city": {"type": "string"}}})]
    job = InferenceJob(
        model=model_id,
        messages=[ChatMessage(role="user", content="What is the weather in Paris?")],
        tools=tools if model_id == "test/tools" else None,
        sampling=SamplingParams(max_tokens=400, temperature=0.0),
    )
    try:
        with cpu_worker(max_batch=4) as worker:
            whole, _ = _pieces(worker, loaded, job)
            assert len(whole) >= 3 and {type(p) for p in whole} - {Text}, whole
            kinds_change = [i for i in range(1, len(whole)) if type(whole[i]) is not type(whole[i - 1])]
            for cut in sorted({*range(1, len(whole), max(1, len(whole) // 6)), *kinds_change}):
                resumed = job.model_copy(update={"resume": [t for p in whole[:cut] for t in p.ids]})
                rest, _ = _pieces(worker, loaded, resumed)
                assert _seen(rest) == _seen(whole[cut:]), cut
    finally:
        unload(loaded)


def _pieces(worker: DeviceWorker, model: LoadedModel, job: InferenceJob) -> tuple[list[Piece], Finished]:
    async def go() -> tuple[list[Piece], Finished]:
        outputs = [out async for out in worker.start_job(job, model).outputs()]
        assert isinstance(outputs[-1], Finished), outputs[-1]
        return [out for out in outputs if isinstance(out, Text | Reasoning | ToolCallPart)], outputs[-1]

    return asyncio.run(go())


def _seen(pieces: list[Piece]) -> list[tuple]:
    """What a client makes of the pieces: the runs of text, reasoning and each call's arguments, with
    their token ids (not where they were split: pieces that are ready together are sent as one), and
    each call's name (not its random id)."""
    runs: list[tuple] = []
    for piece in pieces:
        if isinstance(piece, ToolCallPart):
            key: tuple = ("call", piece.index, piece.name)
            text = piece.arguments
        else:
            key, text = (type(piece).__name__,), piece.text
        if runs and runs[-1][0][0] == key[0] and (key[0] != "call" or runs[-1][0][1] == key[1]):
            previous = runs.pop()
            key = previous[0] if len(key) < 3 or key[2] is None else key
            runs.append((key, previous[1] + text, previous[2] + piece.ids))
        else:
            runs.append((key, text, piece.ids))
    return runs
