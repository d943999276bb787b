#!/usr/bin/env python
"""A swarm: many real Odium nodes packed into a few processes, for the hub's side of scale
(as Salt's minionswarm is for its master).

    python bench/swarm.py SPEC.json        # one swarm process (started by ``Swarm`` below)

Each node in a swarm process is the node's own code (``odium.node.agent.NodeCore``) with its
own home, identity (Curve25519 + Ed25519 keys), clock, signer, replay cache, status, sockets
(CURVE handshakes of its own: query, SUB, PUSH, PULL, and their handshake monitors),
heartbeats, join token or trusted key, and its own session namespaces. What the nodes of one
process share: the process and its one loop thread, one ZeroMQ context (its I/O thread), the
application checkout and its one state watch (one state id, checked at most every 5 s for
them all), the verification of the hub's signature on the same bytes (once for all of them;
each node still checks its own replay window and handles every message), and the running of
their commands and jobs, in-process, in the loop thread, one after another
(``SharedWorkers``: the node's worker processes are replaced, and nothing else).
See bench/README.md.

``Swarm`` (used by bench/bench_scale.py and tests/test_swarm.py) prepares the nodes' homes
in a hub's home, trusts their keys or makes each a token, and starts and stops the processes.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
Event = dict[str, Any]


# --- what the nodes of one swarm process share ---------------------------------------------


class Shared:
    """The process's part of every node's runtime: loop, ZeroMQ context, app and state."""

    def __init__(self, app: str) -> None:
        import zmq

        from odium.io.transport import Loop
        from odium.local.appstate import find_app, state_id
        from odium.local.watch import StateWatch

        self.app = find_app(app)
        self.state = state_id(self.app)
        self.ctx = zmq.Context()
        self.ctx.set(zmq.MAX_SOCKETS, 65536)
        self.loop = Loop("swarm-loop")
        self.watch = StateWatch(self.app, self.loop.call_soon_threadsafe, self._set_state)
        self._checked = 0.0
        real_refresh = self.watch.refresh

        def refresh() -> None:  # one check for all the nodes, at most every 5 s
            now = time.monotonic()
            if now - self._checked >= 5.0:
                self._checked = now
                real_refresh()

        self.watch.refresh = refresh  # type: ignore[method-assign]
        self.verified: dict[bytes, OrderedDict[bytes, bytes]] = {}

    def verifier(self, vk: Any) -> Any:
        """The hub's verify key as a node of this process uses it: the same bytes, signed
        by the same key, are verified once for all the nodes here (each PUB message reaches
        every one of them: verified 1,000 times, it is the swarm's work, not the hub's)."""
        return OnceVerified(vk, self.verified.setdefault(bytes(vk), OrderedDict()))

    def later(self, fn: Callable[[], None]) -> None:
        """Run fn in the loop thread once what it is handling now is done (the swarm's one
        worker: its nodes' commands and jobs, in-process, one after another)."""
        self.loop.call_later(0, fn)

    def _set_state(self, state: str) -> None:
        self.state = state


class OnceVerified:
    """A verify key that remembers the last 4,096 (signature, bytes) it found good."""

    def __init__(self, vk: Any, good: OrderedDict[bytes, bytes]) -> None:
        self.vk, self.good = vk, good

    def verify(self, signed: bytes, sig: bytes) -> bytes:
        if self.good.get(sig) == signed:
            return signed
        self.vk.verify(signed, sig)  # (raises BadSignatureError)
        self.good[sig] = signed
        if len(self.good) > 4096:
            self.good.popitem(last=False)
        return signed


class NodeRT:
    """One swarm node's runtime (``odium.node.ports.NodeRuntime``)."""

    def __init__(self, shared: Shared, home: Path) -> None:
        from odium.core import wire as P
        from odium.core.clock import Clock
        from odium.local.home import ensure_home, load_or_create

        self.shared = shared
        self.home = ensure_home(home)
        self.ident = load_or_create(self.home / "identity.key")
        self.app = shared.app
        self.clock = Clock()
        self.sign = P.Signer(self.ident.signing, self.ident.key_id, lambda: shared.state,
                             self.clock)
        self.ctx = shared.ctx
        self.loop = shared.loop
        self.watch = shared.watch
        self.closers: list[Callable[[], None]] = []

    @property
    def state(self) -> str:
        return self.shared.state

    def notify(self) -> None:
        pass

    def call(self, fn: Callable[[], Any], timeout: float = 30.0) -> Any:
        return fn()  # (the swarm starts its nodes in the loop thread)

    def own(self, what: str, close: Callable[[], None]) -> None:
        self.closers.append(close)


# --- one worker thread for every node of the process ---------------------------------------


class SharedCommands:
    """A node's broadcast commands, run in-process by the swarm's loop (Python in a namespace
    per session, shell with subprocess); results as the session workers make them."""

    def __init__(self, shared: Shared, on_event: Callable[[Event], None]) -> None:
        self.shared = shared
        self.on_event = on_event
        self.runs: dict[str, float | None] = {}
        self.namespaces: dict[str, dict[str, Any]] = {}

    def submit(self, cmd: str, kind: str, code: str, session: str = "default",
               timeout: float | None = None, ephemeral: bool = False,
               deadline: float | None = None) -> None:
        self.runs[cmd] = deadline
        ns = self.namespaces.setdefault(session, {"__name__": "__main__"})
        self.shared.later(lambda: self._done(cmd, run_command(kind, code, ns, timeout)))

    def _done(self, cmd: str, res: Event) -> None:
        if self.runs.pop(cmd, "gone") != "gone":
            self.on_event({"op": "done", "cmd": cmd, "result": res})

    def running(self) -> list[str]:
        return list(self.runs)

    def interrupt(self, cmd: str, reason: str = "interrupted") -> bool:
        return False  # a thread cannot be interrupted: swarm commands are tiny

    def warm(self) -> None:
        pass

    def close(self) -> None:
        self.runs.clear()


def run_command(kind: str, code: str, ns: dict[str, Any], timeout: float | None) -> Event:
    from odium.node.workers.code import add_value, run_python

    started = time.time()
    if kind == "shell":
        p = subprocess.run(["/bin/sh", "-c", code], capture_output=True, timeout=timeout,
                           check=False)
        return {"status": "ok" if p.returncode == 0 else "error", "started": started,
                "finished": time.time(), "exit": p.returncode,
                "stdout": p.stdout.decode(errors="replace"),
                "stderr": p.stderr.decode(errors="replace"), "error": None}
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status, value, error = run_python(code, ns)
    res: Event = {"status": status, "started": started, "finished": time.time(),
                  "error": error, "stdout": out.getvalue(), "stderr": err.getvalue()}
    add_value(res, value)
    return res


class SharedJobs:
    """A node's jobs, run in-process by the swarm's loop, one after another (``run_job``, the
    job worker's own function)."""

    def __init__(self, shared: Shared, on_done: Callable[[str, Event], None]) -> None:
        self.shared = shared
        self.on_done = on_done
        self.fns: dict[str, bytes] = {}
        self.cancelled: set[str] = set()

    def start(self, job_id: str, job: dict[str, Any], timeout: float | None,
              fn_data: str | None = None) -> None:
        from odium.node.workers.job import run_job

        if fn_data and job.get("fn"):
            self.fns[job["fn"]] = base64.b64decode(fn_data)
        self.shared.later(lambda: self._done(job_id, run_job(job, self.fns)))

    def _done(self, job_id: str, res: Event) -> None:
        if job_id in self.cancelled:
            self.cancelled.discard(job_id)
            res["status"] = "cancelled"
        self.on_done(job_id, res)

    def cancel(self, job_id: str, reason: str = "cancelled") -> bool:
        self.cancelled.add(job_id)
        return True

    def close(self) -> None:
        pass


class SharedWorkers:
    """``odium.node.workers.kinds.Workers`` for a swarm node: run in the swarm's loop."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared

    def start(self) -> None:
        pass

    def commands(self, loop: Any, app: str, on_event: Callable[[Event], None]) -> Any:
        return SharedCommands(self.shared, on_event)

    def jobs(self, loop: Any, app: str, capacity: int,
             on_done: Callable[[str, Event], None]) -> Any:
        return SharedJobs(self.shared, on_done)

    def stop(self) -> None:
        pass


# --- a swarm process ------------------------------------------------------------------------


class Counts:
    """What a swarm process's nodes went through to join: requests sent again (retries, by
    type) and refused handshakes; written to ``path`` every second."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.retries: dict[str, int] = {}
        self.refused = 0
        self.broken = 0  # connections broken (disconnected after their handshake)
        self.nodes: list[Any] = []

    def watch(self, node: Any) -> None:
        self.nodes.append(node)
        again, refused = node.requests.again, node._refused

        def counted_again(req: Any, sock: Any = None) -> None:
            if req.tries:  # an attempt after the first: a retry
                self.retries[req.type] = self.retries.get(req.type, 0) + 1
            again(req, sock)

        def counted_refused(what: str) -> None:
            self.refused += 1
            refused(what)

        node.requests.again = counted_again
        node._refused = counted_refused
        on_link = node.link.on_link

        def counted_link(sock: Any, up: bool) -> None:
            if not up:
                self.broken += 1
            on_link(sock, up)

        node.link.on_link = counted_link

    def write(self) -> None:
        ready = sum(1 for n in self.nodes if n.status.value == "ready")
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "nodes": len(self.nodes),
                                   "ready": ready, "retries": self.retries,
                                   "refused": self.refused, "broken": self.broken}))
        tmp.replace(self.path)


