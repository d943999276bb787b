"""A node's requests to its hub on the query (or join) socket: each is sent again until it is
answered, the first answer wins, and its retries' twins are dropped."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from ..core import wire as P
from ..core.dispatch import Dispatch

REQUEST_RETRY = 2.0  # seconds before a query is sent again


@dataclass
class Request:
    type: str
    body: P.Body
    on_reply: Callable[[Any], None]
    sent: float
    sock: zmq.Socket[Any]
    on_error: Callable[[str], None] | None = None


class Requests:
    """The requests waiting for an answer.

    ``signer(sock)``: what signs on that socket (None: nothing more may be sent on it);
    ``on_refused(request, error)``: the hub answered with an error."""

    def __init__(self, signer: Callable[[zmq.Socket[Any]], P.Signer | None],
                 on_refused: Callable[[Request, P.ErrorReply], None]) -> None:
        self.signer = signer
        self.waiting: dict[str, Request] = {}
        self.replies: Dispatch[Request] = Dispatch("query")
        self.replies.on("reply", P.Reply, lambda _m, body, req: req.on_reply(body.data))
        self.replies.on("error", P.ErrorReply, lambda _m, body, req: on_refused(req, body))

    def ask(self, sock: zmq.Socket[Any], type_: str, body: P.Body,
            on_reply: Callable[[Any], None],
            on_error: Callable[[str], None] | None = None) -> None:
        sign = self.signer(sock)
        if sign is None:  # the join is done and its token forgotten: nothing more to send
            return
        mid = P.new_id()
        raw = sign(type_, body, msg_id=mid)
        self.waiting[mid] = Request(type_, body, on_reply, time.monotonic(), sock, on_error)
        try:
            sock.send(raw, zmq.NOBLOCK)
        except zmq.Again:
            pass  # retried by the tick

    def answer(self, msg: P.Message) -> None:
        """An answer (opened): to the request it answers, if that still waits."""
        req = self.waiting.pop(msg.env.re or "", None)
        if req is None:
            return  # answer to a request we already retried
        for mid, other in list(self.waiting.items()):  # drop retries' twins
            if other.type == req.type and other.sock is req.sock:
                del self.waiting[mid]
        self.replies.handle(msg, req)

    def pending(self, type_: str) -> bool:
        """Whether a request of this type waits for its answer."""
        return any(r.type == type_ for r in self.waiting.values())

    def forget(self, sock: zmq.Socket[Any]) -> None:
        """The socket is closed: its requests are never answered."""
        for mid, req in list(self.waiting.items()):
            if req.sock is sock:
                del self.waiting[mid]

    def overdue(self, now: float) -> list[Request]:
        """The requests unanswered for REQUEST_RETRY, taken out: the caller sends them again."""
        late = [(mid, req) for mid, req in self.waiting.items() if now - req.sent > REQUEST_RETRY]
        for mid, _req in late:
            del self.waiting[mid]
        return [req for _mid, req in late]


__all__ = ["REQUEST_RETRY", "Request", "Requests"]
