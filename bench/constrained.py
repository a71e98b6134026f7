"""The cost of constrained decoding per token, by library, against a decode step of the default model
(SmolLM2-135M-Instruct Q4_1 on llama.cpp, cortex's default engine), and which JSON Schema keywords
each library compiles.

For each schema, a decode of up to TOKENS tokens is simulated: every step computes the mask of
allowed tokens, applies it to random logits, takes the best allowed token and advances the
matcher. Timed per step: mask + apply + advance. `cortex (llguidance)` is cortex's own
`neuron.engine.constraint.Constraint` (its bit unpacking and masked_fill included), the figure that
matters; the rows above it are the libraries' own calls.

  python -m bench constrained        results: bench/results/constrained.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.throughput import SMOLLM2_GGUF, _smollm2_dir

RESULTS = Path(__file__).parent / "results"
TOKENS = 64
SCHEMAS: dict[str, dict[str, Any]] = {
    "flat object": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}, "temp": {"type": "integer"}},
        "required": ["city", "temp"],
        "additionalProperties": False,
    },
    "nested, arrays, enums": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4},
            "owner": {
                "type": "object",
                "properties": {"id": {"type": "integer"}, "email": {"type": "string"}},
                "required": ["id"],
            },
        },
        "required": ["name", "tags", "owner"],
    },
    "tool union (anyOf)": {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": "read"}, "arguments": {"type": "object"}},
                "required": ["name", "arguments"],
            },
            {
                "type": "object",
                "properties": {"name": {"const": "write"}, "arguments": {"type": "object"}},
                "required": ["name", "arguments"],
            },
        ]
    },
}
FEATURES: dict[str, dict[str, Any]] = {
    "$ref/$defs": {"$defs": {"p": {"type": "integer"}}, "type": "object", "properties": {"a": {"$ref": "#/$defs/p"}}},
    "anyOf": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
    "oneOf": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "string"}}}, {"required": ["a"]}]},
    "enum/const": {"enum": ["x", 1, None]},
    "pattern": {"type": "string", "pattern": "^[a-z]{2,5}$"},
    "format date-time": {"type": "string", "format": "date-time"},
    "min/maxItems": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
    "min/maxLength": {"type": "string", "minLength": 2, "maxLength": 4},
    "minimum/maximum": {"type": "integer", "minimum": 3, "maximum": 9},
    "additionalProperties schema": {"type": "object", "additionalProperties": {"type": "integer"}},
    "patternProperties": {"type": "object", "patternProperties": {"^x": {"type": "integer"}}},
    "if/then/else": {"if": {"type": "string"}, "then": {"minLength": 1}, "else": {"type": "integer"}},
    "not": {"not": {"type": "string"}},
}


def _tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_smollm2_dir()), gguf_file=SMOLLM2_GGUF)


def decode_step_ms(steps: int = 48) -> float:
    """A decode step of the default model on llama.cpp (one token, batch of one)."""
    from llama_cpp import Llama

    llm = Llama(str(_smollm2_dir() / SMOLLM2_GGUF), n_ctx=512, verbose=False)
    llm.eval(llm.tokenize(b"Write a JSON object describing a city.", add_bos=True))
    times = []
    token = 1000
    for _ in range(steps):
        start = time.perf_counter()
        llm.eval([token])
        times.append((time.perf_counter() - start) * 1000)
    llm.close()
    return statistics.median(times)


class Run:
    """One library on one schema: `step(logits) -> token` masks, picks and advances."""

    def __init__(self, compile_ms: float, step: Callable[[torch.Tensor], int | None]) -> None:
        self.compile_ms = compile_ms
        self.step = step


def _llguidance(tok: Any, schema: dict[str, Any]) -> Run:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    lltok = _llguidance_tokenizer(tok)
    start = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    matcher = llguidance.LLMatcher(lltok, grammar)
    compile_ms = (time.perf_counter() - start) * 1000
    mask = llguidance.torch.allocate_token_bitmask(1, lltok.vocab_size)

    def step(logits: torch.Tensor) -> int | None:
        if matcher.is_stopped():
            return None
        llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
        row = logits.unsqueeze(0)
        llguidance.torch.apply_token_bitmask_inplace(row, mask)
        token = int(torch.argmax(row))
        matcher.consume_token(token)
        return token

    return Run(compile_ms, step)


_LLTOK: dict[int, Any] = {}


def _llguidance_tokenizer(tok: Any) -> Any:
    import llguidance.hf

    if id(tok) not in _LLTOK:
        _LLTOK[id(tok)] = llguidance.hf.from_tokenizer(tok)
    return _LLTOK[id(tok)]


def _cortex(tok: Any, schema: dict[str, Any]) -> Run:
    from cortex.protocol.messages import ChatMessage, InferenceJob, OutputFormat
    from neuron.engine.constraint import Constraint, Constraints, plan

    constraints = Constraints(tok, len(tok), frozenset({tok.eos_token_id}))
    job = InferenceJob(
        model="m",
        messages=[ChatMessage(role="user", content="x")],
        output_format=OutputFormat(type="json_schema", json_schema=schema),
    )
    wanted = plan(job, None, reasons=False, thinking_open=False)
    assert wanted is not None
    constraint = Constraint(wanted, constraints)  # builds the tokenizer index once, outside the timing
    start = time.perf_counter()
    constraint = Constraint(wanted, constraints)
    compile_ms = (time.perf_counter() - start) * 1000
    ended = False

    def step(logits: torch.Tensor) -> int | None:
        nonlocal ended
        if ended:
            return None
        token = int(torch.argmax(constraint.mask(logits)))
        ended = token == tok.eos_token_id
        constraint.accept(token, "")
        return token

    return Run(compile_ms, step)


def _xgrammar(tok: Any, schema: dict[str, Any]) -> Run:
    import json

    import xgrammar as xgr

    info = _XGR.setdefault(id(tok), xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok)))
    start = time.perf_counter()
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(schema), any_whitespace=False)
    matcher = xgr.GrammarMatcher(compiled)
    compile_ms = (time.perf_counter() - start) * 1000
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)

    def step(logits: torch.Tensor) -> int | None:
        if matcher.is_terminated():
            return None
        matcher.fill_next_token_bitmask(mask)
        row = logits.unsqueeze(0)
        xgr.apply_token_bitmask_inplace(row, mask)
        token = int(torch.argmax(row))
        matcher.accept_token(token)
        return token

    return Run(compile_ms, step)


_XGR: dict[int, Any] = {}
LIBRARIES: dict[str, Callable[[Any, dict[str, Any]], Run]] = {
    "llguidance": _llguidance,
    "xgrammar": _xgrammar,
    "cortex (llguidance)": _cortex,
}


def measure(run: Run, vocab: int, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    times = []
    for _ in range(TOKENS):
        logits = torch.randn(vocab, generator=gen)
        start = time.perf_counter()
        if run.step(logits) is None:
            break
        times.append((time.perf_counter() - start) * 1000)
    return times


def coverage(tok: Any) -> dict[str, dict[str, bool]]:
    out: dict[str, dict[str, bool]] = {}
    import json

    import llguidance
    import xgrammar as xgr

    info = _XGR.setdefault(id(tok), xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok)))
    for feature, schema in FEATURES.items():
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
        ok_llg = not llguidance.LLMatcher.validate_grammar(grammar)
        try:
            xgr.GrammarCompiler(info).compile_json_schema(json.dumps(schema))
            ok_xgr = True
        except Exception:
            ok_xgr = False
        out[feature] = {"llguidance": ok_llg, "xgrammar": ok_xgr}
    return out


def main(argv: list[str]) -> None:
    argparse.ArgumentParser(prog="python -m bench constrained").parse_args(argv)
    tok = _tokenizer()
    vocab = len(tok)
    step_ms = decode_step_ms()
    lines = [
        "# Constrained decoding: cost per token",
        "",
        f"A decode step of the default model (SmolLM2-135M Q4_1, llama.cpp, this CPU): **{step_ms:.2f} ms**.",
        f"Per token: mask + apply + advance, over up to {TOKENS} tokens of random logits (median, p95).",
        "",
        "| library | schema | compile ms | median ms/token | p95 ms/token | median, % of a decode step |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for library, make in LIBRARIES.items():
        for name, schema in SCHEMAS.items():
            run = make(tok, schema)
            times = measure(run, vocab, seed=1)
            median = statistics.median(times)
            p95 = sorted(times)[int(0.95 * (len(times) - 1))]
            share = 100 * median / step_ms
            lines.append(f"| {library} | {name} | {run.compile_ms:.1f} | {median:.3f} | {p95:.3f} | {share:.1f} % |")
    lines += ["", "## JSON Schema keywords each compiles", "", "| keyword | llguidance | xgrammar |", "|---|:-:|:-:|"]
    for feature, ok in coverage(tok).items():
        lines.append(f"| {feature} | {'yes' if ok['llguidance'] else 'no'} | {'yes' if ok['xgrammar'] else 'no'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "constrained.md").write_text(text)
