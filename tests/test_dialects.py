"""Both dialects' translation onto the job protocol, and back: pure functions, table-driven."""

from __future__ import annotations

import json

import pytest

from cortex.dialects import anthropic, openai
from cortex.dialects.common import Answer
from cortex.protocol.errors import InvalidRequest
from cortex.protocol.messages import (
    Delta,
    Done,
    NamedTool,
    ReasoningDelta,
    Timings,
    ToolCall,
    ToolCallDelta,
    Usage,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLAUDE_WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": WEATHER["function"]["parameters"],
}
USER = {"role": "user", "content": "Weather in Paris?"}


def _openai(**body):
    req = openai.ChatCompletionRequest.model_validate({"model": "m", "messages": [USER], **body})
    return openai.to_job(req, "m", job_id="j", request_id="r")


def _anthropic(**body):
    req = anthropic.MessagesRequest.model_validate({"model": "m", "max_tokens": 50, "messages": [USER], **body})
    return anthropic.to_job(req, "m", job_id="j", request_id="r")


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, "auto"),
        ("auto", "auto"),
        ("none", "none"),
        ("required", "required"),
        ({"type": "function", "function": {"name": "get_weather"}}, NamedTool(name="get_weather")),
    ],
)
def test_openai_tool_choice_maps_onto_the_job(choice, expected) -> None:
    job = _openai(tools=[WEATHER], **({"tool_choice": choice} if choice else {}))
    assert job.tool_choice == expected
    assert job.tools[0].name == "get_weather" and job.tools[0].parameters["required"] == ["city"]


@pytest.mark.parametrize(
    ("choice", "expected", "parallel"),
    [
        ({"type": "auto"}, "auto", True),
        ({"type": "any"}, "required", True),
        ({"type": "none"}, "none", True),
        ({"type": "tool", "name": "get_weather"}, NamedTool(name="get_weather"), True),
        ({"type": "auto", "disable_parallel_tool_use": True}, "auto", False),
    ],
)
def test_anthropic_tool_choice_maps_onto_the_job(choice, expected, parallel) -> None:
    job = _anthropic(tools=[CLAUDE_WEATHER], tool_choice=choice)
    assert job.tool_choice == expected and job.parallel_tool_calls is parallel


def test_an_openai_tool_round_trip_history_becomes_calls_and_results() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    job = _openai(
        tools=[WEATHER],
        messages=[
            {"role": "developer", "content": "Be brief."},
            USER,
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "18C"}]},
        ],
    )
    system, user, assistant, tool = job.messages
    assert system.role == "system" and user.content == "Weather in Paris?"
    assert assistant.tool_calls == [ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')]
    assert tool.role == "tool" and tool.tool_call_id == "call_1" and tool.content == "18C"


def test_an_anthropic_tool_round_trip_history_becomes_calls_and_results() -> None:
    job = _anthropic(
        tools=[CLAUDE_WEATHER],
        messages=[
            USER,
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "x"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "no data", "is_error": True},
                    {"type": "text", "text": "Try again?"},
                ],
            },
        ],
    )
    _, assistant, result, user = job.messages
    assert assistant.content == "Checking." and assistant.tool_calls[0].name == "get_weather"
    assert json.loads(assistant.tool_calls[0].arguments) == {"city": "Paris"}
    assert result.role == "tool" and result.tool_call_id == "toolu_1" and result.content == "Error: no data"
    assert user.role == "user" and user.content == "Try again?"
    assert job.continue_final is False


def test_an_anthropic_assistant_turn_last_is_a_prefill_to_continue() -> None:
    job = _anthropic(messages=[USER, {"role": "assistant", "content": "The weather is"}])
    assert job.continue_final is True and job.messages[-1].content == "The weather is"


@pytest.mark.parametrize(
    ("thinking", "reasoning"),
    [(None, None), ({"type": "enabled", "budget_tokens": 1024}, True), ({"type": "disabled"}, False)],
)
def test_anthropic_thinking_switches_the_models_reasoning(thinking, reasoning) -> None:
    job = _anthropic(max_tokens=2048, **({"thinking": thinking} if thinking else {}))
    assert job.reasoning is reasoning


@pytest.mark.parametrize(("effort", "reasoning"), [(None, None), ("high", True), ("none", False)])
def test_openai_reasoning_effort_switches_the_models_reasoning(effort, reasoning) -> None:
    assert _openai(**({"reasoning_effort": effort} if effort else {})).reasoning is reasoning


