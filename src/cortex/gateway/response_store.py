"""Stored Responses API responses, in the NATS KV bucket `cortex_responses`: any gateway continues
any conversation, and none keeps one in memory.

Each entry holds one turn (its new input and its answer) and the id of the turn before it, so an
entry stays small however long the conversation grows; `history` follows the chain back.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from cortex.dialects import responses
from cortex.protocol.errors import CortexError, ErrorCode, InvalidRequest
from cortex.protocol.messages import ChatMessage, StoredResponse
from cortex.transport.connection import Connection
from cortex.transport.kv import Bucket, BucketMissing, responses_bucket

log = logging.getLogger(__name__)

# A chain longer than this is refused rather than read key by key on every turn.
MOST_TURNS = 1000


class ResponseNotFound(CortexError):
    """A 404: the id names nothing stored (never stored, deleted or expired)."""

    code = ErrorCode.response_not_found


class ResponseStore:
    def __init__(self, connection: Connection, bucket: Bucket, *, max_age: float, replicas: int) -> None:
        self._connection = connection
        self._bucket = bucket
        self._max_age = max_age
        self._replicas = replicas

    @classmethod
    async def open(cls, connection: Connection, *, max_age: float, replicas: int = 1) -> ResponseStore:
        bucket = await responses_bucket(connection, max_age=max_age, replicas=replicas)
        return cls(connection, bucket, max_age=max_age, replicas=replicas)

    async def get(self, response_id: str) -> StoredResponse:
        value = await self._bucket.get(_key(response_id), what=f"reading stored response {response_id}")
        if value is None:
            raise ResponseNotFound(
                f"no stored response {response_id!r}: it was never stored (store: false), was deleted, "
                "or expired; send the whole conversation as `input` instead"
            )
        return StoredResponse.model_validate_json(value)

    async def put(self, stored: StoredResponse) -> None:
        value = stored.to_bytes()
        limit = self._connection.max_payload
        if limit and len(value) > limit:
            # The answer is whole and already the client's: a turn too big to keep is logged, not failed.
            log.warning("response %s not stored: %d bytes, over NATS max_payload %d", stored.id, len(value), limit)
            return
        try:
            await self._bucket.put(_key(stored.id), value)
        except BucketMissing:  # a NATS server that came back empty: create the bucket again
            self._bucket = await responses_bucket(self._connection, max_age=self._max_age, replicas=self._replicas)
            await self._bucket.put(_key(stored.id), value)

    async def delete(self, response_id: str) -> None:
        """Deletes it; deleting an id that is not there is no error (`get` first to answer a 404)."""
        await self._bucket.delete(_key(response_id))

    async def history(self, previous_response_id: str) -> list[ChatMessage]:
        """The conversation up to and including `previous_response_id`'s answer, oldest first."""
        turns: list[list[ChatMessage]] = []
        next_id: str | None = previous_response_id
        while next_id is not None:
            if len(turns) == MOST_TURNS:
                raise InvalidRequest(
                    f"`previous_response_id` leads back more than {MOST_TURNS} turns; "
                    "send the conversation as `input` instead"
                )
            stored = await self.get(next_id)
            turns.append(stored.messages)
            next_id = stored.previous_response_id
        return [m for turn in reversed(turns) for m in turn]


Keep = Callable[[], Awaitable[None]]


def keeper(
    store: ResponseStore, body: responses.ResponsesRequest, turn: list[ChatMessage], writer: responses.ResponseWriter
) -> Keep:
    """Stores the response (`turn`: its input as the job had it) once it is whole: called before
    each write of the answer, it acts once, before the write that ends it, so a client that
    continues from it at once finds it. A store that fails is logged: the answer stands."""
    kept = False

    async def keep() -> None:
        nonlocal kept
        if kept or writer.final is None:
            return
        kept = True
        stored = StoredResponse(
            id=writer.id,
            previous_response_id=body.previous_response_id,
            messages=[*turn, *responses.answer_messages(writer.answer)],
            input_items=responses.input_items(body.input),
            response=writer.final,
        )
        try:
            await store.put(stored)
        except CortexError as exc:
            log.warning("response %s was answered but not stored: %s", writer.id, exc.message)

    return keep


def _key(response_id: str) -> str:
    # KV keys take letters, digits and -_=./; ids are `resp_` and hex, but a client may send anything.
    if not response_id.replace("_", "").replace("-", "").isalnum():
        raise ResponseNotFound(f"no stored response {response_id!r}: response ids are letters, digits, - and _")
    return response_id
