"""Every read of nats-py's private fields, in one place: the first to check when nats-py moves.

Checked against nats-py 2.16.0. Each reads what nats-py has no public handle on; a version that
renames one fails here (the KV watch at once, loudly; the micro stats quietly undercount).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue
from nats.micro.service import Service

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KvInternals:
    """A KeyValue's own JetStream context, subject prefix and stream: a bucket's, not ours to guess
    (a mirror or a domain changes them)."""

    js: JetStreamContext
    prefix: str
    stream: str
    name: str


def kv_internals(kv: KeyValue) -> KvInternals:
    return KvInternals(js=kv._js, prefix=kv._pre, stream=kv._stream, name=kv._name)


def count_endpoint_error(service: Service, subject: str, status: int, message: str) -> None:
    """Counts an error reply in the endpoint stats that `nats micro stats` / `info` show.

    nats-py's micro counts an error only when a handler raises, and then answers with an empty body;
    ours answer errors themselves, with a body, so they count them here, as nats.go's micro does for
    every error reply. nats-py has no public handle on an endpoint's stats.
    """
    try:
        for endpoint in service._endpoints:
            if endpoint._subject == subject:
                endpoint._num_errors += 1
                endpoint._last_error = f"{status}:{message}"
    except AttributeError:  # a nats-py that renamed them: the stats undercount, the reply still goes out
        log.debug("cannot count an error in the micro stats of %s", subject)
