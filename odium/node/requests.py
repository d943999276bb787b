"""A node's requests to its hub on the query (or join) socket: each is sent again until it is
answered, ever more patiently (a slow link takes seconds to answer), and an answer to any of
its attempts is the answer (the first wins; the others are dropped).

Answers also tell the node its hub's time: every answer is stamped and signed by the hub, and
is matched to an attempt whose sending time is known (``odium.core.clock``). A request the hub
refused because its timestamp was off (``ClockError``: this machine's clock is wrong) is asked
again at once, stamped with the hub's time just learnt.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from ..core import wire as P
from ..core.clock import Clock
from ..core.dispatch import Dispatch

# A request waits for its answer this long before it is sent again; then twice as long, ...
# What goes on a socket while its connection is being made waits in libzmq's queue and goes
# when it is made; on a connection that stands TCP loses nothing; one that breaks sends again
# at once when it is made anew (``connected``). So the hub is only slow (a join storm: sent
# again every 2 s while thousands of handshakes waited, each request reached the hub two or
# three times over, and each was more work for it) ...
STEADY_RETRY = 10.0
RETRY_MAX = 30.0  # ... up to this
# ... except after a handshake the hub refused: that loses what waited (libzmq gives the
# connection up), and the socket is opened anew. Sooner then, and never less often than
# REFUSED_RETRY_MAX: a key waits pending until someone runs `odium keys accept` there, and
# the node should come in seconds after that, not half a minute
REQUEST_RETRY = 2.0
REFUSED_RETRY_MAX = 4.0
ATTEMPTS_KEPT = 8  # attempts of one request whose answers still count
CLOCK_RETRIES = 3  # times a request refused for its timestamp is asked again at once


@dataclass
class Request:
    type: str
    body: P.Body
    on_reply: Callable[[Any], None]
    sent: float  # monotonic: when the newest attempt went out
    sock: zmq.Socket[Any]
    on_error: Callable[[str], None] | None = None
    attempts: dict[str, float] = field(default_factory=dict)  # message id -> when sent
    tries: int = 0  # attempts so far
    clock_retries: int = 0
    steady: bool = False  # the newest attempt went on a connection known to stand
    refused: bool = False  # the hub refused the handshake of the socket it went on

    def due(self) -> float:
        """When the next attempt is due (monotonic)."""
        if self.refused and not self.steady:  # (once a connection stands, it counts no more)
            return self.sent + min(REQUEST_RETRY * 2 ** max(self.tries - 1, 0),
                                   REFUSED_RETRY_MAX)
        return self.sent + min(STEADY_RETRY * 2 ** max(self.tries - 1, 0), RETRY_MAX)


class Requests:
    """The requests waiting for an answer.

    ``signer(sock)``: what signs on that socket (None: nothing more may be sent on it);
    ``on_refused(request, error)``: the hub answered with an error; ``clock``: the node's
    clock, which learns the hub's time from every answer."""

    def __init__(self, signer: Callable[[zmq.Socket[Any]], P.Signer | None],
                 on_refused: Callable[[Request, P.ErrorReply], None],
                 clock: Clock | None = None) -> None:
        self.signer = signer
        self.clock = clock
        self.waiting: dict[str, Request] = {}  # every kept attempt's id -> its request
        self.steady: set[zmq.Socket[Any]] = set()  # connected, and not broken since
        self.broken: set[zmq.Socket[Any]] = set()  # disconnected, not yet connected again
        self.replies: Dispatch[Request] = Dispatch("query")
        self.replies.on("reply", P.Reply, lambda _m, body, req: req.on_reply(body.data))
        self.replies.on("error", P.ErrorReply, lambda _m, body, req: on_refused(req, body))

    def ask(self, sock: zmq.Socket[Any], type_: str, body: P.Body,
            on_reply: Callable[[Any], None],
            on_error: Callable[[str], None] | None = None) -> None:
        self.again(Request(type_, body, on_reply, time.monotonic(), sock, on_error))

    def again(self, req: Request, sock: zmq.Socket[Any] | None = None) -> None:
        """Send another attempt of ``req`` (on ``sock``, when its socket was opened anew:
        the attempts made on the old one can no longer be answered). Whether its handshake
        is refused is for ``refused`` to say, when the hub refuses it."""
        req.refused = False
        if sock is not None and sock is not req.sock:
            self._drop(req)
            req.sock = sock
        sign = self.signer(req.sock)
        if sign is None:  # the join is done and its token forgotten: nothing more to send
            self._drop(req)
            return
        mid = P.new_id()
        raw = sign(req.type, req.body, msg_id=mid)
        req.sent, req.tries = time.monotonic(), req.tries + 1
        req.steady = req.sock in self.steady
        req.attempts[mid] = req.sent
        while len(req.attempts) > ATTEMPTS_KEPT:
            self.waiting.pop(next(iter(req.attempts)), None)
            del req.attempts[next(iter(req.attempts))]
        self.waiting[mid] = req
        try:
            req.sock.send(raw, zmq.NOBLOCK)
        except zmq.Again:
            pass  # sent again when due

    def answer(self, msg: P.Message) -> None:
        """An answer (opened; its timestamp not yet judged): to the request it answers, if that
        still waits. It tells the clock the hub's time."""
        mid = msg.env.re or ""
        req = self.waiting.get(mid)
        if req is None:
            return  # an answer to a request answered already (or forgotten)
        if self.clock is not None:
            self.clock.learn(msg.env.ts, req.attempts[mid], time.monotonic())
        if (isinstance(msg.body, P.ErrorReply) and msg.body.kind == "ClockError"
                and req.clock_retries < CLOCK_RETRIES and self.clock is not None):
            req.clock_retries += 1  # stamped with the hub's time now: at once, once more
            self.again(req)
            return
        self._drop(req)
        for other in self._requests():  # asked twice
            if other.type == req.type and other.sock is req.sock:
                self._drop(other)
        self.replies.handle(msg, req)

    def _drop(self, req: Request) -> None:
        for mid in req.attempts:
            if self.waiting.get(mid) is req:
                del self.waiting[mid]
        req.attempts.clear()

    def pending(self, type_: str) -> bool:
        """Whether a request of this type waits for its answer."""
        return any(r.type == type_ for r in self.waiting.values())

    def forget(self, sock: zmq.Socket[Any]) -> None:
        """The socket is closed: its requests are never answered."""
        self.steady.discard(sock)
        self.broken.discard(sock)
        for req in self._requests():
            if req.sock is sock:
                self._drop(req)

    def refused(self, sock: zmq.Socket[Any]) -> None:
        """The hub refused the handshake of ``sock``: what waits on it is lost with it, and is
        asked again soon (on a socket opened anew), not after the usual wait."""
        for req in self._requests():
            if req.sock is sock:
                req.refused, req.steady = True, False

    def connected(self, sock: zmq.Socket[Any], up: bool) -> None:
        """A socket's connection was made (its handshake done) or broken. Made again after a
        break: what waits on it is sent again now (its attempts, or their answers, may have
        gone with the old connection)."""
        if not up:
            self.steady.discard(sock)
            self.broken.add(sock)
            return
        self.steady.add(sock)
        again = sock in self.broken
        self.broken.discard(sock)
        for req in self._requests():
            if req.sock is sock:
                if again:
                    self.again(req)
                else:  # sent before the first connection: it goes on this one, which stands
                    req.steady = True

    def overdue(self, now: float) -> list[Request]:
        """The requests whose next attempt is due (they keep waiting: the caller sends the
        attempt with ``again``)."""
        return [r for r in self._requests() if now >= r.due()]

    def _requests(self) -> list[Request]:
        """Each request waiting, once (``waiting`` holds it under every attempt's id)."""
        return list({id(r): r for r in self.waiting.values()}.values())


__all__ = ["REQUEST_RETRY", "Request", "Requests"]
