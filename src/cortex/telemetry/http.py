"""/metrics and /healthz on a port of their own, served from a daemon thread.

A scrape must answer while the event loop is busy (or stuck: that is when it matters most),
so this does not run on the loop. `health` is called on this thread: it must only read
plain attributes.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

Health = Callable[[], tuple[bool, dict[str, Any]]]


class TelemetryServer:
    def __init__(self, host: str, port: int, registry: CollectorRegistry, health: Health) -> None:
        self._address = (host, port)
        self._registry = registry
        self._health = health
        self._server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int | None:
        return self._server.server_address[1] if self._server else None

    def start(self) -> bool:
        """False (and a logged error) when the port cannot be bound: serving goes on without it."""
        registry, health = self._registry, self._health

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # the stdlib's name
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    try:
                        body = generate_latest(registry)
                    except Exception as exc:  # a broken collector: say so, rather than drop the connection
                        log.exception("collecting metrics failed")
                        self._send(500, "text/plain", f"collecting metrics failed: {exc!r}\n".encode())
                        return
                    self._send(200, CONTENT_TYPE_LATEST, body)
                elif path in ("/healthz", "/health"):
                    ok, checks = health()
                    self._send(200 if ok else 503, "application/json", json.dumps(checks).encode())
                else:
                    self._send(404, "text/plain", b"not found: try /metrics or /healthz\n")

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:  # scrapes every few seconds are not news
                pass

        try:
            server_class = _server_for(*self._address)
            self._server = server_class(self._address, Handler)
        except OSError as exc:
            host, port = self._address
            log.error("cannot serve /metrics on %s:%d: %s; set another metrics_listen", host, port, exc)
            return False
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="telemetry-http", daemon=True).start()
        return True

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _server_for(host: str, port: int) -> type[ThreadingHTTPServer]:
    """A server class of the address's family: `[::]:13131` listens on IPv6, `0.0.0.0:13131` on IPv4."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    return type("TelemetryHTTPServer", (ThreadingHTTPServer,), {"address_family": family})
