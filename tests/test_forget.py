"""Forgetting nodes (issue 9, item 2): ``*`` targets the nodes a user has, not every node the
hub ever saw. Real hubs, real node processes, the real ``odium`` command."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

import odium
from odium import OdiumError, Status

from .conftest import HB, HubProcess, NodeProcess, both_stores, odium_cli, wait_until


def statuses(hub: odium.Hub) -> dict[str, str]:
    return {n["name"]: n["status"] for n in hub.nodes()}


def test_forget_an_offline_node_and_star_works_again(hub: odium.Hub) -> None:
    hub.start_local(2, prefix="a")
    hub.local[0].stop()  # a lab PC switched off: still there, "not connected"
    wait_until(lambda: statuses(hub)["a-1"] == "left", 10, "a-1 to be left")
    r = hub.run("1", timeout=10)
    assert r["a-1"].status is Status.NOT_CONNECTED and r["a-2"].status is Status.OK
    key = next(n["key"] for n in hub.nodes() if n["name"] == "a-1")
    assert hub.forget("a-*") == ["a-1"]  # a-2 is connected: left alone
    r = hub.run("1", timeout=10)
    assert sorted(r) == ["a-2"] and r.ok
    assert "a-1" not in statuses(hub)
    assert key not in {k["key"] for k in hub.keys()}, "its key goes with it"
    assert any(e["kind"] == "node_forgotten" and e["node"] == "a-1" for e in hub.log())
    with pytest.raises(OdiumError, match="connected"):
        hub.forget("a-2")
    with pytest.raises(OdiumError, match="no node matches"):
        hub.forget("zz*")
    assert statuses(hub) == {"a-2": "ready"}


@both_stores
def test_forgotten_nodes_stay_forgotten_after_a_restart(tmp_path: Path,
                                                        store_db: str | None) -> None:
    home = tmp_path / "hub"
    with odium.Hub(home, ports=0, hb_interval=HB, app=tmp_path, db=store_db) as h:
        h.start_local(1, prefix="b")
        h.local[0].stop()
        wait_until(lambda: statuses(h)["b-1"] == "left", 10, "b-1 to be left")
        h.forget("b-1")
    with odium.Hub(home, ports=0, hb_interval=HB, app=tmp_path, db=store_db) as h:
        assert h.nodes() == []


def test_local_nodes_are_forgotten_when_their_hub_stops_them(tmp_path: Path) -> None:
    """Two notebooks one after the other, same home: the second sees only its own nodes."""
    home = tmp_path / "hub"
    with odium.Hub(home, ports=0, hb_interval=HB, app=tmp_path) as h:
        h.start_local(16, prefix="local")
        h.run("1", timeout=10).raise_for_error()
    with odium.Hub(home, ports=0, hb_interval=HB, app=tmp_path) as h:
        assert h.nodes() == [], "the first hub's local nodes are gone"
        events = h.log(500)
        # every node's bye was heard before it was forgotten, not rejected as a stranger's
        assert not [e for e in events if e["kind"] == "rejected"], events
        left = {e["node"] for e in events if e["kind"] == "node_left"}
        assert left == {f"local-{i}" for i in range(1, 17)}, events
        h.start_local(1, prefix="other")
        r = h.run("1", timeout=10)
        assert sorted(r) == ["other-1"] and r.ok


def test_revoked_nodes_are_listed_but_never_targeted(hub: odium.Hub) -> None:
    hub.start_local(3, prefix="c")
    hub.revoke("c-1")
    wait_until(lambda: statuses(hub)["c-1"] == "revoked", 10, "c-1 shown as revoked")
    hub.local[2].kill()  # off, not revoked: still targeted, "not connected"
    wait_until(lambda: statuses(hub)["c-3"] == "lost", 10, "c-3 to be lost")
    r = hub.run("1", timeout=10)
    assert sorted(r) == ["c-2", "c-3"]
    assert r["c-2"].status is Status.OK and r["c-3"].status is Status.NOT_CONNECTED
    with pytest.raises(odium.NotConnectedError):
        hub.run("1", nodes="c-1", timeout=10)
    with pytest.raises(odium.NotConnectedError):
        hub.submit("1", nodes="c-1")
    assert hub.forget("c-1") == ["c-1"]  # a revoked node is forgotten like an offline one


def test_cli_token_name_and_nodes_forget(hub_process: HubProcess, tmp_path: Path) -> None:
    h = str(hub_process.home)
    named = odium_cli("token", "--home", h, "--name", "gpu-01")
    assert named.returncode == 0, named.stderr
    assert named.stdout.endswith(" odium node --name gpu-01\n"), named.stdout
    assert "NAME" not in named.stdout.replace("gpu-01", "")
    bad = odium_cli("token", "--home", h, "--name", "no such name")
    assert bad.returncode == 2
    tfile = tmp_path / "join.token"
    plain = odium_cli("token", "--home", h, "--file", str(tfile))
    assert plain.stdout == f"odium node --token-file {tfile}\n", plain.stdout
    # pasted as printed (no --name): the node takes its host's name
    host = socket.gethostname().split(".")[0]
    node = NodeProcess(tmp_path / "pasted", ["--token-file", str(tfile),
                                             "--app", str(tmp_path)]).start()
    try:
        def listed() -> dict[str, str]:
            p = odium_cli("nodes", "--home", h, "--json")
            return {n["name"]: n["status"] for n in json.loads(p.stdout)["nodes"]}

        wait_until(lambda: listed().get(host) == "ready", 20, f"node {host} ready")
        busy = odium_cli("nodes", "--home", h, "forget", host)
        assert busy.returncode == 1 and "connected" in busy.stderr
        assert busy.stderr.count("\n") == 1
    finally:
        node.stop()
    wait_until(lambda: listed().get(host) == "left", 10, "the node to have left")
    gone = odium_cli("nodes", "--home", h, "forget", host)
    assert gone.returncode == 0, gone.stderr
    assert gone.stdout == f"forgot 1 node(s): {host}\n"
    assert listed() == {}
    assert "no nodes yet" in odium_cli("nodes", "--home", h).stdout


def test_magic_forget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """%odium forget, in a real IPython shell."""
    pytest.importorskip("IPython")
    from IPython.core.error import UsageError
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    import odium.jupyter

    monkeypatch.setenv("ODIUM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ODIUM_PORTS", "0")
    monkeypatch.setenv("ODIUM_HEARTBEAT", str(HB))
    monkeypatch.delenv("ODIUM_APP", raising=False)
    monkeypatch.chdir(tmp_path)
    ip = InteractiveShell.instance()
    with capture_output():
        ip.run_line_magic("load_ext", "odium")
    try:
        magics = odium.jupyter.current()
        assert magics is not None and magics.hub is not None
        hub = magics.hub
        with capture_output():
            ip.run_line_magic("odium", "local 2 --prefix m")
        hub.local[0].stop()
        wait_until(lambda: statuses(hub)["m-1"] == "left", 10, "m-1 to be left")
        with capture_output() as cap:
            assert ip.run_line_magic("odium", "forget m-*") == ["m-1"]
        assert "forgot 1 node: m-1" in cap.stdout
        with pytest.raises(UsageError, match="connected"):
            ip.run_line_magic("odium", "forget m-2")
        assert statuses(hub) == {"m-2": "ready"}
    finally:
        ip.run_line_magic("unload_ext", "odium")
