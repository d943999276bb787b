"""Launch credentials (odium.hub.launches) with real node processes: one credential admits a
launch's N nodes by the names it gives them, once each, is logged join by join, is spent
when all have joined, and dies with the launch (its nodes' keys too). Also the launch's
record across a hub restart, and the launchers' refusals that need no remote machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import odium
from odium.core import wire as P
from odium.errors import ConfigError, OdiumError
from odium.launch import SSH, LaunchError, Slurm
from tests.conftest import HB, NodeProcess, both_stores, odium_cli, wait_until

pytestmark = pytest.mark.timeout(90)


def _open(hub: odium.Hub, count: int, **kw: Any) -> dict[str, Any]:
    return dict(hub.launch_request("launch", P.LaunchOpen("manual", count, **kw)))


def _credential(tmp: Path, rec: dict[str, Any]) -> Path:
    path = tmp / f"{rec['id']}.credential"
    path.write_text(rec["token"] + "\n")
    path.chmod(0o600)
    return path


_STARTED: list[NodeProcess] = []


@pytest.fixture(autouse=True)
def _stop_nodes() -> Iterator[None]:
    """Every node a test here starts is stopped at its end, whatever happened."""
    yield
    while _STARTED:
        _STARTED.pop().stop()


def _node(tmp: Path, cred: Path, name: str, home: str | None = None) -> NodeProcess:
    node = NodeProcess(tmp / (home or f"home-{name}"),
                       ["--token-file", str(cred), "--name", name, "--app", str(tmp)])
    _STARTED.append(node)
    return node.start()


def _ended(node: NodeProcess, timeout: float = 30.0) -> str:
    assert node.proc is not None
    node.proc.wait(timeout)
    return node.output()


def test_a_launch_credential_admits_its_nodes_by_name_once_each(hub: odium.Hub,
                                                                tmp_path: Path) -> None:
    rec = _open(hub, 2, launch="lab")
    assert rec["id"] == "lab" and list(rec["nodes"]) == ["lab-1", "lab-2"]
    assert rec["nodes"] == {"lab-1": "pending", "lab-2": "pending"}
    cred = _credential(tmp_path, rec)
    nodes = [_node(tmp_path, cred, "lab-1"), _node(tmp_path, cred, "lab-2")]
    try:
        hub.wait_for_nodes(["lab-1", "lab-2"], timeout=30)
        (v,) = hub.launches("lab")
        assert (v["ready"], v["joined"], v["status"]) == (2, 2, "full")
        assert {n["name"]: n["launch"] for n in hub.nodes()} == {"lab-1": "lab", "lab-2": "lab"}
        joins = [e["detail"] for e in hub.log(100) if e["kind"] == "launch_join"]
        assert len(joins) == 2 and {"1 of 2" in j or "2 of 2" in j for j in joins} == {True}
        # spent: a third node, or one of its names under another key, is refused in one line
        extra = _node(tmp_path, cred, "lab-3")
        assert "launch lab admits nodes named lab-1, lab-2, not 'lab-3'" in _ended(extra)
        again = _node(tmp_path, cred, "lab-1", home="other-lab-1")
        assert "node name 'lab-1' is taken by another key" in _ended(again)
        r = hub.run("1 + 1", nodes="lab-*")
        assert {n: r[n].value for n in r} == {"lab-1": 2, "lab-2": 2}
    finally:
        for n in nodes:
            n.stop()


def test_a_stopped_launch_admits_no_one_and_its_nodes_are_revoked(hub: odium.Hub,
                                                                  tmp_path: Path) -> None:
    rec = _open(hub, 3, launch="big")
    cred = _credential(tmp_path, rec)
    first = _node(tmp_path, cred, "big-1")
    try:
        hub.wait_for_nodes(["big-1"], timeout=30)
        v = hub.launch_stop("big")
        assert v["status"] == "stopped" and v["done"] == []  # (a manual launch: nothing to kill)
        wait_until(lambda: {n["name"]: n["status"] for n in hub.nodes()}.get("big-1")
                   == "revoked", 10, "big-1 revoked")
        keys = {k["name"]: k["role"] for k in hub.keys()}
        assert keys["big-1"] == "revoked" and keys["big"] == "revoked"  # node key, credential
        late = _node(tmp_path, cred, "big-2")
        out = _ended(late)
        assert "refused this join token" in out, out
        (v,) = hub.launches("big")
        assert v["nodes"] == {"big-1": "revoked", "big-2": "pending", "big-3": "pending"}
        assert hub.launch_stop("big")["status"] == "stopped"  # again: the same, no error
        with pytest.raises(ConfigError, match="'big-1' is taken by a revoked key; .* forget"):
            _open(hub, 1, names=["big-1"])  # (its node would be refused: the name is held)
    finally:
        first.stop()


def test_bad_launch_requests_are_refused_before_anything_opens(hub: odium.Hub) -> None:
    _open(hub, 1, launch="one")
    with pytest.raises(ConfigError, match="there is a launch 'one' already"):
        _open(hub, 1, launch="one")
    with pytest.raises(ConfigError, match="belongs to launch one already"):
        _open(hub, 1, launch="two", names=["one-1"])
    with pytest.raises(ConfigError, match="2 names given for 3 nodes"):
        _open(hub, 3, launch="three", names=["a", "b"])
    with pytest.raises(ConfigError, match="must all differ"):
        _open(hub, 2, names=["a", "a"])
    with pytest.raises(OdiumError, match="no launch 'nope'"):
        hub.launch_stop("nope")
    assert [v["id"] for v in hub.launches()] == ["one"]


@both_stores
def test_launches_outlive_a_hub_restart(tmp_path: Path, store_db: str | None) -> None:
    home = tmp_path / "hub"
    with odium.Hub(home, ports=0, hb_interval=HB, app=tmp_path, db=store_db) as hub:
        rec = _open(hub, 2, launch="keep")
        cred = _credential(tmp_path, rec)
        node = _node(tmp_path, cred, "keep-1")
        try:
            hub.wait_for_nodes(["keep-1"], timeout=30)
        finally:
            node.stop()
    with odium.Hub(home, ports=0, hb_interval=HB, app=tmp_path, db=store_db) as hub:
        (v,) = hub.launches()
        assert (v["id"], v["joined"], v["status"]) == ("keep", 1, "open")
        assert v["nodes"]["keep-2"] == "pending"
        assert hub.launch_stop("keep")["status"] == "stopped"


def test_the_cli_dry_run_shows_what_would_run_and_runs_nothing(hub_process: Any,
                                                              tmp_path: Path) -> None:
    home = str(hub_process.home)
    p = odium_cli("launch", "ssh", "hostA", "hostB", "--per-host", "2", "--name", "lab",
                  "--python", "/opt/py/bin/python", "--dry-run", "--home", home)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert out.count("ssh -o BatchMode=yes") == 2 and "lab-1, lab-2" in out and "lab-4" in out
    assert "<credential>" in out and "odt1." not in out  # the credential is never shown
    assert "StrictHostKeyChecking" not in out  # host keys are checked as the user's ssh says
    assert "/opt/py/bin/python" in out
    p = odium_cli("launch", "slurm", "--nodes", "2", "--tasks-per-node", "2", "--partition",
                  "debug", "--time", "10", "--name", "job", "--dry-run", "--home", home, "--",
                  "--qos=low")
    if p.returncode == 1 and "sbatch not found" in p.stderr:
        pass  # (no Slurm client here: the refusal is the one the dry run gives too)
    else:
        assert p.returncode == 0, p.stderr
        assert "#SBATCH --nodes=2" in p.stdout and "#SBATCH --ntasks-per-node=2" in p.stdout
        assert "#SBATCH --partition=debug" in p.stdout and "--qos=low" in p.stdout
        assert "ODIUM_TOKEN=<credential> sbatch" in p.stdout and "odt1." not in p.stdout
    listed = odium_cli("launch", "list", "--json", "--home", home)
    assert listed.returncode == 0 and listed.stdout.strip() == "[]"  # nothing was opened


def test_launcher_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least one host"):
        SSH([])
    with pytest.raises(ConfigError, match="given twice"):
        SSH(["a", "a"])
    with pytest.raises(ConfigError, match="not a host"):
        SSH(["-oProxyCommand=x"])
    with pytest.raises(ConfigError, match="--time"):
        Slurm(time="soon")
    with pytest.raises(ConfigError, match="not a Slurm partition"):
        Slurm(partition="a;b")
    with pytest.raises(LaunchError, match="no ssh config file"):
        SSH(["a"], ssh_config=str(tmp_path / "none")).check()
    env = {k: v for k, v in os.environ.items() if k != "PATH"} | {"PATH": str(tmp_path)}
    p = subprocess.run([sys.executable, "-c", "from odium.launch import Slurm; Slurm().check()"],
                       env=env, capture_output=True, text=True, timeout=30)
    assert "sbatch not found" in p.stderr


def test_a_manual_launch_writes_its_credential_and_says_what_each_node_runs(
        hub_process: Any, tmp_path: Path) -> None:
    home = str(hub_process.home)
    cred = tmp_path / "lab.credential"
    p = odium_cli("launch", "manual", "--count", "2", "--name", "pcs", "--file", str(cred),
                  "--home", home)
    assert p.returncode == 0, p.stderr
    assert cred.stat().st_mode & 0o777 == 0o600 and "odt1." not in p.stdout
    commands = [ln.strip() for ln in p.stdout.splitlines() if ln.strip().startswith("odium")]
    assert commands == [f"odium node --token-file {cred} --name pcs-{k}" for k in (1, 2)]
    node = NodeProcess(tmp_path / "pc", [*commands[1].split()[2:], "--app", str(tmp_path)])
    node.start()
    try:
        def up() -> bool:
            (v,) = json.loads(odium_cli("launch", "list", "--json", "--home", home).stdout)
            return bool(v["nodes"] == {"pcs-1": "pending", "pcs-2": "ready"})

        wait_until(up, 30, "pcs-2 ready", interval=0.2)
        table = odium_cli("launch", "list", "--home", home).stdout
        assert "pcs" in table and "manual" in table and "1/2" in table
        nodes = odium_cli("nodes", "--home", home).stdout.splitlines()
        assert nodes[0].split()[-1] == "LAUNCH" and nodes[1].split()[-1] == "pcs", nodes
    finally:
        node.stop()
    again = odium_cli("launch", "manual", "--count", "1", "--file", str(cred), "--home", home)
    assert again.returncode == 1 and "exists already" in again.stderr
