"""The real coding-agent CLIs, as users run them, against the gateway: Claude Code (`claude -p`),
Codex (`codex exec` with a custom provider) and opencode (`opencode run`), offline.

`make agents` installs them at pinned versions into `.agents/`; CI sets REQUIRE_AGENTS=1, so there
they run, never skip. Their prompts are long (Claude Code's is ~20,000 tokens), so the scripted
turns come from a tiny model with a 32k context (conftest's `agent_models`): a tool call that the
CLI carries out, then a final answer once the result is in.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

AGENTS_BIN = Path(__file__).resolve().parent.parent / ".agents" / "node_modules" / ".bin"


def agent(name: str) -> Path:
    path = AGENTS_BIN / name
    if not path.exists():
        if os.environ.get("REQUIRE_AGENTS"):
            pytest.fail(f"{path} is missing; `make agents` installs it")
        pytest.skip(f"{name} is not installed (`make agents`)")
    return path


def run(argv: list[str | Path], cwd: Path, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "TERM", "SSL_CERT_FILE")}
    (cwd / ".home").mkdir(exist_ok=True)
    return subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        env={**base, "HOME": str(cwd / ".home"), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def claude_env(gateway_url: str, model: str) -> dict[str, str]:
    """What a user sets to point Claude Code at cortex (README, "Use it from coding agents")."""
    return {
        "ANTHROPIC_BASE_URL": gateway_url,
        "ANTHROPIC_API_KEY": "unused",
        "ANTHROPIC_MODEL": model,
        "ANTHROPIC_SMALL_FAST_MODEL": model,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
    }


def test_claude_code_writes_a_file_with_its_write_tool(gateway, neuron, agent_workdir: Path) -> None:
    claude = agent("claude")
    argv = [claude, "-p", "Write claude.txt", "--model", "test/agent-claude", "--allowedTools", "Write"]
    done = run(argv, agent_workdir, claude_env(gateway.url, "test/agent-claude"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert (agent_workdir / "claude.txt").read_text() == "written by claude\n"
    assert "I wrote claude.txt." in done.stdout
    # A later turn (after the tool ran) read most of its prompt from the node's prefix cache.
    turns = re.findall(r"model=test/agent-claude .*? tokens=(\d+)\+\d+ cached=(\d+)", gateway.proc.output())
    assert len(turns) >= 2 and any(int(cached) > int(prompt) // 2 for prompt, cached in turns[1:]), turns


def test_claude_code_gets_a_plain_answer_from_the_default_model(gateway, neuron, tmp_path: Path) -> None:
    claude = agent("claude")
    model = "HuggingFaceTB/SmolLM2-135M-Instruct"
    # `--bare`: no CLAUDE.md auto-discovery (nor hooks, plugins or its full tool set), so a CLAUDE.md
    # the machine keeps in a parent directory (/ or /tmp) cannot push the prompt past 8k tokens.
    argv = [claude, "-p", "--bare", "Question: what is the capital of France?", "--model", model]
    argv += ["--system-prompt", "You are a helpful assistant. Answer in one short sentence.", "--tools", ""]
    done = run(argv, tmp_path, claude_env(gateway.url, model))
    assert done.returncode == 0, done.stdout + done.stderr
    # 135M parameters: its answer is a sentence, not always the right one (Claude Code puts its
    # environment turn after the question, and this model tends to answer that turn).
    assert done.stdout.strip() and "API Error" not in done.stdout


def codex_argv(codex: Path, gateway_url: str, model: str, prompt: str) -> list[str | Path]:
    """`codex exec` with cortex as a custom model provider (README, "Use it from coding agents")."""
    provider = {
        "model_provider": "cortex",
        "model_providers.cortex.name": '"cortex"',
        "model_providers.cortex.base_url": f'"{gateway_url}/v1"',
        "model_providers.cortex.wire_api": '"responses"',
        "model_providers.cortex.env_key": '"CORTEX_API_KEY"',
        "model_providers.cortex.request_max_retries": "0",
        "model_providers.cortex.stream_max_retries": "0",
    }
    settings = [arg for key, value in provider.items() for arg in ("-c", f"{key}={value}")]
    # No sandbox: the test's working directory is a throwaway one, and a container may not allow bwrap.
    return [
        codex,
        "exec",
        "--skip-git-repo-check",
        "--dangerously-bypass-approvals-and-sandbox",
        *settings,
        "-m",
        model,
        prompt,
    ]


def test_codex_runs_a_scripted_shell_command(gateway, neuron, agent_workdir: Path) -> None:
    codex = agent("codex")
    argv = codex_argv(codex, gateway.url, "test/agent-codex", "Write codex.txt")
    done = run(argv, agent_workdir, {"CORTEX_API_KEY": "unused"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert (agent_workdir / "codex.txt").read_text() == "written by codex\n"
    assert "I wrote codex.txt." in done.stdout


def opencode_config(gateway_url: str, model: str) -> str:
    """An openai-compatible provider pointing at cortex (README, "Use it from coding agents")."""
    provider = {
        "npm": "@ai-sdk/openai-compatible",
        "name": "cortex",
        "options": {"baseURL": f"{gateway_url}/v1", "apiKey": "unused"},
        "models": {model: {"name": model}},
    }
    config = {"$schema": "https://opencode.ai/config.json", "provider": {"cortex": provider}, "autoupdate": False}
    return json.dumps(config)


def test_opencode_writes_a_file_with_its_write_tool(gateway, neuron, agent_workdir: Path) -> None:
    opencode = agent("opencode")
    env = {"OPENCODE_CONFIG_CONTENT": opencode_config(gateway.url, "test/agent-opencode")}
    done = run([opencode, "run", "-m", "cortex/test/agent-opencode", "Write opencode.txt"], agent_workdir, env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (agent_workdir / "opencode.txt").read_text() == "written by opencode\n"
    assert "I wrote opencode.txt." in done.stdout


def test_opencode_gets_a_plain_answer(gateway, neuron, tmp_path: Path) -> None:
    opencode = agent("opencode")
    env = {"OPENCODE_CONFIG_CONTENT": opencode_config(gateway.url, "test/agent-plain")}
    done = run([opencode, "run", "-m", "cortex/test/agent-plain", "What is the capital of France?"], tmp_path, env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "The capital of France is Paris." in done.stdout
