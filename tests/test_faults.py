"""Faults with real processes and sockets: killed nodes, restarted hubs, lost PUB messages,
stopped nodes, interrupts and timeouts.

The lost-message test cuts a real link: the node runs in a network namespace of its
own, joined to a hub in another one by a veth pair, and a policy-routing rule drops
the hub's PUB traffic while everything else keeps flowing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import odium
from odium import Status

from .conftest import HB, HubProcess, NodeProcess, both_stores, odium_cli, wait_until

# --- helpers ---------------------------------------------------------------------------------


def node_info(hub: odium.Hub, name: str) -> dict[str, Any]:
    return next(n for n in hub.nodes() if n["name"] == name)


def cli_nodes(home: Path) -> dict[str, dict[str, Any]]:
    p = odium_cli("nodes", "--home", str(home), "--json", timeout=20)
    assert p.returncode == 0, p.stderr
    return {n["name"]: n for n in json.loads(p.stdout)["nodes"]}


def all_ready(home: Path, names: set[str]) -> bool:
    nodes = cli_nodes(home)
    return all(nodes.get(n, {}).get("status") == "ready" for n in names)


def issue_token(home: Path, *, run: Callable[..., subprocess.CompletedProcess[str]] = odium_cli
                ) -> str:
    p = run("token", "--home", str(home))
    assert p.returncode == 0, p.stderr
    words = p.stdout.split()
    assert words[0].startswith("ODIUM_TOKEN=") and words[1:3] == ["odium", "node"], p.stdout
    return words[0].split("=", 1)[1]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


APPEND = "open('ran.txt', 'a').write('x\\n')\n'ran'"  # runs in the node's app directory


# --- 1. a node killed while running a broadcast ------------------------------------------------


def test_sigkilled_node_becomes_lost_and_others_complete(hub4: odium.Hub) -> None:
    victim = next(n for n in hub4.local if n.name == "n-2")
    # only n-2's worker (a descendant of n-2's node process) waits, until its node is gone
    code = ("import time, psutil\n"
            f"mine = any(p.pid == {victim.proc.pid} for p in psutil.Process().parents())\n"
            f"while mine and psutil.pid_exists({victim.proc.pid}):\n"
            "    time.sleep(0.02)\n"
            "'done'")
    handle = hub4.submit_broadcast(code, timeout=30)
    wait_until(lambda: handle.cmd in node_info(hub4, "n-2")["running"], 10, "n-2 to start it")
    assert not handle.ready()

    victim.proc.kill()
    killed = time.monotonic()
    victim.proc.wait(5)
    r = handle.wait(10)
    elapsed = time.monotonic() - killed

    assert sorted(r) == ["n-1", "n-2", "n-3", "n-4"]  # every targeted node has an entry
    assert r["n-2"].status is Status.LOST, r["n-2"]
    assert r["n-2"].error and r["n-2"].error["ename"] == "NodeLost"
    assert elapsed < 10 * HB, f"lost reported {elapsed:.2f} s after the kill"
    for name in ("n-1", "n-3", "n-4"):
        assert r[name].status is Status.OK, r[name]
        assert r[name].value == "done"
    assert not r.ok and set(r.errors) == {"n-2"}
    assert node_info(hub4, "n-2")["status"] == "lost"

    # the dead node is answered for at once from now on: not connected
    again = hub4.submit_broadcast("1", nodes="n-2", timeout=10)
    assert again.ready()
    assert again.wait(0.1)["n-2"].status is Status.NOT_CONNECTED


# --- 2. the hub restarted with the same home -------------------------------------------------


@both_stores
def test_nodes_rejoin_a_restarted_hub_without_a_new_token(
        hub_process: HubProcess, node_processes: Callable[..., NodeProcess],
        tmp_path: Path) -> None:
    home = hub_process.home
    names = {"r1", "r2", "r3"}
    procs = {n: node_processes(n, "--token", issue_token(home), "--app", str(tmp_path))
             for n in sorted(names)}
    wait_until(lambda: all_ready(home, names), 20, "three nodes ready")
    first_boot = hub_process.info["boot"]

    ports = hub_process.ports
    hub_process.stop()
    assert not (home / "hub.json").exists()
    hub_process.ports_arg = ports  # same home, same ports
    hub_process.start()
    assert hub_process.info["boot"] != first_boot

    wait_until(lambda: all_ready(home, names), 20, "the nodes to rejoin the new hub")
    nodes = cli_nodes(home)
    for name, np in procs.items():
        assert np.proc is not None and np.proc.poll() is None
        assert nodes[name]["pid"] == np.proc.pid  # the same processes, no new join

    p = odium_cli("run", "--home", str(home), "--timeout", "10", "--json", "-c",
                  "import os; int(os.environ['ODIUM_NODE_PID'])")
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(p.stdout)
    assert set(res["nodes"]) == names
    for name, np in procs.items():
        assert res["nodes"][name]["status"] == "ok"
        assert res["nodes"][name]["value"] == np.proc.pid  # the same node process as before
    for np in procs.values():
        assert "Traceback" not in np.output()


# --- 3. a node that misses a command on PUB/SUB still runs it exactly once --------------------


def test_slow_joiner_runs_command_exactly_once(hub: odium.Hub, tmp_path: Path) -> None:
    """A broadcast issued the moment a node registers, before its SUB socket is surely
    connected, still reaches it (over fetch if PUB lost it), and only once."""
    app = tmp_path / "sj-app"
    app.mkdir()
    hub.start_local(1, prefix="sj", wait=False, app=app)
    wait_until(lambda: any(n["name"] == "sj-1" and n["status"] in ("connecting", "ready")
                           for n in hub.nodes()), 15, "sj-1 to register", interval=0.002)
    r = hub.submit_broadcast(APPEND, nodes="sj-1", timeout=10).wait(20)
    assert r["sj-1"].status is Status.OK, r["sj-1"]
    assert r["sj-1"].value == "ran"
    r2 = hub.run(APPEND, nodes="sj-1", timeout=10)
    assert r2.ok
    assert lines(app / "ran.txt") == ["x", "x"]


HUB_ADDR = "10.254.0.1"
NODE_ADDR = "10.254.0.2"


@dataclass
class NetPair:
    hub_ns: str
    node_ns: str

    def run(self, ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", ns, *args], capture_output=True,
                              text=True, timeout=20, check=check)

    def cli(self, ns: str, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(ns, sys.executable, "-m", "odium", *args, check=False)

    def popen(self, ns: str, args: list[str], log: Path) -> subprocess.Popen[str]:
        with open(log, "a") as f:
            return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "odium",
                                     *args], stdout=f, stderr=subprocess.STDOUT, text=True)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@pytest.fixture
def netns_pair() -> Iterator[NetPair]:
    """Two namespaces of our own joined by a veth pair: hub side 10.254.0.1, node side .2.

    On the node side the policy-routing table is arranged so that a rule can drop
    packets of an established connection (local-table lookup after our rules, TCP
    early demux off)."""
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("ss"):
        pytest.skip("network namespaces need root, ip and ss")
    pair = NetPair(f"odium-h{os.getpid()}", f"odium-n{os.getpid()}")
    made: list[str] = []
    try:
        for ns in (pair.hub_ns, pair.node_ns):
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "add", "vh", "netns", pair.hub_ns, "type", "veth", "peer", "name", "vn",
            "netns", pair.node_ns)
        _ip("-n", pair.hub_ns, "addr", "add", f"{HUB_ADDR}/24", "dev", "vh")
        _ip("-n", pair.node_ns, "addr", "add", f"{NODE_ADDR}/24", "dev", "vn")
        _ip("-n", pair.hub_ns, "link", "set", "vh", "up")
        _ip("-n", pair.node_ns, "link", "set", "vn", "up")
        pair.run(pair.node_ns, "sysctl", "-qw", "net.ipv4.tcp_early_demux=0")
        _ip("-n", pair.node_ns, "rule", "add", "pref", "100", "lookup", "local")
        _ip("-n", pair.node_ns, "rule", "del", "pref", "0")
        _ip("-n", pair.node_ns, "rule", "add", "pref", "10", "ipproto", "tcp", "sport", "9",
            "blackhole")  # probe: does this kernel match rules on ports?
        _ip("-n", pair.node_ns, "rule", "del", "pref", "10")
    except (subprocess.CalledProcessError, OSError) as e:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        err = getattr(e, "stderr", "") or str(e)
        pytest.skip(f"cannot build the network namespaces here: {err.strip()}")
    yield pair
    for ns in made:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def test_node_cut_off_pub_gets_the_command_exactly_once(netns_pair: NetPair,
                                                        tmp_path: Path) -> None:
    """Real network fault: the PUB traffic to node 'far' is dropped and its SUB connection
    reset while a broadcast goes out, then the link comes back. 'far' must run the command
    exactly once (via fetch), 'near' on the hub's side exactly once too, both reported."""
    net = netns_pair
    home = tmp_path / "hub"
    home.mkdir(mode=0o700)
    apps = {n: tmp_path / f"app-{n}" for n in ("near", "far")}
    for a in apps.values():
        a.mkdir()
    procs: list[subprocess.Popen[str]] = []
    try:
        hub = net.popen(net.hub_ns, ["hub", "--home", str(home), "--interface", HUB_ADDR,
                                     "--ports", "0", "--heartbeat", str(HB), "--app",
                                     str(tmp_path)], tmp_path / "hub.log")
        procs.append(hub)
        wait_until(lambda: (home / "hub.json").exists() or hub.poll() is not None, 15,
                   "hub.json")
        assert hub.poll() is None, (tmp_path / "hub.log").read_text()
        pub = json.loads((home / "hub.json").read_text())["ports"]["pub"]

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return net.cli(net.hub_ns, *args)

        for name, ns in (("near", net.hub_ns), ("far", net.node_ns)):
            tok = issue_token(home, run=cli)
            procs.append(net.popen(ns, ["node", "--home", str(tmp_path / f"node-{name}"),
                                        "--token", tok, "--name", name, "--app",
                                        str(apps[name])], tmp_path / f"{name}.log"))

        def ready() -> bool:
            p = cli("nodes", "--home", str(home), "--json")
            assert p.returncode == 0, p.stderr
            st = {n["name"]: n["status"] for n in json.loads(p.stdout)["nodes"]}
            return st.get("near") == st.get("far") == "ready"

        wait_until(ready, 20, "near and far ready")

        # cut: drop every packet from the hub's PUB port on far's side
        _ip("-n", net.node_ns, "rule", "add", "pref", "10", "ipproto", "tcp", "sport",
            str(pub), "blackhole")
        run = subprocess.Popen(["ip", "netns", "exec", net.hub_ns, sys.executable, "-m",
                                "odium", "run", "--home", str(home), "--timeout", "20",
                                "--json", "-c", APPEND], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        procs.append(run)
        # published: near (uncut) has run it; far has not, its copy is stuck in the cut
        wait_until(lambda: lines(apps["near"] / "ran.txt"), 10, "near to run the command")
        assert not (apps["far"] / "ran.txt").exists()
        # reset far's SUB connection, so what was in flight on it is gone for good
        ss = net.run(net.node_ns, "ss", "-K", "-n", "-t", "dst", HUB_ADDR, "dport", "=",
                     f":{pub}")
        assert f":{pub}" in ss.stdout, f"no SUB connection to reset: {ss.stdout} {ss.stderr}"
        _ip("-n", net.node_ns, "rule", "del", "pref", "10")  # the link comes back

        out, err = run.communicate(timeout=40)
        assert run.returncode == 0, out + err
        res = json.loads(out)
        assert set(res["nodes"]) == {"near", "far"}
        for name in ("near", "far"):
            assert res["nodes"][name]["status"] == "ok", res["nodes"][name]
            assert res["nodes"][name]["value"] == "ran"
            assert lines(apps[name] / "ran.txt") == ["x"], name

        # the link works again over PUB, and nothing ran twice
        p = cli("run", "--home", str(home), "--timeout", "10", "--json", "-c", APPEND)
        assert p.returncode == 0, p.stdout + p.stderr
        for name in ("near", "far"):
            assert lines(apps[name] / "ran.txt") == ["x", "x"], name
    finally:
        for pr in reversed(procs):
            if pr.poll() is None:
                pr.send_signal(signal.SIGTERM)
                try:
                    pr.wait(10)
                except subprocess.TimeoutExpired:
                    pr.kill()
                    pr.wait()
    for name in ("near", "far"):
        assert "Traceback" not in (tmp_path / f"{name}.log").read_text()


# --- 4. a stopped node ----------------------------------------------------------------------


def test_stopped_node_gets_not_connected_at_once(hub: odium.Hub) -> None:
    hub.start_local(2, prefix="s")
    stopped = next(n for n in hub.local if n.name == "s-2")
    stopped.stop()
    wait_until(lambda: node_info(hub, "s-2")["status"] not in ("ready", "connecting"), 5,
               "s-2 to be seen as gone")

    only = hub.submit_broadcast("1", nodes="s-2", timeout=10)
    assert only.ready()  # answered immediately, nothing to wait for
    nr = only.wait(0.1)["s-2"]
    assert nr.status is Status.NOT_CONNECTED
    assert nr.error and nr.error["ename"] == "NotConnected"

    r = hub.run("6 * 7", nodes="s-*", timeout=10)
    assert sorted(r) == ["s-1", "s-2"]
    assert r["s-1"].status is Status.OK and r["s-1"].value == 42
    assert r["s-2"].status is Status.NOT_CONNECTED
    assert not r.ok


# --- 5. interrupts and timeouts -------------------------------------------------------------


def test_interrupt_reaches_every_node(hub4: odium.Hub) -> None:
    handle = hub4.submit_broadcast("import time\ntime.sleep(30)", timeout=60)
    wait_until(lambda: all(handle.cmd in n["running"] for n in hub4.nodes()), 10,
               "all four to start")
    sent = time.monotonic()
    assert hub4.interrupt(handle.cmd) is True
    r = handle.wait(10)
    took = time.monotonic() - sent
    assert sorted(r) == ["n-1", "n-2", "n-3", "n-4"]
    for nr in r.results():
        assert nr.status is Status.INTERRUPTED, nr
        assert nr.error and nr.error["ename"] == "KeyboardInterrupt"
    assert took < 1.5, f"interrupt took {took:.2f} s"
    assert hub4.interrupt(handle.cmd) is False  # finished: nothing left to interrupt
    assert hub4.run("1 + 1", timeout=10).values() == [2, 2, 2, 2]  # namespaces survive


def test_shell_timeout_kills_the_whole_process_group(hub: odium.Hub, tmp_path: Path) -> None:
    """The timeout of a shell command ends every process it started: the foreground
    command, and a background one that ignores SIGINT and let go of stdout."""
    hub.start_local(1, prefix="t")
    pgfile = tmp_path / "pgid"
    code = (f"echo $$ > {pgfile}; (trap '' INT; exec sleep 30) >/dev/null 2>&1 & "
            "sleep 30")
    pgid = 0
    try:
        r = hub.run(code, nodes="t-1", shell=True, timeout=0.5)
        pgid = int(pgfile.read_text())
        assert r["t-1"].status is Status.TIMEOUT, r["t-1"]
        wait_until(lambda: not group_alive(pgid), 10,
                   f"process group {pgid} of the timed-out shell command to be gone")
    finally:
        if pgid and group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
