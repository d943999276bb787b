"""The node's side of its broadcasts: Python commands in persistent session workers (one per
session, ``odium.node.workers.session``), shell commands in subprocesses, with streamed
output, interrupts and timeouts.

The node's loop thread only starts, signals and listens to them: a worker is a separate
Python process (``odium.node.workers.start``) on a ``Channel``; a shell command runs under a
reader thread.
"""

from __future__ import annotations

import codecs
import json
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..lifeline import REAPER
from .channel import Channel
from .code import timeout_error
from .results import fit_result
from .session import MAX_CAPTURE
from .start import KILL_GRACE, spawn_worker

if TYPE_CHECKING:
    from ...io.transport import Loop

OUT_CHUNK = 1024 * 1024  # characters of streamed output per 'output' message (at most)
MAX_STREAM = MAX_CAPTURE  # characters of each stream of a command sent while it runs
REFILL_AFTER = 1.0  # seconds after a session took the spare worker before the next one starts

Event = dict[str, Any]


@dataclass
class _Run:
    """One command the executor runs (a broadcast's part on this node)."""

    cmd: str
    kind: str
    code: str
    session: str
    timeout: float | None
    ephemeral: bool = False
    started: float = 0.0
    reason: str = ""  # why we signalled it: "interrupted" or "timeout"
    proc: subprocess.Popen[bytes] | None = None
    worker: _Worker | None = None


@dataclass
class _Worker:
    proc: Any  # a _Starting (over subprocess.Popen or a _ProcessHandle)
    conn: Channel
    ready: bool = False
    current: _Run | None = None
    queue: deque[_Run] = field(default_factory=deque)


