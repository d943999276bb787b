"""The hub part of an instance: trusted keys, node registry, targeting, broadcasts, results.

Everything here runs in the instance's loop thread, except the ZAP policy
(``_zap``), which reads an immutable snapshot of the key table.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import socket as pysocket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from ..core import wire as P
from ..core.keys import (
    Identity,
    Token,
    check_key_id,
    curve_fingerprint,
    curve_form,
    curve_public,
    curve_shown,
    fingerprint,
    is_reserved_name,
    join_proof_bytes,
    verify_key,
    verify_proof,
)
from ..core.ratelimit import TokenBucket
from ..core.results import NodeResult, Result, Status
from ..core.sealing import Keyring
from ..core.targeting import match_nodes
from ..errors import (
    AuthError,
    ConfigError,
    NotConnectedError,
    OdiumError,
    ProtocolError,
    StateMismatchError,
)
from ..io.transport import (
    ZapDecision,
    ZapHandler,
    each_message,
    peer_user_id,
    recv_frames,
    server_socket,
)
from ..local.state import (
    StateInfo,
    commit_relation,
    default_requirement,
    format_diff,
    make_bundle,
    resolve_state,
)
from ..local.state import diff as state_diff
from .jobqueue import JobQueue
from .store import CommandRow, KeyRow, ResultRow, Store

if TYPE_CHECKING:
    from ..runtime import Runtime

log = logging.getLogger(__name__)

ALLOWED_ROLES = ("admin", "node", "token")
KEY_ROLES = (*ALLOWED_ROLES, "pending", "rejected", "revoked", "used")
# what a node may log as itself
NODE_EVENT_KINDS = ("rejected", "bad_declaration", "synced", "handler_failed")
LIVENESS_BEATS = 5  # heartbeat intervals without a word from a node before it is lost
STATE_EVERY = 2.0  # seconds between checks of the hub's own state
DEFAULT_PORTS = P.DEFAULT_PORTS

# Which roles may send which message type, and on which socket.
QUERY_TYPES = {
    "join": ("token",),
    "register": ("node",),
    "fetch": ("node",),
    "ping": ("node", "admin"),
    "run": ("admin",),
    "interrupt": ("admin",),
    "nodes": ("admin",),
    "keys": ("admin",),
    "key": ("admin",),
    "token": ("admin",),
    "log": ("admin",),
    "state_diff": ("admin",),
    "sync_nodes": ("admin",),
    "forget": ("admin",),
    "bundle": ("node",),
    "submit": ("admin",),  # the job queue (odium.hub.jobqueue)
    "job": ("admin",),
    "jobs": ("admin",),
    "job_cancel": ("admin",),
}
SOCKET_KINDS = {"pub": zmq.PUB, "query": zmq.ROUTER, "jobs": zmq.PUSH, "results": zmq.PULL}
RESULT_TYPES = {"node_hb": ("node",), "ack": ("node",), "output": ("node",),
                "result": ("node",), "bye": ("node",), "event": ("node",), "state": ("node",),
                "restarting": ("node",),
                "job_report": ("node",), "job_state": ("node",)}


QueryHandler = Callable[[P.Message, "KeyInfo", Callable[..., None]], None]


@dataclass
class KeyInfo:
    key_id: str
    role: str
    name: str = ""
    expires: float | None = None
    note: str = ""


@dataclass
class NodeInfo:
    name: str
    key_id: str
    status: str = "offline"  # ready, connecting, offline, lost, left
    state: str = "unknown"
    boot: str = ""
    host: str = ""
    pid: int = 0
    capacity: int = 1
    last_seen: float = 0.0
    running: set[str] = field(default_factory=set)
    info: dict[str, Any] | None = None  # the node's StateInfo as JSON (odium.local.state)

    @property
    def fingerprint(self) -> str:
        return str(((self.info or {}).get("fingerprint") or {}).get("id", ""))

    @property
    def unsatisfied(self) -> list[str]:
        return list((self.info or {}).get("unsatisfied") or [])

    @property
    def missing_system(self) -> list[str]:
        detail = ((self.info or {}).get("fingerprint") or {}).get("detail") or {}
        return sorted(k for k, v in (detail.get("system") or {}).items() if v is None)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key_id, "status": self.status, "state": self.state,
                "fingerprint": self.fingerprint, "unsatisfied": self.unsatisfied,
                "missing_system": self.missing_system,
                "host": self.host, "pid": self.pid, "capacity": self.capacity,
                "last_seen": self.last_seen, "running": sorted(self.running)}


@dataclass
class Broadcast:
    cmd: str
    seq: int
    inner: tuple[str, P.Body] | None  # the sealed message's type and body (sealed again on fetch)
    targets: list[str]
    results: dict[str, NodeResult]
    deadline: float | None
    issued: float
    callbacks: list[Callable[[Result], None]] = field(default_factory=list)
    output: list[Callable[[str, str, str], None]] = field(default_factory=list)
    on_node: list[Callable[[NodeResult], None]] = field(default_factory=list)
    acked: set[str] = field(default_factory=set)
    required: str = "any"
    hint: str | None = None
    kind: str = "python"
    code: str = ""

    @property
    def done(self) -> bool:
        return len(self.results) == len(self.targets)


class _Request:
    """The answer to one request on the query socket, sent at most once: ``reply(data)`` or
    ``reply(error=exc)``; what a query handler gets as ``reply``."""

    __slots__ = ("hub", "rid", "uid", "re", "type", "sent")

    def __init__(self, hub: HubCore, rid: bytes, uid: str) -> None:
        self.hub, self.rid, self.uid = hub, rid, uid  # the connection and the key that asked
        self.re: str | None = None  # the request's message id, once known
        self.type = ""
        self.sent = False

    def __call__(self, data: Any = None, error: Exception | None = None,
                 sealed: bool = False) -> None:
        """``sealed``: the reply is readable only with the asker's key (odium.core.sealing)."""
        if self.sent:
            log.warning("a second answer to one %s request was dropped", self.type or "?")
            return
        hub = self.hub
        if error is not None:
            hub._send_query(self.rid, self.uid, "error",
                            P.ErrorReply(type(error).__name__, str(error)), self.re)
        elif sealed:  # (if this raises, nothing was sent: the dispatcher answers the error)
            hub._send_query(self.rid, self.uid, "sealed",
                            hub.keyring.seal("reply", P.Reply(data), [self.uid]), self.re)
        else:
            hub._send_query(self.rid, self.uid, "reply", P.Reply(data), self.re)
        self.sent = True


