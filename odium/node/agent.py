"""The node part of an instance: joining a hub, registering, heartbeats, and the sockets that
carry them; commands and jobs are handed to their parts.

The loop thread only listens and dispatches: commands go to ``commands`` (the executor runs
them in worker processes and subprocesses), syncs to ``sync``, the job queue's messages to
``jobs``; requests on the query socket are ``requests``', the socket monitors and notices
``link``'s, and what leaves on the results socket the ``outbox``'s.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket as pysocket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import zmq

from ..core import wire as P
from ..core.dispatch import Dispatch
from ..core.guards import ReplayCache
from ..core.keys import Identity, Token, is_reserved_name, verify_key
from ..core.sealing import Keyring, open_inner
from ..core.statediff import StateInfo
from ..core.term import clean
from ..errors import AuthError, ClockError, ConfigError, OdiumError, ProtocolError
from ..io.transport import client_socket, each_message, recv_frames
from ..local.files import atomic_write
from .commands import Commands, Received
from .failures import Failures
from .groups import MissedKeys
from .jobs import NodeJobs
from .joining import Joiner
from .ledger import Ledger
from .link import Link
from .outbox import Outbox
from .ports import NodeRuntime
from .requests import REQUEST_RETRY, Request, Requests
from .sockets import DataSockets
from .status import Event, NodeStatus, next_status
from .sync import Syncer
from .tree import NodeTree
from .workers.kinds import ProcessWorkers, Workers

log = logging.getLogger(__name__)

TICK = 0.05  # seconds between checks (retries, beats, what waits to be sent), at the fastest
SLOW_TICK = 0.25  # ... and at the slowest: a quarter of the beat, within these
STATE_EVERY = 5.0  # seconds between checks of the node's own state


def parse_endpoint(address: str) -> tuple[str, int]:
    u = urlparse(address)
    if u.scheme != "tcp" or not u.hostname or not u.port:
        raise ConfigError(f"hub address must look like tcp://HOST:PORT, not {address!r}")
    return u.hostname, u.port


def check_name(name: str) -> None:
    """Refuse a node name the hub would refuse, or one of the hub's own."""
    if not re.match(P.NAME_RE, name):
        raise ConfigError(f"bad node name {name!r}: letters, digits, '.', '_', '-' (max 64)")
    if is_reserved_name(name):
        raise ConfigError(f"node name {name!r} is reserved for the hub's own keys; choose "
                          "another --name")


