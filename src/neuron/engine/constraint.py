"""Constrained decoding: a token mask that keeps a job's output inside a grammar, so that JSON asked
for is JSON (matching its schema) and a forced or strict tool call's arguments match the tool's.

llguidance (the library llama.cpp, vLLM and SGLang use; bench/constrained.py has the measured
cost) compiles each grammar against the model's tokenizer and, per token, gives the set of tokens
that keep the output valid. The mask is applied to the logits in the shared `Generation`, before
the sampler, so transformers and llama.cpp answer alike.

What is constrained, and from when:
- `output_format` (JSON, or JSON matching a schema): the answer's text, from its first token, or
  from the end of the reasoning (`</think>`) when the model thinks first;
- a forced call (`tool_choice` required or named): the rest of the call after the opening that
  the prompt already holds (`ToolSyntax.force`), then the end of the answer;
- `strict` tools under `auto`: the body of each call, from the moment the model opens one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from cortex.protocol.messages import InferenceJob, NamedTool, OutputFormat, Tool
from neuron.engine.parsing.syntax import THINK_CLOSE, THINK_OPEN, ToolSyntax

# Compact JSON: a random or small model otherwise wanders off in whitespace it may never leave.
_COMPACT = {"whitespace_flexible": False}
_ANY_OBJECT: dict[str, Any] = {"type": "object"}
_BITS = torch.arange(8, dtype=torch.uint8)  # bit i of each byte of llguidance's bitmask is token 8*byte + i


class GrammarRejected(ValueError):
    """The library cannot compile what the request asked for; the message names the keyword."""


def _json(schema: dict[str, Any]) -> str:
    """A schema as a Lark `%json` body, compact."""
    return json.dumps({**schema, "x-guidance": _COMPACT})


def _literal(text: str) -> str:
    return json.dumps(text)  # a Lark string literal is a JSON string


def _call_tail(syntax: ToolSyntax) -> str:
    """What ends one call after its arguments: the call object's brace, then the family's closing."""
    return "}" + (f"\n{syntax.close}" if syntax.close else "") + ("]" if syntax.array else "")


def _calls_grammar(syntax: ToolSyntax, tools: list[Tool], after: str, strict_only: bool) -> str:
    """The rest of a call once `after` (the opening already written) is in the output: for each tool,
    the text that names it, its arguments as JSON (by its schema when it binds), then the closing."""
    calls, rules = [], []
    for i, tool in enumerate(tools):
        # A forced opening names no tool yet, so each tool's starts with it; Llama 3's calls after
        # its `<|python_tag|>` opener are its bare JSON, which the forced opening is whole.
        opening = syntax.force(tool.name)
        head = opening[len(after) :] if opening.startswith(after) else opening
        schema = tool.parameters if (tool.strict or not strict_only) else _ANY_OBJECT
        calls.append(f"call{i}")
        rules.append(f"args{i}: %json {_json(schema)}")
        rules.append(f"call{i}: {_literal(head) + ' ' if head else ''}args{i} {_literal(_call_tail(syntax))}")
    return "\n".join([f"start: {' | '.join(calls)}", *rules])


def _format_grammar(fmt: OutputFormat, after_reasoning: bool) -> str:
    schema = fmt.json_schema if fmt.type == "json_schema" and fmt.json_schema is not None else _ANY_OBJECT
    if not after_reasoning:
        return f"start: %json {_json(schema)}"
    # A little whitespace after the reasoning (a model's habit), bounded: a random or small model
    # could otherwise write blank lines to the end of max_tokens.
    return f"start: /[ \\t\\n]{{0,4}}/ body\nbody: %json {_json(schema)}"


@dataclass(frozen=True)
class Plan:
    """What one job's output is held to: a grammar armed at the start, or one armed when the output
    shows `trigger` (the end of the reasoning, the opening of a call); `again`: re-armed at every
    trigger (strict calls), else once."""

    grammar: str
    trigger: str | None = None
    again: bool = False
    field: str = "response_format"  # what the request called it, for error messages
    may_think: bool = False  # the model may open <think> itself at the first token


def plan(job: InferenceJob, syntax: ToolSyntax | None, reasons: bool, thinking_open: bool) -> Plan | None:
    """The constraint a job asks for, if any. `reasons`: the chat template knows `<think>`;
    `thinking_open`: the prompt itself opened the reasoning."""
    tools = job.tools if job.tools and job.tool_choice != "none" else None
    if tools and syntax is not None and job.tool_choice not in ("auto", "none"):
        named = job.tool_choice.name if isinstance(job.tool_choice, NamedTool) else None
        chosen = [t for t in tools if t.name == named] if named else tools
        return Plan(_calls_grammar(syntax, chosen, syntax.force(named), strict_only=False), field="tool_choice")
    if job.output_format is not None:
        may_think = reasons and job.reasoning is not False
        # A model that may think first gets the grammar that takes whitespace after its reasoning.
        grammar = _format_grammar(job.output_format, after_reasoning=thinking_open or may_think)
        if thinking_open:
            return Plan(grammar, trigger=THINK_CLOSE)
        return Plan(grammar, may_think=may_think)
    if tools and syntax is not None and any(t.strict for t in tools):
        opener = syntax.opens[0]
        grammar = _calls_grammar(syntax, tools, opener, strict_only=True)
        return Plan(grammar, trigger=opener, again=True, field="tools")
    return None


class Constraints:
    """One model's grammar compiler: its tokenizer as llguidance reads it, built on first use."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: frozenset[int]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos_ids = sorted(eos_ids)

    @cached_property
    def _lltok(self) -> llguidance.LLTokenizer:
        return llguidance.hf.from_tokenizer(self._tokenizer, n_vocab=self.vocab_size, eos_token=self._eos_ids)

    def check(self, grammar: str, field: str) -> str:
        lark = llguidance.LLMatcher.grammar_from_lark(grammar)
        error = llguidance.LLMatcher.validate_grammar(lark)
        if error:
            raise GrammarRejected(f"the schema in `{field}` cannot be used for constrained decoding: {error.strip()}")
        return lark

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        return llguidance.LLMatcher(self._lltok, grammar)

    def token_ids(self, text: str) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    @cached_property
    def think_id(self) -> int | None:
        """`<think>` as one token, when the vocabulary has it."""
        ids = self.token_ids(THINK_OPEN)
        return ids[0] if len(ids) == 1 else None


