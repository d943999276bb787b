"""A node whose key an attacker holds: it answers for itself only, reads only what is sealed to
it, and never receives a reply meant for another identity (issue 8, items 1, 2 and 4).

The attacker is a raw client with a trusted node key (tests/raw.py): it registers, beats, and
then sends hand-made, validly signed messages on real CURVE sockets.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import zmq

import odium
from odium.core import wire as P
from odium.core.encoding import unb64url
from odium.core.keys import Identity
from odium.core.sealing import Keyring, UnknownGroup, open_inner

from .conftest import wait_until
from .raw import Raw, events, seal

SECRET = "s3cr3t-" + "7" * 12  # appears in code for one node only
FORGED = "F0RGED-" + "9" * 8  # what the attacker claims


class RawNode:
    """A trusted node key driven by hand: registered, beating, listening on PUB and jobs."""

    def __init__(self, hub: odium.Hub, zctx: zmq.Context[Any], name: str, *,
                 free: int = 0) -> None:
        self.hub, self.name = hub, name
        self.ident = Identity.generate()
        hub.trust(self.ident.key_id, name)
        self.query = Raw(zctx, hub, "query", self.ident)
        self.boot = P.new_id()
        reg = self.query.request(self.query.seal("register", P.Register(name, self.boot)))
        assert reg.type == "reply", reg
        self.hub_boot = reg.body.data["hub_boot"]  # type: ignore[attr-defined]
        self.sub = Raw(zctx, hub, "pub", self.ident)
        self.jobs = Raw(zctx, hub, "jobs", self.ident)
        self.push = Raw(zctx, hub, "results", self.ident)
        for r in (self.sub, self.jobs, self.push):
            assert r.handshake() == "ok"
        self.keyring = Keyring(self.ident)
        self.free = free
        # ready, as a real node is, only once its SUB socket hears the hub (no slow joiner)
        assert self.sub.recv(5.0) is not None, "no heartbeat on PUB"
        self.beat()
        hub.wait_for_nodes([name], 5)

    def send(self, type_: str, body: P.Body) -> None:
        assert self.push.send(seal(self.ident, type_, body))

    def beat(self) -> None:
        self.send("node_hb", P.NodeBeat(self.boot, self.hub_boot))
        self.send("job_state", P.JobState(max(1, self.free), self.free))

    def opened(self, raw: bytes, where: str) -> P.Message | None:
        msg = P.open_message(raw, self.query.vk, self.hub.key)
        try:
            return open_inner(self.keyring, msg, where, self.name)
        except UnknownGroup as e:  # as a node does: ask for the key of a group it missed
            self.group_key(e.gid)
            return open_inner(self.keyring, msg, where, self.name)

    def group_key(self, gid: str) -> str | None:
        """Ask the hub for a group's key (and keep what it says: the key, or None)."""
        reply = self.query.request(self.query.seal("group_key", P.GroupKeys([gid])))
        inner = open_inner(self.keyring, reply, "query")
        assert inner is not None and inner.type == "reply", reply
        key = inner.body.data["keys"][gid]  # type: ignore[attr-defined]
        self.keyring.keep(self.hub.key, gid, unb64url(key) if key else None)
        return key  # type: ignore[no-any-return]


def rejections(hub: odium.Hub, key: str, says: str) -> list[dict[str, Any]]:
    return [e for e in events(hub, "rejected") if e["key"] == key and says in e["detail"]]


def _waiting_code(flag: Path, value: str) -> str:
    """Code that runs until the test creates ``flag`` (no sleep in the test itself)."""
    return (f"import os, time\nwhile not os.path.exists({str(flag)!r}):\n    time.sleep(0.01)\n"
            f"{value!r}")


# --- 1. a node decides only its own jobs and results -------------------------------------------


