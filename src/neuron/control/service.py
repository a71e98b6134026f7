"""`neuron` nats.micro service: load, unload, status, cancel on `<prefix>.node.<node>.<verb>`.

`nats micro ls` lists every neuron; `nats req cortex.node.<node>.status ''` asks one.
Failures answer with a micro error (`Nats-Service-Error-Code`) and a ServiceErrorBody.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

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
from cortex.transport.connection import Connection
from cortex.transport.micro import Endpoint, MicroService, ServiceError, ServiceRequest, add_service
from neuron import __version__
from neuron.control.errors import VerbError

log = logging.getLogger(__name__)


class Controller(Protocol):
    async def load(self, request: LoadRequest) -> ModelStatus: ...
    async def unload(self, request: UnloadRequest) -> ModelStatus: ...
    def status(self) -> StatusReply: ...
    def cancel(self, request: CancelRequest) -> CancelReply: ...
    async def count(self, request: CountRequest) -> CountReply: ...


async def start_control(nc: Connection, node: str, subjects: Subjects, controller: Controller) -> MicroService:
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

    return await add_service(
        nc,
        name=CONTROL_SERVICE,
        version=__version__,
        description=f"cortex neuron on node {node}",
        metadata={"node": node},
        group=subjects.control_group(node),
        endpoints=[
            # Loads and unloads may take minutes; each runs in its own task so one does not hold up the next.
            Endpoint("load", _endpoint(LoadRequest, load), in_task=True),
            Endpoint("unload", _endpoint(UnloadRequest, unload), in_task=True),
            Endpoint("status", _endpoint(None, status)),
            Endpoint("cancel", _endpoint(CancelRequest, cancel)),
            Endpoint("count", _endpoint(CountRequest, count)),
        ],
    )


def _endpoint(
    body_type: type[BaseModel] | None, handle: Callable[..., Awaitable[BaseModel]]
) -> Callable[[ServiceRequest], Awaitable[bytes]]:
    async def handler(request: ServiceRequest) -> bytes:
        try:
            body = body_type.model_validate_json(request.data or b"{}") if body_type else None
            reply = await handle(body)
        except ValidationError as exc:
            raise _error(400, ErrorCode.invalid_request, f"invalid request: {exc}") from exc
        except VerbError as exc:
            raise _error(exc.status, exc.code, exc.message, exc.refusal) from exc
        except Exception as exc:  # the caller waits for an answer: give it one, and keep serving
            log.exception("%s failed", request.subject)
            raise _error(500, ErrorCode.internal, f"{type(exc).__name__}: {exc}") from exc
        return reply.model_dump_json(exclude_none=True).encode()

    return handler


def _error(status: int, code: ErrorCode, message: str, refusal: Refusal | None = None) -> ServiceError:
    return ServiceError(status, message, ServiceErrorBody(code=code, message=message, refusal=refusal).to_bytes())
