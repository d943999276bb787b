"""What a node sends its hub on the results socket (PUSH): at once when it can, and what must
not be lost (results, state reports) kept, in order, until it can go."""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import zmq

from ..core import wire as P

log = logging.getLogger(__name__)


class Outbox:
    """The results socket's sender: ``push`` is the socket while the data sockets are open."""

    def __init__(self, sign: P.Signer, size: int = 100_000,
                 limit: int = P.MAX_MESSAGE) -> None:
        self.sign = sign
        self.push: zmq.Socket[Any] | None = None
        self.kept: deque[bytes] = deque(maxlen=size)
        self.limit = limit  # bytes of one message: the hub refuses a larger one

    def _signed(self, type_: str, body: P.Body) -> bytes:
        """The message as it goes, checked against the limit: one over it (the hub would
        refuse it, or drop the link) goes as an ``event`` saying so, never silently."""
        raw = self.sign(type_, body)
        if len(raw) <= self.limit:
            return raw
        detail = (f"a message of type {type_!r} ({len(raw)} bytes) is over the limit of "
                  f"{self.limit} bytes of one message: it was not sent")
        log.error("%s", detail)
        return self.sign("event", P.NodeEvent("too_large", detail, "error"))

    def send(self, type_: str, body: P.Body, keep: bool = False) -> None:
        """Send now; ``keep``: if it cannot go now, keep it (behind what is kept already)."""
        raw = self._signed(type_, body)
        if self.push is None:
            if keep:
                self.kept.append(raw)
            return
        if self.kept and keep:
            self.kept.append(raw)
            return
        try:
            self.push.send(raw, zmq.NOBLOCK)
        except zmq.Again:
            if keep:
                self.kept.append(raw)

    def send_now(self, type_: str, body: P.Body) -> bool:
        """Send now if the hub is connected (PUSH with IMMEDIATE); False if it is not."""
        if self.push is None:
            return False
        raw = self._signed(type_, body)
        try:
            self.push.send(raw, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def flush(self) -> None:
        """Send what was kept, as far as it goes now."""
        while self.kept and self.push is not None:
            try:
                self.push.send(self.kept[0], zmq.NOBLOCK)
            except zmq.Again:
                return
            self.kept.popleft()


__all__ = ["Outbox"]
