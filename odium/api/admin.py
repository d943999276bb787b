"""``Admin``: the Python API of a hub running in another process, over its query socket.

It is authorised by the admin key in the hub's home, offers the methods of
``odium.api.interface.HubAPI`` with the shapes ``Hub`` has, and imports no hub code (no
SQLAlchemy, no store): the ``odium`` command uses it, and starts fast.

    with odium.Admin("~/.odium") as admin:
        print(admin.nodes())
        admin.run("x = 1")                  # this Admin's own session on the nodes
        print(admin.run("x + 1"))           # ... still there
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from ..core import wire as P
from ..core.clock import Clock
from ..core.keys import verify_key
from ..errors import (
    AuthError,
    ConfigError,
    NotConnectedError,
    OdiumError,
    ProtocolError,
    StateMismatchError,
)
from ..errors import TimeoutError as OdiumTimeout
from ..io.transport import client_socket
from ..local.home import check_home, default_home, load_or_create
from .data import DataVerbs
from .interface import JobVerbs, KeyVerbs, LaunchVerbs

WATCH_EVERY = 2.0  # seconds between looks at whether a hub that takes long is still the same run


class Admin(KeyVerbs, JobVerbs, LaunchVerbs, DataVerbs):
    """Talk to a running hub as its admin, using the admin key in its home directory.

    The methods are ``Hub``'s (``odium.api.interface.HubAPI``): same names, arguments and shapes.
    ``run`` without a session uses this Admin's own session (``self.session``): a namespace
    on each node kept between this Admin's calls, closed on those nodes by ``close()``.
    """

    def __init__(self, home: str | os.PathLike[str] | None = None, timeout: float = 10.0) -> None:
        home_path = Path(home or default_home()).expanduser()
        self.home = home_path
        info_path = home_path / "hub.json"
        if not info_path.exists():
            raise NotConnectedError(f"no hub is running with home {home_path} (start one with: "
                                    f"odium hub --home {home_path})")
        check_home(home_path)  # a hub.json or admin.key another user planted is not the hub's
        try:
            info = json.loads(info_path.read_text())
            self.hub_key = str(info["key"])
            port = int(info["ports"]["query"])
            iface = str(info["interface"])
            pid = int(info["pid"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{info_path} is damaged ({e}); restart the hub") from None
        if not _alive(pid):
            raise NotConnectedError(f"the hub recorded in {info_path} (pid {pid}) is not running; "
                                    f"start it with: odium hub --home {home_path}")
        admin_path = home_path / "admin.key"
        if not admin_path.exists():
            raise AuthError(f"no admin key in {home_path}")
        self.ident = load_or_create(admin_path)
        # an admin has no application: it signs as state "unknown"; it stamps with the hub's
        # time as the hub's answers tell it (a relay's hub part keeps its own hub's time)
        self.clock = Clock()
        self.sign = P.Signer(self.ident.signing, self.ident.key_id, lambda: "unknown",
                             self.clock)
        self.timeout = timeout
        host = "127.0.0.1" if iface in ("0.0.0.0", "*") else iface
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.sock = client_socket(self.ctx, zmq.DEALER, self.ident, self.hub_key,
                                  f"tcp://{host}:{port}")
        self.vk = verify_key(self.hub_key)
        self.session = f"admin-{secrets.token_hex(6)}"
        self._open: list[str] = []  # node patterns this Admin's own session is open on
        self._hub_state: str | None = None  # from the envelope of the hub's last answer

    @property
    def state(self) -> str:
        """The hub's state id (as its last answer carried it)."""
        if self._hub_state is None:
            self.ping()
        assert self._hub_state is not None
        return self._hub_state

    def close(self) -> None:
        """Close this Admin's own session on the nodes it ran on, then the socket."""
        if self.sock.closed:
            return
        limit = min(self.timeout, 10.0)
        for pattern in self._open:
            try:
                self.request("run", P.Run("pass", pattern, "python", self.session, limit, "any",
                                          ephemeral=True), limit + 5.0)
            except OdiumError:
                pass  # a hub gone or a node lost: its namespace went with it
        self._open.clear()
        self.sock.close(linger=0)
        self.ctx.term()

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, type_: str, body: P.Body, timeout: float | None = None,
                msg_id: str | None = None, watch: str | None = None) -> Any:
        """Ask, and wait for the answer. ``watch``: the hub's boot when asked; a long wait
        looks every few seconds whether the hub is still that run (one killed and started
        again never answers what its last run was asked)."""
        mid = msg_id or P.new_id()
        self.sock.send(self.sign(type_, body, msg_id=mid))
        sent, again = time.monotonic(), True
        parts = _Parts()  # an answer over the message limit comes in parts
        probe, probe_at = "", sent + WATCH_EVERY
        limit = self.timeout if timeout is None else timeout
        deadline = None if limit is None else time.monotonic() + limit
        while True:
            now = time.monotonic()
            wait = None if deadline is None else max(0, deadline - now)
            if wait is not None and wait <= 0:
                raise OdiumTimeout(f"the hub did not answer {type_!r} within {limit} s")
            if watch is not None:
                wait = max(0.0, probe_at - now) if wait is None else min(wait, probe_at - now)
            if not self.sock.poll(None if wait is None else int(max(wait, 0) * 1000) + 1):
                if watch is not None and time.monotonic() >= probe_at:
                    probe, probe_at = P.new_id(), time.monotonic() + WATCH_EVERY
                    self.sock.send(self.sign("ping", P.Empty(), msg_id=probe))
                continue
            msg = self._recv(mid, probe)
            if msg is None:
                continue
            if msg.env.re == probe:
                boot = msg.body.data.get("boot") if isinstance(msg.body, P.Reply) else None
                if boot != watch:
                    raise NotConnectedError(
                        f"the hub restarted while it had {type_!r} to answer: its last run "
                        "abandoned it (odium log says what the nodes answered later)")
                continue
            if msg.type == "reply_part":
                whole = parts.add(msg.body)
                if whole is None:
                    continue
                msg = P.Message(msg.env, whole)
            self.clock.learn(msg.env.ts, sent, time.monotonic())
            if (again and isinstance(msg.body, P.ErrorReply)
                    and msg.body.kind == "ClockError"):  # stamped with the hub's time now
                self.sock.send(self.sign(type_, body, msg_id=mid))
                sent, again = time.monotonic(), False
                continue
            self._hub_state = msg.env.state
            return _answer(msg)

    def _recv(self, *mids: str) -> P.Message | None:
        """The next message on the socket if it answers one of ``mids`` (no replay window: it
        counts only as the answer to a request of ours that waits)."""
        try:
            msg = P.open_message(self.sock.recv(), self.vk, self.hub_key)
        except (ProtocolError, AuthError):
            return None
        return msg if msg.env.re and msg.env.re in mids else None

    def ping(self, timeout: float = 5.0) -> dict[str, Any]:
        return dict(self.request("ping", P.Empty(), timeout))

    def run(self, code: str, nodes: str = "*", *, shell: bool = False,
            timeout: float | None = None, session: str | None = None,
            require: str | None = None, end_session: bool = False) -> Result:
        """Run code on every node matching ``nodes``; the whole Result once every node has
        an entry (as ``Hub.run``). ``session``: a named namespace kept on each node (shared
        with anyone naming it); without one, this Admin's own (``self.session``).
        ``end_session``: close the namespace on each node once this command ends."""
        if not isinstance(code, str):
            raise ConfigError(f"code must be a string, not {type(code).__name__}")
        if timeout is not None and timeout <= 0:
            raise ConfigError(f"timeout must be positive, not {timeout}")
        own = session is None
        name = self.session if own else session
        if own and not shell:
            if end_session:
                self._open = [p for p in self._open if p != nodes]
            elif nodes not in self._open:
                self._open.append(nodes)
        mid = P.new_id()
        body = P.Run(code, nodes, "shell" if shell else "python", name, timeout,
                     require or "default", end_session)
        wait = None if timeout is None else timeout + 30.0
        boot = self.ping()["boot"]
        try:
            data = self.request("run", body, wait, msg_id=mid, watch=boot)
        except KeyboardInterrupt:
            self.request("interrupt", P.Interrupt(mid), 5.0)
            data = self.request_wait_reply(mid, 15.0)
        from ..core.results import Result

        return Result.from_dict(data["result"])

    def request_wait_reply(self, mid: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        parts = _Parts()
        while time.monotonic() < deadline:
            if self.sock.poll(int((deadline - time.monotonic()) * 1000) + 1):
                msg = self._recv(mid)
                body = msg.body if msg is not None else None
                if msg is not None and msg.type == "reply_part":
                    body = parts.add(msg.body)
                if isinstance(body, P.Reply):
                    return body.data
        raise OdiumTimeout("no result after the interrupt")

    def nodes(self, pattern: str | None = None) -> list[dict[str, Any]]:
        """Every node (matching ``pattern``), sorted by name: one dict each, as ``Hub.nodes``."""
        return list(self.request("nodes", P.Query(pattern=pattern))["nodes"])

    def store_health(self) -> dict[str, Any]:
        """Whether the hub's store writes (``problem``: "" when it does), as ``Hub``'s."""
        return dict(self.ping().get("store") or {})

    def keys(self) -> list[dict[str, Any]]:
        return list(self.request("keys", P.Query())["keys"])

    def key_action(self, action: str, pattern: str, role: str | None = None
                   ) -> list[dict[str, Any]]:
        """The keys acted on: key, name, the role each had, fingerprint."""
        data = self.request("key", P.KeyAction(action, pattern, role))  # type: ignore[arg-type]
        return list(data["keys"])

    def token(self, ttl: float = 3600.0) -> str:
        return str(self.request("token", P.TokenRequest(ttl))["token"])

    def launch_request(self, type_: str, body: Any) -> Any:
        """A request about launches, asked of the hub (odium.hub.launches)."""
        return self.request(type_, body)

    def launch_dir(self) -> Path:
        return self.home / "launches"

    def join_command(self, ttl: float = 3600.0, name: str | None = None) -> str:
        """The command that joins another machine, the token in ODIUM_TOKEN (never on argv);
        with ``name``, the node takes that name (else its host's)."""
        from ..core.keys import join_command

        return join_command(self.token(ttl), name=name)

    def forget(self, pattern: str) -> list[str]:
        """Remove nodes that are not connected from the hub's registry (see Hub.forget)."""
        return list(self.request("forget", P.Query(pattern=pattern))["forgotten"])

    def log(self, limit: int = 50) -> list[dict[str, Any]]:
        return list(self.request("log", P.Query(limit=limit))["events"])

    def state_report(self, nodes: str | None = None) -> dict[str, Any]:
        return dict(self.request("state_diff", P.Query(pattern=nodes)))

    def sync(self, nodes: str = "*", timeout: float = 300.0) -> Result:
        data = self.request("sync_nodes", P.SyncRequest(nodes, timeout), timeout + 30)
        from ..core.results import Result

        return Result.from_dict(data["result"])

    # --- jobs ------------------------------------------------------------------------------

    def submit_many(self, items: Iterable[tuple[Any, tuple[Any, ...], dict[str, Any],
                                                str | None]], *, nodes: str = "*",
                    retries: int = 0, timeout: float | None = None,
                    require_state: str | None = None) -> list[Job]:
        """Queue jobs given as (code or function, args, kwargs, job id or None)."""
        from .jobs import Job, check_options, pack_jobs

        check_options(retries, timeout, nodes)
        fields, fns = pack_jobs(items, os.getcwd())
        backend = _AdminJobs(self)
        jobs: list[Job] = []
        for i in range(0, len(fields), 1000):
            reqs = [P.JobRequest(f["kind"], f["code"], f["fn"], f["args"], f["kwargs"],
                                 f["args_pickle"], f["id"], nodes, retries, timeout,
                                 require_state or "default") for f in fields[i:i + 1000]]
            chunk_fns = {r.fn: fns[r.fn] for r in reqs if r.fn}
            ids = self.request("submit", P.Submit(reqs, chunk_fns), max(self.timeout, 30.0))
            jobs.extend(Job(j, backend) for j in ids["ids"])
        return jobs

    def map(self, func: Callable[..., Any] | str, iterable: Iterable[Any], *,
            nodes: str = "*", retries: int = 0, timeout: float | None = None,
            require_state: str | None = None, wait: float | None = None,
            progress: bool | None = None) -> list[Any]:
        """``func(x)`` for each x as one job each; the values in order (as ``Hub.map``)."""
        from ..core.jobs import JobStatus
        from .jobs import as_completed, known
        from .progress import where

        shown = where(progress) is not None  # a bad value fails before anything is queued
        jobs = self.submit_many([(func, (x,), {}, None) for x in iterable], nodes=nodes,
                                retries=retries, timeout=timeout, require_state=require_state)
        if shown:  # looks in short waits, to show them finish
            for _ in as_completed(jobs, wait, progress):
                pass
            return [j.result(0) for j in jobs]
        infos = _AdminJobs(self).wait_jobs([j.id for j in jobs], wait)
        for j, info in zip(jobs, infos, strict=True):
            if info.get("status") not in {s.value for s in JobStatus if s.terminal}:
                raise OdiumTimeout(f"job {j.id} did not finish within {wait} s")
            j._finished(known(info))
        return [j.result(0) for j in jobs]

    def jobs(self, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Recent jobs, newest first (optionally only those with a status)."""
        from .jobs import check_status

        check_status(status)
        return list(self.request("jobs", P.JobQuery(status=status, limit=limit))["jobs"])  # type: ignore[arg-type]

    def job(self, job_id: str, wait: float = 0.0) -> dict[str, Any]:
        """One job's info with its moves; ``wait`` seconds for it to finish first."""
        data = self.request("job", P.JobQuery(ids=[job_id], wait=wait), wait + self.timeout)
        info = dict(data["jobs"][0])
        if info.get("status") == "unknown":
            raise OdiumError(f"no job {job_id!r}; see: odium jobs")
        return info

    def wait_jobs(self, ids: list[str], timeout: float | None) -> list[dict[str, Any]]:
        """Each job's info once it has finished, or as it is when ``timeout`` runs out."""
        return _AdminJobs(self).wait_jobs(list(ids), timeout)

    def cancel_job(self, job_id: str) -> str:
        """Cancel a job: ``cancelled``, ``already <status>`` (it had finished) or
        ``unknown``."""
        return self.cancel_jobs([job_id])[job_id]

    def cancel_jobs(self, ids: list[str]) -> dict[str, str]:
        """Cancel jobs; id -> ``cancelled``, ``already <status>`` or ``unknown``."""
        return dict(self.request("job_cancel", P.JobCancel(list(ids)))["status"])


class _Parts:
    """The parts of one answer too large for one message (``reply_part`` messages, each a
    ``Reply`` whose data is {``part``, ``count``, ``text``}: the answer's JSON, cut in order by
    the hub's ``odium.hub.inbox``), put together into the reply they make."""

    def __init__(self) -> None:
        self.texts: dict[int, str] = {}
        self.count = 0

    def add(self, body: P.Body) -> P.Reply | None:
        """The whole reply once this part completes it, else None."""
        data = body.data if isinstance(body, P.Reply) else None
        part, count, text = ((data.get("part"), data.get("count"), data.get("text"))
                             if isinstance(data, dict) else (None, None, None))
        if (not isinstance(part, int) or not isinstance(count, int) or not isinstance(text, str)
                or not 0 <= part < count or self.count not in (0, count)):
            raise ProtocolError("the hub sent a part of an answer that does not fit the others")
        self.count = count
        self.texts[part] = text
        if len(self.texts) < count:
            return None
        whole = "".join(self.texts[i] for i in range(count))
        self.texts.clear()
        try:
            return P.Reply(json.loads(whole))
        except ValueError as e:
            raise ProtocolError(f"the hub's answer in {count} parts is not JSON: {e}") from None


class _AdminJobs:
    """Job handles' view of a hub in another process, over its query socket."""

    def __init__(self, admin: Admin) -> None:
        self.admin = admin

    def job_status(self, job_id: str) -> str:
        return str(self.job_info(job_id)["status"])

    def job_info(self, job_id: str) -> dict[str, Any]:
        return dict(self.admin.request("job", P.JobQuery(ids=[job_id]))["jobs"][0])

    def wait_jobs(self, ids: list[str], timeout: float | None) -> list[dict[str, Any]]:
        """Each job's info once it has finished, or as it is when ``timeout`` runs out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        out: dict[str, dict[str, Any]] = {}
        from ..core.jobs import JobStatus

        final = {s.value for s in JobStatus if s.terminal} | {"unknown"}
        while len(out) < len(ids):
            left = [j for j in ids if j not in out]
            for i in range(0, len(left), 1000):
                rest = None if deadline is None else max(0.0, deadline - time.monotonic())
                step = 60.0 if rest is None else min(60.0, rest)
                last_round = rest is not None and rest <= 60.0
                data = self.admin.request("job", P.JobQuery(ids=left[i:i + 1000], wait=step),
                                          step + self.admin.timeout)
                for info in data["jobs"]:
                    if info.get("status") in final or last_round:
                        out[info["id"]] = info
        return [out[j] for j in ids]

    def cancel_jobs(self, ids: list[str]) -> dict[str, str]:
        return self.admin.cancel_jobs(ids)


_ERRORS: dict[str, type[OdiumError]] = {
    "AuthError": AuthError, "NotConnectedError": NotConnectedError,
    "ProtocolError": ProtocolError, "ConfigError": ConfigError,
    "StateMismatchError": StateMismatchError, "StateError": OdiumError,
    "TimeoutError": OdiumTimeout}


def _answer(msg: P.Message) -> Any:
    """The data of the hub's answer to a request; an error answer raised as the error it
    names (an answer of another kind is the hub breaking the protocol)."""
    if isinstance(msg.body, P.ErrorReply):
        raise _ERRORS.get(msg.body.kind, OdiumError)(msg.body.message)
    if isinstance(msg.body, P.Reply):
        return msg.body.data
    raise ProtocolError(f"the hub answered with a {msg.type!r} message, not a reply")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


if TYPE_CHECKING:  # the job queue and results load with the first call that needs them
    from ..core.results import Result
    from .interface import HubAPI
    from .jobs import Job

    def _conforms(admin: Admin) -> HubAPI:
        """Not called: mypy checks here that Admin is a HubAPI (odium/api/interface.py)."""
        return admin
