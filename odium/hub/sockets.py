"""The hub's four CURVE server sockets: PUB (broadcasts, beats), query (ROUTER: requests and
their replies), jobs (PUSH: job batches) and results (PULL: what nodes send back).

Only here are the hub's messages put on the wire. Every socket is behind the same ZAP policy
(``odium.hub.keytable.KeyTable.zap``); ``rebind`` drops every connection of a socket so that
each peer must pass ZAP again (a key revoked meanwhile hears nothing more).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import zmq

from ..core import wire as P
from ..core.sealing import Keyring
from ..errors import OdiumError
from ..io.transport import ZapHandler, node_topic, server_socket
from .links import HubRuntime
from .store import Store

log = logging.getLogger(__name__)

SOCKET_KINDS = {"pub": zmq.PUB, "query": zmq.ROUTER, "jobs": zmq.PUSH, "results": zmq.PULL}


class HubSockets:
    """The sockets, bound on ``interface`` (``ports``: name -> port, 0 for any). Sockets that
    are read (``listen``) are read again after a rebind."""

    def __init__(self, rt: HubRuntime, store: Store, keyring: Keyring, zap: ZapHandler, *,
                 interface: str, ports: dict[str, int], max_message: int) -> None:
        self.rt, self.store, self.keyring, self.zap = rt, store, keyring, zap
        self.interface, self.max_message = interface, max_message
        self.ports: dict[str, int] = {}
        self.sockets: dict[str, zmq.Socket[Any]] = {}
        self._readers: dict[str, Callable[[], None]] = {}
        self.peers: OrderedDict[bytes, str] = OrderedDict()  # query routing id -> CURVE key id
        try:
            for name, kind in SOCKET_KINDS.items():
                s, p = self._bind(name, kind, ports[name])
                self.sockets[name], self.ports[name] = s, p
        except OdiumError:
            self.close()
            raise

    def _bind(self, name: str, kind: int, port: int) -> tuple[zmq.Socket[Any], int]:
        # no ROUTER_HANDOVER: a connection never takes over the routing id of another one
        return server_socket(self.rt.ctx, kind, self.rt.ident, self.zap, self.interface, port,
                             max_message=self.max_message, domain=f"odium.{name}".encode())

    def listen(self, name: str, fn: Callable[[], None]) -> None:
        """Call ``fn`` in the loop whenever socket ``name`` has messages."""
        self._readers[name] = fn
        self.rt.loop.add(self.sockets[name], fn)

    # --- sending ---------------------------------------------------------------------------

    def publish(self, type_: str, body: P.Body, *, to: list[str] | None = None, seq: int = 0,
                msg_id: str | None = None) -> bytes:
        raw = self.rt.sign(type_, body, to=to, seq=seq, msg_id=msg_id)
        self._send_pub([raw], type_)
        return raw

    def publish_to(self, name: str, type_: str, body: P.Body) -> None:
        """Publish a message for one node: only that node's SUB receives it (its topic),
        not every node's (a job acknowledgement reaching 1,000 nodes cost each of them)."""
        self._send_pub([node_topic(name), self.rt.sign(type_, body, to=[name])], type_)

    def _send_pub(self, frames: list[bytes], type_: str) -> None:
        pub = self.sockets.get("pub")
        if pub is None:  # being rebound: nodes catch up over fetch
            return
        try:
            pub.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:  # high-water mark: nodes catch up over fetch
            log.warning("PUB queue full; %s dropped", type_)

    def publish_sealed(self, type_: str, body: P.Body, keys: list[str], to: list[str],
                       seq: int) -> bytes:
        """Publish a message whose body only ``keys`` can read (odium.core.sealing): the keys
        of the nodes ``to`` names, one each, so the message is for every reader and need not
        name them (to 1,000 nodes, their names were most of it)."""
        if len(keys) != len(to):
            raise ValueError(f"{len(keys)} keys for {len(to)} nodes")
        return self.publish("sealed", self.keyring.seal(type_, body, keys, to=to, reuse=True,
                                                        every_reader=True), seq=seq)

    def can_push(self) -> bool:
        return "jobs" in self.sockets

    def push_sealed(self, type_: str, body: P.Body, keys: list[str], msg_id: str) -> bool:
        """Push a message sealed to ``keys`` to one connected node; False if none takes it."""
        sock = self.sockets.get("jobs")
        if sock is None:
            return False
        announcement = self.keyring.announcement(keys)
        if announcement is not None:  # the readers' key, for them all at once: a batch
            self.publish("group", announcement)  # reaches only one of them
        raw = self.rt.sign("sealed", self.keyring.seal(type_, body, keys, reuse=True),
                           msg_id=msg_id)
        try:
            sock.send(raw, zmq.NOBLOCK)
        except zmq.Again:  # no node connected on the jobs socket (yet)
            return False
        return True

    def peer(self, rid: bytes, uid: str) -> None:
        """The CURVE identity that last spoke on a routing id (bounded)."""
        peers = self.peers
        if peers.get(rid) != uid:
            peers[rid] = uid
            peers.move_to_end(rid)
            while len(peers) > 100_000:
                peers.popitem(last=False)

    def send_query(self, rid: bytes, uid: str, type_: str, body: P.Body,
                   re: str | None) -> None:
        """Send on the query socket to the connection that asked, if it is still the identity
        that asked: a routing id never carries a reply to another CURVE key."""
        if self.peers.get(rid) != uid:
            log.warning("reply to %s dropped: its connection is gone", uid[:12] or "?")
            return
        raw = self.rt.sign(type_, body, re=re)
        try:
            self.sockets["query"].send_multipart([rid, raw], zmq.NOBLOCK)
        except zmq.Again:
            log.warning("query reply dropped: peer not reading")

    # --- rebinding, closing ----------------------------------------------------------------

    def rebind(self, names: tuple[str, ...] = ("pub", "jobs"), tries: int = 100) -> None:
        """Drop every connection on these sockets and listen again on the same ports: each peer
        reconnects through ZAP, so a key revoked meanwhile hears nothing more."""
        for name in names:
            s = self.sockets.pop(name, None)
            if s is not None:
                if name in self._readers:
                    self.rt.loop.remove(s)
                s.close(linger=0)
        left = []
        for name in names:
            try:
                s, _ = self._bind(name, SOCKET_KINDS[name], self.ports[name])
                self.sockets[name] = s
                if name in self._readers:
                    self.rt.loop.add(s, self._readers[name])
            except OdiumError:
                left.append(name)  # the old socket still holds the port for a moment
        if left and tries > 0:
            self.rt.loop.call_later(0.02, lambda: self.rebind(tuple(left), tries - 1))
        elif left:
            self.store.event("error", f"could not listen again on {left}", level="error")

    def close(self) -> None:
        for s in self.sockets.values():
            try:
                self.rt.loop.remove(s)
            except KeyError:
                pass
            s.close(linger=0)
        self.sockets.clear()


__all__ = ["HubSockets", "SOCKET_KINDS"]
