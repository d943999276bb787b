"""What the hub acknowledges is on disk: its store commits with ``synchronous=FULL``, and a job's
result is acknowledged to the node (which then forgets it) only once the write that holds it
has committed, never when that write failed.

The node is a raw one (tests/raw.py) with a real trusted key on real CURVE sockets, so that
the test sees every acknowledgement the hub publishes, and when.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zmq
from sqlalchemy.orm import Session

import odium
from odium.core import wire as P
from odium.core.keys import Identity
from odium.core.sealing import Keyring, UnknownGroup, open_inner
from odium.io.transport import pub_topics

from .conftest import wait_until
from .raw import Raw, seal


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[odium.Hub]:
    """A hub with a 1 s heartbeat: the raw node, which beats only when told, stays alive."""
    with odium.Hub(tmp_path / "hub", ports=0, hb_interval=1.0, app=tmp_path) as h:
        yield h


def writer_pragma(hub: odium.Hub, name: str) -> Any:
    """A pragma as the store's writer thread sees it, on the connection it commits with."""
    got: list[Any] = []
    hub.core.store.write(lambda s: got.append(
        s.connection().exec_driver_sql(f"PRAGMA {name}").scalar()))
    hub.core.store.flush()
    return got[0]


def test_store_commits_with_synchronous_full(hub: odium.Hub) -> None:
    assert writer_pragma(hub, "journal_mode") == "wal"
    assert writer_pragma(hub, "synchronous") == 2  # FULL: the log is synced at every commit
    with hub.core.store.engine.connect() as c:  # and every other connection of the store
        assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 2


@dataclass
class RawNode:
    """A raw node that registered, said it is ready with one free job slot, and listens on
    PUB (for job_ack) and on the jobs socket."""

    ident: Identity
    name: str
    boot: str
    push: Raw
    sub: Raw
    pull: Raw
    heard: list[P.Message] = field(default_factory=list)  # everything read on PUB

    def _next_on_pub(self, deadline: float) -> P.Message | None:
        raw = self.sub.recv(max(deadline - time.monotonic(), 0.0))
        if raw is None:
            return None
        self.heard.append(P.open_message(raw, self.sub.vk, self.sub.hub_key))
        return self.heard[-1]

    def batch(self, timeout: float = 10.0) -> tuple[str, P.JobBatch]:
        """The next job batch: its id and its body."""
        raw = self.pull.recv(timeout)
        assert raw is not None, "no job batch reached the node"
        outer = P.open_message(raw, self.pull.vk, self.pull.hub_key)
        ring = Keyring(self.ident)
        while True:
            try:
                msg = open_inner(ring, outer, "jobs")  # sealed to this node
                break
            except UnknownGroup:  # the readers' key comes on PUB (after other groups' maybe)
                ring.learn(self.pull.hub_key, self._announcement(timeout))
        assert msg is not None and msg.type == "job_batch", outer
        return msg.env.id, msg.body  # type: ignore[return-value]

    def _announcement(self, timeout: float) -> P.Sealed:
        """The group of readers' key the hub published before its first batch to them."""
        deadline = time.monotonic() + timeout
        while (msg := self._next_on_pub(deadline)) is not None:
            if msg.type == "group":
                return msg.body  # type: ignore[return-value]
        raise AssertionError("no group announcement before the batch")

    def report(self, batch_id: str, outcome: P.JobOutcome) -> None:
        assert self.push.send(seal(self.ident, "job_report", P.JobReport(
            [batch_id], [outcome.id], [], [outcome], free=1)))

    def ack(self, timeout: float) -> list[str] | None:
        """The job ids of the next job_ack for this node within ``timeout`` s, else None."""
        deadline = time.monotonic() + timeout
        while (msg := self._next_on_pub(deadline)) is not None:
            if msg.type == "job_ack" and self.name in msg.body.acks:  # type: ignore[attr-defined]
                return list(msg.body.acks[self.name])  # type: ignore[attr-defined]
        return None


@pytest.fixture
def node(hub: odium.Hub, zctx: Any) -> RawNode:
    return raw_node(hub, zctx, "disk")


