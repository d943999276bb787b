"""Many commands at once on one node: the node takes them all before the first has finished.
Commands in different sessions run at once (a worker process each), shell commands too (a
process each); commands in one session run in order (one namespace, like a notebook's kernel).
What bounds them is the node's memory and process limit, one process per session or shell
command (bench/bench_many.py measures it)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import odium

from .conftest import wait_until

pytestmark = pytest.mark.timeout(120)

N = 200


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[odium.Hub]:
    """A hub with the default heartbeat (1 s: a node is lost after 5 s without a word): 400
    processes starting at once on a small machine keep a node from beating for more than the
    1 s the suite's fast heartbeat allows."""
    with odium.Hub(tmp_path / "hub", ports=0, app=tmp_path) as h:
        yield h


def workers(pid: int) -> int:
    return len(psutil.Process(pid).children(recursive=True))


def test_two_hundred_commands_at_once_on_one_node(hub: odium.Hub) -> None:
    hub.start_local(1, prefix="n")
    pid = int(hub.nodes()[0]["pid"])
    assert hub.run("true", nodes="n-1", shell=True, timeout=30).ok  # the reaper started
    wait_until(lambda: workers(pid) >= 3, 30, "the node's helpers and spare worker")
    before = workers(pid)  # zygote, reaper, spare worker
    t0 = time.monotonic()
    python = [hub.submit_broadcast(f"import time; time.sleep(1); {i}", nodes="n-1",
                                   session=f"s{i}", end_session=True, timeout=60)
              for i in range(N)]
    shell = [hub.submit_broadcast(f"sleep 1; echo {i}", nodes="n-1", shell=True, timeout=60)
             for i in range(N)]
    results = [h.wait(90) for h in python + shell]
    took = time.monotonic() - t0
    bad = [(i, r["n-1"]) for i, r in enumerate(results[:N]) if r["n-1"].value != i]
    assert not bad, (len(bad), bad[:3])
    assert [r["n-1"].stdout for r in results[N:]] == [f"{i}\n" for i in range(N)]
    assert all(r["n-1"].ok for r in results)
    # far less than the 400 s they would take one after another (the time itself is a
    # benchmark's: bench/bench_many.py)
    assert took < 120
    # every session was closed with its command: its worker is gone
    wait_until(lambda: workers(pid) <= before, 30, "the sessions' workers to exit")
    print(f"{2 * N} commands of 1 s at once on one node: {took:.1f} s")


def test_commands_in_one_session_run_in_order(hub: odium.Hub) -> None:
    hub.start_local(1, prefix="n")
    hs = [hub.submit_broadcast(f"import time; time.sleep(0.05); seen.append({i}) "
                               "if 'seen' in globals() else globals().update(seen=[0]); seen",
                               nodes="n-1", session="one", timeout=60) for i in range(20)]
    last = [h.wait(60)["n-1"].value for h in hs][-1]
    assert last == list(range(20))
