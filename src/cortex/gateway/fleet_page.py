"""`GET /fleet.json` (the FleetReport) and `GET /fleet` (a page that polls it and draws the fleet).

Both are read-only and, like /v1/models, need no key: they show what the heartbeats already
publish to every NATS client (nodes, devices, models, load), nothing a request carried.
"""

from __future__ import annotations

import logging
from functools import cache
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse

from cortex.gateway.service import Gateway
from cortex.placement.fleet import FleetView
from cortex.placement.report import FleetReport, Sighting, build_report
from cortex.protocol.errors import CortexError
from cortex.transport import fleet_read

log = logging.getLogger(__name__)

router = APIRouter()


@router.get("/fleet.json")
async def fleet_json(request: Request) -> JSONResponse:
    report = await fleet_report(request.app.state.gateway)
    return JSONResponse(report.model_dump(mode="json"), headers={"Cache-Control": "no-store"})


@router.get("/fleet")
async def fleet_page() -> HTMLResponse:
    return HTMLResponse(_page(), headers={"Cache-Control": "no-store"})


async def fleet_report(gw: Gateway) -> FleetReport:
    problems: list[str] = []
    pinned: dict[str, list[str]] = {}
    if gw.pins is not None:
        try:
            pinned = fleet_read.pins(await fleet_read.snapshot(gw.pins))
        except CortexError as exc:
            problems.append(f"The gateway cannot read KV cortex_pins ({exc.message}): check its NATS connection.")
    pinned = fleet_read.with_catalogue_pins(pinned, gw.catalogue)
    return build_report(_sightings(gw.fleet), pinned, problems=problems)


def _sightings(fleet: FleetView) -> list[Sighting]:
    # Every record, stale ones too (FleetView.nodes() hides those), aged by local receive time
    # as FleetView judges liveness: the nodes' clocks do not matter here.
    return [Sighting(heartbeat, age) for heartbeat, age in fleet.records()]


@cache
def _page() -> str:
    return resources.files("cortex.gateway").joinpath("static/fleet.html").read_text(encoding="utf-8")