def serve(spec: dict[str, Any]) -> None:
    """Start every node of the spec at once (a join storm), then serve until SIGTERM."""
    from odium.core.keys import Token
    from odium.node.agent import NodeCore, save_joined
    from odium.node.lifeline import die_with_parent

    die_with_parent(spec["parent"])
    logging.basicConfig(level=logging.ERROR, format=f"swarm {os.getpid()}: %(message)s")
    shared = Shared(spec["app"])
    counts = Counts(Path(spec["stats"]))
    nodes: list[tuple[Any, NodeRT]] = []

    def start_all() -> None:
        for n in spec["nodes"]:
            rt = NodeRT(shared, Path(n["home"]))
            token = Token.decode(n["token"]) if n.get("token") else None
            if token is None:
                save_joined(rt.home, spec["address"], spec["hub_key"], n["name"])
            node = NodeCore(rt, spec["address"], spec["hub_key"], n["name"], token=token,
                            capacity=spec.get("capacity", 1), workers=SharedWorkers(shared))
            node.vk = shared.verifier(node.vk)
            counts.watch(node)
            nodes.append((node, rt))
        counts.write()

    def stop(*_: Any) -> None:
        shared.loop.call_soon_threadsafe(shared.loop.stop)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    shared.loop.call_soon_threadsafe(start_all)
    shared.loop.every(1.0, counts.write)
    shared.loop.run()
    counts.write()
    for node, rt in nodes:
        for close in reversed(rt.closers):
            close()
        node.close()
    shared.loop.close()
    shared.ctx.term()


