"""Structured outputs by constrained decoding: JSON (by a schema) from a model with random weights,
where only the token mask can make the output valid, on transformers and on llama.cpp; forced and
strict tool calls held to their schemas; a schema the library cannot compile is a 400 naming it."""

from __future__ import annotations

import json
from typing import Literal

import anthropic
import openai
import pytest
import torch
from pydantic import BaseModel

from cortex.protocol.messages import ChatMessage, InferenceJob, NamedTool, OutputFormat, Tool
from neuron.engine.constraint import Constraint, Constraints, GrammarRejected, plan
from neuron.engine.parsing.syntax import HERMES, LLAMA3, MISTRAL
from tests.conftest import needs_llama_cpp

TINY = "test/tiny-llama"
SCHEMA = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["color", "n"],
    "additionalProperties": False,
}
COLOR = {"type": "json_schema", "json_schema": {"name": "color", "schema": SCHEMA, "strict": True}}
ASK = [{"role": "user", "content": "Pick a color and a digit, as JSON."}]
CAPITAL = [{"role": "user", "content": 'What is the capital of France? Answer as JSON: {"capital": "..."}'}]
PAINT = {
    "type": "function",
    "function": {"name": "paint", "description": "Paints the wall.", "parameters": SCHEMA, "strict": True},
}


class Color(BaseModel):
    color: Literal["red", "green", "blue"]
    n: int


def _matches(text: str) -> dict:
    value = json.loads(text)
    assert set(value) == {"color", "n"} and value["color"] in ("red", "green", "blue") and 0 <= value["n"] <= 9
    return value


@pytest.fixture(scope="module")
def client(gateway, neuron) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)


# --- through the gateway, on real models ----------------------------------------------------------


def test_random_weights_answer_json_matching_the_schema(client) -> None:
    resp = client.chat.completions.create(model=TINY, messages=ASK, response_format=COLOR, max_tokens=60)
    _matches(resp.choices[0].message.content)
    assert resp.choices[0].finish_reason == "stop"


def test_json_object_is_a_json_object(client) -> None:
    resp = client.chat.completions.create(
        model="smollm2", messages=CAPITAL, response_format={"type": "json_object"}, max_tokens=100, temperature=0
    )
    assert resp.choices[0].finish_reason == "stop", resp.choices[0].message.content
    assert isinstance(json.loads(resp.choices[0].message.content), dict)


def test_chat_completions_parse_returns_the_pydantic_object(client) -> None:
    resp = client.chat.completions.parse(model=TINY, messages=ASK, response_format=Color, max_tokens=60)
    parsed = resp.choices[0].message.parsed
    assert isinstance(parsed, Color) and parsed.color in ("red", "green", "blue")


def test_a_forced_named_call_has_arguments_by_its_schema(client) -> None:
    resp = client.chat.completions.create(
        model=TINY, messages=ASK, tools=[PAINT], tool_choice={"type": "function", "function": {"name": "paint"}}
    )
    calls = resp.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["paint"]
    _matches(calls[0].function.arguments)


def test_a_required_call_names_a_tool_and_matches_its_schema(client) -> None:
    # No properties and no others: `{}` is the only call to it the schema allows.
    wait = {"type": "object", "properties": {}, "additionalProperties": False}
    other = {"type": "function", "function": {"name": "wait", "parameters": wait}}
    resp = client.chat.completions.create(model=TINY, messages=ASK, tools=[PAINT, other], tool_choice="required")
    call = resp.choices[0].message.tool_calls[0]
    assert call.function.name in ("paint", "wait")
    if call.function.name == "paint":
        _matches(call.function.arguments)
    else:
        assert json.loads(call.function.arguments) == {}


def test_a_schema_the_library_cannot_compile_is_a_400_naming_the_keyword(client) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}}
    with pytest.raises(openai.BadRequestError, match=r'response_format.*"not"'):
        client.chat.completions.create(model=TINY, messages=ASK, response_format=bad, max_tokens=5)


def test_the_responses_api_parses_text_format(client) -> None:
    resp = client.responses.parse(model=TINY, input="Pick a color.", text_format=Color, max_output_tokens=60)
    assert isinstance(resp.output_parsed, Color)


def test_anthropic_output_config_format_answers_json(gateway, neuron) -> None:
    claude = anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0, timeout=120)
    msg = claude.messages.create(
        model=TINY,
        max_tokens=60,
        messages=ASK,
        extra_body={"output_config": {"format": {"type": "json_schema", "schema": SCHEMA}}},
    )
    _matches(msg.content[0].text)


