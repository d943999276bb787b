"""``Hub``: this process as a hub, the Python API over it (``Admin``, for a hub in another
process, lives in odium/api/admin.py; both follow odium/api/interface.py).

    with odium.Hub(home="/tmp/h", ports=0) as hub:
        hub.start_local(3)
        r = hub.run("import os; os.getpid()", nodes="*", timeout=10)
        print(r)
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import wire as P
from ..core.jobs import JobStatus
from ..core.keys import check_key_id
from ..core.results import NodeResult, Result
from ..errors import ConfigError, NotConnectedError, OdiumError
from ..errors import TimeoutError as OdiumTimeout
from ..hub.server import DEFAULT_PORTS, HubCore, KeyInfo
from ..hub.start import start_hub
from ..local.home import ensure_home, load_or_create
from ..node.agent import save_joined
from ..runtime import Runtime
from .interface import DEFAULT_SESSION, KeyVerbs
from .jobs import Job, JobExecutor, as_completed, check_options, pack_jobs

OutputFn = Callable[[str, str, str], None]


def _ports(ports: int | dict[str, int] | None) -> dict[str, int]:
    if ports is None:
        return dict(DEFAULT_PORTS)
    if isinstance(ports, int):
        if ports != 0:
            raise ConfigError("ports=<int> only takes 0 (all chosen by the OS); "
                              "give a dict for fixed ports")
        return {k: 0 for k in DEFAULT_PORTS}
    unknown = set(ports) - set(DEFAULT_PORTS)
    if unknown:
        raise ConfigError(f"unknown port names {sorted(unknown)}; use {sorted(DEFAULT_PORTS)}")
    return {**DEFAULT_PORTS, **ports}


@dataclass
class LocalNode:
    """A node process started on this machine by the hub."""

    name: str
    home: Path
    proc: subprocess.Popen[bytes]

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


class Hub(KeyVerbs):
    """This process as a hub: bind the four sockets, trust nodes, broadcast, collect.

    The methods it shares with ``Admin`` (``odium.api.interface.HubAPI``) have the same names,
    arguments and shapes. ``run`` without a session uses ``self.session`` (``"default"``):
    one namespace on each node, kept between calls, like a notebook's.
    """

    session = DEFAULT_SESSION

    def __init__(self, home: str | os.PathLike[str] | None = None, *,
                 ports: int | dict[str, int] | None = None, interface: str = "127.0.0.1",
                 db: str | None = None, app: str | os.PathLike[str] | None = None,
                 hb_interval: float = 1.0, max_message: int = P.MAX_MESSAGE,
                 wheelhouse: str | os.PathLike[str] | None = None) -> None:
        self._home_arg = home
        self._opts = dict(interface=interface, ports=_ports(ports), db=db,
                          hb_interval=hb_interval, max_message=max_message,
                          wheelhouse=str(wheelhouse) if wheelhouse else None)
        self._app = app
        self.rt: Runtime | None = None
        self._core: HubCore | None = None
        self.local: list[LocalNode] = []
        self._local_seq = 0
        self._hints: set[str] = set()  # hints already given: each once per Hub (session)

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> Hub:
        if self.rt is not None:
            return self
        rt = Runtime(self._home_arg, self._app)
        rt.start_thread()
        try:
            self._core = start_hub(rt, **self._opts)  # type: ignore[arg-type]
        except BaseException:
            rt.close()
            raise
        self.rt = rt
        return self

    def __enter__(self) -> Hub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for n in self.local:
            if n.proc.poll() is None:
                n.proc.terminate()
        for n in self.local:
            n.stop()
        self._forget_local([n.name for n in self.local])
        self.local.clear()
        if self.rt is not None:
            self.rt.close()
            self.rt = self._core = None

    @property
    def core(self) -> HubCore:
        if self._core is None:
            raise NotConnectedError("the hub is not running (use it in a with block or call "
                                    "start())")
        return self._core

    @property
    def home(self) -> Path:
        assert self.rt is not None
        return self.rt.home

    @property
    def ports(self) -> dict[str, int]:
        return dict(self.core.ports)

    @property
    def key(self) -> str:
        return self.core.rt.ident.key_id

    @property
    def address(self) -> str:
        return self.core.public_address()

    @property
    def state(self) -> str:
        return self.core.rt.state

    def _call(self, fn: Callable[[], Any], timeout: float = 30.0) -> Any:
        assert self.rt is not None
        return self.rt.call(fn, timeout)

    # --- commands --------------------------------------------------------------------------

    def run(self, code: str, nodes: str = "*", *, shell: bool = False,
            timeout: float | None = None, session: str | None = None,
            require: str | None = None, end_session: bool = False,
            on_output: OutputFn | None = None) -> Result:
        """Run code on every node matching ``nodes``; wait for every node's entry.

        ``session``: a named namespace kept on each node (shared with an ``Admin`` naming
        it); without one, ``self.session`` (``"default"``). ``end_session``: close that
        namespace on each node once this command ends. ``require``: the state the nodes must
        be in: ``"any"``, ``"match"`` (this hub's commit), a commit id, or None (``match``
        when this hub is a clean commit, else ``any``).
        """
        handle = self.submit_broadcast(code, nodes, shell=shell, timeout=timeout,
                                       session=session, require=require,
                                       end_session=end_session, on_output=on_output)
        return handle.wait()

    def submit_broadcast(self, code: str, nodes: str = "*", *, shell: bool = False,
                         timeout: float | None = None, session: str | None = None,
                         require: str | None = None, end_session: bool = False,
                         on_output: OutputFn | None = None) -> BroadcastHandle:
        if not isinstance(code, str):
            raise ConfigError(f"code must be a string, not {type(code).__name__}")
        if timeout is not None and timeout <= 0:
            raise ConfigError(f"timeout must be positive, not {timeout}")
        handle = BroadcastHandle(self, timeout)
        core = self.core
        b = self._call(lambda: core.broadcast(
            code, nodes, kind="shell" if shell else "python", timeout=timeout,
            session=session or self.session, ephemeral=end_session, require=require,
            on_done=lambda r: handle._done(self._hint_once(r)),
            on_output=on_output, on_node=handle._node))
        handle.cmd = b.cmd
        handle.targets = list(b.targets)
        return handle

    def _hint_once(self, result: Result) -> Result:
        """The Result, without the hint on how to version the application if this Hub gave
        it before: once per session is enough (``extra["hinted"]`` says it was dropped)."""
        hint = result.extra.get("hint")
        if not hint:
            return result
        if hint not in self._hints:
            self._hints.add(hint)
            return result
        extra = {k: v for k, v in result.extra.items() if k != "hint"}
        return dataclasses.replace(result, extra={**extra, "hinted": True})

    # --- state -----------------------------------------------------------------------------

    def state_report(self, nodes: str | None = None) -> dict[str, Any]:
        """This hub's state, and how each node's differs from it, part by part."""
        core = self.core
        return dict(self._call(lambda: core.state_report(nodes)))

    def sync(self, nodes: str = "*", timeout: float = 300.0) -> Result:
        """Bring the matching nodes to this hub's commit; each entry ends ok (with the node's
        new state) or says why not."""
        handle = BroadcastHandle(self, timeout)
        core = self.core
        b = self._call(lambda: core.sync_nodes(nodes, timeout=timeout, on_done=handle._done))
        handle.cmd = b.cmd
        return handle.wait()

    def interrupt(self, cmd: str) -> bool:
        core = self.core
        return bool(self._call(lambda: core.interrupt(cmd)))

    # --- jobs (the queue: each runs once, on one node with a free slot) -------------------

    def submit(self, code_or_function: str | Callable[..., Any], *args: Any, nodes: str = "*",
               retries: int = 0, timeout: float | None = None,
               require_state: str | None = None, job_id: str | None = None,
               **kwargs: Any) -> Job:
        """Queue one job; it runs once, on one matching node with a free worker.

        A string is run like a cell in a fresh namespace (the value of its last expression
        is the result; ``args``/``kwargs`` are bound when given, and each keyword argument
        is a name too: ``submit("a + b", a=2, b=3)``). A function is called with
        ``*args, **kwargs`` (functions of importable modules travel by reference, others by
        value, with cloudpickle). ``retries``: runs again after an error or a lost node, up
        to that many times. ``timeout``: seconds one run may take. ``require_state``: as for
        ``run``. ``job_id``: your own id; submitting an id again gives the existing job.
        Returns at once; the job is stored before it is dispatched.
        """
        return self._submit_jobs([(code_or_function, args, kwargs, job_id)], nodes=nodes,
                                 retries=retries, timeout=timeout,
                                 require_state=require_state)[0]

    def submit_many(self, items: Iterable[tuple[Any, tuple[Any, ...], dict[str, Any],
                                                str | None]], *, nodes: str = "*",
                    retries: int = 0, timeout: float | None = None,
                    require_state: str | None = None) -> list[Job]:
        """Queue jobs given as (code or function, args, kwargs, job id or None)."""
        return self._submit_jobs(items, nodes=nodes, retries=retries, timeout=timeout,
                                 require_state=require_state)

    def _submit_jobs(self, items: Iterable[tuple[Any, tuple[Any, ...], dict[str, Any],
                                                 str | None]], *, nodes: str, retries: int,
                     timeout: float | None, require_state: str | None) -> list[Job]:
        check_options(retries, timeout, nodes)
        core = self.core
        q = core.jobq
        required = q.target(nodes, require_state)
        fields, fns = pack_jobs(items, str(core.rt.app))
        now = time.time()
        issuer = core.rt.ident.key_id
        recs = [q.record(f, nodes=nodes, retries=retries, timeout=timeout, required=required,
                         issuer=issuer, now=now) for f in fields]
        backend = _HubJobs(self)
        jobs = [Job(r.id, backend, pushed=True) for r in recs]
        q.submit_threadsafe(recs, fns, {j.id: j._finished for j in jobs},
                            {f["id"] for f in fields if f["id"]})
        return jobs

    def map(self, func: Callable[..., Any] | str, iterable: Iterable[Any], *,
            nodes: str = "*", retries: int = 0, timeout: float | None = None,
            require_state: str | None = None, wait: float | None = None) -> list[Any]:
        """``func(x)`` for each x as one job each; the values in order. The first job that
        failed raises (odium.RemoteError). ``timeout`` limits each run; ``wait`` the whole."""
        jobs = self._submit_jobs([(func, (x,), {}, None) for x in iterable], nodes=nodes,
                                 retries=retries, timeout=timeout, require_state=require_state)
        deadline = None if wait is None else time.monotonic() + wait
        return [j.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
                for j in jobs]

    def map_unordered(self, func: Callable[..., Any] | str, iterable: Iterable[Any], *,
                      nodes: str = "*", retries: int = 0, timeout: float | None = None,
                      require_state: str | None = None, wait: float | None = None
                      ) -> Iterator[Any]:
        """Like ``map``, but yields each value as soon as its job finishes."""
        jobs = self._submit_jobs([(func, (x,), {}, None) for x in iterable], nodes=nodes,
                                 retries=retries, timeout=timeout, require_state=require_state)
        for j in as_completed(jobs, wait):
            yield j.result(0)

    @staticmethod
    def as_completed(jobs: Iterable[Job], timeout: float | None = None) -> Iterator[Job]:
        """Yield jobs as they finish."""
        return as_completed(jobs, timeout)

    def executor(self, *, nodes: str = "*", retries: int = 0, timeout: float | None = None,
                 require_state: str | None = None) -> JobExecutor:
        """A ``concurrent.futures.Executor`` whose ``submit`` queues a job here."""
        check_options(retries, timeout, nodes)

        def submit(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                   opts: dict[str, Any]) -> Job:
            return self._submit_jobs([(fn, args, kwargs, None)], **opts)[0]

        return JobExecutor(submit, nodes=nodes, retries=retries, timeout=timeout,
                           require_state=require_state)

    def jobs(self, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Recent jobs, newest first (optionally only those with a status)."""
        if status is not None and status not in {s.value for s in JobStatus}:
            raise ConfigError(f"unknown job status {status!r}; one of: "
                              f"{', '.join(s.value for s in JobStatus)}")
        q = self.core.jobq
        return list(self._call(lambda: q.listing(status, limit)))

    def job(self, job_id: str, wait: float = 0.0) -> dict[str, Any]:
        """Everything about one job, with every move it made (``events``); ``wait`` seconds
        for it to finish first."""
        q = self.core.jobq
        if wait > 0:
            finished = threading.Event()
            self._call(lambda: q.watch(job_id, lambda _info: finished.set()))
            finished.wait(wait)
        info = self._call(lambda: q.info(job_id, events=True))
        if info is None:
            raise OdiumError(f"no job {job_id!r}; see: hub.jobs()")
        return dict(info)

    def cancel_job(self, job_id: str) -> str:
        """Cancel a job: ``cancelled``, ``already <status>`` (it had finished) or
        ``unknown``."""
        return self.cancel_jobs([job_id])[job_id]

    def cancel_jobs(self, ids: list[str]) -> dict[str, str]:
        """Cancel jobs; id -> ``cancelled``, ``already <status>`` or ``unknown``."""
        return _HubJobs(self).cancel_jobs(list(ids))

    # --- nodes and keys --------------------------------------------------------------------

    def nodes(self, pattern: str | None = None) -> list[dict[str, Any]]:
        core = self.core
        return list(self._call(lambda: core.node_list(pattern)))

    def wait_for_nodes(self, names: Sequence[str] | int, timeout: float = 30.0,
                       status: str = "ready") -> None:
        """Wait until the named nodes (or that many nodes) have the given status."""
        core = self.core
        assert self.rt is not None

        def ok() -> bool:
            ready = {n for n, i in list(core.nodes.items()) if i.status == status}
            if isinstance(names, int):
                return len(ready) >= names
            return set(names) <= ready

        self.rt.wait_for(ok, timeout, f"nodes {names!r} to be {status}")

    def token(self, ttl: float = 3600.0) -> str:
        core = self.core
        return str(self._call(lambda: core.make_token(ttl)))

    def join_command(self, ttl: float = 3600.0, name: str | None = None) -> str:
        """The command that joins another machine, the token in ODIUM_TOKEN (never on argv);
        with ``name``, the node takes that name (else its host's)."""
        from ..core.keys import join_command

        return join_command(self.token(ttl), name=name)

    def keys(self) -> list[dict[str, Any]]:
        core = self.core
        return list(self._call(core.key_list))

    def key_action(self, action: str, pattern: str, role: str | None = None
                   ) -> list[dict[str, Any]]:
        """accept / reject / revoke keys; the keys acted on (key, name, role they had,
        fingerprint). Names and globs choose node keys unless ``role="admin"``."""
        core = self.core
        chosen = self._call(lambda: core.key_action(action, pattern, role))
        return [{"key": k.key_id, "name": k.name, "role": k.role,
                 "fingerprint": core._fp(k.key_id)} for k in chosen]

    def trust(self, key_id: str, name: str, role: str = "node") -> None:
        """Trust a key directly (for nodes whose keys you made yourself)."""
        from ..core.keys import is_reserved_name

        check_key_id(key_id)  # a clear error here, before anything changes
        if role != "admin" and is_reserved_name(name):
            raise ConfigError(f"node name {name!r} is reserved for the hub's own keys")
        core = self.core
        self._call(lambda: core._set_key(KeyInfo(key_id, role, name, None, "trusted by API")))

    def log(self, limit: int = 50) -> list[dict[str, Any]]:
        """The hub's recent events."""
        core = self.core
        return list(self._call(lambda: core.events(limit)))

    def forget(self, pattern: str) -> list[str]:
        """Remove nodes that are not connected (a name, glob or comma list) from the
        registry, with their keys; the names forgotten. ``*`` no longer targets them."""
        core = self.core
        return list(self._call(lambda: core.forget(pattern)))

    def _forget_local(self, names: list[str]) -> None:
        """Local nodes this hub started and has stopped itself are gone for good: forgotten."""
        if self.rt is None or not names:
            return
        core = self.core
        self._call(lambda: core.forget(",".join(names), force=True)
                   if any(n in core.nodes for n in names) else [])

    # --- local nodes -----------------------------------------------------------------------

    def start_local(self, n: int, prefix: str = "local", *, wait: bool = True,
                    timeout: float = 30.0, app: str | os.PathLike[str] | None = None,
                    capacity: int | None = None, extra_args: Sequence[str] = (),
                    python: str | None = None, env: dict[str, str] | None = None
                    ) -> list[LocalNode]:
        """Start n node processes on this machine, trusted already, in the hub's app dir
        (or ``app``), with this Python (or ``python``, e.g. a virtual environment's)."""
        if not isinstance(n, int) or n < 1 or n > 256:
            raise ConfigError(f"number of local nodes must be 1..256, not {n!r}")
        core = self.core
        started = []
        base = self.home / "local"
        ensure_home(base)
        addr = f"tcp://127.0.0.1:{core.ports['query']}" if core.interface in (
            "0.0.0.0", "*", "127.0.0.1") else core.public_address()
        running = {ln.name for ln in self.local if ln.proc.poll() is None}
        for _ in range(n):
            # reuse the first local name whose node is not running (same home, same key), so a
            # hub started again with the same home gets its local nodes back, not new ones
            self._local_seq = 0
            while True:
                self._local_seq += 1
                name = f"{prefix}-{self._local_seq}"
                info = core.nodes.get(name)
                if name in running:
                    continue
                if info is None or (base / name / "identity.key").exists():
                    break
            running.add(name)
            home = ensure_home(base / name)
            ident = load_or_create(home / "identity.key")
            self.trust(ident.key_id, name)
            save_joined(home, addr, self.key, name)
            cmd = [python or sys.executable, "-m", "odium", "node", "--home", str(home),
                   "--app", str(app or core.rt.app), *extra_args]
            if capacity:
                cmd += ["--capacity", str(capacity)]
            logf = open(home / "node.log", "ab")
            # its own session: a Ctrl-C meant for this process (the notebook's stop button
            # signals the kernel's whole process group) must not stop the node
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT, cwd=str(app or core.rt.app),
                                    start_new_session=True,
                                    env={**os.environ, **(env or {}),
                                         "ODIUM_DIE_WITH_PARENT": str(os.getpid())})
            logf.close()
            node = LocalNode(name, home, proc)
            self.local.append(node)
            started.append(node)
        if wait:
            self.wait_for_nodes([n.name for n in started], timeout)
        return started


