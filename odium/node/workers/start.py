"""Starting a node's worker processes: forked from the node's fork server (preloaded, so in
milliseconds) or, when there is none, new interpreters; always from one long-lived thread, in
the background, and tied to the node's life (``odium.node.lifeline``). Also the worker's side
of its start (``connect``)."""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.process
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ..lifeline import REAPER, die_with_parent, forked_by_forkserver, own_group
from .channel import Channel

log = logging.getLogger(__name__)

KILL_GRACE = 2.0  # seconds between SIGINT and SIGKILL when a worker must stop

# what the fork server imports before it forks: the guard first (it ties the fork server's
# life to the node's), then the worker loops (with all they import)
PRELOAD = ["odium.node.forkserver_guard", "odium.node.workers.session", "odium.node.workers.job"]


class _ProcessHandle:
    """The parts of ``subprocess.Popen`` the executor uses, over a ``multiprocessing.Process``."""

    def __init__(self, p: multiprocessing.process.BaseProcess) -> None:
        self.p = p
        self.pid = p.pid or 0

    def poll(self) -> int | None:
        return None if self.p.is_alive() else self.p.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.p.join(timeout)
        if self.p.exitcode is None:
            raise subprocess.TimeoutExpired("odium-worker", timeout or 0)
        return self.p.exitcode

    def send_signal(self, sig: int) -> None:
        if self.pid > 0 and self.p.is_alive():
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.p.kill()

    def terminate(self) -> None:
        self.p.terminate()


_FORK_CTX: Any = None
START_TIMEOUT = 60.0  # seconds a worker may take to start before a signal gives up on it


