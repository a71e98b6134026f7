"""Listen addresses as settings spell them."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """An address (or `localhost`) reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_host_port(listen: str) -> tuple[str, int]:
    """`host:port` of a listen setting; an empty host means every interface."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)
