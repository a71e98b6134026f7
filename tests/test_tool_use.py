"""Tool use and reasoning end to end, with the official `openai` and `anthropic` SDKs, sync and
async, streaming and not: gateway, NATS, a real neuron, the model's own chat template (Qwen2.5,
Qwen3), and outputs recorded from real models replayed token by token through the neuron's
detokenizer and parser (see `replay_models` in conftest.py)."""

from __future__ import annotations

import asyncio
import json

import anthropic
import openai
import pytest

from tests.conftest import start_neuron

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "state": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "state", "unit"],
        },
    },
}
TEMPERATURE = {
    "type": "function",
    "function": {
        "name": "get_current_temperature",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
    },
}
TEMPERATURE_DATE = {
    "type": "function",
    "function": {
        "name": "get_temperature_date",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}, "date": {"type": "string"}}},
    },
}
ASK = [{"role": "user", "content": "What's the weather like in Boston today? Answer in fahrenheit."}]
BOSTON = {"city": "Boston", "state": "MA", "unit": "fahrenheit"}


def claude(tool: dict) -> dict:
    fn = tool["function"]
    return {"name": fn["name"], "description": fn.get("description", ""), "input_schema": fn["parameters"]}


@pytest.fixture(scope="module")
def replay_neuron(spawn, nats_url, models_toml, gateway):
    proc = start_neuron(spawn, nats_url, models_toml, "r1", "test/tools", "test/tools-parallel", "test/thinker")
    for model in ("test/tools", "test/tools-parallel", "test/thinker"):
        gateway.wait_for_model(model)
    return proc


@pytest.fixture(scope="module")
def oai(gateway, replay_neuron) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def claude_client(gateway, replay_neuron) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0, timeout=60)


# --- OpenAI ---------------------------------------------------------------------------------------


def test_openai_tool_round_trip(oai) -> None:
    first = oai.chat.completions.create(model="test/tools", messages=ASK, tools=[WEATHER], max_tokens=300)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content.startswith("To provide you with the current weather in Boston")
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_current_weather" and json.loads(call.function.arguments) == BOSTON

    result = {"role": "tool", "tool_call_id": call.id, "content": "26.1 degrees fahrenheit"}
    history = [*ASK, choice.message.model_dump(exclude_none=True), result]
    final = oai.chat.completions.create(model="test/tools", messages=history, tools=[WEATHER], max_tokens=300)
    assert final.choices[0].finish_reason == "stop" and final.choices[0].message.tool_calls is None
    assert final.choices[0].message.content.startswith("The current temperature in San Francisco")
    assert final.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result are in the prompt


def test_openai_streams_tool_call_deltas(oai) -> None:
    stream = oai.chat.completions.create(
        model="test/tools",
        messages=ASK,
        tools=[WEATHER],
        max_tokens=300,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    calls = [tc for c in chunks if c.choices and c.choices[0].delta.tool_calls for tc in c.choices[0].delta.tool_calls]
    head, *fragments = calls
    assert head.index == 0 and head.id.startswith("call_") and head.function.name == "get_current_weather"
    assert len(fragments) > 3 and all(f.id is None and f.function.name is None for f in fragments)
    arguments = head.function.arguments + "".join(f.function.arguments for f in fragments)
    assert json.loads(arguments) == BOSTON
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["tool_calls"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_openai_parallel_tool_calls_and_turning_them_off(oai) -> None:
    tools = [TEMPERATURE, TEMPERATURE_DATE]
    both = oai.chat.completions.create(model="test/tools-parallel", messages=ASK, tools=tools, max_tokens=300)
    names = [c.function.name for c in both.choices[0].message.tool_calls]
    assert names == ["get_current_temperature", "get_temperature_date"]
    assert len({c.id for c in both.choices[0].message.tool_calls}) == 2
    one = oai.chat.completions.create(
        model="test/tools-parallel", messages=ASK, tools=tools, max_tokens=300, parallel_tool_calls=False
    )
    assert [c.function.name for c in one.choices[0].message.tool_calls] == ["get_current_temperature"]
    assert one.choices[0].finish_reason == "tool_calls" and one.usage.completion_tokens < both.usage.completion_tokens


def test_openai_reasoning_content_whole_and_streamed(oai) -> None:
    whole = oai.chat.completions.create(model="test/thinker", messages=ASK, max_tokens=400)
    message = whole.choices[0].message
    assert message.model_extra["reasoning_content"].startswith("Okay, the user asked")
    assert message.content.startswith("The current temperature") and "<think>" not in message.content
    stream = oai.chat.completions.create(model="test/thinker", messages=ASK, max_tokens=400, stream=True)
    deltas = [c.choices[0].delta for c in stream if c.choices]
    reasoning = "".join((d.model_extra or {}).get("reasoning_content", "") for d in deltas)
    assert reasoning == message.model_extra["reasoning_content"]
    assert "".join(d.content or "" for d in deltas) == message.content


def test_openai_async_client_streams_a_tool_call(gateway, replay_neuron) -> None:
    async def go() -> str:
        async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0) as client:
            stream = await client.chat.completions.create(
                model="test/tools", messages=ASK, tools=[WEATHER], max_tokens=300, stream=True
            )
            parts = []
            async for chunk in stream:
                for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                    parts.append(call.function.arguments or "")
            return "".join(parts)

    assert json.loads(asyncio.run(go())) == BOSTON


def test_openai_unknown_tool_choice_is_a_400_naming_it(oai) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(
            model="test/tools",
            messages=ASK,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "launch"}},
        )
    assert "'launch'" in err.value.body["message"]


