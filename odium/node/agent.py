"""The node part of an instance: joining a hub, heartbeats, receiving commands, returning results.

The loop thread only listens and dispatches: commands go to the Executor, which
runs them in worker processes and subprocesses; their events come back here and
leave on the results socket.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket as pysocket
import struct
import tempfile
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import zmq

from ..core import wire as P
from ..core.keys import (
    Identity,
    Token,
    fingerprint,
    is_reserved_name,
    join_proof_bytes,
    verify_key,
)
from ..core.ratelimit import TokenBucket
from ..core.sealing import Keyring, open_inner
from ..core.term import clean
from ..errors import AuthError, ConfigError, OdiumError, ProtocolError
from ..io.transport import client_socket, each_message, recv_frames
from ..local.state import (
    StateInfo,
    apply_bundle,
    head_ref,
    install_declared,
    load_declaration,
    restore_head,
    satisfies,
    snapshot,
)
from .jobs import NodeJobs
from .workers.sessions import Executor
from .workers.start import warm_forkserver

if TYPE_CHECKING:
    from ..runtime import Runtime

log = logging.getLogger(__name__)

REQUEST_RETRY = 2.0  # seconds before a query is sent again
JOIN_PATIENCE = 15.0  # seconds without an answer to a join before the node says so
TICK = 0.05
ACK_AFTER = 0.05  # seconds a command runs before the node acknowledges it
STATE_EVERY = 5.0  # seconds between checks of the node's own state


@dataclass
class _Request:
    type: str
    body: P.Body
    on_reply: Callable[[P.Message], None]
    sent: float
    sock: zmq.Socket[Any]
    on_error: Callable[[str], None] | None = None


def parse_endpoint(address: str) -> tuple[str, int]:
    u = urlparse(address)
    if u.scheme != "tcp" or not u.hostname or not u.port:
        raise ConfigError(f"hub address must look like tcp://HOST:PORT, not {address!r}")
    return u.hostname, u.port


class NodeCore:
    """Joins one hub and serves it."""

    def __init__(self, rt: Runtime, address: str, hub_key: str, name: str, *,
                 token: Token | None = None, capacity: int | None = None,
                 find_links: str | None = None, index_url: str | None = None) -> None:
        self.rt = rt
        self.name = name
        if not __import__("re").match(P.NAME_RE, name):
            raise ConfigError(f"bad node name {name!r}: letters, digits, '.', '_', '-' (max 64)")
        if is_reserved_name(name):
            raise ConfigError(f"node name {name!r} is reserved for the hub's own keys; choose "
                              "another --name")
        self.host, self.query_port = parse_endpoint(address)
        self.address = address
        self.hub_key = hub_key
        self.vk = verify_key(hub_key)
        self.keyring = Keyring(rt.ident)  # opens what the hub sealed to this node
        self.keyring.shared(hub_key)
        self.capacity = capacity or os.cpu_count() or 1
        self.find_links, self.index_url = find_links, index_url
        self.boot = P.new_id()
        self.replay = P.ReplayCache()
        self.hub_boot: str | None = None  # from the register reply
        self.heard_boot: str | None = None  # the hub boot last heard on SUB
        self.interval = 1.0
        self.seq = 0
        self.last_heard = time.monotonic()
        self.last_beat = 0.0
        self.registered = False
        self.requests: dict[str, _Request] = {}
        self.done: OrderedDict[str, None] = OrderedDict()
        self.outbox: deque[bytes] = deque(maxlen=100_000)
        self.sub: zmq.Socket[Any] | None = None
        self.push: zmq.Socket[Any] | None = None
        self.pull: zmq.Socket[Any] | None = None
        self.query: zmq.Socket[Any] | None = None
        self.join_sock: zmq.Socket[Any] | None = None
        self.error: OdiumError | None = None
        self.monitors: dict[str, zmq.Socket[Any]] = {}
        self.monitored: dict[str, zmq.Socket[Any]] = {}  # the socket each monitor watches
        self._told_pending = False
        # what this node says to whoever runs it (odium node prints it; else the log)
        self.on_notice: Callable[[str], None] | None = None
        self._refusal = ""  # what the hub's last refused handshake meant, once said
        self._unreachable = False
        self._said_ready = False
        # a node admitted once (joined.json) that is refused now was revoked or rejected; one
        # never admitted waits as pending (a refused CURVE handshake carries no reason)
        self._admitted = rt.home.joinpath("joined.json").exists() and token is None
        self._token_expires = 0.0
        self._token_sign: P.Signer | None = None  # signs with a join token's one-time key
        self._bad_input_log = TokenBucket(20, 2)  # 20 lines, then 2 a second
        # the first worker starts once the node is ready, so that joining is not slowed down;
        # the fork server that makes workers starts now and imports in the background
        self.executor = Executor(rt.loop, str(rt.app), self._on_exec_event, prestart=False)
        # what code running here can ask: which node am I on? (workers inherit it)
        os.environ["ODIUM_NODE"] = name
        os.environ["ODIUM_NODE_PID"] = str(os.getpid())
        try:
            warm_forkserver()
        except (OSError, ValueError, RuntimeError) as e:
            log.warning("no fork server (%s): workers start as new interpreters", e)
        self.sub_handlers: dict[str, Callable[[P.Message], None]] = {
            "hb": self._on_hb, "interrupt": self._on_interrupt, "sealed": self._on_sealed,
        }
        # what may come inside a sealed message on PUB (or fetched): commands for some nodes
        self.sealed_handlers: dict[str, Callable[[P.Message], None]] = {
            "exec": self._on_exec, "sync": self._on_sync,
        }
        self.jobs = NodeJobs(self)  # the job queue's slots and pool (odium.node.jobs)
        self.syncing: set[str] = set()
        self.restart = False  # set by a sync: the process runs itself again when the loop ends
        # the state id (rt.state) is known already; the fingerprint is computed off the loop
        # and reported when ready, so that it never delays joining
        rt.watch.on_change.append(self._state_changed)
        rt.watch.on_bad.append(lambda why: self._send(
            "event", P.NodeEvent("bad_declaration", why, "error")))
        rt.loop.every(STATE_EVERY, rt.watch.refresh)
        rt.loop.call_later(0, rt.watch.refresh)
        rt.loop.every(TICK, self._tick)
        if token is not None:
            self._join(token)
        else:
            self._open_query()
            self._register()

    # --- sockets ---------------------------------------------------------------------------

    def _endpoint(self, port: int) -> str:
        return f"tcp://{self.host}:{port}"

    def _open_query(self) -> None:
        # no routing id of our own: the hub's ROUTER gives each connection one nobody can claim
        self.query = client_socket(self.rt.ctx, zmq.DEALER, self.rt.ident, self.hub_key,
                                   self.address)
        q = self.query
        self.rt.loop.add(q, lambda: self._on_query(q))
        self._unwatch("query")
        self._watch_handshakes(q, "query")

    def _reopen_query(self) -> zmq.Socket[Any]:
        self._unwatch("query")
        old = self.query
        if old is not None:
            self.rt.loop.remove(old)
            old.close(linger=0)
            for mid, req in list(self.requests.items()):
                if req.sock is old:
                    del self.requests[mid]
        self._open_query()
        assert self.query is not None
        return self.query

    def _open_data(self, ports: dict[str, int]) -> None:
        if self.sub is not None:
            return
        ctx, ident, key = self.rt.ctx, self.rt.ident, self.hub_key
        self.sub = client_socket(ctx, zmq.SUB, ident, key, self._endpoint(ports["pub"]))
        self.push = client_socket(ctx, zmq.PUSH, ident, key, self._endpoint(ports["results"]),
                                  immediate=True)
        self.pull = client_socket(ctx, zmq.PULL, ident, key, self._endpoint(ports["jobs"]))
        self.jobs.attach(self.pull)
        self.rt.loop.add(self.sub, self._on_sub)
        for sk, what in ((self.sub, "pub"), (self.push, "results"), (self.pull, "jobs")):
            self._watch_handshakes(sk, what)

    # --- requests on the query socket ------------------------------------------------------

    def _request(self, sock: zmq.Socket[Any], type_: str, body: P.Body,
                 on_reply: Callable[[P.Message], None],
                 on_error: Callable[[str], None] | None = None) -> None:
        sign = self.rt.sign if sock is self.query else self._token_sign
        if sign is None:  # the join is done and its token forgotten: nothing more to send
            return
        mid = P.new_id()
        raw = sign(type_, body, msg_id=mid)
        self.requests[mid] = _Request(type_, body, on_reply, time.monotonic(), sock, on_error)
        try:
            sock.send(raw, zmq.NOBLOCK)
        except zmq.Again:
            pass  # retried by the tick

    def _on_query(self, sock: zmq.Socket[Any]) -> None:
        each_message(recv_frames(sock), self._answer, lambda _f, e: self._failed("query", e))

    def _answer(self, frames: list[zmq.Frame]) -> None:
        msg = P.open_message(frames[-1].bytes, self.vk, self.hub_key, replay=self.replay)
        self._heard()
        if msg.type == "sealed":  # a reply with something of this node's own in it
            inner = open_inner(self.keyring, msg, "query")
            if inner is None:
                raise AuthError("a reply sealed to another key")
            msg = inner
        req = self.requests.pop(msg.env.re or "", None)
        if req is None:
            return  # answer to a request we already retried
        for mid, other in list(self.requests.items()):  # drop retries' twins
            if other.type == req.type and other.sock is req.sock:
                del self.requests[mid]
        if msg.type == "error":
            self._on_error_reply(req, msg.body)  # type: ignore[arg-type]
        else:
            req.on_reply(msg)

    def _on_error_reply(self, req: _Request, err: P.ErrorReply) -> None:
        text = f"hub refused {req.type}: {err.message}"
        if req.type == "register" and err.kind == "AuthError" and "not trusted" in err.message:
            self._refused("query")  # revoked on a link made before: keep trying
            self.rt.loop.call_later(REQUEST_RETRY, self._retry_register)
            return
        if req.on_error is not None:
            log.error(text)
            req.on_error(text)
        elif req.type in ("join", "register"):  # said once, by whoever runs the node
            self._fail(AuthError(text) if err.kind == "AuthError" else OdiumError(text))
        else:
            log.error(text)

    # --- joining ---------------------------------------------------------------------------

    def _join(self, token: Token) -> None:
        tok = token.identity
        self._token_sign = P.Signer(tok.signing, tok.key_id, lambda: self.rt.state)
        self.join_sock = client_socket(self.rt.ctx, zmq.DEALER, token.identity, self.hub_key,
                                       self.address)
        js = self.join_sock
        self.rt.loop.add(js, lambda: self._on_query(js))
        self._watch_handshakes(js, "join")
        self._token_expires = token.expires
        self.rt.loop.call_later(JOIN_PATIENCE, self._join_overdue)
        proof = self.rt.ident.sign(join_proof_bytes(token.token_id, self.hub_key))
        self._request(js, "join", P.Join(token.token_id, self.rt.ident.key_id, self.name,
                                         proof), self._joined)

    def _watch_handshakes(self, sock: zmq.Socket[Any], what: str) -> None:
        """Hear refused handshakes at once (a spent token, a key the hub does not trust)."""
        mon = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                      | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.monitors[what] = mon
        self.monitored[what] = sock

        def on_event() -> None:
            for frames in recv_frames(mon):
                # a monitor event: u16 event, u32 value, then the endpoint (zmq_socket_monitor)
                event = struct.unpack("=H", frames[0].bytes[:2])[0]
                if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    if what in ("query", "join"):
                        self._refused(what)
                    else:
                        self._cut_off(what)
                elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED and what == "query":
                    self._told_pending = False

        self.rt.loop.add(mon, on_event)

    def _unwatch(self, what: str) -> None:
        """Stop watching a socket's handshakes: the monitor is switched off on the watched
        socket *before* its end is closed (closed first, libzmq's I/O thread can block for
        ever sending an event to it, and the node hears nothing more on any socket)."""
        sock = self.monitored.pop(what, None)
        if sock is not None and not sock.closed:
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
        mon = self.monitors.pop(what, None)
        if mon is not None:
            self.rt.loop.remove(mon)
            mon.close(linger=0)

    def _notice(self, text: str) -> None:
        """Tell whoever runs this node what is going on (odium node prints it)."""
        if self.on_notice is not None:
            log.info("%s", text)
            self.on_notice(text)
        else:
            log.warning("%s", text)

    def _refused(self, what: str) -> None:
        if what == "join":
            self._fail(AuthError(f"the hub at {self.address} refused this join token: it was "
                                 "used already or has expired; ask for a new one (odium token)"))
            return
        fp = fingerprint(self.rt.ident.key_id)
        if self._admitted:
            why = "revoked"
            text = (f"the hub at {self.address} refuses this node's key (revoked or rejected "
                    f"there); still trying: back as soon as it is accepted again (odium keys "
                    f"accept {fp})")
        else:
            why = "pending"
            text = (f"the hub at {self.address} does not trust this node's key yet (pending "
                    f"there); still trying: accept it there with: odium keys accept {fp}")
        self._told_pending = True
        if why != self._refusal:
            self._refusal = why
            self._notice(text)

    def _cut_off(self, what: str) -> None:
        """A data socket's handshake was refused: the hub no longer trusts this key. Drop
        the data sockets and register again (and again) until it does."""
        if self.sub is None:
            return
        self._close_data()
        self.registered = False
        self.hub_boot = None
        self._said_ready = False
        self._refused(what)
        self._reopen_query()
        self._register()

    def _close_data(self) -> None:
        for what in ("pub", "results", "jobs"):
            self._unwatch(what)
        for sk in (self.sub, self.push, self.pull):
            if sk is not None:
                try:
                    self.rt.loop.remove(sk)
                except KeyError:
                    pass
                sk.close(linger=0)
        self.sub = self.push = self.pull = None
        self.jobs.pull = None

    def _maybe_ready(self) -> None:
        if self.registered and self.heard_boot == self.hub_boot and not self._said_ready:
            self._said_ready = True
            self._refusal = ""
            self._notice(f"joined the hub at {self.address} as {self.name}; ready")

    def _join_overdue(self) -> None:
        if self.join_sock is None:
            return
        if time.time() > self._token_expires:
            self._fail(AuthError("the join token has expired; ask for a new one (odium token)"))
        else:
            log.warning("no answer from the hub at %s yet; still trying", self.address)
            self.rt.loop.call_later(JOIN_PATIENCE, self._join_overdue)

    def _fail(self, err: OdiumError) -> None:
        """Stop the node with an error: ``odium node`` prints it, once, and exits 1."""
        log.debug("node stops: %s", err)
        self.error = err
        self.rt.notify()
        self.rt.loop.stop()

    def _joined(self, msg: P.Message) -> None:
        self._unwatch("join")
        self._token_sign = None  # the token is spent: forget it
        if self.join_sock is not None:
            self.rt.loop.remove(self.join_sock)
            self.join_sock.close(linger=0)
            self.join_sock = None
        save_joined(self.rt.home, self.address, self.hub_key, self.name)
        log.info("joined hub at %s as %s", self.address, self.name)
        self._open_query()
        self._register()

    def _retry_register(self) -> None:
        if not self.registered and not any(r.type == "register"
                                           for r in self.requests.values()):
            self._reopen_query()
            self._register()

    def _register(self) -> None:
        assert self.query is not None
        host = pysocket.gethostname()  # what the hub accepts (P.HOST_RE), or nothing
        host = host if __import__("re").match(P.HOST_RE, host) else ""
        body = P.Register(self.name, self.boot, self.capacity, os.getpid(), host,
                          clean(self.rt.app)[:4096],
                          self.state_info.to_dict() if self.state_info else None)
        self._request(self.query, "register", body, self._registered)

    def _registered(self, msg: P.Message) -> None:
        data = msg.body.data  # type: ignore[attr-defined]
        self.hub_boot = data["hub_boot"]
        self.interval = float(data["interval"])
        self.registered = True
        self._admitted = True
        self.last_heard = time.monotonic()
        self._open_data(data["ports"])
        if self.state_info is not None:  # it may have been computed while we registered
            self._send("state", P.StateReport(self.state_info.to_dict()), keep=True)
        if not self.rt.home.joinpath("joined.json").exists():
            save_joined(self.rt.home, self.address, self.hub_key, self.name)
        self._fetch()
        self.jobs.registered()
        if self.heard_boot == self.hub_boot:
            self._beat()
            self.executor.warm()
        self._maybe_ready()

    def _fetch(self) -> None:
        if self.query is None or any(r.type == "fetch" for r in self.requests.values()):
            return
        self._request(self.query, "fetch", P.Fetch(self.seq), self._fetched)

    def _fetched(self, msg: P.Message) -> None:
        data = msg.body.data  # type: ignore[attr-defined]
        each_message(data["commands"], self._fetched_one, lambda _r, e: self._failed("fetch", e))
        self.seq = max(self.seq, int(data["seq"]))

    def _fetched_one(self, raw: str) -> None:
        m = P.open_message(raw.encode(), self.vk, self.hub_key)
        inner = open_inner(self.keyring, m, "fetch")
        if inner is not None:
            self.sealed_handlers[inner.type](inner)

    # --- from the hub ----------------------------------------------------------------------

    def _on_sub(self) -> None:
        assert self.sub is not None
        each_message(recv_frames(self.sub), self._from_pub, lambda _f, e: self._failed("PUB", e))

    def _from_pub(self, frames: list[zmq.Frame]) -> None:
        msg = P.open_message(frames[-1].bytes, self.vk, self.hub_key, replay=self.replay)
        handler = self.sub_handlers.get(msg.type)
        if handler is None:
            raise ProtocolError(f"message type {msg.type!r} does not come on PUB")
        self._heard()
        handler(msg)

    def _failed(self, where: str, err: Exception) -> None:
        """One message failed (the node's dispatch wrapper, as the hub's): bad input is
        rejected; anything else is logged with its traceback and reported to the hub."""
        if isinstance(err, (ProtocolError, AuthError)):
            self._rejected(where, err)
            return
        if isinstance(err, OdiumError):
            text = f"on {where}: {err}"
        else:
            text = f"on {where}: {type(err).__name__}: {err}"
        if self._may_log():
            log.error("handling a message %s failed", text, exc_info=err)
            if self.registered:
                self._send("event", P.NodeEvent("handler_failed", text[:4000], "error"))

    def _on_sealed(self, msg: P.Message) -> None:
        """A sealed command on PUB: run it if it opens with this node's key, else only note
        that one was sent (its sequence number, to see gaps)."""
        if msg.env.seq > self.seq + 1 and self.registered:
            self._fetch()  # a gap: something was lost on PUB/SUB
        self.seq = max(self.seq, msg.env.seq)
        inner = open_inner(self.keyring, msg, "pub")  # (what fails is rejected by the wrapper)
        if inner is not None:
            self.sealed_handlers[inner.type](inner)

    def _rejected(self, where: str, err: Exception) -> None:
        """Log a message this node refused, and tell the hub so it lands in the event log."""
        if self._may_log():
            log.warning("rejected message on %s: %s", where, err)
            if self.registered:
                self._send("event", P.NodeEvent("rejected", clean(f"on {where}: {err}")[:4000]))

    def _may_log(self) -> bool:
        """May bad input be logged and reported now? (A flood of it must fill neither this
        node's log nor the hub's.)"""
        return self._bad_input_log.take()

    def _on_hb(self, msg: P.Message) -> None:
        body: P.HubBeat = msg.body  # type: ignore[assignment]
        first = self.heard_boot != body.boot
        self.heard_boot = body.boot
        self.interval = body.interval
        if self.hub_boot is not None and body.boot != self.hub_boot:
            log.info("hub restarted; registering again")
            self.hub_boot = None
            self.registered = False
            self._said_ready = False
            self._register()
            return
        if msg.env.seq > self.seq:
            self._fetch()
        if first and self.registered:
            self._beat()
            self.executor.warm()
        self._maybe_ready()

    def _on_exec(self, msg: P.Message) -> None:
        if msg.env.seq > self.seq + 1 and self.registered:
            self._fetch()  # a gap: something was lost on PUB/SUB
        self.seq = max(self.seq, msg.env.seq)
        if self.name not in msg.env.to:
            return
        body: P.Exec = msg.body  # type: ignore[assignment]
        if body.cmd in self.done:
            return  # exactly once: already received (over PUB or fetch)
        self.done[body.cmd] = None
        while len(self.done) > 100_000:
            self.done.popitem(last=False)
        if not satisfies(body.require, self.rt.state, self.rt.state):
            now = time.time()
            self._send("result", P.ResultBody(
                body.cmd, "state_mismatch", now, now,
                error=P.ErrorInfo("StateMismatch", f"this node's state is {self.rt.state}, the "
                                  f"command requires {body.require}"),
                mismatch={"required": body.require, "state": self.rt.state}), keep=True)
            return
        self.executor.submit(body.cmd, body.kind, body.code, body.session, body.timeout,
                             ephemeral=body.ephemeral)
        # a command still running after ACK_AFTER is acknowledged; quick ones just answer
        cmd = body.cmd
        self.rt.loop.call_later(ACK_AFTER, lambda: self._send("ack", P.Ack(cmd))
                                  if cmd in self.executor.runs else None)

    # --- state ------------------------------------------------------------------------------

    @property
    def state_info(self) -> StateInfo | None:
        """This node's latest view of its state (the process's one view of it), if any yet."""
        return self.rt.watch.info

    def _state_changed(self, info: StateInfo) -> None:
        """The state moved: tell the hub."""
        if self.registered:
            self._send("state", P.StateReport(info.to_dict()), keep=True)

    # --- sync ------------------------------------------------------------------------------

    def _on_sync(self, msg: P.Message) -> None:
        self.seq = max(self.seq, msg.env.seq)
        body: P.Sync = msg.body  # type: ignore[assignment]
        if self.name not in msg.env.to or body.cmd in self.done:
            return
        self.done[body.cmd] = None
        self._send("ack", P.Ack(body.cmd))
        started = time.time()
        self.syncing.add(body.cmd)

        def fail(why: str, ename: str = "SyncRefused") -> None:
            self.syncing.discard(body.cmd)
            self._send("result", P.ResultBody(body.cmd, "error", started, time.time(),
                                              error=P.ErrorInfo(ename, why)), keep=True)

        try:
            info = snapshot(self.rt.app)
        except ConfigError as e:
            fail(f"refused: this node's declaration is malformed: {e}")
            return
        self.rt.watch.take(info)
        if info.commit == body.commit and not info.dirty_files and info.state == body.commit:
            if info.unsatisfied:
                fail("at the hub's commit, but installed packages do not satisfy its "
                     f"declaration: {'; '.join(info.unsatisfied)}", "Unsatisfied")
                return
            self.syncing.discard(body.cmd)
            note = self._take_sync_note(body.cmd)
            self._send("result", P.ResultBody(
                body.cmd, "ok", started, time.time(), stdout=note or f"at {body.commit}\n",
                value={"state": info.state, "fingerprint": info.fingerprint.id}), keep=True)
            return
        if info.state == "unversioned":
            fail("this node's application is not a git checkout; sync needs one")
            return
        if info.dirty_files or "+dirty" in info.state:
            files = ", ".join(info.dirty_files[:10]) or "untracked or changed files"
            fail(f"refused: uncommitted changes would be lost ({files}); commit or stash them "
                 "on the node first")
            return
        if self.executor.running():
            fail(f"refused: {len(self.executor.running())} command(s) still running here")
            return
        assert self.query is not None
        have = [info.commit] if info.commit else []
        self._request(self.query, "bundle", P.BundleRequest(body.cmd, have),
                      lambda m: self._got_bundle(body.cmd, body.commit, m, fail),
                      lambda why: fail(why, "SyncFailed"))

    def _got_bundle(self, cmd: str, commit: str, msg: P.Message,
                    fail: Callable[..., None]) -> None:
        data = msg.body.data  # type: ignore[attr-defined]
        if data.get("commit") != commit:
            fail("the hub sent a bundle for another commit")
            return
        app = self.rt.app
        before = head_ref(app)

        def work() -> None:
            moved = False
            try:
                apply_bundle(app, base64.b64decode(data["bundle"]), commit)
                moved = True
                decl = load_declaration(app)
                done: list[str] = []
                if decl.pip:
                    with tempfile.TemporaryDirectory(prefix="odium-wheels-") as d:
                        for fname, b64 in (data.get("wheels") or {}).items():
                            if "/" in fname or not fname.endswith(".whl"):
                                raise OdiumError(f"bad wheel name from hub: {fname!r}")
                            Path(d, fname).write_bytes(base64.b64decode(b64))
                        done = install_declared(decl, find_links=d if data.get("wheels")
                                                else self.find_links, index_url=self.index_url)
                self.rt.loop.call_soon_threadsafe(lambda: self._synced(commit, done))
            except OdiumError as e:
                why = str(e)
                if moved:  # never leave the node on code it cannot run: go back where it was
                    try:
                        restore_head(app, before)
                        why += f"; the checkout was put back to {before[1][:12]}"
                    except OdiumError as e2:
                        why += f"; putting the checkout back failed too: {e2}"
                self.rt.loop.call_soon_threadsafe(lambda: fail(why, "SyncFailed"))

        threading.Thread(target=work, name="odium-sync", daemon=True).start()

    def _take_sync_note(self, cmd: str) -> str:
        """What the process before the restart did for this sync (it left a note)."""
        path = self.rt.home / "sync.json"
        try:
            note = json.loads(path.read_text())
            path.unlink()
        except (OSError, ValueError):
            return ""
        return str(note.get("text", "")) + "\n" if note.get("cmd") == cmd else ""

    def _synced(self, commit: str, installed: list[str]) -> None:
        """Checked out and installed: restart in place; the new process answers the sync."""
        before = self.state_info.commit if self.state_info else None
        text = f"synced from {before or 'nothing'} to {commit}"
        if installed:
            text += "; " + "; ".join(installed)
        cmd = next(iter(self.syncing), "")
        note = self.rt.home / "sync.json"
        note.write_text(json.dumps({"cmd": cmd, "text": text + "; restarted"}))
        log.info("%s; restarting", text)
        self._send("event", P.NodeEvent("synced", clean(f"{text}; restarting")[:4000], "info"))
        self._send("restarting", P.Empty())
        self.restart = True
        self.rt.loop.call_later(0.05, self.rt.loop.stop)

    def _on_interrupt(self, msg: P.Message) -> None:
        if self.name in msg.env.to:
            self.executor.interrupt(msg.body.cmd)  # type: ignore[attr-defined]

    # --- to the hub ------------------------------------------------------------------------

    def _on_exec_event(self, ev: dict[str, Any]) -> None:
        if ev["op"] == "out":
            self._send("output", P.Output(ev["cmd"], ev["stream"], ev["text"]))
        elif ev["op"] == "done":
            r = ev["result"]
            err = r.get("error")
            body = P.ResultBody(
                ev["cmd"], r["status"], r["started"], r["finished"], r.get("stdout", ""),
                r.get("stderr", ""), r.get("value"), r.get("value_repr"), r.get("value_json", True),
                P.ErrorInfo(err["ename"], err["evalue"], err.get("traceback", "")) if err else None,
                r.get("exit"), outputs=[P.Display(o["data"], o.get("metadata") or {})
                                        for o in r.get("outputs") or []])
            self._send("result", body, keep=True)

    def _send(self, type_: str, body: P.Body, keep: bool = False) -> None:
        raw = self.rt.sign(type_, body)
        if self.push is None:
            if keep:
                self.outbox.append(raw)
            return
        if self.outbox and keep:
            self.outbox.append(raw)
            return
        try:
            self.push.send(raw, zmq.NOBLOCK)
        except zmq.Again:
            if keep:
                self.outbox.append(raw)

    def _flush_outbox(self) -> None:
        while self.outbox and self.push is not None:
            try:
                self.push.send(self.outbox[0], zmq.NOBLOCK)
            except zmq.Again:
                return
            self.outbox.popleft()

    def _beat(self) -> None:
        self.last_beat = time.monotonic()
        if self.restart:
            return  # this process is going away; the next one will beat
        self._send("node_hb", P.NodeBeat(self.boot, self.heard_boot, self.seq,
                                         self.executor.running() + sorted(self.syncing)))

    def _heard(self) -> None:
        self.last_heard = time.monotonic()
        if self._unreachable:
            self._unreachable = False
            self._notice(f"the hub at {self.address} is reachable again")

    def _tick(self) -> None:
        now = time.monotonic()
        silent = now - self.last_heard
        if (silent > max(5 * self.interval, 3.0) and not self._unreachable
                and not self._refusal and self.join_sock is None):
            self._unreachable = True
            self._notice(f"the hub at {self.address} is unreachable: nothing heard for "
                         f"{silent:.0f} s; still trying")
        for mid, req in list(self.requests.items()):
            if now - req.sent > REQUEST_RETRY:
                del self.requests[mid]
                sock = req.sock
                if sock is self.query and req.type == "register":
                    # a refused CURVE handshake is not retried by libzmq: start over
                    sock = self._reopen_query()
                self._request(sock, req.type, req.body, req.on_reply, req.on_error)
        if self.registered and now - self.last_beat >= self.interval:
            self._beat()
        self._flush_outbox()

    def close(self) -> None:
        if self.push is not None and self.registered and not self.restart:
            try:
                raw = self.rt.sign("bye", P.Empty())
                self.push.send(raw, zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        self.jobs.close()
        self.executor.close()
        for what in list(self.monitors):
            self._unwatch(what)
        for s in (self.sub, self.push, self.pull, self.query, self.join_sock):
            if s is not None:
                try:
                    self.rt.loop.remove(s)
                except KeyError:
                    pass
                s.close(linger=0 if s is not self.push else 200)


def save_joined(home: Any, address: str, hub_key: str, name: str) -> None:
    path = home / "joined.json"
    tmp = home / f".joined.json.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"address": address, "hub_key": hub_key, "name": name}, f)
    os.replace(tmp, path)


def load_joined(home: Any) -> dict[str, str] | None:
    path = home / "joined.json"
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
        return {"address": str(d["address"]), "hub_key": str(d["hub_key"]),
                "name": str(d["name"])}
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{path} is damaged; join again with a new token") from None


__all__ = ["NodeCore", "Identity"]


def start_node(rt: Runtime, address: str, hub_key: str, name: str, *, token: Token | None = None,
               capacity: int | None = None, find_links: str | None = None,
               index_url: str | None = None) -> NodeCore:
    """Start the node part of ``rt``'s process, joined to the hub at ``address``; it closes with
    the runtime."""
    node = rt.call(lambda: NodeCore(rt, address, hub_key, name, token=token, capacity=capacity,
                                    find_links=find_links, index_url=index_url))
    rt.own("node", node.close)
    return node