class Executor:
    """Runs commands for a node. All methods are called from the node's loop thread."""

    def __init__(self, loop: Loop, app: str, on_event: Callable[[Event], None],
                 prestart: bool = True) -> None:
        self.loop = loop
        self.app = app
        self.on_event = on_event
        self.sessions: dict[str, _Worker] = {}
        self.spare: _Worker | None = None
        self.runs: dict[str, _Run] = {}
        self.streamed: dict[tuple[str, str], int] = {}  # (cmd, stream) -> characters sent
        self.closed = False
        self.reaper = REAPER  # shell commands' and workers' process groups end with the node
        if prestart:
            self.spare = self._spawn()

    # --- workers ---------------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        proc, sock = spawn_worker("session", self.app)
        w = _Worker(proc, Channel(sock))
        self.loop.add(w.conn.fileno(), lambda: self._on_worker(w))
        return w

    def _worker_for(self, session: str) -> _Worker:
        w = self.sessions.get(session)
        if w is None:
            if self.spare is not None and self.spare.proc.poll() is not None:
                self._worker_died(self.spare)  # it died before we heard: not for a session
            w, self.spare = (self.spare or self._spawn()), None
            self.sessions[session] = w
            # not at once: a broadcast starts a session on every node together, and their new
            # spares would take the CPU the command needs (a new session meanwhile forks
            # one, in milliseconds)
            self.loop.call_later(REFILL_AFTER, self._refill_spare)
        return w

    def warm(self) -> None:
        """Start a spare worker now, so that the next new session starts at once."""
        self._refill_spare()

    def _refill_spare(self) -> None:
        if self.spare is None and not self.closed:
            self.spare = self._spawn()

    def _on_worker(self, w: _Worker) -> None:
        """Whatever the worker said: every frame it has sent (some may be read already)."""
        try:
            for raw in w.conn.frames():
                self._on_frame(w, json.loads(raw))
        except (EOFError, OSError):
            self._worker_died(w)

    def _on_frame(self, w: _Worker, ev: Event) -> None:
        op = ev.get("op")
        if op == "ready":
            w.ready = True
            self._next(w)
        elif op == "out":
            self._out(ev)
        elif op == "done":
            run = w.current
            if run is None or run.cmd != ev["cmd"]:
                return  # a second "done" for a command that has ended: the running one stays
            w.current = None
            res = ev["result"]
            if res["status"] == "interrupted" and run.reason:
                res["status"] = run.reason
                if run.reason == "timeout":
                    res["error"] = timeout_error(run.timeout, res.get("error"))
            self._finish(run, res)
            self._next(w)

    def _worker_died(self, w: _Worker) -> None:
        self.loop.remove(w.conn.fileno())
        w.conn.close()
        code = w.proc.wait()
        for name, sw in list(self.sessions.items()):
            if sw is w:
                del self.sessions[name]
        if self.spare is w:
            self.spare = None
        if self.closed:
            return
        lost = ([w.current] if w.current else []) + list(w.queue)
        for run in lost:
            if run.reason == "timeout":
                status = "timeout"
                error = timeout_error(run.timeout, what="the worker was killed and its "
                                      "namespace lost")
            else:
                status = "error"
                error = {"ename": "WorkerDied", "evalue": f"the worker process died (exit "
                         f"status {code}); its namespace is lost", "traceback": ""}
            self._finish(run, {"status": status, "started": run.started or time.time(),
                               "finished": time.time(), "error": error})
        self.loop.call_soon_threadsafe(self._refill_spare)

    def _next(self, w: _Worker) -> None:
        if w.current is not None or not w.ready or not w.queue:
            return
        run = w.queue.popleft()
        w.current = run
        run.started = time.time()
        try:
            w.conn.send(json.dumps({"op": "exec", "cmd": run.cmd, "code": run.code}).encode())
        except OSError:
            self._worker_died(w)
            return

    # --- public ----------------------------------------------------------------------------

    def submit(self, cmd: str, kind: str, code: str, session: str = "default",
               timeout: float | None = None, ephemeral: bool = False,
               deadline: float | None = None) -> None:
        """Run a command (``deadline``, monotonic: when it times out, whether it still waits
        behind others in its session or runs; by default ``timeout`` from now)."""
        if self.closed:
            raise RuntimeError("executor is closed")
        if deadline is None and timeout:
            deadline = time.monotonic() + timeout
        run = _Run(cmd, kind, code, session, timeout, ephemeral)
        self.runs[cmd] = run
        if deadline is not None:  # (armed now: it may time out before it starts)
            self.loop.call_later(max(0.0, deadline - time.monotonic()),
                                 lambda: self._expire(run))
        if kind == "shell":
            self._start_shell(run)
            return
        w = self._worker_for(session)
        run.worker = w
        w.queue.append(run)
        self._next(w)

    def running(self) -> list[str]:
        return list(self.runs)

    def interrupt(self, cmd: str, reason: str = "interrupted") -> bool:
        run = self.runs.get(cmd)
        if run is None:
            return False
        run.reason = run.reason or reason
        if run.proc is not None:  # shell: the whole process group, even after the shell exits
            pgid = run.proc.pid
            _kill_group(pgid, signal.SIGINT)
            self.loop.call_later(KILL_GRACE, lambda: _kill_group(pgid, signal.SIGKILL))
            return True
        w = run.worker
        if w is None:
            return False
        if w.current is run:
            try:
                w.proc.send_signal(signal.SIGINT)
            except ProcessLookupError:
                pass
            self.loop.call_later(KILL_GRACE, lambda: self._kill_if_stuck(run))
        else:  # still queued behind another command of the session
            w.queue.remove(run)
            now = time.time()
            error = (timeout_error(run.timeout, what="it was still waiting for the session's "
                                   "earlier command") if run.reason == "timeout" else
                     {"ename": "KeyboardInterrupt", "evalue": "interrupted before it started",
                      "traceback": ""})
            self._finish(run, {"status": run.reason, "started": now, "finished": now,
                               "error": error})
        return True

    def close_session(self, session: str) -> None:
        """Forget a session's namespace; its worker stops once it has nothing left to run."""
        w = self.sessions.get(session)
        if w is not None and w.current is None and not w.queue:
            del self.sessions[session]
            self._stop_worker(w)

    def close(self) -> None:
        self.closed = True
        workers = list(self.sessions.values()) + ([self.spare] if self.spare else [])
        self.sessions.clear()
        self.spare = None
        for w in workers:
            self._stop_worker(w)
        for run in list(self.runs.values()):
            if run.proc is not None:
                _signal_group(run.proc, signal.SIGKILL)
        self.reaper.close()
        for w in workers:
            try:
                w.proc.wait(2)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()

    # --- internals -------------------------------------------------------------------------

    def _stop_worker(self, w: _Worker) -> None:
        try:
            self.loop.remove(w.conn.fileno())
        except (OSError, KeyError, ValueError):
            pass
        try:
            w.conn.send(b'{"op":"exit"}')
        except OSError:
            pass
        w.conn.close()
        if w.proc.poll() is None:
            w.proc.terminate()

    def _kill_if_stuck(self, run: _Run) -> None:
        w = run.worker
        if run.cmd in self.runs and w is not None and w.current is run and w.proc.poll() is None:
            w.proc.kill()

    def _expire(self, run: _Run) -> None:
        """A command's deadline: interrupted if it runs; if it still waits in its session, it
        never runs (its result says so)."""
        if self.runs.get(run.cmd) is not run:
            return
        w = run.worker
        if w is not None and run in w.queue:
            w.queue.remove(run)
            now = time.time()
            self._finish(run, {"status": "timeout", "started": now, "finished": now,
                               "error": timeout_error(run.timeout, what=(
                                   "the command waited behind others in session "
                                   f"{run.session!r} and did not start"))})
            return
        self.interrupt(run.cmd, "timeout")

    def _finish(self, run: _Run, res: Event) -> None:
        if self.runs.pop(run.cmd, None) is None:
            return
        self.streamed.pop((run.cmd, "stdout"), None)
        self.streamed.pop((run.cmd, "stderr"), None)
        # (fitted where it was made, where a large one costs no loop time: a Python result by
        # its worker, a shell command's by its reader thread; the node's own are small.
        # odium.node.commands checks every message's size once more, as it goes)
        self.on_event({"op": "done", "cmd": run.cmd, "result": res})
        if run.ephemeral and run.kind == "python":
            self.close_session(run.session)

    def _emit(self, ev: Event) -> None:
        """From a reader thread: hand an output event to the loop thread."""
        self.loop.call_soon_threadsafe(lambda: self._out(ev))

    def _out(self, ev: Event) -> None:
        """Streamed output, in messages the hub accepts: chunks of at most OUT_CHUNK
        characters, and no more than MAX_STREAM characters per stream of a command (then one
        visible note; the result keeps the first MAX_CAPTURE)."""
        key = (ev["cmd"], ev["stream"])
        sent = self.streamed.get(key, 0)
        if sent > MAX_STREAM or ev["cmd"] not in self.runs:
            return
        text = ev["text"]
        self.streamed[key] = sent + len(text)
        cut = len(text) > MAX_STREAM - sent
        if cut:
            self.streamed[key] = MAX_STREAM + 1
            text = text[:MAX_STREAM - sent]
        for i in range(0, len(text), OUT_CHUNK):
            self.on_event({**ev, "text": text[i:i + OUT_CHUNK]})
        if cut:
            self.on_event({**ev, "text": f"\n[odium: more than {MAX_STREAM} characters on "
                           f"{ev['stream']}; the rest is not shown while it runs, the result "
                           f"keeps the first {MAX_CAPTURE}]\n"})

    def _start_shell(self, run: _Run) -> None:
        run.started = time.time()
        try:
            argv, fd = self.reaper.announced(run.code)  # its group told before it runs
            run.proc = subprocess.Popen(
                argv, cwd=self.app, stdin=fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True)
        except OSError as e:
            self._finish(run, {"status": "error", "started": run.started, "finished": time.time(),
                               "error": {"ename": type(e).__name__, "evalue": str(e),
                                         "traceback": ""}})
            return
        threading.Thread(target=self._shell_reader, args=(run,), daemon=True,
                         name=f"odium-shell-{run.cmd[:8]}").start()

    def _shell_reader(self, run: _Run) -> None:
        proc = run.proc
        assert proc is not None and proc.stdout is not None and proc.stderr is not None
        kept: dict[str, list[str]] = {"stdout": [], "stderr": []}
        sizes = {"stdout": 0, "stderr": 0}

        def pump(stream: Any, name: str) -> None:
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            while True:
                chunk = stream.read1(65536)
                text = decoder.decode(chunk, final=not chunk)
                if text:
                    if sizes[name] < MAX_CAPTURE:
                        kept[name].append(text[:MAX_CAPTURE - sizes[name]])
                    if sizes[name] <= MAX_STREAM:  # (the node shows no more while it runs)
                        self._emit({"op": "out", "cmd": run.cmd, "stream": name,
                                    "text": text[:MAX_STREAM + 1 - sizes[name]]})
                    sizes[name] += len(text)
                if not chunk:
                    return

        t = threading.Thread(target=pump, args=(proc.stderr, "stderr"), daemon=True)
        t.start()
        pump(proc.stdout, "stdout")
        t.join()
        code = proc.wait()
        pgid = proc.pid
        self.loop.call_soon_threadsafe(lambda: self.reaper.forget(pgid))
        res: Event = {"started": run.started, "finished": time.time(), "exit": code,
                      "stdout": "".join(kept["stdout"]), "stderr": "".join(kept["stderr"]),
                      "sizes": sizes}
        if code == 0:
            res["status"] = "ok"
        elif run.reason:  # the exit status is in the result's ``exit``, said once
            res["status"] = run.reason
            res["error"] = (timeout_error(run.timeout, what="the command was interrupted")
                            if run.reason == "timeout" else
                            {"ename": "KeyboardInterrupt", "evalue": "interrupted",
                             "traceback": ""})
        else:
            res["status"] = "error"
            res["error"] = {"ename": "ShellError", "evalue": f"exit status {code}",
                            "traceback": ""}
        res = fit_result(res)  # (here: a cut stream says so, with its true size)
        self.loop.call_soon_threadsafe(lambda: self._finish(run, res))


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_group(proc: subprocess.Popen[bytes] | None, sig: int) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
