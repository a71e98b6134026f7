"""The neuron's half of the job protocol: take jobs off NATS, and answer each on its reply inbox.

Every reply is: `accepted`, any number of `delta`, then one `done` or `error`, then an
empty message (the end marker). `seq` counts them from 0 without gaps.

A `JobInbox` hands each job, with its `Reply`, to a `JobHandler` (the neuron's admission logic),
and tells it when nobody will read a job's answer any more: its requester is gone (NATS says
"no responders" on the reply's notices subject), or the server refuses its events.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Protocol

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import ValidationError

from cortex.protocol.errors import ErrorCode
from cortex.protocol.messages import CancelRequest, Failed, InferenceJob, JobEvent
from cortex.protocol.subjects import JOB_QUEUE_GROUP, Subjects
from cortex.transport.connection import Connection
from cortex.transport.errors import map_nats_errors

log = logging.getLogger(__name__)

_STATUS = "Status"
_NO_RESPONDERS = "503"


class Reply:
    """One job's reply inbox, numbering what it sends. Sending raises `TransportError`.

    `notices`: where NATS says "no responders" (a 503 status) when an event finds nobody
    subscribed to the reply subject any more: the gateway that asked is gone (killed, or
    restarted), so the job is generating for nobody. Set by `JobInbox.watch`.
    """

    def __init__(self, connection: Connection, subject: str, job_id: str) -> None:
        self._nc = connection.client
        self.subject = subject
        self.job_id = job_id
        self.notices = ""
        self.seq = 0
        self.refused = False  # the server refused an event of this reply: nobody gets the rest

    async def send(self, event: JobEvent) -> None:
        with map_nats_errors(f"sending event {self.seq} of job {self.job_id}"):
            await self._nc.publish(self.subject, event.to_bytes(), reply=self.notices)
        self.seq += 1

    async def fail(self, code: ErrorCode, message: str, *, retryable: bool = False) -> None:
        await self.send(Failed(job_id=self.job_id, seq=self.seq, code=code, message=message, retryable=retryable))
        await self.end()

    async def end(self) -> None:
        with map_nats_errors(f"ending job {self.job_id}"):
            await self._nc.publish(self.subject, b"")


class JobHandler(Protocol):
    """What a `JobInbox` hands its jobs and news to: plain, quick calls, except `take`."""

    async def take(self, job: InferenceJob, reply: Reply) -> None:
        """A valid job, to admit (answering `reply`) or refuse (failing it)."""
        ...

    def cancel(self, job_id: str) -> bool:
        """A cancel any node may have been sent; True if this node had the job."""
        ...

    def requester_gone(self, job_id: str) -> None:
        """Nobody reads this job's answer any more (its gateway is gone)."""
        ...

    def replies_refused(self, job_id: str, subject: str) -> None:
        """The server refused an event of this job's (once per job)."""
        ...


class JobInbox:
    """The node's job subscriptions, and the notices about the replies it is sending.

    Under deploy/nats's permissions a node may answer only requests delivered on its current
    connection, so after a reconnect the rest of the answers it had in hand would be refused:
    `replies_refused` says so for each watched reply.
    """

    def __init__(self, connection: Connection, node: str, subjects: Subjects, handler: JobHandler) -> None:
        self._connection = connection
        self._nc = connection.client
        self._node = node
        self._subjects = subjects
        self._handler = handler
        self._subs: dict[str, list[Subscription]] = {}
        # An inbox under the connection's prefix (`_INBOX.<node>` with deploy/nats): the node's user
        # may read no other, and no other user may read it.
        self._gone_prefix = self._nc.new_inbox()
        self._watched: set[Reply] = set()  # replies being sent: a refusal may name one
        self._notice_tokens: dict[str, Reply] = {}  # the last token of a notices subject -> its reply
        self._notices = 0

    async def start(self) -> None:
        """Listens for broadcast cancels, gone requesters and refused replies, for the connection's lifetime."""
        await self._nc.subscribe(self._subjects.cancel_any(), cb=self._on_broadcast_cancel)
        await self._nc.subscribe(f"{self._gone_prefix}.*", cb=self._on_requester_gone)
        self._connection.on_refused_publish(self._on_refused)

    # --- replies being sent -----------------------------------------------------------------

    def watch(self, reply: Reply) -> None:
        """From now on, hears whether anyone still reads `reply` (until `unwatch`)."""
        self._notices += 1
        self._notice_tokens[str(self._notices)] = reply
        reply.notices = f"{self._gone_prefix}.{self._notices}"
        self._watched.add(reply)

    def unwatch(self, reply: Reply) -> None:
        self._notice_tokens.pop(reply.notices.rpartition(".")[2], None)
        self._watched.discard(reply)

    def _on_refused(self, subject: str) -> None:
        for reply in list(self._watched):
            if reply.subject.lower() == subject.lower() and not reply.refused:
                reply.refused = True
                self._handler.replies_refused(reply.job_id, subject)

    async def _on_requester_gone(self, msg: Msg) -> None:
        if (msg.headers or {}).get(_STATUS) != _NO_RESPONDERS:
            return
        reply = self._notice_tokens.pop(msg.subject.rpartition(".")[2], None)  # once per job
        if reply is not None:
            self._handler.requester_gone(reply.job_id)

    async def _on_broadcast_cancel(self, msg: Msg) -> None:
        try:
            self._handler.cancel(CancelRequest.model_validate_json(msg.data).job_id)
        except ValidationError:
            log.warning("ignoring a malformed cancel on %s", msg.subject)

    # --- jobs, by model ---------------------------------------------------------------------

    async def subscribe(self, model_id: str) -> None:
        if model_id in self._subs:
            return
        self._subs[model_id] = [
            await self._nc.subscribe(self._subjects.infer(model_id), queue=JOB_QUEUE_GROUP, cb=self._on_job),
            await self._nc.subscribe(self._subjects.infer_node(model_id, self._node), cb=self._on_job),
        ]
        log.info("taking jobs for %s on %s", model_id, self._subjects.infer(model_id))

    async def unsubscribe(self, model_id: str) -> None:
        for sub in self._subs.pop(model_id, []):
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def unsubscribe_all(self) -> None:
        for model_id in list(self._subs):
            await self.unsubscribe(model_id)

    async def _on_job(self, msg: Msg) -> None:
        if not msg.reply:
            log.warning("dropping a job on %s without a reply subject", msg.subject)
            return
        try:
            job = InferenceJob.model_validate_json(msg.data)
        except ValidationError as exc:
            await Reply(self._connection, msg.reply, "unknown").fail(ErrorCode.invalid_request, f"invalid job: {exc}")
            return
        await self._handler.take(job, Reply(self._connection, msg.reply, job.job_id))
