"""Commands and deadlines across restarts: one deadline, the hub's (issue + timeout), kept by the
node whether the command waits in its session or runs; a hub killed during a broadcast marks
it abandoned when it starts again, records what the nodes answer later, and the admin waiting
for it hears so at once instead of waiting for nothing."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import odium
from odium.core.results import Status

from .conftest import HubProcess, NodeProcess, wait_until
from .test_faults import all_ready, issue_token

pytestmark = pytest.mark.timeout(120)


def test_a_command_queued_behind_another_times_out_without_running(
        hub: odium.Hub, tmp_path: Path) -> None:
    hub.start_local(1, prefix="n")
    mark = tmp_path / "ran"
    first = hub.submit_broadcast("import time; time.sleep(4); 'first'", nodes="n-1",
                                 session="one", timeout=30)
    t0 = time.monotonic()
    queued = hub.submit_broadcast(f"open({str(mark)!r}, 'w'); 'second'", nodes="n-1",
                                  session="one", timeout=1.5)
    r = queued.wait(20)["n-1"]
    took = time.monotonic() - t0
    assert r.status is Status.TIMEOUT, r
    assert r.error is not None and "did not start" in r.error["evalue"], r.error
    assert took < 3.5, f"the timeout came after {took:.1f} s"  # the node's, not the hub's
    assert first.wait(20)["n-1"].value == "first"
    assert hub.run("'after'", nodes="n-1", session="one", timeout=10)["n-1"].value == "after"
    assert not mark.exists()  # the timed-out command never ran, not even later


def test_a_hub_killed_during_a_broadcast(hub_process: HubProcess,
                                         node_processes: Callable[..., NodeProcess],
                                         tmp_path: Path) -> None:
    home = hub_process.home
    node_processes("far", "--token", issue_token(home), "--app", str(tmp_path))
    wait_until(lambda: all_ready(home, {"far"}), 20, "the node ready")
    cli = subprocess.Popen(
        [sys.executable, "-m", "odium", "run", "--home", str(home), "--json", "--timeout", "60",
         "-c", "import time; time.sleep(3); 42"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    db = sqlite3.connect(home / "odium.db")
    try:
        def running() -> list[str]:
            return [r[0] for r in db.execute("SELECT id FROM commands WHERE status='running'")]

        wait_until(running, 10, "the command stored as running")
        (cmd,) = running()
        ports = hub_process.ports
        hub_process.stop(signal.SIGKILL)
        killed = time.monotonic()
        hub_process.ports_arg = ports
        hub_process.start()
        out, err = cli.communicate(timeout=30)
        waited = time.monotonic() - killed
        assert cli.returncode != 0
        assert "the hub restarted" in err and "abandoned" in err, err
        assert waited < 15, f"odium run waited {waited:.0f} s"
        wait_until(lambda: db.execute("SELECT status FROM commands WHERE id=?",
                                      (cmd,)).fetchone() == ("abandoned",), 10, "abandoned")
        # the node's answer, late, is recorded: the outcome of the command
        wait_until(lambda: db.execute("SELECT status, value FROM results WHERE command_id=? "
                                      "AND node='far'", (cmd,)).fetchone(), 20,
                   "the late result recorded")
        status, value = db.execute("SELECT status, value FROM results WHERE command_id=?",
                                   (cmd,)).fetchone()
        assert (status, json.loads(str(value))) == ("ok", 42)
        log = json.loads(subprocess.run(
            [sys.executable, "-m", "odium", "log", "--home", str(home), "--json", "-n", "200"],
            capture_output=True, text=True, timeout=30).stdout)
        kinds = {e["kind"] for e in (log["events"] if isinstance(log, dict) else log)}
        assert {"commands_abandoned", "late_result"} <= kinds, kinds
    finally:
        db.close()
        if cli.poll() is None:
            cli.kill()
            cli.communicate()

