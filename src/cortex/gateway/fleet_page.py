"""`GET /fleet.json` (the FleetReport) and `GET /fleet` (a page that polls it and draws the fleet).

Both are read-only and, like /health, need no API key: they show what the heartbeats already
publish to every NATS client (nodes, devices, models, load), nothing a request carried.
"""

from __future__ import annotations

import asyncio
import logging
from functools import cache
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from cortex.fleet_report import bucket_values
from cortex.fleet_report.report import FleetReport, Sighting, build_report
from cortex.gateway.service import Gateway, gateway_for
from cortex.placement.fleet import FleetView

log = logging.getLogger(__name__)

router = APIRouter()


@router.get("/fleet.json")
async def fleet_json(request: Request) -> Response:
    gw = gateway_for(request)
    pins = dict(gw.pins.values)  # taken here: the pins watch changes it on the event loop
    # Off the event loop: with a thousand nodes the report takes a tenth of a second to build.
    body = await asyncio.to_thread(lambda: fleet_report(gw, pins).model_dump_json().encode())
    return Response(body, media_type="application/json", headers={"Cache-Control": "no-store"})


@router.get("/fleet")
async def fleet_page() -> HTMLResponse:
    return HTMLResponse(_page(), headers={"Cache-Control": "no-store"})


def fleet_report(gw: Gateway, pins: dict[str, bytes]) -> FleetReport:
    """`pins`: KV cortex_pins' values, as the gateway's pins watch holds them."""
    pinned = bucket_values.with_catalogue_pins(bucket_values.pins(pins), gw.catalogue)
    problems = [] if gw.connected else ["The gateway has lost its NATS connection: this view may be out of date."]
    return build_report(_sightings(gw.fleet), pinned, problems=problems)


def _sightings(fleet: FleetView) -> list[Sighting]:
    # Every record, stale ones too (FleetView.nodes() hides those), aged by local receive time
    # as FleetView judges liveness: the nodes' clocks do not matter here.
    return [Sighting(heartbeat, age, alive) for heartbeat, age, alive in fleet.records()]


@cache
def _page() -> str:
    return resources.files("cortex.gateway").joinpath("static/fleet.html").read_text(encoding="utf-8")
