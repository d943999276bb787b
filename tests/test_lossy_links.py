"""Lossy and broken links on a real topology: the hub and a node each in a network namespace
of their own, joined by a veth pair; nftables in the node's namespace drops packets (10 % each
way at random) or everything (a partition), then stops. Broadcasts and jobs still complete and
account for the node; a short partition during a broadcast gives its result once; a long one
makes the node lost, it comes back by itself, and its late answer changes nothing recorded.

(Per-packet delay would need netem, which this machine's kernel lacks: the delay is a relay in
the node's namespace that holds every byte, tests/slowlink.py; with the loss on the veth, that
is the issue's "200 ms and 10 % loss".)"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from odium.core.keys import Token

from .conftest import end_process, wait_until
from .test_faults import HUB_ADDR, NetPair, issue_token, netns_pair  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(240)

TABLE = "odium_test"


@dataclass
class Site:
    """The hub (1 s heartbeat: lost after 5 s of silence) in one namespace, node ``far`` in
    the other."""

    net: NetPair
    home: Path
    app: Path
    procs: list[subprocess.Popen[str]]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.net.cli(self.net.hub_ns, *args)

    def status(self) -> str:
        p = self.cli("nodes", "--home", str(self.home), "--json")
        assert p.returncode == 0, p.stderr
        return {n["name"]: n["status"] for n in json.loads(p.stdout)["nodes"]}.get("far", "")

    def events(self, kind: str) -> list[dict[str, str]]:
        p = self.cli("log", "--home", str(self.home), "--json", "-n", "500")
        data = json.loads(p.stdout)
        return [e for e in (data["events"] if isinstance(data, dict) else data)
                if e["kind"] == kind]

    def nft(self, *rules: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.net.node_ns, "nft", *rules], check=True,
                       capture_output=True, text=True, timeout=10)

    def drop(self, rule: str) -> None:
        """Drop, in both directions on the node's side, what ``rule`` matches."""
        self.heal()
        self.nft("add", "table", "inet", TABLE)
        for chain, hook in (("in", "input"), ("out", "output")):
            self.nft("add", "chain", "inet", TABLE, chain,
                     f"{{ type filter hook {hook} priority 0 ; }}")
            self.nft("add", "rule", "inet", TABLE, chain, "ip", "protocol", "tcp", *rule.split())

    def heal(self) -> None:
        subprocess.run(["ip", "netns", "exec", self.net.node_ns, "nft", "delete", "table",
                        "inet", TABLE], capture_output=True, timeout=10)

    def start_hub(self, tmp: Path) -> None:
        self.procs.append(self.net.popen(self.net.hub_ns, [
            "hub", "--home", str(self.home), "--interface", HUB_ADDR, "--ports", "0",
            "--heartbeat", "1", "--app", str(tmp)], tmp / "hub.log"))
        wait_until(lambda: (self.home / "hub.json").exists(), 15, "hub.json")

    def close(self) -> None:
        """The link healed, every process stopped (the last started first)."""
        self.heal()
        for p in reversed(self.procs):
            end_process(p)


def make_site(netns_pair: NetPair, tmp_path: Path) -> Site:  # noqa: F811
    if not shutil.which("nft"):
        pytest.skip("nftables is not installed (apt install nftables)")
    home, app = tmp_path / "hub", tmp_path / "app"
    home.mkdir(mode=0o700)
    app.mkdir()
    return Site(netns_pair, home, app, [])


@pytest.fixture
def site(netns_pair: NetPair, tmp_path: Path) -> Iterator[Site]:  # noqa: F811
    s = make_site(netns_pair, tmp_path)
    try:
        s.start_hub(tmp_path)
        tok = issue_token(s.home, run=s.cli)
        s.procs.append(s.net.popen(s.net.node_ns, [
            "node", "--home", str(tmp_path / "far"), "--token", tok, "--name", "far", "--app",
            str(s.app)], tmp_path / "far.log"))
        wait_until(lambda: s.status() == "ready", 30, "far ready")
        yield s
    finally:
        s.close()


