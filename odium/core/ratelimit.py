"""A token bucket: how much a flood of bad input may make an instance log or report."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """``size`` tokens, refilled at ``rate`` a second; ``take()`` is True while one is left.

    The clock is a parameter so that tests need no sleeping (``time.monotonic`` by default)."""

    def __init__(self, size: float, rate: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.size, self.rate, self._clock = size, rate, clock
        self._tokens = size
        self._at = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self.size, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True
