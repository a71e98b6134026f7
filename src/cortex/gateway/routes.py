"""HTTP endpoints: parse, translate, dispatch, respond. The work lives elsewhere."""

from __future__ import annotations

import asyncio
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from cortex.dialects import anthropic, openai
from cortex.gateway.catalogue_view import model_entry
from cortex.gateway.service import Gateway
from cortex.gateway.streaming import (
    AnswerWriter,
    ClientGone,
    ColdStart,
    Outcome,
    ServedJob,
    ServedStreamResponse,
    collect,
    stream_events,
    unless_disconnected,
)
from cortex.placement.policy import rank_holders
from cortex.protocol.errors import CortexError, NoCapacity
from cortex.protocol.messages import CountReply, CountRequest, InferenceJob
from cortex.telemetry import logs

router = APIRouter()


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


def _request_id(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    request.state.request_id = given[:128] if given.isprintable() and given else uuid.uuid4().hex
    logs.request_id.set(request.state.request_id)
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
    request_id = _request_id(request)
    model_id = gw.resolve_model(body.model)
    job = openai.to_job(body, model_id, job_id=uuid.uuid4().hex, request_id=request_id)
    writer = openai.ChunkWriter(f"chatcmpl-{job.job_id}", model_id, _include_usage(body.stream_options))
    return await _serve(request, gw, job, "openai.chat", writer, body.stream)


@router.post("/v1/completions")
async def completions(body: openai.CompletionRequest, request: Request) -> Response:
    gw = _gateway(request)
    request_id = _request_id(request)
    model_id = gw.resolve_model(body.model)
    job = openai.completion_to_job(body, model_id, job_id=uuid.uuid4().hex, request_id=request_id)
    echo = job.prompt if body.echo else None
    writer = openai.TextWriter(f"cmpl-{job.job_id}", model_id, _include_usage(body.stream_options), echo)
    return await _serve(request, gw, job, "openai.completions", writer, body.stream)


@router.post("/v1/messages")
async def messages(body: anthropic.MessagesRequest, request: Request) -> Response:
    gw = _gateway(request)
    request_id = _request_id(request)
    model_id = gw.resolve_model(body.model)
    job = anthropic.to_job(body, model_id, job_id=uuid.uuid4().hex, request_id=request_id)
    writer = anthropic.MessageWriter(anthropic.message_id(), model_id)
    return await _serve(request, gw, job, "anthropic.messages", writer, body.stream)


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: anthropic.CountTokensRequest, request: Request) -> JSONResponse:
    gw = _gateway(request)
    assert gw.placer is not None and gw.control is not None and gw.dispatcher is not None
    model_id = gw.resolve_model(body.model)
    messages = anthropic.to_messages(body)
    tools, _, _ = anthropic.to_tools(body)
    # The tokenizer and chat template live with the model, on a node that holds it.
    await unless_disconnected(request, gw.placer.place(model_id))
    holders = rank_holders(gw.fleet.holders(model_id), gw.dispatcher.usage.in_flight(model_id))
    if not holders:
        raise NoCapacity(f"{model_id} is not loaded on any node right now; retry")
    count = CountRequest(model=model_id, messages=messages, tools=tools)
    reply = await gw.control.call(holders[0], "count", count, CountReply)
    return JSONResponse({"input_tokens": reply.input_tokens}, headers={"x-request-id": _request_id(request)})


def _include_usage(options: openai.StreamOptions | None) -> bool:
    return bool(options and options.include_usage)


async def _serve(
    request: Request, gw: Gateway, job: InferenceJob, api: str, writer: AnswerWriter, stream: bool
) -> Response:
    """Places the model if need be, runs the job, and answers: a stream, or one body."""
    assert gw.dispatcher is not None and gw.placer is not None
    dispatcher, request_id = gw.dispatcher, job.request_id
    outcome = Outcome(model=job.model, api=api, request_id=request_id)
    request.state.counted = True  # from here the outcome counts errors, not the error handlers
    headers = {"x-request-id": request_id}
    stream_headers = {**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    try:
        pending = await gw.placer.prepare(job.model)
        if pending is not None and stream:
            cold = ColdStart(outcome, gw.metrics)
            content = cold.stream(
                pending,
                lambda: dispatcher.open(job),
                writer,
                gw.settings.gateway.keepalive_interval,
            )
            return ServedStreamResponse(cold, content, media_type="text/event-stream", headers=stream_headers)
        if pending is not None:
            await unless_disconnected(request, asyncio.shield(pending))
        opened = await unless_disconnected(request, dispatcher.open(job))
    except CortexError as exc:
        outcome.failed(exc.code)
        outcome.record(gw.metrics, "none")
        raise
    except ClientGone:
        outcome.client_left()
        outcome.record(gw.metrics, "none")
        return Response(status_code=499)
    served = ServedJob(opened, outcome, gw.metrics)
    if stream:
        return ServedStreamResponse(
            served, stream_events(served, writer), media_type="text/event-stream", headers=stream_headers
        )
    try:
        answer, done = await unless_disconnected(request, collect(served))
    except ClientGone:
        return Response(status_code=499)
    return JSONResponse(writer.response(answer, done), headers=headers)
