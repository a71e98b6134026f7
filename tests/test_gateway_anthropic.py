"""Anthropic's Messages API end to end with the official `anthropic` SDK (which sends x-api-key and
anthropic-version): text, streaming with the exact event order, stop sequences, count_tokens, errors."""

from __future__ import annotations

import asyncio
import json

import anthropic
import httpx
import pytest

TINY = "test/tiny-llama"
MESSAGES = [{"role": "user", "content": "Tell me a story."}]
# This SDK's `create` has no sampling arguments; the API takes them, so they go in the body.
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def client(gateway, neuron) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0, timeout=60)


def _prompt_tokens(tokenizer, messages) -> int:
    return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def test_a_message_with_real_usage(client, tokenizer) -> None:
    msg = client.messages.create(model="tiny", max_tokens=9, messages=MESSAGES, extra_body=GREEDY)
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert msg.model == TINY
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text
    assert msg.stop_reason == "max_tokens" and msg.stop_sequence is None
    assert msg.usage.input_tokens == _prompt_tokens(tokenizer, MESSAGES)
    assert msg.usage.output_tokens == 9


def test_the_stream_has_anthropics_exact_event_order(gateway, neuron) -> None:
    body = {"model": TINY, "max_tokens": 5, "messages": MESSAGES, "stream": True}
    headers = {"x-api-key": "unused", "anthropic-version": "2023-06-01"}
    with httpx.stream("POST", f"{gateway.url}/v1/messages", json=body, headers=headers, timeout=30) as resp:
        lines = [line for line in resp.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * (len(names) - 6),
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert len(names) > 6
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert [d["type"] for d in data] == names  # each event's data names its own type


def test_the_sdks_stream_gives_the_same_message_as_a_whole_request(client) -> None:
    whole = client.messages.create(model=TINY, max_tokens=12, messages=MESSAGES, extra_body=GREEDY)
    with client.messages.stream(model=TINY, max_tokens=12, messages=MESSAGES, extra_body=GREEDY) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == whole.content[0].text
    assert final.stop_reason == "max_tokens"
    assert final.usage.input_tokens == whole.usage.input_tokens and final.usage.output_tokens == 12


def test_a_stop_sequence_is_reported_as_such(client) -> None:
    # Greedy, the random model writes newlines only: a newline stops it at once.
    msg = client.messages.create(
        model=TINY, max_tokens=24, messages=MESSAGES, extra_body=GREEDY, stop_sequences=["never", "\n"]
    )
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == "\n"
    assert msg.content[0].text == ""
    unmatched = client.messages.create(
        model=TINY, max_tokens=5, messages=MESSAGES, extra_body=GREEDY, stop_sequences=["never"]
    )
    assert unmatched.stop_reason == "max_tokens" and unmatched.stop_sequence is None


def test_system_as_a_string_or_as_text_blocks_is_the_same_prompt(client) -> None:
    as_string = client.messages.create(model=TINY, max_tokens=4, messages=MESSAGES, system="Be brief.")
    as_blocks = client.messages.create(
        model=TINY, max_tokens=4, messages=MESSAGES, system=[{"type": "text", "text": "Be brief."}]
    )
    assert as_string.usage.input_tokens == as_blocks.usage.input_tokens
    # SmolLM2's template puts in its own default system prompt when none is given.
    plain = client.messages.create(model=TINY, max_tokens=4, messages=MESSAGES)
    assert as_string.usage.input_tokens != plain.usage.input_tokens


def test_count_tokens_matches_the_usage_of_a_real_request(client) -> None:
    counted = client.messages.count_tokens(model=TINY, messages=MESSAGES, system="Be brief.")
    used = client.messages.create(model=TINY, max_tokens=1, messages=MESSAGES, system="Be brief.")
    assert counted.input_tokens == used.usage.input_tokens


def test_the_async_client_streams_too(gateway, neuron) -> None:
    async def go() -> str:
        async with anthropic.AsyncAnthropic(base_url=gateway.url, api_key="unused", max_retries=0) as client:
            async with client.messages.stream(model=TINY, max_tokens=6, messages=MESSAGES) as stream:
                return "".join([text async for text in stream.text_stream])

    assert asyncio.run(go())


def test_missing_max_tokens_is_a_400_in_anthropics_envelope(gateway, neuron) -> None:
    resp = httpx.post(f"{gateway.url}/v1/messages", json={"model": TINY, "messages": MESSAGES}, timeout=10)
    assert resp.status_code == 400
    body = resp.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]


def test_an_unknown_model_is_not_found_error(client) -> None:
    with pytest.raises(anthropic.NotFoundError) as err:
        client.messages.create(model="no/such-model", max_tokens=4, messages=MESSAGES)
    assert err.value.body["error"]["type"] == "not_found_error"


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tool"),
        ({"tool_choice": {"type": "any"}}, "has no `tools`"),
        ({"extra_body": {"temperature": 1.5}}, "temperature"),
        ({"extra_body": {"top_k": 0}}, "top_k"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "'image' block"),
        ({"extra_body": {"bogus": 1}}, "bogus"),
    ],
)
def test_what_cannot_be_served_is_a_400_naming_it(client, extra: dict, needle: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(**{"model": TINY, "max_tokens": 4, "messages": MESSAGES, **extra})
    assert needle in err.value.body["error"]["message"]


def test_a_prompt_beyond_the_context_names_the_limit(client) -> None:
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model=TINY, max_tokens=4, messages=[{"role": "user", "content": "word " * 9000}])
    assert "takes at most 8191" in err.value.body["error"]["message"]


def test_an_assistant_turn_last_is_continued_as_a_prefill(client, tokenizer) -> None:
    messages = [*MESSAGES, {"role": "assistant", "content": "Once upon a time"}]
    msg = client.messages.create(model=TINY, max_tokens=5, messages=messages, extra_body=GREEDY)
    prompt = tokenizer.apply_chat_template(messages, continue_final_message=True, tokenize=True, return_dict=False)
    # Anthropic counts what was read from the cache apart: the prompt is both together.
    assert msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0) == len(prompt)
    assert client.messages.count_tokens(model=TINY, messages=messages).input_tokens == len(prompt)
    assert not msg.content[0].text.startswith("Once upon a time")  # only the continuation comes back
