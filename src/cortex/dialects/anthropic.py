"""Anthropic Messages (`/v1/messages`) <-> InferenceJob. Pure functions and builders, no I/O.

Text conversations are served: `system` as a string or text blocks, `text` content blocks,
`max_tokens` (required), `stop_sequences`, `temperature`, `top_p`, `top_k`, `metadata`.
Tool use, images, documents and extended thinking are refused by name until the neuron
parses tool calls and reasoning.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cortex.dialects import sse
from cortex.dialects.common import Part, describe, http_status, join_text, stop_list
from cortex.protocol.errors import CortexError, InvalidRequest
from cortex.protocol.messages import ChatMessage, Done, InferenceJob, SamplingParams


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "assistant"]
    content: str | list[Part]


class Metadata(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: str | None = None


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    messages: list[Message] = Field(min_length=1)
    system: str | list[Part] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    metadata: Metadata | None = None
    stream: bool = False
    service_tier: str | None = None  # a label here
    # Recognised but not served yet; refused by name when set.
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None


class CountTokensRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    system: str | list[Part] | None = None
    tools: list[dict[str, Any]] | None = None
    thinking: dict[str, Any] | None = None


def to_messages(req: MessagesRequest | CountTokensRequest) -> list[ChatMessage]:
    for name in ("tools", "thinking") + (("tool_choice",) if isinstance(req, MessagesRequest) else ()):
        if getattr(req, name) not in (None, [], {}):
            raise InvalidRequest(f"`{name}` is not supported by this server yet; remove it from the request")
    messages = []
    if req.system:
        messages.append(ChatMessage(role="system", content=join_text(req.system, "system", "block")))
    for i, m in enumerate(req.messages):
        messages.append(ChatMessage(role=m.role, content=join_text(m.content, f"messages[{i}].content", "block")))
    return messages


def to_job(req: MessagesRequest, model_id: str, *, job_id: str, request_id: str) -> InferenceJob:
    stops = stop_list(req.stop_sequences, "stop_sequences")
    sampling = SamplingParams(
        max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, stop=stops
    )
    return InferenceJob(
        job_id=job_id, request_id=request_id, model=model_id, messages=to_messages(req), sampling=sampling
    )


# --- responses -------------------------------------------------------------------------------------


def _stop_reason(done: Done) -> str:
    if done.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if done.stop_sequence else "end_turn"


def _usage(done: Done | None) -> dict[str, int]:
    if done is None:
        return {"input_tokens": 0, "output_tokens": 0}
    return {"input_tokens": done.usage.prompt_tokens, "output_tokens": done.usage.completion_tokens}


def message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


class MessageWriter:
    """One message, whole or as Anthropic's stream: message_start, a text block (start, ping,
    deltas, stop), message_delta with the stop reason and usage, message_stop.

    The prompt's token count is known once the node has encoded it, so message_start carries
    `input_tokens: 0` and message_delta the real count (the SDKs take the later figure).
    """

    def __init__(self, message_id: str, model: str) -> None:
        self._id = message_id
        self._model = model

    def _message(self, content: list[dict[str, Any]], done: Done | None) -> dict[str, Any]:
        return {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": content,
            "stop_reason": _stop_reason(done) if done else None,
            "stop_sequence": done.stop_sequence if done else None,
            "usage": _usage(done),
        }

    @staticmethod
    def _event(data: dict[str, Any]) -> bytes:
        return sse.event(data, data["type"])

    def start(self) -> list[bytes]:
        return [
            self._event({"type": "message_start", "message": self._message([], None)}),
            self._event({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            self.keepalive(),
        ]

    def text(self, text: str) -> list[bytes]:
        delta = {"type": "text_delta", "text": text}
        return [self._event({"type": "content_block_delta", "index": 0, "delta": delta})]

    def finish(self, done: Done) -> list[bytes]:
        delta = {"stop_reason": _stop_reason(done), "stop_sequence": done.stop_sequence}
        return [
            self._event({"type": "content_block_stop", "index": 0}),
            self._event({"type": "message_delta", "delta": delta, "usage": _usage(done)}),
            self._event({"type": "message_stop"}),
        ]

    def fail(self, exc: CortexError) -> list[bytes]:
        return [self._event(error_payload(exc))]

    def keepalive(self) -> bytes:
        return self._event({"type": "ping"})

    def response(self, text: str, done: Done) -> dict[str, Any]:
        return self._message([{"type": "text", "text": text}], done)


# --- errors ---------------------------------------------------------------------------------------

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "api_error")


def error_body(message: str, type_: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": type_, "message": message}}


def error_payload(exc: CortexError) -> dict[str, Any]:
    """Anthropic's envelope; a preflight refusal adds its structured form."""
    message, extra = describe(exc)
    body = error_body(message, error_type(http_status(exc.code)))
    body["error"].update(extra)
    return body
