"""Config plumbing shared by gateway and neuron: TOML file, then env vars, then CLI flags.

Env vars are `<PREFIX>_<FIELD>`, with `__` between nested fields:
`NEURON_NATS__SERVERS='["nats://a:4222"]'`, `CORTEX_GATEWAY__LISTEN=0.0.0.0:31313`.
A value that starts with `[` or `{` is read as JSON.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cortex.protocol.subjects import DEFAULT_PREFIX

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    pass


# Env vars that share a prefix with the settings but belong to the admin commands (`cortex load
# --url`, ...). Any other unknown one is refused, so that a typo (CORTEX_NATS_PASSWORD for
# CORTEX_NATS__PASSWORD) is an error at start, not a puzzling failure later.
NOT_SETTINGS = frozenset({"CORTEX_URL", "CORTEX_ADMIN_KEY"})

DEFAULT_INBOX_PREFIX = "_INBOX"
# A subject token as nats-server reads one: no dots, wildcards or white space.
_TOKEN_PATTERN = r"[^.*>\s]+"
_SUBJECT_PATTERN = rf"^{_TOKEN_PATTERN}(\.{_TOKEN_PATTERN})*$"


class NatsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    servers: list[str] = Field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    prefix: str = DEFAULT_PREFIX
    user: str | None = None
    password: str | None = None
    token: str | None = None
    credentials: Path | None = Field(None, description="A .creds file (JWT + nkey).")
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    kv_replicas: int = Field(
        1,
        ge=1,
        le=5,
        description="Replicas of the KV buckets cortex creates (an odd number up to the NATS cluster's size; "
        "3 on a 3-node cluster). Applies when a bucket is created, not to existing ones.",
    )
    inbox_prefix: str | None = Field(
        None,
        pattern=_SUBJECT_PATTERN,
        description="Subjects this client's replies come to (`<inbox_prefix>.<unique>`). Default: "
        "`_INBOX.<user>` when `user` is a single subject token, else `_INBOX`. deploy/nats/accounts.conf lets "
        "each user read only its own `_INBOX.<user>.>`.",
    )

    def effective_inbox_prefix(self) -> str:
        if self.inbox_prefix:
            return self.inbox_prefix
        # Per user by default, so that a server whose users each read only their own inbox (as
        # deploy/nats does) needs nothing more in the clients' configs than the user.
        if self.user and re.fullmatch(_TOKEN_PATTERN, self.user):
            return f"{DEFAULT_INBOX_PREFIX}.{self.user}"
        return DEFAULT_INBOX_PREFIX

    def connect_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"inbox_prefix": self.effective_inbox_prefix()}
        if self.user:
            options["user"], options["password"] = self.user, self.password
        if self.token:
            options["token"] = self.token
        if self.credentials:
            options["user_credentials"] = str(self.credentials)
        if self.tls_ca or self.tls_cert:
            import ssl

            context = ssl.create_default_context(cafile=str(self.tls_ca) if self.tls_ca else None)
            if self.tls_cert:
                context.load_cert_chain(str(self.tls_cert), str(self.tls_key) if self.tls_key else None)
            options["tls"] = context
        return options


def load_settings(cls: type[T], path: Path | None, env_prefix: str, **overrides: Any) -> T:
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for name, value in os.environ.items():
        if name.startswith(env_prefix + "_"):
            keys = name[len(env_prefix) + 1 :].lower().split("__")
            if name not in NOT_SETTINGS:
                _set(data, keys, _env_value(name, value))
    for name, value in overrides.items():
        if value is not None:
            _set(data, name.split("."), value)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        where = str(path) if path else "configuration"
        problems = "; ".join(f"`{'.'.join(str(p) for p in err['loc'])}`: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"{where}: {problems} (env vars {env_prefix}_... apply too)") from None


def _env_value(name: str, value: str) -> Any:
    if not value.startswith(("[", "{")):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise ConfigError(f'env var {name}: not valid JSON ({exc}); write lists as \'["a", "b"]\'') from None


def _set(data: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        data = data.setdefault(key, {})
    data[keys[-1]] = value


def is_loopback(host: str) -> bool:
    """An address (or `localhost`) reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_host_port(listen: str) -> tuple[str, int]:
    """`host:port` of a listen setting; an empty host means every interface."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)
