"""Trees of hubs on this machine: a root, relays that are nodes of it and hubs of their own
PCs, and commands, results, streams and interrupts through them (loopback; the namespaced
topology is tests/test_tree_netns.py)."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import odium
from odium.core.results import Status
from odium.errors import OdiumError

from .conftest import HB, NodeProcess, git, wait_until
from .test_cli import cli_json, cli_ok
from .test_state_nodes import commit

pytestmark = pytest.mark.timeout(120)


def _statuses(hub: odium.Hub) -> dict[str, str]:
    return {n["name"]: n["status"] for n in hub.nodes()}


def _ports(home: Path) -> str:
    """The ports the hub part of the instance at ``home`` listened on (hub.json is left
    behind by a SIGKILL), to serve on the same ones again."""
    p = json.loads((home / "hub.json").read_text())["ports"]
    return ",".join(str(p[k]) for k in ("pub", "query", "jobs", "results"))


def make_tree(hub: odium.Hub, tmp_path: Path, start: Callable[..., NodeProcess],
              relays: dict[str, list[str]],
              extra: Callable[[str], list[str]] = lambda path: []) -> dict[str, NodeProcess]:
    """Relays joined to ``hub`` (``--serve``), each with its leaves joined to it; waits until
    the root sees every leaf ready. Returns the processes by path. ``extra``: more arguments
    of ``odium node`` for the instance at a path."""
    procs: dict[str, NodeProcess] = {}
    for relay in relays:
        tok = tmp_path / f"{relay}.token"
        cli_ok("token", "--home", str(hub.home), "--name", relay, "--file", str(tok))
        procs[relay] = start(relay, "--token-file", str(tok), "--serve", "--ports", "0",
                             "--heartbeat", "0.5", *extra(relay))
    hub.wait_for_nodes(list(relays), 30)
    for relay, leaves in relays.items():
        for leaf in leaves:
            tok = tmp_path / f"{relay}-{leaf}.token"
            cli_ok("token", "--home", str(procs[relay].home), "--name", leaf, "--file", str(tok))
            procs[f"{relay}/{leaf}"] = start(f"{relay}-{leaf}", "--token-file", str(tok),
                                             "--name", leaf, *extra(f"{relay}/{leaf}"))
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


def test_streams_interrupts_and_timeouts_cross_relays(
        hub: odium.Hub, tmp_path: Path, node_processes: Callable[..., NodeProcess]) -> None:
    make_tree(hub, tmp_path, node_processes, {"lab1": ["pc-1", "pc-2"]})
    seen: list[tuple[str, str]] = []
    lock = threading.Lock()

    def out(node: str, stream: str, text: str) -> None:
        with lock:
            seen.append((node, text))

    # output arrives while the command runs, from every leaf
    handle = hub.submit_broadcast(
        "import time, sys\nprint('started', flush=True)\ntime.sleep(60)", nodes="lab1/*",
        timeout=120, on_output=out)
    wait_until(lambda: {n for n, t in list(seen) if "started" in t} == {"lab1/pc-1", "lab1/pc-2"},
               20, "the leaves' first output at the root while they run")
    assert not handle.ready()
    wait_until(lambda: all(handle.cmd in n["running"] for n in hub.nodes("lab1/*")), 10,
               "both leaves acknowledged")
    # the stop button reaches every leaf
    sent = time.monotonic()
    assert hub.interrupt(handle.cmd) is True
    r = handle.wait(15)
    assert time.monotonic() - sent < 5
    for path in ("lab1/pc-1", "lab1/pc-2"):
        assert r[path].status is Status.INTERRUPTED, r[path]
        assert r[path].error and r[path].error["ename"] == "KeyboardInterrupt"
    # a timeout too
    r = hub.run("import time; time.sleep(30)", nodes="lab1/pc-1", timeout=1)
    assert r["lab1/pc-1"].status is Status.TIMEOUT, r["lab1/pc-1"]
    # the namespaces survived both
    assert hub.run("7 * 6", nodes="lab1/*", timeout=20).values() == [42, 42]


def test_a_relay_killed_mid_command_makes_its_subtree_lost_and_comes_back(
        hub: odium.Hub, tmp_path: Path, node_processes: Callable[..., NodeProcess]) -> None:
    procs = make_tree(hub, tmp_path, node_processes, {"lab1": ["pc-1", "pc-2"], "lab2": ["pc-1"]})
    handle = hub.submit_broadcast("import time; time.sleep(60)", nodes="**", timeout=120)
    wait_until(lambda: all(handle.cmd in n["running"] for n in hub.nodes("lab1/*")), 20,
               "the leaves of lab1 to start")
    procs["lab1"].stop(signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: _statuses(hub)["lab1/pc-1"] == "lost", 15, "lab1's subtree to be lost")
    took = time.monotonic() - killed
    assert took < 10, f"{took:.1f} s"  # hub beats every 1 s; lost after 5 beats unheard
    st = _statuses(hub)
    assert st["lab1"] == st["lab1/pc-1"] == st["lab1/pc-2"] == "lost", st
    assert st["lab2/pc-1"] == "ready"
    assert hub.interrupt(handle.cmd)
    r = handle.wait(20)
    for path in ("lab1", "lab1/pc-1", "lab1/pc-2"):
        assert r[path].status is Status.LOST, (path, r[path])
    assert r["lab2/pc-1"].status is Status.INTERRUPTED
    assert "lab1" in r["lab1/pc-1"].error["evalue"]  # says why: its relay
    # a command now: the lost subtree is "not connected", the rest answers
    r = hub.run("1", nodes="**", timeout=20)
    assert r["lab1/pc-2"].status is Status.NOT_CONNECTED and r["lab2/pc-1"].value == 1
    # the relay comes back from its home, without new tokens, and so does its subtree
    again = node_processes("lab1", "--serve", "--ports", _ports(procs["lab1"].home),
                           "--heartbeat", "0.5")
    assert again.home == procs["lab1"].home
    wait_until(lambda: all(_statuses(hub).get(p) == "ready"
                           for p in ("lab1", "lab1/pc-1", "lab1/pc-2")), 40,
               "lab1 and its subtree back at the root")
    # (the leaves still run the sleep that was lost with their relay: another session)
    r = hub.run("2", nodes="lab1/**", timeout=20, session="after")
    assert r.values() == [2, 2, 2], r.to_dict()


def test_a_relays_own_admin_commands_only_its_subtree(
        hub: odium.Hub, tmp_path: Path, node_processes: Callable[..., NodeProcess]) -> None:
    procs = make_tree(hub, tmp_path, node_processes, {"lab1": ["pc-1", "pc-2"], "lab2": ["pc-1"]})
    home = str(procs["lab1"].home)
    got = cli_json("run", "--home", home, "--nodes", "**", "--timeout", "20", "-c", "5")
    assert sorted(got["nodes"]) == ["pc-1", "pc-2"]  # never its parent, never lab2's
    # a leaf the relay knows but is offline is "not connected" at the root
    assert procs["lab1/pc-2"].stop() == 0
    wait_until(lambda: _statuses(hub)["lab1/pc-2"] == "left", 15, "pc-2 gone at the root")
    r = hub.run("1", nodes="lab1/*", timeout=20)
    assert r["lab1/pc-2"].status is Status.NOT_CONNECTED and r["lab1/pc-1"].value == 1
    # forgotten at the root: gone there, though its relay still knows it
    assert hub.forget("lab1/pc-2") == ["lab1/pc-2"]
    after = time.time()
    wait_until(lambda: {n["name"]: n["last_seen"] for n in hub.nodes()}["lab1/pc-1"] > after,
               15, "a report from lab1 after the forget")
    assert "lab1/pc-2" not in _statuses(hub)
    assert sorted(hub.run("1", nodes="lab1/*", timeout=20)) == ["lab1/pc-1"]
    # forgotten at the relay: gone at the root too
    cli_ok("nodes", "forget", "pc-2", "--home", home)
    wait_until(lambda: "lab1/pc-2" not in _statuses(hub), 15, "pc-2 forgotten at the root")
    # forgetting a relay at the root forgets its subtree there
    procs["lab2"].stop()
    wait_until(lambda: _statuses(hub)["lab2"] == "left", 15, "lab2 gone")
    assert sorted(hub.forget("lab2")) == ["lab2", "lab2/pc-1"]
    assert sorted(_statuses(hub)) == ["lab1", "lab1/pc-1"]


def test_three_levels(hub: odium.Hub, tmp_path: Path,
                      node_processes: Callable[..., NodeProcess]) -> None:
    procs = make_tree(hub, tmp_path, node_processes, {"a": []})
    tok = tmp_path / "b.token"
    cli_ok("token", "--home", str(procs["a"].home), "--name", "b", "--file", str(tok))
    b = node_processes("b", "--token-file", str(tok), "--serve", "--ports", "0",
                       "--heartbeat", "0.5")
    tok = tmp_path / "c.token"
    wait_until(lambda: (b.home / "hub.json").exists(), 20, "b serving")
    cli_ok("token", "--home", str(b.home), "--name", "c", "--file", str(tok))
    node_processes("c", "--token-file", str(tok))
    wait_until(lambda: _statuses(hub).get("a/b/c") == "ready", 40, "a/b/c ready at the root")
    r = hub.run("import os; print(os.environ['ODIUM_NODE']); 6", nodes="**", timeout=30)
    assert sorted(r) == ["a", "a/b", "a/b/c"]
    assert r["a/b/c"].stdout == "c\n" and r["a/b/c"].value == 6
    assert sorted(hub.run("1", nodes="a/*/c", timeout=30)) == ["a/b/c"]
    # b's own admin reaches c (a path of one segment there), never a or the root
    got = cli_json("run", "--home", str(b.home), "--nodes", "**", "--timeout", "20", "-c", "1")
    assert sorted(got["nodes"]) == ["c"]


def _whoami(x: int) -> tuple[str, int]:
    import os
    return os.environ["ODIUM_NODE"], x * x


def test_jobs_run_on_the_leaves_through_relays(
        hub: odium.Hub, tmp_path: Path, node_processes: Callable[..., NodeProcess]) -> None:
    make_tree(hub, tmp_path, node_processes, {"lab1": ["pc-1", "pc-2"], "lab2": ["pc-1"]})
    # functions and code strings, through the relays' own queues, onto the leaves only
    got = hub.map(_whoami, range(60), nodes="*/*", wait=60)
    assert [v for _, v in got] == [x * x for x in range(60)]
    assert {n for n, _ in got} <= {"pc-1", "pc-2"} and len({n for n, _ in got}) >= 2
    job = hub.submit("import os; os.environ['ODIUM_NODE']", nodes="lab1/pc-2")
    assert job.result(30) == "pc-2"
    info = hub.job(job.id)
    assert info["node"] == "lab1" and info["status"] == "done"  # the relay took it
    # each relay kept what it ran in its own store, under the root's job ids
    relay_jobs = cli_json("jobs", "--home", str(tmp_path / "node-lab1"), "-n", "500")
    assert job.id in {j["id"] for j in relay_jobs}
    # a failure below comes back as the job's failure
    bad = hub.submit("1 / 0", nodes="lab2/*")
    with pytest.raises(odium.RemoteError, match="ZeroDivisionError"):
        bad.result(30)
    # a relay runs commands itself, but hands every job to the instances below it
    with pytest.raises(OdiumError, match="matches only relays"):
        hub.submit("1", nodes="lab*")


def test_jobs_through_a_relay_survive_its_restart_exactly_once(
        hub: odium.Hub, tmp_path: Path, node_processes: Callable[..., NodeProcess]) -> None:
    procs = make_tree(hub, tmp_path, node_processes, {"lab1": ["pc-1", "pc-2"]})
    marks = tmp_path / "marks"
    marks.mkdir()
    flag = tmp_path / "go"
    code = ("import os, time\n"
            f"while not os.path.exists({str(flag)!r}): time.sleep(0.01)\n"
            f"open(os.path.join({str(marks)!r}, '{{}}'), 'a').write('x')\n"
            "'{}'")
    jobs = [hub.submit(code.format(i, i), nodes="lab1/*") for i in range(6)]
    wait_until(lambda: sum(j.status == "running" for j in jobs) >= 2, 30, "jobs running below")
    procs["lab1"].stop(signal.SIGKILL)  # mid-job: the leaves go on; the relay's store keeps them
    again = node_processes("lab1", "--serve", "--ports", _ports(procs["lab1"].home),
                           "--heartbeat", "0.5")
    assert again.home == procs["lab1"].home
    wait_until(lambda: _statuses(hub).get("lab1") == "ready", 30, "lab1 back")
    flag.touch()
    assert sorted(j.result(60) for j in jobs) == [str(i) for i in range(6)]
    # every job's side effect happened exactly once
    assert sorted(p.name for p in marks.iterdir()) == [str(i) for i in range(6)]
    assert all(p.read_text() == "x" for p in marks.iterdir()), sorted({
        (p.name, p.read_text()) for p in marks.iterdir()})


def test_state_sync_through_a_relay(tmp_path: Path,
                                    node_processes: Callable[..., NodeProcess]) -> None:
    """``odium state sync --nodes 'lab1/**'``: the relay syncs itself first, then serves its
    nodes from its own repository (no internet), each refusing when dirty, as on a flat hub."""
    hub_app = tmp_path / "hubapp"
    hub_app.mkdir()
    git(hub_app, "init", "-q", "-b", "main")
    first = commit(hub_app, "app.py", "VALUE = 1\n", "first")
    apps = {}
    for path in ("lab1", "lab1/pc-1", "lab1/pc-2", "lab1/pc-3"):
        apps[path] = tmp_path / ("app-" + path.replace("/", "-"))
        git(tmp_path, "clone", "-q", str(hub_app), str(apps[path]))
    (apps["lab1/pc-3"] / "app.py").write_text("VALUE = 'my unsaved work'\n")
    second = commit(hub_app, "app.py", "VALUE = 2\n", "second")
    with odium.Hub(tmp_path / "hub", ports=0, hb_interval=HB, app=hub_app) as hub:
        make_tree(hub, tmp_path, node_processes, {"lab1": ["pc-1", "pc-2", "pc-3"]},
                  extra=lambda path: ["--app", str(apps[path])])
        before = hub.run("import app; app.VALUE", nodes="**", timeout=30)
        assert all(before[p].status is Status.STATE_MISMATCH for p in before), before.to_dict()
        nodes = hub.sync("lab1/**", timeout=90).to_dict()["nodes"]
        assert sorted(nodes) == ["lab1", "lab1/pc-1", "lab1/pc-2", "lab1/pc-3"]
        for path in ("lab1", "lab1/pc-1", "lab1/pc-2"):
            assert nodes[path]["status"] == "ok", (path, nodes[path])
            assert nodes[path]["state"] == second
            assert git(apps[path], "rev-parse", "HEAD").strip() == second
        assert nodes["lab1/pc-3"]["status"] == "error"
        assert "uncommitted" in nodes["lab1/pc-3"]["error"]["evalue"]
        assert git(apps["lab1/pc-3"], "rev-parse", "HEAD").strip() == first
        assert (apps["lab1/pc-3"] / "app.py").read_text() == "VALUE = 'my unsaved work'\n"
        wait_until(lambda: all(_statuses(hub).get(p) == "ready"
                               for p in ("lab1", "lab1/pc-1", "lab1/pc-2")), 30, "back")
        after = hub.run("import app; app.VALUE", nodes="**", timeout=30)  # match, by default
        assert [after[p].value for p in ("lab1", "lab1/pc-1", "lab1/pc-2")] == [2, 2, 2]
        assert after["lab1/pc-3"].status is Status.STATE_MISMATCH
