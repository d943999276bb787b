"""A node's data sockets, open while it is registered: SUB (the hub's PUB), PUSH (the results
socket, the outbox's) and PULL (the jobs socket, the job queue's)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import zmq

from ..io.transport import client_socket, pub_topics
from .link import Link
from .outbox import Outbox
from .ports import NodeRuntime


class JobsSocket(Protocol):
    """The job queue's side of the jobs socket."""

    def attach(self, pull: zmq.Socket[Any]) -> None: ...

    def detach(self) -> None: ...

    def results_up(self) -> None: ...


class DataSockets:
    """Opened with the ports a register reply names; ``on_pub``: something came on SUB."""

    def __init__(self, rt: NodeRuntime, host: str, hub_key: str, link: Link, outbox: Outbox,
                 jobs: JobsSocket, on_pub: Callable[[], None]) -> None:
        self.rt = rt
        self.host = host
        self.hub_key = hub_key
        self.link = link
        self.outbox = outbox
        self.jobs = jobs
        self.on_pub = on_pub
        self.sub: zmq.Socket[Any] | None = None
        self.pull: zmq.Socket[Any] | None = None
        link.on_data_up = self._up

    def _up(self, what: str) -> None:
        """A data socket's handshake is done: what waited for the results socket (a result
        right after ready, the job state) goes now, not at the next tick."""
        if what == "results":
            self.outbox.flush()
            self.jobs.results_up()

    def _endpoint(self, port: int) -> str:
        return f"tcp://{self.host}:{port}"

    def open(self, ports: dict[str, int], name: str) -> None:
        """Connect the data sockets to the ports the hub named (``name``: this node's, on the
        hub's PUB)."""
        if self.sub is not None:
            return
        ctx, ident, key = self.rt.ctx, self.rt.ident, self.hub_key
        watch = self.link.watch  # (each before it connects: its first handshake is heard)
        self.sub = client_socket(ctx, zmq.SUB, ident, key, self._endpoint(ports["pub"]),
                                 topics=pub_topics(name), watch=lambda s: watch(s, "pub"))
        push = client_socket(ctx, zmq.PUSH, ident, key, self._endpoint(ports["results"]),
                             immediate=True, watch=lambda s: watch(s, "results"))
        self.outbox.push = push
        self.pull = client_socket(ctx, zmq.PULL, ident, key, self._endpoint(ports["jobs"]),
                                  watch=lambda s: watch(s, "jobs"))
        self.jobs.attach(self.pull)
        self.rt.loop.add(self.sub, self.on_pub)

    def close(self) -> None:
        """Close them at once (the hub no longer trusts this key); registering opens them
        again."""
        for what in ("pub", "results", "jobs"):
            self.link.unwatch(what)
        for sk in (self.sub, self.outbox.push, self.pull):
            if sk is not None:
                try:
                    self.rt.loop.remove(sk)
                except KeyError:
                    pass
                sk.close(linger=0)
        self.sub = self.outbox.push = self.pull = None
        self.jobs.detach()


__all__ = ["DataSockets", "JobsSocket"]