def run_async(s: Site, code: str, timeout: float) -> subprocess.Popen[str]:
    p = subprocess.Popen(["ip", "netns", "exec", s.net.hub_ns, sys.executable, "-m", "odium",
                          "run", "--home", str(s.home), "--json", "--timeout", str(timeout),
                          "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    s.procs.append(p)
    return p


def running(s: Site) -> list[str]:
    p = s.cli("nodes", "--home", str(s.home), "--json")
    return list(next(n for n in json.loads(p.stdout)["nodes"] if n["name"] == "far")["running"])


def test_ten_percent_loss_each_way(site: Site) -> None:
    site.drop("numgen random mod 10 == 0 drop")
    t0 = time.monotonic()
    for i in range(10):
        p = site.cli("run", "--home", str(site.home), "--json", "--timeout", "30", "-c",
                     f"{i} * 2")
        assert p.returncode == 0, p.stdout + p.stderr
        res = json.loads(p.stdout)["nodes"]
        assert set(res) == {"far"} and res["far"]["status"] == "ok", res
        assert res["far"]["value"] == 2 * i
    took = time.monotonic() - t0
    ids = []
    for i in range(20):
        p = site.cli("submit", "--home", str(site.home), "-c", f"sum(range({i}))")
        assert p.returncode == 0, p.stderr
        ids.append(p.stdout.split()[0])

    def done() -> bool:
        p = site.cli("jobs", "--home", str(site.home), "--json", "--status", "done",
                     "-n", "100")
        return p.returncode == 0 and {j["id"] for j in json.loads(p.stdout)} >= set(ids)

    wait_until(done, 120, "20 jobs done over the lossy link")
    assert site.status() == "ready"
    print(f"10 broadcasts over 10 % loss each way: {took:.1f} s")


def test_a_short_partition_during_a_broadcast_gives_the_result_once(site: Site) -> None:
    mark = site.app / "ran.txt"
    run = run_async(site, f"import time; time.sleep(4); open({str(mark)!r}, 'a').write('x'); 7",
                    30)
    wait_until(lambda: running(site), 15, "the command running on far")
    site.drop("drop")  # cut: nothing passes either way
    cut = time.monotonic()
    wait_until(lambda: time.monotonic() - cut >= 3.0, 5, "3 s of partition")
    site.heal()
    out, err = run.communicate(timeout=60)
    assert run.returncode == 0, out + err
    res = json.loads(out)["nodes"]["far"]
    assert res["status"] == "ok" and res["value"] == 7, res
    assert mark.read_text() == "x"  # ran once
    assert site.status() == "ready"
    assert not site.events("node_lost")  # 3 s is less than 5 heartbeats


def test_a_long_partition_makes_the_node_lost_then_it_comes_back(site: Site) -> None:
    mark = site.app / "ran.txt"
    run = run_async(site, f"import time; time.sleep(3); open({str(mark)!r}, 'a').write('x'); 7",
                    60)
    wait_until(lambda: running(site), 15, "the command running on far")
    site.drop("drop")
    try:
        out, err = run.communicate(timeout=60)  # the node is lost: the broadcast ends
        res = json.loads(out)["nodes"]["far"]
        assert res["status"] == "lost", res
        wait_until(lambda: mark.exists(), 20, "the command to end on the node, cut off")
    finally:
        site.heal()
    wait_until(lambda: site.status() == "ready", 60, "far back after the partition")
    wait_until(lambda: [e for e in site.events("late_result") if e["node"] == "far"], 30,
               "its late answer said")
    assert mark.read_text() == "x"
    p = site.cli("run", "--home", str(site.home), "--json", "--timeout", "20", "-c", "1")
    assert p.returncode == 0 and json.loads(p.stdout)["nodes"]["far"]["status"] == "ok"


LINK = """
import signal, sys, time
sys.path.insert(0, {root!r})
from tests.slowlink import SlowLink
link = SlowLink({ports!r}, {delay!r}, host="127.0.0.1", target={target!r})
print("ready", flush=True)
signal.sigwait({{signal.SIGTERM, signal.SIGINT}})
link.close()
"""


def test_a_far_lossy_link_200_ms_and_10_percent(netns_pair: NetPair,  # noqa: F811
                                               tmp_path: Path) -> None:
    """Both at once: the node reaches the hub through a relay in its own namespace that
    delays every byte 200 ms each way, over a veth that loses 10 % of packets each way. It
    joins, and broadcasts and jobs complete."""
    s = make_site(netns_pair, tmp_path)
    net, home, app = s.net, s.home, s.app
    try:
        s.start_hub(tmp_path)
        ports = json.loads((home / "hub.json").read_text())["ports"]
        root = str(Path(__file__).resolve().parent.parent)
        relay = subprocess.Popen(
            ["ip", "netns", "exec", net.node_ns, sys.executable, "-c",
             LINK.format(root=root, ports=sorted(ports.values()), delay=0.2, target=HUB_ADDR)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        s.procs.append(relay)
        assert relay.stdout is not None and relay.stdout.readline().strip() == "ready"
        s.drop("numgen random mod 10 == 0 drop")
        tok = issue_token(home, run=s.cli)  # the token names the hub's address: go through
        token = Token.decode(tok)           # the relay on the node's own loopback instead
        tok = dataclasses.replace(token, address=token.address.replace(HUB_ADDR,
                                                                       "127.0.0.1")).encode()
        t0 = time.monotonic()
        s.procs.append(net.popen(net.node_ns, ["node", "--home", str(tmp_path / "far"),
                                               "--token", tok, "--name", "far", "--app",
                                               str(app)], tmp_path / "far.log"))
        wait_until(lambda: s.status() == "ready", 90, "far ready over the far lossy link")
        joined = time.monotonic() - t0
        for i in range(5):
            p = s.cli("run", "--home", str(home), "--json", "--timeout", "30", "-c", f"{i} + 1")
            assert p.returncode == 0, p.stdout + p.stderr
            assert json.loads(p.stdout)["nodes"]["far"]["value"] == i + 1
        ids = [s.cli("submit", "--home", str(home), "-c", f"{i} * 3").stdout.split()[0]
               for i in range(10)]

        def done() -> bool:
            p = s.cli("jobs", "--home", str(home), "--json", "--status", "done", "-n", "50")
            return {j["id"] for j in json.loads(p.stdout)} >= set(ids)

        wait_until(done, 120, "10 jobs done over the far lossy link")
        print(f"200 ms each way and 10 % loss each way: ready in {joined:.1f} s")
    finally:
        s.close()
