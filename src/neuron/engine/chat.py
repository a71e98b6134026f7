"""A job's conversation in the model's own chat format, and the parser for what the model answers.

The chat template lives with the tokenizer, so both directions are decided here, in the neuron:
tools are rendered by the template when it has a place for them (else in the Hermes format as a
system prompt, which many small models were trained on), `required` or a named tool_choice
starts the assistant's turn with the opening of a call, and the answer is split into text,
reasoning and tool calls by the tokenizer's own `response_template` when it ships one, else
by the family parser the template's markup names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cortex.protocol.messages import ChatMessage, InferenceJob, ModelSpec, NamedTool, Tool
from neuron.engine.parsing.output import OutputParser, Parsed, Parser, PlainText
from neuron.engine.parsing.syntax import (
    FAMILIES,
    HERMES,
    THINK_CLOSE,
    THINK_OPEN,
    ToolSyntax,
    detect,
    hermes_system_prompt,
    template_renders_tools,
)
from neuron.engine.parsing.template import TemplateParser


class PromptRejected(ValueError):
    """The conversation cannot be rendered (the chat template refused it, or it is too long)."""


@dataclass(frozen=True)
class Rendered:
    ids: list[int]
    text: str
    parser: Parser
    prefilled: list[Parsed]  # what the forced start of the turn already says (a call's opening)


def _template_text(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return "\n".join(str(t) for t in template.values())
    return template or ""


def _arguments(text: str) -> Any:
    """Templates expect a call's arguments as a mapping; text that is not JSON passes as it is."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def tool_schema(tool: Tool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name, "parameters": tool.parameters}
    if tool.description:
        function["description"] = tool.description
    return {"type": "function", "function": function}


