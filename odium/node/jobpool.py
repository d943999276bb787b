"""A node's pool of job worker processes (one job at a time each, each job in a clean
namespace), and the worker's own loop.

Separate from the session workers of ``odium.node.executor``: a job never sees a session's
namespace, nor the previous job's. A worker process runs job after job; every job gets a
fresh ``__main__``-like dict (modules a job imports stay imported). Nothing here imports
zmq: a worker starts with the standard library, ``odium.node.executor`` and the job's own
imports.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from .executor import (
    KILL_GRACE,
    _jsonable,
    _run_python,
    _safe_repr,
    cell_name,
    forget_cell,
    spawn_worker,
    timeout_error,
    user_traceback,
)
from .lifeline import die_with_parent, forked_by_forkserver, own_group

if TYPE_CHECKING:
    from ..io.transport import Loop

log = logging.getLogger(__name__)

MAX_JOB_CAPTURE = 1024 * 1024  # characters of a job's stdout/stderr kept

Event = dict[str, Any]

# =============================================================================================
# The worker process
# =============================================================================================


class _Capture(io.TextIOBase):
    """A job's stdout or stderr: kept (up to a limit) for its result."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.size = 0

    def reset(self) -> None:
        self.parts, self.size = [], 0

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        if self.size < MAX_JOB_CAPTURE:
            self.parts.append(s[: MAX_JOB_CAPTURE - self.size])
        self.size += len(s)
        return len(s)

    def value(self) -> str:
        text = "".join(self.parts)
        if self.size > MAX_JOB_CAPTURE:
            text += f"\n[odium: output cut at {MAX_JOB_CAPTURE} of {self.size} characters]\n"
        return text


class Channel:
    """Length-prefixed frames over a stream socket (node <-> job worker): one ``recv`` for a
    whole small frame, and a partial frame kept across an interrupt."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, data: bytes) -> None:
        self.sock.sendall(len(data).to_bytes(4, "big") + data)

    def recv(self) -> bytes:
        """The next frame (blocking until it is whole); EOFError when the peer is gone."""
        while True:
            buf = self.buf
            if len(buf) >= 4:
                n = int.from_bytes(buf[:4], "big")
                if len(buf) >= 4 + n:
                    self.buf = buf[4 + n:]
                    return buf[4:4 + n]
            chunk = self.sock.recv(max(65536, 4 + (int.from_bytes(buf[:4], "big")
                                                   if len(buf) >= 4 else 0) - len(buf)))
            if not chunk:
                raise EOFError("the other end closed the channel")
            self.buf = buf + chunk

    def close(self) -> None:
        self.sock.close()


def _error(e: BaseException) -> dict[str, str]:
    text = user_traceback(e, (__file__,))  # the job's frames, not ours
    evalue = str(e.code) if isinstance(e, SystemExit) else str(e)
    return {"ename": type(e).__name__, "evalue": evalue, "traceback": text}


_OUT, _ERR = _Capture(), _Capture()


def run_job(req: dict[str, Any], fns: dict[str, bytes] | None = None) -> Event:
    """Run one job in a fresh namespace; return its result (status ok|error|interrupted).

    ``fns``: the serialised functions this worker was sent (hash -> pickle bytes). The
    function is unpickled for every job, so that each call gets fresh globals.
    """
    out, err = _OUT, _ERR
    out.reset()
    err.reset()
    saved = sys.stdout, sys.stderr
    started = time.time()
    value: Any = None
    error: dict[str, str] | None = None
    status = "ok"
    sys.stdout, sys.stderr = out, err
    try:
        if req.get("args_pickle"):
            args, kwargs = pickle.loads(base64.b64decode(req["args_pickle"]))
        else:
            args, kwargs = req.get("args") or [], req.get("kwargs") or {}
        if req["kind"] == "python":
            ns: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
            if args or kwargs:
                ns["args"], ns["kwargs"] = tuple(args), dict(kwargs)
                # keyword arguments are names too: submit("a + b", a=2, b=3)
                ns.update((k, v) for k, v in kwargs.items() if str(k).isidentifier())
            name = cell_name(req["code"])
            try:
                status, value, error = _run_python(req["code"], ns, name)
            finally:
                forget_cell(name)  # a fresh namespace each job: nothing refers to it later
        else:
            data = (fns or {}).get(req["fn"]) if req.get("fn") else None
            if data is None:
                raise RuntimeError(f"function {req.get('fn')} was not sent to this worker")
            fn = pickle.loads(data)
            value = fn(*args, **kwargs)
    except KeyboardInterrupt:
        status, value = "interrupted", None
        error = {"ename": "KeyboardInterrupt", "evalue": "interrupted", "traceback": ""}
    except BaseException as e:  # noqa: BLE001 - every error of the job is its result
        status, value, error = "error", None, _error(e)
    finally:
        sys.stdout, sys.stderr = saved
    res: Event = {"status": status, "started": started, "finished": time.time(),
                  "stdout": out.value(), "stderr": err.value(), "error": error}
    if value is not None:
        res["value"], res["value_json"] = _jsonable(value)
        res["value_repr"] = _safe_repr(value)
    return res


def _forked_job_worker(sock: socket.socket, app: str) -> None:
    """Entry point of a job worker forked by the node's fork server (already imported)."""
    forked_by_forkserver()
    os.chdir(app)
    job_worker_main(sock, os.getppid())


