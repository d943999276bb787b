"""Small things a new user hit (issue 9, item 11), through the real ``odium`` command."""

from __future__ import annotations

import re
from pathlib import Path

from odium import __version__

from .conftest import HubProcess, NodeProcess, odium_cli, wait_until


def test_version() -> None:
    p = odium_cli("--version")
    assert p.returncode == 0 and p.stdout == f"odium {__version__}\n", p


def test_no_abbreviated_options() -> None:
    p = odium_cli("run", "--node", "x", "-c", "1")
    assert p.returncode == 2 and "unrecognized arguments: --node" in p.stderr, p.stderr


def test_nodes_with_no_match_says_so(hub_process: HubProcess) -> None:
    p = odium_cli("nodes", "--home", str(hub_process.home), "gpu-05")
    assert p.returncode == 0
    assert "no node matches 'gpu-05'" in p.stdout and "no nodes yet" not in p.stdout


def token(hub: HubProcess) -> str:
    m = re.match(r"ODIUM_TOKEN=(\S+) ", odium_cli("token", "--home", str(hub.home)).stdout)
    assert m
    return m.group(1)


def test_refusals_are_said_once(hub_process: HubProcess, tmp_path: Path) -> None:
    started: list[NodeProcess] = []

    def node(home: str, *args: str) -> NodeProcess:
        np = NodeProcess(tmp_path / home, ["--app", str(tmp_path), *args]).start()
        started.append(np)
        return np

    try:
        tok = token(hub_process)
        first = node("a", "--name", "dup", "--token", tok)
        wait_until(lambda: "; ready" in first.output(), 20, "the first node ready")
        used = node("b", "--name", "other", "--token", tok)
        assert used.proc is not None and used.proc.wait(20) == 1
        # (the spent token's key still connects: it may repeat the join that spent it)
        assert used.output().count("this join token was used already") == 1, used.output()
        clash = node("c", "--name", "dup", "--token", token(hub_process))
        assert clash.proc is not None and clash.proc.wait(20) == 1
        assert clash.output().count("is taken by another key") == 1, clash.output()
    finally:
        for np in started:
            np.stop()
