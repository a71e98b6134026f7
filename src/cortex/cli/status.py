"""`cortex status`: the fleet's health, read straight from NATS (no gateway needed).

It reads KV cortex_nodes (heartbeats) and cortex_pins, never writes or creates anything, so
read-only ops credentials are enough. Exit status: 0 healthy, 1 unhealthy (the problems go
to stderr too), 2 NATS unreachable. `--watch` redraws until Ctrl-C on one open connection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path

from cortex.config.nats_settings import NatsSettings
from cortex.fleet_report import bucket_values
from cortex.fleet_report.report import FleetReport, build_report
from cortex.fleet_report.text import render
from cortex.protocol.catalogue import Catalogue
from cortex.protocol.errors import CortexError
from cortex.protocol.subjects import HEARTBEAT_KEYS, NODES_BUCKET, PINS_BUCKET
from cortex.transport.connection import Connection, connect
from cortex.transport.kv import Bucket, existing_bucket
from cortex.transport.watch import snapshot

DEFAULT_NATS = "nats://127.0.0.1:4222"
HEALTHY, UNHEALTHY, UNREACHABLE = 0, 1, 2
_CLEAR = "\033[H\033[2J"


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("status", help="fleet health from NATS: nodes, devices, models, load (no gateway needed)")
    # The nats CLI's own env vars, so one shell set-up serves both tools.
    p.add_argument("--nats", help=f"NATS server URL (default: NATS_URL, [nats] of --config, or {DEFAULT_NATS})")
    p.add_argument("--creds", type=Path, default=os.environ.get("NATS_CREDS"), help="a .creds file (or NATS_CREDS)")
    p.add_argument("--user", default=os.environ.get("NATS_USER"), help="NATS user (or NATS_USER)")
    p.add_argument("--password", default=os.environ.get("NATS_PASSWORD"), help="(or NATS_PASSWORD)")
    p.add_argument("--config", type=Path, help="cortex.toml: use its [nats] section and its catalogue's pins")
    p.add_argument("--json", action="store_true", help="print the report as JSON (one line per refresh with --watch)")
    p.add_argument(
        "--watch", nargs="?", type=float, const=2.0, metavar="SECONDS", help="redraw every SECONDS (2) until Ctrl-C"
    )
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for NATS (default 5)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    nats, catalogue = _settings(args)
    last = [UNREACHABLE]
    try:
        return asyncio.run(_status(args, nats, catalogue, last))
    except KeyboardInterrupt:  # --watch ends here; the connection was closed on the way out
        return last[0]


def _settings(args: argparse.Namespace) -> tuple[NatsSettings, Catalogue | None]:
    """[nats] from --config (env CORTEX_NATS__... applies), then NATS_URL, then the flags on top."""
    env_url = os.environ.get("NATS_URL")
    catalogue = None
    nats = NatsSettings(servers=[DEFAULT_NATS])
    if args.config is not None:
        from cortex.config import gateway as gateway_config

        settings = gateway_config.load(args.config)
        nats = settings.nats
        if settings.models_config is not None:
            catalogue = Catalogue.load(settings.models_config)
    updates: dict[str, object] = {}
    if args.nats or env_url:
        updates["servers"] = [args.nats or env_url]
    if args.creds:
        updates["credentials"] = args.creds
    if args.user:
        updates["user"], updates["password"] = args.user, args.password
    return nats.model_copy(update=updates), catalogue


async def _status(args: argparse.Namespace, nats: NatsSettings, catalogue: Catalogue | None, last: list[int]) -> int:
    where = ", ".join(nats.servers)
    try:
        nc = await connect(nats.servers, "cortex status", first_timeout=args.timeout, **nats.connect_options())
    except CortexError as exc:
        _unreachable(exc, where)
        return UNREACHABLE
    reader = _Reader(nc, catalogue)
    tty = sys.stdout.isatty()
    try:
        while True:
            try:
                report = await reader.report()
            except CortexError as exc:
                _unreachable(exc, where)
                return UNREACHABLE
            last[0] = HEALTHY if report.healthy else UNHEALTHY
            _show(report, args, tty)
            if args.watch is None:
                return last[0]
            await asyncio.sleep(max(args.watch, 0.2))
    finally:
        with contextlib.suppress(Exception):
            await nc.aclose()


def _unreachable(exc: CortexError, where: str) -> None:
    print(
        f"cortex status: cannot read the fleet from NATS at {where}: {exc.message}\n"
        "  Point --nats (or NATS_URL) at a server of the fleet, and pass --creds FILE or --user/--password "
        "if it needs them.",
        file=sys.stderr,
    )


def _show(report: FleetReport, args: argparse.Namespace, tty: bool) -> None:
    if args.json:
        text = report.model_dump_json() if args.watch is not None else report.model_dump_json(indent=2)
        print(text, flush=True)
        return
    text = render(report, color=tty and "NO_COLOR" not in os.environ, at=time.time())
    if args.watch is not None and tty:
        sys.stdout.write(_CLEAR)
    elif args.watch is not None:
        text += "\n"  # a blank line between refreshes in a log or a pipe
    print(text, flush=True)
    if report.problems and not (args.watch is not None and tty):
        print("\n".join(f"cortex status: {p}" for p in report.problems), file=sys.stderr, flush=True)


class _Reader:
    """Reads both buckets on one connection; a bucket not there yet is looked up again next time."""

    def __init__(self, nc: Connection, catalogue: Catalogue | None) -> None:
        self._nc = nc
        self._catalogue = catalogue
        self._buckets: dict[str, Bucket] = {}

    async def _values(self, bucket: str, keys: str = ">") -> dict[str, bytes] | None:
        kv = self._buckets.get(bucket) or await existing_bucket(self._nc, bucket)
        if kv is None:
            return None
        self._buckets[bucket] = kv
        return await snapshot(kv, keys)

    async def report(self) -> FleetReport:
        problems = []
        nodes = await self._values(NODES_BUCKET, HEARTBEAT_KEYS)  # not the estimates records: never shown
        if nodes is None:
            problems.append(
                f"KV bucket {NODES_BUCKET} does not exist on this NATS server: no neuron has ever connected to it "
                "(is --nats the fleet's server?)."
            )
        pins = bucket_values.pins(await self._values(PINS_BUCKET) or {})
        if self._catalogue is not None:
            pins = bucket_values.with_catalogue_pins(pins, self._catalogue)
        return build_report(bucket_values.sightings(nodes or {}), pins, problems=problems)
