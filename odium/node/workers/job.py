"""The job worker's loop: a worker process of a node's job pool runs job after job, each in a
fresh ``__main__``-like namespace (modules a job imports stay imported), and answers each with
its result. A job never sees a session's namespace, nor the previous job's."""

from __future__ import annotations

import base64
import json
import pickle
import socket
import sys
import time
from typing import Any

import msgspec

from .capture import Capture
from .channel import Channel
from .code import add_value, cell_name, error_info, forget_cell, interrupted_error, run_python
from .results import fit_result
from .start import connect

MAX_JOB_CAPTURE = 1024 * 1024  # characters of a job's stdout/stderr kept

Event = dict[str, Any]


_OUT, _ERR = Capture("stdout", MAX_JOB_CAPTURE), Capture("stderr", MAX_JOB_CAPTURE)


def _call(req: dict[str, Any], fns: dict[str, bytes] | None, args: list[Any],
          kwargs: dict[str, Any]) -> tuple[str, Any, dict[str, str] | None]:
    """Run a job's code or call its function: (status, value, error)."""
    if req["kind"] == "python":
        ns: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
        if args or kwargs:
            ns["args"], ns["kwargs"] = tuple(args), dict(kwargs)
            # keyword arguments are names too: submit("a + b", a=2, b=3)
            ns.update((k, v) for k, v in kwargs.items() if str(k).isidentifier())
        name = cell_name(req["code"])
        try:
            return run_python(req["code"], ns, name)
        finally:
            forget_cell(name)  # a fresh namespace each job: nothing refers to it later
    data = (fns or {}).get(req["fn"]) if req.get("fn") else None
    if data is None:
        raise RuntimeError(f"function {req.get('fn')} was not sent to this worker")
    fn = pickle.loads(data)
    return "ok", fn(*args, **kwargs), None


def run_job(req: dict[str, Any], fns: dict[str, bytes] | None = None) -> Event:
    """Run one job in a fresh namespace; return its result (status ok|error|interrupted).

    ``fns``: the serialised functions this worker was sent (hash -> pickle bytes). The
    function is unpickled for every job, so that each call gets fresh globals.
    """
    out, err = _OUT, _ERR
    out.start()
    err.start()
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
        status, value, error = _call(req, fns, args, kwargs)
    except KeyboardInterrupt:
        status, value = "interrupted", None
        error = interrupted_error()
    except BaseException as e:  # noqa: BLE001 - every error of the job is its result
        status, value, error = "error", None, error_info(e, (__file__,))  # its frames, not ours
    finally:
        sys.stdout, sys.stderr = saved
    out.finish()
    err.finish()
    res: Event = {"status": status, "started": started, "finished": time.time(),
                  "error": error}
    out.into(res)
    err.into(res)
    add_value(res, value)
    return res


def main(sock: socket.socket | None = None, parent: int | None = None) -> None:
    """Entry point of a job worker process, talking to its node over ``sock`` (or, started
    as a fresh interpreter, the fd in ODIUM_WORKER_FD).

    It gets one job at a time as JSON (with ``fnd``, the function's pickle in base64, the
    first time this worker sees that function) and answers with the job's result as JSON.
    """
    decode = msgspec.json.Decoder().decode
    fns: dict[str, bytes] = {}
    conn = connect(sock, parent)
    conn.send(b'{"op":"ready"}')
    while (raw := conn.next_request()) is not None:
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
                   "error": interrupted_error()}
        res = fit_result(res)  # here, not in the node's loop: it may take a while for a big one
        res["op"], res["id"] = "done", req["id"]
        _send(conn, res)


_encode = msgspec.json.Encoder().encode


def _send(conn: Channel, res: Event) -> None:
    """Send a job's result, once (a frame goes whole: an interrupt waits until it is sent)."""
    try:
        data = _encode(res)
    except (TypeError, OverflowError, msgspec.EncodeError):  # e.g. an int of 100 digits
        res["value"], res["value_json"] = None, False
        data = json.dumps(res, default=str).encode()
    conn.send_surely(data)


__all__ = ["main", "run_job"]