@needs_llama_cpp
@pytest.mark.parametrize("model", ["HuggingFaceTB/SmolLM2-135M-Instruct", "test/smollm2-transformers"])
def test_both_engines_answer_by_the_schema(client, model) -> None:
    resp = client.chat.completions.create(model=model, messages=ASK, response_format=COLOR, max_tokens=60)
    _matches(resp.choices[0].message.content)


# --- the mask itself --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def constraints(tokenizer) -> Constraints:
    return Constraints(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}))


def _job(**fields) -> InferenceJob:
    return InferenceJob(model="m", messages=[ChatMessage(role="user", content="hi")], **fields)


def _decode(constraint: Constraint, tokenizer, prefix: str = "", steps: int = 80) -> str:
    """Feeds `prefix` as output, then samples random logits through the mask until the end."""
    gen = torch.Generator().manual_seed(7)
    text = prefix
    for token in tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []:
        constraint.accept(token, tokenizer.decode([token]))
    for _ in range(steps):
        logits = constraint.mask(torch.randn(len(tokenizer), generator=gen))
        token = int(torch.argmax(logits))
        if token == tokenizer.eos_token_id:
            break
        piece = tokenizer.decode([token])
        constraint.accept(token, piece)
        text += piece
        if prefix and not constraint.active:
            break
    return text


def test_a_strict_tool_binds_the_call_once_the_model_opens_it(constraints, tokenizer) -> None:
    job = _job(tools=[Tool(name="paint", parameters=SCHEMA, strict=True)])
    wanted = plan(job, HERMES, reasons=False, thinking_open=False)
    assert wanted is not None
    constraint = Constraint(wanted, constraints)
    assert not constraint.active  # free text until a call opens
    text = _decode(constraint, tokenizer, prefix="Sure. <tool_call>")
    body = text.removeprefix("Sure. <tool_call>").removesuffix("</tool_call>")
    call = json.loads(body)
    assert call["name"] == "paint" and text.endswith("}\n</tool_call>")
    _matches(json.dumps(call["arguments"]))
    assert not constraint.active  # free again after the call


def test_with_thinking_the_json_starts_after_the_reasoning(constraints, tokenizer) -> None:
    fmt = OutputFormat(type="json_schema", json_schema=SCHEMA)
    wanted = plan(_job(output_format=fmt), None, reasons=True, thinking_open=True)
    assert wanted is not None
    constraint = Constraint(wanted, constraints)
    for token in tokenizer("Let me think about it.", add_special_tokens=False)["input_ids"]:
        assert not constraint.active
        constraint.accept(token, tokenizer.decode([token]))
    text = _decode(constraint, tokenizer, prefix="</think>\n\n")
    _matches(text.removeprefix("</think>"))


@pytest.mark.parametrize("syntax", [LLAMA3, MISTRAL], ids=["llama3", "mistral"])
def test_a_strict_call_is_bound_in_each_family(constraints, tokenizer, syntax) -> None:
    job = _job(tools=[Tool(name="paint", parameters=SCHEMA, strict=True)])
    wanted = plan(job, syntax, reasons=False, thinking_open=False)
    assert wanted is not None
    text = _decode(Constraint(wanted, constraints), tokenizer, prefix=f"Ok. {syntax.opens[0]}")
    body = text.removeprefix(f"Ok. {syntax.opens[0]}")
    call = json.loads(body)[0] if syntax.array else json.loads(body)
    assert call["name"] == "paint"
    _matches(json.dumps(call.get("arguments", call.get("parameters"))))


def test_a_named_call_is_planned_after_the_forced_opening(constraints, tokenizer) -> None:
    job = _job(tools=[Tool(name="paint", parameters=SCHEMA)], tool_choice=NamedTool(name="paint"))
    wanted = plan(job, HERMES, reasons=False, thinking_open=False)
    assert wanted is not None
    text = _decode(Constraint(wanted, constraints), tokenizer)
    assert text.endswith("}\n</tool_call>")
    _matches(text.removesuffix("}\n</tool_call>"))


def test_an_uncompilable_schema_is_refused_before_decoding(constraints) -> None:
    job = _job(output_format=OutputFormat(type="json_schema", json_schema={"type": "string", "format": "bogus"}))
    wanted = plan(job, None, reasons=False, thinking_open=False)
    assert wanted is not None
    with pytest.raises(GrammarRejected, match="bogus"):
        Constraint(wanted, constraints)
