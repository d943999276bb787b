"""Running work on a node: Python in persistent worker processes (one per session), shell commands
in subprocesses, with streamed output, interrupts and timeouts.

The node's loop thread only starts, signals and listens to them: a worker is a
separate Python process (``subprocess`` + a ``multiprocessing`` connection over
a socketpair), a shell command runs under a reader thread.
"""

from __future__ import annotations

import ast
import codecs
import io
import json
import linecache
import logging
import multiprocessing
import multiprocessing.process
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from .lifeline import REAPER, die_with_parent, forked_by_forkserver, own_group

if TYPE_CHECKING:
    from ..io.transport import Loop

log = logging.getLogger(__name__)

MAX_CAPTURE = 4 * 1024 * 1024  # characters of stdout/stderr kept for the final result
MAX_REPR = 100_000
MAX_OUTPUTS = 8 * 1024 * 1024  # characters of display outputs (base64 images…) per command
OUT_CHUNK = 1024 * 1024  # characters of streamed output per 'output' message (at most)
MAX_STREAM = MAX_CAPTURE  # characters of each stream of a command sent while it runs
RESULT_BUDGET = 15 * 1024 * 1024  # bytes of JSON a result may take (a message is <= 16 MiB)
FLUSH_EVERY = 0.05  # seconds between streamed output chunks
KILL_GRACE = 2.0  # seconds between SIGINT and SIGKILL on timeout

Event = dict[str, Any]

# =============================================================================================
# The worker process
# =============================================================================================


class _Stream(io.TextIOBase):
    """A stdout/stderr that keeps what was written and streams it to the parent in chunks."""

    def __init__(self, name: str, send: Callable[[Event], None]) -> None:
        self.name = name
        self._send = send
        self.cmd = ""
        self.kept: list[str] = []
        self.kept_len = 0
        self.pending: list[str] = []
        self.last = 0.0

    def start(self, cmd: str) -> None:
        self.cmd, self.kept, self.kept_len, self.pending = cmd, [], 0, []
        self.last = time.monotonic()

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        if self.kept_len < MAX_CAPTURE:
            self.kept.append(s[: MAX_CAPTURE - self.kept_len])
            self.kept_len += len(s)
        self.pending.append(s)
        if "\n" in s and time.monotonic() - self.last >= FLUSH_EVERY:
            self.flush()
        return len(s)

    def flush(self) -> None:
        if self.pending and self.cmd:
            text = "".join(self.pending)
            self.pending = []
            self.last = time.monotonic()
            self._send({"op": "out", "cmd": self.cmd, "stream": self.name, "text": text})

    def value(self) -> str:
        text = "".join(self.kept)
        if self.kept_len > MAX_CAPTURE:
            text += f"\n[odium: output cut at {MAX_CAPTURE} of {self.kept_len} characters]\n"
        return text


def _jsonable(value: Any) -> tuple[Any, bool]:
    try:
        json.dumps(value, allow_nan=False)
        return value, True
    except (TypeError, ValueError, RecursionError):
        return None, False


def _safe_repr(value: Any) -> str:
    try:
        r = repr(value)
    except Exception as e:  # a broken __repr__ must not lose the result
        r = f"<{type(value).__name__} object; repr() failed: {e!r}>"
    return r if len(r) <= MAX_REPR else r[:MAX_REPR] + "…"


CELL_SOURCES = 1000  # cells of a worker whose source tracebacks can show (the latest ones)
_cells = 0
_cell_names: deque[str] = deque()


def cell_name(code: str) -> str:
    """A new ``<odium-cell-N>`` file name for a cell's code, with the source registered in
    ``linecache``, so that tracebacks (and ``inspect``) show the lines of the cell."""
    global _cells
    _cells += 1
    name = f"<odium-cell-{_cells}>"
    linecache.cache[name] = (len(code), None, code.splitlines(keepends=True), name)
    _cell_names.append(name)
    while len(_cell_names) > CELL_SOURCES:
        linecache.cache.pop(_cell_names.popleft(), None)
    return name


def forget_cell(name: str) -> None:
    """Drop a cell's source from ``linecache`` (a job's cell: nothing refers to it after)."""
    linecache.cache.pop(name, None)


