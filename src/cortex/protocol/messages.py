"""Every message cortex and neuron exchange over NATS, as versioned pydantic models.

`schemas/*.json` is generated from these (`cortex schemas`); a test fails when they drift.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from cortex.protocol.errors import ErrorCode

PROTOCOL_VERSION = 1


class _Wire(BaseModel):
    # Unknown fields are ignored so an older peer can read a newer peer's messages.
    model_config = ConfigDict(extra="ignore")

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


# --- the job -------------------------------------------------------------------------------


class ChatMessage(_Wire):
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    name: str | None = None


class SamplingParams(_Wire):
    max_tokens: int = Field(256, ge=1, description="Most tokens to generate.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy; unset: the model's default.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Unset: the model's default.")
    top_k: int | None = Field(None, ge=1)
    seed: int | None = Field(None, description="Same seed, same job, same device: same output.")
    stop: list[str] = Field(default_factory=list, max_length=16)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)


class InferenceJob(_Wire):
    """The normalized request, published on `<prefix>.infer.<model_key>[.<node>]`."""

    v: int = PROTOCOL_VERSION
    job_id: str
    request_id: str
    model: str = Field(description="Catalogue id of the model (not an alias).")
    messages: list[ChatMessage] | None = None
    prompt: str | None = Field(None, description="Raw prompt, sent to the model without a chat template.")
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    created_at: float = Field(default_factory=time.time, description="Unix time the gateway built it.")
    deadline: float | None = Field(None, description="Unix time after which the result is useless.")

    @model_validator(mode="after")
    def _one_input(self) -> InferenceJob:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a job carries exactly one of `messages` or `prompt`")
        return self


# --- events on the reply inbox ----------------------------------------------------------------


class _Event(_Wire):
    job_id: str
    seq: int = Field(ge=0, description="0, 1, 2, ... with no gaps, per job.")


class Accepted(_Event):
    type: Literal["accepted"] = "accepted"
    node: str
    device: str
    queue_position: int = Field(0, description="Jobs ahead of this one for the same model; 0 = running.")


class Delta(_Event):
    type: Literal["delta"] = "delta"
    text: str
    tokens: int = Field(description="Generated tokens this piece of text covers.")


class Usage(_Wire):
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Timings(_Wire):
    queue_ms: float = Field(description="Accepted until the first forward pass began.")
    prefill_ms: float
    decode_ms: float
    ttft_ms: float = Field(description="Accepted until the first generated token.")


class Done(_Event):
    type: Literal["done"] = "done"
    finish_reason: Literal["stop", "length", "cancelled"]
    stop_sequence: str | None = Field(None, description="The stop sequence that ended it, if one did.")
    usage: Usage
    timings: Timings


class Failed(_Event):
    type: Literal["error"] = "error"
    code: ErrorCode
    message: str
    retryable: bool = False


JobEvent = Annotated[Accepted | Delta | Done | Failed, Field(discriminator="type")]
JOB_EVENT: TypeAdapter[Accepted | Delta | Done | Failed] = TypeAdapter(JobEvent)


# --- heartbeat (KV cortex_nodes, key = node) -----------------------------------------------------


class DeviceInfo(_Wire):
    id: str = Field(description="`cpu` or `cuda:N`.")
    kind: Literal["cpu", "cuda"]
    name: str
    total_mb: int
    free_mb: int


class ModelState(StrEnum):
    loading = "loading"
    ready = "ready"
    unloading = "unloading"
    failed = "failed"


class ModelStatus(_Wire):
    id: str
    key: str = Field(description="model_key(id): the subject token.")
    state: ModelState
    device: str
    memory_mb: int = 0
    in_flight: int = 0
    queued: int = 0
    last_used: float | None = None
    error: str | None = None


class Heartbeat(_Wire):
    v: int = PROTOCOL_VERSION
    node: str
    version: str
    started_at: float
    sent_at: float
    interval_s: float
    draining: bool = False
    max_batch: int
    max_queue: int
    devices: list[DeviceInfo]
    models: list[ModelStatus]


# --- control service (nats.micro `neuron`, subjects <prefix>.node.<node>.<verb>) -----------------


class ModelSpec(_Wire):
    """What a neuron needs to load a model: one catalogue entry."""

    id: str
    source: str = Field(description="`hf:org/name[@rev]`, `file:/path`, or `pkg:<package>/<file>`.")
    aliases: list[str] = Field(default_factory=list)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    quant: str | None = Field(None, description="GGUF file selector when the source holds several.")
    context: int | None = Field(None, ge=16, description="Context length cap; the model's own if unset.")
    temperature: float | None = Field(
        None, ge=0.0, le=2.0, description="Used when a request sets none; else the model's generation config, else 1."
    )
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Used when a request sets none.")


class LoadRequest(_Wire):
    model: ModelSpec
    device: str | None = Field(None, description="`cpu` or `cuda:N`; the freest device if unset.")
    wait: bool = Field(False, description="Answer only once the load has finished (or failed).")


class UnloadRequest(_Wire):
    model: str


class CancelRequest(_Wire):
    job_id: str


class ModelReply(_Wire):
    model: ModelStatus


class CancelReply(_Wire):
    job_id: str
    found: bool


class JobStatus(_Wire):
    job_id: str
    request_id: str
    model: str
    state: Literal["queued", "running"]
    generated_tokens: int


class StatusReply(_Wire):
    heartbeat: Heartbeat
    jobs: list[JobStatus]


class ServiceErrorBody(_Wire):
    """Body of a control reply that failed; the `Nats-Service-Error-Code` header carries the status."""

    code: ErrorCode
    message: str


# --- fleet events (<prefix>.events.<kind>) -----------------------------------------------------------


class FleetEvent(_Wire):
    kind: Literal["loaded", "unloaded", "load_failed", "node_up", "node_draining", "node_down"]
    node: str
    model: str | None = None
    detail: str | None = None
    at: float = Field(default_factory=time.time)