@pytest.mark.parametrize("forged", ["done", "failed"])
def test_forged_job_report_for_another_nodes_job_changes_nothing(
        hub: odium.Hub, zctx, tmp_path: Path, forged: str) -> None:
    hub.start_local(1, prefix="a")
    evil = RawNode(hub, zctx, "evil")
    flag = tmp_path / "go"
    job = hub.submit(_waiting_code(flag, "real"), nodes="a-1")
    wait_until(lambda: hub.job(job.id)["status"] == "running", 10, "the job to run on a-1")
    err = P.ErrorInfo("Boom", FORGED) if forged == "failed" else None
    outcome = P.JobOutcome(job.id, forged, 1, time.time(), time.time(),  # type: ignore[arg-type]
                           stdout=FORGED, value=FORGED, error=err)
    evil.send("job_report", P.JobReport(taken=[job.id], declined=[job.id], results=[outcome]))
    evil.send("job_state", P.JobState(4, 3, running=[job.id]))
    got = wait_until(lambda: rejections(hub, evil.ident.key_id, job.id), 5,
                     "the forged reports to be refused and logged")
    assert any("not sent to it" in e["detail"] for e in got)
    info = hub.job(job.id)
    assert (info["status"], info["node"]) == ("running", "a-1")
    flag.touch()
    assert job.result(20) == "real"
    info = hub.job(job.id)
    assert (info["status"], info["node"]) == ("done", "a-1")
    assert FORGED not in str(info)


def test_forged_broadcast_result_and_output_count_only_for_the_sender(
        hub: odium.Hub, zctx, tmp_path: Path) -> None:
    hub.start_local(1, prefix="a")
    evil = RawNode(hub, zctx, "evil")
    flag = tmp_path / "go"
    seen: list[tuple[str, str, str]] = []
    handle = hub.submit_broadcast(_waiting_code(flag, "real"), nodes="a-1",
                                  on_output=lambda n, s, t: seen.append((n, s, t)))
    assert handle.cmd is not None
    now = time.time()
    evil.send("output", P.Output(handle.cmd, "stdout", "forged output\n"))
    evil.send("ack", P.Ack(handle.cmd))
    evil.send("result", P.ResultBody(handle.cmd, "ok", now, now, stdout="forged\n",
                                     value="forged"))
    evil.beat()  # behind the forgeries on the same socket: once it counts, they were handled
    wait_until(lambda: any(x["name"] == "evil" and x["last_seen"] > now
                           for x in hub.nodes()), 5, "evil's beat behind its forgeries")
    flag.touch()
    r = handle.wait(20)
    assert list(r) == ["a-1"]
    assert r["a-1"].value == "real" and "forged" not in r["a-1"].stdout
    assert all(n == "a-1" for n, _s, _t in seen)


# --- 2. payloads are sealed to their targets ---------------------------------------------------


def test_command_for_another_node_is_sealed(hub: odium.Hub, zctx) -> None:
    hub.start_local(1, prefix="a")
    evil = RawNode(hub, zctx, "evil")
    r = hub.run(f"x = {SECRET!r}\nlen(x)", nodes="a-1", timeout=10)
    assert r["a-1"].value == len(SECRET)
    # a command for evil, after it on the same PUB stream: evil can read that one
    h = hub.submit_broadcast(f"mine = {SECRET[::-1]!r}", nodes="evil", timeout=30)
    frames: list[bytes] = []
    mine: list[P.Message] = []

    def got_own() -> bool:
        for raw in evil.sub.pending():
            frames.append(raw)
            m = evil.opened(raw, "pub") if b'"type":"sealed"' in raw else None
            if m is not None:
                mine.append(m)
        return bool(mine)

    wait_until(got_own, 10, "the command sealed to evil")
    assert SECRET[::-1] in mine[0].body.code  # type: ignore[attr-defined]
    assert mine[0].type == "exec" and mine[0].env.to == ["evil"]
    for raw in frames:  # nothing of the other command shows: code, type or target
        assert SECRET.encode() not in raw
        # (as JSON strings: the base64 of a box or signature may hold the letters a-1)
        assert b'"exec"' not in raw and b'"a-1"' not in raw
    sealed_to_others = [raw for raw in frames if b'"type":"sealed"' in raw
                        and evil.opened(raw, "pub") is None]
    assert sealed_to_others, "evil saw the other command's (sealed) message"
    hub.interrupt(h.cmd)  # evil never answers: end it now