def job_worker_main(sock: socket.socket | None = None, parent: int | None = None) -> None:
    """Entry point of a job worker process, talking to its node over ``sock`` (or, started
    as a fresh interpreter, the fd in ODIUM_WORKER_FD).

    It gets one job at a time as JSON (with ``fnd``, the function's pickle in base64, the
    first time this worker sees that function) and answers with the job's result as JSON.
    """
    decode, encode = msgspec.json.Decoder().decode, msgspec.json.Encoder().encode
    fns: dict[str, bytes] = {}
    if sock is None:
        sock = socket.socket(fileno=int(os.environ.pop("ODIUM_WORKER_FD")))
        parent = int(os.environ.pop("ODIUM_PARENT_PID", "0")) or os.getppid()
    conn = Channel(sock)
    die_with_parent(parent or os.getppid())
    own_group()
    app = os.getcwd()
    if app not in sys.path:
        sys.path.insert(0, app)
    conn.send(b'{"op":"ready"}')
    while True:
        try:
            raw = conn.recv()
        except (EOFError, OSError):
            return
        except KeyboardInterrupt:  # an interrupt that came between two jobs
            continue
        try:
            req = decode(raw)
            if req.get("op") == "exit":
                return
            if req.get("fnd"):
                if len(fns) > 256:
                    fns.clear()
                fns[req["fn"]] = base64.b64decode(req["fnd"])
            res = run_job(req, fns)
        except KeyboardInterrupt:  # arrived after the job finished, before we noticed
            res = {"status": "interrupted", "started": time.time(), "finished": time.time(),
                   "error": {"ename": "KeyboardInterrupt", "evalue": "interrupted",
                             "traceback": ""}}
        res["op"], res["id"] = "done", req["id"]
        try:
            data = encode(res)
        except (TypeError, OverflowError, msgspec.EncodeError):  # e.g. an int of 100 digits
            res["value"], res["value_json"] = None, False
            data = json.dumps(res, default=str).encode()
        try:  # a frame goes whole: an interrupt waits until it is sent (and is then moot)
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                conn.send(data)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        except KeyboardInterrupt:
            pass


# =============================================================================================
# The node's side
# =============================================================================================


@dataclass
class _JobWorker:
    proc: Any  # the executor's handle on a worker process (see spawn_worker)
    conn: Channel
    ready: bool = False
    job: str = ""
    reason: str = ""  # why we signalled its job: "timeout" or "cancelled"
    timeout: float | None = None  # the seconds its job may take
    run: int = 0  # counts the jobs it was given (a timer names the run it was armed for)
    fns: set[str] = field(default_factory=set)  # the functions it has been sent


