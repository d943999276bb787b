"""Reading the hub's query and results sockets: each message opened (signature, replay, size),
its sender's key and role checked, and handed to its handler by type (``odium.core.dispatch``).

One bad message never stops the others read with it (``each_message``). Bad input is logged
within a budget (a flood must not fill the disk); a handler's own refusal (an OdiumError) is
only answered; anything else is a bug, logged with its traceback and answered as an error.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from ..core import wire as P
from ..core.dispatch import Dispatch
from ..core.guards import ReplayCache
from ..core.keys import curve_public, verify_key
from ..core.ratelimit import TokenBucket
from ..core.sealing import Keyring
from ..errors import AuthError, OdiumError, ProtocolError
from ..io.transport import each_message, peer_user_id, recv_frames
from .asking import Asker
from .keytable import ALLOWED_ROLES, KeyInfo, KeyTable
from .nodes import NodeInfo, Registry
from .sockets import HubSockets
from .store import Store

log = logging.getLogger(__name__)

# Which roles may send which message type, and on which socket.
QUERY_TYPES = {
    "join": ("token", "used"),  # used: the same join again (odium.hub.nodedesk)
    "register": ("node",),
    "fetch": ("node",),
    "group_key": ("node",),
    "ping": ("node", "admin"),
    "run": ("admin",),
    "interrupt": ("admin",),
    "nodes": ("admin",),
    "keys": ("admin",),
    "key": ("admin",),
    "token": ("admin",),
    "launch": ("admin",),
    "launch_note": ("admin",),
    "launches": ("admin",),
    "launch_stop": ("admin",),
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
RESULT_TYPES = {"node_hb": ("node",), "ack": ("node",), "output": ("node",),
                "result": ("node",), "bye": ("node",), "event": ("node",), "state": ("node",),
                "restarting": ("node",),
                "job_report": ("node",), "job_state": ("node",),
                "subtree": ("node",), "relayed": ("node",)}  # from relays (odium.hub.tree)
PART_ROOM = 64 * 1024  # bytes of a reply message beside its data (envelope, signature)
PART_CHARS = 2 * 1024 * 1024  # characters of JSON in one part: at most 8 MiB as it goes
_FROM = re.compile(rb'"from":"([A-Za-z0-9_-]{43})"')


class _Request:
    """The answer to one request on the query socket, sent at most once: ``reply(data)`` or
    ``reply(error=exc)``; what a query handler gets as ``ask.reply``."""

    __slots__ = ("wire", "keyring", "rid", "uid", "re", "type", "sent")

    def __init__(self, wire: HubSockets, keyring: Keyring, rid: bytes, uid: str) -> None:
        self.wire, self.keyring = wire, keyring
        self.rid, self.uid = rid, uid  # the connection and the key that asked
        self.re: str | None = None  # the request's message id, once known
        self.type = ""
        self.sent = False

    def __call__(self, data: Any = None, error: Exception | None = None,
                 sealed: bool = False) -> None:
        """``sealed``: the reply is readable only with the asker's key (odium.core.sealing)."""
        if self.sent:
            log.warning("a second answer to one %s request was dropped", self.type or "?")
            return
        wire = self.wire
        if error is not None:
            wire.send_query(self.rid, self.uid, "error",
                            P.ErrorReply(type(error).__name__, str(error)), self.re)
        elif sealed:  # (if this raises, nothing was sent: the dispatcher answers the error)
            wire.send_query(self.rid, self.uid, "sealed",
                            self.keyring.seal("reply", P.Reply(data), [self.uid]), self.re)
        else:
            self._send_reply(data)
        self.sent = True

    def _send_reply(self, data: Any) -> None:
        """A reply; one that would be over the message limit (``odium run`` on many nodes that
        printed much) goes as its JSON in parts, each a message within the limit, in order
        (``odium.api.admin`` puts them together): the asker's socket refuses a larger one."""
        text = P.encode_json(data)
        if len(text) + PART_ROOM <= P.MAX_MESSAGE:
            self.wire.send_query(self.rid, self.uid, "reply", P.Reply(data), self.re)
            return
        whole = text.decode()
        starts = range(0, len(whole), PART_CHARS)
        for i, start in enumerate(starts):
            part = {"part": i, "count": len(starts), "text": whole[start:start + PART_CHARS]}
            self.wire.send_query(self.rid, self.uid, "reply_part", P.Reply(part), self.re)


