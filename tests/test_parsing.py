"""Tool calls and reasoning in model output, with real chat templates (tests/data/chat/*.jinja)
and outputs recorded from real models (tests/data/chat/recorded.json; SOURCES.md says where
each comes from). The output goes through the real tokenizer and incremental detokenizer in
the pieces generation would release, so markers cut across tokens are covered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from cortex.protocol.messages import ChatMessage, InferenceJob, ModelSpec, NamedTool, Tool, ToolCall
from neuron.engine.chat import ChatFormat, PromptRejected
from neuron.engine.detokenize import IncrementalDetokenizer
from neuron.engine.parsing.json_calls import CallArguments, CallEnd, CallScanner, CallStart
from neuron.engine.parsing.output import Call, Content, OutputParser, Thought
from neuron.engine.parsing.syntax import HERMES, LLAMA3, MISTRAL

DATA = Path(__file__).parent / "data" / "chat"
RECORDED = json.loads((DATA / "recorded.json").read_text())
TEMPLATES = {"hermes": "qwen2.5", "llama3": "llama3.1", "mistral": "mistral", "qwen3": "qwen3"}
FAMILY_SYNTAX = {"hermes": "hermes", "llama3": "llama3", "mistral": "mistral", "qwen3": "hermes"}
END_MARKERS = ("<|im_end|>", "<|eom_id|>", "<|eot_id|>", "</s>")
WEATHER = Tool(
    name="get_current_weather",
    description="Weather in a city",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


@pytest.fixture(scope="module")
def load_tokenizer(tokenizer_dir):
    def load(template: str | None):
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        if template is not None:
            tok.chat_template = (DATA / f"{template}.jinja").read_text()
        return tok

    return load


def _job(messages=None, **fields) -> InferenceJob:
    messages = messages or [ChatMessage(role="user", content="What is the weather in Boston?")]
    return InferenceJob(job_id="j", request_id="r", model="m", messages=messages, **fields)


def _chat(tok, **spec) -> ChatFormat:
    return ChatFormat(ModelSpec(id="m", source="file:/x", **spec), tok)


def _run(parser, pieces: list[str]) -> dict:
    out = [p for piece in pieces for p in parser.push(piece)] + parser.finish()
    calls: dict[int, dict] = {}
    for p in out:
        if isinstance(p, Call):
            call = calls.setdefault(p.index, {"id": p.id, "name": p.name, "arguments": ""})
            call["arguments"] += p.arguments
    return {
        "content": "".join(p.text for p in out if isinstance(p, Content)),
        "reasoning": "".join(p.text for p in out if isinstance(p, Thought)) or None,
        "calls": [calls[i] for i in sorted(calls)],
    }


def _token_pieces(tok, prompt_ids: list[int], text: str) -> list[str]:
    """The text as generation releases it: token by token through the incremental detokenizer."""
    detok = IncrementalDetokenizer(tok, prompt_ids)
    pieces = [detok.push(t) for t in tok(text, add_special_tokens=False)["input_ids"]]
    return [*pieces, detok.flush()]


def _output(record: dict) -> str:
    text = record["output"]
    for marker in END_MARKERS:  # generation stops at the end token; the parser never sees it
        text = text.split(marker)[0]
    return text


@pytest.mark.parametrize("record", RECORDED, ids=[f"{r['family']}-{i}" for i, r in enumerate(RECORDED)])
@pytest.mark.parametrize("chunking", ["tokens", "chars"])
def test_recorded_outputs_parse_into_text_reasoning_and_calls(load_tokenizer, record, chunking) -> None:
    tok = load_tokenizer(TEMPLATES[record["family"]])
    chat = _chat(tok)
    assert chat.syntax is not None and chat.syntax.name == FAMILY_SYNTAX[record["family"]]
    rendered = chat.render(_job(tools=[WEATHER]))
    assert "get_current_weather" in rendered.text  # the template itself rendered the tool
    output = _output(record)
    if "<think>" not in output and "</think>" in output:  # the template opened the block in the prompt
        rendered = chat.render(_job(tools=[WEATHER], messages=[ChatMessage(role="user", content="1+3?")]))
        parser = OutputParser(chat.syntax, reasoning=True, thinking=True)
    else:
        parser = rendered.parser
    pieces = _token_pieces(tok, rendered.ids, output) if chunking == "tokens" else list(output)
    got = _run(parser, pieces)
    expect = record["expect"]
    assert got["content"].strip() == expect["content"].strip()
    assert (got["reasoning"] or "").strip() == (expect["reasoning"] or "").strip()
    assert [c["name"] for c in got["calls"]] == [c["name"] for c in expect["tool_calls"]]
    assert [json.loads(c["arguments"]) for c in got["calls"]] == [c["arguments"] for c in expect["tool_calls"]]
    assert all(c["id"] for c in got["calls"])


def test_arguments_stream_before_the_call_is_complete() -> None:
    scanner = CallScanner()
    first = scanner.feed('{"name": "get_weather", "arguments": {"city": "Par')
    assert first == [CallStart("get_weather"), CallArguments('{"city": "Par')]
    assert scanner.feed('is"}}') == [CallArguments('is"}'), CallEnd()]
    assert scanner.done


def test_arguments_written_before_the_name_come_once_the_name_is_known() -> None:
    scanner = CallScanner()
    assert scanner.feed('{"arguments": {"x": [1, {"y": "}"}]}, ') == []
    assert scanner.feed('"name": "f"}') == [CallStart("f"), CallArguments('{"x": [1, {"y": "}"}]}'), CallEnd()]


def test_arguments_sent_as_a_json_string_are_unwrapped() -> None:
    pieces = CallScanner().feed('{"name": "f", "arguments": "{\\"q\\": 1}"}')
    assert pieces == [CallStart("f"), CallArguments('{"q": 1}'), CallEnd()]


def test_a_marker_followed_by_no_json_is_answer_text() -> None:
    got = _run(OutputParser(HERMES, reasoning=False, thinking=False), ["<tool_call> maybe", " later"])
    assert got == {"content": "<tool_call> maybe later", "reasoning": None, "calls": []}


def test_without_parallel_calls_the_answer_ends_after_the_first_call() -> None:
    parser = OutputParser(MISTRAL, reasoning=False, thinking=False, max_calls=1)
    parser.push('[TOOL_CALLS][{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}]')
    assert parser.ended and parser.calls == 1


def test_an_output_cut_short_inside_a_call_still_closes_it() -> None:
    got = _run(OutputParser(HERMES, reasoning=False, thinking=False), ['<tool_call>\n{"name": "f", "arguments": {"a'])
    assert got["calls"] == [{"id": got["calls"][0]["id"], "name": "f", "arguments": '{"a'}]


def test_think_markers_split_across_pieces_are_found(load_tokenizer) -> None:
    parser = OutputParser(None, reasoning=True, thinking=False)
    got = _run(parser, ["<th", "ink>\nplan", " it</th", "ink>\n\nDone."])
    assert got == {"content": "Done.", "reasoning": "plan it", "calls": []}


def test_a_template_without_tools_gets_them_in_hermes_format(load_tokenizer) -> None:
    tok = load_tokenizer(None)  # SmolLM2's own template has no place for tools
    chat = _chat(tok)
    assert not chat.renders_tools and chat.syntax is HERMES
    history = [
        ChatMessage(role="user", content="Weather?"),
        ChatMessage(
            role="assistant", content="", tool_calls=[ToolCall(id="c1", name="get_current_weather", arguments="{}")]
        ),
        ChatMessage(role="tool", content="18C", tool_call_id="c1"),
    ]
    text = chat.render(_job(messages=history, tools=[WEATHER])).text
    assert "<tools>\n" in text and '"name": "get_current_weather"' in text
    assert '<tool_call>\n{"name": "get_current_weather", "arguments": {}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n18C\n</tool_response>" in text


def test_a_tool_round_trip_renders_with_the_models_own_template(load_tokenizer) -> None:
    chat = _chat(load_tokenizer("qwen2.5"))
    history = [
        ChatMessage(role="user", content="Weather?"),
        ChatMessage(
            role="assistant",
            content="",
            tool_calls=[ToolCall(id="c1", name="get_current_weather", arguments='{"city": "Boston"}')],
        ),
        ChatMessage(role="tool", content="18C", tool_call_id="c1"),
    ]
    text = chat.render(_job(messages=history, tools=[WEATHER])).text
    assert '{"name": "get_current_weather", "arguments": {"city": "Boston"}}' in text
    assert "<tool_response>\n18C\n</tool_response>" in text and text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    ("template", "choice", "ending"),
    [
        (
            "qwen2.5",
            NamedTool(name="get_current_weather"),
            '<tool_call>\n{"name": "get_current_weather", "arguments": ',
        ),
        ("qwen2.5", "required", "<tool_call>\n"),
        (
            "mistral",
            NamedTool(name="get_current_weather"),
            '[TOOL_CALLS][{"name": "get_current_weather", "arguments": ',
        ),
        ("llama3.1", "required", '{"name": "'),
    ],
)
def test_a_required_or_named_tool_choice_starts_the_call_in_the_prompt(
    load_tokenizer, template, choice, ending
) -> None:
    rendered = _chat(load_tokenizer(template)).render(_job(tools=[WEATHER], tool_choice=choice))
    assert rendered.text.endswith(ending)


def test_a_named_call_begun_in_the_prompt_is_reported_whole(load_tokenizer) -> None:
    choice = NamedTool(name="get_current_weather")
    rendered = _chat(load_tokenizer("qwen2.5")).render(_job(tools=[WEATHER], tool_choice=choice))
    assert [(c.name, c.arguments) for c in rendered.prefilled] == [("get_current_weather", "")]
    got = _run(rendered.parser, ['{"city": ', '"Boston"}}\n</tool_call>'])
    assert got["calls"][0]["arguments"] == '{"city": "Boston"}' and rendered.parser.calls == 1


def test_tool_choice_none_renders_no_tools_and_parses_no_calls(load_tokenizer) -> None:
    rendered = _chat(load_tokenizer("qwen2.5")).render(_job(tools=[WEATHER], tool_choice="none"))
    assert "get_current_weather" not in rendered.text
    assert _run(rendered.parser, ['<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'])["calls"] == []


@pytest.mark.parametrize(
    ("reasoning", "ending"), [(False, "<think>\n\n</think>\n\n"), (True, "<|im_start|>assistant\n")]
)
def test_reasoning_on_or_off_reaches_the_template(load_tokenizer, reasoning, ending) -> None:
    rendered = _chat(load_tokenizer("qwen3")).render(_job(reasoning=reasoning))
    assert rendered.text.endswith(ending)


def test_a_prefill_is_continued_not_answered(load_tokenizer) -> None:
    messages = [ChatMessage(role="user", content="Hi"), ChatMessage(role="assistant", content="Hello, I am")]
    text = _chat(load_tokenizer("qwen2.5")).render(_job(messages=messages, continue_final=True)).text
    assert text.endswith("<|im_start|>assistant\nHello, I am")


def test_a_template_that_refuses_the_conversation_is_a_clear_error(load_tokenizer) -> None:
    chat = _chat(load_tokenizer("mistral"))
    messages = [ChatMessage(role="user", content="a"), ChatMessage(role="user", content="b")]
    with pytest.raises(PromptRejected, match="chat template refused"):
        chat.render(_job(messages=messages))


def test_the_tokenizers_own_response_template_is_used_when_it_has_one(load_tokenizer) -> None:
    from transformers.cli.serving.utils import get_response_template

    tok = load_tokenizer("qwen2.5")
    tok.response_template = get_response_template(
        tok, type("M", (), {"config": type("C", (), {"model_type": "qwen2"})})
    )
    chat = _chat(tok)
    assert chat.response_template
    rendered = chat.render(_job(tools=[WEATHER]))
    record = next(r for r in RECORDED if r["family"] == "hermes" and len(r["expect"]["tool_calls"]) == 2)
    got = _run(rendered.parser, _token_pieces(tok, rendered.ids, _output(record)))
    assert [c["name"] for c in got["calls"]] == [c["name"] for c in record["expect"]["tool_calls"]]
    assert [json.loads(c["arguments"]) for c in got["calls"]] == [
        c["arguments"] for c in record["expect"]["tool_calls"]
    ]


def test_llama3_calls_separated_in_a_later_piece_are_all_found() -> None:
    pieces = ['{"name": "a", "parameters": {"x": 1}}', " ", '; {"name": "b", "parameters": {}}']
    got = _run(OutputParser(LLAMA3, reasoning=False, thinking=False), pieces)
    assert [(c["name"], c["arguments"]) for c in got["calls"]] == [("a", '{"x": 1}'), ("b", "{}")]
    assert got["content"] == ""


@pytest.mark.parametrize(
    "text",
    ['<tool_call>{"name": 5, "arguments": {}}</tool_call>', '<tool_call>\n{"na'],
    ids=["name-not-a-string", "cut-before-the-name"],
)
def test_a_call_that_never_took_shape_stays_answer_text(text) -> None:
    got = _run(OutputParser(HERMES, reasoning=False, thinking=False), [text])
    assert got == {"content": text, "reasoning": None, "calls": []}


def test_a_marker_that_is_a_special_token_survives_detokenization(load_tokenizer) -> None:
    tok = load_tokenizer("mistral")
    tok.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]"]})
    chat = _chat(tok)
    output = '[TOOL_CALLS][{"name": "get_current_weather", "arguments": {"city": "Paris"}}]'
    ids = tok(output, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("[TOOL_CALLS]")  # one special token, as in Mistral's vocabulary
    detok = IncrementalDetokenizer(tok, [], chat.drop_ids)
    text = "".join(detok.push(t) for t in [*ids, tok.convert_tokens_to_ids("<|im_end|>")]) + detok.flush()
    assert text == output  # the marker kept, other special tokens dropped


def test_a_forced_call_through_the_tokenizers_response_template(load_tokenizer) -> None:
    from transformers.cli.serving.utils import get_response_template

    tok = load_tokenizer("qwen2.5")
    qwen = type("Model", (), {"config": type("Config", (), {"model_type": "qwen2"})})
    tok.response_template = get_response_template(tok, qwen)
    rendered = _chat(tok).render(_job(tools=[WEATHER], tool_choice=NamedTool(name="get_current_weather")))
    got = _run(rendered.parser, ['{"city": "Paris"}}', "\n</tool_call>"])
    assert [(c["name"], json.loads(c["arguments"])) for c in got["calls"]] == [
        ("get_current_weather", {"city": "Paris"})
    ]