class NodeCore:
    """Joins one hub and serves it."""

    def __init__(self, rt: NodeRuntime, address: str, hub_key: str, name: str, *,
                 token: Token | None = None, capacity: int | None = None,
                 find_links: str | None = None, index_url: str | None = None,
                 workers: Workers | None = None) -> None:
        check_name(name)
        self.rt = rt
        self.name = name
        self.host, self.query_port = parse_endpoint(address)
        self.address = address
        self.hub_key = hub_key
        self.vk = verify_key(hub_key)
        self.keyring = Keyring(rt.ident)  # opens what the hub sealed to this node
        self.keyring.shared(hub_key)
        self.capacity = capacity or os.cpu_count() or 1
        self.boot = P.new_id()
        self.replay = ReplayCache(clock=rt.sign.clock)
        self.status = NodeStatus.JOINING if token is not None else NodeStatus.REGISTERING
        self.hub_boot: str | None = None  # from the register reply
        self.heard_boot: str | None = None  # the hub boot last heard on SUB
        self.interval = 1.0
        self.seq = 0
        self.last_heard = time.monotonic()
        self.last_beat = 0.0
        self.query: zmq.Socket[Any] | None = None
        self.joiner: Joiner | None = None  # joining with a token
        self.error: OdiumError | None = None
        self.restart = False  # set by a sync: the process runs itself again when the loop ends
        self.outbox = Outbox(rt.sign)
        self.failures = Failures(self._send, lambda: self.registered)
        self.requests = Requests(self._signer, self._on_error_reply, rt.clock)
        admitted = rt.home.joinpath("joined.json").exists() and token is None
        self.link = Link(rt.loop, address, rt.ident.key_id, admitted, self._refused, self._cut_off)
        self.link.on_link = self.requests.connected  # (a query sent again once reconnected)
        self.workers = workers or ProcessWorkers()
        self._parts(find_links, index_url)
        self._watch_state()
        rt.loop.every(lambda: min(SLOW_TICK, max(TICK, self.interval / 4)), self._tick)
        if token is not None:
            self.joiner = Joiner(rt, address, hub_key, name, token, self.requests, self.link,
                                 self._on_query, self._fail, self._joined)
            self.joiner.start()
        else:
            self._open_query()
            self._register()

    def _parts(self, find_links: str | None, index_url: str | None) -> None:
        """The parts that serve the hub, and the handlers of what comes for them."""
        rt, received = self.rt, Received()
        # what code running here can ask: which node am I on? (workers inherit it)
        os.environ["ODIUM_NODE"] = self.name
        os.environ["ODIUM_NODE_PID"] = str(os.getpid())
        self.workers.start()  # (a zygote that is a new interpreter imports in the background)
        self.commands = Commands(rt, self.name, self._send, received, self.workers)
        self.executor = self.commands.executor
        self.sync = Syncer(rt, self.name, self._send, self._ask, received, self.executor.running,
                           self._restart, find_links, index_url)
        self.jobs = NodeJobs(rt, self, self.capacity, self.workers)  # the job slots and pool
        self.data = DataSockets(rt, self.host, self.hub_key, self.link, self.outbox, self.jobs,
                                self._on_sub)
        self.pub: Dispatch[None] = Dispatch("PUB")
        self.pub.on("hb", P.HubBeat, self._on_hb)
        self.pub.on("interrupt", P.Interrupt, lambda m, b, _: self.commands.on_interrupt(m, b))
        self.pub.on("sealed", P.Sealed, self._on_sealed)
        self.pub.on("group", P.Sealed, lambda _m, body, _: self.groups.learn(body))
        self.groups = MissedKeys(self.keyring, self.hub_key, self.name, self._ask,
                                 self.requests.pending, self.failed, rt.loop.call_later,
                                 self._fetch)
        self.pub.update(self.jobs.pub_handlers())
        # what may come inside a sealed message on PUB (or fetched): commands for some nodes
        self.sealed: Dispatch[None] = Dispatch("sealed")
        self.sealed.on("exec", P.Exec, self._on_exec)
        self.sealed.on("sync", P.Sync, self._on_sync)
        # commands from above this node's hub, through relays (odium.node.tree)
        self.tree = NodeTree(self.name, self.hub_key, self.keyring, received, self.sealed,
                             self.commands.on_interrupt, clock=rt.sign.clock,
                             ledger=Ledger(rt.home / "relayed.ids"))
        self.pub.on("relay", P.Relay, self._on_relay)

    def _watch_state(self) -> None:
        """The state id (rt.state) is known already; the fingerprint is computed off the loop
        and reported when ready, so that it never delays joining."""
        rt = self.rt
        rt.watch.on_change.append(self._state_changed)
        rt.watch.on_bad.append(lambda why: self._send(
            "event", P.NodeEvent("bad_declaration", why, "error")))
        rt.loop.every(STATE_EVERY, rt.watch.refresh)
        rt.loop.call_later(0, rt.watch.refresh)

    # --- what the parts see of the link to the hub (ports.HubLink) --------------------------

    @property
    def registered(self) -> bool:
        return self.status in (NodeStatus.REGISTERED, NodeStatus.READY)

    @property
    def connected(self) -> bool:
        return self.outbox.push is not None

    def open(self, raw: bytes) -> P.Message:
        return P.open_message(raw, self.vk, self.hub_key, replay=self.replay)

    def open_sealed(self, msg: P.Message, where: str, then: Callable[[P.Message], None],
                    not_mine: Callable[[], None]) -> None:
        self.groups.open(msg, where, then, not_mine)

    def heard(self, quietly: bool = False) -> None:
        self.last_heard = time.monotonic()
        if not quietly:
            self.link.heard()

    def send_now(self, type_: str, body: P.Body) -> bool:
        return self.outbox.send_now(type_, body)

    def _send(self, type_: str, body: P.Body, keep: bool = False) -> None:
        self.outbox.send(type_, body, keep)

    # --- sockets ---------------------------------------------------------------------------

    def _open_query(self) -> None:
        # no routing id of our own: the hub's ROUTER gives each connection one nobody can claim
        self.link.unwatch("query")
        q = self.query = client_socket(self.rt.ctx, zmq.DEALER, self.rt.ident, self.hub_key,
                                       self.address, watch=lambda s: self.link.watch(s, "query"))
        self.rt.loop.add(q, lambda: self._on_query(q))

    def _reopen_query(self) -> zmq.Socket[Any]:
        self.link.unwatch("query")
        old = self.query
        if old is not None:
            self.rt.loop.remove(old)
            old.close(linger=0)
            self.requests.forget(old)
        self._open_query()
        assert self.query is not None
        return self.query

    # --- requests on the query socket ------------------------------------------------------

    def _signer(self, sock: zmq.Socket[Any]) -> P.Signer | None:
        if sock is self.query:
            return self.rt.sign
        return self.joiner.sign if self.joiner is not None else None

    def _ask(self, type_: str, body: P.Body, on_reply: Callable[[Any], None],
             on_error: Callable[[str], None] | None = None) -> None:
        assert self.query is not None
        self.requests.ask(self.query, type_, body, on_reply, on_error)

    def _on_query(self, sock: zmq.Socket[Any]) -> None:
        each_message(recv_frames(sock), self._answer, lambda _f, e: self.failed("query", e))

    def _answer(self, frames: list[zmq.Frame]) -> None:
        # no replay window: it counts only for an attempt that waits (odium.node.requests)
        msg = P.open_message(frames[-1].bytes, self.vk, self.hub_key)
        self.heard()
        if msg.type == "sealed":  # a reply with something of this node's own in it
            inner = open_inner(self.keyring, msg, "query")
            if inner is None:
                raise AuthError("a reply sealed to another key")
            msg = inner
        self.requests.answer(msg)

    def _on_error_reply(self, req: Request, err: P.ErrorReply) -> None:
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

    def _refused(self, what: str) -> None:
        """The hub refused the handshake of the join or query socket."""
        if what == "join" and self.joiner is not None:
            self.joiner.refused()
            return
        self.link.refused()
        if what == "query" and self.query is not None:  # lost with it: asked again soon
            self.requests.refused(self.query)

    def _cut_off(self, what: str) -> None:
        """A data socket's handshake was refused: the hub no longer trusts this key. Drop
        the data sockets and register again (and again) until it does."""
        if self.data.sub is None:
            return
        self.data.close()
        self._lost()
        self._refused(what)
        self._reopen_query()
        self._register()

    def _lost(self) -> None:
        """Registered no more (the hub restarted, or refuses this key now). The hub's new
        run may number its commands anew (a relay's do): fetch from the start."""
        self.status = next_status(self.status, Event.LOST)
        self.hub_boot, self.seq = None, 0

    def _maybe_ready(self) -> None:
        if self.status is NodeStatus.REGISTERED and self.heard_boot == self.hub_boot:
            self.status = next_status(self.status, Event.HEARD)
            self.link.ready(self.name)

    def _fail(self, err: OdiumError) -> None:
        """Stop the node with an error: ``odium node`` prints it, once, and exits 1."""
        log.debug("node stops: %s", err)
        self.error = err
        self.rt.notify()
        self.rt.loop.stop()

    def _joined(self) -> None:
        self.status = next_status(self.status, Event.JOINED)
        save_joined(self.rt.home, self.address, self.hub_key, self.name)
        log.info("joined hub at %s as %s", self.address, self.name)
        self._open_query()
        self._register()

    # --- registering -----------------------------------------------------------------------

    def _retry_register(self) -> None:
        if not self.registered and not self.requests.pending("register"):
            self._reopen_query()
            self._register()

    def _register(self) -> None:
        host = pysocket.gethostname()  # what the hub accepts (P.HOST_RE), or nothing
        host = host if re.match(P.HOST_RE, host) else ""
        body = P.Register(self.name, self.boot, self.capacity, os.getpid(), host,
                          clean(self.rt.app)[:4096],
                          info.to_dict() if (info := self.rt.watch.info) else None)
        self._ask("register", body, self._registered)

    def _registered(self, data: Any) -> None:
        self.hub_boot = data["hub_boot"]
        self.interval = float(data["interval"])
        self.status = next_status(self.status, Event.REGISTERED)
        self.link.admitted = True
        self.last_heard = time.monotonic()
        self.data.open(data["ports"], self.name)
        self.tree.welcome(data)
        if (info := self.rt.watch.info) is not None:  # (it may be new since we registered)
            self._send("state", P.StateReport(info.to_dict()), keep=True)
        if not self.rt.home.joinpath("joined.json").exists():
            save_joined(self.rt.home, self.address, self.hub_key, self.name)
        self._fetch()
        self.groups.ask()  # (a request made on a query socket closed since is gone)
        self.jobs.registered()
        if self.heard_boot == self.hub_boot:
            self._beat()
            self.executor.warm()
        self._maybe_ready()

    def _fetch(self) -> None:
        if self.query is None or self.requests.pending("fetch"):
            return
        self._ask("fetch", P.Fetch(self.groups.since(self.seq)), self._fetched)

    def _fetched(self, data: Any) -> None:
        each_message(data["commands"], self._fetched_one, lambda _r, e: self.failed("fetch", e))
        self.seq = max(self.seq, int(data["seq"]))
        if self.groups.lost is not None:  # (one given up while this fetch was on its way)
            self._fetch()

    def _fetched_one(self, raw: str) -> None:
        m = P.open_message(raw.encode(), self.vk, self.hub_key)
        if m.type == "relay":
            self.tree.on_relay(m, m.body)  # type: ignore[arg-type]
            return
        inner = open_inner(self.keyring, m, "fetch")
        if inner is not None:
            self.sealed.handle(inner, None)

    # --- from the hub ----------------------------------------------------------------------

    def _on_sub(self) -> None:
        assert self.data.sub is not None
        each_message(recv_frames(self.data.sub), self._from_pub,
                     lambda _f, e: self.failed("PUB", e))

    def _from_pub(self, frames: list[zmq.Frame]) -> None:
        msg = self.open(frames[-1].bytes)
        if msg.type not in self.pub:
            raise ProtocolError(f"message type {msg.type!r} does not come on PUB")
        self.heard()
        self.pub.handle(msg, None)

    def failed(self, where: str, err: Exception) -> None:
        if isinstance(err, ClockError) and where == "PUB":
            self._fetch()  # the hub's time moved: the answer tells it, with what was missed
        self.failures.failed(where, err)

    def _on_sealed(self, msg: P.Message, _body: P.Sealed, _: None) -> None:
        """A sealed command on PUB: run it if it opens with this node's key, else only note
        that one was sent (its sequence number, to see gaps)."""
        self._seen(msg.env.seq)  # (what fails is rejected by the wrapper)
        self.groups.open(msg, "pub", lambda inner: self.sealed.handle(inner, None), _nothing)

    def _on_relay(self, msg: P.Message, body: P.Relay, _: None) -> None:
        self._seen(msg.env.seq)  # (a command relayed down is numbered as the hub's own)
        self.tree.on_relay(msg, body)

    def _seen(self, seq: int) -> None:
        """A command numbered ``seq`` was sent: fetch what a gap says was lost on PUB/SUB."""
        if seq > self.seq + 1 and self.registered:
            self._fetch()
        self.seq = max(self.seq, seq)

    def _on_hb(self, msg: P.Message, body: P.HubBeat, _: None) -> None:
        first = self.heard_boot != body.boot
        self.heard_boot = body.boot
        self.interval = body.interval
        if self.hub_boot is not None and body.boot != self.hub_boot:
            log.info("hub restarted; registering again")
            self._lost()
            self._register()
            return
        if msg.env.seq > self.seq:
            self._fetch()
        if self.registered and self.tree.stale(body) and not self.requests.pending("register"):
            self._register()  # to hear whom the hub vouches for now
        if first and self.registered:
            self._beat()
            self.executor.warm()
        self._maybe_ready()

    def _on_exec(self, msg: P.Message, body: P.Exec, _: None) -> None:
        self._seen(msg.env.seq)
        self.commands.on_exec(msg, body)

    def _on_sync(self, msg: P.Message, body: P.Sync, _: None) -> None:
        self.seq = max(self.seq, msg.env.seq)
        self.sync.on_sync(msg, body)

    # --- state ------------------------------------------------------------------------------

    def _state_changed(self, info: StateInfo) -> None:
        """The state moved: tell the hub."""
        if self.registered:
            self._send("state", P.StateReport(info.to_dict()), keep=True)

    # --- heartbeats, retries, the end ------------------------------------------------------

    def _beat(self) -> None:
        self.last_beat = time.monotonic()
        if self.restart:
            return  # this process is going away; the next one will beat
        self._send("node_hb", P.NodeBeat(self.boot, self.heard_boot, self.seq,
                                         self.executor.running() + sorted(self.sync.syncing),
                                         round(self.rt.clock.skew(), 3)))

    def _tick(self) -> None:
        now = time.monotonic()
        self.link.silent(now - self.last_heard, self.interval, self.status is NodeStatus.JOINING)
        for req in self.requests.overdue(now):
            if req.sock.closed:
                continue  # its socket was opened again: as the requests made on it, forgotten
            refused = req.sock is self.query and "query" in self.link.auth_failed
            # a refused CURVE handshake is not retried by libzmq: start over (only then: a new
            # handshake over a slow link is what makes an answer later still)
            self.requests.again(req, self._reopen_query() if refused else None)
        if self.registered and now - self.last_beat >= self.interval:
            self._beat()
        self.outbox.flush()

    def _restart(self) -> None:
        """A sync moved the checkout: stop, so that the process runs itself again in place."""
        self.restart = True
        self.rt.loop.call_later(0.05, self.rt.loop.stop)

    def close(self) -> None:
        push = self.outbox.push
        if push is not None and self.registered and not self.restart:
            try:
                raw = self.rt.sign("bye", P.Empty())
                push.send(raw, zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        self.jobs.close()
        self.executor.close()
        self.workers.stop()
        self.link.close()
        join_sock = self.joiner.sock if self.joiner is not None else None
        for s in (self.data.sub, push, self.data.pull, self.query, join_sock):
            if s is not None:
                try:
                    self.rt.loop.remove(s)
                except KeyError:
                    pass
                s.close(linger=0 if s is not push else 200)


def _nothing() -> None:
    pass


def save_joined(home: Any, address: str, hub_key: str, name: str) -> None:
    """joined.json: the hub this home belongs to, so that the node rejoins it (0600)."""
    atomic_write(home / "joined.json",
                 json.dumps({"address": address, "hub_key": hub_key, "name": name}))


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


def start_node(rt: NodeRuntime, address: str, hub_key: str, name: str, *,
               token: Token | None = None, capacity: int | None = None,
               find_links: str | None = None, index_url: str | None = None,
               workers: Workers | None = None,
               then: Callable[[NodeCore], object] | None = None) -> NodeCore:
    """Start the node part of ``rt``'s process, joined to the hub at ``address``; it closes with
    the runtime. ``then``: called with it in the loop, in the same turn it is made (before it
    hears anything: a relay joins its hub part to it there)."""
    def make() -> NodeCore:
        node = NodeCore(rt, address, hub_key, name, token=token, capacity=capacity,
                        find_links=find_links, index_url=index_url, workers=workers)
        if then is not None:
            then(node)
        return node

    node = rt.call(make)
    rt.own("node", node.close)
    return node