def user_traceback(e: BaseException, internal: tuple[str, ...] = (__file__,)) -> str:
    """The traceback text of an error in the user's code, without our own frames: the
    leading frames of ``internal`` files, and, for a cell that does not compile, every frame
    (it is only where the compiler was called)."""
    if isinstance(e, SyntaxError) and e.filename and str(e.filename).startswith("<odium-cell"):
        return "".join(traceback.format_exception_only(type(e), e))
    tb = e.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename in internal:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(e), e, tb))


def interrupted_error(e: BaseException | None = None) -> dict[str, str]:
    """The error of a command stopped by SIGINT, with where it was when interrupted."""
    return {"ename": "KeyboardInterrupt", "evalue": "interrupted",
            "traceback": user_traceback(e) if e is not None else ""}


def timeout_error(timeout: float | None, interrupted: dict[str, Any] | None = None,
                  what: str = "") -> dict[str, str]:
    """The error of a command stopped by its timeout: says so, with the seconds; keeps the
    traceback of where it was when the interrupt came, with its last line saying why."""
    secs = f"{timeout:g} s" if timeout else "its time limit"
    evalue = f"timed out after {secs}" + (f"; {what}" if what else "")
    tb = str((interrupted or {}).get("traceback") or "")
    if tb:
        lines = tb.rstrip("\n").split("\n")
        if lines and lines[-1].startswith("KeyboardInterrupt"):
            lines[-1] = f"TimeoutError: {evalue} (it was here)"
        tb = "\n".join(lines) + "\n"
    return {"ename": "TimeoutError", "evalue": evalue, "traceback": tb}


