"""The node's zygote: a process that has the workers' code imported already and forks each
worker on request, in a millisecond.

``odium node`` forks it from itself as it starts (``prefork``), before it has a thread, a
ZeroMQ context, its identity or its token: the zygote is a copy of the node's imports and
nothing else, and costs no interpreter of its own. Any other process (a notebook whose hub
is a node too, a test) starts it as a new interpreter (``python -m
odium.node.workers.zygote``), which imports the workers' modules first.

The node and its zygote talk over a Unix socketpair (``SOCK_SEQPACKET``: one JSON message a
packet). The node asks ``{"n", "kind", "app", "env"}`` with the worker's end of its own
socketpair attached (``SCM_RIGHTS``); the zygote forks, and answers ``{"n", "pid"}`` (or
``{"n", "error"}``); when a worker ends, ``{"pid", "status"}``, its exit status as
``subprocess`` gives it (minus a signal number). The zygote is the workers' parent, so only
it can read their statuses.

Lives: the zygote dies with the node (its parent-death signal, and the end of its socket,
whose other end only the node holds); each worker dies with the zygote (its own parent-death
signal), so a node killed with SIGKILL takes all of them with it (``odium.node.lifeline``).
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import socket
import sys
import threading
import traceback
from typing import Any, NoReturn

from ..lifeline import die_with_parent

# what each kind of process runs (``main(sock, zygote)`` for a worker; ``main(argv)``, the
# command line's, for a node) and what a zygote for it imports before it forks
KINDS = {"session": "odium.node.workers.session", "job": "odium.node.workers.job",
         "node": "odium.cli.main"}
PRELOAD = {"session": ["odium.node.workers.session"], "job": ["odium.node.workers.job"],
           "node": ["odium.cli.main", "odium.cli.serve", "odium.node.agent", "odium.runtime",
                    "odium.node.workers.session", "odium.node.workers.job", "git"]}
WORKERS = ("session", "job")
MODE_ENV = "ODIUM_ZYGOTE"  # "exec": start it as a new interpreter, never forked (tests, debug)
NAME = b"odium-zygote"  # its name in ps and /proc/PID/comm
LAUNCHER = b"odium-launcher"  # a zygote of local nodes (``odium.api.local``)
PR_SET_NAME = 15
MAX_PACKET = 1 << 20  # bytes of one request (the worker's environment is most of it)


# --- the zygote ------------------------------------------------------------------------------


def serve(ctl: socket.socket, parent: int, name: bytes = NAME) -> NoReturn:
    """The zygote's loop, in its only thread, until its node closes the socket or dies."""
    _name(name)
    die_with_parent(parent, watch=False)  # (and the socket's end, should prctl be missing)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C for the node's group is not ours
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    wake_r, wake_w = os.pipe()
    for fd in (wake_r, wake_w):
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a worker ended: the pipe wakes us
    while True:
        ready = select.select([ctl.fileno(), wake_r], [], [])[0]
        if wake_r in ready:
            try:
                while os.read(wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        _reap(ctl)
        if ctl.fileno() in ready:
            try:
                data, fds, _flags, _addr = socket.recv_fds(ctl, MAX_PACKET, 1)
            except OSError:
                data, fds = b"", []
            if not data:
                os._exit(0)  # the node closed us or died: the workers die with us
            _answer(ctl, data, fds, (wake_r, wake_w))


def _answer(ctl: socket.socket, data: bytes, fds: list[int], wake: tuple[int, int]) -> None:
    n = None
    try:
        req = json.loads(data)
        n = req["n"]
        if len(fds) != 1 or req["kind"] not in KINDS:
            raise ValueError(f"bad request: kind {req.get('kind')!r}, {len(fds)} descriptors")
        if req["kind"] == "node":
            _warm_state(req["app"])
        pid = os.fork()
        if pid == 0:
            _worker(req, fds[0], ctl, wake)
        _send(ctl, {"n": n, "pid": pid})
    except Exception as e:  # noqa: BLE001 - the node hears why, and the zygote goes on
        _send(ctl, {"n": n, "error": f"{type(e).__name__}: {e}"})
    finally:
        for fd in fds:
            os.close(fd)


_WARMED: set[str] = set()


def _warm_state(app: str) -> None:
    """A launcher, before its first node of ``app``: that app's environment fingerprint,
    computed once here (~20 ms of CPU: the installed distributions read) and cached, so that
    each node forked after it finds it made (the cache checks it is still right)."""
    if app in _WARMED:
        return
    _WARMED.add(app)
    try:
        importlib.import_module("odium.local.appstate").snapshot(app)
    except Exception:  # noqa: BLE001 - the node computes it itself, and says what is wrong
        pass


def _reap(ctl: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(ctl, {"pid": pid, "status": os.waitstatus_to_exitcode(status)})


def _send(ctl: socket.socket, msg: dict[str, Any]) -> None:
    try:
        ctl.send(json.dumps(msg).encode())
    except OSError:
        os._exit(0)  # the node is gone


def _worker(req: dict[str, Any], fd: int, ctl: socket.socket, wake: tuple[int, int]) -> NoReturn:
    """In the worker just forked: the zygote's parts closed, the node's environment and the
    application's directory, then the worker's loop (``main(sock, zygote)``)."""
    code = 1
    try:
        zygote = os.getppid()
        ctl.close()
        signal.set_wakeup_fd(-1)
        for w in wake:
            os.close(w)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # interrupts stop the code
        os.environ.clear()
        os.environ.update(req["env"])
        os.chdir(req["app"])
        if req["kind"] == "node":
            code = _node(req["argv"], fd)
        else:
            sys.argv = ["-c"]  # as a new interpreter's: never the node's (its options)
            sys.orig_argv = [sys.executable, "-c", "odium worker"]
            _name(b"odium-worker")
            sock = socket.socket(fileno=fd)
            importlib.import_module(KINDS[req["kind"]]).main(sock, zygote)
            code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - said on the node's log, then the worker ends
        traceback.print_exc()
    finally:
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except (OSError, ValueError, AttributeError):
                pass
    os._exit(code)


def _node(argv: list[str], log: int) -> int:
    """A local node, forked by a launcher: what ``python -m odium node ...`` in the app's
    directory, in a session of its own, its output to ``log``, would have been."""
    os.setsid()  # a Ctrl-C meant for the hub's process group is not the node's
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    for fd in (null, log):
        os.close(fd)
    sys.path[0] = os.getcwd()  # ``python -m``'s first entry: the directory it started in
    sys.argv = [sys.executable, "-m", "odium", *argv]
    sys.orig_argv = list(sys.argv)
    _name(b"odium-node")
    return int(importlib.import_module(KINDS["node"]).main(argv) or 0)


def _name(name: bytes) -> None:
    try:
        import ctypes

        ctypes.CDLL(None).prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)
    except (OSError, AttributeError):
        pass


# --- the node's side --------------------------------------------------------------------------


class ZygoteEnded(OSError):
    """The zygote has ended (killed, or it failed): a new one may take its place."""


class Forked:
    """A worker the zygote forked, with the parts of ``subprocess.Popen`` the executor and the
    job pool use (its status comes from the zygote)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._ended = threading.Event()

    def _exited(self, status: int) -> None:
        self.returncode = status
        self._ended.set()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        import subprocess

        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired("odium-worker", timeout or 0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


class Zygote:
    """The node's end of its zygote. ``fork`` is called from the node's starter thread, and a
    reader thread of its own hears the answers and the workers' ends."""

    def __init__(self, ctl: socket.socket, pid: int, proc: Any = None) -> None:
        self.ctl = ctl
        self.pid = pid
        self._proc = proc  # the subprocess.Popen of a zygote started as a new interpreter
        self._lock = threading.Lock()
        self._n = 0
        self._asked: dict[int, tuple[threading.Event, list[Any]]] = {}
        self._workers: dict[int, Forked] = {}
        self.alive = True
        self._reader = threading.Thread(target=self._read, name="odium-zygote", daemon=True)
        self._reader.start()

    @classmethod
    def forked(cls) -> Zygote:
        """Fork the zygote from this process now. Only where it has one thread and nothing
        that must not be copied (no ZeroMQ context, no keys): ``odium node`` as it starts."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                ours.close()
                serve(theirs, parent)
            finally:
                os._exit(code)
        theirs.close()
        return cls(ours, pid)

    @classmethod
    def started(cls, kinds: tuple[str, ...] = WORKERS, cwd: str | None = None) -> Zygote:
        """Start a zygote as a new interpreter (it imports what ``kinds`` need first), in this
        process's environment, in ``cwd``."""
        import subprocess

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "odium.node.workers.zygote", str(theirs.fileno()),
                 str(os.getpid()), *kinds], pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL, cwd=cwd)
        finally:
            theirs.close()
        return cls(ours, proc.pid, proc)

    def fork(self, kind: str, app: str, sock: socket.socket | int, timeout: float, *,
             env: dict[str, str] | None = None, argv: list[str] | None = None) -> Forked:
        """A new process of ``kind`` in ``app``: a worker on ``sock`` (its end of the node's
        socketpair), or a node with ``argv`` (its command line's) writing to ``sock`` (its
        log); with ``env``, else this process's environment as it is now."""
        return self.answer(self.ask(kind, app, sock, env=env, argv=argv), timeout)

    def ask(self, kind: str, app: str, sock: socket.socket | int, *,
            env: dict[str, str] | None = None, argv: list[str] | None = None) -> int:
        """``fork``'s request, sent: its number, for ``answer`` (``sock`` may be closed)."""
        with self._lock:
            if not self.alive:
                raise ZygoteEnded("the zygote has ended")
            self._n += 1
            n = self._n
            self._asked[n] = (threading.Event(), [])
        req = json.dumps({"n": n, "kind": kind, "app": app, "argv": argv or [],
                          "env": dict(os.environ) if env is None else env}).encode()
        try:
            socket.send_fds(self.ctl, [req], [sock if isinstance(sock, int) else sock.fileno()])
        except OSError as e:
            with self._lock:
                self._asked.pop(n, None)
            raise ZygoteEnded(f"the zygote has ended ({e})") from e
        return n

    def answer(self, n: int, timeout: float) -> Forked:
        """The process request ``n`` forked (OSError: it was not, or not in ``timeout`` s)."""
        with self._lock:
            done = self._asked.get(n)
        try:
            if done is None or not done[0].wait(timeout):
                raise OSError(f"the zygote did not fork a process in {timeout} s")
        finally:
            with self._lock:
                self._asked.pop(n, None)
        if not done[1]:
            raise ZygoteEnded("the zygote has ended")
        answer = done[1][0]
        if "pid" not in answer:
            raise OSError(f"the zygote could not fork a process: {answer.get('error')}")
        worker = answer["worker"]
        assert isinstance(worker, Forked)
        return worker

    def _read(self) -> None:
        while True:
            try:
                data = self.ctl.recv(MAX_PACKET)
            except OSError:
                data = b""
            if not data:
                break
            msg = json.loads(data)
            with self._lock:
                if "n" in msg:
                    if "pid" in msg:  # known before its end can be heard (one stream)
                        msg["worker"] = self._workers[msg["pid"]] = Forked(msg["pid"])
                    waiting = self._asked.get(msg["n"])
                    if waiting is not None:
                        waiting[1].append(msg)
                        waiting[0].set()
                elif "status" in msg and msg["pid"] in self._workers:
                    self._workers.pop(msg["pid"])._exited(int(msg["status"]))
        self._ended()

    def _ended(self) -> None:
        """The zygote ended (or we closed it): its workers died with it."""
        with self._lock:
            self.alive = False
            workers, self._workers = self._workers, {}
            asked = list(self._asked.values())
        for w in workers.values():
            w._exited(-signal.SIGKILL)
        for ev, _ in asked:
            ev.set()
        self._reap_zygote(None)

    def _reap_zygote(self, timeout: float | None) -> None:
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
            except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired
                self._proc.kill()
                self._proc.wait()
            return
        try:  # forked by us: our child to reap
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass

    def close(self) -> None:
        """End the zygote (and any worker still alive: they die with it)."""
        try:
            self.ctl.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def wait(self, timeout: float) -> None:
        """Wait until it has ended and is reaped, at most ``timeout`` s; then kill it."""
        self._reader.join(timeout)
        if self._reader.is_alive():
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._reader.join(timeout)


