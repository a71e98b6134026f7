"""OpenAI's Responses API end to end with the official `openai` SDK: create, stream, retrieve, delete,
input_items, and conversations continued by `previous_response_id` from the store in NATS, on any
gateway."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import start_gateway

TINY = "test/tiny-llama"
TOOLS = "test/tools"  # replays Qwen2.5's call to get_current_weather, then, with its result in, an answer
WEATHER = {
    "type": "function",
    "name": "get_current_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "state": {"type": "string"}, "unit": {"type": "string"}},
        "required": ["city"],
    },
}


@pytest.fixture(scope="module")
def client(gateway, neuron) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_a_string_input_gets_a_message_and_real_usage(client) -> None:
    resp = client.responses.create(model=TINY, input="Tell me a story.", max_output_tokens=8, temperature=0)
    assert resp.id.startswith("resp_") and resp.object == "response" and resp.model == TINY
    assert [item.type for item in resp.output] == ["message"]
    assert resp.output_text
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.usage.output_tokens == 8 and resp.usage.input_tokens > 5
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens


def test_a_function_call_comes_back_as_an_item(client) -> None:
    resp = client.responses.create(model=TOOLS, input="Weather in Boston?", tools=[WEATHER])
    calls = [item for item in resp.output if item.type == "function_call"]
    assert [c.name for c in calls] == ["get_current_weather"]
    assert json.loads(calls[0].arguments)["city"] == "Boston"
    assert calls[0].call_id and resp.status == "completed"


def test_previous_response_id_continues_the_conversation(client) -> None:
    first = client.responses.create(model=TOOLS, input="Weather in Boston?", tools=[WEATHER])
    call = next(item for item in first.output if item.type == "function_call")
    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 26.1}'}
    second = client.responses.create(model=TOOLS, previous_response_id=first.id, input=[result], tools=[WEATHER])
    # The replay answers with text only once the last turn is the tool's result: the history was rebuilt.
    assert [item.type for item in second.output] == ["message"]
    assert "26.1" in second.output_text
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens


def test_another_gateway_continues_the_conversation(client, spawn, nats_url, models_toml) -> None:
    first = client.responses.create(model=TOOLS, input="Weather in Boston?", tools=[WEATHER])
    call = next(item for item in first.output if item.type == "function_call")
    other = start_gateway(spawn, nats_url, models_toml, name="gateway-responses")
    try:
        other_client = openai.OpenAI(base_url=f"{other.url}/v1", api_key="unused", max_retries=0, timeout=60)
        result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 26.1}'}
        second = other_client.responses.create(model=TOOLS, previous_response_id=first.id, input=[result])
        assert "26.1" in second.output_text
        assert other_client.responses.retrieve(first.id).id == first.id
    finally:
        other.proc.stop()


def test_a_stored_response_is_retrieved_listed_and_deleted(client) -> None:
    resp = client.responses.create(model=TINY, input="Hi there", max_output_tokens=4, metadata={"k": "v"})
    again = client.responses.retrieve(resp.id)
    assert again.output_text == resp.output_text and again.metadata == {"k": "v"}
    items = client.responses.input_items.list(resp.id)
    assert [(i.type, i.role, i.content[0].text) for i in items.data] == [("message", "user", "Hi there")]
    client.responses.delete(resp.id)
    with pytest.raises(openai.NotFoundError, match=resp.id):
        client.responses.retrieve(resp.id)


def test_store_false_keeps_nothing(client) -> None:
    resp = client.responses.create(model=TINY, input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(resp.id)


def test_an_unknown_previous_response_id_is_a_404_naming_it(client) -> None:
    with pytest.raises(openai.NotFoundError, match="resp_nothing"):
        client.responses.create(model=TINY, input="Hi", previous_response_id="resp_nothing")


def test_the_stream_has_the_apis_event_sequence(client) -> None:
    with client.responses.stream(model=TOOLS, input="Weather in Boston?", tools=[WEATHER]) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    text_at, call_at = kinds.index("response.output_text.delta"), kinds.index("response.function_call_arguments.delta")
    assert kinds[text_at - 2 : text_at] == ["response.output_item.added", "response.content_part.added"]
    assert kinds[call_at - 1] == "response.output_item.added" and call_at > text_at
    end = kinds.index("response.function_call_arguments.done")
    assert kinds[end + 1] == "response.output_item.done"
    assert [item.type for item in final.output] == ["message", "function_call"]
    assert client.responses.retrieve(final.id).output[1].name == "get_current_weather"


def test_stream_events_are_numbered_in_order(gateway, neuron) -> None:
    body = {"model": TINY, "input": "Hi", "max_output_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/responses", json=body, timeout=30) as resp:
        data = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: ")]
    assert [d["sequence_number"] for d in data] == list(range(len(data)))
    assert data[-1]["type"] == "response.incomplete"


def test_hosted_tools_are_left_out_and_function_tools_kept(client) -> None:
    tools = [WEATHER, {"type": "web_search", "external_web_access": False}]
    resp = client.responses.create(model=TOOLS, input="Weather in Boston?", tools=tools)
    assert [item.type for item in resp.output][-1] == "function_call"


def test_an_unknown_field_is_a_400_naming_it(gateway, neuron) -> None:
    body = {"model": TINY, "input": "Hi", "surprise": True}
    resp = httpx.post(f"{gateway.url}/v1/responses", json=body, timeout=30)
    assert resp.status_code == 400 and "surprise" in resp.json()["error"]["message"]


@pytest.mark.parametrize(
    ("field", "value"), [("conversation", "conv_1"), ("prompt", {"id": "pmpt_1"}), ("top_logprobs", 2)]
)
def test_fields_it_cannot_honour_are_refused_with_the_reason(gateway, neuron, field, value) -> None:
    body = {"model": TINY, "input": "Hi", field: value}
    resp = httpx.post(f"{gateway.url}/v1/responses", json=body, timeout=30)
    assert resp.status_code == 400 and f"`{field}` is not supported" in resp.json()["error"]["message"]


def test_an_image_input_is_refused_by_name(client) -> None:
    content = [{"type": "input_image", "image_url": "data:image/png;base64,AA=="}]
    with pytest.raises(openai.BadRequestError, match="input_image"):
        client.responses.create(model=TINY, input=[{"role": "user", "content": content}])
