"""Usage says what the node's prefix cache saved, in each dialect, through the official SDKs: the
same long prompt twice, and the second time most of it is read, not computed."""

from __future__ import annotations

import anthropic
import pytest
from openai import OpenAI

MODEL = "test/tiny-llama"
BLOCK = 32  # the transformers engine reuses whole blocks of tokens


def _system(dialect: str) -> str:
    return f"You answer questions in the {dialect} dialect for a team of engineers. " * 8


@pytest.fixture(scope="module")
def openai_sdk(gateway, neuron) -> OpenAI:
    return OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_chat_completions_report_cached_prompt_tokens(openai_sdk) -> None:
    messages = [{"role": "system", "content": _system("chat")}, {"role": "user", "content": "Hello?"}]
    usages = [openai_sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=4).usage for _ in range(2)]
    cold, warm = usages
    assert cold is not None and warm is not None and warm.prompt_tokens_details is not None
    assert cold.prompt_tokens_details is not None and cold.prompt_tokens_details.cached_tokens == 0
    assert warm.prompt_tokens_details.cached_tokens > warm.prompt_tokens - BLOCK - 1


def test_responses_report_cached_input_tokens(openai_sdk) -> None:
    usages = [
        openai_sdk.responses.create(
            model=MODEL, instructions=_system("responses"), input="Hello?", max_output_tokens=4
        ).usage
        for _ in range(2)
    ]
    cold, warm = usages
    assert cold is not None and warm is not None
    assert cold.input_tokens_details.cached_tokens == 0
    assert warm.input_tokens_details.cached_tokens > warm.input_tokens - BLOCK - 1


def test_messages_report_cache_reads_apart_from_input(gateway, neuron) -> None:
    client = anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Hello?"}]
    usages = [
        client.messages.create(model=MODEL, system=_system("messages"), messages=messages, max_tokens=4).usage
        for _ in range(2)
    ]
    cold, warm = usages
    assert cold.cache_read_input_tokens == 0 and cold.cache_creation_input_tokens == 0
    # Anthropic's input_tokens are what was neither read from nor written to the cache: they add up.
    assert warm.cache_read_input_tokens is not None and warm.cache_read_input_tokens > 0
    assert warm.input_tokens + warm.cache_read_input_tokens == cold.input_tokens
    assert warm.input_tokens <= BLOCK
