"""The OpenAI API end to end: official SDK -> gateway -> NATS -> neuron -> back."""

from __future__ import annotations

import httpx
import openai
import pytest

TINY = "test/tiny-llama"
MESSAGES = [{"role": "user", "content": "Tell me a story."}]


def _prompt_tokens(tokenizer, messages) -> int:
    return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def test_non_streaming_answer_with_real_usage(openai_client, tokenizer) -> None:
    resp = openai_client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=9, temperature=0)
    assert resp.model == TINY
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.prompt_tokens == _prompt_tokens(tokenizer, MESSAGES)
    assert resp.usage.completion_tokens == 9
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 9


def test_streaming_answer_matches_the_non_streaming_one(openai_client, tokenizer) -> None:
    whole = openai_client.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=16, temperature=0)
    stream = openai_client.chat.completions.create(
        model=TINY,
        messages=MESSAGES,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == _prompt_tokens(tokenizer, MESSAGES)


def test_stream_ends_with_done_marker(gateway, neuron) -> None:
    body = {"model": TINY, "messages": MESSAGES, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=30) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_stop_sequence_is_trimmed_from_the_answer(openai_client) -> None:
    # Seeded sampling gives the random model varied text (greedy repeats one token), the same both times.
    sampling = {"max_tokens": 40, "temperature": 1.0, "seed": 7}
    full = openai_client.chat.completions.create(model=TINY, messages=MESSAGES, **sampling)
    text = full.choices[0].message.content
    stop = text[12:16]
    assert len(stop) == 4 and stop.strip(), f"the model's text is too short to pick a stop from: {text!r}"
    cut = openai_client.chat.completions.create(model=TINY, messages=MESSAGES, stop=[stop], **sampling)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.usage.completion_tokens < 40


def test_seed_makes_sampling_reproducible(openai_client) -> None:
    def ask() -> str:
        r = openai_client.chat.completions.create(
            model=TINY, messages=MESSAGES, max_tokens=12, temperature=1.0, top_p=0.95, seed=1234
        )
        return r.choices[0].message.content

    assert ask() == ask()


def test_unknown_model_is_404_in_openai_envelope(openai_client) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        openai_client.chat.completions.create(model="no/such-model", messages=MESSAGES)
    assert err.value.status_code == 404
    assert err.value.body["code"] == "model_not_found"
    assert "no/such-model" in err.value.body["message"]


def test_errors_carry_the_request_id(gateway, neuron) -> None:
    body = {"model": "no/such-model", "messages": MESSAGES}
    resp = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers={"x-request-id": "abc-123"}, timeout=10)
    assert resp.status_code == 404
    assert resp.headers["x-request-id"] == "abc-123"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"model": "tiny"}', "messages"),
        (b'{"model": "tiny", "messages": "hi"}', "messages"),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}', "max_tokens"),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 9}', "temperature"),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "bogus": 1}', "bogus"),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 3}', "`n`"),
        (
            b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}',
            "tools",
        ),
    ],
)
def test_malformed_body_is_400_in_openai_envelope(gateway, neuron, body: bytes, needle: str) -> None:
    resp = httpx.post(
        f"{gateway.url}/v1/chat/completions", content=body, headers={"content-type": "application/json"}, timeout=10
    )
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert needle in error["message"]


def test_models_lists_the_catalogue_and_where_each_model_is_loaded(openai_client) -> None:
    models = {m.id: m.model_extra for m in openai_client.models.list()}
    assert models[TINY]["nodes"] == ["t1"]
    assert models[TINY]["aliases"] == ["tiny"]
    assert models[TINY]["loaded"][0]["state"] == "ready"
    assert models[TINY]["memory_source"] == "measured"
    idle = models["test/tiny-llama-c"]
    assert idle["nodes"] == [] and "t1" in idle["placeable_on"]
    assert idle["memory_source"] == "estimate" and idle["memory_mb"] > 0


def test_one_model_by_alias(openai_client) -> None:
    model = openai_client.models.retrieve("tiny")
    assert model.id == TINY


def test_admin_api_is_refused_to_remote_clients_when_no_admin_key_is_set() -> None:
    from fastapi.testclient import TestClient

    from cortex.config.gateway import CortexSettings
    from cortex.gateway.app import build_app

    client = TestClient(build_app(CortexSettings()))  # no lifespan: the check comes before any NATS work
    resp = client.post("/admin/models/load", json={"model": "smollm2"})
    assert resp.status_code == 403
    assert resp.json()["error"]["type"] == "permission_error"
    assert "admin_keys" in resp.json()["error"]["message"]


def test_health(gateway, neuron) -> None:
    body = httpx.get(f"{gateway.url}/health", timeout=5).json()
    assert body["status"] == "ok"
    assert body["nodes"] >= 1
    assert TINY in body["models"]


def test_prompt_beyond_nats_max_payload_is_413_naming_the_limit(openai_client) -> None:
    huge = "x" * (9 * 1024 * 1024)  # nats.conf allows 8 MB
    with pytest.raises(openai.APIStatusError) as err:
        openai_client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": huge}])
    assert err.value.status_code == 413
    assert "max_payload is 8388608 bytes" in err.value.body["message"]


def test_logprobs_cover_every_token_with_the_alternatives_asked_for(openai_client) -> None:
    resp = openai_client.chat.completions.create(
        model=TINY, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    entries = resp.choices[0].logprobs.content
    assert len(entries) == resp.usage.completion_tokens == 6
    assert "".join(e.token for e in entries) == resp.choices[0].message.content
    for entry in entries:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0.0
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy takes the likeliest


def test_logit_bias_steers_the_choice(openai_client, tokenizer) -> None:
    hello = tokenizer.convert_tokens_to_ids("Hello")
    resp = openai_client.chat.completions.create(
        model=TINY, messages=MESSAGES, max_tokens=4, temperature=0, logit_bias={str(hello): 100}
    )
    assert resp.choices[0].message.content == "Hello" * 4


def test_a_logit_bias_outside_the_vocabulary_is_a_400(openai_client) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        openai_client.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=2, logit_bias={"999999": 1})
    assert "outside this model's vocabulary" in err.value.body["message"]


def test_a_chat_prompt_beyond_the_context_names_the_limit(openai_client) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        openai_client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "word " * 9000}])
    assert "takes at most 8191" in err.value.body["message"]