class HubCore:
    """The hub: four CURVE server sockets, the key table behind ZAP, the registry, broadcasts."""

    def __init__(self, rt: Runtime, store: Store, *, interface: str = "127.0.0.1",
                 ports: dict[str, int] | None = None, hb_interval: float = 1.0,
                 max_message: int = P.MAX_MESSAGE, admin: Identity | None = None,
                 wheelhouse: Path | None = None) -> None:
        self.rt = rt
        self.store = store
        self.interface = interface
        self.hb_interval = hb_interval
        self.max_message = max_message
        self.boot = P.new_id()
        self.replay = P.ReplayCache()
        self.keyring = Keyring(rt.ident)  # keys shared with each node: sealed payloads
        self._peers: OrderedDict[bytes, str] = OrderedDict()  # query routing id -> CURVE key id
        self.nodes: dict[str, NodeInfo] = {}
        self.by_key: dict[str, str] = {}  # node key id -> name
        self.broadcasts: dict[str, Broadcast] = {}
        self.seq = store.max_seq()
        rt.watch.on_bad.append(lambda text: store.event(
            "bad_declaration", f"this hub's declaration: {text}", level="error"))
        rt.watch.warm()
        self.watchers: list[Callable[[], bool]] = []  # re-checked when a node's state changes
        self.wheelhouse: Path | None = wheelhouse
        self._bad_input_log = TokenBucket(50, 10)  # 50 lines, then 10 a second
        self._pending_seen: dict[str, float] = {}
        self._connecting_fast = 0
        # keys: a snapshot dict replaced on every change, so the ZAP thread can read it
        self.keys: dict[str, KeyInfo] = {}
        self._zap_view: tuple[dict[bytes, KeyInfo], dict[bytes, KeyInfo]] = ({}, {})
        keys = {}
        for row in store.keys():
            if len(row.key_id) == 43 and not P.is_key_point(row.key_id):
                store.event("key_dropped", f"stored key {row.key_id!r} ({row.role}) is not a "
                            "valid Ed25519 public key; ignored", level="warning")
                continue
            keys[row.key_id] = KeyInfo(row.key_id, row.role, row.name, row.expires, row.note)
        self._publish_keys(keys)
        self._set_key(KeyInfo(rt.ident.key_id, "admin", "hub", None, "this hub"))
        if admin is not None:
            self._set_key(KeyInfo(admin.key_id, "admin", "admin", None, "admin key in home"))
        for n in store.nodes():
            self.nodes[n.name] = NodeInfo(n.name, n.key_id, "offline", n.state, n.boot, n.host,
                                          n.pid, n.capacity, n.last_seen, info=n.info)
            self.by_key[n.key_id] = n.name
        ctx = rt.ctx
        self.zap = ZapHandler(ctx, self._zap)
        ports = {**DEFAULT_PORTS, **(ports or {})}
        self.ports: dict[str, int] = {}
        self.sockets: dict[str, zmq.Socket[Any]] = {}
        try:
            for name, kind in SOCKET_KINDS.items():
                s, p = server_socket(ctx, kind, rt.ident, self.zap, interface, ports[name],
                                     max_message=max_message, domain=f"odium.{name}".encode())
                self.sockets[name], self.ports[name] = s, p
        except OdiumError:
            self.close()
            raise
        # no ROUTER_HANDOVER: a connection never takes over the routing id of another one
        loop = rt.loop
        loop.add(self.sockets["query"], self._on_query)
        loop.add(self.sockets["results"], self._on_results)
        loop.every(hb_interval, self._heartbeat)
        loop.every(min(hb_interval / 2, 0.25), self._check_liveness)
        loop.every(STATE_EVERY, rt.watch.refresh)
        self.query_handlers: dict[str, QueryHandler] = {
            "join": self._h_join, "register": self._h_register, "fetch": self._h_fetch,
            "ping": self._h_ping, "run": self._h_run, "interrupt": self._h_interrupt,
            "nodes": self._h_nodes, "keys": self._h_keys, "key": self._h_key,
            "token": self._h_token, "log": self._h_log, "state_diff": self._h_state_diff,
            "sync_nodes": self._h_sync_nodes, "bundle": self._h_bundle,
            "forget": self._h_forget,
        }
        self.result_handlers: dict[str, Callable[[P.Message, NodeInfo], None]] = {
            "node_hb": self._r_hb, "ack": self._r_ack, "output": self._r_output,
            "result": self._r_result, "bye": self._r_bye, "event": self._r_event,
            "state": self._r_state, "restarting": self._r_restarting,
        }
        self.jobq = JobQueue(self)  # the job queue: its own handlers, in the same tables
        self.query_handlers.update(self.jobq.query_handlers)
        self.result_handlers.update(self.jobq.result_handlers)
        store.event("hub_start", f"hub {fingerprint(rt.ident.key_id)} listening on "
                    f"{interface} ports {self.ports}")
        self._heartbeat()

    # --- keys and ZAP ----------------------------------------------------------------------

    def _set_key(self, info: KeyInfo, persist: bool = True) -> None:
        """Add or change one key. A key id that is not a real key is refused here, before
        anything changes (ConfigError)."""
        if len(info.key_id) != 40:  # 40: a pending key known only by its CURVE key (z85)
            check_key_id(info.key_id)
        if info.role not in KEY_ROLES:
            raise ConfigError(f"a key's role is one of {', '.join(KEY_ROLES)}, not "
                              f"{info.role!r}")
        keys = dict(self.keys)
        keys[info.key_id] = info
        self._publish_keys(keys)
        if persist:
            self.store.put_key(info.key_id, info.role, name=info.name, expires=info.expires,
                               note=info.note)

    def _publish_keys(self, keys: dict[str, KeyInfo]) -> None:
        """Swap in a new key table with its CURVE indexes, all computed first: if anything
        fails, the old table stays whole. The ZAP thread reads the indexes as one snapshot."""
        by_curve = {curve_public(k): v for k, v in keys.items() if len(k) == 43}
        # pending/rejected entries of keys never trusted are keyed by their CURVE key (z85)
        pending = {k.encode(): v for k, v in keys.items() if len(k) == 40}
        self.keys = keys
        self._zap_view = (by_curve, pending)

    def _zap(self, mech: str, client_key: bytes, address: str, domain: str) -> ZapDecision:
        """Runs in the ZAP thread: allow only admin and node keys, and live token keys on the
        query socket (a token may only join: it hears no broadcast)."""
        if mech != "CURVE":
            return ZapDecision(False, reason=f"mechanism {mech} refused: CURVE only")
        by_curve, by_curve_pending = self._zap_view
        info = by_curve.get(client_key)
        if info is not None and info.role in ALLOWED_ROLES:
            if info.role != "token":
                return ZapDecision(True, user_id=info.key_id)
            if (info.expires or 0) >= time.time() and domain == "odium.query":
                return ZapDecision(True, user_id=info.key_id)
            why = "join token expired" if (info.expires or 0) < time.time() else \
                f"a join token may only join (not on {domain})"
            self.rt.loop.call_soon_threadsafe(
                lambda: self._note_denied(client_key, address, info, why))
            return ZapDecision(False, reason=why)
        if info is None:
            info = by_curve_pending.get(client_key)
            if info is not None and info.role == "node" and domain == "odium.query":
                # accepted by its fingerprint or CURVE key: its first signed request says
                # its key id, which _open checks against this CURVE key and binds
                return ZapDecision(True, user_id=info.key_id)
        self.rt.loop.call_soon_threadsafe(
            lambda: self._note_denied(client_key, address, info, "unknown key"))
        return ZapDecision(False, reason="unknown key")

    def _note_denied(self, client_key: bytes, address: str, info: KeyInfo | None,
                     why: str = "") -> None:
        """A key that failed the handshake: remember unknown ones as pending (bounded)."""
        now = time.time()
        ck = client_key.decode()
        if now - self._pending_seen.get(ck, 0) < 10:
            return
        self._pending_seen[ck] = now
        if len(self._pending_seen) > 10000:
            self._pending_seen.clear()
        fp = curve_fingerprint(client_key)
        if info is not None:
            self.store.event("handshake_refused", f"{info.role} key {fp} from {address}"
                             + (f": {why}" if why and why != "unknown key" else ""),
                             level="warning", key_id=info.key_id)
            return
        if ck in self.keys:  # already pending (or rejected)
            return
        pending = sum(1 for k in self.keys.values() if k.role == "pending")
        if pending >= 1000:
            self.store.event("handshake_refused", f"unknown key {fp} from {address} "
                             "(too many pending keys)", level="warning")
            return
        self._set_key(KeyInfo(ck, "pending", "", None, f"from {address}"))
        self.store.event("key_pending", f"unknown key {fp} from {address} waits; accept it "
                         f"with: odium keys accept {fp}")

    # --- receiving -------------------------------------------------------------------------

    def _may_log_bad_input(self) -> bool:
        """May bad input be logged now? (A flood of it must not fill the disk.)"""
        return self._bad_input_log.take()

    def _reject(self, where: str, uid: str, err: Exception) -> None:
        if self._may_log_bad_input():
            self.store.event("rejected", f"{where}: {err}", level="warning",
                             node=self.by_key.get(uid, ""), key_id=uid)
            log.warning("rejected message on %s from %s: %s", where, uid[:12] or "?", err)

    def _uid(self, frame: zmq.Frame) -> str:
        """The key id a frame came from. A key accepted by its CURVE key alone comes through
        ZAP as that CURVE key (40 characters): its key id is the message's ``from``, if that
        key's CURVE key is the one the link proved (the signature is checked in _open)."""
        uid = peer_user_id(frame)
        if len(uid) == 40:
            for cand in _FROM.findall(frame.bytes[:4096] + frame.bytes[-4096:]):
                kid = cand.decode()
                if P.is_key_point(kid) and curve_public(kid).decode() == uid:
                    return kid
        return uid

    def _open(self, frame: zmq.Frame) -> tuple[P.Message, KeyInfo]:
        link = peer_user_id(frame)
        uid = self._uid(frame)
        info = self.keys.get(uid)
        unbound = None
        if info is None and uid != link:
            unbound = self.keys.get(link)
            if unbound is not None and unbound.role == "node":
                info = KeyInfo(uid, "node", unbound.name, None, unbound.note)
        if info is None or info.role not in ALLOWED_ROLES:
            raise AuthError("sender's key is not trusted (revoked or unknown)")
        msg = P.open_message(frame.bytes, verify_key(uid), uid, max_size=self.max_message,
                             replay=self.replay)
        if unbound is not None:  # proven: the CURVE link and the signature are one key's
            self._bind(link, info)
        return msg, info

    def _drop_key_row(self, key_id: str) -> None:
        self.store.write(lambda s: s.query(KeyRow).filter_by(key_id=key_id).delete())

    def _bind(self, curve: str, info: KeyInfo) -> None:
        """A key known by its CURVE key alone becomes its key id (same role)."""
        keys = dict(self.keys)
        keys.pop(curve, None)
        keys[info.key_id] = info
        self._publish_keys(keys)
        self._drop_key_row(curve)
        self.store.put_key(info.key_id, info.role, name=info.name, note=info.note)
        self.store.event("key_bound", f"{info.role} key {fingerprint(info.key_id)} is "
                         f"{info.key_id}", key_id=info.key_id)

    def _on_query(self) -> None:
        each_message([(f, self._request(f)) for f in recv_frames(self.sockets["query"])],
                     self._query, lambda fr, e: self._failed("query", fr[0][-1], e, fr[1]))

    def _request(self, frames: list[zmq.Frame]) -> _Request:
        """The answer-to-be of one request, for the connection and the CURVE key that sent it."""
        rid, uid = frames[0].bytes, self._uid(frames[-1])
        self._peer(rid, uid)
        return _Request(self, rid, uid)

    def _peer(self, rid: bytes, uid: str) -> None:
        """The CURVE identity that last spoke on a routing id (bounded)."""
        peers = self._peers
        if peers.get(rid) != uid:
            peers[rid] = uid
            peers.move_to_end(rid)
            while len(peers) > 100_000:
                peers.popitem(last=False)

    def _query(self, frames_reply: tuple[list[zmq.Frame], _Request]) -> None:
        frames, reply = frames_reply
        if len(frames) != 2:
            raise ProtocolError(f"a request is 1 frame, not {len(frames) - 1}")
        msg, info = self._open(frames[-1])
        reply.re = msg.env.id
        roles = QUERY_TYPES.get(msg.type)
        if roles is None:
            raise ProtocolError(f"message type {msg.type!r} is not a request")
        if info.role not in roles:
            raise AuthError(f"a {info.role} key may not send {msg.type!r}")
        reply.type = msg.type
        self.query_handlers[msg.type](msg, info, reply)

    def _failed(self, where: str, frame: zmq.Frame, err: Exception,
                req: _Request | None = None) -> None:
        """One message failed: log it (rate-limited) and answer the requester, if any, with
        an error. Bad input is a ``rejected`` event; a handler's own refusal (another
        OdiumError) is only answered; anything else is a bug, logged with its traceback as a
        ``handler_failed`` event and answered as an OdiumError."""
        uid = peer_user_id(frame)
        if isinstance(err, (ProtocolError, AuthError)):
            self._reject(where, uid, err)
        elif not isinstance(err, OdiumError):
            what = req.type if req is not None and req.type else "a message"
            if self._may_log_bad_input():
                log.error("handling %s on %s from %s failed", what, where, uid[:12] or "?",
                          exc_info=err)
                self.store.event("handler_failed", f"{where}: {what}: {type(err).__name__}: "
                                 f"{err}", level="error", node=self.by_key.get(uid, ""),
                                 key_id=uid)
            err = OdiumError(f"the hub failed to handle {what}: {type(err).__name__}: {err}")
        if req is not None and not req.sent:
            if req.re is None:  # name the request when we can read its id
                req.re = P.peek_id(frame.bytes)
            req(error=err)

    def _send_query(self, rid: bytes, uid: str, type_: str, body: P.Body,
                    re: str | None) -> None:
        """Send on the query socket to the connection that asked, if it is still the identity
        that asked: a routing id never carries a reply to another CURVE key."""
        if self._peers.get(rid) != uid:
            log.warning("reply to %s dropped: its connection is gone", uid[:12] or "?")
            return
        raw = self.rt.sign(type_, body, re=re)
        try:
            self.sockets["query"].send_multipart([rid, raw], zmq.NOBLOCK)
        except zmq.Again:
            log.warning("query reply dropped: peer not reading")

    def _on_results(self) -> None:
        each_message(recv_frames(self.sockets["results"]), self._result,
                     lambda frames, e: self._failed("results", frames[-1], e))

    def _result(self, frames: list[zmq.Frame]) -> None:
        if len(frames) != 1:
            raise ProtocolError(f"expected 1 frame, got {len(frames)}")
        msg, info = self._open(frames[-1])
        roles = RESULT_TYPES.get(msg.type)
        if roles is None:
            raise ProtocolError(f"message type {msg.type!r} does not go on the results "
                                "socket")
        if info.role not in roles:
            raise AuthError(f"a {info.role} key may not send {msg.type!r}")
        name = self.by_key.get(info.key_id)
        node = self.nodes.get(name) if name else None
        if node is None:
            raise AuthError("node has not registered")
        self._seen(node, msg.env.state)
        self.result_handlers[msg.type](msg, node)

    # --- node liveness ---------------------------------------------------------------------

    def _seen(self, node: NodeInfo, state: str) -> None:
        node.last_seen = time.time()
        if node.state != state:
            node.state = state
            self.store.put_node(node.name, state=state)
        if node.status in ("lost", "offline", "left"):  # "restarting" ends with a register
            node.status = "connecting"
            self.store.event("node_back", f"{node.name} is back", node=node.name)
            self.store.put_node(node.name, status="connecting")

    def _heartbeat(self) -> None:
        self._publish("hb", P.HubBeat(self.boot, self.hb_interval), seq=self.seq)

    def _fast_heartbeat(self) -> None:
        """While nodes are connecting, beat often so their SUB sockets prove themselves fast."""
        if any(n.status == "connecting" for n in self.nodes.values()) and self._connecting_fast:
            self._connecting_fast -= 1
            self._heartbeat()
            self.rt.loop.call_later(0.02, self._fast_heartbeat)
        else:
            self._connecting_fast = 0

    def _kick_fast_heartbeat(self) -> None:
        if not self._connecting_fast:
            self._connecting_fast = 250
            self.rt.loop.call_later(0.005, self._fast_heartbeat)
        else:
            self._connecting_fast = 250

    def _check_liveness(self) -> None:
        now = time.time()
        limit = LIVENESS_BEATS * self.hb_interval
        for node in self.nodes.values():
            if node.status == "restarting" and now - node.last_seen > max(limit, 60.0):
                self._node_gone(node, "lost", "did not come back after restarting")
            if node.status in ("ready", "connecting") and now - node.last_seen > limit:
                self._node_gone(node, "lost",
                                f"no heartbeat for {now - node.last_seen:.1f} s")
        for b in list(self.broadcasts.values()):
            if b.deadline is not None and time.monotonic() > b.deadline:
                for name in b.targets:
                    if name not in b.results:
                        self._record(b, NodeResult(
                            name, Status.TIMEOUT, state=self.nodes[name].state,
                            error={"ename": "TimeoutError",
                                   "evalue": "no result from the node in time", "traceback": ""}))

    def _node_gone(self, node: NodeInfo, status: str, why: str) -> None:
        node.status = status
        self.store.event(f"node_{status}", f"{node.name}: {why}", level="warning",
                         node=node.name)
        self.store.put_node(node.name, status=status, last_seen=node.last_seen)
        self._lose_running(node, why)

    def _lose_running(self, node: NodeInfo, why: str, restart: bool = False) -> None:
        for b in list(self.broadcasts.values()):
            if restart and b.kind == "sync":
                continue  # a sync restarts the node on purpose; it answers when it is back
            if node.name in b.targets and node.name not in b.results:
                self._record(b, NodeResult(node.name, Status.LOST, state=node.state, error={
                    "ename": "NodeLost", "evalue": f"node lost while running: {why}",
                    "traceback": ""}))
        node.running.clear()
        self.jobq.node_lost(node.name, why)

    # --- query handlers --------------------------------------------------------------------

    def _h_ping(self, msg: P.Message, info: KeyInfo, reply: Callable[..., None]) -> None:
        reply({"boot": self.boot, "seq": self.seq, "key": self.rt.ident.key_id})

    def _h_join(self, msg: P.Message, info: KeyInfo, reply: Callable[..., None]) -> None:
        body: P.Join = msg.body  # type: ignore[assignment]
        if info.note != body.token or (info.expires or 0) < time.time():
            raise AuthError("join token does not match or has expired")
        verify_proof(body.key, join_proof_bytes(body.token, self.rt.ident.key_id), body.proof)
        _refuse_reserved(body.name)
        taken = self.nodes.get(body.name)
        if taken is not None and taken.key_id != body.key:
            raise AuthError(f"node name {body.name!r} is taken by another key; choose another "
                            "--name or revoke the old key")
        self._set_key(KeyInfo(info.key_id, "used", "", info.expires, body.token))  # burn it
        self._set_key(KeyInfo(body.key, "node", body.name, None, "joined with a token"))
        self.store.event("join", f"{body.name} joined with a token ({fingerprint(body.key)})",
                         node=body.name, key_id=body.key)
        reply({"name": body.name, "hub": self.rt.ident.key_id})

    def _h_register(self, msg: P.Message, info: KeyInfo, reply: Callable[..., None]) -> None:
        body: P.Register = msg.body  # type: ignore[assignment]
        if info.name and info.name != body.name:
            raise AuthError(f"this key is registered as {info.name!r}, not {body.name!r}")
        _refuse_reserved(body.name)
        other = self.nodes.get(body.name)
        if other is not None and other.key_id != info.key_id:
            raise AuthError(f"node name {body.name!r} belongs to another key")
        if body.info is not None:
            try:
                StateInfo.from_dict(body.info)
            except (KeyError, TypeError, ValueError, OdiumError) as e:
                raise ProtocolError(f"bad state info in register: {e}") from None
        if not info.name:
            self._set_key(KeyInfo(info.key_id, info.role, body.name, info.expires, info.note))
        node = self.nodes.get(body.name)
        if node is None:
            node = NodeInfo(body.name, info.key_id)
            self.nodes[body.name] = node
        if node.boot and node.boot != body.boot:
            self._lose_running(node, "the node restarted", restart=node.status == "restarting")
        if node.status in ("ready", "connecting") and node.boot == body.boot:
            pass  # a retried register: nothing changes
        else:
            self.store.event("register", f"{body.name} registered (pid {body.pid} on "
                             f"{body.host})", node=body.name, key_id=info.key_id)
        node.boot, node.host, node.pid = body.boot, body.host, body.pid
        node.capacity = body.capacity
        node.state = msg.env.state
        if body.info is not None:
            self._take_info(node, body.info)
        node.last_seen = time.time()
        if node.status != "ready":
            node.status = "connecting"
        self.by_key[info.key_id] = body.name
        self.keyring.shared(info.key_id)  # computed once, here, not while sealing to many
        self.store.put_node(body.name, key_id=info.key_id, status=node.status, state=node.state,
                            host=node.host, pid=node.pid, capacity=node.capacity, boot=node.boot,
                            last_seen=node.last_seen)
        self._kick_fast_heartbeat()
        self._check_watchers()
        reply({"hub_boot": self.boot, "seq": self.seq, "interval": self.hb_interval,
               "ports": {k: v for k, v in self.ports.items() if k != "query"}})

    def _h_fetch(self, msg: P.Message, info: KeyInfo, reply: Callable[..., None]) -> None:
        body: P.Fetch = msg.body  # type: ignore[assignment]
        name = self.by_key.get(info.key_id, "")
        out = [self._seal_for(b, name, info.key_id).decode()
               for b in sorted(self.broadcasts.values(), key=lambda b: b.seq)
               if b.seq > body.since and name in b.targets and name not in b.results
               and b.inner is not None]
        reply({"commands": out, "seq": self.seq}, sealed=True)

    def _seal_for(self, b: Broadcast, name: str, key_id: str) -> bytes:
        """A missed command again, sealed to the one node that asks for it."""
        assert b.inner is not None
        type_, body = b.inner
        return self.rt.sign("sealed", self.keyring.seal(type_, body, [key_id], to=[name]),
                           seq=b.seq)

    def _h_run(self, msg: P.Message, info: KeyInfo, reply: Callable[..., None]) -> None:
        body: P.Run = msg.body  # type: ignore[assignment]
        if msg.env.id in self.broadcasts:
            raise ProtocolError("a run with this id is already going")
        self.broadcast(body.code, body.nodes, kind=body.kind, timeout=body.timeout,
                       session=body.session or f"cli-{msg.env.id[:12]}", issuer=info.key_id,
                       cmd=msg.env.id, ephemeral=body.session is None or body.ephemeral,
                       require=body.require,
                       on_done=lambda r: reply({"result": r.to_dict()}))

    def _h_interrupt(self, msg: P.Message, info: KeyInfo, reply: Callable[..., None]) -> None:
        body: P.Interrupt = msg.body  # type: ignore[assignment]
        reply({"sent": self.interrupt(body.cmd)})

    def _h_nodes(self, msg: P.Message, info: KeyInfo, reply: Callable[..., None]) -> None:
        body: P.Query = msg.body  # type: ignore[assignment]
        reply({"nodes": self.node_list(body.pattern), "hub_state": self.rt.state})

    def _h_keys(self, msg: P.Message, info: KeyInfo, reply: Callable[..., None]) -> None:
        reply({"keys": self.key_list()})

    def _h_key(self, msg: P.Message, info: KeyInfo, reply: Callable[..., None]) -> None:
        body: P.KeyAction = msg.body  # type: ignore[assignment]
        chosen = self.key_action(body.action, body.pattern, body.role)
        reply({"changed": [k.key_id for k in chosen], "keys": [
            {"key": k.key_id if len(k.key_id) == 43 else curve_shown(k.key_id), "name": k.name,
             "role": k.role, "fingerprint": self._fp(k.key_id)} for k in chosen]})

    def _h_forget(self, msg: P.Message, info: KeyInfo, reply: Callable[..., None]) -> None:
        body: P.Query = msg.body  # type: ignore[assignment]
        if not body.pattern:
            raise OdiumError("forget needs a node name or glob")
        reply({"forgotten": self.forget(body.pattern)})

    def _h_token(self, msg: P.Message, info: KeyInfo, reply: Callable[..., None]) -> None:
        body: P.TokenRequest = msg.body  # type: ignore[assignment]
        reply({"token": self.make_token(body.ttl)})

    def _h_state_diff(self, msg: P.Message, info: KeyInfo, reply: Callable[..., None]) -> None:
        reply(self.state_report(msg.body.pattern))  # type: ignore[attr-defined]

    def _h_sync_nodes(self, msg: P.Message, info: KeyInfo, reply: Callable[..., None]) -> None:
        body: P.SyncRequest = msg.body  # type: ignore[assignment]
        self.sync_nodes(body.nodes, timeout=body.timeout, issuer=info.key_id,
                        on_done=lambda r: reply({"result": r.to_dict()}))

    def _h_bundle(self, msg: P.Message, info: KeyInfo, reply: Callable[..., None]) -> None:
        """A node in a sync asks for the commits it lacks: made off the loop, then answered."""
        body: P.BundleRequest = msg.body  # type: ignore[assignment]
        name = self.by_key.get(info.key_id, "")
        b = self.broadcasts.get(body.cmd)
        if b is None or b.kind != "sync" or name not in b.targets:
            raise AuthError("no sync of this node is going on")
        target, app, wheelhouse = b.code, self.rt.app, self.wheelhouse

        def work() -> None:
            try:
                data = make_bundle(app, target, list(body.have))
                wheels = _wheels(wheelhouse)
                out = {"commit": target, "bundle": base64.b64encode(data).decode(),
                       "wheels": wheels}
                size = len(out["bundle"]) + sum(len(w) for w in wheels.values())
                if size > self.max_message - 64 * 1024:
                    raise OdiumError(
                        f"the sync would be {size} bytes, over the message limit of "
                        f"{self.max_message}: serve the wheels from an index the nodes reach "
                        "(odium node --index-url/--find-links), or raise the limit")
                self.rt.loop.call_soon_threadsafe(lambda: reply(out, sealed=True))
            except Exception as e:  # noqa: BLE001 - every request gets an answer
                err = e if isinstance(e, OdiumError) else OdiumError(
                    f"the hub failed to make the bundle: {type(e).__name__}: {e}")
                self.rt.loop.call_soon_threadsafe(lambda: reply(error=err))

        threading.Thread(target=work, name="odium-bundle", daemon=True).start()

    def _h_log(self, msg: P.Message, info: KeyInfo, reply: Callable[..., None]) -> None:
        body: P.Query = msg.body  # type: ignore[assignment]
        reply({"events": self.events(body.limit)})

    # --- results handlers ------------------------------------------------------------------

    def _r_hb(self, msg: P.Message, node: NodeInfo) -> None:
        body: P.NodeBeat = msg.body  # type: ignore[assignment]
        if body.boot != node.boot or node.status == "restarting":
            return  # a beat from an earlier run of the node, or before it registered again
        if body.hub_boot == self.boot and node.status != "ready":
            node.status = "ready"
            self.store.put_node(node.name, status="ready", last_seen=node.last_seen)
            self.store.event("node_ready", f"{node.name} is ready", node=node.name)
            self.rt.notify()
        # a command the hub thinks is running that the node does not know: it was lost
        for cmd in list(node.running):
            b = self.broadcasts.get(cmd)
            if b is None or node.name in b.results:
                node.running.discard(cmd)
            elif cmd not in body.running and body.seq >= b.seq and cmd in b.acked:
                self._record(b, NodeResult(node.name, Status.LOST, state=node.state, error={
                    "ename": "NodeLost", "evalue": "the node no longer runs this command",
                    "traceback": ""}))

    def _r_ack(self, msg: P.Message, node: NodeInfo) -> None:
        cmd = msg.body.cmd  # type: ignore[attr-defined]
        b = self.broadcasts.get(cmd)
        if b is not None and node.name in b.targets:
            b.acked.add(node.name)
            node.running.add(cmd)

    def _r_output(self, msg: P.Message, node: NodeInfo) -> None:
        body: P.Output = msg.body  # type: ignore[assignment]
        b = self.broadcasts.get(body.cmd)
        if b is not None and node.name in b.targets:  # a node speaks only for itself
            for fn in b.output:
                fn(node.name, body.stream, body.text)

    def _r_result(self, msg: P.Message, node: NodeInfo) -> None:
        body: P.ResultBody = msg.body  # type: ignore[assignment]
        node.running.discard(body.cmd)
        b = self.broadcasts.get(body.cmd)
        if b is None or node.name not in b.targets or node.name in b.results:
            return  # late or duplicate: the first answer (or timeout/lost) stands
        mismatch = None
        status = Status(body.status) if body.status != "state_mismatch" else Status.STATE_MISMATCH
        if status is Status.STATE_MISMATCH:
            mismatch = dict(body.mismatch or {})
            mismatch.update(self.diff_for(node))
            node_commit = msg.env.state.split("+")[0]
            if re.fullmatch(r"[0-9a-f]{40}", b.required) and re.fullmatch(r"[0-9a-f]{40}",
                                                                         node_commit):
                # where the node stands against what was required (ahead, behind, ...)
                mismatch["relation"] = commit_relation(self.rt.app, b.required, node_commit)
        self._record(b, NodeResult(
            node.name, status, body.stdout, body.stderr, body.value, body.value_repr,
            body.value_json, P.to_builtins(body.error) if body.error else None, body.exit,
            msg.env.state, body.started, body.finished, mismatch,
            P.to_builtins(body.outputs) if body.outputs else []))

    def _r_event(self, msg: P.Message, node: NodeInfo) -> None:
        body: P.NodeEvent = msg.body  # type: ignore[assignment]
        if self._may_log_bad_input():  # the same budget as the hub's own rejections
            kind = body.kind if body.kind in NODE_EVENT_KINDS else "node_event"
            self.store.event(kind, f"reported by {node.name}: {body.detail}",
                             level=body.level, node=node.name, key_id=node.key_id)

    def _r_state(self, msg: P.Message, node: NodeInfo) -> None:
        self._take_info(node, msg.body.info)  # type: ignore[attr-defined]
        self._check_watchers()

    def _take_info(self, node: NodeInfo, info: dict[str, Any]) -> None:
        """A node told us its whole state: keep it, its declaration, and say what is wrong."""
        try:
            parsed = StateInfo.from_dict(info)
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"bad state info: {e}") from None
        old = node.unsatisfied
        old_missing = node.missing_system
        node.info = parsed.to_dict()
        node.state = parsed.state
        self.store.put_node(node.name, state=node.state, info=node.info)
        self.store.put_state(parsed.state, parsed.declaration.to_dict())
        if node.unsatisfied and node.unsatisfied != old:
            self.store.event("unsatisfied", f"{node.name}: installed packages do not satisfy "
                             f"its declaration: {'; '.join(node.unsatisfied)}", level="warning",
                             node=node.name)
        if node.missing_system and node.missing_system != old_missing:
            self.store.event("missing_system", f"{node.name}: declared system packages are "
                             f"missing: {', '.join(node.missing_system)} (Odium never installs "
                             "them)", level="warning", node=node.name)

    @property
    def state_info(self) -> StateInfo:
        """This hub's own state (the process's one view of it)."""
        return self.rt.watch.current()

    def _check_watchers(self) -> None:
        self.watchers = [w for w in self.watchers if not w()]

    def resolve_requirement(self, require: str | None) -> tuple[str, str | None]:
        """The state a command requires, as the node will check it: ``any`` or a commit."""
        own = self.rt.state
        if require in (None, "default"):
            kind, hint = default_requirement(own)
            return (own if kind == "match" else "any"), hint
        if require == "any":
            return "any", None
        if require == "match":
            if not re.fullmatch(r"[0-9a-f]{40}", own):
                raise StateMismatchError(
                    f"cannot require this hub's state: it is {own!r}, not a clean commit; "
                    "commit your changes, or use --require-state any")
            return own, None
        if not re.fullmatch(r"[0-9a-f]{7,40}", require or ""):
            raise ConfigError(f"a required state is 'any', 'match' or a commit id (7 to 40 hex "
                              f"digits), not {require!r}")
        try:  # a short id the hub knows becomes the full commit
            return resolve_state(self.rt.app, str(require)), None
        except ConfigError:
            return str(require), None

    def diff_for(self, node: NodeInfo) -> dict[str, Any]:
        """How a node's state differs from this hub's, part by part."""
        if node.info is None:  # only its state id so far: compare commits, say the rest is unknown
            d: dict[str, Any] = {}
            mine, theirs_state = self.rt.state, node.state
            hub_commit, node_commit = mine.split("+")[0], theirs_state.split("+")[0]
            if hub_commit != node_commit:
                rel = "unknown"
                if re.fullmatch(r"[0-9a-f]{40}", hub_commit) and re.fullmatch(
                        r"[0-9a-f]{40}", node_commit):
                    rel = commit_relation(self.rt.app, hub_commit, node_commit)
                d["commit"] = {"hub": hub_commit, "node": node_commit, "relation": rel}
            if "+dirty" in theirs_state:
                d["dirty"] = ["(files not reported yet)"]
            d["unreported"] = "the node has not reported its fingerprint yet"
            return {"diff": d, "text": format_diff(d)}
        theirs = StateInfo.from_dict(node.info)
        relation = None
        if self.state_info.commit and theirs.commit:
            relation = commit_relation(self.rt.app, self.state_info.commit, theirs.commit)
        d = state_diff(self.state_info, theirs, relation)
        return {"diff": d, "text": format_diff(d)}

    def state_report(self, pattern: str | None = None) -> dict[str, Any]:
        self.rt.watch.now()
        names = match_nodes(pattern, sorted(self.nodes)) if pattern else sorted(self.nodes)
        return {"hub": self.state_info.to_dict(),
                "nodes": {n: {"status": self.nodes[n].status, "state": self.nodes[n].state,
                              **self.diff_for(self.nodes[n])} for n in names}}

    def _r_restarting(self, msg: P.Message, node: NodeInfo) -> None:
        node.status = "restarting"
        self.store.put_node(node.name, status="restarting")
        self.store.event("node_restarting", f"{node.name} restarts in place", node=node.name)

    def _r_bye(self, msg: P.Message, node: NodeInfo) -> None:
        if node.status == "restarting":
            return  # it comes back by itself
        self._node_gone(node, "left", "the node stopped")

    # --- broadcasting ----------------------------------------------------------------------

    def _publish(self, type_: str, body: P.Body, *, to: list[str] | None = None, seq: int = 0,
                 msg_id: str | None = None) -> bytes:
        raw = self.rt.sign(type_, body, to=to, seq=seq, msg_id=msg_id)
        pub = self.sockets.get("pub")
        if pub is None:  # being rebound: nodes catch up over fetch
            return raw
        try:
            pub.send(raw, zmq.NOBLOCK)
        except zmq.Again:  # high-water mark: nodes catch up over fetch
            log.warning("PUB queue full; %s dropped", type_)
        return raw

    def _publish_sealed(self, type_: str, body: P.Body, targets: list[str], seq: int) -> bytes:
        """Publish a message whose body only its targets can read (odium.core.sealing)."""
        keys = [self.nodes[n].key_id for n in targets]
        return self._publish("sealed", self.keyring.seal(type_, body, keys, to=targets), seq=seq)

    def _rebind(self, names: tuple[str, ...] = ("pub", "jobs"), tries: int = 100) -> None:
        """Drop every connection on these sockets and listen again on the same ports: each peer
        reconnects through ZAP, so a key revoked meanwhile hears nothing more."""
        for name in names:
            s = self.sockets.pop(name, None)
            if s is not None:
                if name == "results":
                    self.rt.loop.remove(s)
                s.close(linger=0)
        left = []
        for name in names:
            try:
                s, _ = server_socket(self.rt.ctx, SOCKET_KINDS[name], self.rt.ident,
                                     self.zap, self.interface, self.ports[name],
                                     max_message=self.max_message,
                                     domain=f"odium.{name}".encode())
                self.sockets[name] = s
                if name == "results":
                    self.rt.loop.add(s, self._on_results)
            except OdiumError:
                left.append(name)  # the old socket still holds the port for a moment
        if left and tries > 0:
            self.rt.loop.call_later(0.02, lambda: self._rebind(tuple(left), tries - 1))
        elif left:
            self.store.event("error", f"could not listen again on {left}", level="error")

    def broadcast(self, code: str, nodes: str = "*", *, kind: str = "python",
                  timeout: float | None = None, session: str = "default",
                  issuer: str | None = None, cmd: str | None = None, ephemeral: bool = False,
                  require: str | None = None,
                  on_done: Callable[[Result], None] | None = None,
                  on_output: Callable[[str, str, str], None] | None = None,
                  on_node: Callable[[NodeResult], None] | None = None) -> Broadcast:
        """Publish a command to the nodes matching ``nodes``; ``on_done`` gets the Result,
        ``on_node`` each node's entry as it comes, ``on_output`` streamed output.

        ``require``: ``any``, ``match`` (this hub's own commit), an explicit state id, or
        ``default``/None (``match`` when this hub's application is a clean commit, else ``any``).
        """
        if kind not in ("python", "shell"):
            raise ProtocolError(f"kind must be 'python' or 'shell', not {kind!r}")
        required, hint = self.resolve_requirement(require)
        matched = match_nodes(nodes, self.targetable())
        if not matched:
            known = ", ".join(self.targetable()) or "none yet (add some: odium token)"
            raise NotConnectedError(f"no node matches {nodes!r}; nodes: {known}")
        cmd = cmd or P.new_id()
        targets = [n for n in matched if self.nodes[n].status in ("ready", "connecting")]
        self.seq += 1
        body = P.Exec(cmd, kind, code, session, timeout,  # type: ignore[arg-type]
                      issuer if issuer != self.rt.ident.key_id else None, ephemeral, required)
        if targets:
            self._publish_sealed("exec", body, targets, self.seq)
        grace = max(2.0, 3 * self.hb_interval)
        b = Broadcast(cmd, self.seq, ("exec", body), targets, {}, time.monotonic() + timeout
                      + grace if timeout else None, time.time())
        b.required, b.hint = required, hint
        b.targets = matched  # every matched node gets an entry
        if on_done:
            b.callbacks.append(on_done)
        if on_output:
            b.output.append(on_output)
        if on_node:
            b.on_node.append(on_node)
        self.broadcasts[cmd] = b
        self.store.insert(CommandRow, dict(
            id=cmd, seq=self.seq, kind=kind, code=code, session=session, nodes=nodes,
            targets=matched, issuer=issuer or self.rt.ident.key_id, state=self.rt.state,
            timeout=timeout, created=b.issued, finished=None, status="running"))
        self.store.event("command", f"{kind} {cmd[:12]} to {nodes!r} ({len(targets)} of "
                         f"{len(matched)} connected)", key_id=issuer or "")
        self._not_connected(b, targets)
        return b

    def sync_nodes(self, nodes: str = "*", *, timeout: float = 300.0, issuer: str | None = None,
                   on_done: Callable[[Result], None] | None = None) -> Broadcast:
        """Bring the matching nodes to this hub's commit (git bundle over the query socket)."""
        target = self.rt.watch.now().state
        if not re.fullmatch(r"[0-9a-f]{40}", target):
            raise StateMismatchError(f"cannot sync nodes to this hub's state {target!r}: it is "
                                     "not a clean commit; commit your changes first")
        matched = match_nodes(nodes, self.targetable())
        if not matched:
            known = ", ".join(self.targetable()) or "none yet"
            raise NotConnectedError(f"no node matches {nodes!r}; nodes: {known}")
        cmd = P.new_id()
        targets = [n for n in matched if self.nodes[n].status in ("ready", "connecting")]
        self.seq += 1
        sync = P.Sync(cmd, target)
        if targets:
            self._publish_sealed("sync", sync, targets, self.seq)
        b = Broadcast(cmd, self.seq, ("sync", sync), matched, {}, time.monotonic() + timeout,
                      time.time())
        b.kind, b.code, b.required = "sync", target, "any"
        if on_done:
            b.callbacks.append(on_done)
        self.broadcasts[cmd] = b
        self.store.insert(CommandRow, dict(
            id=cmd, seq=self.seq, kind="sync", code=target, session="-", nodes=nodes,
            targets=matched, issuer=issuer or self.rt.ident.key_id, state=target,
            timeout=timeout, created=b.issued, finished=None, status="running"))
        self.store.event("sync", f"sync {cmd[:12]} of {nodes!r} to {target[:12]} "
                         f"({len(targets)} of {len(matched)} connected)", key_id=issuer or "")
        self._not_connected(b, targets)
        return b

    def _not_connected(self, b: Broadcast, connected: list[str]) -> None:
        """Every matched node that is not connected gets its entry at once."""
        for name in b.targets:
            if name not in connected:
                self._record(b, NodeResult(name, Status.NOT_CONNECTED,
                                           state=self.nodes[name].state, error={
                    "ename": "NotConnected", "evalue": f"node is {self.nodes[name].status}",
                    "traceback": ""}))

    def interrupt(self, cmd: str) -> bool:
        b = self.broadcasts.get(cmd)
        if b is None:
            return False
        left = [n for n in b.targets if n not in b.results]
        if left:
            self._publish("interrupt", P.Interrupt(cmd), to=left)
        return bool(left)

    def _record(self, b: Broadcast, r: NodeResult) -> None:
        if r.node in b.results:
            return
        b.results[r.node] = r
        for on_node in b.on_node:
            try:
                on_node(r)
            except Exception:
                log.exception("node entry callback failed")
        self.store.insert(ResultRow, dict(
            command_id=b.cmd, node=r.node, status=r.status.value, state=r.state,
            stdout=r.stdout, stderr=r.stderr, value=r.value, value_repr=r.value_repr,
            error=r.error, exit=r.exit, started=r.started, finished=r.finished))
        if b.done:
            del self.broadcasts[b.cmd]
            extra: dict[str, Any] = {"required": b.required}
            if b.hint:
                extra["hint"] = b.hint
            result = Result(b.cmd, dict((n, b.results[n]) for n in b.targets), self.rt.state,
                            b.issued, extra)
            status = "ok" if result.ok else "failed"
            fin = time.time()
            self.store.update(CommandRow, b.cmd, {"status": status, "finished": fin})
            for fn in b.callbacks:
                try:
                    fn(result)
                except Exception:
                    log.exception("result callback failed")

    # --- the registry ----------------------------------------------------------------------

    def targetable(self) -> list[str]:
        """The names a pattern may target: nodes whose key is trusted as a node key. A node
        whose key was revoked or rejected is still listed, never targeted; one that is only
        off (a lab PC shut down for the night) is targeted, and answers ``not connected``."""
        keys = self.keys
        return sorted(n for n, node in self.nodes.items()
                      if (k := keys.get(node.key_id)) is not None and k.role == "node")

    def forget(self, pattern: str, *, force: bool = False) -> list[str]:
        """Remove the nodes matching ``pattern`` (a name, glob or comma list) from the
        registry and the store, with their node keys: such a node can come back only with a
        new token, or by being accepted again as a pending key. A connected node is not
        forgotten (stop it, or revoke its key, first) unless ``force`` (its process is known
        to be gone: local nodes the hub stopped itself). Returns the names forgotten."""
        matched = match_nodes(pattern, sorted(self.nodes))
        if not matched:
            known = ", ".join(sorted(self.nodes)) or "none yet"
            raise OdiumError(f"no node matches {pattern!r}; nodes: {known}")
        live = [n for n in matched if self.nodes[n].status in ("ready", "connecting",
                                                               "restarting")]
        if live and not force:
            if len(live) == len(matched):
                raise OdiumError(f"not forgotten: {', '.join(live)} "
                                 f"{'is' if len(live) == 1 else 'are'} connected; stop "
                                 f"{'it' if len(live) == 1 else 'them'} first, or revoke "
                                 "the key (odium keys revoke NAME)")
            matched = [n for n in matched if n not in live]
        keys = dict(self.keys)
        for name in matched:
            node = self.nodes.pop(name)
            self._lose_running(node, "the node was forgotten")
            if self.by_key.get(node.key_id) == name:
                del self.by_key[node.key_id]
            k = keys.get(node.key_id)
            drop = k is not None and k.role in ("node", "revoked", "rejected")
            if drop:
                del keys[node.key_id]
            self.store.forget_node(name, node.key_id if drop else "")
            self.store.event("node_forgotten", f"{name} forgotten ({node.status}"
                             + (", its key dropped)" if drop else ")"), node=name,
                             key_id=node.key_id)
        self._publish_keys(keys)
        return matched

    # --- admin views -----------------------------------------------------------------------

    def node_list(self, pattern: str | None = None) -> list[dict[str, Any]]:
        names = sorted(self.nodes)
        if pattern:
            names = match_nodes(pattern, names)
        out = []
        for n in names:
            d = self.nodes[n].to_dict()
            k = self.keys.get(d["key"])
            if k is None or k.role != "node":  # listed, never targeted
                d["status"] = k.role if k is not None else "untrusted"
            out.append(d)
        return out

    def key_list(self) -> list[dict[str, Any]]:
        """The keys, as a shell can paste them: a key id, or ``curve:<hex>`` for a key known
        only by its CURVE key (a pending one: the handshake shows the hub nothing else)."""
        return [{"key": k.key_id if len(k.key_id) == 43 else curve_shown(k.key_id),
                 "role": k.role, "name": k.name, "fingerprint": self._fp(k.key_id),
                 "note": k.note, "expires": k.expires}
                for k in self.keys.values() if k.role not in ("used",)
                and not (k.role == "token" and (k.expires or 0) < time.time())]

    def key_action(self, action: str, pattern: str, role: str | None = None) -> list[KeyInfo]:
        """accept / reject / revoke keys chosen by key id, fingerprint, CURVE key (any form
        odium keys list shows: ``curve:<hex>``, or z85) whatever their role, or by a glob over
        their names (node keys; admin keys only with ``role="admin"``). Returns the keys acted
        on, as they were. Nothing changes unless the whole action can be done; every change is
        a ``key_<action>`` event. Never leaves the hub without an admin key.

        A pending key accepted by its key id becomes that key id at once; one accepted by its
        fingerprint or CURVE key stays a CURVE key, admitted on the query socket only, until
        its node's first signed request proves its key id (``key_bound``)."""
        if role not in (None, "node", "admin"):
            raise ConfigError(f"a key role to act on is 'node' or 'admin', not {role!r}")
        if action not in ("accept", "reject", "revoke"):
            raise ConfigError(f"a key action is accept, reject or revoke, not {action!r}")
        new_role = {"accept": "node", "reject": "rejected", "revoke": "revoked"}[action]
        pattern = pattern.strip()
        ids: set[str] = set()  # the keys named exactly (any role), if named so
        bind: dict[str, str] = {}  # a table entry known by its CURVE key -> its key id
        curve = curve_form(pattern)
        if curve is not None:
            ids = {curve} | {k for k in self.keys if len(k) == 43
                             and curve_public(k).decode() == curve}
        elif re.match(P.KEY_RE, pattern) and P.is_key_point(pattern):
            ids = {pattern}
            c = curve_public(pattern).decode()
            if c in self.keys and pattern not in self.keys:
                ids.add(c)
                bind[c] = pattern
        elif re.match(P.KEY_RE, pattern):
            if not any(k.name == pattern for k in self.keys.values()):  # (a node's name?)
                check_key_id(pattern)  # raises: it has a key's shape, but is not a key
        elif re.match(r"^[0-9a-f]{4}(:[0-9a-f]{4}){3}\Z", pattern):
            ids = {k.key_id for k in self.keys.values() if self._fp(k.key_id) == pattern}
            ids = ids or {pattern}  # (nothing has it: "no key matches")
        if ids:  # keys named exactly: whatever their role (if it is the one asked for)
            chosen = [k for k in self.keys.values() if k.key_id in ids
                      and (role is None or (k.role == "admin") == (role == "admin"))]
        else:  # names and globs: node keys, or admin keys when asked for by role
            chosen = [k for k in self.keys.values() if k.name and match_nodes(pattern, [k.name])
                      and (k.role == "admin") == (role == "admin")]
        chosen = [k for k in chosen if k.role not in ("used", "token")
                  and k.key_id != self.rt.ident.key_id]
        if action == "accept":
            chosen = [k for k in chosen if k.role in ("pending", "rejected", "revoked")]
        elif action == "reject":
            chosen = [k for k in chosen if k.role == "pending"]
        else:
            chosen = [k for k in chosen if k.role in ("node", "admin")]
        if not chosen:
            hint = "" if ids or role == "admin" else (
                " (names and globs choose node keys; for an admin key give its key id or "
                "--role admin)")
            raise OdiumError(f"no key to {action} matches {pattern!r}{hint}; see: odium keys list")
        admins = [k for k in self.keys.values()
                  if k.role == "admin" and k.key_id != self.rt.ident.key_id]
        if action != "accept" and admins and all(k in chosen for k in admins):
            last = admins[0]
            raise OdiumError(
                f"refused to {action} admin key {last.name or '?'} ({fingerprint(last.key_id)}): "
                "it is this hub's last admin key, the one odium commands use from its home, "
                "and you would be locked out; trust another admin key first")
        for k in chosen:  # all checked: now change
            kid = bind.get(k.key_id, k.key_id)
            if kid != k.key_id:  # a pending key named by its key id: it is that key now
                keys = dict(self.keys)
                del keys[k.key_id]
                self._publish_keys(keys)
                self._drop_key_row(k.key_id)
            self._set_key(KeyInfo(kid, new_role, k.name, None, k.note))
            self.store.event(f"key_{action}", f"{k.role} key {k.name or '?'} "
                             f"{self._fp(kid)}", key_id=kid if len(kid) == 43 else "")
            if action == "revoke":
                name = self.by_key.get(k.key_id)
                if name and name in self.nodes:
                    self._node_gone(self.nodes[name], "lost", "its key was revoked")
        if action == "revoke":
            self._rebind(("pub", "jobs", "results"))
        return chosen

    @staticmethod
    def _fp(key_id: str) -> str:
        return curve_fingerprint(key_id.encode()) if len(key_id) == 40 else fingerprint(key_id)

    def make_token(self, ttl: float = 3600.0) -> str:
        address = self.public_address()
        tok = Token.new(address, self.rt.ident.key_id, ttl)
        self._set_key(KeyInfo(tok.identity.key_id, "token", "", tok.expires, tok.token_id))
        self.store.event("token", f"join token issued, expires in {ttl:.0f} s")
        return tok.encode()

    def public_address(self) -> str:
        host = self.interface
        if host in ("*", "0.0.0.0"):
            host = pysocket.getfqdn()
        return f"tcp://{host}:{self.ports['query']}"

    def events(self, limit: int = 50) -> list[dict[str, Any]]:
        self.store.flush()
        return [{"ts": e.ts, "level": e.level, "kind": e.kind, "node": e.node, "key": e.key_id,
                 "detail": e.detail} for e in self.store.events(limit)]

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "interface": self.interface, "ports": self.ports,
                "key": self.rt.ident.key_id, "boot": self.boot}

    def write_info(self, home: Path) -> None:
        path = home / "hub.json"
        tmp = home / f".hub.json.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.info(), f)
        os.replace(tmp, path)

    def close(self) -> None:
        # every broadcast still waiting gets its answer: nobody waits on a hub that is gone
        for b in list(self.broadcasts.values()):
            for name in b.targets:
                if name not in b.results:
                    self._record(b, NodeResult(name, Status.LOST, state=self.nodes[name].state,
                                               error={"ename": "HubStopped",
                                                      "evalue": "the hub stopped before the "
                                                      "node answered", "traceback": ""}))
        if hasattr(self, "jobq"):
            self.jobq.close()
        for s in self.sockets.values():
            try:
                self.rt.loop.remove(s)
            except KeyError:
                pass
            s.close(linger=0)
        self.sockets.clear()
        self.zap.close()


_FROM = re.compile(rb'"from":"([A-Za-z0-9_-]{43})"')


def _refuse_reserved(name: str) -> None:
    if is_reserved_name(name):
        raise AuthError(f"node name {name!r} is reserved for the hub's own keys; choose another "
                        "--name")


def _wheels(wheelhouse: Path | None, limit: int = 8 * 1024 * 1024) -> dict[str, str]:
    """The wheels a hub offers syncing nodes (base64), from its wheelhouse directory."""
    out: dict[str, str] = {}
    if wheelhouse is None or not wheelhouse.is_dir():
        return out
    total = 0
    for f in sorted(wheelhouse.glob("*.whl")):
        data = f.read_bytes()
        total += len(data)
        if total > limit:
            raise OdiumError(f"wheels in {wheelhouse} exceed {limit} bytes; serve them from an "
                             "index the nodes can reach instead")
        out[f.name] = base64.b64encode(data).decode()
    return out


__all__ = ["HubCore", "match_nodes", "KeyRow"]
