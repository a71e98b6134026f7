"""[nats]: where a gateway, a neuron or `cortex status` finds NATS, and how it signs in."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cortex.protocol.subjects import DEFAULT_PREFIX

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
