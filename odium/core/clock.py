"""An instance's clock: its hub's time, not its own wall clock.

Every message carries a timestamp, and receivers refuse one outside the replay window
(``odium.core.guards``). Lab machines without NTP are often minutes or hours off, so a node
does not stamp with its wall clock: it learns its hub's time from the hub's own signed answers
and keeps it as an offset from its *monotonic* clock (which a fixed wall clock does not move).
A hub that is a node of no one (the root) keeps its wall clock. A relay learns its hub's time,
and its own nodes learn it from the relay: one time down the whole tree.

``skew()`` is how far this machine's wall clock is from the time it uses (positive: ahead), as
``odium nodes`` shows it.
"""

from __future__ import annotations

import time
from typing import Any

from ..errors import ClockError

SETTLE = 0.05  # seconds of slack on top of the readings' own uncertainty (half a round trip)
MAX_SKEW = 25 * 3600.0  # how far a hub's time may be from this machine's wall clock


class Clock:
    """Time as this instance's hub tells it (callable: seconds since the epoch, as time.time)."""

    def __init__(self) -> None:
        self._base = 0.0  # the hub's time minus this machine's monotonic clock, once learnt
        self.learnt = False  # whether the hub's time is known (else: the local wall clock)
        self.moves = 0  # how often the hub's time moved after it was learnt (a clock fixed)
        # what the readings so far allow for the base: each says it is within its round trip
        self._lo, self._hi = float("-inf"), float("inf")

    def __call__(self) -> float:
        return time.monotonic() + self._base if self.learnt else time.time()

    def skew(self) -> float:
        """This machine's wall clock minus the time it uses (0.0 for the root)."""
        return time.time() - self()

    def learn(self, hub_ts: float, sent: float, received: float) -> bool:
        """A timestamp the hub signed between ``sent`` and ``received`` (monotonic seconds):
        its time then was ``hub_ts``, somewhere in between. Readings narrow down the base
        together (a slow answer, in a join storm, must not leave a node a second off); one
        that cannot agree with them means the hub's time moved (its clock was fixed) and
        starts anew. Where the readings allow this machine's own wall clock, the clock is
        that (a machine kept right by NTP shows no skew at all); else it is the middle of
        what they allow. True if the clock moved."""
        if not (received >= sent and hub_ts > 0):
            return False
        base = hub_ts - (sent + received) / 2
        off = time.time() - time.monotonic() - base  # this machine's wall clock ahead of it
        if abs(off) > MAX_SKEW:  # (else a hub could move a node's clock anywhere: see
            raise ClockError(     # odium.node.ledger for what a day's worth of it may do)
                f"this machine's clock is {abs(off) / 3600:.1f} h "
                f"{'ahead of' if off > 0 else 'behind'} its hub's time, more than the "
                f"{MAX_SKEW / 3600:.0f} h a node may be off: set it right")
        lo, hi = hub_ts - received - SETTLE, hub_ts - sent + SETTLE
        moved = not self.learnt or lo > self._hi or hi < self._lo
        if moved:
            self.moves += self.learnt
            self._lo, self._hi = lo, hi
        else:
            self._lo, self._hi = max(self._lo, lo), min(self._hi, hi)
        local = time.time() - time.monotonic()
        before = self._base if self.learnt else None
        self._base = (local if self._lo <= local <= self._hi
                      else (self._lo + self._hi) / 2)
        self.learnt = True
        return moved and before != self._base


def hub_times(res: dict[str, Any], skew: float) -> dict[str, Any]:
    """A worker's result with its start and end moved from this machine's wall clock to the
    hub's time (``skew``: how far this clock is ahead, odium.core.clock)."""
    if not skew:
        return res
    return {**res, **{k: res[k] - skew for k in ("started", "finished") if res.get(k)}}


__all__ = ["Clock", "MAX_SKEW", "SETTLE", "hub_times"]
