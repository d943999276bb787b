"""What the node's parts are given: narrow interfaces onto the process's runtime and onto the
node's link to its hub (typing Protocols), never the NodeCore itself."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import zmq

from ..core import wire as P
from ..core.clock import Clock
from ..core.keys import Identity
from ..io.transport import Loop
from ..local.watch import StateWatch

T = TypeVar("T")


class NodeRuntime(Protocol):
    """What a node uses of its process's runtime (``odium.runtime.Runtime``)."""

    home: Path
    ident: Identity
    app: Path
    state: str
    sign: P.Signer
    clock: Clock  # the hub's time, once learnt (odium.core.clock)
    ctx: zmq.Context[Any]
    loop: Loop
    watch: StateWatch

    def notify(self) -> None: ...

    def call(self, fn: Callable[[], T], timeout: float = 30.0) -> T: ...

    def own(self, what: str, close: Callable[[], None]) -> None: ...


class Sends(Protocol):
    """Send a message to the hub on the results socket; ``keep``: kept until it can go."""

    def __call__(self, type_: str, body: P.Body, keep: bool = False) -> None: ...


class Asks(Protocol):
    """Ask the hub on the query socket: ``on_reply(data)`` gets the answer's data, ``on_error``
    (if given) what the hub's refusal said."""

    def __call__(self, type_: str, body: P.Body, on_reply: Callable[[Any], None],
                 on_error: Callable[[str], None] | None = None) -> None: ...


class HubLink(Protocol):
    """What the job queue's node side uses of the node's link to its hub."""

    name: str

    @property
    def registered(self) -> bool: ...

    @property
    def interval(self) -> float: ...

    @property
    def connected(self) -> bool: ...

    def open(self, raw: bytes) -> P.Message:
        """A message from the hub, verified (its signature, a replay) and decoded."""
        ...

    def open_sealed(self, msg: P.Message, where: str, then: Callable[[P.Message], None],
                    not_mine: Callable[[], None]) -> None:
        """Hand the inner message of a sealed one to ``then``, or call ``not_mine`` when it is
        not sealed to this node; one sealed to a group whose key this node lacks waits for
        the key (odium.node.groups)."""
        ...

    def heard(self, quietly: bool = False) -> None:
        """The hub was heard from (``quietly``: without saying it is reachable again)."""
        ...

    def send_now(self, type_: str, body: P.Body) -> bool:
        """Send at once if the hub is connected; False if it is not."""
        ...

    def failed(self, where: str, err: Exception) -> None:
        """One message failed: bad input is rejected, anything else reported."""
        ...




class Below(Protocol):
    """A relay's subtree as its node part's job slots see it (``odium.relayjobs``): jobs for
    instances below go to the relay's own job queue, which keeps them in its store."""

    def matches(self, nodes: str) -> bool: ...

    def take(self, spec: P.JobSpec, fn: str | None) -> None: ...

    def cancel(self, job_id: str) -> None: ...

    def capacity(self) -> int: ...

    def free(self) -> int: ...


__all__ = ["Asks", "Below", "HubLink", "NodeRuntime", "Sends"]
