"""`/admin/models/{load,unload,pin,unpin}`: operators move models by hand.

With an admin key configured (`[auth] admin_keys`, or a `[[auth.keys]]` entry with `admin = true`),
a request needs one (`Authorization: Bearer <key>` or `x-api-key`); with none, only clients on this
machine (loopback) are let in. Keys are checked as in `auth`: in constant time, never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from cortex.config.addresses import is_loopback
from cortex.gateway.auth import keyring, presented_key
from cortex.gateway.catalogue_view import model_entry
from cortex.gateway.service import Gateway, gateway_for
from cortex.placement.fleet import FleetView
from cortex.protocol.errors import CortexError, ErrorCode, InvalidRequest, ModelNotFound
from cortex.protocol.messages import LoadRequest, ModelReply, ModelSpec, ModelState, UnloadRequest
from cortex.protocol.subjects import NODE_NAME_PATTERN
from cortex.telemetry import logs

log = logging.getLogger(__name__)

_PIN_SEEN_TIMEOUT_S = 10.0


async def require_admin(request: Request) -> None:
    ring = keyring(request)
    if not ring.has_admin and not ring.open:
        # API keys guard /v1; a key holder (or anyone behind a local proxy) is not an operator.
        raise CortexError(
            "the admin API needs an admin key once [[auth.keys]] are configured; set [auth] admin_keys "
            "(or `admin = true` on a key) in cortex.toml and send one as `Authorization: Bearer <key>`",
            code=ErrorCode.forbidden,
        )
    if not ring.has_admin:
        if not is_loopback(request.client.host if request.client else ""):
            raise CortexError(
                "the admin API is open only to clients on the gateway's machine while no admin key is set; "
                "set [auth] admin_keys in cortex.toml and send one as `Authorization: Bearer <key>`",
                code=ErrorCode.forbidden,
            )
        return
    caller = ring.find(presented_key(request) or "")
    if caller is None:
        raise CortexError(
            "the admin API needs an admin key: send `Authorization: Bearer <key>` (or `x-api-key`)",
            code=ErrorCode.unauthorized,
        )
    logs.api_key.set(caller.name)
    if not caller.admin:
        raise CortexError(
            f"the API key `{caller.name}` is not an admin key; /admin needs one of [auth] admin_keys "
            "or a [[auth.keys]] entry with `admin = true`",
            code=ErrorCode.forbidden,
        )


router = APIRouter(prefix="/admin/models", dependencies=[Depends(require_admin)])


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="Catalogue id or alias.")


class LoadBody(_Body):
    node: str | None = Field(None, pattern=NODE_NAME_PATTERN, description="Load here; placement decides if unset.")
    device: str | None = Field(None, description="`cpu` or `cuda:N` on that node.")


class UnloadBody(_Body):
    node: str | None = Field(None, pattern=NODE_NAME_PATTERN, description="Only from this node; from all if unset.")


class PinBody(_Body):
    node: str = Field(pattern=NODE_NAME_PATTERN)


def _spec(gw: Gateway, name: str) -> ModelSpec:
    spec = gw.catalogue.resolve(name)
    if spec is None:
        raise ModelNotFound(f"`{name}` is not in the catalogue; add it to models.toml first")
    return spec


def _node(gw: Gateway, node: str) -> None:
    if node not in {hb.node for hb in gw.fleet.nodes()}:
        raise InvalidRequest(f"node `{node}` is not in the fleet; `cortex status` or GET /v1/models lists nodes")


@router.post("/load")
async def load(body: LoadBody, request: Request) -> JSONResponse:
    gw = gateway_for(request)
    spec = _spec(gw, body.model)
    if body.node is None:
        await gw.placer.place(spec.id)
    else:
        _node(gw, body.node)
        load_request = LoadRequest(model=spec, device=body.device, wait=True)
        timeout = gw.settings.gateway.load_timeout
        await gw.control.call(body.node, "load", load_request, ModelReply, timeout=timeout)
        with contextlib.suppress(TimeoutError):  # the node said ready; its heartbeat is on the way
            await gw.fleet.wait_for(lambda f: body.node in dict(f.statuses(spec.id, ModelState.ready)), 10)
    log.info("admin: loaded %s", spec.id)
    return JSONResponse(model_entry(gw.catalogue, gw.fleet, spec.id))


@router.post("/unload")
async def unload(body: UnloadBody, request: Request) -> JSONResponse:
    gw = gateway_for(request)
    model_id = gw.resolve_model(body.model)
    nodes = [n for n, _ in gw.fleet.statuses(model_id) if body.node in (None, n)]
    if not nodes:
        raise ModelNotFound(f"`{model_id}` is not loaded on {f'node {body.node}' if body.node else 'any node'}")
    request_body = UnloadRequest(model=model_id, reason="admin", detail="cortex unload")
    timeout = gw.settings.eviction.unload_timeout
    await asyncio.gather(*(gw.control.call(n, "unload", request_body, ModelReply, timeout=timeout) for n in nodes))
    log.info("admin: unloaded %s from %s", model_id, nodes)
    return JSONResponse({"model": model_id, "unloaded_from": sorted(nodes)})


@router.post("/pin")
async def pin(body: PinBody, request: Request) -> JSONResponse:
    gw = gateway_for(request)
    spec = _spec(gw, body.model)
    _node(gw, body.node)
    await gw.pins.pin(body.node, spec)
    log.info("admin: pinned %s on %s", spec.id, body.node)
    with contextlib.suppress(TimeoutError):  # the load itself may take longer; the pin stands
        await gw.fleet.wait_for(lambda f: _pinned_on(f, spec.id, body.node), _PIN_SEEN_TIMEOUT_S)
    return JSONResponse(model_entry(gw.catalogue, gw.fleet, spec.id))


def _pinned_on(fleet: FleetView, model_id: str, node: str) -> bool:
    return any(m.pinned for n, m in fleet.statuses(model_id) if n == node)


@router.post("/unpin")
async def unpin(body: PinBody, request: Request) -> JSONResponse:
    gw = gateway_for(request)
    spec = _spec(gw, body.model)
    if body.node in spec.pinned_on:
        raise InvalidRequest(
            f"{spec.id} is pinned on {body.node} by models.toml (`pinned_on`); remove it there and restart the neuron"
        )
    await gw.pins.unpin(body.node, spec.id)
    log.info("admin: unpinned %s on %s", spec.id, body.node)
    return JSONResponse({"model": spec.id, "node": body.node, "pinned": False})
