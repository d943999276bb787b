"""``Hub``: this process as a hub, the Python API over it (``Admin``, for a hub in another
process, lives in odium/api/admin.py; both follow odium/api/interface.py).

    with odium.Hub(home="/tmp/h", ports=0) as hub:
        hub.start_local(3)
        r = hub.run("import os; os.getpid()", nodes="*", timeout=10)
        print(r)
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..core import wire as P
from ..core.keys import check_key_id, is_reserved_name
from ..core.results import NodeResult, Result
from ..errors import ConfigError, NotConnectedError
from ..errors import TimeoutError as OdiumTimeout
from ..hub.keytable import KeyInfo, key_fp
from ..hub.nodes import LIVE
from ..hub.server import HubCore
from ..hub.start import start_hub
from ..local.home import ensure_home
from ..runtime import Runtime
from .data import DataVerbs
from .hubjobs import HubJobs
from .interface import DEFAULT_SESSION, JobVerbs, KeyVerbs, LaunchVerbs
from .jobs import Job, JobExecutor, as_completed, check_options, check_status, results_in_order
from .local import MAX_LOCAL, Launcher, LocalNode, free_name, launch, prepare_homes
from .progress import where

if TYPE_CHECKING:
    from .interface import HubAPI

OutputFn = Callable[[str, str, str], None]
T = TypeVar("T")


def _ports(ports: int | dict[str, int] | None) -> dict[str, int]:
    if ports is None:
        return dict(P.DEFAULT_PORTS)
    if isinstance(ports, int):
        if ports != 0:
            raise ConfigError("ports=<int> only takes 0 (all chosen by the OS); "
                              "give a dict for fixed ports")
        return {k: 0 for k in P.DEFAULT_PORTS}
    unknown = set(ports) - set(P.DEFAULT_PORTS)
    if unknown:
        raise ConfigError(f"unknown port names {sorted(unknown)}; use {sorted(P.DEFAULT_PORTS)}")
    return {**P.DEFAULT_PORTS, **ports}


class Hub(KeyVerbs, JobVerbs, LaunchVerbs, DataVerbs):
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
        self._start = functools.partial(
            start_hub, interface=interface, ports=_ports(ports), db=db, hb_interval=hb_interval,
            max_message=max_message, wheelhouse=str(wheelhouse) if wheelhouse else None)
        self._app = app
        self.rt: Runtime | None = None
        self._core: HubCore | None = None
        self.local: list[LocalNode] = []
        self._launcher = Launcher()  # forks the local nodes
        self._hints: set[str] = set()  # hints already given: each once per Hub (session)

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> Hub:
        if self.rt is not None:
            return self
        rt = Runtime(self._home_arg, self._app)
        rt.start_thread()
        try:
            self._core = self._start(rt)
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
        self._heard_byes([n.name for n in self.local])
        self._forget_local([n.name for n in self.local])
        self.local.clear()
        self._launcher.close()
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

    @property
    def _queue(self) -> HubJobs:
        """The job queue's view for this thread (and the backend of the Job handles)."""
        core = self.core
        return HubJobs(core.jobq, self._call, str(core.rt.app), core.rt.ident.key_id)

    def _call(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        """fn's value, run in the hub's loop thread: the one place the hub's state is read or
        changed (this thread reads only what the loop replaces whole, or hands over)."""
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

    def progress(self, cmd: str) -> tuple[list[str], dict[str, NodeResult]]:
        """A running command's targets and the entries it has so far (both empty once it
        has ended), copied in the hub's loop thread."""
        core = self.core

        def snapshot() -> tuple[list[str], dict[str, NodeResult]]:
            b = core.broadcasts.get(cmd)
            return ([], {}) if b is None else (list(b.targets), dict(b.results))

        return self._call(snapshot)

    def interrupt(self, cmd: str) -> bool:
        core = self.core
        return bool(self._call(lambda: core.interrupt(cmd)))

    # --- jobs (the queue: each runs once, on one node with a free slot) -------------------

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
        return self._queue.submit(items, nodes=nodes, retries=retries, timeout=timeout,
                                  require_state=require_state)

    def map(self, func: Callable[..., Any] | str, iterable: Iterable[Any], *,
            nodes: str = "*", retries: int = 0, timeout: float | None = None,
            require_state: str | None = None, wait: float | None = None,
            progress: bool | None = None) -> list[Any]:
        """``func(x)`` for each x as one job each; the values in order. The first job that
        failed raises (odium.RemoteError). ``timeout`` limits each run; ``wait`` the whole.
        ``progress``: a bar, None: in a notebook or on a terminal only (odium.api.progress)."""
        where(progress)  # a bad value fails before anything is queued
        jobs = self._submit_jobs([(func, (x,), {}, None) for x in iterable], nodes=nodes,
                                 retries=retries, timeout=timeout, require_state=require_state)
        return results_in_order(jobs, wait, progress)

    def map_unordered(self, func: Callable[..., Any] | str, iterable: Iterable[Any], *,
                      nodes: str = "*", retries: int = 0, timeout: float | None = None,
                      require_state: str | None = None, wait: float | None = None,
                      progress: bool | None = None) -> Iterator[Any]:
        """Like ``map``, but yields each value as soon as its job finishes."""
        jobs = self._submit_jobs([(func, (x,), {}, None) for x in iterable], nodes=nodes,
                                 retries=retries, timeout=timeout, require_state=require_state)
        for j in as_completed(jobs, wait, progress):
            yield j.result(0)

    as_completed = staticmethod(as_completed)  # yield jobs as they finish; progress as for map

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
        check_status(status)
        return self._queue.listing(status, limit)

    def job(self, job_id: str, wait: float = 0.0) -> dict[str, Any]:
        """Everything about one job, with every move it made (``events``); ``wait`` seconds
        for it to finish first."""
        return self._queue.job(job_id, wait)

    def cancel_job(self, job_id: str) -> str:
        """Cancel a job: ``cancelled``, ``already <status>`` (it had finished) or
        ``unknown``."""
        return self.cancel_jobs([job_id])[job_id]

    def cancel_jobs(self, ids: list[str]) -> dict[str, str]:
        """Cancel jobs; id -> ``cancelled``, ``already <status>`` or ``unknown``."""
        return self._queue.cancel_jobs(list(ids))

    # --- nodes and keys --------------------------------------------------------------------

    def nodes(self, pattern: str | None = None) -> list[dict[str, Any]]:
        core = self.core
        return list(self._call(lambda: core.node_list(pattern)))

    def store_health(self) -> dict[str, Any]:
        """Whether the store writes: ``problem`` is "" when it does, else what stops it (a full
        disk, a lock held by another process, the file gone), with how long and how many
        writes it holds (odium.hub.store)."""
        core = self.core
        return dict(self._call(lambda: core.store.health()))

    def wait_for_nodes(self, names: Sequence[str] | int, timeout: float = 30.0,
                       status: str = "ready") -> None:
        """Wait until the named nodes (or that many nodes) have the given status."""
        core, rt = self.core, self.rt
        assert rt is not None

        def ok() -> bool:  # in the loop thread (Runtime.wait_for)
            now = {n for n, i in core.nodes.items() if i.status == status}
            return len(now) >= names if isinstance(names, int) else set(names) <= now

        rt.wait_for(ok, timeout, f"nodes {names!r} to be {status}")

    def launch_request(self, type_: str, body: Any) -> Any:
        """A request about launches, answered in the loop (odium.hub.launches)."""
        core = self.core
        return self._call(lambda: core.launches.answer(type_, body))

    def launch_dir(self) -> Path:
        return self.home / "launches"

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

        def act() -> list[dict[str, Any]]:
            return [{"key": k.key_id, "name": k.name, "role": k.role,
                     "fingerprint": key_fp(k.key_id)}
                    for k in core.key_action(action, pattern, role)]

        return self._call(act)

    def trust(self, key_id: str, name: str, role: str = "node") -> None:
        """Trust a key directly (for nodes whose keys you made yourself)."""
        self._trust([(key_id, name)], role, "trusted by API")

    def _trust(self, keys: list[tuple[str, str]], role: str, note: str) -> None:
        """Trust keys ``(key id, name)``, all in one call of the loop."""
        for key_id, name in keys:  # a clear error here, before anything changes
            check_key_id(key_id)
            if role != "admin" and is_reserved_name(name):
                raise ConfigError(f"node name {name!r} is reserved for the hub's own keys")
        core = self.core

        def put() -> None:
            for key_id, name in keys:
                core.keytable.put(KeyInfo(key_id, role, name, None, note))

        self._call(put)

    def log(self, limit: int = 50) -> list[dict[str, Any]]:
        """The hub's recent events."""
        core = self.core
        return list(self._call(lambda: core.events(limit)))

    def forget(self, pattern: str) -> list[str]:
        """Remove nodes that are not connected (a name, glob or comma list) from the
        registry, with their keys; the names forgotten. ``*`` no longer targets them."""
        core = self.core
        return list(self._call(lambda: core.forget(pattern)))

    def _heard_byes(self, names: list[str], timeout: float = 2.0) -> None:
        """Wait (a little) until the stopped local nodes' last messages are read: a bye read
        after the node is forgotten is from a key the hub no longer knows (a warning)."""
        if self.rt is None or not names:
            return
        core = self.core

        def heard() -> bool:  # in the loop thread
            return not any(n in core.nodes and core.nodes[n].status in LIVE for n in names)

        try:
            self.rt.wait_for(heard, timeout, "the local nodes' byes")
        except OdiumTimeout:
            pass  # a node killed before it could say bye: forgotten all the same

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
        if not isinstance(n, int) or n < 1 or n > MAX_LOCAL:
            raise ConfigError(f"number of local nodes must be 1..{MAX_LOCAL}, not {n!r}")
        core = self.core
        base = ensure_home(self.home / "local")
        addr = f"tcp://127.0.0.1:{core.ports['query']}" if core.interface in (
            "0.0.0.0", "*", "127.0.0.1") else core.public_address()
        known = self._call(lambda: set(core.nodes))
        running = {ln.name for ln in self.local if ln.proc.poll() is None}
        names = []
        for _ in range(n):
            names.append(free_name(prefix, base, running, known))
            running.add(names[-1])
        self._launcher.warm()  # its imports while the homes are written
        homes = prepare_homes(base, names, addr, self.key)
        self._trust([(key_id, name) for name, _home, key_id in homes], "node", "a local node")
        started = launch([(name, home) for name, home, _key in homes], str(app or core.rt.app),
                         python=python, capacity=capacity, extra_args=extra_args, env=env,
                         launcher=self._launcher)
        self.local.extend(started)
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


if TYPE_CHECKING:
    def _conforms(hub: Hub) -> HubAPI:
        """Not called: mypy checks here that Hub is a HubAPI (odium/api/interface.py)."""
        return hub
