"""A nats.micro service with named endpoints: `nats micro ls` lists it, `nats req` asks it.

Handlers take the request's subject and body and return the reply body; a failure they answer
themselves is a `ServiceError`, which becomes a micro error (`Nats-Service-Error-Code`) with its
body, counted in the endpoint's stats as nats.go's micro counts every error reply.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from nats.micro import add_service as _add_service
from nats.micro.request import Request
from nats.micro.service import Service

from cortex.transport._natspy import count_endpoint_error
from cortex.transport.connection import Connection


@dataclass(frozen=True)
class ServiceRequest:
    subject: str
    data: bytes


class ServiceError(Exception):
    """An endpoint's answer that is an error: `status` goes in `Nats-Service-Error-Code`,
    `message` in `Nats-Service-Error`, and `data` is the reply body."""

    def __init__(self, status: int, message: str, data: bytes = b"") -> None:
        super().__init__(message)
        self.status, self.message, self.data = status, message, data


Handler = Callable[[ServiceRequest], Awaitable[bytes]]


@dataclass(frozen=True)
class Endpoint:
    name: str
    handler: Handler
    in_task: bool = False  # each request in its own task: a slow one does not hold up the next


class MicroService:
    """A started nats.micro service; `aclose()` stops it (safe twice)."""

    def __init__(self, service: Service) -> None:
        self._service = service
        self._running: set[asyncio.Task[None]] = set()

    async def aclose(self) -> None:
        await self._service.stop()  # nats-py's stop returns at once once stopped

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def _serve(self, endpoint: Endpoint) -> Callable[[Request], Awaitable[None]]:
        async def answer(request: Request) -> None:
            try:
                data = await endpoint.handler(ServiceRequest(request.subject, request.data or b""))
            except ServiceError as exc:
                count_endpoint_error(self._service, request.subject, exc.status, exc.message)
                await request.respond_error(str(exc.status), exc.message, data=exc.data)
            else:
                await request.respond(data)

        if not endpoint.in_task:
            return answer

        async def spawn(request: Request) -> None:
            task = asyncio.create_task(answer(request))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

        return spawn


async def add_service(
    connection: Connection,
    *,
    name: str,
    version: str,
    description: str,
    metadata: dict[str, str],
    group: str,
    endpoints: Sequence[Endpoint],
) -> MicroService:
    """Starts a service whose endpoints answer on `<group>.<endpoint name>`."""
    service = await _add_service(
        connection.client,
        name=name,
        version=version,
        description=description,
        metadata=metadata,
        # nats-py sends `"data": null` for each endpoint's stats without a handler; natscli validates
        # `nats micro stats` / `info` replies against the micro schema, where `data` must be an object.
        stats_handler=lambda _: {},
    )
    micro = MicroService(service)
    nats_group = service.add_group(name=group)
    for endpoint in endpoints:
        await nats_group.add_endpoint(name=endpoint.name, handler=micro._serve(endpoint))
    return micro
