"""HTTP endpoints: parse, translate, dispatch, respond. The work lives elsewhere."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic_core import from_json

from cortex.dialects import anthropic, openai, responses
from cortex.gateway import auth
from cortex.gateway.catalogue_view import model_entry
from cortex.gateway.exchange import exchange
from cortex.gateway.response_store import Keep, keeper
from cortex.gateway.service import Gateway, gateway_for
from cortex.gateway.streaming import (
    AnswerWriter,
    ClientGone,
    ServedJob,
    ServedStreamResponse,
    collect,
    stream_answer,
    unless_disconnected,
)
from cortex.protocol.errors import ErrorCode, InvalidRequest, ModelNotFound, NoCapacity
from cortex.protocol.messages import CountReply, CountRequest, InferenceJob, StoredResponse

router = APIRouter()
# Every /v1 route needs an API key once any is configured; the check comes before the body's.
v1 = APIRouter(prefix="/v1", dependencies=[Depends(auth.authenticate)])

# A `\\uD800`-`\\uDFFF` escape: half of a UTF-16 surrogate pair, which only pairs may use.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


# Documents, in /openapi.json, the statuses an inference endpoint may answer before its body, and the
# envelope each dialect answers them in (FastAPI would otherwise list its own 422 shape, which is never sent).
_ERROR_STATUSES = {
    400: "invalid request: bad JSON, a wrong or unknown field, a value out of range",
    401: "no API key, or one that is not valid (once [[auth.keys]] are configured)",
    403: "the API key may not use this model",
    404: "no such model",
    413: "the request is larger than NATS max_payload",
    422: "refused by preflight: the model cannot run as asked",
    429: "every node serving the model is busy",
    503: "no capacity, or NATS unreachable",
}
# With `"stream": true` the 200 is a server-sent event stream rather than one JSON body.
_STREAMED: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The answer: one JSON body, or with `stream: true` server-sent events",
        "content": {"text/event-stream": {"schema": {}}},
    }
}
_OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    **_STREAMED,
    **{status: {"model": openai.OpenAIError, "description": text} for status, text in _ERROR_STATUSES.items()},
}
_ANTHROPIC_ERRORS: dict[int | str, dict[str, Any]] = {
    **_STREAMED,
    **{status: {"model": anthropic.AnthropicError, "description": text} for status, text in _ERROR_STATUSES.items()},
}


async def _check_unicode(request: Request) -> None:
    """Refuses a body whose JSON escapes a lone surrogate: Python's JSON parser lets it through, but no
    text holding one can be encoded again, so the job could never be sent. The regex keeps the exact
    parse (jiter, which refuses lone surrogates) to the rare body that escapes a surrogate at all."""
    body = await request.body()  # Starlette keeps the body FastAPI already read: no second read
    if not _SURROGATE_ESCAPE.search(body):
        return
    try:
        from_json(body)
    except ValueError as exc:
        raise InvalidRequest(
            f"the request body holds a lone UTF-16 surrogate escape, which is not valid Unicode text: {exc}"
        ) from None


def _model(request: Request, gw: Gateway, name: str) -> str:
    """The model's id, once the caller's key may use it."""
    try:
        model_id = gw.resolve_model(name)
    except ModelNotFound:
        if auth.caller(request).restricted:  # a 404 would tell it which names exist
            raise auth.forbidden(request, name) from None
        raise
    auth.check_model(request, model_id, gw.model_names(model_id))
    return model_id


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    gw = gateway_for(request)
    body = {
        "status": "ok" if gw.connected else "nats_disconnected",
        "nodes": len(gw.fleet.nodes()),
        "models": sorted(gw.fleet.ready_models()),
    }
    return JSONResponse(body, status_code=200 if gw.connected else 503)


@v1.get("/models")
async def list_models(request: Request) -> Response:
    gw = gateway_for(request)
    body = await gw.listing.body(lambda m: auth.may_use(request, gw.model_names(m)))
    return Response(body, media_type="application/json")


@v1.get("/models/{model:path}")
async def get_model(model: str, request: Request) -> JSONResponse:
    gw = gateway_for(request)
    return JSONResponse(model_entry(gw.catalogue, gw.fleet, _model(request, gw, model)))


@v1.post("/chat/completions", responses=_OPENAI_ERRORS)
async def chat_completions(body: openai.ChatCompletionRequest, request: Request) -> Response:
    await _check_unicode(request)
    gw = gateway_for(request)
    model_id = _model(request, gw, body.model)
    job = openai.to_job(body, model_id, job_id=uuid.uuid4().hex, request_id=exchange(request).request_id)
    writer = openai.ChunkWriter(f"chatcmpl-{job.job_id}", model_id, _include_usage(body.stream_options))
    return await _serve(request, gw, job, "openai.chat", writer, body.stream)


@v1.post("/completions", responses=_OPENAI_ERRORS)
async def completions(body: openai.CompletionRequest, request: Request) -> Response:
    await _check_unicode(request)
    gw = gateway_for(request)
    model_id = _model(request, gw, body.model)
    job = openai.completion_to_job(body, model_id, job_id=uuid.uuid4().hex, request_id=exchange(request).request_id)
    echo = job.prompt if body.echo else None
    writer = openai.TextWriter(f"cmpl-{job.job_id}", model_id, _include_usage(body.stream_options), echo)
    return await _serve(request, gw, job, "openai.completions", writer, body.stream)


@v1.post("/messages", responses=_ANTHROPIC_ERRORS)
async def messages(body: anthropic.MessagesRequest, request: Request) -> Response:
    await _check_unicode(request)
    gw = gateway_for(request)
    model_id = _model(request, gw, body.model)
    job = anthropic.to_job(body, model_id, job_id=uuid.uuid4().hex, request_id=exchange(request).request_id)
    writer = anthropic.MessageWriter(anthropic.message_id(), model_id)
    return await _serve(request, gw, job, "anthropic.messages", writer, body.stream)


@v1.post("/responses", responses=_OPENAI_ERRORS)
async def create_response(body: responses.ResponsesRequest, request: Request) -> Response:
    await _check_unicode(request)
    gw = gateway_for(request)
    model_id = _model(request, gw, body.model)
    history = await gw.responses.history(body.previous_response_id) if body.previous_response_id else []
    turn = responses.to_messages(body.input)
    request_id = exchange(request).request_id
    job = responses.to_job(body, model_id, [*history, *turn], job_id=uuid.uuid4().hex, request_id=request_id)
    writer = responses.ResponseWriter(body, responses.response_id(), model_id)
    keep = keeper(gw.responses, body, turn, writer) if body.store else None
    return await _serve(request, gw, job, "openai.responses", writer, body.stream, keep)


async def _stored(gw: Gateway, request: Request, response_id: str) -> StoredResponse:
    stored = await gw.responses.get(response_id)
    _model(request, gw, str(stored.response.get("model", "")))  # the caller's key may use its model
    return stored


@v1.get("/responses/{response_id}", responses=_OPENAI_ERRORS)
async def get_response(response_id: str, request: Request) -> JSONResponse:
    stored = await _stored(gateway_for(request), request, response_id)
    return JSONResponse(stored.response)


@v1.delete("/responses/{response_id}", responses=_OPENAI_ERRORS)
async def delete_response(response_id: str, request: Request) -> JSONResponse:
    gw = gateway_for(request)
    await _stored(gw, request, response_id)  # a 404 for an id that is not there
    await gw.responses.delete(response_id)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


@v1.get("/responses/{response_id}/input_items", responses=_OPENAI_ERRORS)
async def list_input_items(response_id: str, request: Request) -> JSONResponse:
    items = (await _stored(gateway_for(request), request, response_id)).input_items
    body = {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": False,
    }
    return JSONResponse(body)


@v1.post("/messages/count_tokens", responses=_ANTHROPIC_ERRORS)
async def count_tokens(body: anthropic.CountTokensRequest, request: Request) -> JSONResponse:
    await _check_unicode(request)
    gw = gateway_for(request)
    model_id = _model(request, gw, body.model)
    messages = anthropic.to_messages(body)
    tools, _, _ = anthropic.to_tools(body)
    count = CountRequest(model=model_id, messages=messages, tools=tools)
    _check_size(gw, len(count.to_bytes()), "count request")  # before a model is loaded for it
    # The tokenizer and chat template live with the model, on a node that holds it.
    await unless_disconnected(request, gw.placer.place(model_id))
    node = gw.dispatcher.best_holder(model_id)
    if node is None:
        raise NoCapacity(f"{model_id} is not loaded on any node right now; retry")
    reply = await gw.control.call(node, "count", count, CountReply)
    return JSONResponse({"input_tokens": reply.input_tokens})


def _check_size(gw: Gateway, size: int, what: str) -> None:
    """Refuses, before publishing, a message NATS would refuse anyway, naming the limit (jobs are checked
    the same way where they are published)."""
    limit = gw.connection.max_payload
    if limit and size > limit:
        raise InvalidRequest(
            f"the request is {size} bytes as a {what}; NATS max_payload is {limit} bytes. "
            "Shorten the conversation, or raise max_payload in nats.conf",
            code=ErrorCode.payload_too_large,
        )


def _include_usage(options: openai.StreamOptions | None) -> bool:
    return bool(options and options.include_usage)


async def _serve(
    request: Request,
    gw: Gateway,
    job: InferenceJob,
    api: str,
    writer: AnswerWriter,
    stream: bool,
    keep: Keep | None = None,
) -> Response:
    """Places the model if need be, runs the job, and answers: a stream, or one body. `keep` runs
    once the answer is whole (the Responses API's store).

    A stream whose model is served now opens its job first, so that a refusal is still an HTTP
    status; a cold one answers 200 at once and keeps the connection while the model loads."""
    outcome = exchange(request).serve(job.model, api, auth.caller(request).name)
    served = ServedJob(job, gw.dispatcher, outcome, gw.metrics)
    try:
        # A short NATS outage is waited out; a longer one refused before a cold load could start a
        # stream that can only fail.
        await unless_disconnected(request, gw.dispatcher.until_connected())
        loading = await gw.placer.prepare(job.model)
        if stream:
            if loading is None:
                await unless_disconnected(request, served.open())
            content = stream_answer(served, writer, loading, gw.settings.gateway.keepalive_interval)
            if keep is not None:
                content = _keeping(content, keep)
            return ServedStreamResponse(served, content, media_type="text/event-stream", headers=_STREAM_HEADERS)
        if loading is not None:
            await unless_disconnected(request, asyncio.shield(loading))
        answer, done = await unless_disconnected(request, collect(served))
    except ClientGone:
        await served.finish()  # the client left: so says the outcome, and nothing is left running
        return Response(status_code=499)
    body = writer.response(answer, done)
    if keep is not None:
        await keep()
    return JSONResponse(body)


async def _keeping(content: AsyncIterator[bytes], keep: Keep) -> AsyncIterator[bytes]:
    """The stream, with `keep` run as soon as the answer is whole (before the write that ends it)."""
    async for chunk in content:
        await keep()
        yield chunk


_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
