"""Broadcast execution end to end: real hub, real node processes, real sockets."""

from __future__ import annotations

import os

import pytest

import odium
from odium import NotConnectedError, Status

from .conftest import git, odium_cli


def test_python_broadcast_returns_everything(hub4: odium.Hub) -> None:
    r = hub4.run("import os\nprint('out', os.getpid())\n"
                 "import sys; print('err', file=sys.stderr)\n{'a': [1, 2]}", timeout=10)
    assert sorted(r) == ["n-1", "n-2", "n-3", "n-4"]
    assert r.ok
    pids = set()
    for _name, nr in r.items():
        assert nr.status is Status.OK
        assert nr.stdout.startswith("out ")
        pids.add(int(nr.stdout.split()[1]))
        assert nr.stderr == "err\n"
        assert nr.value == {"a": [1, 2]}
        assert nr.started is not None and nr.finished is not None
        assert nr.finished >= nr.started
        assert nr.state == hub4.state
    assert len(pids) == 4 and os.getpid() not in pids


def test_error_comes_back_with_traceback(hub4: odium.Hub) -> None:
    r = hub4.run("def f():\n    raise ValueError('bad value')\nf()", nodes="n-1", timeout=10)
    nr = r["n-1"]
    assert nr.status is Status.ERROR
    assert nr.error["ename"] == "ValueError"
    assert nr.error["evalue"] == "bad value"
    assert "line 2, in f" in nr.error["traceback"]
    assert "node/workers/" not in nr.error["traceback"]
    with pytest.raises(odium.RemoteError, match="bad value"):
        r.raise_for_error()


def test_shell_broadcast_exit_status(hub4: odium.Hub, tmp_path) -> None:
    r = hub4.run("pwd; echo oops >&2; exit 3", nodes="n-1,n-2", shell=True, timeout=10)
    assert sorted(r) == ["n-1", "n-2"]
    for nr in r.results():
        assert nr.status is Status.ERROR
        assert nr.exit == 3
        assert nr.stdout.strip() == str(tmp_path)
        assert nr.stderr == "oops\n"
    ok = hub4.run("echo fine", nodes="n-3", shell=True, timeout=10)
    assert ok.ok and ok["n-3"].exit == 0 and ok["n-3"].stdout == "fine\n"


def test_namespace_persists_per_session(hub4: odium.Hub) -> None:
    hub4.run("x = 20", nodes="n-1", timeout=10).raise_for_error()
    assert hub4.run("x + 1", nodes="n-1", timeout=10)["n-1"].value == 21
    other = hub4.run("x", nodes="n-1", session="other", timeout=10)["n-1"]
    assert other.status is Status.ERROR and other.error["ename"] == "NameError"


def test_non_json_value_falls_back_to_repr(hub4: odium.Hub) -> None:
    nr = hub4.run("object()", nodes="n-2", timeout=10)["n-2"]
    assert nr.ok and nr.value is None and nr.value_json is False
    assert nr.value_repr.startswith("<object object at")


def test_glob_matching_nothing_says_which_nodes_exist(hub4: odium.Hub) -> None:
    with pytest.raises(NotConnectedError, match="n-1, n-2, n-3, n-4"):
        hub4.run("1", nodes="gpu*")


def test_command_runs_in_app_dir_with_state_id(hub, app_repo) -> None:
    h2 = odium.Hub(hub.home.parent / "hub2", ports=0, hb_interval=0.2, app=app_repo)
    with h2:
        h2.start_local(1, prefix="a")
        r = h2.run("import app, os; (app.VALUE + 1, os.getcwd())", timeout=10)
        assert r["a-1"].value == [42, str(app_repo)]
        commit = git(app_repo, "rev-parse", "HEAD").strip()
        assert r["a-1"].state == commit == h2.state


def test_timeout_interrupts_and_reports(hub4: odium.Hub) -> None:
    r = hub4.run("import time\nwhile True: time.sleep(0.01)", nodes="n-1", timeout=0.5)
    assert r["n-1"].status is Status.TIMEOUT
    # the namespace survives an interrupted command
    assert hub4.run("1 + 1", nodes="n-1", timeout=10)["n-1"].value == 2


def test_long_command_does_not_block_heartbeats_or_other_sessions(hub4: odium.Hub) -> None:
    slow = hub4.submit_broadcast("import time; time.sleep(3); 'slow'", nodes="n-1",
                                 session="slow", timeout=20)
    fast = hub4.run("'fast'", nodes="n-1", session="fast", timeout=10)
    assert fast["n-1"].value == "fast"
    assert not slow.ready()
    assert {n["name"]: n["status"] for n in hub4.nodes()}["n-1"] == "ready"
    assert slow.wait(20)["n-1"].value == "slow"


def test_stopping_the_hub_answers_every_waiting_broadcast(tmp_path) -> None:
    hub = odium.Hub(tmp_path / "h", ports=0, hb_interval=0.2, app=tmp_path).start()
    try:
        hub.start_local(1, prefix="w")
        handle = hub.submit_broadcast("import time; time.sleep(30)", timeout=60)
    finally:
        hub.close()
    r = handle.wait(5)  # answered, not left hanging: the node went first, or the hub did
    assert r["w-1"].status is Status.LOST
    assert r["w-1"].error["ename"] in ("HubStopped", "NodeLost")


def test_a_second_hub_on_the_same_home_is_refused(hub: odium.Hub, hub_process) -> None:
    with pytest.raises(odium.ConfigError, match="already running"):
        odium.Hub(hub.home, ports=0).start()
    out = odium_cli("hub", "--home", str(hub_process.home), "--ports", "0")
    assert out.returncode == 1
    assert out.stderr.startswith("odium: another hub (pid ") and "Traceback" not in out.stderr
