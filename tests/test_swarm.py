"""Correctness at scale: 200 real nodes (bench/swarm.py: the node's own code, its own keys,
sockets and handshakes, packed four processes to the machine) on one hub. A join storm (each
node with a token of its own, all at once) loses no join; every broadcast accounts for every
node; killing a swarm process (50 nodes at once) makes exactly those nodes lost, and the others
go on."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import odium

from .conftest import wait_until

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from swarm import Swarm  # noqa: E402

pytestmark = pytest.mark.timeout(180)

N, PROCS = 200, 4


@pytest.fixture(scope="module")
def storm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[odium.Hub, Swarm]]:
    """A hub, and 200 nodes joining it at once, each with its own token."""
    tmp = tmp_path_factory.mktemp("swarm")
    with odium.Hub(tmp / "hub", ports=0, app=tmp, hb_interval=0.5) as hub:
        sw = Swarm(hub, N, PROCS, join="token")
        try:
            sw.start()
            yield hub, sw
        finally:
            sw.close()


def swarm_nodes(hub: odium.Hub) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in hub.nodes() if n["name"].startswith("sw")}


def test_a_join_storm_loses_no_join(storm: tuple[odium.Hub, Swarm]) -> None:
    hub, sw = storm
    wait_until(lambda: sw.ready() == N, 90, f"all {N} nodes ready")
    nodes = swarm_nodes(hub)
    assert sorted(nodes) == sw.names
    assert all(n["status"] == "ready" for n in nodes.values())
    keys = [k for k in hub.keys() if k["name"].startswith("sw")]
    # each node's own key, trusted as a node under its own name; each token used once
    assert sorted(k["name"] for k in keys if k["role"] == "node") == sw.names
    assert len({nodes[name]["key"] for name in sw.names}) == N
    wait_until(lambda: sw.counts()["ready"] == N, 10, "every swarm process to see its nodes")


def test_every_broadcast_accounts_for_every_node(storm: tuple[odium.Hub, Swarm]) -> None:
    hub, sw = storm
    wait_until(lambda: sw.ready() == N, 90, f"all {N} nodes ready")
    for i in range(5):
        res = hub.run(f"import os; (os.environ.get('X'), {i} * 2)", nodes="sw*", timeout=60)
        assert sorted(res) == sw.names
        assert {res[n].status for n in res} == {"ok"}, res.errors()
        assert {tuple(res[n].value) for n in res} == {(None, i * 2)}
    # each node its own namespace: a session's variable is the node's own
    hub.run("mine = __import__('random').random()", nodes="sw*", timeout=60)
    res = hub.run("mine", nodes="sw*", timeout=60)
    assert len({res[n].value for n in res}) == N
    res = hub.run("echo $((6 * 7))", nodes="sw00[0-4]*", shell=True, timeout=60)
    assert sorted(res) == [n for n in sw.names if n < "sw0050"]
    assert {res[n].stdout for n in res} == {"42\n"}


def test_killing_a_swarm_process_loses_exactly_its_nodes(
        storm: tuple[odium.Hub, Swarm]) -> None:
    hub, sw = storm
    wait_until(lambda: sw.ready() == N, 90, f"all {N} nodes ready")
    gone = set(sw.kill(0))
    assert len(gone) == N // PROCS

    def lost() -> set[str]:
        return {name for name, n in swarm_nodes(hub).items() if n["status"] == "lost"}

    wait_until(lambda: lost() == gone, 60, f"the {len(gone)} nodes of the killed process lost")
    nodes = swarm_nodes(hub)
    assert {name for name, n in nodes.items() if n["status"] == "ready"} == set(sw.names) - gone
    res = hub.run("1 + 1", nodes="sw*", timeout=60)
    assert sorted(res) == sw.names  # every node accounted for: ran, or said not connected
    assert {n for n in res if res[n].status == "ok"} == set(sw.names) - gone
    assert {n for n in res if res[n].status == "not connected"} == gone
