"""The session worker's loop: one worker process per session of a node, running the session's
commands one after the other in one namespace, with their output streamed to the node."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any

from .capture import Capture, Displays, route_ipython_display
from .code import add_value, interrupted_error, run_python
from .results import fit_result
from .start import connect

MAX_CAPTURE = 4 * 1024 * 1024  # characters of stdout/stderr kept for the final result

Event = dict[str, Any]



def main(sock: socket.socket | None = None, parent: int | None = None) -> None:
    """Entry point of a session worker process, talking to its node over ``sock``."""
    conn = connect(sock, parent)

    def send(ev: Event) -> None:
        conn.send(json.dumps(ev, default=str).encode())

    os.environ.setdefault("MPLBACKEND", "Agg")  # figures are drawn to PNG, never to a screen
    out, err = Capture("stdout", MAX_CAPTURE, send), Capture("stderr", MAX_CAPTURE, send)
    displays = Displays()
    route_ipython_display(displays)
    ns: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__,
                          "display": displays}
    send({"op": "ready", "pid": os.getpid()})
    while (raw := conn.next_request()) is not None:
        req = json.loads(raw)
        if req.get("op") == "exit":
            return
        res = _run(req["cmd"], req["code"], ns, out, err, displays)
        conn.send_surely(json.dumps({"op": "done", "cmd": req["cmd"], "result": res},
                                    default=str).encode())


def _run(cmd: str, code: str, ns: dict[str, Any], out: Capture, err: Capture,
         displays: Displays) -> Event:
    """Run one command of the session; its result."""
    out.start(cmd)
    err.start(cmd)
    started = time.time()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        status, value, error = run_python(code, ns)
    except KeyboardInterrupt:  # arrived after the code finished, before we noticed
        status, value, error = "interrupted", None, interrupted_error()
    finally:
        sys.stdout, sys.stderr = saved
    try:
        out.finish()
        err.finish()
    except KeyboardInterrupt:
        pass
    try:
        outputs = displays.take(value)
    except KeyboardInterrupt:
        outputs = []
    res: Event = {"status": status, "started": started, "finished": time.time(),
                  "error": error}
    out.into(res)
    err.into(res)
    if outputs:
        res["outputs"] = outputs
    add_value(res, value)
    out.cmd = err.cmd = ""
    return fit_result(res)  # here, not in the node's loop: it may take a while for a big one


__all__ = ["main"]