def test_a_groups_key_goes_only_to_its_readers(hub: odium.Hub, zctx) -> None:
    """A command to many is sealed under its readers' group key, wrapped for each of them in
    the group's first message only. A reader that missed that message asks the hub for the
    key and opens the next one; a node outside the group asks for the same group and gets
    nothing, nor for a group id it made up."""
    a, b, evil = RawNode(hub, zctx, "a"), RawNode(hub, zctx, "b"), RawNode(hub, zctx, "evil")
    handles = [hub.submit_broadcast(f"v = {SECRET!r} + {str(i)!r}", nodes="a,b", timeout=30)
               for i in range(2)]
    got: dict[str, list[bytes]] = {"a": [], "b": [], "evil": []}

    def both_heard() -> bool:
        for n, node in (("a", a), ("b", b), ("evil", evil)):
            got[n] += [r for r in node.sub.pending() if b'"type":"sealed"' in r]
        return all(len(x) >= 2 for x in got.values())

    wait_until(both_heard, 10, "both commands on each SUB")
    first, second = (P.open_message(r, a.query.vk, hub.key).body for r in got["a"][:2])
    assert isinstance(first, P.Sealed) and isinstance(second, P.Sealed)
    assert first.g is not None and first.g == second.g and first.k and second.k == ""
    assert len(got["a"][1]) < len(got["a"][0])
    cmd = a.opened(got["a"][1], "pub")  # (a keeps the key from the first message)
    assert cmd is not None and cmd.body.code.endswith("'1'")  # type: ignore[attr-defined]
    cmd = b.opened(got["b"][1], "pub")  # b missed the first: it asks for the key
    assert cmd is not None and SECRET in cmd.body.code  # type: ignore[attr-defined]
    assert evil.opened(got["evil"][1], "pub") is None  # it asked: no key for evil
    assert evil.group_key(first.g) is None
    assert evil.group_key("A" * 12) is None
    for h in handles:
        hub.interrupt(h.cmd)  # nobody answers them: end them now


def test_unsealed_command_is_refused_by_a_node(hub: odium.Hub, tmp_path: Path) -> None:
    """A node runs only sealed commands: one in clear (even signed by its hub) is refused."""
    hub.start_local(1, prefix="n")
    mark = tmp_path / "ran"
    core = hub.core
    body = P.Exec(P.new_id(), "python", f"open({str(mark)!r}, 'w')")
    raw = P.seal(core.rt.ident.signing, core.rt.ident.key_id, core.rt.state, "exec", body,
                 to=["n-1"])
    hub._call(lambda: core.sockets["pub"].send(raw))
    wait_until(lambda: [e for e in events(hub, "rejected") if e["node"] == "n-1"
                        and "'exec' does not come on PUB" in e["detail"]], 10,
               "the node to refuse and report the unsealed command")
    assert hub.run("1", nodes="n-1", timeout=10).ok
    assert not mark.exists()


