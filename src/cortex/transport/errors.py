"""The one place nats-py's exceptions become cortex's (`cortex.protocol.errors`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import nats.errors
import nats.js.errors

from cortex.protocol.errors import CortexError, ErrorCode, NoCapacity, TransportError


@contextlib.contextmanager
def map_nats_errors(what: str) -> Iterator[None]:
    """Turn nats-py's exceptions into cortex's, naming what we were doing."""
    try:
        yield
    except CortexError:
        raise
    except nats.errors.NoRespondersError as exc:
        raise NoCapacity(f"{what}: nobody is listening") from exc
    except (TimeoutError, nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError) as exc:
        raise TransportError(f"{what}: NATS did not answer in time", code=ErrorCode.timeout) from exc
    except nats.errors.OutboundBufferLimitError as exc:
        # A fail-fast connection (see `connect`) refusing to buffer while it reconnects.
        raise TransportError(f"{what}: NATS is unreachable (reconnecting); retry shortly") from exc
    except (nats.errors.ConnectionClosedError, nats.errors.NoServersError, OSError) as exc:
        raise TransportError(f"{what}: NATS is unreachable ({exc})") from exc
    except nats.errors.Error as exc:
        raise TransportError(f"{what}: {exc}") from exc
