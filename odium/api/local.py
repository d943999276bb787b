"""Local nodes: node processes an in-process ``Hub`` starts on this machine (``start_local``).

Each has a home of its own under the hub's (``HOME/local/NAME``: its key, its ``joined``
record, its ``node.log``) and is ``odium node`` in a session of its own, so that a Ctrl-C
meant for the hub's process (the notebook's stop button signals the kernel's whole process
group) does not stop it; it stops when the hub's process is gone.

The hub's launcher (``Launcher``: a zygote, ``odium.node.workers.zygote``, that has imported
the node's code once) forks them, in milliseconds each instead of an interpreter's imports
(~0.2 s of CPU a node). A node is started as a new interpreter (``python -m odium node``)
when it needs another Python, when its environment would start an interpreter differently
(``PYTHON*``, ``LD_*``), with ``ODIUM_ZYGOTE=exec``, or when there is no launcher.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..local.home import ensure_home, load_or_create
from ..node.agent import save_joined
from ..node.workers.start import in_starter
from ..node.workers.zygote import MODE_ENV, Zygote

log = logging.getLogger(__name__)

MAX_LOCAL = 256  # local nodes one start_local call may start
START_VARS = ("PYTHON", "LD_")  # variables that change how an interpreter starts


@dataclass
class LocalNode:
    """A node process started on this machine by the hub."""

    name: str
    home: Path
    proc: Any  # subprocess.Popen (a new interpreter) or zygote.Forked (the launcher's)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def free_name(prefix: str, base: Path, running: set[str], known: set[str]) -> str:
    """The first local name ``PREFIX-N`` whose node is not running and that is either unknown
    to the hub or a local node's already (its home has a key): a hub started again with the
    same home gets its local nodes back (same home, same key), not new ones."""
    seq = 0
    while True:
        seq += 1
        name = f"{prefix}-{seq}"
        if name in running:
            continue
        if name not in known or (base / name / "identity.key").exists():
            return name


class Launcher:
    """A hub's zygote of local nodes, started as a new interpreter on first use, again when it
    has ended; closed with the hub (after its nodes: it reads their exit statuses)."""

    def __init__(self) -> None:
        self.zygote: Zygote | None = None
        self.env: dict[str, str] = {}  # the environment it started in
        self._lock = threading.Lock()

    def warm(self) -> None:
        """Start it now, in the background, if it is not running (``fork`` waits for it)."""
        if os.environ.get(MODE_ENV) != "exec" and (self.zygote is None or not self.zygote.alive):
            threading.Thread(target=self._get, name="odium-launcher", daemon=True).start()

    def _get(self) -> Zygote | None:
        with self._lock:
            z = self.zygote
            if z is None or not z.alive:
                try:
                    env0 = dict(os.environ)
                    z = self.zygote = in_starter(lambda: Zygote.started(("node",), os.getcwd()))
                    self.env = env0
                except OSError as e:
                    log.warning("no launcher for local nodes (%s): new interpreters", e)
                    return None
            return z

    def fork(self, nodes: list[tuple[list[str], dict[str, str], int]], app: str) -> list[Any]:
        """Each node ``(argv, env, log fd)`` forked, all asked at once; None for one that must
        be a new interpreter (see the module)."""
        out: list[Any] = [None] * len(nodes)
        z = self._get() if os.environ.get(MODE_ENV) != "exec" else None
        if z is None:
            return out
        asked: list[tuple[int, int]] = []
        for i, (argv, env, log_fd) in enumerate(nodes):
            if any(env.get(k) != self.env.get(k) for k in {*env, *self.env}
                   if k.startswith(START_VARS)):
                continue
            try:
                asked.append((i, z.ask("node", app, log_fd, argv=argv,
                                       env={**env, "ODIUM_DIE_WITH_PARENT": str(z.pid)})))
            except OSError as e:
                log.warning("%s; the node starts as a new interpreter", e)
        for i, n in asked:
            try:
                out[i] = z.answer(n, 60.0)
            except OSError as e:
                log.warning("%s; the node starts as a new interpreter", e)
        return out

    def close(self) -> None:
        with self._lock:
            z, self.zygote = self.zygote, None
        if z is not None:
            z.close()
            z.wait(5.0)


def prepare_homes(base: Path, names: list[str], address: str, hub_key: str
                  ) -> list[tuple[str, Path, str]]:
    """Each local node's home ready (its key, kept if it has one; its joined record): ``(name,
    home, key id)``. Written a few at once: each file is synced to the disk, and their syncs
    then share the file system's journal commits."""

    def prepare(name: str) -> tuple[str, Path, str]:
        home = ensure_home(base / name)
        key_id = load_or_create(home / "identity.key").key_id
        save_joined(home, address, hub_key, name)
        return name, home, key_id

    with ThreadPoolExecutor(min(8, len(names)), thread_name_prefix="odium-home") as pool:
        return list(pool.map(prepare, names))


def launch(homes: list[tuple[str, Path]], app: str, *, python: str | None = None,
           capacity: int | None = None, extra_args: Sequence[str] = (),
           env: Mapping[str, str] | None = None, launcher: Launcher | None = None
           ) -> list[LocalNode]:
    """Start the node processes of local nodes whose homes are ready (key, joined record):
    forked by ``launcher`` where they can be, else new interpreters."""
    opts = [*extra_args, *(["--capacity", str(capacity)] if capacity else [])]
    node_env = {**os.environ, **(env or {})}
    logs = [open(home / "node.log", "ab") for _name, home in homes]
    try:
        argvs = [["node", "--home", str(home), "--app", app, *opts] for _name, home in homes]
        procs: list[Any] = [None] * len(homes)
        if launcher is not None and python in (None, sys.executable):
            procs = launcher.fork([(argv, node_env, f.fileno())
                                   for argv, f in zip(argvs, logs, strict=True)], app)
        for i, proc in enumerate(procs):
            if proc is None:
                # its own session: a Ctrl-C meant for this process (the notebook's stop
                # button signals the kernel's whole process group) must not stop the node
                procs[i] = subprocess.Popen(
                    [python or sys.executable, "-m", "odium", *argvs[i]],
                    stdin=subprocess.DEVNULL, stdout=logs[i], stderr=subprocess.STDOUT, cwd=app,
                    start_new_session=True,
                    env={**node_env, "ODIUM_DIE_WITH_PARENT": str(os.getpid())})
    finally:
        for f in logs:
            f.close()
    return [LocalNode(name, home, proc) for (name, home), proc in zip(homes, procs, strict=True)]
