"""Error codes that travel on the wire, and the exception tree both sides raise.

CortexError                     base: carries a stable ErrorCode
├── InvalidRequest              the job itself is wrong; retrying will not help
├── ModelNotFound               no catalogue entry or loaded model by that name
├── NoCapacity                  nobody can serve it now (no holder, all busy, draining, no room)
├── Refused                     preflight: the model cannot be loaded as configured (carries a Refusal)
├── JobFailed                   a neuron answered with an error event
└── TransportError              NATS is unreachable or did not answer in time
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cortex.protocol.messages import Refusal


class ErrorCode(StrEnum):
    invalid_request = "invalid_request"
    payload_too_large = "payload_too_large"
    model_not_found = "model_not_found"
    response_not_found = "response_not_found"
    model_not_loaded = "model_not_loaded"
    preflight_failed = "preflight_failed"
    insufficient_capacity = "insufficient_capacity"
    unauthorized = "unauthorized"
    forbidden = "forbidden"
    busy = "busy"
    cancelled = "cancelled"
    shutting_down = "shutting_down"
    load_failed = "load_failed"
    timeout = "timeout"
    node_lost = "node_lost"
    transport = "transport"
    internal = "internal"


class CortexError(Exception):
    code: ErrorCode = ErrorCode.internal

    def __init__(self, message: str, *, code: ErrorCode | None = None, retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.retryable = retryable


class InvalidRequest(CortexError):
    code = ErrorCode.invalid_request


class ModelNotFound(CortexError):
    code = ErrorCode.model_not_found


class NoCapacity(CortexError):
    code = ErrorCode.model_not_loaded


class Refused(CortexError):
    code = ErrorCode.preflight_failed

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(f"{refusal.model}: {refusal.detail}")
        self.refusal = refusal


class JobFailed(CortexError):
    pass


class TransportError(CortexError):
    code = ErrorCode.transport
