"""The control service's verbs on this node: load, unload, status, cancel, count (the service's
Controller). Failures are raised as neuron.control.errors, which say how the reply reads."""

from __future__ import annotations

import asyncio
import logging

from cortex.protocol.messages import (
    CancelReply,
    CancelRequest,
    CountReply,
    CountRequest,
    LoadRequest,
    ModelState,
    ModelStatus,
    StatusReply,
    UnloadRequest,
)
from neuron.control.errors import (
    Conflict,
    InvalidVerb,
    LoadFailed,
    ModelNotFound,
    ModelNotLoaded,
    PreflightRefused,
    ShuttingDown,
    SourceUnreachable,
)
from neuron.engine.chat import PromptRejected
from neuron.jobs import JobRelay
from neuron.models import LoadError, ModelTable
from neuron.node_view import NodeView
from neuron.pins import Pins
from neuron.planning import LoadPlanner
from neuron.sources.inspect import SourceRefused, SourceUnavailable

log = logging.getLogger(__name__)


class ControlVerbs:
    """Implements neuron.control.service's Controller."""

    def __init__(
        self, node: str, models: ModelTable, relay: JobRelay, planner: LoadPlanner, view: NodeView, pins: Pins
    ) -> None:
        self._node = node
        self._models = models
        self._relay = relay
        self._planner = planner
        self._view = view
        self._pins = pins

    async def load(self, request: LoadRequest) -> ModelStatus:
        if self._relay.draining:
            raise ShuttingDown(f"node {self._node} is shutting down")
        try:
            entry = await self._planner.start_load(request.model, request.device)
        except SourceRefused as exc:
            log.warning("refused to load %s: %s", request.model.id, exc.refusal.log_fields())
            raise PreflightRefused(str(exc), exc.refusal) from None
        except LoadError as exc:
            raise InvalidVerb(str(exc)) from None
        except SourceUnavailable as exc:
            raise SourceUnreachable(str(exc)) from None
        if request.wait:
            await entry.done.wait()
            if entry.state is ModelState.failed:
                raise LoadFailed(entry.error or "load failed")
        return self._view.model_status(entry)

    async def unload(self, request: UnloadRequest) -> ModelStatus:
        if request.reason == "evicted" and self._pins.pinned(request.model):
            raise Conflict(f"{request.model} is pinned on {self._node}")
        try:
            entry = await self._models.unload(request.model, request.reason, request.detail)
        except LoadError as exc:
            raise Conflict(str(exc)) from None
        if entry is None:
            raise ModelNotFound(f"{request.model} is not loaded on {self._node}")
        return entry.status()

    def status(self) -> StatusReply:
        return StatusReply(heartbeat=self._view.snapshot(), jobs=self._relay.statuses())

    def cancel(self, request: CancelRequest) -> CancelReply:
        return CancelReply(job_id=request.job_id, found=self._relay.cancel(request.job_id))

    async def count(self, request: CountRequest) -> CountReply:
        entry = self._models.ready(request.model)
        if entry is None or entry.loaded is None:
            raise ModelNotLoaded(f"{request.model} is not loaded on {self._node}")
        try:
            tokens = await asyncio.to_thread(entry.loaded.chat.count, request.messages, request.tools)
        except PromptRejected as exc:
            raise InvalidVerb(str(exc)) from exc
        return CountReply(model=entry.spec.id, input_tokens=tokens)
