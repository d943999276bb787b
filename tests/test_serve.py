"""``odium node --serve``: one process that is a node to its hub and a hub to its own nodes
(the first step of trees of hubs; nothing relays between the two yet)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import odium

from .conftest import NodeProcess, odium_cli, wait_until
from .test_cli import assert_one_line_error, cli_json, cli_ok


def test_a_node_that_serves_is_a_hub_to_its_own_nodes(
        hub: odium.Hub, tmp_path: Path, node_processes: Callable[..., NodeProcess]) -> None:
    root_token = tmp_path / "lab1.token"
    cli_ok("token", "--home", str(hub.home), "--name", "lab1", "--file", str(root_token))
    lab1 = node_processes("lab1", "--token-file", str(root_token), "--serve", "--ports", "0")
    hub.wait_for_nodes(["lab1"], 30)
    home = lab1.home
    assert "odium hub " in lab1.output() and f"odium token --home {home}" in lab1.output()

    # its PCs join it with its own tokens, as any hub's
    pc_token = tmp_path / "pc-1.token"
    cli_ok("token", "--home", str(home), "--name", "pc-1", "--file", str(pc_token))
    node_processes("pc-1", "--token-file", str(pc_token))
    wait_until(lambda: {n["name"]: n["status"] for n in cli_json("nodes", "--home", str(home))
                        ["nodes"]}.get("pc-1") == "ready", 30, "pc-1 ready at lab1")

    # the root commands lab1; lab1's own admin commands pc-1; each side sees only its own
    got = cli_json("run", "--home", str(home), "--nodes", "*", "--timeout", "20", "-c",
                   "import os; os.environ['ODIUM_NODE']")["nodes"]
    assert list(got) == ["pc-1"] and got["pc-1"]["value"] == "pc-1", got
    r = hub.run("import os; os.environ['ODIUM_NODE']", nodes="*", timeout=20)
    assert list(r) == ["lab1"] and r["lab1"].value == "lab1"
    # one identity for both roles: the key lab1 joined the root with is the key pc-1 trusts
    lab1_key = next(k["key"] for k in hub.keys() if k["name"] == "lab1")
    assert cli_json("keys", "show", "--home", str(home))["key"] == lab1_key

    # stopped, it leaves its hub and its PCs wait for it; its home says no hub runs there
    assert lab1.stop() == 0
    wait_until(lambda: {n["name"]: n["status"] for n in hub.nodes()}["lab1"] != "ready", 15,
               "lab1 to leave the root")
    assert not (home / "hub.json").exists()


def test_hub_options_without_serve_are_refused(tmp_path: Path) -> None:
    p = odium_cli("node", "--home", str(tmp_path / "n"), "--join", "tcp://127.0.0.1:9",
                  "--hub-key", "x" * 43, "--ports", "0", "--db", "sqlite://")
    assert_one_line_error(p, "--ports, --db only with --serve")
