"""Local nodes: node processes an in-process ``Hub`` starts on this machine (``start_local``).

Each has a home of its own under the hub's (``HOME/local/NAME``: its key, its ``joined``
record, its ``node.log``) and runs ``python -m odium node`` in a session of its own, so that a
Ctrl-C meant for the hub's process (the notebook's stop button signals the kernel's whole
process group) does not stop it; it stops when the hub's process is gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

MAX_LOCAL = 256  # local nodes one start_local call may start


@dataclass
class LocalNode:
    """A node process started on this machine by the hub."""

    name: str
    home: Path
    proc: subprocess.Popen[bytes]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def free_name(prefix: str, base: Path, running: set[str], known: set[str]) -> str:
    """The first local name ``PREFIX-N`` whose node is not running and that is either unknown
    to the hub or a local node's already (its home has a key): a hub started again with the
    same home gets its local nodes back (same home, same key), not new ones."""
    seq = 0
    while True:
        seq += 1
        name = f"{prefix}-{seq}"
        if name in running:
            continue
        if name not in known or (base / name / "identity.key").exists():
            return name


def launch(name: str, home: Path, app: str, *, python: str | None = None,
           capacity: int | None = None, extra_args: Sequence[str] = (),
           env: Mapping[str, str] | None = None) -> LocalNode:
    """Start the node process of a local node whose home is ready (key, joined record)."""
    cmd = [python or sys.executable, "-m", "odium", "node", "--home", str(home), "--app", app,
           *extra_args]
    if capacity:
        cmd += ["--capacity", str(capacity)]
    logf = open(home / "node.log", "ab")
    # its own session: a Ctrl-C meant for this process (the notebook's stop button
    # signals the kernel's whole process group) must not stop the node
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf,
                            stderr=subprocess.STDOUT, cwd=app, start_new_session=True,
                            env={**os.environ, **(env or {}),
                                 "ODIUM_DIE_WITH_PARENT": str(os.getpid())})
    logf.close()
    return LocalNode(name, home, proc)
