"""A compromised relay (a relay whose key the attacker holds): what it can do (drop, delay:
seen as lost or timeout) and what it cannot (forge, alter, retarget or replay a command from
above; forge or alter an answer from below; swap the key of an instance below it).

The leaf's rules are checked on a real ``NodeTree`` with real keys and real signed, sealed
messages (no sockets); the root's on real processes: a root, a real relay and its leaf, and
the attacker's raw socket on the root's results port with the relay's own key.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import odium
from odium.core import wire as P
from odium.core.dispatch import Dispatch
from odium.core.keys import Identity, verify_key
from odium.core.results import Status
from odium.core.sealing import Keyring
from odium.errors import AuthError
from odium.local.home import load_or_create
from odium.node.commands import Received
from odium.node.ledger import Ledger
from odium.node.tree import NodeTree

from .conftest import NodeProcess, wait_until
from .raw import Raw, events, seal
from .test_tree import _statuses, make_tree

pytestmark = pytest.mark.timeout(120)
STATE = "unknown"


class Leaf:
    """pc-1 below relay lab1 below root: its NodeTree, and what it obeyed."""

    def __init__(self, keys: tuple[Identity, Identity, Identity] | None = None,
                 ledger: Path | None = None) -> None:
        self.root, self.relay, self.me = keys or tuple(Identity.generate() for _ in range(3))
        self.obeyed: list[P.Message] = []
        self.interrupted: list[P.Message] = []
        sealed: Dispatch[None] = Dispatch("sealed")
        sealed.on("exec", P.Exec, lambda m, b, _: self.obeyed.append(m))
        self.tree = NodeTree("pc-1", self.relay.key_id, Keyring(self.me), Received(), sealed,
                             lambda m, b: self.interrupted.append(m),
                             ledger=Ledger(ledger) if ledger else None)
        self.tree.welcome({"above": [{"key": self.root.key_id, "path": "lab1"}]})

    def command(self, by: Identity, to: list[str], *, sealed_to: Identity | None = None,
                code: str = "1") -> tuple[str, bytes]:
        cmd = P.new_id()
        body = Keyring(by).seal("exec", P.Exec(cmd, "python", code),
                                [(sealed_to or self.me).key_id], to=to)
        return cmd, P.seal(by.signing, by.key_id, STATE, "sealed", body)

    def relayed(self, raw: bytes, paths: list[str], cmd: str | None = None) -> None:
        """``raw`` as the relay hands it on (the relay signs the wrapper, as it may)."""
        wrapper = P.seal(self.relay.signing, self.relay.key_id, STATE, "relay",
                         P.Relay(raw.decode(), paths, cmd))
        msg = P.open_message(wrapper, verify_key(self.relay.key_id), self.relay.key_id)
        self.tree.on_relay(msg, msg.body)  # type: ignore[arg-type]


def test_a_leaf_obeys_the_root_through_its_relay_once() -> None:
    leaf = Leaf()
    cmd, raw = leaf.command(leaf.root, ["lab1/pc-1"], code="x = 1")
    leaf.relayed(raw, ["pc-1"], cmd)
    assert len(leaf.obeyed) == 1
    m = leaf.obeyed[0]
    assert m.env.from_ == leaf.root.key_id and m.body.code == "x = 1"  # type: ignore
    assert m.env.to == ["pc-1"]  # as the node's parts read it
    with pytest.raises(AuthError, match="replay"):  # the same message again, another wrapper
        leaf.relayed(raw, ["pc-1"])
    assert len(leaf.obeyed) == 1


def test_a_leaf_that_restarted_still_refuses_what_it_obeyed(tmp_path: Path) -> None:
    """Its replay cache is gone with the process, and its relay (the hub that sets its clock)
    could make an old command look fresh: the ledger on disk still knows it."""
    before = Leaf(ledger=tmp_path / "relayed.ids")
    cmd, raw = before.command(before.root, ["lab1/pc-1"], code="x = 1")
    before.relayed(raw, ["pc-1"], cmd)
    assert len(before.obeyed) == 1
    after = Leaf((before.root, before.relay, before.me), ledger=tmp_path / "relayed.ids")
    with pytest.raises(AuthError, match="obeyed before this node restarted"):
        after.relayed(raw, ["pc-1"], cmd)
    assert after.obeyed == []
    _, fresh = after.command(after.root, ["lab1/pc-1"])  # a new command is obeyed
    after.relayed(fresh, ["pc-1"])
    assert len(after.obeyed) == 1
    assert (tmp_path / "relayed.ids").stat().st_mode & 0o077 == 0


def test_a_relay_cannot_alter_forge_or_retarget_the_roots_command() -> None:
    leaf = Leaf()
    cmd, raw = leaf.command(leaf.root, ["lab1/pc-1"])
    box = raw.index(b'"box":"') + 10
    altered = raw[:box] + (b"A" if raw[box:box + 1] != b"A" else b"B") + raw[box + 1:]
    with pytest.raises(AuthError, match="bad signature"):
        leaf.relayed(altered, ["pc-1"], cmd)
    # forged: signed by the relay, claiming to be the root
    forged = P.seal(leaf.relay.signing, leaf.root.key_id, STATE, "sealed",
                    Keyring(leaf.root).seal("exec", P.Exec(P.new_id(), "python", "evil"),
                                            [leaf.me.key_id], to=["lab1/pc-1"]))
    with pytest.raises(AuthError, match="bad signature"):
        leaf.relayed(forged, ["pc-1"])
    # retargeted: the root's command for pc-2, handed to pc-1
    _, for_pc2 = leaf.command(leaf.root, ["lab1/pc-2"], sealed_to=Identity.generate())
    with pytest.raises(AuthError, match="not sealed to this node"):
        leaf.relayed(for_pc2, ["pc-1"])
    # sealed to pc-1's key but addressed to another path
    _, other_path = leaf.command(leaf.root, ["lab1/pc-9"])
    with pytest.raises(AuthError, match="not addressed to this node"):
        leaf.relayed(other_path, ["pc-1"])
    # a key the relay does not vouch for
    _, stranger = leaf.command(Identity.generate(), ["lab1/pc-1"])
    with pytest.raises(AuthError, match="does not vouch"):
        leaf.relayed(stranger, ["pc-1"])
    assert leaf.obeyed == []


def test_a_relays_own_commands_reach_only_its_subtree_by_its_own_names() -> None:
    leaf = Leaf()
    # the relay's own admin names pc-1 as the relay knows it
    _, own = leaf.command(leaf.relay, ["pc-1"])
    leaf.relayed(own, ["pc-1"])
    assert len(leaf.obeyed) == 1 and leaf.obeyed[0].env.from_ == leaf.relay.key_id
    # it cannot pass its own command off as the root's path
    _, claims = leaf.command(leaf.relay, ["lab1/pc-1"])
    with pytest.raises(AuthError, match="not addressed"):
        leaf.relayed(claims, ["pc-1"])


def test_interrupts_through_a_relay_are_checked_the_same() -> None:
    leaf = Leaf()
    cmd = P.new_id()
    mine = P.seal(leaf.root.signing, leaf.root.key_id, STATE, "interrupt", P.Interrupt(cmd),
                  to=["lab1/pc-1", "lab1/pc-2"])
    leaf.relayed(mine, ["pc-1", "pc-2"], cmd)
    assert [m.env.to for m in leaf.interrupted] == [["pc-1"]]
    other = P.seal(leaf.root.signing, leaf.root.key_id, STATE, "interrupt", P.Interrupt(cmd),
                   to=["lab1/pc-2"])
    leaf.relayed(other, ["pc-1"], cmd)
    assert len(leaf.interrupted) == 1
    forged = P.seal(leaf.relay.signing, leaf.root.key_id, STATE, "interrupt",
                    P.Interrupt(cmd), to=["lab1/pc-1"])
    with pytest.raises(AuthError, match="bad signature"):
        leaf.relayed(forged, ["pc-1"], cmd)


# --- the root's side, on real processes ----------------------------------------------------


def _evil_relay(hub: odium.Hub, procs: dict[str, NodeProcess], zctx: Any) -> tuple[Identity, Raw]:
    """The attacker holds lab1's key: its own raw socket on the root's results port."""
    ident = load_or_create(procs["lab1"].home / "identity.key")
    push = Raw(zctx, hub, "results", ident)
    assert push.handshake() == "ok"
    return ident, push


def test_a_compromised_relay_cannot_forge_or_alter_a_leafs_answer(
        hub: odium.Hub, tmp_path: Path, node_processes: Callable[..., NodeProcess],
        zctx: Any) -> None:
    procs = make_tree(hub, tmp_path, node_processes, {"lab1": ["pc-1"]})
    leaf_key = {n["name"]: n["key"] for n in hub.nodes()}["lab1/pc-1"]
    evil, push = _evil_relay(hub, procs, zctx)
    flag = tmp_path / "go"
    handle = hub.submit_broadcast(
        f"import os, time\nwhile not os.path.exists({str(flag)!r}): time.sleep(0.01)\n'real'",
        nodes="lab1/pc-1", timeout=60)
    assert handle.cmd is not None
    now = time.time()
    forged = P.ResultBody(handle.cmd, "ok", now, now, value="forged")
    # 1. signed by the relay in the leaf's name: the signature is not the leaf's
    as_leaf = P.seal(evil.signing, leaf_key, STATE, "result", forged)
    # 2. signed by the relay as itself, passed off as the leaf's
    as_itself = seal(evil, "result", forged)
    # 3. a path outside its subtree, and one it never reported
    for path, inner in (("pc-1", as_leaf), ("pc-1", as_itself), ("pc-7", as_itself)):
        assert push.send(seal(evil, "relayed", P.Relayed(path, inner.decode())))
    # 4. a new key for pc-1: refused, the first one stays
    assert push.send(seal(evil, "subtree", P.Subtree([P.SubNode(
        "pc-1", evil.key_id, "ready")])))
    wait_until(lambda: len(events(hub, "rejected")) >= 3
               and events(hub, "subtree_key_refused"), 10, "the forgeries refused")
    details = " | ".join(e["detail"] for e in events(hub, "rejected"))
    assert details.count("an answer relayed for lab1/pc-1: bad signature") == 2, details
    assert "lab1/pc-7 is not known below relay lab1" in details
    assert {n["name"]: n["key"] for n in hub.nodes()}["lab1/pc-1"] == leaf_key
    assert not handle.ready()
    flag.touch()
    r = handle.wait(30)
    assert r["lab1/pc-1"].status is Status.OK and r["lab1/pc-1"].value == "real"


def test_a_relay_that_stops_forwarding_is_lost_then_back(
        hub: odium.Hub, tmp_path: Path, node_processes: Callable[..., NodeProcess]) -> None:
    """All a relay can do is drop or hold back: frozen (SIGSTOP), its subtree is lost within a
    few beats; thawed, it and its subtree are back and answer again."""
    procs = make_tree(hub, tmp_path, node_processes, {"lab1": ["pc-1"], "lab2": ["pc-1"]})
    handle = hub.submit_broadcast("import time; time.sleep(60)", nodes="*/pc-1", timeout=120)
    wait_until(lambda: all(handle.cmd in n["running"] for n in hub.nodes("*/pc-1")), 20,
               "both leaves running")
    relay = procs["lab1"].proc
    assert relay is not None
    relay.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: _statuses(hub)["lab1/pc-1"] == "lost", 15, "lab1's subtree lost")
        hub.interrupt(handle.cmd)
        r = handle.wait(20)
        assert r["lab1/pc-1"].status is Status.LOST
        assert r["lab2/pc-1"].status is Status.INTERRUPTED
    finally:
        relay.send_signal(signal.SIGCONT)
    wait_until(lambda: _statuses(hub).get("lab1/pc-1") == "ready", 30, "lab1/pc-1 back")
    r = hub.run("3", nodes="lab1/pc-1", timeout=30, session="after")
    assert r["lab1/pc-1"].value == 3
