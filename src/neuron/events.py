"""The node's fleet events (`<prefix>.events.<kind>`, `job_lost` on the node's own subject).

Telling the fleet is best effort: an event that cannot be published is logged and dropped,
never raised into the load, unload or job it describes (heartbeats carry the state anyway).
"""

from __future__ import annotations

import logging

from cortex.protocol.messages import EventKind, FleetEvent
from cortex.protocol.subjects import Subjects
from cortex.transport.connection import Connection

log = logging.getLogger(__name__)


class EventPublisher:
    def __init__(self, connection: Connection, subjects: Subjects, node: str) -> None:
        self._connection = connection
        self._subjects = subjects
        self._node = node

    async def publish(
        self,
        kind: EventKind,
        *,
        model: str | None = None,
        detail: str | None = None,
        reason: str | None = None,
        job_id: str | None = None,
    ) -> None:
        event = FleetEvent(kind=kind, node=self._node, model=model, detail=detail, reason=reason, job_id=job_id)
        try:
            await self._connection.publish(self._subjects.node_event(kind, self._node), event.to_bytes())
        except Exception as exc:
            log.warning("could not tell the fleet %s%s: %s", kind, f" of {model}" if model else "", exc)