# --- the parent's side ----------------------------------------------------------------------


class Swarm:
    """``n`` swarm nodes named ``{prefix}{i:04d}`` in ``procs`` processes, joined to ``hub``
    (an ``odium.Hub`` in this process). ``join``: "trusted" (keys trusted first: the nodes
    register) or "token" (a token each: the nodes join, as a new machine does)."""

    def __init__(self, hub: Any, n: int, procs: int = 4, *, prefix: str = "sw",
                 join: str = "trusted", capacity: int = 1) -> None:
        from odium.local.home import ensure_home, load_or_create

        self.hub = hub
        self.names = [f"{prefix}{i:04d}" for i in range(n)]
        # the nodes' homes in memory where there is a tmpfs: each node writes its keys and
        # joined.json with fsync as on a machine of its own, 1,000 of them on one disk here
        shm = Path("/dev/shm")
        self.base = ensure_home(Path(tempfile.mkdtemp(prefix="odium-swarm-", dir=shm))
                                if shm.is_dir() and os.access(shm, os.W_OK)
                                else Path(hub.home) / "swarm")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.groups: list[list[str]] = [self.names[i::procs] for i in range(procs)]
        self.specs: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        for group in self.groups:
            nodes = []
            for name in group:
                home = ensure_home(self.base / name)
                if join == "token":
                    nodes.append({"name": name, "home": str(home), "token": hub.token()})
                else:
                    self.hub.trust(load_or_create(home / "identity.key").key_id, name)
                    nodes.append({"name": name, "home": str(home)})
            self.specs.append({"address": hub.address, "hub_key": hub.key, "parent": os.getpid(),
                               "app": str(hub.core.rt.app), "capacity": capacity,
                               "stats": str(self.base / f"stats{len(self.specs)}.json"),
                               "nodes": nodes})
        self.prepared = time.perf_counter() - t0

    def start(self) -> None:
        """Start every process at once; each starts all its nodes at once."""
        for i, spec in enumerate(self.specs):
            path = self.base / f"spec{i}.json"
            path.write_text(json.dumps(spec))
            self.procs.append(subprocess.Popen(
                [sys.executable, str(HERE / "swarm.py"), str(path)],
                stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL))

    def ready(self) -> int:
        """How many of the swarm's nodes the hub has ready."""
        names = set(self.names)
        return sum(1 for n in self.hub.nodes() if n["name"] in names and n["status"] == "ready")

    def kill(self, i: int) -> list[str]:
        """SIGKILL process ``i`` (all its nodes at once); the names of its nodes."""
        self.procs[i].kill()
        self.procs[i].wait(10)
        return list(self.groups[i])

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 20
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        shutil.rmtree(self.base, ignore_errors=True)

    def counts(self) -> dict[str, Any]:
        """The processes' counts (``Counts``) added up: retries by type, refused handshakes."""
        total: dict[str, Any] = {"retries": {}, "refused": 0, "ready": 0, "broken": 0}
        for spec in self.specs:
            try:
                c = json.loads(Path(spec["stats"]).read_text())
            except (OSError, ValueError):
                continue
            total["refused"] += c["refused"]
            total["broken"] += c.get("broken", 0)
            total["ready"] += c["ready"]
            for k, v in c["retries"].items():
                total["retries"][k] = total["retries"].get(k, 0) + v
        return total

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    serve(spec)


if __name__ == "__main__":
    if str(HERE.parent) not in sys.path:
        sys.path.insert(0, str(HERE.parent))
    main()

__all__ = ["NodeRT", "Shared", "SharedWorkers", "Swarm"]
