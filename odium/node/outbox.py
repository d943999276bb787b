"""What a node sends its hub on the results socket (PUSH): at once when it can, and what must
not be lost (results, state reports) kept, in order, until it can go."""

from __future__ import annotations

from collections import deque
from typing import Any

import zmq

from ..core import wire as P


class Outbox:
    """The results socket's sender: ``push`` is the socket while the data sockets are open."""

    def __init__(self, sign: P.Signer, size: int = 100_000) -> None:
        self.sign = sign
        self.push: zmq.Socket[Any] | None = None
        self.kept: deque[bytes] = deque(maxlen=size)

    def send(self, type_: str, body: P.Body, keep: bool = False) -> None:
        """Send now; ``keep``: if it cannot go now, keep it (behind what is kept already)."""
        raw = self.sign(type_, body)
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
        raw = self.sign(type_, body)
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