def raw_node(hub: odium.Hub, zctx: Any, name: str) -> RawNode:
    ident = Identity.generate()
    hub.trust(ident.key_id, name)
    q = Raw(zctx, hub, "query", ident)
    boot = P.new_id()
    reg = q.request(q.seal("register", P.Register(name, boot)))
    assert reg.type == "reply", reg
    hub_boot = reg.body.data["hub_boot"]  # type: ignore[attr-defined]
    sub, pull, push = (Raw(zctx, hub, s, ident) for s in ("pub", "jobs", "results"))
    for r in (sub, pull, push):
        assert r.handshake() == "ok"
    # ready once it has heard a hub heartbeat (its SUB works), then its job slot
    wait_until(lambda: sub.recv(2.0), 5, "a heartbeat on PUB")
    push.send(seal(ident, "node_hb", P.NodeBeat(boot, hub_boot)))
    hub.wait_for_nodes([name], 5)
    push.send(seal(ident, "job_state", P.JobState(1, 1)))
    return RawNode(ident, name, boot, push, sub, pull)


def stored_job(db: Path, job_id: str) -> tuple[str, Any] | None:
    """The job's status and result as a fresh connection reads them from the file."""
    with sqlite3.connect(db) as c:
        row = c.execute("SELECT status, result FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return (row[0], json.loads(row[1]) if row[1] else None) if row else None


def done(job_id: str, value: Any) -> P.JobOutcome:
    now = time.time()
    return P.JobOutcome(job_id, "done", 1, now, now, value=value)


def test_job_ack_comes_only_after_the_result_is_committed(hub: odium.Hub, node: RawNode) -> None:
    """While the store's writer is held up, the result waits and no ack goes out; once it
    commits, the ack comes, and at that moment another connection finds the result in the
    database file."""
    job = hub.submit("1 + 1", nodes=node.name)
    bid, batch = node.batch()
    assert [s.id for s in batch.jobs] == [job.id]
    gate = threading.Event()
    holding = threading.Event()

    def hold(_s: Session) -> None:  # the writer thread waits here, inside a transaction
        holding.set()
        gate.wait(20)

    hub.core.store.write(hold)
    assert holding.wait(5)
    try:
        node.report(bid, done(job.id, 2))
        assert node.ack(1.0) is None, "acknowledged before the result was written"
    finally:
        gate.set()
    acked = node.ack(10.0)
    got = stored_job(hub.home / "odium.db", job.id)  # at once, from another connection
    assert acked == [job.id]
    assert got is not None and got[0] == "done" and got[1]["value"] == 2, got
    assert job.result(5) == 2


def test_an_ack_goes_only_to_its_node(hub: odium.Hub, zctx: Any) -> None:
    """A job acknowledgement is for one node: on PUB it goes under that node's topic, so a
    node subscribed as nodes are (every message for all, and its own) does not receive the
    acknowledgements of another node's jobs; it still receives its own."""
    hub.start_local(1, prefix="a")
    node = raw_node(hub, zctx, "disk")
    node.sub.sock.setsockopt(zmq.UNSUBSCRIBE, b"")
    for topic in pub_topics(node.name):
        node.sub.sock.setsockopt(zmq.SUBSCRIBE, topic)
    jobs = [hub.submit(f"{i} * 3", nodes="a-1") for i in range(20)]  # acked to a-1 while
    deadline = time.monotonic() + 20  # disk listens; a batch that reaches disk goes back
    while not all(j.done() for j in jobs):
        assert time.monotonic() < deadline, "a-1's jobs did not finish"
        for raw in node.pull.pending():
            mid = P.open_message(raw, node.pull.vk, hub.key).env.id
            assert node.push.send(seal(node.ident, "job_report",
                                       P.JobReport(unopened=[mid], free=1)))
        node.pull.sock.poll(20)  # a batch, or 20 ms, before looking again
    assert [j.result(0) for j in jobs] == [3 * i for i in range(20)]
    job = hub.submit("1 + 1", nodes=node.name)  # its batch's group is announced after them
    bid, _batch = node.batch()
    node.report(bid, done(job.id, 2))
    assert node.ack(10.0) == [job.id]
    acks = [m for m in node.heard if m.type == "job_ack"]
    assert [m.env.to for m in acks] == [[node.name]]  # none of a-1's 30
    assert any(m.type == "group" for m in node.heard)  # what is for all still reaches it


def test_no_ack_for_a_result_whose_write_failed(hub: odium.Hub, node: RawNode,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The write that records a result fails (in its batch and alone): the node hears no ack,
    so it keeps the result to send again, instead of forgetting what the hub never stored."""
    job = hub.submit("1 + 1", nodes=node.name)
    bid, _batch = node.batch()
    monkeypatch.setitem(hub.core.store._job_sql, "update", "UPDATE no_such_table SET x = ?")
    node.report(bid, done(job.id, 2))
    assert node.ack(1.5) is None, "acknowledged a result the store did not keep"
    hub.core.store.flush()
    got = stored_job(hub.home / "odium.db", job.id)
    assert got is not None and got[0] != "done", got
