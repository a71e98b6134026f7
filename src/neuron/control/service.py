"""`neuron` nats.micro service: load, unload, status, cancel on `<prefix>.node.<node>.<verb>`.

`nats micro ls` lists every neuron; `nats req cortex.node.<node>.status ''` asks one.
Failures answer with a micro error (`Nats-Service-Error-Code`) and a ServiceErrorBody.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service
from pydantic import BaseModel, ValidationError

from cortex.protocol.errors import ErrorCode
from cortex.protocol.messages import (
    CancelReply,
    CancelRequest,
    CountReply,
    CountRequest,
    LoadRequest,
    ModelReply,
    ModelStatus,
    Refusal,
    ServiceErrorBody,
    StatusReply,
    UnloadRequest,
)
from cortex.protocol.subjects import CONTROL_SERVICE, Subjects
from neuron import __version__

log = logging.getLogger(__name__)


class ControlError(Exception):
    def __init__(self, status: int, code: ErrorCode, message: str, refusal: Refusal | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.refusal = status, code, message, refusal


class Controller(Protocol):
    async def load(self, request: LoadRequest) -> ModelStatus: ...
    async def unload(self, request: UnloadRequest) -> ModelStatus: ...
    def status(self) -> StatusReply: ...
    def cancel(self, request: CancelRequest) -> CancelReply: ...
    async def count(self, request: CountRequest) -> CountReply: ...


async def start_control(nc: Client, node: str, subjects: Subjects, controller: Controller) -> Service:
    service = await add_service(
        nc,
        name=CONTROL_SERVICE,
        version=__version__,
        description=f"cortex neuron on node {node}",
        metadata={"node": node},
        # nats-py sends `"data": null` for each endpoint's stats without a handler; natscli validates
        # `nats micro stats` / `info` replies against the micro schema, where `data` must be an object.
        stats_handler=lambda _: {},
    )
    group = service.add_group(name=subjects.control_group(node))
    errors = _ErrorCounts(service)

    async def load(body: LoadRequest) -> BaseModel:
        return ModelReply(model=await controller.load(body))

    async def unload(body: UnloadRequest) -> BaseModel:
        return ModelReply(model=await controller.unload(body))

    async def status(_: BaseModel) -> BaseModel:
        return controller.status()

    async def cancel(body: CancelRequest) -> BaseModel:
        return controller.cancel(body)

    async def count(body: CountRequest) -> BaseModel:
        return await controller.count(body)

    # Loads and unloads may take minutes; each runs in its own task so one does not hold up the next.
    await group.add_endpoint(name="load", handler=_in_task(_endpoint(LoadRequest, load, errors)))
    await group.add_endpoint(name="unload", handler=_in_task(_endpoint(UnloadRequest, unload, errors)))
    await group.add_endpoint(name="status", handler=_endpoint(None, status, errors))
    await group.add_endpoint(name="cancel", handler=_endpoint(CancelRequest, cancel, errors))
    await group.add_endpoint(name="count", handler=_endpoint(CountRequest, count, errors))
    return service


_running: set[asyncio.Task[None]] = set()


class _ErrorCounts:
    """Counts error replies in the endpoint stats that `nats micro stats` / `info` show.

    nats-py's micro counts an error only when a handler raises, and then answers with an empty body;
    ours answer errors themselves, with a ServiceErrorBody, so they count them here, as nats.go's micro
    does for every error reply. nats-py has no public handle on an endpoint's stats, hence the private
    fields.
    """

    def __init__(self, service: Service) -> None:
        self._service = service

    def add(self, subject: str, status: int, message: str) -> None:
        try:
            for endpoint in self._service._endpoints:
                if endpoint._subject == subject:
                    endpoint._num_errors += 1
                    endpoint._last_error = f"{status}:{message}"
        except AttributeError:  # a nats-py that renamed them: the stats undercount, the reply still goes out
            log.debug("cannot count an error in the micro stats of %s", subject)


def _in_task(handler: Callable[[Request], Awaitable[None]]) -> Callable[[Request], Awaitable[None]]:
    async def spawn(request: Request) -> None:
        task = asyncio.create_task(handler(request))
        _running.add(task)
        task.add_done_callback(_running.discard)

    return spawn


def _endpoint(
    body_type: type[BaseModel] | None, handle: Callable[..., Awaitable[BaseModel]], errors: _ErrorCounts
) -> Callable[[Request], Awaitable[None]]:
    async def handler(request: Request) -> None:
        try:
            body = body_type.model_validate_json(request.data or b"{}") if body_type else None
            reply = await handle(body)
        except ValidationError as exc:
            await _error(request, errors, 400, ErrorCode.invalid_request, f"invalid request: {exc}")
        except ControlError as exc:
            await _error(request, errors, exc.status, exc.code, exc.message, exc.refusal)
        except Exception as exc:  # the caller waits for an answer: give it one, and keep serving
            log.exception("%s failed", request.subject)
            await _error(request, errors, 500, ErrorCode.internal, f"{type(exc).__name__}: {exc}")
        else:
            await request.respond(reply.model_dump_json(exclude_none=True).encode())

    return handler


async def _error(
    request: Request,
    errors: _ErrorCounts,
    status: int,
    code: ErrorCode,
    message: str,
    refusal: Refusal | None = None,
) -> None:
    errors.add(request.subject, status, message)
    body = ServiceErrorBody(code=code, message=message, refusal=refusal).to_bytes()
    await request.respond_error(str(status), message, data=body)
