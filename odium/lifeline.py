"""Tying a node's processes to its life: none of them outlives the node, even a node killed
with SIGKILL (Linux: the parent-death signal, plus a parent check and a watchdog pipe).

The tree of a node: its fork server (a child of the node), the workers the fork server
forks (children of the fork server, not of the node), workers started as new interpreters
when there is no fork server (children of the node), and multiprocessing's resource tracker
(a child of the node). Each link is held two ways:

* every child asks the kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``), then
  checks that its parent is still the process that started it (the parent may have died
  before the request: the signal is then never sent);
* the fork server also watches its "alive" pipe, whose write end only the node holds: when
  the node dies, the pipe reaches end of file and the fork server exits (then its workers
  get their parent-death signal). A forked worker therefore closes the copy of that write
  end it inherits, and its copy of the resource tracker's pipe, which otherwise keep the
  fork server and the tracker waiting for ever.

The parent-death signal comes when the *thread* that made the child ends: the node makes
its fork server and workers from one thread that lives as long as it does (the executor's
starter thread), and the fork server forks from its only thread.
"""

from __future__ import annotations

import os
import signal
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


def forked_by_forkserver() -> None:
    """In a worker just forked by the node's fork server: die with the fork server, and let go
    of the pipes it inherited from it, so that the node's death ends the fork server."""
    die_with_parent(os.getppid())
    from multiprocessing import forkserver, resource_tracker

    server: object = forkserver._forkserver
    tracker: object = resource_tracker._resource_tracker
    for owner, attr in ((server, "_forkserver_alive_fd"), (tracker, "_fd")):
        fd = getattr(owner, attr, None)
        if isinstance(fd, int):
            try:
                os.close(fd)
            except OSError:
                pass
            setattr(owner, attr, None)  # code here that needs a tracker starts its own
    if hasattr(tracker, "_pid"):
        setattr(tracker, "_pid", None)  # noqa: B010 - a private attribute, named once


def in_forkserver() -> None:
    """In the node's fork server, as it starts (it imports ``odium.forkserver_guard`` first):
    die with the node. Should the node be dead already, the alive pipe ends the server."""
    die_with_parent(os.getppid(), watch=False)


__all__ = ["die_with_parent", "forked_by_forkserver", "in_forkserver"]
