"""Requests to a neuron's control service (`<prefix>.node.<node>.<verb>`), errors translated.

A micro service error carries its status in `Nats-Service-Error-Code` and a
ServiceErrorBody; a preflight refusal comes back as `Refused` with its structured form.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError

from cortex.protocol.errors import CortexError, ErrorCode, JobFailed, Refused
from cortex.protocol.messages import ServiceErrorBody, StatusReply, _Wire
from cortex.protocol.subjects import Subjects
from cortex.transport.connection import Connection
from cortex.transport.errors import map_nats_errors

R = TypeVar("R", bound=BaseModel)

_ERROR_HEADER = "Nats-Service-Error-Code"


class ControlClient:
    def __init__(self, connection: Connection, subjects: Subjects) -> None:
        self._nc = connection.client
        self._subjects = subjects

    async def call(self, node: str, verb: str, body: _Wire | None, reply_type: type[R], *, timeout: float = 10.0) -> R:
        subject = self._subjects.control(node, verb)
        with map_nats_errors(f"{verb} on node {node}"):
            msg = await self._nc.request(subject, body.to_bytes() if body else b"", timeout=timeout)
        if msg.headers and msg.headers.get(_ERROR_HEADER):
            raise _error(node, verb, msg.headers, msg.data)
        try:
            return reply_type.model_validate_json(msg.data)
        except ValidationError as exc:
            raise CortexError(f"node {node} answered {verb} with something unreadable: {exc}") from None


def _error(node: str, verb: str, headers: dict[str, str], data: bytes) -> CortexError:
    try:
        body = ServiceErrorBody.model_validate_json(data)
    except ValidationError:
        message = headers.get("Nats-Service-Error", "unknown error")
        return JobFailed(f"{verb} on node {node} failed: {message}", code=ErrorCode.internal)
    if body.refusal is not None:
        return Refused(body.refusal)
    retryable = body.code in (ErrorCode.shutting_down, ErrorCode.busy)
    return JobFailed(f"{verb} on node {node} failed: {body.message}", code=body.code, retryable=retryable)


async def still_has(control: ControlClient, node: str, job_id: str, timeout: float) -> bool | None:
    """Whether `node` still has the job, queued or running; None if it does not say within `timeout`
    (frozen, gone, or cut off)."""
    try:
        status = await control.call(node, "status", None, StatusReply, timeout=timeout)
    except CortexError:
        return None
    return any(job.job_id == job_id for job in status.jobs)