class ChatFormat:
    """What one model's chat template can do, read once at load."""

    def __init__(self, spec: ModelSpec, tokenizer: Any) -> None:
        self._tok = tokenizer
        template = _template_text(tokenizer)
        self.has_template = bool(template)
        self.renders_tools = template_renders_tools(template)
        self.syntax: ToolSyntax | None = None
        # Whether the call format is known for sure (named in the catalogue, seen in the template, or
        # the Hermes prompt cortex writes itself), so a forced call can be started in it.
        self.syntax_known = True
        if spec.tool_parser != "none":
            detected = detect(template) if spec.tool_parser == "auto" else FAMILIES[spec.tool_parser]
            self.syntax = detected or HERMES  # Hermes: the most common format, and cortex's own fallback
            self.syntax_known = detected is not None or not self.renders_tools
        self.reasons = THINK_OPEN in template
        self.response_template = getattr(tokenizer, "response_template", None) is not None
        markers = [THINK_OPEN, THINK_CLOSE, *(self.syntax.opens if self.syntax else ())]
        self.drop_ids = _dropped_special_ids(tokenizer, markers)

    # --- prompt ---------------------------------------------------------------------------------

    def render(self, job: InferenceJob) -> Rendered:
        tok = self._tok
        if job.messages is None:
            text = job.prompt or ""
            return Rendered(list(tok(text, add_special_tokens=True)["input_ids"]), text, PlainText(), [])
        tools = job.tools if job.tools and job.tool_choice != "none" else None
        text = self.template_text(job.messages, tools, job.reasoning, job.continue_final)
        parser = self._parser(job, text, tools)  # it reads the forced opening below as output
        forced = ""
        if tools and self.syntax is not None and self.syntax_known and job.tool_choice != "auto":
            forced = self.syntax.force(job.tool_choice.name if isinstance(job.tool_choice, NamedTool) else None)
        text += forced
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        return Rendered(ids, text, parser, parser.push(forced) if forced else [])

    def template_text(
        self,
        messages: list[ChatMessage],
        tools: list[Tool] | None,
        reasoning: bool | None = None,
        continue_final: bool = False,
    ) -> str:
        if not self.has_template:
            raise PromptRejected("this model has no chat template; send a raw `prompt` (/v1/completions) instead")
        turns = self._turns(messages)
        schemas = [tool_schema(t) for t in tools] if tools else None
        if not self.renders_tools and (schemas or any(t["role"] == "tool" or "tool_calls" in t for t in turns)):
            turns, schemas = _hermes_turns(turns, schemas), None
        kwargs: dict[str, Any] = {}
        if reasoning is not None:
            kwargs["enable_thinking"] = reasoning
        if continue_final and messages[-1].role != "assistant":
            continue_final = False
        try:
            return self._apply(turns, schemas, continue_final, kwargs)
        except PromptRejected:
            merged = _merge_late_system_turns(turns)
            if merged == turns:
                raise
            # Many templates take a system turn only first: the late ones join a user turn instead.
            return self._apply(merged, schemas, continue_final, kwargs)

    def _apply(
        self,
        turns: list[dict[str, Any]],
        schemas: list[dict[str, Any]] | None,
        continue_final: bool,
        kwargs: dict[str, Any],
    ) -> str:
        try:
            text: str = self._tok.apply_chat_template(  # tokenize=False: the rendered text
                turns,
                tools=schemas,
                add_generation_prompt=not continue_final,
                continue_final_message=continue_final,
                tokenize=False,
                **kwargs,
            )
        except Exception as exc:  # jinja's TemplateError, or a template's own raise_exception()
            raise PromptRejected(f"the model's chat template refused the conversation: {exc}") from exc
        return text

    def count(self, messages: list[ChatMessage], tools: list[Tool] | None) -> int:
        """The prompt's length in tokens, as a job with these messages and tools would send it (a last
        assistant turn is a prefill, continued, as Anthropic's Messages API treats it)."""
        text = self.template_text(messages, tools, continue_final=messages[-1].role == "assistant")
        return len(self._tok(text, add_special_tokens=False)["input_ids"])

    @staticmethod
    def _turns(messages: list[ChatMessage]) -> list[dict[str, Any]]:
        names: dict[str, str] = {}
        turns = []
        for m in messages:
            turn: dict[str, Any] = {"role": m.role, "content": m.content}
            if m.name:
                turn["name"] = m.name
            if m.tool_calls:
                turn["tool_calls"] = [
                    {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
                    for c in m.tool_calls
                ]
                names.update((c.id, c.name) for c in m.tool_calls)
            if m.tool_call_id:
                turn["tool_call_id"] = m.tool_call_id
                if m.tool_call_id in names and not m.name:
                    turn["name"] = names[m.tool_call_id]
            turns.append(turn)
        return turns

    # --- answer ---------------------------------------------------------------------------------

    def _parser(self, job: InferenceJob, text: str, tools: list[Tool] | None) -> Parser:
        max_calls = None if job.parallel_tool_calls else 1
        if self.response_template:
            call_id = (self.syntax or HERMES).call_id
            schemas = [tool_schema(t) for t in tools] if tools else None
            return TemplateParser(self._tok, text, schemas, call_id, max_calls)
        thinking = self.reasons and text.rstrip().endswith(THINK_OPEN)
        if not tools and not self.reasons:
            return PlainText()
        syntax = self.syntax if tools else None
        return OutputParser(syntax, reasoning=self.reasons, thinking=thinking, max_calls=max_calls)


def _dropped_special_ids(tokenizer: Any, markers: list[str]) -> frozenset[int] | None:
    """Special tokens are dropped from the text, except those that mark reasoning or a call (Mistral's
    `[TOOL_CALLS]`, Llama's `<|python_tag|>`). None: no marker is a special token, drop them all."""
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    special |= {i for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items() if t.special}
    vocab = tokenizer.get_vocab()
    keep = {vocab[m] for m in markers if m in vocab and vocab[m] in special}
    return frozenset(special - keep) if keep else None


def _merge_late_system_turns(turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """System turns after the first turn, for a template that refuses them there: each joins the user
    turn just before it (appended), else the user turn just after it (prepended), else it becomes a
    user turn of its own; its text is kept as it is."""
    out: list[dict[str, Any]] = []
    carried: list[str] = []  # late system text waiting for the next user turn
    for i, turn in enumerate(turns):
        late_system = turn["role"] == "system" and i > 0
        if late_system and out and out[-1]["role"] == "user" and not carried:
            out[-1] = {**out[-1], "content": f"{out[-1]['content']}\n\n{turn['content']}"}
        elif late_system:
            carried.append(turn["content"])
        elif turn["role"] == "user" and carried:
            out.append({**turn, "content": "\n\n".join([*carried, turn["content"]])})
            carried = []
        else:
            if carried:
                out.append({"role": "user", "content": "\n\n".join(carried)})
                carried = []
            out.append(turn)
    if carried:
        out.append({"role": "user", "content": "\n\n".join(carried)})
    return out


def _hermes_turns(turns: list[dict[str, Any]], schemas: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The conversation with tools, calls and results written as text in the Hermes format, for a
    template that has no place for them."""
    out: list[dict[str, Any]] = []
    if schemas:
        prompt = hermes_system_prompt(schemas)
        if turns and turns[0]["role"] == "system":
            out.append({"role": "system", "content": f"{turns[0]['content']}\n\n{prompt}"})
            turns = turns[1:]
        else:
            out.append({"role": "system", "content": prompt})
    for turn in turns:
        if turn.get("tool_calls"):
            calls = "\n".join(
                "<tool_call>\n" + json.dumps(c["function"], ensure_ascii=False) + "\n</tool_call>"
                for c in turn["tool_calls"]
            )
            content = f"{turn['content']}\n{calls}" if turn["content"] else calls
            out.append({"role": "assistant", "content": content})
        elif turn["role"] == "tool":
            response = f"<tool_response>\n{turn['content']}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response, "tool_results": True})
        else:
            out.append(turn)
    for turn in out:
        turn.pop("tool_results", None)
    return out