def test_jobs_for_another_node_are_sealed_and_sent_on(hub: odium.Hub, zctx) -> None:
    """PUSH hands batches to any connected node: one for a-1 that reaches evil cannot be read
    there, evil says so, and the hub sends the jobs on to a-1 at once."""
    hub.start_local(1, prefix="a", capacity=2)
    evil = RawNode(hub, zctx, "evil", free=8)
    batches: list[bytes] = []
    values = []
    for i in range(12):  # one at a time: round-robin hands about half of them to evil
        job = hub.submit(f"{SECRET!r} + {str(i)!r}", nodes="a-1")
        deadline = time.monotonic() + 20
        while not job.done():
            assert time.monotonic() < deadline, f"job {i} did not finish"
            for raw in evil.jobs.pending():
                batches.append(raw)
                assert evil.opened(raw, "jobs") is None  # not sealed to evil
                msg = P.open_message(raw, evil.query.vk, hub.key)
                evil.send("job_report", P.JobReport(unopened=[msg.env.id], free=8))
            evil.jobs.sock.poll(20)  # wait for a batch (or 20 ms) before looking again
        values.append(job.result(0))
    assert values == [SECRET + str(i) for i in range(12)]
    assert batches, "no batch reached evil (round-robin should hand it some)"
    for raw in batches:
        assert SECRET.encode() not in raw
    assert all(hub.job(j["id"])["node"] == "a-1" for j in hub.jobs(limit=12))


def test_fetched_commands_and_bundles_are_sealed_to_the_asker(hub: odium.Hub, zctx) -> None:
    evil = RawNode(hub, zctx, "evil")
    other = RawNode(hub, zctx, "other")
    h = hub.submit_broadcast(f"v = {SECRET!r}", nodes="evil,other", timeout=30)
    mid = P.new_id()
    reply = evil.query.request(evil.query.seal("fetch", P.Fetch(0), msg_id=mid))
    assert (reply.type, reply.env.re) == ("sealed", mid)
    assert SECRET.encode() not in P.encode_json(P.to_builtins(reply.body))
    assert open_inner(other.keyring, reply, "query") is None  # not sealed to another node
    inner = open_inner(evil.keyring, reply, "query")
    assert inner is not None and inner.type == "reply"
    cmds = inner.body.data["commands"]  # type: ignore[attr-defined]
    assert len(cmds) == 1
    assert other.opened(cmds[0].encode(), "fetch") is None  # sealed again, to evil alone
    cmd = evil.opened(cmds[0].encode(), "fetch")
    assert cmd is not None and SECRET in cmd.body.code  # type: ignore[attr-defined]
    hub.interrupt(h.cmd)


# --- 4. replies go to the identity that asked -------------------------------------------------


def test_a_connection_cannot_take_over_another_ones_routing_id(hub: odium.Hub, zctx) -> None:
    """The review's attack: a second connection with its own trusted key and the routing id of
    an honest peer. The hub's ROUTER never hands it that id, so it gets no reply of the
    victim's; the victim keeps getting its own."""
    victim, evil = Identity.generate(), Identity.generate()
    hub.trust(victim.key_id, "victim")
    hub.trust(evil.key_id, "evil")
    rid = f"victim/{victim.key_id}".encode()
    v = Raw(zctx, hub, "query", victim, routing_id=rid)
    assert v.handshake() == "ok"
    v.ping()
    e = Raw(zctx, hub, "query", evil, routing_id=rid)
    assert e.handshake() == "ok"  # CURVE lets it in; the ROUTER refuses the routing id
    for _ in range(3):
        v.ping()
    assert e.recv(0.3) is None
    assert e.pending() == []


def test_nodes_choose_no_routing_id(hub: odium.Hub, zctx) -> None:
    """Honest clients never pick their routing id (so no one can guess and claim one): a
    connection claiming the id a node would have used before gets nothing of the node's."""
    (node,) = hub.start_local(1, prefix="n")
    key = next(x["key"] for x in hub.nodes() if x["name"] == "n-1")
    evil = Identity.generate()
    hub.trust(evil.key_id, "evil")
    e = Raw(zctx, hub, "query", evil, routing_id=f"n-1/{key}".encode())
    assert e.handshake() == "ok"
    e.ping()  # the id was free: nobody holds it
    assert hub.run("2 + 2", nodes="n-1", timeout=10)["n-1"].value == 4
    assert node.proc.poll() is None
