"""Every message cortex and neuron exchange over NATS, as versioned pydantic models.

`schemas/*.json` is generated from these (`cortex schemas`); a test fails when they drift.
"""

from __future__ import annotations

import time
import uuid
from enum import StrEnum
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, field_validator, model_validator

from cortex.protocol.errors import ErrorCode
from cortex.protocol.subjects import NODE_NAME_PATTERN

PROTOCOL_VERSION = 1

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """`90`, `90s`, `10m`, `1h`, `1d` -> seconds."""
    value = text.strip().lower()
    scale = _UNITS.get(value[-1:], None)
    try:
        return float(value[:-1] if scale else value) * (scale or 1)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration; write seconds or a number with s, m, h or d") from None


class _Wire(BaseModel):
    # Unknown fields are ignored so an older peer can read a newer peer's messages.
    model_config = ConfigDict(extra="ignore")

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


# --- the job -------------------------------------------------------------------------------


class ToolCall(_Wire):
    """A call the model made (in an assistant message of the history, or parsed from its output)."""

    id: str
    name: str
    arguments: str = Field(description="The arguments as JSON text, as the model wrote them.")


class ChatMessage(_Wire):
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="On assistant messages: the calls it made.")
    tool_call_id: str | None = Field(None, description="On tool messages: the call this is the result of.")


class Tool(_Wire):
    """A function the model may call; `parameters` is a JSON schema."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool = Field(False, description="Calls to it are decoded constrained to `parameters`.")


class NamedTool(_Wire):
    name: str


ToolChoice = Literal["auto", "none", "required"] | NamedTool


class OutputFormat(_Wire):
    """The answer's text (not its reasoning, not tool calls) is decoded constrained to JSON."""

    type: Literal["json_object", "json_schema"]
    json_schema: dict[str, Any] | None = Field(
        None, description="With type json_schema: the JSON Schema the answer must match."
    )
    name: str | None = Field(None, description="The schema's name, as the client gave it (for error messages).")


class SamplingParams(_Wire):
    max_tokens: int = Field(256, ge=1, description="Most tokens to generate.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy; unset: the model's default.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Unset: the model's default.")
    top_k: int | None = Field(None, ge=1)
    seed: int | None = Field(None, description="Same seed, same job, same device: same output.")
    stop: list[str] = Field(default_factory=list, max_length=16)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = Field(None, description="Token id -> bias added to its logit (-100..100).")
    logprobs: int | None = Field(
        None, ge=0, le=20, description="Report each token's log probability and this many alternatives."
    )


class InferenceJob(_Wire):
    """The normalized request, published on `<prefix>.infer.<model_key>` (any holder), or on
    `<prefix>.node.<node>.infer.<model_key>` (one node)."""

    v: int = PROTOCOL_VERSION
    # Generated when absent, so an operator can type a job by hand (`nats req cortex.infer.<key> ...`).
    job_id: str = Field(default_factory=lambda: uuid.uuid4().hex, description="Unique per job; a uuid4 hex if unset.")
    request_id: str = Field(
        default_factory=lambda: uuid.uuid4().hex, description="The client request it serves; a uuid4 hex if unset."
    )
    model: str = Field(description="Catalogue id of the model (not an alias).")
    messages: list[ChatMessage] | None = None
    prompt: str | None = Field(None, description="Raw prompt, sent to the model without a chat template.")
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    tools: list[Tool] | None = Field(None, description="Rendered with the model's chat template; calls are parsed.")
    tool_choice: ToolChoice = Field(
        "auto", description="`required` or a named tool forces a call, decoded constrained to its `parameters`."
    )
    output_format: OutputFormat | None = Field(None, description="Constrain the answer's text to JSON.")
    parallel_tool_calls: bool = Field(True, description="False: the answer ends after its first call.")
    reasoning: bool | None = Field(
        None, description="Ask the chat template to think (or not); the model's default if unset."
    )
    continue_final: bool = Field(
        False, description="The last message is an assistant turn to continue (a prefill), not one to answer."
    )
    created_at: float = Field(default_factory=time.time, description="Unix time the gateway built it.")
    deadline: float | None = Field(None, description="Unix time after which the result is useless.")
    resume: list[int] | None = Field(
        None,
        description="A continuation: the token ids an earlier try of this job generated (the `ids` of its pieces) "
        "before its node was lost. The node reads them after the prompt, sends nothing for them (the client "
        "has their text) and generates what follows; usage counts them as generated.",
    )

    @model_validator(mode="after")
    def _one_input(self) -> InferenceJob:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a job carries exactly one of `messages` or `prompt`")
        return self


