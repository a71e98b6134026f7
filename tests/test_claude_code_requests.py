"""Anthropic Messages as Claude Code 2.1.x sends them: `?beta=true`, a long `anthropic-beta` header,
`context_management`, `output_config`, `thinking: adaptive` with `display`, a JSON string as
`metadata.user_id`, `cache_control` on blocks, deferred tools, and a system turn after the user's."""

from __future__ import annotations

import json

import httpx
import pytest
from transformers import AutoTokenizer

from cortex.dialects import anthropic
from cortex.protocol.errors import InvalidRequest
from cortex.protocol.messages import ChatMessage, ModelSpec
from cortex.protocol.prefix import prefix_chain
from neuron.engine.chat import ChatFormat, PromptRejected

HEADERS = {
    "x-api-key": "unused",
    "anthropic-version": "2023-06-01",
    "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27,"
    "advanced-tool-use-2025-11-20,effort-2025-11-24",
}
WRITE = {
    "name": "Write",
    "description": "Writes a file to the local filesystem.",
    "input_schema": {
        "type": "object",
        "properties": {"file_path": {"type": "string"}, "content": {"type": "string"}},
        "required": ["file_path", "content"],
        "additionalProperties": False,
    },
}
DEFERRED = {"name": "DeferredToolPlaceholder", "defer_loading": True}


def claude_code_body(model: str, **over) -> dict:
    """The shape of Claude Code 2.1.332's request (captured from the CLI), with a short prompt."""
    body = {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "<system-reminder>\nBe brief.\n</system-reminder>\n"},
                    {"type": "text", "text": "write hello to a.txt", "cache_control": {"type": "ephemeral"}},
                ],
            },
            {"role": "system", "content": [{"type": "text", "text": "# Environment\n - Platform: linux"}]},
        ],
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.332;"},
            {"type": "text", "text": "You are a Claude agent.", "cache_control": {"type": "ephemeral"}},
        ],
        "tools": [WRITE, DEFERRED],
        "metadata": {"user_id": json.dumps({"device_id": "d", "account_uuid": "", "session_id": "s"})},
        "max_tokens": 32000,
        "thinking": {"type": "adaptive", "display": "omitted"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
        "stream": True,
    }
    return {**body, **over}


def _job(**over):
    req = anthropic.MessagesRequest.model_validate(claude_code_body("m", **over))
    return anthropic.to_job(req, "m", job_id="j", request_id="r")


# --- the dialect ---------------------------------------------------------------------------------


def test_the_system_turn_after_the_users_stays_in_place() -> None:
    assert [m.role for m in _job().messages or []] == ["system", "user", "system"]


def test_the_per_request_billing_line_is_left_out_so_turns_share_their_prefix() -> None:
    turn = {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.332.a1f; cc_entrypoint=cli; cch=36ee5;"}
    later = {**turn, "text": turn["text"].replace("36ee5", "0aaa9")}
    first, second = (
        _job(system=[block, {"type": "text", "text": "You are a Claude agent."}]) for block in (turn, later)
    )
    assert first.messages[0].content == second.messages[0].content == "You are a Claude agent."
    assert prefix_chain(first) == prefix_chain(second)


def test_a_deferred_tool_is_left_out_of_the_prompt() -> None:
    assert [t.name for t in _job().tools or []] == ["Write"]


REFERENCE = {"type": "tool_reference", "tool_name": "Later"}


def test_a_tool_reference_brings_a_deferred_tool_in() -> None:
    deferred = {**WRITE, "name": "Later", "defer_loading": True}
    messages = [
        {"role": "user", "content": "find a tool"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "ToolSearch", "input": {}}]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": [REFERENCE]},
            ],
        },
    ]
    job = _job(tools=[WRITE, deferred, {**WRITE, "name": "ToolSearch"}], messages=messages)
    assert [t.name for t in job.tools or []] == ["Write", "Later", "ToolSearch"]
    assert (job.messages or [])[-1].content == "Tool Later is loaded."


@pytest.mark.parametrize(
    ("thinking", "effort", "reasoning"),
    [
        ({"type": "adaptive"}, "high", True),
        ({"type": "adaptive"}, "max", True),
        ({"type": "adaptive"}, "medium", None),
        ({"type": "adaptive"}, "low", False),
        ({"type": "disabled"}, "high", False),
        ({"type": "enabled", "budget_tokens": 2048}, "low", True),
    ],
)
def test_effort_sets_the_thinking_switch_unless_thinking_says(thinking, effort, reasoning) -> None:
    assert _job(thinking=thinking, output_config={"effort": effort}).reasoning is reasoning