# --- Anthropic ------------------------------------------------------------------------------------


def test_anthropic_tool_round_trip(claude_client) -> None:
    first = claude_client.messages.create(model="test/tools", max_tokens=300, messages=ASK, tools=[claude(WEATHER)])
    assert first.stop_reason == "tool_use"
    text, use = first.content
    assert text.type == "text" and text.text.startswith("To provide you with the current weather")
    assert use.type == "tool_use" and use.name == "get_current_weather" and use.input == BOSTON

    result = {"type": "tool_result", "tool_use_id": use.id, "content": [{"type": "text", "text": "26.1 F"}]}
    history = [
        *ASK,
        {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {"role": "user", "content": [result]},
    ]
    final = claude_client.messages.create(model="test/tools", max_tokens=300, messages=history, tools=[claude(WEATHER)])
    assert final.stop_reason == "end_turn" and [b.type for b in final.content] == ["text"]
    assert final.content[0].text.startswith("The current temperature in San Francisco")


def test_anthropic_streams_tool_use_with_input_json_deltas(gateway, claude_client) -> None:
    with claude_client.messages.stream(
        model="test/tools", max_tokens=300, messages=ASK, tools=[claude(WEATHER)]
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    json_deltas = [e for e in events if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
    assert len(json_deltas) > 3
    assert json.loads("".join(e.delta.partial_json for e in json_deltas)) == BOSTON
    assert [b.type for b in final.content] == ["text", "tool_use"] and final.content[1].input == BOSTON
    assert final.stop_reason == "tool_use" and final.usage.output_tokens > 0
    starts = [e.content_block.type for e in events if e.type == "content_block_start"]
    assert starts == ["text", "tool_use"]


def test_anthropic_parallel_tool_use_and_turning_it_off(claude_client) -> None:
    tools = [claude(TEMPERATURE), claude(TEMPERATURE_DATE)]
    both = claude_client.messages.create(model="test/tools-parallel", max_tokens=300, messages=ASK, tools=tools)
    assert [b.name for b in both.content if b.type == "tool_use"] == ["get_current_temperature", "get_temperature_date"]
    one = claude_client.messages.create(
        model="test/tools-parallel",
        max_tokens=300,
        messages=ASK,
        tools=tools,
        tool_choice={"type": "auto", "disable_parallel_tool_use": True},
    )
    assert [b.name for b in one.content if b.type == "tool_use"] == ["get_current_temperature"]


def test_anthropic_thinking_blocks_whole_and_streamed(claude_client) -> None:
    thinking = {"type": "enabled", "budget_tokens": 1024}
    whole = claude_client.messages.create(model="test/thinker", max_tokens=2048, messages=ASK, thinking=thinking)
    assert [b.type for b in whole.content] == ["thinking", "text"]
    assert whole.content[0].thinking.startswith("Okay, the user asked")
    with claude_client.messages.stream(
        model="test/thinker", max_tokens=2048, messages=ASK, thinking=thinking
    ) as stream:
        kinds = [e.delta.type for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert kinds[0] == "thinking_delta" and kinds[-1] == "text_delta"
    assert final.content[0].thinking == whole.content[0].thinking and final.content[1].text == whole.content[1].text


def test_anthropic_async_client_streams_tool_use(gateway, replay_neuron) -> None:
    async def go() -> dict:
        async with anthropic.AsyncAnthropic(base_url=gateway.url, api_key="unused", max_retries=0) as client:
            async with client.messages.stream(
                model="test/tools", max_tokens=300, messages=ASK, tools=[claude(WEATHER)]
            ) as stream:
                final = await stream.get_final_message()
        return next(b.input for b in final.content if b.type == "tool_use")

    assert asyncio.run(go()) == BOSTON


def test_count_tokens_counts_the_tools_too(claude_client) -> None:
    bare = claude_client.messages.count_tokens(model="test/tools", messages=ASK)
    with_tools = claude_client.messages.count_tokens(model="test/tools", messages=ASK, tools=[claude(WEATHER)])
    used = claude_client.messages.create(model="test/tools", max_tokens=1, messages=ASK, tools=[claude(WEATHER)])
    prompt = used.usage.input_tokens + (used.usage.cache_read_input_tokens or 0)  # read from cache, counted apart
    assert with_tools.input_tokens == prompt > bare.input_tokens
