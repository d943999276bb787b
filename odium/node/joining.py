"""A node's join: its key admitted by the hub with a one-time token, asked on a socket of the
token's own key; the node says so if the hub takes long, and stops if the token expires."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import zmq

from ..core import wire as P
from ..core.keys import Token, join_proof_bytes
from ..errors import AuthError, OdiumError
from ..io.transport import client_socket
from .link import Link
from .ports import NodeRuntime
from .requests import Requests

log = logging.getLogger(__name__)

JOIN_PATIENCE = 15.0  # seconds without an answer to a join before the node says so


class Joiner:
    """The join of the node called ``name`` with ``token``. ``on_answer(sock)``: something came
    on the join socket (the node reads answers as on its query socket); ``fail(err)``: stop the
    node; ``joined()``: the key is admitted (the join socket is closed by then)."""

    def __init__(self, rt: NodeRuntime, address: str, hub_key: str, name: str, token: Token,
                 requests: Requests, link: Link, on_answer: Callable[[zmq.Socket[Any]], None],
                 fail: Callable[[OdiumError], None], joined: Callable[[], None]) -> None:
        self.rt, self.address, self.hub_key, self.name = rt, address, hub_key, name
        self.token = token
        self.requests, self.link = requests, link
        self.fail, self.joined = fail, joined
        tok = token.identity
        self.sign: P.Signer | None = P.Signer(tok.signing, tok.key_id, lambda: rt.state,
                                              rt.clock)
        self.sock: zmq.Socket[Any] | None = client_socket(
            rt.ctx, zmq.DEALER, tok, hub_key, address, watch=lambda s: link.watch(s, "join"))
        js = self.sock
        rt.loop.add(js, lambda: on_answer(js))

    def start(self) -> None:
        token, js = self.token, self.sock
        assert js is not None
        self.rt.loop.call_later(JOIN_PATIENCE, self._overdue)
        proof = self.rt.ident.sign(join_proof_bytes(token.token_id, self.hub_key))
        self.requests.ask(js, "join", P.Join(token.token_id, self.rt.ident.key_id, self.name,
                                             proof), self._joined)

    def refused(self) -> None:
        """The hub refused the join socket's handshake: the token is no good."""
        self.fail(AuthError(f"the hub at {self.address} refused this join token: it was used "
                            "already or has expired; ask for a new one (odium token)"))

    def _overdue(self) -> None:
        if self.sock is None:
            return
        if self.rt.clock() > self.token.expires:  # (the hub's time, once known)
            self.fail(AuthError("the join token has expired; ask for a new one (odium token)"))
        else:
            log.warning("no answer from the hub at %s yet; still trying", self.address)
            self.rt.loop.call_later(JOIN_PATIENCE, self._overdue)

    def _joined(self, _data: Any) -> None:
        self.link.unwatch("join")
        self.sign = None  # the token is spent: forget it
        if self.sock is not None:
            self.rt.loop.remove(self.sock)
            self.requests.forget(self.sock)
            self.sock.close(linger=0)
            self.sock = None
        self.joined()


__all__ = ["JOIN_PATIENCE", "Joiner"]
