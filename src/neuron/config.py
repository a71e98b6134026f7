"""neuron.toml: what this node is called, where NATS is, which devices and models it serves."""

from __future__ import annotations

import re
import socket
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from cortex.config.loading import load_settings
from cortex.config.nats_settings import NatsSettings
from cortex.protocol.subjects import NODE_NAME_PATTERN
from cortex.telemetry.logs import LogFormat


def default_node_name() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname().split(".")[0]) or "node"


class NeuronSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    node: str = Field(default_factory=default_node_name, pattern=NODE_NAME_PATTERN)
    nats: NatsSettings = Field(default_factory=NatsSettings)
    devices: list[str] | None = Field(None, description="`cpu`, `cuda:0`, ...; all devices if unset.")
    max_batch: int = Field(4, ge=1, description="Jobs per model generating at once.")
    max_queue: int = Field(16, ge=0, description="Jobs per model waiting beyond max_batch; then `busy`.")
    prefix_cache: bool = Field(
        True,
        description="Keep past prompts' keys and values (inside each model's KV budget) so that a prompt that "
        "starts like an earlier one computes only what is new.",
    )
    prefill_chunk: int = Field(
        0,
        ge=0,
        description="Prompt tokens a step feeds beside the streams decoding, so a long prompt goes in between "
        "their tokens; 0 sizes it from measured step times (a step with a chunk takes at most ~4x one without).",
    )
    threads: int = Field(
        0,
        ge=0,
        description="CPU threads for each engine's forward passes; 0: this node's share of the cores it may "
        "run on, divided among the neurons on this host (checked again every heartbeat).",
    )
    default_models: list[str] = Field(default_factory=list, description="Catalogue ids or aliases to load.")
    models_config: Path | None = Field(None, description="models.toml; the built-in catalogue if unset.")
    memory_mb: int | None = Field(
        None, ge=1, description="Memory per device models may use; the device's total less the reserve if unset."
    )
    memory_reserve_mb: int = Field(1024, ge=0, description="Memory per device left for everything else.")
    defrag_after_cycles: int = Field(
        50, ge=0, description="Release cached allocator memory after this many load/unload cycles on a device."
    )
    hf_cache_dir: Path | None = None
    converted_dir: Path | None = Field(
        Path("~/.cache/cortex/converted").expanduser(),
        description="Dequantized GGUF weights, saved once so that later loads are fast; unset to turn off.",
    )
    offline: bool = False
    heartbeat_interval: float = Field(2.0, gt=0)
    drain_timeout: float = Field(30.0, ge=0, description="On SIGTERM, seconds in-flight jobs may finish.")
    metrics_listen: str | None = Field(
        "127.0.0.1:13131", description="Prometheus /metrics and /healthz; unset to disable."
    )
    log_level: str = "INFO"
    log_format: LogFormat = Field("text", description="`json`: one JSON object per line, with request and job ids.")


def load(path: Path | None, **overrides: object) -> NeuronSettings:
    return load_settings(NeuronSettings, path, "NEURON", **overrides)