# --- events on the reply inbox ----------------------------------------------------------------


_IDS = "The ids of the generated tokens this piece covers (`tokens` of them): what a job's `resume` is made of."


class _Event(_Wire):
    job_id: str
    seq: int = Field(ge=0, description="0, 1, 2, ... with no gaps, per job.")


class Accepted(_Event):
    type: Literal["accepted"] = "accepted"
    node: str
    device: str
    queue_position: int = Field(0, description="Jobs ahead of this one for the same model; 0 = running.")
    alive_every_s: float | None = Field(
        None,
        description="Until the job ends, the node sends an event at least this often (an `alive` when it has "
        "nothing else to say): a longer silence means the node is lost. Unset: no such promise.",
    )


class Alive(_Event):
    """Nothing new for a while (queued, or a long prompt going in): the node still has the job."""

    type: Literal["alive"] = "alive"


class TopLogprob(_Wire):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class Delta(_Event):
    type: Literal["delta"] = "delta"
    text: str
    tokens: int = Field(description="Generated tokens this piece of text covers.")
    ids: list[int] = Field(default_factory=list, description=_IDS)
    logprobs: list[TokenLogprob] | None = Field(None, description="When the job asked: one per token covered.")


class ReasoningDelta(_Event):
    """Text the model wrote inside its reasoning (`<think>`), not part of the answer."""

    type: Literal["reasoning"] = "reasoning"
    text: str
    tokens: int
    ids: list[int] = Field(default_factory=list, description=_IDS)


class ToolCallDelta(_Event):
    """Part of a tool call: the first for an `index` carries `id` and `name`, later ones argument text.

    The `arguments` fragments of one index, joined, are the call's arguments as JSON text.
    """

    type: Literal["tool_call"] = "tool_call"
    index: int = Field(ge=0)
    id: str | None = None
    name: str | None = None
    arguments: str = ""
    tokens: int = 0
    ids: list[int] = Field(default_factory=list, description=_IDS)


class Usage(_Wire):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = Field(
        0, ge=0, description="Of prompt_tokens, those read from the node's prefix cache instead of computed."
    )

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
    finish_reason: Literal["stop", "length", "tool_calls", "cancelled"]
    stop_sequence: str | None = Field(None, description="The stop sequence that ended it, if one did.")
    usage: Usage
    timings: Timings


class Failed(_Event):
    type: Literal["error"] = "error"
    code: ErrorCode
    message: str
    retryable: bool = False


JobEvent = Annotated[
    Accepted | Alive | Delta | ReasoningDelta | ToolCallDelta | Done | Failed, Field(discriminator="type")
]
JOB_EVENT: TypeAdapter[Accepted | Alive | Delta | ReasoningDelta | ToolCallDelta | Done | Failed] = TypeAdapter(
    JobEvent
)


# --- heartbeat (KV cortex_nodes, key = node) -----------------------------------------------------


class DeviceInfo(_Wire):
    id: str = Field(description="`cpu` or `cuda:N`.")
    kind: Literal["cpu", "cuda"]
    name: str
    total_mb: int = Field(
        description="Memory models may use here: the declared budget, or the device's total less the reserve."
    )
    free_mb: int = Field(description="What is left of total_mb now (never more than the device really has free).")


class ModelState(StrEnum):
    loading = "loading"
    ready = "ready"
    unloading = "unloading"
    failed = "failed"


class Refusal(_Wire):
    """Why a model cannot be loaded, found before anything was allocated (preflight)."""

    kind: Literal[
        "source_missing",
        "source_empty",
        "source_invalid",
        "quant_not_found",
        "quant_ambiguous",
        "quant_unsupported",
        "gguf_multi_device",
        "engine_unavailable",
        "engine_unsupported",
        "not_enough_devices",
        "insufficient_memory",
    ]
    model: str
    detail: str
    suggestion: str | None = None

    def log_fields(self) -> str:
        """The one log line a refusal gets, on whichever side meets it."""
        return f"reason={self.kind} detail={self.detail}"


class PrefixCacheStatus(_Wire):
    """What a loaded model keeps of past prompts (inside its KV budget: `memory_mb` already counts it)."""

    tokens: int = Field(0, ge=0, description="Tokens whose keys and values are kept for reuse.")
    mb: float = Field(0.0, ge=0.0, description="The memory they take.")
    prompt_tokens: int = Field(0, ge=0, description="Prompt tokens of the jobs started since the model loaded.")
    reused_tokens: int = Field(0, ge=0, description="Of those, the tokens read from the cache.")
    hit_rate: float = Field(0.0, ge=0.0, le=1.0, description="reused_tokens / prompt_tokens.")
    prefixes: list[str] = Field(
        default_factory=list,
        description="Fingerprints (cortex.protocol.prefix) of the conversations it holds warm, newest first.",
    )


