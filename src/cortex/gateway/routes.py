"""HTTP endpoints: parse, translate, dispatch, respond. The work lives elsewhere."""

from __future__ import annotations

import asyncio
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from cortex.dialects import openai
from cortex.gateway.catalogue_view import model_entry
from cortex.gateway.service import Gateway
from cortex.gateway.streaming import (
    ClientGone,
    ColdStart,
    Outcome,
    ServedJob,
    ServedStreamResponse,
    collect,
    stream_chat,
    unless_disconnected,
)
from cortex.protocol.errors import CortexError

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


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    gw = _gateway(request)
    ids = sorted({s.id for s in gw.catalogue.models} | gw.fleet.known_models())
    return JSONResponse({"object": "list", "data": [model_entry(gw, m) for m in ids]})


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request) -> JSONResponse:
    gw = _gateway(request)
    return JSONResponse(model_entry(gw, gw.resolve_model(model)))


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
    completion_id = f"chatcmpl-{job_id}"
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    writer = openai.ChunkWriter(completion_id, model_id, include_usage)
    stream_headers = {**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    try:
        pending = await gw.placer.prepare(model_id)
        if pending is not None and body.stream:
            cold = ColdStart(outcome, gw.metrics)
            content = cold.stream(
                pending,
                lambda: gw.dispatcher.open(job),
                lambda served: stream_chat(served, writer),
                gw.settings.gateway.keepalive_interval,
            )
            return ServedStreamResponse(cold, content, media_type="text/event-stream", headers=stream_headers)
        if pending is not None:
            await unless_disconnected(request, asyncio.shield(pending))
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
    if body.stream:
        return ServedStreamResponse(
            served, stream_chat(served, writer), media_type="text/event-stream", headers=stream_headers
        )
    try:
        text, done = await unless_disconnected(request, collect(served))
    except ClientGone:
        return Response(status_code=499)
    return JSONResponse(openai.completion(completion_id, model_id, text, done), headers=headers)
