"""A FleetReport as text for a terminal: a header line, one block per node, then the problems."""

from __future__ import annotations

import time
from collections.abc import Callable

from cortex.fleet_report.report import DeviceReport, FleetReport, ModelReport, NodeReport

BAR_WIDTH = 20
_NAME_WIDTH = 28
_COLORS = {"ready": 32, "up": 32, "healthy": 32, "loading": 33, "unloading": 33, "draining": 33, "stalled": 31}
_BAD = 31

# paint(text, key): `text` in the color of `key` (a state, a status, `healthy` or `bad`), or as it is.
Paint = Callable[[str, str], str]


def render(report: FleetReport, *, color: bool = False, at: float | None = None) -> str:
    paint = _painter(color)
    t = report.totals
    when = time.strftime("%H:%M:%S", time.localtime(at if at is not None else time.time()))
    health = paint("HEALTHY" if report.healthy else "UNHEALTHY", "healthy" if report.healthy else "bad")
    lines = [
        f"cortex fleet at {when}: {health}  {t.nodes_up}/{t.nodes} nodes up, {t.models_ready} models ready, "
        f"in flight {t.in_flight}, queued {t.queued}, {t.tokens_per_s:.1f} tok/s, "
        f"memory {_gb(t.memory_used_mb)}/{_gb(t.memory_total_mb)} GB"
    ]
    for node in report.nodes:
        lines += ["", *_node(node, paint)]
    if report.problems:
        lines += ["", "problems:", *(f"  - {p}" for p in report.problems)]
    return "\n".join(lines)


def memory_bar(used_mb: int, total_mb: int, width: int = BAR_WIDTH) -> str:
    """`[#######.............] 3.1/8.0 GB`"""
    filled = round(width * used_mb / total_mb) if total_mb > 0 else 0
    filled = min(max(filled, 0), width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {_gb(used_mb)}/{_gb(total_mb)} GB"


def _node(node: NodeReport, paint: Paint) -> list[str]:
    head = (
        f"{node.name}  {paint(node.status, node.status)}  v{node.version}  heartbeat {node.age_s:.1f}s ago  "
        f"up {_duration(node.uptime_s)}  {node.tokens_per_s:.1f} tok/s"
    )
    lines = [head]
    lines += [f"  {_device(d)}" for d in node.devices]
    if not node.models:
        return [*lines, "  (no model loaded)"]
    header = ("MODEL", "STATE", "DEVICE", "ENGINE", "MEMORY", "PARALLEL", "IN FLIGHT", "QUEUED", "TOK/S", "CACHE", "")
    rows: list[tuple[str, ...]] = [header]
    rows += [_model_row(m) for m in node.models]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=True)]
        if i > 0:  # color after padding: escape codes would break the widths
            cells[1] = paint(cells[1], row[1].split(" ")[0])
        lines.append(("  " + "  ".join(cells)).rstrip())
    lines += [f"    {m.id}: {m.error}" for m in node.models if m.error]
    return lines


def _device(d: DeviceReport) -> str:
    name = d.name if len(d.name) <= _NAME_WIDTH else d.name[: _NAME_WIDTH - 1] + "…"
    return f"{d.id:<8} {name:<{_NAME_WIDTH}} {memory_bar(d.used_mb, d.total_mb)}"


def _model_row(m: ModelReport) -> tuple[str, ...]:
    state = m.state.value
    if m.phase:
        state += f" ({m.phase}{f' {m.progress:.0%}' if m.progress is not None else ''})"
    return (
        m.id,
        state,
        ",".join(m.devices) if len(m.devices) > 1 else m.device,
        m.engine or "-",
        f"{m.memory_mb} MB" if m.memory_mb else "-",
        str(m.parallel) if m.parallel is not None else "-",
        str(m.in_flight),
        str(m.queued),
        f"{m.tokens_per_s:.1f}",
        _cache(m),
        "pinned" if m.pinned else "",
    )


def _cache(m: ModelReport) -> str:
    """`3.2k tok 74 MB, 81% hit`: what its prefix cache keeps, and how much of the prompts it served."""
    if m.cache_tokens is None or m.cache_hit_rate is None:
        return "-"
    return f"{m.cache_tokens / 1000:.1f}k tok {m.cache_mb or 0:.0f} MB, {m.cache_hit_rate:.0%} hit"


def _painter(color: bool) -> Paint:
    def paint(text: str, key: str) -> str:
        if not color:
            return text
        code = _COLORS.get(key, _BAD if key in ("failed", "stale", "bad") else 0)
        return f"\033[{code}m{text}\033[0m" if code else text

    return paint


def _gb(mb: int) -> str:
    return f"{mb / 1024:.1f}"


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
