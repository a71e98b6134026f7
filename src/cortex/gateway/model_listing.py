"""`/v1/models`: every catalogue and fleet model's entry, built off the event loop and reused.

A listing asks about every catalogue model on every node (where it is loaded, where it could be
placed): with a thousand nodes that is a few hundred milliseconds of Python, which on the event
loop would stand every stream of the gateway still. So it is built on a worker thread, one
build at a time however many ask, and reused for ten times what it took to build (at most
`MAX_REUSE_S`): listing then costs at most about a tenth of the gateway's time, and a small
fleet's listing is a few milliseconds old at most.

Entries are kept as JSON, so each request (whose key may see only some models) is a join.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

MAX_REUSE_S = 2.0
_REUSE_FACTOR = 10


class ModelListing:
    def __init__(self, build: Callable[[], list[dict[str, Any]]]) -> None:
        """`build`: every entry, in order; runs on a worker thread."""
        self._build = build
        self._entries: dict[str, bytes] = {}
        self._built_at = -float("inf")
        self._reuse_s = 0.0
        self._building: asyncio.Future[dict[str, bytes]] | None = None

    async def entries(self) -> dict[str, bytes]:
        """Model id -> its entry as JSON, in listing order."""
        if time.monotonic() - self._built_at < self._reuse_s:
            return self._entries
        if self._building is None:
            self._building = asyncio.ensure_future(self._rebuild())
            self._building.add_done_callback(self._built)
        # Shielded: one caller going away must not cancel the build the others wait on.
        return await asyncio.shield(self._building)

    async def body(self, visible: Callable[[str], bool]) -> bytes:
        """The whole listing as OpenAI writes it, of the models `visible` lets through."""
        entries = await self.entries()
        data = b",".join(entry for model_id, entry in entries.items() if visible(model_id))
        return b'{"object":"list","data":[' + data + b"]}"

    async def _rebuild(self) -> dict[str, bytes]:
        began = time.monotonic()
        entries = await asyncio.to_thread(self._encoded)
        self._entries, self._built_at = entries, time.monotonic()
        self._reuse_s = min(MAX_REUSE_S, _REUSE_FACTOR * (self._built_at - began))
        return entries

    def _encoded(self) -> dict[str, bytes]:
        return {entry["id"]: json.dumps(entry, separators=(",", ":")).encode() for entry in self._build()}

    def _built(self, _: asyncio.Future[dict[str, bytes]]) -> None:
        self._building = None
