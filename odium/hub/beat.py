"""The hub's heartbeat interval, which nodes beat at too: the configured one, longer when many
nodes are connected, so that the hub takes at most ``NODE_BEATS`` node heartbeats a second
(each one verified: ~0.1 ms) however many nodes it has; and how often it beats while nodes
connect (each beat reaches every node: fewer when there are many)."""

from __future__ import annotations

import math
import time

from .nodes import LIVENESS_BEATS

NODE_BEATS = 200  # node heartbeats a second, at most, at the hub (1,000 nodes: every 5 s)
STEP = 0.5  # seconds: a longer interval is a multiple of this, so that it moves seldom
FAST_BEATS = 5000  # while nodes connect: beats a second times nodes reached, at most


class Beat:
    def __init__(self, base: float) -> None:
        self.base = base
        self.interval = base  # what the hub announces now
        self._longer = base  # an interval announced before this one, longer ...
        self._until = 0.0  # ... which counts for liveness until then (monotonic)

    def update(self, nodes: int) -> float:
        """The interval for ``nodes`` live nodes; a change is announced in the next beat."""
        want = nodes / NODE_BEATS
        new = self.base if want <= self.base else math.ceil(want / STEP) * STEP
        if new < self.interval:  # nodes still beat at the old pace until they hear the new
            self._longer = self.interval
            self._until = time.monotonic() + LIVENESS_BEATS * self.interval
        self.interval = new
        return new

    def liveness(self) -> float:
        """The interval a node's silence is judged by: the longest one it may still follow."""
        if time.monotonic() < self._until:
            return max(self.interval, self._longer)
        return self.interval

    def fast(self, nodes: int) -> float:
        """Seconds between beats while nodes connect (a node is ready once it heard one)."""
        return max(0.02, nodes / FAST_BEATS)


__all__ = ["Beat", "NODE_BEATS"]
