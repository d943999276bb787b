"""Tying a node's processes to its life: none of them outlives the node, even a node killed
with SIGKILL (Linux: the parent-death signal, plus a parent check and a watchdog socket).

The tree of a node: its zygote (a child of the node, ``odium.node.workers.zygote``), the
workers the zygote forks (children of the zygote, not of the node), workers started as new
interpreters when there is no zygote (children of the node), and the reaper of process groups
(below). Each link is held two ways:

* every child asks the kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``), then
  checks that its parent is still the process that started it (the parent may have died
  before the request: the signal is then never sent);
* the zygote also reads its socket to the node, whose other end only the node holds: when
  the node dies, the socket ends and the zygote exits (then its workers get their
  parent-death signal). A forked worker closes its copy of that socket first thing.

The parent-death signal comes when the *thread* that made the child ends: ``odium node``
forks its zygote from its main thread, which lives as long as it does; elsewhere the node
makes its zygote and workers from one thread that lives as long as it does (the starter
thread of ``odium.node.workers.start``), and the zygote forks from its only thread.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
WATCH_EVERY = 1.0  # seconds between two looks at the parent, where there is no prctl


def die_with_parent(parent: int, watch: bool = True) -> None:
    """End this process (SIGKILL) when ``parent``, the process that started it, dies.

    Call it in the child's main thread, early. Where prctl is missing, ``watch`` polls the
    parent id instead (once a second)."""
    armed = False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        armed = libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before we asked
        os._exit(1)
    if armed or not watch:
        return

    def look() -> None:
        while os.getppid() == parent:
            time.sleep(WATCH_EVERY)
        os._exit(1)

    threading.Thread(target=look, name="odium-parent-watch", daemon=True).start()


# The reaper: a tiny interpreter (no site, no odium) that kills the process groups of the
# shell commands a node started when the node dies (its parent-death signal, or end of file
# on its stdin, whose write end only the node holds). Groups it is told of: "+PGID" / "-PGID"
# lines; every few seconds it forgets groups that have no process left (so a number reused
# later by an unrelated group is never killed).
_REAPER = r"""
import os, select, signal, sys
import time
groups = {}
buf = b""
def take(data):
    global buf
    buf += data
    *lines, buf = buf.split(b"\n")
    for line in lines:
        if line[:1] == b"+":
            groups[int(line[1:])] = time.monotonic()
        elif line[:1] == b"-":
            groups.pop(int(line[1:]), None)
def end(*_):
    os.set_blocking(0, False)  # the node may have died before we read what it wrote
    try:
        while True:
            data = os.read(0, 65536)
            if not data:
                break
            take(data)
    except OSError:
        pass
    for g in groups:
        try:
            os.killpg(g, signal.SIGKILL)
        except OSError:
            pass
    os._exit(0)
signal.signal(signal.SIGTERM, end)
signal.signal(signal.SIGINT, signal.SIG_IGN)
try:
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    end()
while True:
    if not select.select([0], [], [], 5.0)[0]:
        for g, since in list(groups.items()):
            if time.monotonic() - since < 10:
                continue  # (a worker makes its group a moment after it is told of)
            try:
                os.killpg(g, 0)
            except ProcessLookupError:
                del groups[g]
            except OSError:
                pass
        continue
    data = os.read(0, 65536)
    if not data:
        end()
    take(data)
"""


class GroupReaper:
    """Kills the process groups of a node's shell commands (each runs in a session of its
    own, so that an interrupt reaches all its processes) and of its workers (each in a group
    of its own, with whatever the user's code starts there) when the node dies, even by
    SIGKILL: the parent-death signal alone would end only each group's first process.

    Started at the first command or worker, from a thread that lives as long as the node
    (the loop thread or the starter thread); one per process (``REAPER``)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()  # the loop thread and the starter thread both tell it

    def ready(self) -> int:
        """Have the reaper running; the file descriptor its groups are told on. A child can
        tell its own group there itself, before it runs anything (see ``announce``)."""
        with self._lock:
            self._ready()
            assert self.proc is not None and self.proc.stdin is not None
            return self.proc.stdin.fileno()

    def announced(self, command: str) -> tuple[list[str], int]:
        """The argv of a shell running ``command`` as a process group's leader that first
        tells the reaper its group itself (one line on the reaper's pipe, atomic), so that no
        moment passes in which the node could die with the group unknown to the reaper and
        the command running; and what the child's stdin must be: the reaper's pipe, which it
        writes to, then replaces with /dev/null for the command (dash takes no descriptor
        above 9 in a redirection: the pipe comes as 0).

        (Not a ``preexec_fn``: with one, every start forks the whole node, holding its lock
        meanwhile; 200 at once took seconds and the node missed its heartbeats.)"""
        fd = self.ready()
        tell = 'printf "+%d\\n" "$$" >&0 2>/dev/null; exec /bin/sh -c "$1" </dev/null'
        return ["/bin/sh", "-c", tell, "odium-shell", command], fd

    def _ready(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _REAPER, str(os.getpid())],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True)

    def _tell(self, line: str) -> None:
        with self._lock:
            for _ in range(2):
                self._ready()
                assert self.proc is not None and self.proc.stdin is not None
                try:
                    self.proc.stdin.write(line.encode() + b"\n")
                    self.proc.stdin.flush()
                    return
                except (BrokenPipeError, OSError):
                    self.proc = None

    def watch(self, pgid: int) -> None:
        self._tell(f"+{pgid}")

    def forget(self, pgid: int) -> None:
        """The group's leader ended: forget the group once nothing is left in it (the reaper
        still ends what a command left running in the background when the node dies)."""
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            if self.proc is not None:
                self._tell(f"-{pgid}")
        except OSError:
            pass

    def close(self) -> None:
        """The node stops: the reaper ends what is left in its groups, and itself."""
        with self._lock:
            proc, self.proc = self.proc, None
        if proc is not None and proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


REAPER = GroupReaper()  # this process's (a node's) reaper


def own_group() -> None:
    """In a worker, as it starts: a process group of its own, so that what the user's code
    starts there ends with the node too (the node's reaper kills the group)."""
    try:
        os.setpgid(0, 0)
    except OSError:
        pass


__all__ = ["REAPER", "GroupReaper", "die_with_parent", "own_group"]
