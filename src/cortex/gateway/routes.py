"""HTTP endpoints: parse, translate, dispatch, respond. The work lives elsewhere."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from cortex.dialects import openai
from cortex.gateway.service import Gateway
from cortex.gateway.streaming import (
    ClientGone,
    Outcome,
    ServedJob,
    ServedStreamResponse,
    collect,
    stream_chat,
    unless_disconnected,
)
from cortex.protocol.errors import CortexError, ModelNotFound

router = APIRouter()


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


def _request_id(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    request.state.request_id = given[:128] if given.isprintable() and given else uuid.uuid4().hex
    return request.state.request_id


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    gw = _gateway(request)
    body = {
        "status": "ok" if gw.connected else "nats_disconnected",
        "nodes": len(gw.fleet.nodes()),
        "models": sorted(gw.fleet.ready_models()),
    }
    return JSONResponse(body, status_code=200 if gw.connected else 503)


def _model_entry(gw: Gateway, model_id: str, nodes: list[str]) -> dict[str, Any]:
    spec = gw.catalogue.resolve(model_id)
    return {
        "id": model_id,
        "object": "model",
        "created": 0,
        "owned_by": "cortex",
        "aliases": spec.aliases if spec else [],
        "nodes": sorted(nodes),
    }


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    gw = _gateway(request)
    ready = gw.fleet.ready_models()
    return JSONResponse({"object": "list", "data": [_model_entry(gw, m, ready[m]) for m in sorted(ready)]})


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request) -> JSONResponse:
    gw = _gateway(request)
    model_id = gw.resolve_model(model)
    ready = gw.fleet.ready_models()
    if model_id not in ready:
        raise ModelNotFound(f"the model `{model}` is not loaded on any node right now")
    return JSONResponse(_model_entry(gw, model_id, ready[model_id]))


@router.post("/v1/chat/completions")
async def chat_completions(body: openai.ChatCompletionRequest, request: Request) -> Response:
    gw = _gateway(request)
    assert gw.dispatcher is not None
    request_id = _request_id(request)
    model_id = gw.resolve_model(body.model)
    job_id = uuid.uuid4().hex
    job = openai.to_job(body, model_id, job_id=job_id, request_id=request_id)
    outcome = Outcome(model=model_id, api="openai.chat", request_id=request_id)
    headers = {"x-request-id": request_id}
    try:
        opened = await unless_disconnected(request, gw.dispatcher.open(job))
    except CortexError as exc:
        outcome.failed(exc.code)
        outcome.record(gw.metrics, "none")
        raise
    except ClientGone:
        outcome.status = "499"
        outcome.record(gw.metrics, "none")
        return Response(status_code=499)
    served = ServedJob(opened, outcome, gw.metrics)
    completion_id = f"chatcmpl-{job_id}"
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        writer = openai.ChunkWriter(completion_id, model_id, include_usage)
        return ServedStreamResponse(
            served,
            stream_chat(served, writer),
            media_type="text/event-stream",
            headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        text, done = await unless_disconnected(request, collect(served))
    except ClientGone:
        return Response(status_code=499)
    return JSONResponse(openai.completion(completion_id, model_id, text, done), headers=headers)
