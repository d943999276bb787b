"""Required states, diffs and sync with real nodes: real git repositories, real virtual
environments, real node processes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import odium
from odium import Status
from odium.errors import StateMismatchError

from .conftest import HB, git, odium_cli, wait_until
from .test_state import TINY, Venv, build_wheel


def commit(repo: Path, name: str, text: str, msg: str) -> str:
    (repo / name).write_text(text)
    git(repo, "add", name)
    git(repo, "commit", "-q", "-m", msg)
    return git(repo, "rev-parse", "HEAD").strip()


@pytest.fixture
def two_commits(tmp_path: Path) -> tuple[Path, Path, str, str]:
    """A hub application at its second commit, and a clone of it one commit behind."""
    hub_app = tmp_path / "hubapp"
    hub_app.mkdir()
    git(hub_app, "init", "-q", "-b", "main")
    (hub_app / "pyproject.toml").write_text('[tool.odium]\nenv = ["ODIUM_TEST_LAB"]\n')
    git(hub_app, "add", "pyproject.toml")
    first = commit(hub_app, "app.py", "VALUE = 1\n", "first")
    node_app = tmp_path / "nodeapp"
    git(tmp_path, "clone", "-q", str(hub_app), str(node_app))
    second = commit(hub_app, "app.py", "VALUE = 2\n", "second")
    return hub_app, node_app, first, second


def started_hub(tmp_path: Path, app: Path, **kw: object) -> odium.Hub:
    return odium.Hub(tmp_path / "hub", ports=0, hb_interval=HB, app=app, **kw)  # type: ignore


def test_match_runs_only_where_the_commit_is_the_hubs(tmp_path, two_commits) -> None:
    hub_app, node_app, first, second = two_commits
    with started_hub(tmp_path, hub_app) as hub:
        assert hub.state == second
        hub.start_local(1, prefix="same")
        hub.start_local(1, prefix="old", app=node_app)
        r = hub.run("import app; app.VALUE", timeout=10)  # default: match (clean hub)
        assert r["same-1"].status is Status.OK and r["same-1"].value == 2
        old = r["old-1"]
        assert old.status is Status.STATE_MISMATCH
        assert old.state == first and old.value is None
        assert old.mismatch["required"] == second
        assert old.mismatch["diff"]["commit"]["relation"] == "behind"
        assert "behind" in old.mismatch["text"]
        # any: everywhere, each with its own state id
        r = hub.run("import app; app.VALUE", timeout=10, require="any")
        assert {n: (x.value, x.state) for n, x in r.items()} == {
            "same-1": (2, second), "old-1": (1, first)}
        # an explicit (short) id: only the node at that commit
        r = hub.run("import app; app.VALUE", timeout=10, require=first[:10])
        assert r["old-1"].value == 1 and r["same-1"].status is Status.STATE_MISMATCH
        assert r["same-1"].mismatch["relation"] == "ahead"  # of what was required
        assert r["same-1"].mismatch["diff"] == {}  # and the same as the hub
        # and through the CLI, against the running hub
        out = odium_cli("run", "--home", str(hub.home), "--require-state", "match", "--json",
                        "-c", "1")
        assert out.returncode == 1, out.stderr
        data = json.loads(out.stdout)
        assert data["nodes"]["old-1"]["status"] == "state mismatch"
        assert data["nodes"]["same-1"]["status"] == "ok"


def test_dirty_hub_runs_any_with_a_hint_and_refuses_match(tmp_path, two_commits) -> None:
    hub_app, _, _, second = two_commits
    (hub_app / "notes.txt").write_text("untracked\n")
    with started_hub(tmp_path, hub_app) as hub:
        assert hub.state.startswith(second + "+dirty.")
        hub.start_local(1, prefix="n")
        r = hub.run("1", timeout=10)
        assert r.ok and r.extra["required"] == "any"
        assert "commit" in r.extra["hint"]
        assert "without a state requirement" in str(r)
        with pytest.raises(StateMismatchError, match="not a clean commit"):
            hub.run("1", require="match")


def test_dirty_and_untracked_node_never_satisfies_and_says_which_files(
        tmp_path, two_commits) -> None:
    hub_app, node_app, first, _ = two_commits
    (node_app / "app.py").write_text("VALUE = 'edited'\n")
    (node_app / "scratch.py").write_text("x = 1\n")
    with started_hub(tmp_path, hub_app) as hub:
        hub.start_local(1, prefix="d", app=node_app)
        nr = hub.run("1", timeout=10, require=first)["d-1"]
        assert nr.status is Status.STATE_MISMATCH
        assert nr.state.startswith(first + "+dirty.")
        wait_until(lambda: hub.nodes()[0]["fingerprint"], 10, "the node's fingerprint")
        d = hub.run("1", timeout=10)["d-1"].mismatch["diff"]
        assert sorted(d["dirty"]) == ["app.py", "scratch.py"]


def test_state_diff_shows_env_names_never_values(tmp_path, two_commits, monkeypatch) -> None:
    hub_app, _, _, _ = two_commits
    monkeypatch.setenv("ODIUM_TEST_LAB", "hub-secret-value")
    with started_hub(tmp_path, hub_app) as hub:
        hub.start_local(1, prefix="same", env={"ODIUM_TEST_LAB": "hub-secret-value"})
        hub.start_local(1, prefix="other", env={"ODIUM_TEST_LAB": "node-secret-value"})
        wait_until(lambda: all(n["fingerprint"] for n in hub.nodes()), 10, "fingerprints")
        report = hub.state_report()
        assert report["nodes"]["same-1"]["diff"] == {}
        assert report["nodes"]["other-1"]["diff"]["env"] == ["ODIUM_TEST_LAB"]
        text = json.dumps(report)
        assert "secret-value" not in text
        out = odium_cli("state", "diff", "--home", str(hub.home))
        assert out.returncode == 1, out.stderr  # something differs
        assert "[other-1]" in out.stdout and "ODIUM_TEST_LAB" in out.stdout
        assert "secret-value" not in out.stdout


def test_package_at_two_versions_and_a_missing_system_package(tmp_path, two_commits) -> None:
    hub_app, _, _, _ = two_commits
    (hub_app / "pyproject.toml").write_text(
        f'[tool.odium]\npip = ["{TINY}==1.1"]\nsystem = ["odium-no-such-deb-package"]\n')
    git(hub_app, "commit", "-q", "-am", "declare")
    wheels = tmp_path / "wheels"
    for v in ("1.0", "1.1"):
        build_wheel(wheels, TINY, v)
    old, new = Venv(tmp_path / "v10", wheels), Venv(tmp_path / "v11", wheels)
    old.pip_install("1.0")
    new.pip_install("1.1")
    with started_hub(tmp_path, hub_app) as hub:
        hub.start_local(1, prefix="v10", python=old.python)
        hub.start_local(1, prefix="v11", python=new.python)
        wait_until(lambda: all(n["fingerprint"] for n in hub.nodes()), 15, "fingerprints")
        nodes = {n["name"]: n for n in hub.nodes()}
        assert nodes["v10-1"]["unsatisfied"] == [f"{TINY}==1.1 (installed 1.0)"]
        assert nodes["v11-1"]["unsatisfied"] == []
        assert nodes["v10-1"]["missing_system"] == ["odium-no-such-deb-package"]
        report = hub.state_report()["nodes"]
        added10 = report["v10-1"]["diff"]["packages"]["added"]
        added11 = report["v11-1"]["diff"]["packages"]["added"]
        assert added10[TINY] == "1.0" and added11[TINY] == "1.1"
        kinds = {e["kind"] for e in hub.log(100) if e["node"] == "v10-1"}
        assert {"unsatisfied", "missing_system"} <= kinds
        # the node's own view, from the CLI in its environment
        shown = odium_cli("state", "--app", str(hub_app))
        assert shown.returncode == 0, shown.stderr
        assert "odium-no-such-deb-package" in shown.stdout


def test_sync_brings_a_node_one_commit_behind_to_the_hub(tmp_path, two_commits) -> None:
    hub_app, node_app, first, second = two_commits
    with started_hub(tmp_path, hub_app) as hub:
        hub.start_local(1, prefix="old", app=node_app)
        assert hub.run("1", timeout=10)["old-1"].status is Status.STATE_MISMATCH
        t0 = time.perf_counter()
        r = hub.sync("old-*", timeout=60)
        took = time.perf_counter() - t0
        assert r.ok, (r["old-1"], hub.log(30))
        assert r["old-1"].state == second
        assert f"synced from {first} to {second}" in r["old-1"].stdout
        hub.wait_for_nodes(["old-1"], 20)
        after = hub.run("import app; app.VALUE", timeout=10)["old-1"]  # match, by default
        assert after.status is Status.OK and after.value == 2
        assert git(node_app, "rev-parse", "HEAD").strip() == second
        assert took < 30  # the benchmark measures it; this only bounds a hang
        # a second sync has nothing to do and says so
        again = hub.sync("old-1", timeout=60)["old-1"]
        assert again.ok and again.stdout.startswith("at ")


def test_sync_refused_on_a_dirty_node_loses_nothing(tmp_path, two_commits) -> None:
    hub_app, node_app, first, _ = two_commits
    (node_app / "app.py").write_text("VALUE = 'my unsaved work'\n")
    with started_hub(tmp_path, hub_app) as hub:
        hub.start_local(1, prefix="dirty", app=node_app)
        nr = hub.sync("dirty-1", timeout=60)["dirty-1"]
        assert nr.status is Status.ERROR
        assert "uncommitted" in nr.error["evalue"] and "app.py" in nr.error["evalue"]
        assert (node_app / "app.py").read_text() == "VALUE = 'my unsaved work'\n"
        assert git(node_app, "rev-parse", "HEAD").strip() == first
        # the node is still there and still serves
        assert hub.run("1 + 1", require="any", timeout=10)["dirty-1"].value == 2


def test_sync_installs_declared_packages_from_the_hubs_wheelhouse(tmp_path, two_commits) -> None:
    hub_app, node_app, _, _ = two_commits
    third = commit(hub_app, "pyproject.toml", f'[tool.odium]\npip = ["{TINY}==1.1"]\n',
                   "declare the tiny package")
    wheels = tmp_path / "wheels"
    build_wheel(wheels, TINY, "1.1")
    venv = Venv(tmp_path / "venv", wheels)
    with started_hub(tmp_path, hub_app, wheelhouse=wheels) as hub:
        hub.start_local(1, prefix="lab", app=node_app, python=venv.python)
        r = hub.sync("lab-1", timeout=120)
        assert r.ok, (r["lab-1"], (hub.home / "local" / "lab-1" / "node.log").read_text())
        assert r["lab-1"].state == third
        assert f"{TINY}-1.1" in r["lab-1"].stdout
        hub.wait_for_nodes(["lab-1"], 20)
        wait_until(lambda: hub.nodes()[0]["fingerprint"], 10, "fingerprint after sync")
        assert hub.nodes()[0]["unsatisfied"] == []
        v = hub.run("import odium_tiny_pkg; odium_tiny_pkg.VERSION", timeout=10)["lab-1"]
        assert v.ok and v.value == "1.1"


def test_failed_install_puts_the_checkout_back(tmp_path, two_commits) -> None:
    hub_app, node_app, first, _ = two_commits
    commit(hub_app, "pyproject.toml", '[tool.odium]\npip = ["odium-not-on-any-index==9.9"]\n',
           "declare a package nobody has")
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    with started_hub(tmp_path, hub_app) as hub:
        hub.start_local(1, prefix="lab", app=node_app,
                        extra_args=["--find-links", str(empty)])
        nr = hub.sync("lab-1", timeout=120)["lab-1"]
        assert nr.status is Status.ERROR and nr.error["ename"] == "SyncFailed"
        assert "put back" in nr.error["evalue"], nr.error
        assert git(node_app, "rev-parse", "HEAD").strip() == first
        assert git(node_app, "status", "--porcelain") == ""
        assert hub.run("1", require="any", timeout=10)["lab-1"].state == first


def test_a_sync_too_big_for_one_message_fails_with_the_reason(tmp_path, two_commits) -> None:
    hub_app, node_app, first, _ = two_commits
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "big-1.0-py3-none-any.whl").write_bytes(b"x" * 200_000)
    with started_hub(tmp_path, hub_app, wheelhouse=wheels, max_message=64 * 1024) as hub:
        hub.start_local(1, prefix="lab", app=node_app)
        nr = hub.sync("lab-1", timeout=60)["lab-1"]
        assert nr.status is Status.ERROR and "message limit" in nr.error["evalue"], nr
        assert git(node_app, "rev-parse", "HEAD").strip() == first
