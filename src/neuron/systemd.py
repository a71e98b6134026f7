"""systemd's readiness protocol (sd_notify), so `Type=notify` units know when the neuron serves.

Without it systemd would call the neuron started as soon as the process exists, and
`TimeoutStartSec` could not catch a daemon that never reaches NATS.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str) -> None:
    """Sends `state` ("READY=1", "STOPPING=1", "STATUS=...") to systemd; a no-op outside a notify unit.

    Never raises: a lost notification must not take the daemon down.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # Linux abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("could not tell systemd %r: %s", state, exc)
