"""What the benchmarks share: waiting on a condition with a deadline (nothing here sleeps to
synchronise), and finding every process one run started, by a tag in its environment that
each inherits, to stop and name what is left at the end."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any


def wait_until(pred: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.005) -> Any:
    """Poll ``pred`` until it is truthy; raise TimeoutError naming ``what`` past ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class RunTag:
    """``var=<this run>`` in the environment of every process started after ``mark``."""

    def __init__(self, var: str) -> None:
        self.var = var
        self.value = f"{os.getpid()}.{time.time_ns()}"

    def mark(self) -> None:
        os.environ[self.var] = self.value  # inherited by every process started from here on

    def tagged(self) -> list[int]:
        """Live processes (not zombies) that carry this run's tag."""
        needle = f"{self.var}={self.value}\0".encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = f.read()
                with open(f"/proc/{entry}/stat", "rb") as f:
                    zombie = f.read().rsplit(b")", 1)[-1].split()[0] == b"Z"
            except OSError:  # gone, or not ours
                continue
            if not zombie and (env.startswith(needle) or b"\0" + needle in env):
                found.append(int(entry))
        return found

    def left_behind(self, timeout: float = 10.0) -> list[str]:
        """Wait (up to ``timeout``) until no process of this run is left; SIGKILL and
        describe those that still are."""
        try:
            wait_until(lambda: not self.tagged(), timeout, "every process of this run to end",
                       0.02)
            return []
        except TimeoutError:
            pass
        out = []
        for pid in self.tagged():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:160]
                os.kill(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                cmd = "(gone)"
            out.append(f"{pid}: {cmd}")
        return out


__all__ = ["RunTag", "wait_until"]
