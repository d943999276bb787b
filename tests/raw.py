"""Raw clients for the security tests: hand-made frames on real CURVE sockets, handshake watching.

A ``Raw`` is one socket on one of a hub's four ports, made by
``odium.io.transport.client_socket`` (or, for ``ident=None``, a plain socket with no
CURVE at all), with a socket monitor attached before it connects so a test can
wait for the handshake's outcome instead of guessing with a sleep.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

import odium
from odium.core import wire as P
from odium.core.keys import Identity, verify_key
from odium.io.transport import client_socket

# hub socket name -> the kind of socket a client uses on it
CLIENT_KINDS = {"pub": zmq.SUB, "query": zmq.DEALER, "jobs": zmq.PULL, "results": zmq.PUSH}

OUTCOMES = {
    zmq.EVENT_HANDSHAKE_SUCCEEDED: "ok",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "failed",
}
STATE = "unknown"  # the state id raw clients claim


@dataclass
class Target:
    """What a Raw client needs of a server: its key and ports (an odium.Hub has both)."""

    key: str
    ports: dict[str, int]


def endpoint(hub: odium.Hub | Target, name: str) -> str:
    return f"tcp://127.0.0.1:{hub.ports[name]}"


class Raw:
    """One raw client socket on one hub socket, with a handshake monitor."""

    def __init__(self, ctx: zmq.Context[Any], hub: odium.Hub | Target, name: str,
                 ident: Identity | None, *, server_key: str | None = None,
                 routing_id: bytes | None = None) -> None:
        self.hub_key = hub.key
        self.ident = ident
        self.endpoint = endpoint(hub, name)
        kind = CLIENT_KINDS[name]
        if ident is None:  # no CURVE at all
            self.sock = ctx.socket(kind)
            self.sock.linger = 0
            if kind == zmq.SUB:
                self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        else:
            # client_socket connects at once: let it connect to an inproc endpoint nobody binds
            # (no handshake), then attach the monitor and connect for real, so that every
            # handshake event the monitor sees belongs to this one TCP endpoint
            nowhere = f"inproc://nowhere-{uuid.uuid4().hex}"
            self.sock = client_socket(ctx, kind, ident, server_key or hub.key, nowhere,
                                      routing_id=routing_id)
            self.sock.disconnect(nowhere)
        self.mon = self.sock.get_monitor_socket(addr=f"inproc://mon-{uuid.uuid4().hex}")
        self.sock.connect(self.endpoint)
        self.vk = verify_key(hub.key)

    def handshake(self, timeout: float = 15.0) -> str:
        """The outcome of the next handshake: ok, auth, protocol or failed."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no handshake on {self.endpoint} within {timeout} s")
            if self.mon.poll(int(left * 1000) + 1):
                ev = recv_monitor_message(self.mon)
                if ev["event"] in OUTCOMES:
                    return OUTCOMES[ev["event"]]

    def send(self, data: bytes | list[bytes]) -> bool:
        """Queue data without blocking; False if the socket would not take it (a refused
        handshake leaves a DEALER or PUSH with no peer to queue for)."""
        try:
            if isinstance(data, list):
                self.sock.send_multipart(data, zmq.NOBLOCK)
            else:
                self.sock.send(data, zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def recv(self, timeout: float) -> bytes | None:
        """The next message (its last frame: one for a single node on PUB has its topic
        first, odium.io.transport.node_topic)."""
        if self.sock.poll(int(timeout * 1000)):
            return self.sock.recv_multipart()[-1]
        return None

    def pending(self) -> list[bytes]:
        """Everything already received, without waiting."""
        out = []
        while self.sock.poll(0):
            out.append(self.sock.recv_multipart()[-1])
        return out

    def reply(self, timeout: float = 5.0) -> P.Message:
        """The next answer on the query socket, verified as the hub's."""
        raw = self.recv(timeout)
        if raw is None:
            raise AssertionError(f"no answer from the hub within {timeout} s")
        return P.open_message(raw, self.vk, self.hub_key)

    def request(self, data: bytes | list[bytes], timeout: float = 5.0) -> P.Message:
        self.send(data)
        return self.reply(timeout)

    def seal(self, type_: str, body: P.Body, **kw: Any) -> bytes:
        assert self.ident is not None
        return seal(self.ident, type_, body, **kw)

    def ping(self, timeout: float = 5.0) -> P.Message:
        """A good ping; returns the hub's reply after checking it answers this ping."""
        mid = P.new_id()
        msg = self.request(self.seal("ping", P.Empty(), msg_id=mid), timeout)
        assert (msg.type, msg.env.re) == ("reply", mid), msg
        return msg


def seal(ident: Identity, type_: str, body: P.Body, **kw: Any) -> bytes:
    return P.seal(ident.signing, ident.key_id, STATE, type_, body, **kw)


def sign_open(ident: Identity, head: bytes) -> bytes:
    """Sign ``head + b"}"`` and return the wire form ``head,"sig":"…"}`` (any bytes at all)."""
    sig = ident.signing.sign(head + b"}").signature
    return head + b',"sig":"' + P.b64url(sig).encode() + b'"}'


def envelope(ident: Identity, type_: str, body: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A well-formed envelope as a dict, to be spoiled by a test and signed with ``craft``."""
    env: dict[str, Any] = {"v": P.VERSION, "type": type_, "id": P.new_id(),
                           "from": ident.key_id, "ts": time.time(), "state": STATE,
                           "body": body}
    env.update(fields)
    return env


def craft(ident: Identity, env: dict[str, Any]) -> bytes:
    """Sign an arbitrary envelope dict the way the protocol signs (canonical JSON)."""
    raw = P.encode_json(env)
    assert raw.endswith(b"}")
    return sign_open(ident, raw[:-1])


def events(hub: odium.Hub, kind: str | None = None) -> list[dict[str, Any]]:
    return [e for e in hub.log(10_000) if kind is None or e["kind"] == kind]
