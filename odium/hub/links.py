"""What the hub's parts need from the process and from each other, as narrow interfaces.

The parts (key table, registry, broadcasts, syncs, job queue, sockets) never get the hub
itself: each gets the few things it uses, typed here. ``odium.runtime.Runtime`` is a
``HubRuntime``; the hub's sockets (``odium.hub.sockets.HubSockets``) are a ``Publisher`` and
a ``JobWire``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import zmq

from ..core import wire as P
from ..core.keys import Identity
from ..io.transport import Loop
from ..local.watch import StateWatch


class Timers(Protocol):
    """The loop, as the parts use it: run something later, or from another thread."""

    def call_later(self, delay: float, fn: Callable[[], None]) -> None: ...

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None: ...

    def every(self, interval: float, fn: Callable[[], None]) -> None: ...


class HubRuntime(Protocol):
    """What the hub uses of its process (``odium.runtime.Runtime``)."""

    @property
    def home(self) -> Path: ...

    @property
    def ident(self) -> Identity: ...

    @property
    def app(self) -> Path: ...

    @property
    def state(self) -> str: ...

    @property
    def ctx(self) -> zmq.Context[Any]: ...

    @property
    def loop(self) -> Loop: ...

    @property
    def sign(self) -> P.Signer: ...

    @property
    def watch(self) -> StateWatch: ...

    def notify(self) -> None: ...


T = TypeVar("T")


class HubHost(HubRuntime, Protocol):
    """What starting a hub uses of its process: run in its loop, and close with it."""

    def call(self, fn: Callable[[], T], timeout: float = 30.0) -> T: ...

    def own(self, what: str, close: Callable[[], None]) -> None: ...


class Publisher(Protocol):
    """The hub's PUB socket: every node hears a message; ``to`` names those it is for."""

    def publish(self, type_: str, body: P.Body, *, to: list[str] | None = None, seq: int = 0,
                msg_id: str | None = None) -> bytes: ...

    def publish_sealed(self, type_: str, body: P.Body, keys: list[str], to: list[str],
                       seq: int) -> bytes: ...

    def publish_to(self, name: str, type_: str, body: P.Body) -> None:
        """A message for one node, which only that node receives."""


class JobWire(Publisher, Protocol):
    """The job queue's sockets: batches on PUSH (sealed to the nodes that may run them; False
    when no node could take one now), acknowledgements and cancels on PUB."""

    def can_push(self) -> bool: ...

    def push_sealed(self, type_: str, body: P.Body, keys: list[str], msg_id: str) -> bool: ...


Reject = Callable[[str, str, Exception], None]  # (socket, sender's key id, why): logged


__all__ = ["HubHost", "HubRuntime", "JobWire", "Publisher", "Reject", "Timers"]