_PREFORKED: Zygote | None = None


def prefork() -> None:
    """``odium node``, as it starts: fork this process's zygote now (unless
    ``ODIUM_ZYGOTE=exec``, or it cannot: then it starts as a new interpreter when needed)."""
    global _PREFORKED
    if os.environ.get(MODE_ENV) == "exec" or threading.active_count() > 1:
        return
    _preload(WORKERS)
    try:
        _PREFORKED = Zygote.forked()
    except OSError:
        _PREFORKED = None


def _preload(kinds: tuple[str, ...] | list[str]) -> None:
    """Import what ``kinds`` run (each one forks with them; by name: they import the
    node's side of their start, which imports this)."""
    for kind in kinds:
        for module in PRELOAD[kind]:
            importlib.import_module(module)


def take_preforked() -> Zygote | None:
    """The zygote ``prefork`` made, once (a later one starts as a new interpreter)."""
    global _PREFORKED
    z, _PREFORKED = _PREFORKED, None
    return z


def main() -> None:
    """``python -m odium.node.workers.zygote FD PARENT [KIND ...]``: a zygote as a new
    interpreter, for workers (the default) or for local nodes (``node``)."""
    kinds = sys.argv[3:] or list(WORKERS)
    _preload(kinds)
    ctl = socket.socket(fileno=int(sys.argv[1]))
    serve(ctl, int(sys.argv[2]), LAUNCHER if "node" in kinds else NAME)


if __name__ == "__main__":
    main()


__all__ = ["KINDS", "WORKERS", "Forked", "Zygote", "ZygoteEnded", "prefork", "take_preforked"]
