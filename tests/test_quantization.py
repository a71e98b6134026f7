"""In-place quantization of dense weights on load (`quant = "int8" | "int4"`, bitsandbytes):
the quantized models answer through the fleet and take less memory than the float one."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import start_neuron, wait_until

MODELS = ["test/dense", "test/dense-int8", "test/dense-int4"]
NO_END = {"2": -100}


@pytest.fixture(scope="module")
def loaded(spawn, nats_url, models_toml, gateway) -> Iterator[dict[str, dict]]:
    """Each model's status on node q1, once all three are ready; q1 leaves when the module is done."""
    proc = start_neuron(spawn, nats_url, models_toml, "q1", *MODELS)

    def statuses() -> dict[str, dict]:
        out = {}
        for model in MODELS:
            entry = httpx.get(f"{gateway.url}/v1/models/{model}", timeout=5).json()
            out.update((model, s) for s in entry["loaded"] if s["node"] == "q1" and s["state"] == "ready")
        return out

    wait_until(lambda: len(statuses()) == len(MODELS), 180, "the float, int8 and int4 models on q1")
    yield statuses()
    proc.stop()


@pytest.mark.parametrize("model", MODELS[1:])
def test_a_quantized_model_answers(gateway, loaded, model) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, logit_bias=NO_END
    )
    assert answer.usage.completion_tokens == 8 and answer.choices[0].message.content


def test_quantized_weights_take_less_memory_than_float(loaded) -> None:
    # Measured on the loaded weights (the KV budget, the same for all three, is small at context 256).
    # The embeddings (100 MB of the float model's 224) stay float32, so the whole shrinks by less than
    # the linear layers do: about 0.6x for int8 and 0.55x for int4.
    full, int8, int4 = (loaded[m]["memory_mb"] for m in MODELS)
    assert int8 < 0.75 * full
    assert int4 < 0.7 * full
    assert int4 < int8
