"""A node that missed its group of readers' key asks for it, and loses no command or job
(odium.core.sealing groups, odium.node.groups): real hub, real node processes."""

from __future__ import annotations

from pathlib import Path

import pytest

import odium

from .conftest import NodeProcess, wait_until


def where(i: int) -> tuple[str, int]:
    import os
    import time

    time.sleep(0.05)  # (a test's job that takes its time, not a wait for anything)
    return os.environ["ODIUM_NODE"], i


def _status(hub: odium.Hub, name: str) -> str:
    return next(n["status"] for n in hub.nodes() if n["name"] == name)


def test_a_node_started_again_asks_for_its_groups_key_and_runs_each_command_once(
        hub: odium.Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node killed and started again with the same home has the same key, so the hub's
    group of readers for the same targets is the same group (for a minute), whose key the
    node no longer has: the next command names only the group. The node asks for the key
    and runs the command, once, and the jobs sealed to that group reach it too."""
    app = tmp_path / "app"
    app.mkdir()
    hub.start_local(2, prefix="g", app=app)
    assert hub.run("1", nodes="g-*", timeout=20).ok  # the group's first message: wrapped keys
    assert len(hub.map(where, range(20), nodes="g-*", wait=60)) == 20  # the jobs' group too
    victim = next(n for n in hub.local if n.name == "g-2")
    victim.kill()
    victim.proc.wait(5)
    wait_until(lambda: _status(hub, "g-2") == "lost", 30, "g-2 to be lost")
    monkeypatch.setenv("ODIUM_LOG", "info")
    again = NodeProcess(victim.home, ["--app", str(app)]).start()
    try:
        hub.wait_for_nodes(["g-2"], 30)
        code = (f"import os\nopen(os.path.join({str(tmp_path)!r}, os.environ['ODIUM_NODE']),"
                " 'a').write('x')\nos.environ['ODIUM_NODE']")
        r = hub.run(code, nodes="g-*", timeout=20)
        assert r.ok, r
        assert {n: r[n].value for n in r} == {"g-1": "g-1", "g-2": "g-2"}
        assert "asking the hub for the keys of 1 group(s)" in again.output()
        assert (tmp_path / "g-2").read_text() == "x"  # once: held, then run; not fetched too
        # jobs: the group of the nodes that may run them was announced before g-2 restarted
        values = hub.map(where, range(60), nodes="g-*", wait=60)
        assert [i for _n, i in values] == list(range(60))
        assert {n for n, _i in values} == {"g-1", "g-2"}  # (50 ms each: both nodes' slots fill)
    finally:
        again.stop()
