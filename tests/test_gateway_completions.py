"""OpenAI's prompt-completion API (`/v1/completions`) with the official SDK: the prompt goes in raw."""

from __future__ import annotations

import httpx
import openai
import pytest

TINY = "test/tiny-llama"
PROMPT = "Once upon a time"


def test_a_completion_continues_the_raw_prompt_with_real_usage(openai_client, tokenizer) -> None:
    resp = openai_client.completions.create(model="tiny", prompt=PROMPT, max_tokens=7, temperature=0)
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
    assert resp.model == TINY
    assert resp.choices[0].text and resp.choices[0].finish_reason == "length"
    # No chat template: the prompt is tokenized as it is.
    assert resp.usage.prompt_tokens == len(tokenizer(PROMPT)["input_ids"])
    assert resp.usage.completion_tokens == 7


def test_the_default_is_16_tokens_as_in_openais_api(openai_client) -> None:
    resp = openai_client.completions.create(model=TINY, prompt=PROMPT, temperature=0)
    assert resp.usage.completion_tokens == 16


def test_streamed_text_equals_the_whole_answer_and_ends_with_usage(openai_client) -> None:
    whole = openai_client.completions.create(model=TINY, prompt=PROMPT, max_tokens=12, temperature=0)
    chunks = list(
        openai_client.completions.create(
            model=TINY,
            prompt=PROMPT,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_echo_puts_the_prompt_first(openai_client) -> None:
    plain = openai_client.completions.create(model=TINY, prompt=PROMPT, max_tokens=5, temperature=0)
    echoed = openai_client.completions.create(model=TINY, prompt=[PROMPT], max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text


def test_a_stop_sequence_is_honoured_and_trimmed(openai_client) -> None:
    whole = openai_client.completions.create(model=TINY, prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    stop = whole.strip()[3:6]
    assert stop
    resp = openai_client.completions.create(model=TINY, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert resp.choices[0].finish_reason == "stop"
    assert stop not in resp.choices[0].text and whole.startswith(resp.choices[0].text)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"suffix": "end"}, "`suffix` (fill-in-the-middle) is not supported"),
        ({"n": 2}, "`n` must be 1"),
        ({"best_of": 3}, "`best_of` must be 1"),
        ({"logprobs": 6}, "logprobs"),
        ({"prompt": [[1, 2, 3]]}, "token ids are not supported"),
        ({"prompt": ["a", "b"]}, "batches of prompts"),
        ({"prompt": ""}, "`prompt` is empty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"bogus": True}, "bogus"),
    ],
)
def test_what_is_not_served_is_a_400_naming_the_field(gateway, neuron, extra: dict, needle: str) -> None:
    body = {"model": TINY, "prompt": PROMPT, **extra}
    resp = httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=10)
    assert resp.status_code == 400, resp.text
    assert needle in resp.json()["error"]["message"]


def test_a_prompt_longer_than_the_context_names_the_limit(openai_client) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        openai_client.completions.create(model=TINY, prompt="word " * 9000, max_tokens=4)
    assert "takes at most 8191" in err.value.body["message"]


def test_logprobs_come_in_the_completions_apis_own_shape(openai_client) -> None:
    resp = openai_client.completions.create(model=TINY, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == resp.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    assert all(len(alternatives) <= 2 for alternatives in lp.top_logprobs)