def _run_python(code: str, ns: dict[str, Any],
                name: str | None = None) -> tuple[str, Any, dict[str, str] | None]:
    """Run a cell like IPython does: the last expression's value is the result."""
    name = name or cell_name(code)
    try:
        tree = ast.parse(code, filename=name, mode="exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body[-1].value)
            tree.body.pop()
        body = compile(tree, name, "exec")
        tail = compile(last, name, "eval") if last is not None else None
        exec(body, ns)
        value = eval(tail, ns) if tail is not None else None
        return "ok", value, None
    except KeyboardInterrupt as e:
        return "interrupted", None, interrupted_error(e)
    except BaseException as e:  # noqa: BLE001 - every error of the user's code is a result
        text = user_traceback(e)
        if isinstance(e, SystemExit):
            return "error", None, {"ename": "SystemExit", "evalue": str(e.code), "traceback": text}
        return "error", None, {"ename": type(e).__name__, "evalue": str(e), "traceback": text}


_RICH = (("_repr_png_", "image/png"), ("_repr_jpeg_", "image/jpeg"),
         ("_repr_svg_", "image/svg+xml"), ("_repr_html_", "text/html"),
         ("_repr_markdown_", "text/markdown"), ("_repr_latex_", "text/latex"),
         ("_repr_json_", "application/json"))


def _mimebundle(obj: Any) -> dict[str, Any]:
    """An object's rich forms, Jupyter style (``_repr_*_``, matplotlib figures), plus text."""
    data: dict[str, Any] = {}
    try:
        if _is_figure(obj):
            return {"image/png": _figure_png(obj), "text/plain": _safe_repr(obj)}
        if hasattr(obj, "_repr_mimebundle_"):
            got = obj._repr_mimebundle_()
            got = got[0] if isinstance(got, tuple) else got
            if isinstance(got, dict):
                data.update(got)
        for method, mime in _RICH:
            if mime not in data and callable(getattr(obj, method, None)):
                value = getattr(obj, method)()
                value = value[0] if isinstance(value, tuple) else value
                if value is not None:
                    data[mime] = value
    except Exception as e:  # a broken _repr_*_ must not lose the result
        data["text/plain"] = f"<display failed: {e!r}>"
    for mime, value in list(data.items()):
        if isinstance(value, bytes):
            import base64

            data[mime] = base64.b64encode(value).decode()
        elif not isinstance(value, str) and mime != "application/json":
            data[mime] = str(value)
    data.setdefault("text/plain", _safe_repr(obj))
    return data


def _is_figure(obj: Any) -> bool:
    mod = sys.modules.get("matplotlib.figure")
    return mod is not None and isinstance(obj, mod.Figure)


def _figure_png(fig: Any) -> str:
    import base64

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _open_figures() -> list[dict[str, Any]]:
    """Every open pyplot figure as an output, then closed (what Jupyter's inline backend does)."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return []
    out = []
    try:
        for num in plt.get_fignums():
            fig = plt.figure(num)
            out.append({"data": {"image/png": _figure_png(fig), "text/plain": _safe_repr(fig)},
                        "metadata": {}})
        plt.close("all")
    except Exception as e:  # noqa: BLE001 - a figure that cannot be drawn is a note, not a crash
        out.append({"data": {"text/plain": f"<figure failed: {e!r}>"}, "metadata": {}})
    return out


class _Displays:
    """``display(obj)`` inside a cell: each call is one output of the command."""

    def __init__(self) -> None:
        self.outputs: list[dict[str, Any]] = []

    def __call__(self, *objs: Any, **_: Any) -> None:
        for obj in objs:
            self.outputs.append({"data": _mimebundle(obj), "metadata": {}})

    def take(self, value: Any) -> list[dict[str, Any]]:
        """This command's outputs: display() calls, open figures, then a rich value."""
        outs, self.outputs = self.outputs, []
        outs += _open_figures()
        if value is not None and not _is_figure(value):
            bundle = _mimebundle(value)
            if set(bundle) - {"text/plain"}:
                outs.append({"data": bundle, "metadata": {}})
        size = sum(len(json.dumps(o, default=str)) for o in outs)
        if size > MAX_OUTPUTS:
            outs = [{"data": {"text/plain": f"[odium: {len(outs)} display outputs dropped: "
                                            f"{size} characters, more than {MAX_OUTPUTS}]"},
                     "metadata": {}}]
        return outs


def _forked_worker(sock: socket.socket, app: str) -> None:
    """Entry point of a worker forked by the node's fork server (already imported)."""
    forked_by_forkserver()
    os.chdir(app)
    worker_main(Connection(sock.detach()), os.getppid())


def worker_main(conn: Connection | None = None, parent: int | None = None) -> None:
    """Entry point of a worker process, talking to its node over ``conn``."""
    if conn is None:  # started as a fresh interpreter: the fd is in the environment
        conn = Connection(int(os.environ.pop("ODIUM_WORKER_FD")))
        parent = int(os.environ.pop("ODIUM_PARENT_PID", "0")) or os.getppid()
    die_with_parent(parent or os.getppid())
    own_group()
    app = os.getcwd()
    if app not in sys.path:
        sys.path.insert(0, app)
    lock = threading.Lock()

    def send(ev: Event) -> None:
        data = json.dumps(ev, default=str).encode()
        with lock:
            conn.send_bytes(data)

    os.environ.setdefault("MPLBACKEND", "Agg")  # figures are drawn to PNG, never to a screen
    out, err = _Stream("stdout", send), _Stream("stderr", send)
    displays = _Displays()
    ns: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__,
                          "display": displays}
    send({"op": "ready", "pid": os.getpid()})
    while True:
        try:
            raw = conn.recv_bytes()
        except (EOFError, OSError):
            return
        except KeyboardInterrupt:  # an interrupt that came between two commands
            continue
        req = json.loads(raw)
        if req.get("op") == "exit":
            return
        cmd = req["cmd"]
        out.start(cmd)
        err.start(cmd)
        started = time.time()
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        try:
            status, value, error = _run_python(req["code"], ns)
        except KeyboardInterrupt:  # arrived after the code finished, before we noticed
            status, value, error = "interrupted", None, interrupted_error()
        finally:
            sys.stdout, sys.stderr = saved
        try:
            out.flush()
            err.flush()
        except KeyboardInterrupt:
            pass
        try:
            outputs = displays.take(value)
        except KeyboardInterrupt:
            outputs = []
        res: Event = {"status": status, "started": started, "finished": time.time(),
                      "stdout": out.value(), "stderr": err.value(), "error": error}
        if outputs:
            res["outputs"] = outputs
        if value is not None:
            res["value"], res["value_json"] = _jsonable(value)
            res["value_repr"] = _safe_repr(value)
        out.cmd = err.cmd = ""
        while True:
            try:
                send({"op": "done", "cmd": cmd, "result": res})
                break
            except KeyboardInterrupt:
                continue


