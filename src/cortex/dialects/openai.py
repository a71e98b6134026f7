"""OpenAI chat completions <-> InferenceJob.

Every request field is either honoured or refused with a 400 that names it; fields that
only label a request (`user`, `metadata`, `store`, ...) are accepted and not used.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cortex.protocol.errors import InvalidRequest
from cortex.protocol.messages import ChatMessage, Done, InferenceJob, SamplingParams, Usage

DEFAULT_MAX_TOKENS = 1024


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ContentPart(BaseModel):
    """Any content part; only `text` is understood, others are refused by name."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    messages: list[ChatMessageIn] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    n: int | None = Field(None, ge=1)
    # Labels only: accepted, never change the output.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # Recognised but not served yet; refused by name when set (see `_refuse_unsupported`).
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    reasoning_effort: str | None = None


_UNSUPPORTED = ("tools", "tool_choice", "logit_bias", "top_logprobs", "reasoning_effort")


def _refuse_unsupported(req: ChatCompletionRequest) -> None:
    for name in _UNSUPPORTED:
        if getattr(req, name) not in (None, [], {}):
            raise InvalidRequest(f"`{name}` is not supported by this server yet; remove it from the request")
    if req.logprobs:
        raise InvalidRequest("`logprobs` is not supported by this server yet; remove it or set it to false")
    if req.n not in (None, 1):
        raise InvalidRequest("`n` must be 1: this server returns one choice per request")
    if req.response_format and req.response_format.get("type") not in (None, "text"):
        raise InvalidRequest("`response_format` other than text is not supported yet")


def _content(message: ChatMessageIn, index: int) -> str:
    if message.content is None:
        if message.tool_calls:
            raise InvalidRequest(f"`messages[{index}].tool_calls` is not supported by this server yet")
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for j, part in enumerate(message.content):
        if part.type != "text" or part.text is None:
            raise InvalidRequest(
                f"`messages[{index}].content[{j}]` has type {part.type!r}; only text parts are supported"
            )
        texts.append(part.text)
    return "".join(texts)


def to_job(req: ChatCompletionRequest, model_id: str, *, job_id: str, request_id: str) -> InferenceJob:
    _refuse_unsupported(req)
    if req.max_tokens and req.max_completion_tokens and req.max_tokens != req.max_completion_tokens:
        raise InvalidRequest("`max_tokens` and `max_completion_tokens` disagree; send one of them")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 16 or any(not s for s in stop):
        raise InvalidRequest("`stop` takes at most 16 non-empty strings")
    messages = [
        ChatMessage(
            role="system" if m.role == "developer" else m.role,
            content=_content(m, i),
            name=m.name,
        )
        for i, m in enumerate(req.messages)
    ]
    sampling = SamplingParams(
        max_tokens=req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_TOKENS,
        temperature=req.temperature,
        top_p=req.top_p,
        seed=req.seed,
        stop=stop,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
    )
    return InferenceJob(job_id=job_id, request_id=request_id, model=model_id, messages=messages, sampling=sampling)


# --- responses -------------------------------------------------------------------------------------


def usage(u: Usage) -> dict[str, int]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens}


def _finish_reason(done: Done) -> str:
    return "length" if done.finish_reason == "length" else "stop"


def completion(completion_id: str, model: str, text: str, done: Done) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": _finish_reason(done),
            }
        ],
        "usage": usage(done.usage),
    }


class ChunkWriter:
    """Builds the chunks of one streamed completion, shaped exactly as OpenAI sends them."""

    def __init__(self, completion_id: str, model: str, include_usage: bool) -> None:
        self._id = completion_id
        self._model = model
        self._created = int(time.time())
        self._include_usage = include_usage

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": choices,
        }
        if self._include_usage:
            chunk["usage"] = None
        return chunk

    def role(self) -> dict[str, Any]:
        return self._chunk(
            [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
        )

    def content(self, text: str) -> dict[str, Any]:
        return self._chunk([{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}])

    def finish(self, done: Done) -> list[dict[str, Any]]:
        chunks = [self._chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": _finish_reason(done)}])]
        if self._include_usage:
            last = self._chunk([])
            last["usage"] = usage(done.usage)
            chunks.append(last)
        return chunks


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