def test_output_config_format_asks_for_json_by_its_schema() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    job = _job(output_config={"format": {"type": "json_schema", "schema": schema}})
    assert job.output_format is not None
    assert job.output_format.type == "json_schema" and job.output_format.json_schema == schema


def test_a_clear_tool_uses_edit_is_refused_by_name() -> None:
    edits = {"edits": [{"type": "clear_tool_uses_20250919", "trigger": {"type": "input_tokens", "value": 30000}}]}
    with pytest.raises(InvalidRequest, match=r"edits\[0\]` is 'clear_tool_uses_20250919'"):
        _job(context_management=edits)


# --- the chat template ----------------------------------------------------------------------------

# A template that, like Gemma's and some Mistral ones, takes a system turn only first.
FIRST_SYSTEM_ONLY = (
    "{% for m in messages %}{% if m.role == 'system' and not loop.first %}"
    "{{ raise_exception('System role only at the start') }}{% endif %}"
    "<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
LATE_SYSTEM = [
    ChatMessage(role="system", content="S"),
    ChatMessage(role="user", content="U"),
    ChatMessage(role="system", content="L"),
]


@pytest.fixture
def chat_tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def test_a_late_system_turn_renders_as_a_system_turn_where_the_template_allows(chat_tok) -> None:
    text = ChatFormat(ModelSpec(id="m", source="file:/x"), chat_tok).template_text(LATE_SYSTEM, None)
    assert "<|im_start|>user\nU<|im_end|>\n<|im_start|>system\nL<|im_end|>" in text


def test_a_late_system_turn_joins_the_user_turn_before_it_where_the_template_refuses(chat_tok) -> None:
    chat_tok.chat_template = FIRST_SYSTEM_ONLY
    text = ChatFormat(ModelSpec(id="m", source="file:/x"), chat_tok).template_text(LATE_SYSTEM, None)
    assert text == "<|system|>S\n<|user|>U\n\nL\n<|assistant|>"


def test_a_late_system_turn_after_an_answer_joins_the_next_user_turn(chat_tok) -> None:
    chat_tok.chat_template = FIRST_SYSTEM_ONLY
    messages = [*LATE_SYSTEM[:2], ChatMessage(role="assistant", content="A"), *LATE_SYSTEM[2:]]
    messages.append(ChatMessage(role="user", content="V"))
    text = ChatFormat(ModelSpec(id="m", source="file:/x"), chat_tok).template_text(messages, None)
    assert text == "<|system|>S\n<|user|>U\n<|assistant|>A\n<|user|>L\n\nV\n<|assistant|>"


def test_a_template_that_refuses_for_another_reason_still_refuses(chat_tok) -> None:
    chat_tok.chat_template = "{{ raise_exception('no') }}"
    with pytest.raises(PromptRejected, match="no"):
        ChatFormat(ModelSpec(id="m", source="file:/x"), chat_tok).template_text(LATE_SYSTEM, None)


# --- end to end -----------------------------------------------------------------------------------


def _events(url: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{url}/v1/messages?beta=true", json=body, headers=HEADERS, timeout=60) as resp:
        assert resp.status_code == 200, resp.read()
        return [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: ")]


def test_claude_codes_request_is_answered_with_its_tool_call(gateway, neuron) -> None:
    events = _events(gateway.url, claude_code_body("test/tools"))
    starts = [e["content_block"] for e in events if e["type"] == "content_block_start"]
    assert any(block["type"] == "tool_use" for block in starts)
    assert events[-2]["delta"]["stop_reason"] == "tool_use" and events[-1]["type"] == "message_stop"


def test_count_tokens_takes_claude_codes_request(gateway, neuron) -> None:
    body = claude_code_body("test/tools")
    for key in ("max_tokens", "metadata", "stream"):
        body.pop(key)
    resp = httpx.post(f"{gateway.url}/v1/messages/count_tokens?beta=true", json=body, headers=HEADERS, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.json()["input_tokens"] > 50


def test_an_unknown_field_is_still_refused_by_name(gateway, neuron) -> None:
    body = claude_code_body("test/tools", surprise=1)
    resp = httpx.post(f"{gateway.url}/v1/messages?beta=true", json=body, headers=HEADERS, timeout=30)
    assert resp.status_code == 400 and "surprise" in resp.json()["error"]["message"]