class _Starter:
    """The one thread that starts this process's fork server and worker processes, one at a
    time, and lives as long as the process.

    Long-lived on purpose: the kernel sends a child its parent-death signal when the
    *thread* that made it ends, not the process; a worker (or the fork server) made by a
    short-lived thread would be killed as soon as that thread was done.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def submit(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if self._thread is None or self._pid != os.getpid():  # none yet, or we forked
                self._queue = queue.SimpleQueue()
                self._thread = threading.Thread(target=self._run, args=(self._queue,),
                                                name="odium-starter", daemon=True)
                self._pid = os.getpid()
                self._thread.start()
            self._queue.put(fn)

    @staticmethod
    def _run(q: queue.SimpleQueue[Callable[[], None]]) -> None:
        while True:
            fn = q.get()
            try:
                fn()
            except Exception:  # noqa: BLE001 - one failed start must not stop the others
                log.exception("starting a process failed")


_STARTER = _Starter()


def forkserver_context() -> Any:
    """The multiprocessing fork server of this process, preloaded with the workers' modules
    (``PRELOAD``)."""
    global _FORK_CTX
    if _FORK_CTX is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        _FORK_CTX = ctx
    return _FORK_CTX


_USERS = 0  # node parts of this process that use the fork server


def warm_forkserver() -> None:
    """Start the fork server now (it imports in the background), so the first worker is fast.
    Returns at once: the starter thread starts it (see ``_Starter``). A node part that calls
    this calls ``release_forkserver`` when it closes."""
    from multiprocessing import forkserver

    global _USERS
    forkserver_context()
    _USERS += 1
    _STARTER.submit(forkserver.ensure_running)


def release_forkserver(timeout: float = 5.0) -> None:
    """A node part closed (its workers are gone). When it was the last one in this process,
    stop the fork server and multiprocessing's resource tracker: a process that goes on after
    its node part (a notebook, a hub in the middle of a tree, a test) keeps neither. Waits for
    them to end, at most ``timeout`` seconds; a later node part starts them again."""
    global _USERS
    _USERS = max(0, _USERS - 1)
    if _USERS:
        return
    done = threading.Event()

    def stop() -> None:  # in the starter thread: never while it starts a worker
        try:
            from multiprocessing import forkserver, resource_tracker

            # the stdlib's own way to stop them (what its tests use); on an interpreter
            # without it the processes end with this one instead
            getattr(forkserver._forkserver, "_stop", lambda: None)()
            getattr(resource_tracker._resource_tracker, "_stop", lambda: None)()
        except (OSError, ChildProcessError) as e:
            log.warning("stopping the fork server: %s", e)
        finally:
            done.set()

    _STARTER.submit(stop)
    done.wait(timeout)


class _Starting:
    """A worker process started by the starter thread, with the parts of ``subprocess.Popen``
    the executor and the job pool use.

    Starting a worker waits for the fork server to fork it, and the first time for the fork
    server to finish its imports: a second or more on a loaded machine. The node's loop must
    not wait (its heartbeats would stop, and its hub would call it lost), so it gets this
    handle at once, and the worker's "ready" on the socketpair when it has started. Until
    then the handle counts as running; a kill or terminate is done as soon as it has started,
    a signal or a wait first waits for the start.
    """

    def __init__(self, forked: Callable[[socket.socket, str], None], fresh: str, app: str,
                 name: str, child: socket.socket) -> None:
        self.proc: Any = None  # subprocess.Popen or _ProcessHandle, once started
        self.started = threading.Event()
        self._lock = threading.Lock()
        self._doomed = ""  # "kill" or "terminate": asked before the start had finished
        forkserver_context()
        _STARTER.submit(lambda: self._start(forked, fresh, app, name, child))

    def _start(self, forked: Callable[[socket.socket, str], None], fresh: str, app: str,
               name: str, child: socket.socket) -> None:
        proc = None
        try:
            proc = _start_process(forked, fresh, app, name, child)
        except Exception:  # noqa: BLE001 - the worker's socket ends: the owner sees it died
            log.exception("could not start a worker process")
        finally:
            child.close()
            if proc is not None and getattr(proc, "pid", None):
                REAPER.watch(proc.pid)  # the worker's own group (own_group), and all in it
            with self._lock:
                self.proc = proc
                self.started.set()
                doomed = self._doomed
            if proc is not None and doomed:
                getattr(proc, doomed)()

    def _wait_started(self, timeout: float | None = START_TIMEOUT) -> bool:
        return self.started.wait(timeout) and self.proc is not None

    def poll(self) -> int | None:
        if not self.started.is_set():
            return None
        return self.proc.poll() if self.proc is not None else 1

    def wait(self, timeout: float | None = None) -> int:
        begun = time.monotonic()
        if not self.started.wait(timeout):
            raise subprocess.TimeoutExpired("odium-worker", timeout or 0)
        if self.proc is None:
            return 1
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - begun))
        code: int = self.proc.wait(left)
        return code

    def send_signal(self, sig: int) -> None:
        if self._wait_started():
            self.proc.send_signal(sig)

    def _end(self, how: str) -> None:
        with self._lock:
            if not self.started.is_set():
                self._doomed = "kill" if "kill" in (how, self._doomed) else how
                return
        if self.proc is not None:
            getattr(self.proc, how)()

    def kill(self) -> None:
        self._end("kill")

    def terminate(self) -> None:
        self._end("terminate")


def _start_process(forked: Callable[[socket.socket, str], None], fresh: str, app: str,
                   name: str, child: socket.socket) -> Any:
    """Fork a worker from the fork server or, when there is none, start a new interpreter."""
    for attempt in (1, 2):
        try:
            p = forkserver_context().Process(target=forked, args=(child, app), daemon=False,
                                             name=name)
            p.start()
            # ours alone to poll: multiprocessing polls its children when it starts another
            # one (in the starter thread), and would race the loop thread to read the status
            multiprocessing.process._children.discard(p)  # type: ignore[attr-defined]
            return _ProcessHandle(p)
        except (OSError, EOFError, ValueError, RuntimeError) as e:  # EOF: it died as it forked
            if attempt == 1 and _forkserver_ending():
                continue  # it was dying as we asked: once it has ended, a new one starts
            log.warning("fork server unavailable (%r); starting a new interpreter", e)
            break
    env = dict(os.environ)
    env["ODIUM_WORKER_FD"] = str(child.fileno())
    env["ODIUM_PARENT_PID"] = str(os.getpid())
    env.setdefault("PYTHONUNBUFFERED", "1")
    return subprocess.Popen([sys.executable, "-c", fresh], cwd=app, env=env,
                            pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)


def _forkserver_ending(wait: float = 2.0) -> bool:
    """Whether this process's fork server was killed (and has now ended, or does within
    ``wait`` s): then ``ensure_running`` starts a new one. Not reaped here: multiprocessing
    reaps it itself (a zombie is ended)."""
    from multiprocessing import forkserver

    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if not pid:
        return False
    deadline = time.monotonic() + wait
    while True:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[-1].split()[0]
        except (OSError, IndexError):
            return True  # gone (reaped already)
        if state in (b"Z", b"X"):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


def spawn_worker(forked: Callable[[socket.socket, str], None], fresh: str, app: str,
                 name: str) -> tuple[Any, socket.socket]:
    """A worker process and our end of a socketpair to it, at once: the process starts in the
    background (see ``_Starting``). Forked from the node's fork server (``forked(sock, app)``:
    milliseconds, already imported), or, when there is none, a new interpreter running the
    source ``fresh``, which finds its end in ODIUM_WORKER_FD."""
    parent, child = socket.socketpair()
    return _Starting(forked, fresh, app, name, child), parent




def connect(sock: socket.socket | None, parent: int | None) -> Channel:
    """In a worker, as it starts: the channel to its node (``sock``, or, started as a new
    interpreter, the fd in ODIUM_WORKER_FD), its life tied to its parent's, a process group of
    its own, and the application's directory importable."""
    if sock is None:
        sock = socket.socket(fileno=int(os.environ.pop("ODIUM_WORKER_FD")))
        parent = int(os.environ.pop("ODIUM_PARENT_PID", "0")) or os.getppid()
    die_with_parent(parent or os.getppid())
    own_group()
    app = os.getcwd()
    if app not in sys.path:
        sys.path.insert(0, app)
    return Channel(sock)


def forked_start(sock: socket.socket, app: str) -> tuple[socket.socket, int]:
    """In a worker just forked by the node's fork server (already imported): die with the fork
    server, work in ``app``; the socket and the parent to give ``connect``."""
    forked_by_forkserver()
    os.chdir(app)
    return sock, os.getppid()


__all__ = ["KILL_GRACE", "PRELOAD", "connect", "forked_start", "forkserver_context", "spawn_worker",
           "warm_forkserver"]
