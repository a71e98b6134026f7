"""Both engines behind the same fleet, through the gateway with the official SDKs: the tiny model
on transformers, SmolLM2's GGUF on llama.cpp (quantized). One test set, run on each; an answer is
checked against the same model's other answers, never against a fixed text."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import anthropic
import httpx
import openai
import pytest

from tests.conftest import LLAMA_CPP, nats_request, needs_llama_cpp, start_neuron, wait_until

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
ENGINES = [
    pytest.param("test/tiny-engines", "transformers", id="transformers"),
    pytest.param(SMOLLM2, "llama.cpp", id="llama.cpp", marks=needs_llama_cpp),
]
STORY = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
SAMPLED = {"temperature": 1.0, "seed": 11}
# SmolLM2's end token (<|im_end|>), kept from ending an answer early; the tiny model shares its tokenizer.
NO_END = {"2": -100}


@pytest.fixture(scope="module")
def engines_node(spawn, nats_url, models_toml, gateway):
    """Node e1, the only one serving these models; it leaves when the module is done. Its prefix cache
    is off: these tests compare answers across requests, and cells kept in llama.cpp's unified pool
    change the order its attention sums in, so two requests may part ways at a near-tie (README,
    "Agent turns pay only for what is new"); tests/test_prefix_cache.py covers reuse."""
    models = ["test/tiny-engines", *([SMOLLM2] if LLAMA_CPP else [])]
    # SmolLM2 is the default model: an earlier test may have loaded it on t1 (its cache on), and a
    # request sent there would not answer as e1 does.
    httpx.post(f"{gateway.url}/admin/models/unload", json={"model": SMOLLM2}, timeout=60)
    proc = start_neuron(spawn, nats_url, models_toml, "e1", *models, env={"NEURON_PREFIX_CACHE": "false"})
    for model in models:
        wait_until(lambda m=model: _on_e1(gateway, m).get("state") == "ready", 120, f"{model} on e1")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(gateway, engines_node) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _on_e1(gateway, model: str) -> dict:
    entry = httpx.get(f"{gateway.url}/v1/models/{model}", timeout=5).json()
    return next((loaded for loaded in entry.get("loaded", []) if loaded["node"] == "e1"), {})


def _ask(client: openai.OpenAI, model: str, **kwargs):
    return client.chat.completions.create(model=model, messages=kwargs.pop("messages", STORY), **kwargs)


@pytest.mark.parametrize(("model", "engine"), ENGINES)
def test_the_heartbeat_names_the_engine_and_its_parallel_sequences(gateway, engines_node, model, engine) -> None:
    loaded = _on_e1(gateway, model)
    assert loaded["engine"] == engine
    # transformers: the node's max_batch (4); llama.cpp: as many usual jobs (2,048 tokens) as its unified
    # pool of 4 contexts of 8,192 cells holds.
    assert loaded["parallel"] == (4 if engine == "transformers" else 16)


@pytest.mark.parametrize(("model", "engine"), ENGINES)
def test_a_stream_adds_up_to_the_whole_answer_and_its_usage(client, model, engine) -> None:
    whole = _ask(client, model, max_tokens=24, **SAMPLED)
    chunks = list(_ask(client, model, max_tokens=24, stream=True, stream_options={"include_usage": True}, **SAMPLED))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1, "the answer arrives in pieces"
    assert "".join(pieces) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


@pytest.mark.parametrize(("model", "engine"), ENGINES)
def test_usage_counts_the_prompt_as_the_chat_template_renders_it(client, tokenizer, model, engine) -> None:
    # Both models use SmolLM2's tokenizer and template (the GGUF's own, on llama.cpp).
    rendered = tokenizer.apply_chat_template(STORY, add_generation_prompt=True, tokenize=False)
    answer = _ask(client, model, max_tokens=3, **SAMPLED)
    assert answer.usage.prompt_tokens == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize(("model", "engine"), ENGINES)
def test_max_tokens_ends_the_answer_with_length(client, model, engine) -> None:
    answer = _ask(client, model, max_tokens=7, **SAMPLED)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 7


@pytest.mark.parametrize(("model", "engine"), ENGINES)
def test_a_stop_sequence_ends_the_answer_just_before_it(client, model, engine) -> None:
    full = _ask(client, model, max_tokens=40, **SAMPLED).choices[0].message.content
    stop = full[12:16]
    assert len(stop) == 4, full
    stopped = _ask(client, model, max_tokens=40, stop=[stop], **SAMPLED)
    assert stopped.choices[0].message.content == full[: full.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(("model", "engine"), ENGINES)
def test_a_seed_repeats_an_answer_and_another_seed_changes_it(client, model, engine) -> None:
    first, again = (_ask(client, model, max_tokens=16, **SAMPLED).choices[0].message.content for _ in range(2))
    other = _ask(client, model, max_tokens=16, temperature=1.0, seed=12).choices[0].message.content
    assert first == again
    assert other != first


@pytest.mark.parametrize(("model", "engine"), ENGINES)
def test_concurrent_requests_all_complete_with_their_own_settings(client, model, engine) -> None:
    def ask(i: int):
        return _ask(client, model, max_tokens=10 + i, temperature=1.0, seed=i, logit_bias=NO_END)

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, range(6)))
    assert [a.usage.completion_tokens for a in answers] == [10, 11, 12, 13, 14, 15]
    assert all(a.choices[0].finish_reason == "length" for a in answers)
    assert len({a.choices[0].message.content for a in answers}) > 1


@pytest.mark.parametrize(("model", "engine"), ENGINES)
def test_a_stream_the_client_closes_is_cancelled_on_the_node(gateway, nats_url, client, model, engine) -> None:
    nodes = httpx.get(f"{gateway.url}/v1/models/{model}", timeout=5).json()["nodes"]

    def running() -> list[str]:
        return [j["model"] for node in nodes for j in nats_request(nats_url, f"cortex.node.{node}.status")["jobs"]]

    body = {"model": model, "messages": STORY, "max_tokens": 4000, "logit_bias": NO_END, "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(4):
            next(lines)
        assert running() == [model]
    wait_until(lambda: running() == [], 10, "the job to be cancelled")


@needs_llama_cpp
def test_a_gguf_models_tool_calls_are_parsed_on_llama_cpp(gateway, engines_node) -> None:
    """SmolLM2's GGUF template has no place for tools: they go in as Hermes text, and the calls
    (replayed from a real model's recorded output) come back parsed, as on transformers."""
    tool = {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
    claude = anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0, timeout=120)
    ask = [{"role": "user", "content": "What's the weather like in Boston today? Answer in fahrenheit."}]
    message = claude.messages.create(model="test/tools-gguf", messages=ask, tools=[tool], max_tokens=300)
    assert message.stop_reason == "tool_use"
    (call,) = [block for block in message.content if block.type == "tool_use"]
    assert call.name == "get_current_weather" and call.input["city"] == "Boston"
    entry = httpx.get(f"{gateway.url}/v1/models/test/tools-gguf", timeout=5).json()
    assert [loaded["engine"] for loaded in entry["loaded"]] == ["llama.cpp"]
