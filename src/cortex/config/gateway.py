"""cortex.toml: where the gateway listens, where NATS is, which catalogue it serves."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cortex.config.loading import load_settings
from cortex.config.nats_settings import NatsSettings
from cortex.telemetry.logs import LogFormat


class GatewaySection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    listen: str = "127.0.0.1:31313"
    metrics_listen: str | None = Field("127.0.0.1:31314", description="Prometheus /metrics; unset to disable.")
    accept_timeout: float = Field(5.0, gt=0, description="Seconds a neuron has to accept a job.")
    idle_timeout: float = Field(120.0, gt=0, description="Seconds a running job may stay silent.")
    reconnect_wait: float = Field(
        8.0,
        ge=0,
        description="Seconds a request that arrives while the gateway reconnects to NATS waits for the "
        "connection before it is refused (503 + Retry-After): longer than a server restart takes.",
    )
    load_timeout: float = Field(600.0, gt=0, description="Seconds a request waits for its model's cold load.")
    keepalive_interval: float = Field(5.0, gt=0, description="Seconds between SSE comments while a stream waits.")
    routing: Literal["cache_aware", "least_loaded"] = Field(
        "cache_aware",
        description="`cache_aware`: a conversation goes back to the node holding its prompt warm (unless that node "
        "has 4 jobs more than the least loaded); `least_loaded`: the least loaded holder, always.",
    )
    responses_ttl: float = Field(
        30 * 86400.0,
        gt=0,
        description="Seconds a stored /v1/responses response is kept (the KV bucket's max age, set when created).",
    )
    shutdown_timeout: float = Field(
        30.0, ge=0, description="On SIGTERM, seconds open requests may finish; then they are cut, their jobs cancelled."
    )


class EvictionSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    strategy: Literal["lru", "priority"] = Field("lru", description="Which idle model makes room first.")
    unload_timeout: float = Field(
        60.0, gt=0, description="Seconds an eviction may take (the node drains the model's jobs first)."
    )


def key_sha256(key: str) -> str:
    """How a key is kept and compared: its SHA-256, in hex."""
    return hashlib.sha256(key.encode()).hexdigest()


# Names a key in logs, metrics and errors, where the key itself never appears.
KEY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"


class ApiKey(BaseModel):
    """One `[[auth.keys]]` entry: a key, the models it may use, and whether it may use /admin."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=KEY_NAME_PATTERN, description="Names the key in logs and errors (never the key).")
    key: str | None = Field(None, min_length=16, repr=False, description="The key itself (16+ characters).")
    key_sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        repr=False,
        description="Or its SHA-256 in hex, so the config holds no secret (`cortex key new` prints both).",
    )
    models: list[str] = Field(
        default_factory=lambda: ["*"],
        min_length=1,
        description="Catalogue ids or aliases it may use; `*` and `?` match as in file names (`Qwen/*`).",
    )
    admin: bool = Field(False, description="Also an admin key (every model, and /admin/*).")

    @model_validator(mode="after")
    def _one_secret(self) -> ApiKey:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError(f"key `{self.name}`: set exactly one of `key` and `key_sha256`")
        return self

    @property
    def digest(self) -> str:
        return key_sha256(self.key) if self.key is not None else self.key_sha256 or ""


class AuthSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    admin_keys: list[Annotated[str, Field(min_length=16)]] = Field(
        default_factory=list,
        repr=False,
        description="Keys for /admin/* (16+ characters); with none, only clients on this machine may use it.",
    )
    keys: list[ApiKey] = Field(
        default_factory=list,
        description="API keys; with any set, every /v1 request needs one (`Authorization: Bearer` or `x-api-key`).",
    )

    @model_validator(mode="after")
    def _each_name_and_key_once(self) -> AuthSection:
        names = [k.name for k in self.keys]
        if twice := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"two [[auth.keys]] share the name {', '.join(twice)}; each needs its own")
        # One key in two entries would mean whichever comes first; say which, never the key.
        owners: dict[str, str] = {key_sha256(k): "an admin_keys entry" for k in self.admin_keys}
        for entry in self.keys:
            if (first := owners.setdefault(entry.digest, f"`{entry.name}`")) != f"`{entry.name}`":
                raise ValueError(f"[[auth.keys]] `{entry.name}` has the same key as {first}; give each its own key")
        return self


class CortexSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gateway: GatewaySection = Field(default_factory=GatewaySection)
    nats: NatsSettings = Field(default_factory=NatsSettings)
    eviction: EvictionSection = Field(default_factory=EvictionSection)
    auth: AuthSection = Field(default_factory=AuthSection)
    models_config: Path | None = Field(None, description="models.toml; the built-in catalogue if unset.")
    log_level: str = "INFO"
    log_format: LogFormat = Field("text", description="`json`: one JSON object per line, with the request id.")


def load(path: Path | None, **overrides: object) -> CortexSettings:
    return load_settings(CortexSettings, path, "CORTEX", **overrides)
