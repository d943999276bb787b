"""Frozen nodes (SIGSTOP: a machine suspended, a process stuck in swap): the hub reports the
node lost within a few heartbeats, a broadcast's entry for it is ``lost`` and its jobs go to
another node; after SIGCONT the node is back at once, without a new join, and what it finished
meanwhile is said (a broadcast's late answer) or recorded once (a job), never twice."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

import odium
from odium.core.results import Status

from .conftest import HB, wait_until
from .raw import events

pytestmark = pytest.mark.timeout(90)


def pids(hub: odium.Hub) -> dict[str, int]:
    return {n["name"]: int(n["pid"]) for n in hub.nodes()}


def status(hub: odium.Hub, name: str) -> str:
    return str(next(n for n in hub.nodes() if n["name"] == name)["status"])


def test_a_node_frozen_during_a_broadcast(hub: odium.Hub, tmp_path: Path) -> None:
    hub.start_local(2, prefix="n")
    pid = pids(hub)
    marks = tmp_path / "ran"
    marks.mkdir()
    h = hub.submit_broadcast(
        "import os, time; time.sleep(2); "
        f"open(os.path.join({str(marks)!r}, os.environ['ODIUM_NODE']), 'a').write('x'); 'done'",
        nodes="*", timeout=30)
    wait_until(lambda: all(h.cmd in n["running"] for n in hub.nodes()), 10,
               "both nodes running it")
    os.kill(pid["n-1"], signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        wait_until(lambda: status(hub, "n-1") == "lost", 20 * HB + 5, "n-1 reported lost")
        lost_after = time.monotonic() - stopped
        r = h.wait(20)
        assert r["n-1"].status is Status.LOST, r["n-1"]
        assert r["n-2"].ok and r["n-2"].value == "done"
        assert lost_after < 10 * HB + 2, f"lost only after {lost_after:.1f} s"
    finally:
        os.kill(pid["n-1"], signal.SIGCONT)
    wait_until(lambda: status(hub, "n-1") == "ready", 15, "n-1 back")
    # what it finished while counted lost is said, and not counted
    wait_until(lambda: [e for e in events(hub, "late_result") if e["node"] == "n-1"
                        and h.cmd[:12] in e["detail"] and "(ok" in e["detail"]], 15,
               "the late answer said")
    assert hub.run("1", nodes="*", timeout=10).ok
    assert (marks / "n-1").read_text() == "x" and (marks / "n-2").read_text() == "x"
    names = [n["name"] for n in hub.nodes()]
    assert sorted(names) == ["n-1", "n-2"]  # no second entry for the node that came back
    kinds = [e["kind"] for e in events(hub) if e["node"] == "n-1"]
    assert "node_lost" in kinds and "node_back" in kinds  # the user can tell what happened
    assert len(events(hub, "late_result")) == 1


def test_a_node_frozen_during_a_job(hub: odium.Hub, tmp_path: Path) -> None:
    """A job whose node froze goes to another node (it may retry); whichever answer comes
    first is recorded, once: the other run is cancelled, or its answer refused."""
    hub.start_local(1, prefix="a", capacity=2)
    pid = pids(hub)
    log = tmp_path / "runs.txt"
    code = ("import os, time; time.sleep(1.5); "
            f"open({str(log)!r}, 'a').write(os.environ['ODIUM_NODE'] + ' '); 7")
    job = hub.submit(code, nodes="*", retries=2)
    wait_until(lambda: hub.job(job.id)["status"] == "running", 10, "the job running")
    os.kill(pid["a-1"], signal.SIGSTOP)
    try:
        hub.start_local(1, prefix="b", capacity=2)
        wait_until(lambda: hub.job(job.id)["node"] == "b-1", 20, "the job sent to b-1")
    finally:
        os.kill(pid["a-1"], signal.SIGCONT)
    assert job.result(30) == 7
    wait_until(lambda: status(hub, "a-1") == "ready", 15, "a-1 back")
    assert hub.submit("1 + 1", nodes="*").result(20) == 2
    runs = log.read_text().split()
    assert runs[0] in ("a-1", "b-1") and len(runs) <= 2, runs
    rec = hub.job(job.id)
    done = [e for e in rec["events"] if e["status"] == "done"]
    assert len(done) == 1, rec["events"]
    assert any("retry 1/2" in e["detail"] for e in rec["events"]), rec["events"]
    assert rec["node"] == runs[0]  # the run that answered first is the one recorded


def test_a_job_with_no_retry_left_on_a_frozen_node_is_done_when_it_thaws(
        hub: odium.Hub, tmp_path: Path) -> None:
    """Lost is not dead: a job that may not run again waits for its node a while (25
    heartbeats) before it fails NodeLost; the node thawed, its run's result is the job's."""
    hub.start_local(1, prefix="a")
    pid = pids(hub)
    job = hub.submit("import time; time.sleep(1.5); 7", nodes="a-1", retries=0)
    wait_until(lambda: hub.job(job.id)["status"] == "running", 10, "the job running")
    os.kill(pid["a-1"], signal.SIGSTOP)
    try:
        wait_until(lambda: status(hub, "a-1") == "lost", 20 * HB + 5, "a-1 reported lost")
        assert hub.job(job.id)["status"] == "running"  # waiting for it, not failed
    finally:
        os.kill(pid["a-1"], signal.SIGCONT)
    assert job.result(20) == 7
    rec = hub.job(job.id)
    assert rec["status"] == "done" and rec["node"] == "a-1" and rec["attempts"] == 1, rec
    assert not [e for e in rec["events"] if e["status"] == "failed"]
