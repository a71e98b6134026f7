"""Who may call: API keys for /v1 (each with the models it may use), admin keys for /admin.

A key is read from `Authorization: Bearer <key>` or `x-api-key: <key>` (OpenAI's SDK sends the
first, Anthropic's the second; either works on both dialects). Keys are kept and compared as
SHA-256 digests, every one of them each time and in constant time, so neither the answer nor its
timing tells how close a guess was. Logs, metrics and errors name a key by its `name`; the key
itself is never logged or echoed.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase

from fastapi import Request

from cortex.config.gateway import AuthSection, key_sha256
from cortex.gateway.errors import anthropic_path
from cortex.protocol.errors import CortexError, ErrorCode
from cortex.telemetry import logs


@dataclass(frozen=True)
class Caller:
    """Whoever presented a key (or anyone, while no API key is configured)."""

    name: str
    models: tuple[str, ...] = ("*",)
    admin: bool = False

    def may_use(self, names: Iterable[str]) -> bool:
        """`names`: a model's id and aliases; one matching one of the key's patterns is enough."""
        return self.admin or any(fnmatchcase(name, pattern) for name in names for pattern in self.models)

    @property
    def restricted(self) -> bool:
        """Kept to some models: then it is not told which other models exist."""
        return not self.admin and "*" not in self.models


ANYONE = Caller("")


class Keyring:
    def __init__(self, auth: AuthSection) -> None:
        self._entries: list[tuple[bytes, Caller]] = [
            (bytes.fromhex(key_sha256(key)), Caller("admin", admin=True)) for key in auth.admin_keys
        ]
        for entry in auth.keys:
            self._entries.append((bytes.fromhex(entry.digest), Caller(entry.name, tuple(entry.models), entry.admin)))
        # Admin keys alone leave /v1 open, as before any API key existed.
        self.open = not auth.keys
        self.has_admin = any(caller.admin for _, caller in self._entries)

    def find(self, key: str) -> Caller | None:
        given, found = bytes.fromhex(key_sha256(key)), None
        for digest, caller in self._entries:  # no early exit: every guess costs the same
            if hmac.compare_digest(given, digest) and found is None:
                found = caller
        return found


def presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    bearer = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    return bearer or request.headers.get("x-api-key") or None


def _how(request: Request) -> str:
    return "`x-api-key: <key>`" if anthropic_path(request) else "`Authorization: Bearer <key>`"


def keyring(request: Request) -> Keyring:
    ring: Keyring = request.app.state.keyring  # build_app's: needed before, and without, any NATS work
    return ring


async def authenticate(request: Request) -> Caller:
    """Dependency of every /v1 route: the caller, or 401 in the dialect's envelope."""
    ring = keyring(request)
    key = presented_key(request)
    if not key and not ring.open:
        raise CortexError(f"this gateway needs an API key: send it as {_how(request)}", code=ErrorCode.unauthorized)
    who = ring.find(key) if key else None
    if who is None and ring.open:
        # With no API keys configured, clients send placeholders ("unused", "sk-no-key"); only an
        # admin key means anything then.
        who = ANYONE
    if who is None:
        raise CortexError(
            "the API key is not valid: check the key you were given "
            "(the gateway's [[auth.keys]] in cortex.toml lists the valid ones)",
            code=ErrorCode.unauthorized,
        )
    request.state.caller = who
    logs.api_key.set(who.name or None)
    return who


def caller(request: Request) -> Caller:
    return getattr(request.state, "caller", ANYONE)


def may_use(request: Request, names: Iterable[str]) -> bool:
    """Whether the caller's key may use a model (`names`: its id and aliases)."""
    return caller(request).may_use(names)


def forbidden(request: Request, model: str) -> CortexError:
    who = caller(request)
    return CortexError(
        f"the API key `{who.name}` may not use the model `{model}`; "
        f"it may use: {', '.join(who.models)}. Ask for a key that includes it",
        code=ErrorCode.forbidden,
    )


def check_model(request: Request, model_id: str, names: Iterable[str]) -> None:
    """403 unless the caller's key may use the model."""
    if not may_use(request, names):
        raise forbidden(request, model_id)
