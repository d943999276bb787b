"""The node's side of its job pool: up to ``capacity`` job worker processes
(``odium.node.workers.job``), one job at a time each, each job in a clean namespace; timeouts
and cancels."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from .channel import Channel
from .code import timeout_error
from .start import KILL_GRACE, spawn_worker

if TYPE_CHECKING:
    from ...io.transport import Loop

Event = dict[str, Any]


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
        return self._add(*spawn_worker("job", self.app))

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
        """Whatever the worker said: every frame it has sent (some may be read already)."""
        try:
            for raw in w.conn.frames():
                self._on_frame(w, self._decode(raw))
        except (EOFError, OSError):
            self._died(w)

    def _on_frame(self, w: _JobWorker, ev: Event) -> None:
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


__all__ = ["JobPool"]
