"""Starting a node's worker processes: forked by the node's zygote (``zygote``: the workers'
code imported already, so in a millisecond) or, when there is none, new interpreters; always
from one long-lived thread, in the background, and tied to the node's life
(``odium.node.lifeline``). Also the worker's side of its start (``connect``)."""

from __future__ import annotations

import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ..lifeline import REAPER, die_with_parent, own_group
from .channel import Channel
from .zygote import KINDS, Forked, Zygote, ZygoteEnded, take_preforked

log = logging.getLogger(__name__)

KILL_GRACE = 2.0  # seconds between SIGINT and SIGKILL when a worker must stop

START_TIMEOUT = 60.0  # seconds a worker may take to start before a signal gives up on it


class _Starter:
    """The one thread that starts this process's zygote and worker processes, one at a
    time, and lives as long as the process.

    Long-lived on purpose: the kernel sends a child its parent-death signal when the
    *thread* that made it ends, not the process; a worker (or the zygote) made by a
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


def in_starter(fn: Callable[[], Any], timeout: float = START_TIMEOUT) -> Any:
    """``fn()`` called in the starter thread (a process that must live as long as this one:
    see ``_Starter``), its value or its exception; TimeoutError (an OSError) after
    ``timeout`` s."""
    done = threading.Event()
    out: list[Any] = []

    def call() -> None:
        try:
            out.append((True, fn()))
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            out.append((False, e))
        finally:
            done.set()

    _STARTER.submit(call)
    if not done.wait(timeout):
        raise TimeoutError(f"the starter thread did not answer in {timeout} s")
    ok, value = out[0]
    if not ok:
        raise value
    return value


class _Zygotes:
    """This process's zygote (``odium.node.workers.zygote``): the one ``odium node`` forked as it
    started, else one started as a new interpreter; started again when it has ended. Used from
    the starter thread only."""

    RETRY = 30.0  # seconds before trying again after a zygote that never forked a worker

    def __init__(self) -> None:
        self.users = 0  # node parts of this process that use it
        self.current: Zygote | None = None
        self._forked_any = False
        self._next_try = 0.0

    def get(self) -> Zygote | None:
        z = self.current
        if z is not None and z.alive:
            return z
        if z is not None and not self._forked_any:
            self._next_try = time.monotonic() + self.RETRY  # it cannot start here: not yet
        self.current, self._forked_any = None, False
        if time.monotonic() < self._next_try:
            return None
        try:
            self.current = take_preforked() or Zygote.started()
        except OSError as e:
            log.warning("no zygote (%s): workers start as new interpreters", e)
            self._next_try = time.monotonic() + self.RETRY
        return self.current

    def fork(self, kind: str, app: str, child: socket.socket) -> Forked | None:
        for again in (False, True):
            z = self.get()
            if z is None:
                return None
            try:
                w = z.fork(kind, app, child, START_TIMEOUT)
            except ZygoteEnded as e:
                if again or not self._forked_any:
                    log.warning("%s; starting a new interpreter", e)
                    return None
                # it worked and has died (killed): its reader may not have heard it yet
                self.current = None
                z.close()
                continue
            except OSError as e:
                log.warning("%s; starting a new interpreter", e)
                return None
            self._forked_any = True
            return w
        return None

    def stop(self) -> None:
        z, self.current = self.current, None
        if z is not None:
            z.close()
            z.wait(5.0)


_ZYGOTES = _Zygotes()


def warm_zygote() -> None:
    """Have this process's zygote ready for the first worker (a new interpreter imports in the
    background). Returns at once: the starter thread starts it (see ``_Starter``). A node part
    that calls this calls ``release_zygote`` when it closes."""
    _ZYGOTES.users += 1
    _STARTER.submit(lambda: None if _ZYGOTES.get() else None)


def release_zygote(timeout: float = 5.0) -> None:
    """A node part closed (its workers are gone). When it was the last one in this process,
    stop the zygote: a process that goes on after its node part (a notebook, a hub in the
    middle of a tree, a test) keeps none. Waits for it to end, at most ``timeout`` seconds; a
    later node part starts one again."""
    _ZYGOTES.users = max(0, _ZYGOTES.users - 1)
    if _ZYGOTES.users:
        return
    try:
        in_starter(_ZYGOTES.stop, timeout)  # (there: never while it starts a worker)
    except TimeoutError:
        pass  # not in time: it goes on stopping there
    except Exception:  # noqa: BLE001 - a node part closing goes on
        log.exception("stopping the zygote failed")


class _Starting:
    """A worker process started by the starter thread, with the parts of ``subprocess.Popen``
    the executor and the job pool use.

    Starting a worker waits for the zygote to fork it (a millisecond), and, where the zygote
    is a new interpreter, the first time for its imports: a second or more on a loaded
    machine. The node's loop must not wait (its heartbeats would stop, and its hub would call
    it lost), so it gets this handle at once, and the worker's "ready" on the socketpair when
    it has started. Until then the handle counts as running; a kill or terminate is done as
    soon as it has started, a signal or a wait first waits for the start.
    """

    def __init__(self, kind: str, app: str, child: socket.socket) -> None:
        self.proc: Any = None  # zygote.Forked or subprocess.Popen, once started
        self.started = threading.Event()
        self._lock = threading.Lock()
        self._doomed = ""  # "kill" or "terminate": asked before the start had finished
        _STARTER.submit(lambda: self._start(kind, app, child))

    def _start(self, kind: str, app: str, child: socket.socket) -> None:
        proc = None
        try:
            proc = _start_process(kind, app, child)
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


def _start_process(kind: str, app: str, child: socket.socket) -> Any:
    """Fork a worker from the zygote or, when there is none, start a new interpreter."""
    forked = _ZYGOTES.fork(kind, app, child)
    if forked is not None:
        return forked
    env = dict(os.environ)
    env["ODIUM_WORKER_FD"] = str(child.fileno())
    env["ODIUM_PARENT_PID"] = str(os.getpid())
    env.setdefault("PYTHONUNBUFFERED", "1")
    fresh = f"from {KINDS[kind]} import main; main()"
    return subprocess.Popen([sys.executable, "-c", fresh], cwd=app, env=env,
                            pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)


def spawn_worker(kind: str, app: str) -> tuple[Any, socket.socket]:
    """A worker process of ``kind`` ("session" or "job", ``zygote.KINDS``) in ``app``, and our
    end of a socketpair to it, at once: the process starts in the background (see
    ``_Starting``). Forked by the node's zygote or, when there is none, a new interpreter,
    which finds its end in ODIUM_WORKER_FD."""
    parent, child = socket.socketpair()
    return _Starting(kind, app, child), parent


def connect(sock: socket.socket | None, parent: int | None) -> Channel:
    """In a worker, as it starts: the channel to its node (``sock``, or, started as a new
    interpreter, the fd in ODIUM_WORKER_FD), its life tied to its parent's (the zygote, or
    the node), a process group of its own, and the application's directory importable."""
    if sock is None:
        sock = socket.socket(fileno=int(os.environ.pop("ODIUM_WORKER_FD")))
        parent = int(os.environ.pop("ODIUM_PARENT_PID", "0")) or os.getppid()
    die_with_parent(parent or os.getppid())
    own_group()
    app = os.getcwd()
    if app not in sys.path:
        sys.path.insert(0, app)
    return Channel(sock)


__all__ = ["KILL_GRACE", "connect", "in_starter", "release_zygote", "spawn_worker",
           "warm_zygote"]