# =============================================================================================
# The node's side
# =============================================================================================


def _size(value: Any) -> int:
    """Bytes of ``value`` as JSON on the wire (UTF-8, as the node's encoder writes it)."""
    return len(json.dumps(value, ensure_ascii=False, default=str).encode())


def _cut(text: str, limit: int, what: str) -> str:
    """``text`` within about ``limit`` bytes, with a visible note when it was cut."""
    if _size(text) <= limit:
        return text
    keep = max(0, limit // 6 - 200)  # 6 bytes per character at worst (a JSON escape)
    return (text[:keep] + f"\n[odium: {what} cut to {keep} of {len(text)} characters: the "
            "result must fit in one message]\n")


def fit_result(res: Event, budget: int = RESULT_BUDGET) -> Event:
    """A result that fits in one message the hub accepts: a value, display outputs, streams
    or a traceback too large for it give way, each with a visible note; never a message the
    hub must refuse."""
    if _size(res) <= budget:
        return res
    res = dict(res)
    notes: list[str] = []
    for strict in (False, True):  # first only what is large; then whatever it takes
        if res.get("value") is not None and (strict or _size(res["value"]) > budget // 4):
            notes.append(f"[odium: the value ({_size(res['value'])} bytes of JSON) was too "
                         "large to send; its repr is shown]")
            res["value"], res["value_json"] = None, False
        if res.get("outputs") and (strict or _size(res["outputs"]) > budget // 4):
            notes.append(f"[odium: {len(res['outputs'])} display outputs "
                         f"({_size(res['outputs'])} bytes) were too large to send]")
            res["outputs"] = []
        if isinstance(res.get("error"), dict) and res["error"].get("traceback"):
            err = dict(res["error"])
            err["traceback"] = _cut(str(err["traceback"]), budget // 8, "the traceback")
            res["error"] = err
        for name in ("stdout", "stderr"):
            if res.get(name):
                res[name] = _cut(str(res[name]), budget // (4 if strict else 3), name)
        if _size(res) + 1000 <= budget:
            break
    if notes:
        res["stderr"] = (res.get("stderr") or "") + "\n".join(notes) + "\n"
    return res


@dataclass
class _Job:
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
    (after ``odium.node.forkserver_guard``, which ties the fork server's life to this process)."""
    global _FORK_CTX
    if _FORK_CTX is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["odium.node.forkserver_guard", "odium.node.executor",
                                    "odium.node.jobpool"])
        _FORK_CTX = ctx
    return _FORK_CTX


def warm_forkserver() -> None:
    """Start the fork server now (it imports in the background), so the first worker is fast.
    Returns at once: the starter thread starts it (see ``_Starter``)."""
    from multiprocessing import forkserver

    forkserver_context()
    _STARTER.submit(forkserver.ensure_running)


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


@dataclass
class _Worker:
    proc: Any  # a _Starting (over subprocess.Popen or a _ProcessHandle)
    conn: Connection
    ready: bool = False
    job: _Job | None = None
    queue: deque[_Job] = field(default_factory=deque)


class Executor:
    """Runs commands for a node. All methods are called from the node's loop thread."""

    def __init__(self, loop: Loop, app: str, on_event: Callable[[Event], None],
                 prestart: bool = True) -> None:
        self.loop = loop
        self.app = app
        self.on_event = on_event
        self.sessions: dict[str, _Worker] = {}
        self.spare: _Worker | None = None
        self.jobs: dict[str, _Job] = {}
        self.streamed: dict[tuple[str, str], int] = {}  # (cmd, stream) -> characters sent
        self.closed = False
        self.reaper = REAPER  # shell commands' and workers' process groups end with the node
        if prestart:
            self.spare = self._spawn()

    # --- workers ---------------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        proc, parent = spawn_worker(_forked_worker,
                                    "from odium.node.executor import worker_main; worker_main()",
                                    self.app, "odium-worker")
        conn = Connection(parent.detach())
        w = _Worker(proc, conn)
        self.loop.add(conn.fileno(), lambda: self._on_worker(w))
        return w

    def _worker_for(self, session: str) -> _Worker:
        w = self.sessions.get(session)
        if w is None:
            if self.spare is not None and self.spare.proc.poll() is not None:
                self._worker_died(self.spare)  # it died before we heard: not for a session
            w, self.spare = (self.spare or self._spawn()), None
            self.sessions[session] = w
            self.loop.call_soon_threadsafe(self._refill_spare)
        return w

    def warm(self) -> None:
        """Start a spare worker now, so that the next new session starts at once."""
        self._refill_spare()

    def _refill_spare(self) -> None:
        if self.spare is None and not self.closed:
            self.spare = self._spawn()

    def _on_worker(self, w: _Worker) -> None:
        try:
            raw = w.conn.recv_bytes()
        except (EOFError, OSError):
            self._worker_died(w)
            return
        ev = json.loads(raw)
        op = ev.get("op")
        if op == "ready":
            w.ready = True
            self._next(w)
        elif op == "out":
            self._out(ev)
        elif op == "done":
            job = w.job
            w.job = None
            if job is not None and job.cmd == ev["cmd"]:
                res = ev["result"]
                if res["status"] == "interrupted" and job.reason:
                    res["status"] = job.reason
                    if job.reason == "timeout":
                        res["error"] = timeout_error(job.timeout, res.get("error"))
                self._finish(job, res)
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
        lost = ([w.job] if w.job else []) + list(w.queue)
        for job in lost:
            if job.reason == "timeout":
                status = "timeout"
                error = timeout_error(job.timeout, what="the worker was killed and its "
                                      "namespace lost")
            else:
                status = "error"
                error = {"ename": "WorkerDied", "evalue": f"the worker process died (exit "
                         f"status {code}); its namespace is lost", "traceback": ""}
            self._finish(job, {"status": status, "started": job.started or time.time(),
                               "finished": time.time(), "error": error})
        self.loop.call_soon_threadsafe(self._refill_spare)

    def _next(self, w: _Worker) -> None:
        if w.job is not None or not w.ready or not w.queue:
            return
        job = w.queue.popleft()
        w.job = job
        job.started = time.time()
        try:
            w.conn.send_bytes(json.dumps({"op": "exec", "cmd": job.cmd, "code": job.code}).encode())
        except OSError:
            self._worker_died(w)
            return
        self._arm_timeout(job)

    # --- public ----------------------------------------------------------------------------

    def submit(self, cmd: str, kind: str, code: str, session: str = "default",
               timeout: float | None = None, ephemeral: bool = False) -> None:
        if self.closed:
            raise RuntimeError("executor is closed")
        job = _Job(cmd, kind, code, session, timeout, ephemeral)
        self.jobs[cmd] = job
        if kind == "shell":
            self._start_shell(job)
            return
        w = self._worker_for(session)
        job.worker = w
        w.queue.append(job)
        self._next(w)

    def running(self) -> list[str]:
        return list(self.jobs)

    def interrupt(self, cmd: str, reason: str = "interrupted") -> bool:
        job = self.jobs.get(cmd)
        if job is None:
            return False
        job.reason = job.reason or reason
        if job.proc is not None:  # shell: the whole process group, even after the shell exits
            pgid = job.proc.pid
            _kill_group(pgid, signal.SIGINT)
            self.loop.call_later(KILL_GRACE, lambda: _kill_group(pgid, signal.SIGKILL))
            return True
        w = job.worker
        if w is None:
            return False
        if w.job is job:
            try:
                w.proc.send_signal(signal.SIGINT)
            except ProcessLookupError:
                pass
            self.loop.call_later(KILL_GRACE, lambda: self._kill_if_stuck(job))
        else:  # still queued behind another command of the session
            w.queue.remove(job)
            now = time.time()
            error = (timeout_error(job.timeout, what="it was still waiting for the session's "
                                   "earlier command") if job.reason == "timeout" else
                     {"ename": "KeyboardInterrupt", "evalue": "interrupted before it started",
                      "traceback": ""})
            self._finish(job, {"status": job.reason, "started": now, "finished": now,
                               "error": error})
        return True

    def close_session(self, session: str) -> None:
        """Forget a session's namespace; its worker stops once it has nothing left to run."""
        w = self.sessions.get(session)
        if w is not None and w.job is None and not w.queue:
            del self.sessions[session]
            self._stop_worker(w)

    def close(self) -> None:
        self.closed = True
        workers = list(self.sessions.values()) + ([self.spare] if self.spare else [])
        self.sessions.clear()
        self.spare = None
        for w in workers:
            self._stop_worker(w)
        for job in list(self.jobs.values()):
            if job.proc is not None:
                _signal_group(job.proc, signal.SIGKILL)
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
            w.conn.send_bytes(b'{"op":"exit"}')
        except OSError:
            pass
        w.conn.close()
        if w.proc.poll() is None:
            w.proc.terminate()

    def _kill_if_stuck(self, job: _Job) -> None:
        w = job.worker
        if job.cmd in self.jobs and w is not None and w.job is job and w.proc.poll() is None:
            w.proc.kill()

    def _arm_timeout(self, job: _Job) -> None:
        if job.timeout:
            def expire() -> None:
                if job.cmd in self.jobs:
                    self.interrupt(job.cmd, "timeout")

            self.loop.call_later(job.timeout, expire)

    def _finish(self, job: _Job, res: Event) -> None:
        if self.jobs.pop(job.cmd, None) is None:
            return
        self.streamed.pop((job.cmd, "stdout"), None)
        self.streamed.pop((job.cmd, "stderr"), None)
        self.on_event({"op": "done", "cmd": job.cmd, "result": fit_result(res)})
        if job.ephemeral and job.kind == "python":
            self.close_session(job.session)

    def _emit(self, ev: Event) -> None:
        """From a reader thread: hand an output event to the loop thread."""
        self.loop.call_soon_threadsafe(lambda: self._out(ev))

    def _out(self, ev: Event) -> None:
        """Streamed output, in messages the hub accepts: chunks of at most OUT_CHUNK
        characters, and no more than MAX_STREAM characters per stream of a command (then one
        visible note; the result keeps the first MAX_CAPTURE)."""
        key = (ev["cmd"], ev["stream"])
        sent = self.streamed.get(key, 0)
        if sent > MAX_STREAM or ev["cmd"] not in self.jobs:
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

    def _start_shell(self, job: _Job) -> None:
        job.started = time.time()
        try:
            job.proc = subprocess.Popen(  # its group told to the reaper before it runs
                job.code, shell=True, cwd=self.app, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                preexec_fn=self.reaper.announce(),
            )
        except OSError as e:
            self._finish(job, {"status": "error", "started": job.started, "finished": time.time(),
                               "error": {"ename": type(e).__name__, "evalue": str(e),
                                         "traceback": ""}})
            return
        self._arm_timeout(job)
        threading.Thread(target=self._shell_reader, args=(job,), daemon=True,
                         name=f"odium-shell-{job.cmd[:8]}").start()

    def _shell_reader(self, job: _Job) -> None:
        proc = job.proc
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
                        kept[name].append(text)
                    sizes[name] += len(text)
                    self._emit({"op": "out", "cmd": job.cmd, "stream": name, "text": text})
                if not chunk:
                    return

        t = threading.Thread(target=pump, args=(proc.stderr, "stderr"), daemon=True)
        t.start()
        pump(proc.stdout, "stdout")
        t.join()
        code = proc.wait()
        pgid = proc.pid
        self.loop.call_soon_threadsafe(lambda: self.reaper.forget(pgid))
        res: Event = {"started": job.started, "finished": time.time(), "exit": code,
                      "stdout": "".join(kept["stdout"])[:MAX_CAPTURE],
                      "stderr": "".join(kept["stderr"])[:MAX_CAPTURE]}
        if code == 0:
            res["status"] = "ok"
        elif job.reason:  # the exit status is in the result's ``exit``, said once
            res["status"] = job.reason
            res["error"] = (timeout_error(job.timeout, what="the command was interrupted")
                            if job.reason == "timeout" else
                            {"ename": "KeyboardInterrupt", "evalue": "interrupted",
                             "traceback": ""})
        else:
            res["status"] = "error"
            res["error"] = {"ename": "ShellError", "evalue": f"exit status {code}",
                            "traceback": ""}
        self.loop.call_soon_threadsafe(lambda: self._finish(job, res))


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