class ModelStatus(_Wire):
    id: str
    key: str = Field(description="model_key(id): the subject token.")
    state: ModelState
    since: float = Field(0.0, description="Unix time (the node's clock) it entered this state.")
    device: str = Field(description="The (first) device it is on.")
    devices: list[str] = Field(default_factory=list, description="Every device it spans, when more than one.")
    memory_mb: int = Field(0, description="Measured once loaded (weights + KV budget); the estimate while loading.")
    engine: Literal["transformers", "llama.cpp"] | None = Field(None, description="What runs it here.")
    parallel: int | None = Field(None, description="Jobs it decodes at once; more wait in the node's queue (`queued`).")
    in_flight: int = 0
    queued: int = 0
    tokens_per_s: float = Field(0.0, ge=0.0, description="Tokens it generated per second over the last few seconds.")
    last_used: float | None = None
    pinned: bool = False
    priority: int = 0
    phase: Literal["download", "load"] | None = Field(None, description="While loading: what it is doing.")
    progress: float | None = Field(None, ge=0.0, le=1.0, description="While downloading: the fraction done.")
    error: str | None = None
    refusal: Refusal | None = None
    prefix_cache: PrefixCacheStatus | None = Field(None, description="Its prompt cache, once loaded.")


class Estimate(_Wire):
    """Memory a catalogue model would take on this node, from its files' metadata, before loading it."""

    model: str
    memory_mb: int | None = Field(None, description="Weights at the dtype this node would use, plus the KV budget.")
    weights_mb: int | None = None
    kv_mb: int | None = Field(None, description="KV cache for `context` tokens x the node's max_batch sequences.")
    format: Literal["gguf", "safetensors", "other"] | None = None
    engine: Literal["transformers", "llama.cpp"] | None = None
    measured: bool = Field(False, description="memory_mb is what the model took when last loaded here.")
    refusal: Refusal | None = None


class Heartbeat(_Wire):
    v: int = PROTOCOL_VERSION
    node: str
    version: str
    started_at: float
    sent_at: float
    interval_s: float
    draining: bool = False
    stalled: bool = Field(
        False,
        description="Its running jobs stopped making progress (a decode step many times its usual length): "
        "gateways send it no new work until it is false again.",
    )
    max_batch: int
    max_queue: int
    devices: list[DeviceInfo]
    models: list[ModelStatus]
    _estimates_index: tuple[list[Estimate], dict[str, Estimate]] | None = PrivateAttr(None)
    estimates: list[Estimate] = Field(
        default_factory=list,
        description="Older neurons sent their estimates here; they now have their own key (`NodeEstimates`), "
        "and a gateway's view fills this in from it.",
    )

    def to_bytes(self) -> bytes:
        # Every node sends one every couple of seconds, so fields at their defaults are left out
        # (a reader fills them in); `v` never is.
        rest = self.model_dump_json(exclude_none=True, exclude_defaults=True, exclude={"v"})
        return f'{{"v":{self.v},{rest[1:]}'.encode()

    @property
    def takes_work(self) -> bool:
        """Whether gateways may send it jobs and loads: not stopping, and its jobs making progress."""
        return not self.draining and not self.stalled

    def estimate(self, model_id: str) -> Estimate | None:
        """Its estimate for a catalogue model (a gateway listing the models asks for every catalogue
        model on every node, and there is one per catalogue model: indexed once per list)."""
        # Keyed by the list itself: a copy with other estimates (model_copy keeps private
        # attributes) must not read the old index.
        index = self._estimates_index
        if index is None or index[0] is not self.estimates:
            index = self._estimates_index = (self.estimates, {e.model: e for e in self.estimates})
        return index[1].get(model_id)

    def join(self, estimates: NodeEstimates) -> None:
        """Takes its node's estimates record (a gateway's view does, for each heartbeat), index and all:
        built once per record, not once per heartbeat."""
        self.estimates = estimates.estimates
        self._estimates_index = (estimates.estimates, estimates.by_model)


class NodeEstimates(_Wire):
    """A node's memory estimates, one per catalogue model it knows, in KV cortex_nodes under
    `<node>.estimates`: written when they change (and again well before their TTL), not with every
    heartbeat, whose size they would otherwise make (hundreds of bytes per catalogue model)."""

    v: int = PROTOCOL_VERSION
    node: str
    estimates: list[Estimate]

    @cached_property
    def by_model(self) -> dict[str, Estimate]:
        return {e.model: e for e in self.estimates}


