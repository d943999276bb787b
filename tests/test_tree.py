"""Trees of hubs on this machine: a root, relays that are nodes of it and hubs of their own
PCs, and commands, results, streams and interrupts through them (loopback; the namespaced
topology is tests/test_tree_netns.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import odium

from .conftest import NodeProcess, wait_until
from .test_cli import cli_json, cli_ok

pytestmark = pytest.mark.timeout(120)


def _statuses(hub: odium.Hub) -> dict[str, str]:
    return {n["name"]: n["status"] for n in hub.nodes()}


def make_tree(hub: odium.Hub, tmp_path: Path, start: Callable[..., NodeProcess],
              relays: dict[str, list[str]]) -> dict[str, NodeProcess]:
    """Relays joined to ``hub`` (``--serve``), each with its leaves joined to it; waits until
    the root sees every leaf ready. Returns the processes by path."""
    procs: dict[str, NodeProcess] = {}
    for relay in relays:
        tok = tmp_path / f"{relay}.token"
        cli_ok("token", "--home", str(hub.home), "--name", relay, "--file", str(tok))
        procs[relay] = start(relay, "--token-file", str(tok), "--serve", "--ports", "0",
                             "--heartbeat", "0.5")
    hub.wait_for_nodes(list(relays), 30)
    for relay, leaves in relays.items():
        for leaf in leaves:
            tok = tmp_path / f"{relay}-{leaf}.token"
            cli_ok("token", "--home", str(procs[relay].home), "--name", leaf, "--file", str(tok))
            procs[f"{relay}/{leaf}"] = start(f"{relay}-{leaf}", "--token-file", str(tok),
                                             "--name", leaf)
    want = [f"{r}/{leaf}" for r, ls in relays.items() for leaf in ls]
    wait_until(lambda: all(_statuses(hub).get(p) == "ready" for p in want), 40,
               f"{want} ready at the root")
    return procs


def test_the_root_commands_every_instance_of_the_tree(
        hub: odium.Hub, tmp_path: Path, node_processes: Callable[..., NodeProcess]) -> None:
    make_tree(hub, tmp_path, node_processes, {"lab1": ["pc-1", "pc-2"], "lab2": ["pc-1"]})
    nodes = {n["name"]: n for n in hub.nodes()}
    assert sorted(nodes) == ["lab1", "lab1/pc-1", "lab1/pc-2", "lab2", "lab2/pc-1"]
    assert nodes["lab1/pc-1"]["via"] == "lab1" and "via" not in nodes["lab1"]

    r = hub.run("import os; print('hi from', os.environ['ODIUM_NODE']); "
                "os.environ['ODIUM_NODE']", nodes="lab1/*", timeout=30)
    assert sorted(r) == ["lab1/pc-1", "lab1/pc-2"], r
    for path in r:
        assert r[path].status == "ok" and r[path].value == path.split("/")[1]
        assert r[path].stdout == f"hi from {path.split('/')[1]}\n"
        assert r[path].state == nodes[path]["state"] != "unknown"  # the leaf's own

    everything = hub.run("1 + 1", nodes="**", timeout=30)
    assert sorted(everything) == sorted(nodes) and all(
        everything[n].status == "ok" and everything[n].value == 2 for n in everything)
    # a pattern that worked on a flat hub means the same: '*' is one level
    assert sorted(hub.run("2", nodes="*", timeout=30)) == ["lab1", "lab2"]
    # the admin command at the root sees the same
    got = cli_json("run", "--home", str(hub.home), "--nodes", "lab*/pc-*", "--timeout", "30",
                   "-c", "3")["nodes"]
    assert sorted(got) == ["lab1/pc-1", "lab1/pc-2", "lab2/pc-1"]
