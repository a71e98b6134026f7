"""Why a control verb failed, as the control service answers it.

A verb that fails raises a VerbError; its class gives the ErrorCode of the reply's body, and the
code gives the status in its `Nats-Service-Error-Code` header. Two kinds keep a status of their
own, as the wire has always had them: a `Conflict` (409: the request is sound, the model's state
refuses it) and an unreachable source (503: try again later).

VerbError                  internal, 500
├── InvalidVerb            invalid_request, 400
│   └── Conflict           invalid_request, 409
├── ModelNotFound          model_not_found, 404
├── ModelNotLoaded         model_not_loaded, 404
├── ShuttingDown           shutting_down, 503
├── PreflightRefused       preflight_failed, 422 (carries the Refusal)
└── LoadFailed             load_failed, 422
    └── SourceUnreachable  load_failed, 503
"""

from __future__ import annotations

from typing import ClassVar

from cortex.protocol.errors import ErrorCode
from cortex.protocol.messages import Refusal

# The status of each code a verb fails with; any other is a 500.
_STATUS: dict[ErrorCode, int] = {
    ErrorCode.invalid_request: 400,
    ErrorCode.model_not_found: 404,
    ErrorCode.model_not_loaded: 404,
    ErrorCode.preflight_failed: 422,
    ErrorCode.load_failed: 422,
    ErrorCode.shutting_down: 503,
}


class VerbError(Exception):
    code: ClassVar[ErrorCode] = ErrorCode.internal

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def status(self) -> int:
        return _STATUS.get(self.code, 500)

    @property
    def refusal(self) -> Refusal | None:
        return None


class InvalidVerb(VerbError):
    code = ErrorCode.invalid_request


class Conflict(InvalidVerb):
    @property
    def status(self) -> int:
        return 409


class ModelNotFound(VerbError):
    code = ErrorCode.model_not_found


class ModelNotLoaded(VerbError):
    code = ErrorCode.model_not_loaded


class ShuttingDown(VerbError):
    code = ErrorCode.shutting_down


class PreflightRefused(VerbError):
    code = ErrorCode.preflight_failed

    def __init__(self, message: str, refusal: Refusal) -> None:
        super().__init__(message)
        self._refusal = refusal

    @property
    def refusal(self) -> Refusal | None:
        return self._refusal


class LoadFailed(VerbError):
    code = ErrorCode.load_failed


class SourceUnreachable(LoadFailed):
    @property
    def status(self) -> int:
        return 503
