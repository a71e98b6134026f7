"""One NATS connection: its lifetime, and who hears that it came back or that a publish was refused.

`connect()` is the only way in. Modules outside `cortex.transport` hold a `Connection` and hand it
to the transport modules that need it; only those read `Connection.client` (a nats-py client).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

import nats
import nats.errors
from nats.aio.client import Client

from cortex.protocol.errors import TransportError
from cortex.transport.errors import map_nats_errors

log = logging.getLogger(__name__)

_REFUSED_PUBLISH = re.compile(r'permissions violation for publish to "([^"]+)"', re.IGNORECASE)


class _Listeners:
    """nats-py's callbacks for one client, and the listeners they call. Made before the client
    (nats.connect takes the callbacks), then owned by the Connection that wraps it."""

    def __init__(self) -> None:
        self.client: Client | None = None  # set once connected: before that, nothing is news
        self.reconnect: list[Callable[[], None]] = []
        # nats-py tells only the error callback of a refused publish, as text.
        self.refused: list[Callable[[str], None]] = []

    async def error(self, exc: Exception) -> None:
        if self.client is not None:  # before the first connection, connect()'s error says it once
            log.warning("nats: %s", exc)
        refused = _REFUSED_PUBLISH.search(str(exc))
        if refused and self.client is not None:
            for callback in list(self.refused):
                try:
                    callback(refused.group(1))
                except Exception:
                    log.exception("a refused-publish listener failed")

    async def disconnected(self) -> None:
        if not (self.client is not None and self.client.is_closed):  # a close we asked for is not news
            log.warning("nats: disconnected")

    async def reconnected(self) -> None:
        log.info("nats: reconnected")
        # Without this, watches would wait for their consumer's missed heartbeats (seconds) or,
        # on a server that came back empty, stay silent for good; and a node's key for its next beat.
        for callback in list(self.reconnect) if self.client is not None else ():
            try:
                callback()
            except Exception:
                log.exception("a reconnect listener failed")


def _listen(listeners: list[Any], callback: Any) -> Callable[[], None]:
    listeners.append(callback)

    def stop() -> None:
        with contextlib.suppress(ValueError):
            listeners.remove(callback)

    return stop


class Connection:
    """A connected nats-py client (reconnecting forever) and its listeners. Made by `connect()`."""

    def __init__(self, client: Client, listeners: _Listeners) -> None:
        self.client = client  # for cortex.transport's modules only
        self._listeners = listeners

    @property
    def is_connected(self) -> bool:
        return self.client.is_connected

    @property
    def max_payload(self) -> int:
        return self.client.max_payload

    def on_reconnect(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Calls `callback` (plain, quick: start a task for real work) each time the connection
        comes back. Returns a function that stops the calls."""
        return _listen(self._listeners.reconnect, callback)

    def on_refused_publish(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Calls `callback(subject)` (plain, quick) each time the server refuses a publish of ours
        (a permissions violation); nats-py reports the subject lowercased. Returns a function that
        stops the calls."""
        return _listen(self._listeners.refused, callback)

    async def publish(self, subject: str, data: bytes, *, what: str | None = None) -> None:
        """Publishes one message; raises `TransportError` (naming `what`) when NATS will not take it."""
        with map_nats_errors(what or f"publishing on {subject}"):
            await self.client.publish(subject, data)

    async def flush(self, timeout: int) -> None:
        """Waits until the server has everything published so far."""
        with map_nats_errors("flushing to NATS"):
            await self.client.flush(timeout=timeout)

    async def drain(self) -> None:
        """Lets subscriptions finish what they hold, then closes. Safe on a closed connection."""
        if not self.client.is_closed:
            with map_nats_errors("draining the NATS connection"):
                await self.client.drain()

    async def aclose(self) -> None:
        """Closes at once. Safe to call twice."""
        if not self.client.is_closed:
            await self.client.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


async def connect(
    servers: list[str], name: str, *, first_timeout: float = 10.0, fail_fast: bool = False, **options: Any
) -> Connection:
    """Connects, retrying for `first_timeout` seconds; once connected, reconnects forever.

    `fail_fast`: while reconnecting, a publish (and so a request) raises at once instead of
    waiting in nats-py's buffer for the server to come back: for a gateway, whose callers are
    HTTP clients better served by a quick 503 than by a request that hangs for its timeout.
    Without it (a neuron), a short outage loses nothing: a job's events wait and then go.
    """
    if fail_fast:
        options["pending_size"] = 0  # nats-py: no reconnect buffer, OutboundBufferLimitError instead
    listeners = _Listeners()
    try:
        client = await asyncio.wait_for(
            nats.connect(
                servers=servers,
                name=name,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                connect_timeout=5,
                error_cb=listeners.error,
                disconnected_cb=listeners.disconnected,
                reconnected_cb=listeners.reconnected,
                **options,
            ),
            first_timeout,
        )
    except TimeoutError:
        raise TransportError(
            f"cannot reach NATS at {', '.join(servers)} within {first_timeout:g}s: is nats-server running "
            "there? (`cortex up` starts one for development)"
        ) from None
    except nats.errors.Error as exc:
        raise TransportError(f"connecting to NATS at {', '.join(servers)} failed: {exc}") from exc
    listeners.client = client
    return Connection(client, listeners)