class Constraint:
    """One job's mask, following its output token by token (on the device's worker thread)."""

    def __init__(self, plan: Plan, constraints: Constraints) -> None:
        self._constraints = constraints
        self._grammar = constraints.check(plan.grammar, plan.field)  # GrammarRejected before any pass
        self._trigger = plan.trigger  # what arms the grammar, while it waits to be armed
        self._again = plan.again
        self._matcher: llguidance.LLMatcher | None = None
        self._tail = ""  # the output since the last look, as far back as a trigger may begin
        self._bitmask = llguidance.torch.allocate_token_bitmask(1, constraints.vocab_size)
        self._think_id = constraints.think_id if plan.may_think else None
        self._first = True
        if plan.trigger is None:
            self._matcher = constraints.matcher(self._grammar)

    @property
    def active(self) -> bool:
        return self._matcher is not None

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits with every token the grammar does not allow now at -inf."""
        if self._matcher is None:
            return logits
        llguidance.torch.fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        bits = self._bitmask[0].view(torch.uint8)
        allowed = ((bits.unsqueeze(-1) >> _BITS) & 1).flatten().bool()
        width = logits.shape[-1]
        allowed = allowed[:width].to(logits.device)
        if self._first and self._think_id is not None:
            allowed[self._think_id] = True  # a model that thinks first may open its reasoning
        return logits.float().masked_fill(~allowed, float("-inf"))

    def accept(self, token: int, text: str) -> None:
        """The token sampled, and the text it added to the output."""
        first, self._first = self._first, False
        if self._matcher is not None:
            if first and token == self._think_id:  # it thinks first: the grammar waits for the reasoning's end
                self._matcher, self._trigger = None, THINK_CLOSE
                return
            self._matcher.consume_token(token)
            if self._again and self._matcher.is_accepting():
                self._matcher = None  # the call is whole: free text (or another call) may follow
            return
        if self._trigger is None:
            return
        self._tail += text
        at = self._tail.find(self._trigger)
        if at < 0:
            self._tail = self._tail[-(len(self._trigger) - 1) :] if len(self._trigger) > 1 else ""
            return
        rest = self._tail[at + len(self._trigger) :]
        self._tail = ""
        matcher = self._constraints.matcher(self._grammar)
        if rest and not matcher.consume_tokens(self._constraints.token_ids(rest)):
            return  # what came with the trigger already breaks the grammar: leave this stretch free
        self._matcher = matcher
        if not self._again:
            self._trigger = None
