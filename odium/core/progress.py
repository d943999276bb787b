"""Progress as text: a bar, "k of n done", who is still running, and when to show it again.

Pure: the places that show it are odium/api/progress.py (a terminal line, a notebook display)
and odium/jupyter/live.py (a broadcast's live view).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

RATE = 10.0  # refreshes a second at most: a 10,000-job map must not pay for its bar
NAMES = 10  # names shown of those still running, then "…"


def bar(done: int, total: int, width: int = 24) -> str:
    """``[#########---------------]``: done of total, ``width`` characters inside."""
    filled = width if total <= 0 else min(width, width * max(0, done) // total)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def still_running(names: Sequence[str], limit: int = NAMES) -> str:
    """The first ``limit`` names, then ``…`` and how many more."""
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f", … ({len(names) - limit} more)"


def summary(done: int, total: int, what: str = "jobs", elapsed: float | None = None) -> str:
    """``37 of 100 jobs done · 4.1 s``."""
    text = f"{done} of {total} {what} done"
    return text if elapsed is None else f"{text} · {elapsed:.1f} s"


def counts_line(statuses: Mapping[str, int], order: Sequence[str], finished: int,
                total: int) -> str:
    """``12 of 30 finished: 4 running, 14 queued, 10 done, 2 failed`` (no status with 0)."""
    parts = [f"{statuses[s]} {s}" for s in order if statuses.get(s)]
    parts += [f"{n} {s}" for s, n in sorted(statuses.items()) if s not in order and n]
    return f"{finished} of {total} finished" + (": " + ", ".join(parts) if parts else "")


class Pacer:
    """Whether a refresh is due at ``now`` (seconds of a monotonic clock): the first one at
    once, then at most ``rate`` a second. The last one is the caller's to force."""

    def __init__(self, rate: float = RATE) -> None:
        self.every = 1.0 / rate
        self.last: float | None = None

    def due(self, now: float) -> bool:
        if self.last is not None and now - self.last < self.every:
            return False
        self.last = now
        return True


__all__ = ["RATE", "NAMES", "bar", "still_running", "summary", "counts_line", "Pacer"]
