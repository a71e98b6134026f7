"""Server-sent event framing."""

from __future__ import annotations

import json
from typing import Any


def event(data: Any, name: str | None = None) -> bytes:
    body = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {body}\n\n".encode()