class Inbox:
    """The query and results sockets' readers, and their dispatch tables (``queries``,
    ``results``: every part's handlers, taken in with ``Dispatch.update``)."""

    def __init__(self, store: Store, keys: KeyTable, registry: Registry, wire: HubSockets,
                 keyring: Keyring, *, max_message: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.store, self.keys, self.registry, self.wire = store, keys, registry, wire
        self.keyring = keyring
        self.max_message = max_message
        self.replay = ReplayCache(clock=clock)
        self._bad_input_log = TokenBucket(50, 10)  # 50 lines, then 10 a second
        self.queries: Dispatch[Asker] = Dispatch("query")
        self.results: Dispatch[NodeInfo] = Dispatch("results")
        # sees every message from a node first; True: it took it (odium.hub.tree: answers that
        # go up through this hub, a relay)
        self.tap: Callable[[P.Message, NodeInfo, bytes], bool] | None = None

    def may_log_bad_input(self) -> bool:
        """May bad input be logged now? (A flood of it must not fill the disk.)"""
        return self._bad_input_log.take()

    def reject(self, where: str, uid: str, err: Exception) -> None:
        if self.may_log_bad_input():
            self.store.event("rejected", f"{where}: {err}", level="warning",
                             node=self.registry.by_key.get(uid, ""), key_id=uid)
            log.warning("rejected message on %s from %s: %s", where, uid[:12] or "?", err)

    # --- opening ---------------------------------------------------------------------------

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
        keys = self.keys.keys
        info = keys.get(uid)
        unbound = None
        if info is None and uid != link:
            unbound = keys.get(link)
            if unbound is not None and unbound.role == "node":
                info = KeyInfo(uid, "node", unbound.name, None, unbound.note)
        if info is None or info.role not in ALLOWED_ROLES and not (
                info.role == "used" and (info.expires or 0) >= time.time()):
            raise AuthError("sender's key is not trusted (revoked or unknown)")
        msg = P.open_message(frame.bytes, verify_key(uid), uid, max_size=self.max_message,
                             replay=self.replay)
        if unbound is not None:  # proven: the CURVE link and the signature are one key's
            self.keys.bind(link, info)
        return msg, info

    # --- the query socket ------------------------------------------------------------------

    def on_query(self) -> None:
        frames = newest_attempts(recv_frames(self.wire.sockets["query"]))
        each_message([(f, self._request(f)) for f in frames],
                     self._query, lambda fr, e: self._failed("query", fr[0][-1], e, fr[1]))

    def _request(self, frames: list[zmq.Frame]) -> _Request:
        """The answer-to-be of one request, for the connection and the CURVE key that sent it."""
        rid, uid = frames[0].bytes, self._uid(frames[-1])
        self.wire.peer(rid, uid)
        return _Request(self.wire, self.keyring, rid, uid)

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
        self.queries.handle(msg, Asker(info, reply))

    def _failed(self, where: str, frame: zmq.Frame, err: Exception,
                req: _Request | None = None) -> None:
        """One message failed: log it (rate-limited) and answer the requester, if any, with
        an error. Bad input is a ``rejected`` event; a handler's own refusal (another
        OdiumError) is only answered; anything else is a bug, logged with its traceback as a
        ``handler_failed`` event and answered as an OdiumError."""
        uid = peer_user_id(frame)
        if isinstance(err, (ProtocolError, AuthError)):
            self.reject(where, uid, err)
        elif not isinstance(err, OdiumError):
            what = req.type if req is not None and req.type else "a message"
            if self.may_log_bad_input():
                log.error("handling %s on %s from %s failed", what, where, uid[:12] or "?",
                          exc_info=err)
                self.store.event("handler_failed", f"{where}: {what}: {type(err).__name__}: "
                                 f"{err}", level="error",
                                 node=self.registry.by_key.get(uid, ""), key_id=uid)
            err = OdiumError(f"the hub failed to handle {what}: {type(err).__name__}: {err}")
        if req is not None and not req.sent:
            if req.re is None:  # name the request when we can read its id
                req.re = P.peek_id(frame.bytes)
            req(error=err)

    # --- the results socket ----------------------------------------------------------------

    def on_results(self) -> None:
        each_message(recv_frames(self.wire.sockets["results"]), self._result,
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
        node = self.registry.of_key(info.key_id)
        if node is None:
            raise AuthError("node has not registered")
        self.registry.seen(node, msg.env.state)
        if self.tap is not None and self.tap(msg, node, frames[-1].bytes):
            return
        self.results.handle(msg, node)


class _Peek(msgspec.Struct):
    """What says which request a message is, read without checking it (it is checked after)."""

    type: str = ""
    body: msgspec.Raw = msgspec.Raw(b"")


_peek = msgspec.json.Decoder(_Peek).decode
RETRIED = ("join", "register", "fetch")  # what a node asks again, the same, until answered


def newest_attempts(batch: list[list[zmq.Frame]]) -> list[list[zmq.Frame]]:
    """Of the attempts of one request (a node's join, register or fetch: the same type and
    body on the same connection) read in one batch, only the newest: the node takes an answer
    to any of its last attempts, and in a join storm the hub is behind by more than a retry,
    so that every request waits there two or three times over. Anything else, every time."""
    if len(batch) < 2:
        return batch
    last: dict[tuple[bytes, str, bytes], int] = {}
    keys: list[tuple[bytes, str, bytes] | None] = []
    for i, frames in enumerate(batch):
        key = None
        if len(frames) == 2:
            try:
                peek = _peek(frames[-1].buffer)
            except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
                peek = None
            if peek is not None and peek.type in RETRIED:
                key = (frames[0].bytes, peek.type, bytes(peek.body))
                last[key] = i
        keys.append(key)
    return [f for i, (f, k) in enumerate(zip(batch, keys, strict=True))
            if k is None or last[k] == i]


__all__ = ["Inbox", "QUERY_TYPES", "RESULT_TYPES", "newest_attempts"]
