"""`cortex models | load | unload | pin | unpin`: the admin API from a terminal.

They talk HTTP to a gateway (`--url`, or CORTEX_URL; the admin key from `--admin-key` or
CORTEX_ADMIN_KEY). `cortex load` draws the download and load progress that the node's
heartbeats report, while the gateway places and loads the model.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:31313"
_BAR = 30


class AdminError(Exception):
    pass


class Admin:
    def __init__(self, url: str, key: str | None, timeout: float = 30.0) -> None:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def get(self, path: str) -> Any:
        return self._check(self._http.get(path))

    def post(self, path: str, body: dict[str, Any], timeout: float | None = None) -> Any:
        return self._check(self._http.post(path, json=body, timeout=timeout or self._http.timeout))

    def _check(self, resp: httpx.Response) -> Any:
        try:
            body = resp.json()
        except ValueError:
            body = {}
        if resp.status_code >= 400:
            error = body.get("error", {}) if isinstance(body, dict) else {}
            raise AdminError(f"{resp.status_code}: {error.get('message') or resp.text}")
        return body


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", default=os.environ.get("CORTEX_URL", DEFAULT_URL), help="the gateway")
        p.add_argument("--admin-key", default=os.environ.get("CORTEX_ADMIN_KEY"), help="an [auth] admin key")

    models = sub.add_parser("models", help="list the catalogue and where each model is loaded")
    common(models)
    models.set_defaults(func=run, action=_models)

    load = sub.add_parser("load", help="load a model (placed by the gateway, or on --node)")
    common(load)
    load.add_argument("model")
    load.add_argument("--node")
    load.add_argument("--device", help="cpu or cuda:N (with --node)")
    load.set_defaults(func=run, action=_load)

    unload = sub.add_parser("unload", help="unload a model (from every node, or from --node)")
    common(unload)
    unload.add_argument("model")
    unload.add_argument("--node")
    unload.set_defaults(func=run, action=_unload)

    for verb, text in (("pin", "keep a model loaded on a node, across restarts"), ("unpin", "undo `cortex pin`")):
        p = sub.add_parser(verb, help=text)
        common(p)
        p.add_argument("model")
        p.add_argument("--node", required=True)
        p.set_defaults(func=run, action=_pin, verb=verb)


def run(args: argparse.Namespace) -> int:
    try:
        action: Callable[[Admin, argparse.Namespace], int] = args.action
        return action(Admin(args.url, args.admin_key), args)
    except AdminError as exc:
        print(f"cortex {args.command}: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"cortex {args.command}: cannot reach the gateway at {args.url}: {exc}", file=sys.stderr)
        return 1


def _models(admin: Admin, _: argparse.Namespace) -> int:
    rows = [("MODEL", "STATE", "NODES", "MEMORY", "PLACEABLE ON")]
    for m in admin.get("/v1/models")["data"]:
        states = ", ".join(f"{x['node']}:{x['state']}" for x in m.get("loaded", [])) or "-"
        memory = f"{m['memory_mb']} MB ({m['memory_source']})" if m.get("memory_mb") else "?"
        refused = f"refused: {m['refusal']['kind']}" if "refusal" in m else "-"
        placeable = ", ".join(m.get("placeable_on", [])) or refused
        rows.append((m["id"], states, ", ".join(m["nodes"]) or "-", memory, placeable))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _load(admin: Admin, args: argparse.Namespace) -> int:
    body = {"model": args.model, "node": args.node, "device": args.device}
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            result["entry"] = admin.post("/admin/models/load", {k: v for k, v in body.items() if v}, timeout=3600)
        except (AdminError, httpx.HTTPError) as exc:
            result["error"] = exc

    worker = threading.Thread(target=call, daemon=True)
    started = time.monotonic()
    worker.start()
    progress = _Progress(sys.stderr)
    while worker.is_alive():
        worker.join(0.5)
        try:
            entry = admin.get(f"/v1/models/{args.model}")
        except (AdminError, httpx.HTTPError):
            continue
        progress.show(entry, time.monotonic() - started)
    progress.close()
    if "error" in result:
        raise result["error"]
    entry = result["entry"]
    where = ", ".join(f"{x['node']} ({x['device']})" for x in entry["loaded"] if x["state"] == "ready")
    print(f"{entry['id']} is ready on {where} in {time.monotonic() - started:.1f}s, {entry['memory_mb']} MB")
    return 0


class _Progress:
    """One line, redrawn in place on a terminal; one line per change otherwise."""

    def __init__(self, out: Any) -> None:
        self._out = out
        self._tty = out.isatty()
        self._last = ""

    def show(self, entry: dict[str, Any], elapsed: float) -> None:
        loading = [x for x in entry.get("loaded", []) if x["state"] == "loading"]
        if not loading:
            return
        status = loading[0]
        if status.get("phase") == "download" and status.get("progress") is not None:
            done = int(status["progress"] * _BAR)
            line = f"downloading on {status['node']} [{'#' * done}{'.' * (_BAR - done)}] {status['progress']:.0%}"
        else:
            line = f"{status.get('phase') or 'loading'}ing on {status['node']} ({status['device']})"
        if self._tty:
            self._out.write(f"\r{line}  {elapsed:.0f}s\033[K")
            self._out.flush()
        elif line != self._last:
            print(line, file=self._out, flush=True)
        self._last = line

    def close(self) -> None:
        if self._tty and self._last:
            self._out.write("\r\033[K")
            self._out.flush()


def _unload(admin: Admin, args: argparse.Namespace) -> int:
    body = {"model": args.model, **({"node": args.node} if args.node else {})}
    reply = admin.post("/admin/models/unload", body)
    print(f"{reply['model']} unloaded from {', '.join(reply['unloaded_from'])}")
    return 0


def _pin(admin: Admin, args: argparse.Namespace) -> int:
    admin.post(f"/admin/models/{args.verb}", {"model": args.model, "node": args.node})
    print(f"{args.model} {args.verb}ned on {args.node}")
    return 0
