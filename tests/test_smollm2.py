"""The default model, for real: SmolLM2-135M-Instruct from its GGUF, through the whole stack, on
llama.cpp (quantized, as `make run` serves it where llama-cpp-python is installed) and on
transformers (dequantized)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import needs_llama_cpp, wait_until

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
ON_TRANSFORMERS = "test/smollm2-transformers"  # the same file, engine = "transformers"
BOTH = [
    pytest.param("smollm2", marks=needs_llama_cpp, id="llama.cpp"),
    pytest.param(ON_TRANSFORMERS, id="transformers"),
]
FRANCE = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def cold_stream(gateway, neuron) -> Iterator[list[str]]:
    """The first request for SmolLM2 on transformers loads it (dequantizing the GGUF): its SSE lines,
    comments included."""
    body = {"model": ON_TRANSFORMERS, "messages": FRANCE, "max_tokens": 40, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=300) as resp:
        assert resp.status_code == 200
        lines = [line for line in resp.iter_lines() if line]
    yield lines
    for model in (ON_TRANSFORMERS, SMOLLM2):
        httpx.post(f"{gateway.url}/admin/models/unload", json={"model": model}, timeout=60)


def test_a_cold_stream_gets_keep_alive_comments_while_the_model_loads(cold_stream) -> None:
    comments = [line for line in cold_stream if line.startswith(":")]
    assert comments, "a load of several seconds sends SSE comments (keepalive_interval is 1s here)"
    assert cold_stream.index(comments[-1]) < cold_stream.index(next(x for x in cold_stream if x.startswith("data:")))
    chunks = [json.loads(x[6:]) for x in cold_stream if x.startswith("data: {")]
    assert "Paris" in "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def test_a_repeated_load_reads_the_converted_weights(gateway, neuron, cold_stream) -> None:
    wait_until(lambda: f"cached converted weights of {ON_TRANSFORMERS}" in neuron.output(), 60, "the converted weights")
    unloaded = httpx.post(f"{gateway.url}/admin/models/unload", json={"model": ON_TRANSFORMERS}, timeout=60)
    assert unloaded.status_code == 200
    reloaded = httpx.post(f"{gateway.url}/admin/models/load", json={"model": ON_TRANSFORMERS}, timeout=300)
    assert reloaded.status_code == 200, reloaded.text
    assert reloaded.json()["nodes"] == ["t1"]
    loaded_lines = [line for line in neuron.output().splitlines() if f"models: loaded {ON_TRANSFORMERS}:" in line]
    assert len(loaded_lines) == 2
    assert "from converted cache" not in loaded_lines[0] and "from converted cache" in loaded_lines[1]


@pytest.mark.parametrize("smollm2", BOTH)
def test_a_simple_question_gets_a_sensible_english_answer(openai_client, cold_stream, smollm2) -> None:
    resp = openai_client.chat.completions.create(
        model=smollm2,
        messages=FRANCE,
        max_tokens=40,
        temperature=0,
    )
    answer = resp.choices[0].message.content
    assert "Paris" in answer
    assert resp.choices[0].finish_reason == "stop", "the model ends its answer itself"


@pytest.mark.parametrize("smollm2", BOTH)
def test_streamed_answer_reads_as_words(openai_client, cold_stream, smollm2) -> None:
    stream = openai_client.chat.completions.create(
        model=smollm2,
        messages=[{"role": "user", "content": "Name three colours of the rainbow."}],
        max_tokens=60,
        temperature=0,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    words = text.lower().replace(",", " ").replace(".", " ").replace(":", " ").split()
    assert {"red", "orange", "yellow", "green", "blue", "indigo", "violet"} & set(words), text