class JobPool:
    """Up to ``capacity`` job worker processes. Called from the node's loop thread only.

    ``on_done(job_id, result)`` gets each job's result: status ``ok``, ``error``,
    ``timeout``, ``cancelled``, or ``lost`` (the worker died under it).
    """

    def __init__(self, loop: Loop, app: str, capacity: int,
                 on_done: Callable[[str, Event], None]) -> None:
        self.loop = loop
        self.app = app
        self.capacity = capacity
        self.on_done = on_done
        self.workers: list[_JobWorker] = []
        self.idle: list[_JobWorker] = []
        self.waiting: deque[tuple[str, dict[str, Any], float | None]] = deque()
        self.fn_data: dict[str, str] = {}  # function hash -> base64 pickle, for new workers
        self._encode = msgspec.json.Encoder().encode
        self._decode = msgspec.json.Decoder().decode
        self.by_job: dict[str, _JobWorker] = {}
        self.closed = False

    def _spawn(self) -> _JobWorker:
        return self._add(*spawn_worker(
            _forked_job_worker, "from odium.node.jobpool import job_worker_main; job_worker_main()",
            self.app, "odium-job-worker"))

    def _add(self, proc: Any, sock: socket.socket) -> _JobWorker:
        w = _JobWorker(proc, Channel(sock))
        self.workers.append(w)
        self.loop.add(w.conn.fileno(), lambda: self._on_worker(w))
        return w

    def start(self, job_id: str, job: dict[str, Any], timeout: float | None,
              fn_data: str | None = None) -> None:
        """Run a job as soon as a worker is free. ``job``: id, kind, code, fn (hash), args,
        kwargs, args_pickle; ``fn_data``: the function's base64 pickle."""
        if self.closed:
            raise RuntimeError("job pool is closed")
        if fn_data and job.get("fn"):
            if len(self.fn_data) > 256:
                self.fn_data.clear()
            self.fn_data[job["fn"]] = fn_data
        if self.idle:
            self._run(self.idle.pop(), job_id, job, timeout)
            return
        self.waiting.append((job_id, job, timeout))
        if len(self.workers) < self.capacity:
            self._spawn()

    def running(self) -> list[str]:
        return list(self.by_job) + [j for j, _, _ in self.waiting]

    def _run(self, w: _JobWorker, job_id: str, job: dict[str, Any],
             timeout: float | None) -> None:
        w.job, w.reason, w.timeout = job_id, "", timeout
        w.run += 1
        self.by_job[job_id] = w
        fn = job.get("fn")
        if fn and fn not in w.fns:
            job = {**job, "fnd": self.fn_data.get(fn)}
            w.fns.add(fn)
        try:
            w.conn.send(self._encode(job))
        except OSError:
            self._died(w)
            return
        if timeout:
            run = w.run
            self.loop.call_later(timeout, lambda: self._expire(w, run))

    def _expire(self, w: _JobWorker, run: int) -> None:
        if w.run == run and w.job:
            self.cancel(w.job, "timeout")

    def _next(self, w: _JobWorker) -> None:
        if self.closed:
            return
        if self.waiting:
            job_id, payload, timeout = self.waiting.popleft()
            self._run(w, job_id, payload, timeout)
        else:
            self.idle.append(w)

    def _on_worker(self, w: _JobWorker) -> None:
        try:
            raw = w.conn.recv()
        except (EOFError, OSError):
            self._died(w)
            return
        ev = self._decode(raw)
        op = ev.get("op")
        if op == "ready":
            w.ready = True
            self._next(w)
        elif op == "done" and ev.get("id") == w.job:
            job_id, reason = w.job, w.reason
            w.job, w.reason = "", ""
            self.by_job.pop(job_id, None)
            res = ev
            if res["status"] == "interrupted":
                res["status"] = reason or "cancelled"
                if reason == "timeout":
                    res["error"] = timeout_error(w.timeout, res.get("error"))
            self._next(w)
            self.on_done(job_id, res)

    def _died(self, w: _JobWorker) -> None:
        try:
            self.loop.remove(w.conn.fileno())
        except (KeyError, ValueError, OSError):
            pass
        w.conn.close()
        code = w.proc.wait()
        if w in self.workers:
            self.workers.remove(w)
        if w in self.idle:
            self.idle.remove(w)
        if self.closed:
            return
        if w.job:
            job_id, reason = w.job, w.reason
            self.by_job.pop(job_id, None)
            if reason == "timeout":
                error = timeout_error(w.timeout, what="its worker was killed")
            else:
                msg = ("cancelled; its worker was killed" if reason == "cancelled" else
                       f"the job's worker process died (exit status {code})")
                error = {"ename": "WorkerDied", "evalue": msg, "traceback": ""}
            now = time.time()
            self.on_done(job_id, {"status": reason or "lost", "started": now, "finished": now,
                                  "error": error})
        if self.waiting and len(self.workers) < self.capacity:
            self._spawn()

    def cancel(self, job_id: str, reason: str = "cancelled") -> bool:
        """Stop a job: SIGINT to its worker, SIGKILL after a grace; or drop it if it waits."""
        for i, (j, _p, _t) in enumerate(self.waiting):
            if j == job_id:
                del self.waiting[i]
                now = time.time()
                self.on_done(job_id, {"status": reason, "started": now, "finished": now,
                                      "error": {"ename": "KeyboardInterrupt",
                                                "evalue": f"{reason} before it started",
                                                "traceback": ""}})
                return True
        w = self.by_job.get(job_id)
        if w is None:
            return False
        w.reason = w.reason or reason
        try:
            w.proc.send_signal(signal.SIGINT)
        except ProcessLookupError:
            pass
        run = w.run
        self.loop.call_later(KILL_GRACE, lambda: self._kill_if_stuck(w, run))
        return True

    def _kill_if_stuck(self, w: _JobWorker, run: int) -> None:
        if w.run == run and w.job and w.proc.poll() is None:
            w.proc.kill()

    def close(self) -> None:
        self.closed = True
        for w in self.workers:
            try:
                self.loop.remove(w.conn.fileno())
            except (KeyError, ValueError, OSError):
                pass
            try:
                w.conn.send(b'{"op":"exit"}')
            except OSError:
                pass
            w.conn.close()
            if w.job and w.proc.poll() is None:
                w.proc.kill()
        for w in self.workers:
            try:
                w.proc.wait(2)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
        self.workers.clear()
        self.idle.clear()


__all__ = ["JobPool", "job_worker_main", "run_job"]