# --- control service (nats.micro `neuron`, subjects <prefix>.node.<node>.<verb>) -----------------


class ModelSpec(_Wire):
    """What a neuron needs to load a model: one catalogue entry."""

    id: str
    source: str = Field(description="`hf:org/name[@rev]`, `file:/path`, or `pkg:<package>/<file>`.")
    aliases: list[str] = Field(default_factory=list)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    quant: str | None = Field(
        None,
        description="GGUF file selector (`Q4_K_M`) when the source holds several; for dense weights, "
        "`int8` or `int4` quantizes them in place on load.",
    )
    engine: Literal["auto", "transformers", "llama.cpp"] = Field(
        "auto", description="What runs it; `auto` picks llama.cpp for GGUF files where it is installed."
    )
    context: int | None = Field(None, ge=16, description="Context length cap; the model's own if unset.")
    memory_mb: int | None = Field(None, ge=1, description="Memory it takes, overriding the estimate.")
    devices: int = Field(1, ge=1, description="Devices of one node it spans (dense models only).")
    pinned_on: list[Annotated[str, Field(pattern=NODE_NAME_PATTERN)]] = Field(
        default_factory=list, description="Nodes that load it at start and never evict it."
    )
    priority: int = Field(0, description="Under the `priority` eviction strategy, lower goes first.")
    keep_alive: float | None = Field(
        None, gt=0, description="Seconds idle before it is unloaded (`10m`, `1h` accepted); never if unset."
    )

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        return parse_duration(value) if isinstance(value, str) else value

    temperature: float | None = Field(
        None, ge=0.0, le=2.0, description="Used when a request sets none; else the model's generation config, else 1."
    )
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Used when a request sets none.")
    tool_parser: Literal["auto", "hermes", "llama3", "mistral", "none"] = Field(
        "auto", description="How its output's tool calls are written; `auto` reads the chat template."
    )
    replay: str | None = Field(
        None, description="A JSON file of recorded outputs to replay instead of sampling (tests, demos)."
    )


class LoadRequest(_Wire):
    model: ModelSpec
    device: str | None = Field(None, description="`cpu` or `cuda:N`; the freest device(s) if unset.")
    wait: bool = Field(False, description="Answer only once the load has finished (or failed).")


UnloadReason = Literal["admin", "evicted", "keep_alive"]


class UnloadRequest(_Wire):
    model: str
    reason: UnloadReason = "admin"
    detail: str | None = Field(None, description="Why, for the event and the log (`for <model>`).")


class PlacementLease(_Wire):
    """KV `cortex_placement`, key model_key: one gateway is loading this model somewhere."""

    model: str
    node: str
    gateway: str
    at: float = Field(default_factory=time.time)


class CancelRequest(_Wire):
    job_id: str


class CountRequest(_Wire):
    """How many tokens these messages make as a prompt, through the model's own chat template."""

    model: str
    messages: list[ChatMessage]
    tools: list[Tool] | None = None


class CountReply(_Wire):
    model: str
    input_tokens: int


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
    refusal: Refusal | None = None


# --- fleet events (<prefix>.events.<kind>) -----------------------------------------------------------


EventKind = Literal[
    "loading",
    "loaded",
    "load_failed",
    "unloaded",
    "evicted",
    "pinned",
    "unpinned",
    "defrag",
    "node_up",
    "node_draining",
    "node_down",
    "job_lost",
]


class FleetEvent(_Wire):
    kind: EventKind
    node: str
    model: str | None = None
    job_id: str | None = Field(
        None, description="`job_lost`: a job the node can no longer answer (its events are refused)."
    )
    reason: str | None = Field(None, description="Why: `keep_alive`, `evicted`, a refusal kind, ...")
    detail: str | None = None
    at: float = Field(default_factory=time.time)


# --- stored responses (the Responses API) ------------------------------------------------------


class StoredResponse(_Wire):
    """One response of `/v1/responses` with `store: true`, under its id in the KV bucket
    `cortex_responses` (entries expire after the gateway's `responses_ttl`). Each holds only its own
    turn: a conversation is rebuilt by following `previous_response_id` back."""

    v: int = PROTOCOL_VERSION
    id: str
    previous_response_id: str | None = None
    messages: list[ChatMessage] = Field(
        description="This turn in the job's terms: its new input (without `instructions`), then the answer."
    )
    input_items: list[dict[str, Any]] = Field(description="This turn's input items, as `/input_items` lists them.")
    response: dict[str, Any] = Field(description="The response object, as `GET /v1/responses/{id}` returns it.")
