"""Skewed clocks: a node whose wall clock is minutes or a day off joins and works (it learns
its hub's time from the hub's signed answers and stamps with it), shows how far off it is, and
still refuses what is replayed or stamped by its own wrong clock.

The skew is real: the node process runs under libfaketime (LD_PRELOAD, ``apt install
faketime``), which moves every clock it reads; the hub and this test keep the true time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import odium
from odium.core import wire as P
from odium.local.home import write_token_file

from .conftest import end_process, odium_cli, wait_until
from .raw import events

LIBS = ("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1")
FAKETIME = next((p for p in LIBS if os.path.exists(p)), None)

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(FAKETIME is None,
                                 reason="libfaketime is not installed (apt install faketime)")]


class SkewedNode:
    """``odium node`` joined with a token, its clocks moved by ``offset`` (faketime's syntax:
    "+600s", "-1d"), read from a file so that a test can fix the clock while it runs."""

    def __init__(self, hub: odium.Hub, tmp: Path, name: str, offset: str) -> None:
        self.name = name
        self.rc = tmp / f"{name}.faketime"
        self.rc.write_text(offset + "\n")
        token = tmp / f"{name}.token"
        write_token_file(token, hub.token())
        self.logpath = tmp / f"{name}.log"
        env = {**os.environ, "LD_PRELOAD": str(FAKETIME), "FAKETIME_TIMESTAMP_FILE": str(self.rc),
               "FAKETIME_CACHE_DURATION": "1"}
        with open(self.logpath, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "odium", "node", "--home", str(tmp / f"home-{name}"),
                 "--token-file", str(token), "--name", name, "--app", str(tmp)],
                stdout=log, stderr=subprocess.STDOUT, text=True, env=env)

    def set(self, offset: str) -> None:
        self.rc.write_text(offset + "\n")

    def log(self) -> str:
        return self.logpath.read_text(errors="replace")


@pytest.fixture
def skewed(hub: odium.Hub, tmp_path: Path) -> Iterator[Callable[[str, str], SkewedNode]]:
    started: list[SkewedNode] = []

    def start(name: str, offset: str) -> SkewedNode:
        node = SkewedNode(hub, tmp_path, name, offset)
        started.append(node)
        return node

    yield start
    for node in started:
        end_process(node.proc)


def ready(hub: odium.Hub, node: SkewedNode, timeout: float = 30) -> None:
    try:
        hub.wait_for_nodes([node.name], timeout)
    except odium.OdiumError:
        raise AssertionError(f"{node.name} not ready:\n{node.log()[-3000:]}") from None


def skew_of(hub: odium.Hub, name: str) -> float:
    return float(next(n for n in hub.nodes() if n["name"] == name).get("clock_skew", 0.0))


@pytest.mark.parametrize("offset, seconds", [("+600s", 600), ("-600s", -600),
                                             ("+1d", 86400), ("-1d", -86400)])
def test_a_node_with_a_skewed_clock_joins_works_and_shows_it(
        hub: odium.Hub, skewed: Callable[[str, str], SkewedNode], offset: str,
        seconds: int) -> None:
    node = skewed("pc", offset)
    ready(hub, node)
    t0 = time.time()
    r = hub.run("import time; time.time()", nodes="pc", timeout=10)
    t1 = time.time()
    e = r["pc"]
    assert e.ok, e
    assert abs(e.value - (t0 + seconds)) < 30  # the code itself sees the machine's clock
    # the times the hub shows are the hub's (the node moved them from its own clock)
    assert e.started is not None and e.finished is not None
    assert t0 - 2 <= e.started <= e.finished <= t1 + 2, (t0, e.started, e.finished, t1)
    wait_until(lambda: abs(skew_of(hub, "pc") - seconds) < 5, 10, "the skew reported")
    job = hub.submit("1 + 1", nodes="pc")
    assert job.result(20) == 2
    rec = hub.job(job.id)
    assert t0 - 2 <= rec["started"] <= rec["finished"] <= time.time() + 2, rec
    # the user sees it: the event log, odium nodes, odium nodes --json
    assert [ev for ev in events(hub, "node_clock") if ev["node"] == "pc"
            and f"{seconds:+d} s off" in ev["detail"]]
    table = odium_cli("nodes", "--home", str(hub.home))
    assert table.returncode == 0, table.stderr
    word = "ahead" if seconds > 0 else "behind"
    assert "CLOCK" in table.stdout and f"{abs(seconds)} s {word}" in table.stdout, table.stdout
    listed = json.loads(odium_cli("nodes", "--home", str(hub.home), "--json").stdout)
    assert abs(listed["nodes"][0]["clock_skew"] - seconds) < 5


def test_a_clock_fixed_while_the_node_runs_is_followed(
        hub: odium.Hub, skewed: Callable[[str, str], SkewedNode]) -> None:
    node = skewed("pc", "-600s")
    ready(hub, node)
    wait_until(lambda: abs(skew_of(hub, "pc") + 600) < 5, 10, "the skew reported")
    node.set("+0s")  # NTP comes back: the wall clock steps 10 minutes forward

    def works() -> bool:
        r = hub.run("1", nodes="pc", timeout=3)
        return r["pc"].ok and abs(skew_of(hub, "pc")) < 5

    wait_until(works, 30, "commands to work and the skew to be gone")
    assert [ev for ev in events(hub, "node_clock") if "agrees with the hub's" in ev["detail"]]
    assert hub.submit("2 * 21", nodes="pc").result(20) == 42


def test_replay_protection_holds_for_a_skewed_node(
        hub: odium.Hub, skewed: Callable[[str, str], SkewedNode], tmp_path: Path) -> None:
    """The node's window is its hub's time, not its own wrong clock: a command captured and
    sent again is refused, and so is one stamped with the node's own (wrong) time."""
    node = skewed("pc", "+600s")
    ready(hub, node)
    core = hub.core
    key = next(n["key"] for n in hub.nodes() if n["name"] == "pc")
    mark = tmp_path / "ran.txt"

    def command(ts: float | None = None) -> bytes:
        body = P.Exec(P.new_id(), "python", f"open({str(mark)!r}, 'a').write('x')")
        sealed = core.keyring.seal("exec", body, [key], to=["pc"])
        if ts is None:  # as the hub sends it
            return core.rt.sign("sealed", sealed)
        return P.seal(core.rt.ident.signing, core.rt.ident.key_id, core.rt.state, "sealed",
                      sealed, ts=ts)

    def publish(raw: bytes) -> None:
        hub._call(lambda: core.sockets["pub"].send(raw))

    def refused(what: str) -> Callable[[], list[dict[str, object]]]:
        return lambda: [e for e in events(hub, "rejected")
                        if e["node"] == "pc" and what in str(e["detail"])]

    captured = command()
    publish(captured)
    wait_until(lambda: mark.exists() and mark.read_text() == "x", 10, "the command to run")
    publish(captured)  # captured and sent again
    wait_until(refused("replayed message"), 10, "the replay refused")
    publish(command(ts=time.time() + 600))  # stamped by the node's own (wrong) clock
    publish(command(ts=time.time() - 400))  # stale
    wait_until(refused("+600 s off the receiver's clock"), 10, "the node's own time refused")
    wait_until(refused("-400 s off the receiver's clock"), 10, "the stale command refused")
    assert hub.run("1", nodes="pc", timeout=10)["pc"].ok  # and the node works on
    assert mark.read_text() == "x"  # ran once: neither the replay nor the others ran