class BroadcastHandle:
    """A running broadcast: wait for it, or interrupt it."""

    def __init__(self, hub: Hub, timeout: float | None) -> None:
        self.hub = hub
        self.timeout = timeout
        self.cmd = ""
        self.targets: list[str] = []  # every node the command targets
        self.partial: dict[str, NodeResult] = {}  # entries so far, as they come
        self._event = threading.Event()
        self._result: Result | None = None

    def _node(self, r: NodeResult) -> None:
        self.partial = {**self.partial, r.node: r}  # replaced whole: safe to read anywhere

    def _done(self, result: Result) -> None:
        self._result = result
        self._event.set()

    def ready(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> Result:
        """Wait for every node's entry; Ctrl-C interrupts the command on every node first."""
        limit = timeout
        if limit is None and self.timeout is not None:
            limit = self.timeout + 30.0  # the hub's own deadline comes first
        try:
            if not self._event.wait(limit):
                raise OdiumTimeout(f"no complete result for {self.cmd[:12]} after {limit} s")
        except KeyboardInterrupt:
            self.hub.interrupt(self.cmd)
            if not self._event.wait(10):
                raise
        assert self._result is not None
        return self._result


class _HubJobs:
    """Job handles' view of an in-process hub."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def job_status(self, job_id: str) -> str:
        q = self.hub.core.jobq
        rec = q.jobs.get(job_id) or q.finished.get(job_id)
        if rec is not None:
            return rec.status.value
        info = self.job_info(job_id)
        return str(info["status"])

    def job_info(self, job_id: str) -> dict[str, Any]:
        q = self.hub.core.jobq
        info = self.hub._call(lambda: q.info(job_id))
        return dict(info) if info else {"id": job_id, "status": "unknown"}

    def wait_jobs(self, ids: list[str], timeout: float | None) -> list[dict[str, Any]]:
        return [self.job_info(j) for j in ids]  # pushed handles never ask

    def cancel_jobs(self, ids: list[str]) -> dict[str, str]:
        q = self.hub.core.jobq
        return dict(self.hub._call(lambda: q.cancel(ids, by="api")))


def __getattr__(name: str) -> Any:
    """``odium.api.hub.Admin``, as before it moved to odium/api/admin.py."""
    if name == "Admin":
        from .admin import Admin

        return Admin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def temporary_home(prefix: str = "odium-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


def remove_home(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
