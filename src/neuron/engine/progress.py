"""Whether a device's running jobs are making progress, for the heartbeat.

A device whose decode steps suddenly take many times what they usually take (its cores taken by
another process, a GPU gone wrong, a step stuck in native code) still looks up to the fleet
while its jobs gain a token every few seconds. The device thread times each step that has rows
decoding; the node reads `stalled` for its heartbeat, and gateways send such a node no new work
until its steps are quick again.
"""

from __future__ import annotations

import time

# A step (or the one running now) taking this many times the usual one is a stall...
STALL_FACTOR = 20.0
# ...once it takes at least this long (a fast model's steps vary by more than 20x at ~1 ms)...
STALL_FLOOR_S = 2.0
# ...and in any case when it takes this long (a node slow from its start has no usual step).
STALL_CEILING_S = 30.0
_SMOOTHING = 0.1


class Progress:
    """Written on the device thread, read anywhere (plain float reads)."""

    def __init__(self, ceiling_s: float = STALL_CEILING_S) -> None:
        self._ceiling = ceiling_s
        self._usual = 0.0  # a decode step's running average, outside stalls
        self._last = 0.0  # the last step's length, while rows are decoding
        self._since = 0.0  # when the step running now began (0: none)

    def begin(self) -> None:
        self._since = time.monotonic()

    def end(self) -> None:
        seconds = time.monotonic() - self._since
        self._since = 0.0
        self._last = seconds
        if not self._usual:
            self._usual = seconds
        elif seconds < 5 * self._usual:  # a stall does not become the usual
            self._usual = (1 - _SMOOTHING) * self._usual + _SMOOTHING * seconds

    def idle(self) -> None:
        """Nothing decodes: nothing can be stalled."""
        self._last = 0.0

    @property
    def stalled(self) -> bool:
        since = self._since
        running = time.monotonic() - since if since else 0.0
        limit = min(self._ceiling, max(STALL_FLOOR_S, STALL_FACTOR * self._usual)) if self._usual else self._ceiling
        return max(running, self._last) > limit
