"""Typed dispatch: handlers registered by message type, each given the body as its own type.

Every socket's handlers, hub and node, live in one ``Dispatch``. Registering checks that the
handler's body type is the one the wire decodes for that message type (``wire.BODIES``), so a
handler never casts ``msg.body``; handling checks it again (a body is always of its type once
the wire has decoded it, but a check costs nothing and keeps a bug from becoming a confusion).

    queries: Dispatch[Asker] = Dispatch("query")
    queries.on("join", wire.Join, self._h_join)        # def _h_join(msg, body: Join, ask)
    queries.handle(msg, asker)                         # ProtocolError if no handler
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from ..errors import ProtocolError
from . import wire as P

B = TypeVar("B", bound=P.Body)
C = TypeVar("C")


class Dispatch(Generic[C]):
    """The handlers of one socket: message type -> (body type, handler(msg, body, ctx))."""

    def __init__(self, where: str) -> None:
        self.where = where
        self._handlers: dict[str, tuple[type[P.Body], Callable[[P.Message, Any, C], None]]] = {}

    def on(self, msg_type: str, body: type[B], handler: Callable[[P.Message, B, C], None]
           ) -> None:
        """Handle ``msg_type`` with ``handler``; ``body`` is the type the wire decodes it to."""
        if P.BODIES.get(msg_type) is not body:
            raise TypeError(f"{msg_type!r} carries {P.BODIES.get(msg_type)}, not {body}")
        if msg_type in self._handlers:
            raise ValueError(f"{msg_type!r} already has a handler on {self.where}")
        self._handlers[msg_type] = (body, handler)

    def update(self, other: Dispatch[C]) -> None:
        """Take another part's handlers (the job queue's, say) into this socket's."""
        for msg_type, (body, handler) in other._handlers.items():
            self.on(msg_type, body, handler)

    def replace(self, msg_type: str, handler: Callable[[P.Message, Any, C], None]
                ) -> Callable[[P.Message, Any, C], None]:
        """Put another handler in the place of ``msg_type``'s (a test's fault, a wrapper);
        returns the one it replaced."""
        body, old = self._handlers[msg_type]
        self._handlers[msg_type] = (body, handler)
        return old

    def __contains__(self, msg_type: object) -> bool:
        return msg_type in self._handlers

    def types(self) -> frozenset[str]:
        return frozenset(self._handlers)

    def handle(self, msg: P.Message, ctx: C) -> None:
        try:
            body_type, handler = self._handlers[msg.type]
        except KeyError:
            raise ProtocolError(f"no {msg.type!r} messages on {self.where}") from None
        if not isinstance(msg.body, body_type):
            raise ProtocolError(f"bad body for {msg.type!r}")
        handler(msg, msg.body, ctx)