def test_openai_sampling_extras_reach_the_job() -> None:
    job = _openai(logit_bias={"42": -100, "7": 5.5}, logprobs=True, top_logprobs=3, parallel_tool_calls=False)
    assert job.sampling.logit_bias == {42: -100, 7: 5.5}
    assert job.sampling.logprobs == 3 and job.parallel_tool_calls is False


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"tool_choice": "required"}, "has no `tools`"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'"),
        ({"tools": [WEATHER, WEATHER]}, "twice"),
        ({"n": 2}, "`n` must be 1"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "`response_format`"),
        ({"top_logprobs": 2}, "`top_logprobs` needs `logprobs: true`"),
        ({"logit_bias": {"abc": 1}}, "`logit_bias` keys"),
        ({"logit_bias": {"1": 101}}, "-100..100"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "'image_url' part"),
    ],
)
def test_openai_requests_it_cannot_serve_are_refused_by_name(body, needle) -> None:
    with pytest.raises(InvalidRequest) as err:
        _openai(**body)
    assert needle in err.value.message


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tool"),
        ({"tools": [{"name": "f"}]}, "input_schema"),
        ({"tool_choice": {"type": "any"}}, "has no `tools`"),
        ({"tools": [CLAUDE_WEATHER], "tool_choice": {"type": "tool"}}, "`tool_choice.name`"),
        ({"messages": [USER, {"role": "assistant", "content": "Sure "}]}, "trailing whitespace"),
        ({"thinking": {"type": "enabled", "budget_tokens": 4096}}, "less than `max_tokens`"),
        ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "'document' block"),
    ],
)
def test_anthropic_requests_it_cannot_serve_are_refused_by_name(body, needle) -> None:
    with pytest.raises(InvalidRequest) as err:
        _anthropic(**body)
    assert needle in err.value.message


DONE = Done(
    job_id="j",
    seq=9,
    finish_reason="tool_calls",
    usage=Usage(prompt_tokens=10, completion_tokens=5),
    timings=Timings(queue_ms=0, prefill_ms=1, decode_ms=2, ttft_ms=1),
)
PIECES = [
    ReasoningDelta(job_id="j", seq=1, text="Need weather.", tokens=3),
    Delta(job_id="j", seq=2, text="Checking.", tokens=2),
    ToolCallDelta(job_id="j", seq=3, index=0, id="call_a", name="get_weather", tokens=4),
    ToolCallDelta(job_id="j", seq=4, index=0, arguments='{"city": ', tokens=2),
    ToolCallDelta(job_id="j", seq=5, index=0, arguments='"Paris"}', tokens=2),
    ToolCallDelta(job_id="j", seq=6, index=1, id="call_b", name="get_time", arguments="{}", tokens=3),
]


def _sse(chunks: list[bytes]) -> list[dict]:
    text = b"".join(chunks).decode()
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def _stream(writer) -> list[bytes]:
    chunks = writer.start()
    for piece in PIECES:
        if isinstance(piece, Delta):
            chunks += writer.text(piece)
        elif isinstance(piece, ReasoningDelta):
            chunks += writer.reasoning(piece)
        else:
            chunks += writer.tool_call(piece)
    return chunks + writer.finish(DONE)


def test_openai_streams_tool_calls_as_openai_does() -> None:
    deltas = [c["choices"][0]["delta"] for c in _sse(_stream(openai.ChunkWriter("id", "m", False)))]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert deltas[1] == {"reasoning_content": "Need weather."}
    assert deltas[3]["tool_calls"] == [
        {"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    ]
    assert deltas[4]["tool_calls"] == [{"index": 0, "function": {"arguments": '{"city": '}}]
    assert deltas[6]["tool_calls"][0]["index"] == 1 and deltas[6]["tool_calls"][0]["id"] == "call_b"
    assert _sse(_stream(openai.ChunkWriter("id", "m", False)))[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_anthropic_streams_one_block_per_kind_in_order() -> None:
    events = _sse(_stream(anthropic.MessageWriter("msg_1", "m")))
    kinds = [(e["type"], e.get("content_block", e.get("delta", {})).get("type")) for e in events]
    assert kinds == [
        ("message_start", None),
        ("content_block_start", "thinking"),
        ("ping", None),
        ("content_block_delta", "thinking_delta"),
        ("content_block_stop", None),
        ("content_block_start", "text"),
        ("content_block_delta", "text_delta"),
        ("content_block_stop", None),
        ("content_block_start", "tool_use"),
        ("content_block_delta", "input_json_delta"),
        ("content_block_delta", "input_json_delta"),
        ("content_block_stop", None),
        ("content_block_start", "tool_use"),
        ("content_block_delta", "input_json_delta"),
        ("content_block_stop", None),
        ("message_delta", None),
        ("message_stop", None),
    ]
    assert [e["index"] for e in events if e["type"] == "content_block_start"] == [0, 1, 2, 3]
    assert events[-2]["delta"]["stop_reason"] == "tool_use"


def _answer() -> Answer:
    answer = Answer()
    for piece in PIECES:
        answer.add(piece)
    return answer


def test_whole_answers_carry_calls_in_each_dialect() -> None:
    message = openai.ChunkWriter("id", "m", False).response(_answer(), DONE)["choices"][0]["message"]
    assert message["content"] == "Checking." and message["reasoning_content"] == "Need weather."
    assert [c["function"]["arguments"] for c in message["tool_calls"]] == ['{"city": "Paris"}', "{}"]
    content = anthropic.MessageWriter("msg_1", "m").response(_answer(), DONE)["content"]
    assert [b["type"] for b in content] == ["thinking", "text", "tool_use", "tool_use"]
    assert content[2] == {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Paris"}}
