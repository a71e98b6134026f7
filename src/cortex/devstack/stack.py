"""`cortex up`: NATS, one neuron and the gateway on 127.0.0.1, serving the default model.

nats-server and the neuron run as child processes in their own sessions, so Ctrl-C
reaches only us and we stop them in order: gateway, neuron (drains), then NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from cortex.config.addresses import split_host_port
from cortex.config.gateway import CortexSettings, GatewaySection
from cortex.config.nats_settings import NatsSettings
from cortex.devstack import natsserver
from cortex.gateway.app import build_app
from cortex.placement.fleet import FleetView
from cortex.protocol.catalogue import Catalogue


@dataclass
class DevOptions:
    model: str
    models_config: Path | None
    listen: str
    metrics_listen: str
    nats_port: int
    nats_http_port: int
    state_dir: Path
    node: str = "dev"
    load_timeout: float = 600.0


def default_state_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cortex" / "dev"


def _say(text: str) -> None:
    print(text, flush=True)


async def run(opts: DevOptions) -> int:
    catalogue = Catalogue.load(opts.models_config)
    spec = catalogue.resolve(opts.model)
    if spec is None:
        _say(f"cortex up: model {opts.model!r} is not in the catalogue; known: {', '.join(catalogue.names())}")
        return 2
    nats_url = f"nats://127.0.0.1:{opts.nats_port}"
    _say(f"starting NATS on {nats_url} (state in {opts.state_dir})")
    nats_proc = natsserver.start(
        port=opts.nats_port,
        http_port=opts.nats_http_port,
        workdir=opts.state_dir,
        log_file=opts.state_dir / "nats.log",
    )
    neuron_proc: subprocess.Popen[bytes] | None = None
    server: uvicorn.Server | None = None
    serving: asyncio.Task[None] | None = None
    try:
        neuron_args = [sys.executable, "-m", "neuron.cli", "serve", "--nats", nats_url, "--node", opts.node]
        neuron_args += ["--model", spec.id]
        if opts.models_config:
            neuron_args += ["--models-config", str(opts.models_config)]
        _say(f"starting neuron {opts.node!r}; it loads {spec.id} from {spec.source}")
        # Blocking is fine here: nothing is served yet.
        neuron_proc = subprocess.Popen(neuron_args, stdin=subprocess.DEVNULL, start_new_session=True)  # noqa: ASYNC220

        settings = CortexSettings(
            gateway=GatewaySection(listen=opts.listen, metrics_listen=opts.metrics_listen),
            nats=NatsSettings(servers=[nats_url]),
            models_config=opts.models_config,
        )
        app = build_app(settings, catalogue)
        host, port = split_host_port(opts.listen)
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", lifespan="on", timeout_graceful_shutdown=5
        )
        server = uvicorn.Server(config)
        serving = asyncio.create_task(server.serve())
        while not server.started:
            if serving.done():
                await serving
                return 1
            await asyncio.sleep(0.05)
        fleet = app.state.gateway.fleet
        settled = asyncio.create_task(_settled(fleet, spec.id, opts.load_timeout))
        while not settled.done():
            if neuron_proc.poll() is not None:
                settled.cancel()
                _say(f"cortex up: the neuron exited with {neuron_proc.returncode} before {spec.id} was ready")
                return 1
            if serving.done():
                settled.cancel()
                break
            await asyncio.wait({settled, serving}, timeout=0.5)
        failures = fleet.failed_on(spec.id)
        if failures:
            _say(f"cortex up: {spec.id} failed to load: {failures[0][1]}")
            return 1
        if spec.id in fleet.ready_models():
            engines = {m.engine for hb in fleet.nodes() for m in hb.models if m.id == spec.id and m.engine}
            _say(_banner(opts, spec.id, spec.aliases, nats_url, ", ".join(sorted(engines))))
        elif not serving.done():
            _say(f"cortex up: {spec.id} is still not ready after {opts.load_timeout:g}s; still waiting")
        await serving
        return 0
    finally:
        if server is not None and serving is not None and not server.should_exit:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(serving, 10)
        if neuron_proc is not None and neuron_proc.poll() is None:
            _say("stopping the neuron")
            neuron_proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(neuron_proc.wait, 40)
            if neuron_proc.poll() is None:
                neuron_proc.kill()
        _say("stopping NATS")
        natsserver.stop(nats_proc)
        _say("stopped")


async def _settled(fleet: FleetView, model_id: str, timeout: float) -> None:
    """Until the model is ready or failed on some node; a timeout ends it too (the caller looks which)."""
    with contextlib.suppress(TimeoutError):
        await fleet.wait_for(lambda f: model_id in f.ready_models() or bool(f.failed_on(model_id)), timeout)


QUESTION = "What is the capital of France? Answer in one sentence."


def _banner(opts: DevOptions, model: str, aliases: list[str], nats_url: str, engine: str) -> str:
    alias = aliases[0] if aliases else model
    base = f"http://{opts.listen}"
    return f"""
cortex is ready: {model}{f" (alias {alias})" if aliases else ""} on node {opts.node}, engine {engine}

  OpenAI API   {base}/v1     (Anthropic: {base}/v1/messages)
  fleet page   {base}/fleet
  metrics      http://{opts.metrics_listen}/metrics (gateway), http://127.0.0.1:13131/metrics (neuron)
  NATS         {nats_url}   (monitoring http://127.0.0.1:{opts.nats_http_port})

try it:
  curl {base}/v1/chat/completions -H 'content-type: application/json' \\
    -d '{{"model": "{alias}", "messages": [{{"role": "user", "content": "{QUESTION}"}}]}}'

watch the fleet:
  cortex status --nats {nats_url} --watch
  nats -s {nats_url} sub 'cortex.>'
  nats -s {nats_url} kv watch cortex_nodes
  nats -s {nats_url} micro ls

Ctrl-C stops everything.
"""
