"""/v1/models' listing: built on a worker thread once for all who ask at the same time, reused a while."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from cortex.gateway import model_listing
from cortex.gateway.model_listing import ModelListing


class _Builds:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> list[dict[str, object]]:
        self.count += 1
        time.sleep(0.05)
        return [{"id": "org/a", "object": "model"}, {"id": "org/b", "object": "model"}]


async def test_callers_at_the_same_time_share_one_build() -> None:
    builds = _Builds()
    listing = ModelListing(builds)
    bodies = await asyncio.gather(*(listing.body(lambda _: True) for _ in range(5)))
    assert builds.count == 1
    assert {json.loads(b)["data"][1]["id"] for b in bodies} == {"org/b"}


async def test_a_listing_is_reused_for_a_while_then_built_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_listing, "MAX_REUSE_S", 0.1)
    builds = _Builds()
    listing = ModelListing(builds)
    await listing.entries()
    await listing.entries()
    assert builds.count == 1
    await asyncio.sleep(0.2)
    await listing.entries()
    assert builds.count == 2


async def test_a_body_lists_only_the_models_the_caller_may_see() -> None:
    listing = ModelListing(_Builds())
    body = json.loads(await listing.body(lambda model: model == "org/b"))
    assert body == {"object": "list", "data": [{"id": "org/b", "object": "model"}]}
