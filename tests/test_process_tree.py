"""A node's worker processes: the node's whole tree dies with the node (SIGKILL a real node
process while its worker runs a long cell or job, and every process it had started, zygote,
workers, reaper, is gone within 2 s), and starting them never stalls the node (a slow zygote
does not make it lost).

The code under test writes its pid to a file before it sleeps; the test waits for that file
(with a deadline), never for a fixed time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import odium
from odium.core.results import Status

from .conftest import HB, wait_until

pytestmark = pytest.mark.timeout(60)

DEATH = 2.0  # seconds the whole tree may take to end after its node's death


def sleeper(pidfile: Path) -> str:
    """Code that notes its process id, then sleeps for ten minutes."""
    return (f"import os, pathlib, time\n"
            f"pathlib.Path({str(pidfile)!r}).write_text(str(os.getpid()))\n"
            f"time.sleep(600)\n")


def gone(p: psutil.Process) -> bool:
    """Ended (a zombie has ended: only its exit status is left for its parent to read)."""
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def describe(procs: list[psutil.Process]) -> str:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} (ppid {p.ppid()}): {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            out.append(f"{p.pid}: ?")
    return "; ".join(out)


def zygotes(node_pid: int) -> set[int]:
    out = set()
    for p in psutil.Process(node_pid).children():
        try:
            if p.name() == "odium-zygote":
                out.add(p.pid)
        except psutil.Error:
            pass
    return out


# a node whose zygote is a new interpreter, not forked from it (what a node part in any other
# process than ``odium node`` has), so that a sitecustomize can make it slow, or fail
EXEC = {"ODIUM_ZYGOTE": "exec"}
IN_ZYGOTE = "if 'odium.node.workers.zygote' in getattr(sys, 'orig_argv', []):\n"


def kill_and_watch(hub: odium.Hub, pidfile: Path, forked: bool = True) -> None:
    """SIGKILL the hub's one local node once the user's code runs in it; check its tree ends.
    ``forked``: the worker is a child of the node's zygote (else of the node)."""
    node = hub.local[0]
    worker_pid = int(wait_until(lambda: pidfile.exists() and pidfile.read_text(), 30,
                                "the user's code to start"))
    tree = psutil.Process(node.proc.pid).children(recursive=True)
    assert worker_pid in {p.pid for p in tree}, describe(tree)
    servers = zygotes(node.proc.pid)
    assert (psutil.Process(worker_pid).ppid() in servers) == forked, describe(tree)
    node.kill(signal.SIGKILL)
    node.proc.wait(10)
    died = time.monotonic()
    deadline = died + DEATH
    while time.monotonic() < deadline and not all(gone(p) for p in tree):
        time.sleep(0.02)
    left = [p for p in tree if not gone(p)]
    for p in left:  # do not leave them behind even when the test fails
        try:
            p.kill()
        except psutil.Error:
            pass
    assert not left, f"alive {DEATH} s after their node's death: {describe(left)}"


def test_a_killed_nodes_broadcast_worker_and_zygote_die(hub: odium.Hub,
                                                             tmp_path: Path) -> None:
    hub.start_local(1, prefix="tree")
    pidfile = tmp_path / "worker.pid"
    hub.submit_broadcast(sleeper(pidfile), "tree-1", require="any")
    kill_and_watch(hub, pidfile)


def test_a_killed_nodes_job_worker_and_zygote_die(hub: odium.Hub, tmp_path: Path) -> None:
    hub.start_local(1, prefix="tree", capacity=1)
    pidfile = tmp_path / "job.pid"
    hub.submit(sleeper(pidfile), nodes="tree-1")
    kill_and_watch(hub, pidfile)


def test_a_killed_nodes_shell_command_and_its_children_die(hub: odium.Hub,
                                                           tmp_path: Path) -> None:
    """A shell command runs in a session of its own (so that an interrupt reaches all of it):
    its processes are not the node's workers, and the parent-death signal would end only its
    first one. The node's reaper ends the whole group, background children too."""
    hub.start_local(1, prefix="tree")
    pidfile = tmp_path / "shell.pid"
    hub.submit_broadcast(f"sleep 600 & sleep 601 & echo $$ > {pidfile}; wait", "tree-1",
                         shell=True, require="any")
    kill_and_watch(hub, pidfile, forked=False)


def test_processes_the_users_code_starts_die_with_the_node(hub: odium.Hub,
                                                          tmp_path: Path) -> None:
    """A cell that starts a process of its own (in the worker's group): it ends with the node,
    though its parent, the worker, is killed and it is left an orphan."""
    hub.start_local(1, prefix="tree")
    pidfile = tmp_path / "child.pid"
    code = ("import subprocess, pathlib\n"
            "child = subprocess.Popen(['sleep', '600'])\n"
            f"pathlib.Path({str(pidfile)!r}).write_text(str(child.pid))\n"
            "child.wait()\n")
    hub.submit_broadcast(code, "tree-1", require="any")
    node = hub.local[0]
    child = int(wait_until(lambda: pidfile.exists() and pidfile.read_text(), 30,
                           "the user's process to start"))
    tree = psutil.Process(node.proc.pid).children(recursive=True)
    assert child in {p.pid for p in tree}, describe(tree)
    node.kill(signal.SIGKILL)
    node.proc.wait(10)
    deadline = time.monotonic() + DEATH
    while time.monotonic() < deadline and not all(gone(p) for p in tree):
        time.sleep(0.02)
    left = [p for p in tree if not gone(p)]
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    assert not left, f"alive {DEATH} s after their node's death: {describe(left)}"


def test_a_worker_has_the_nodes_environment_of_now_and_not_its_options(
        hub: odium.Hub) -> None:
    """The zygote is a copy of the node from before it joined: each worker still gets the
    node's environment as it is when the worker starts (ODIUM_NODE is set after the fork), a
    new interpreter's argv, and none of the node's memory of its key."""
    hub.start_local(1, prefix="env")
    code = ("import os, sys, gc\n"
            "keys = [o for o in gc.get_objects() if type(o).__name__ == 'Identity']\n"
            "(os.environ.get('ODIUM_NODE'), sys.argv, len(keys), os.getcwd())")
    r = hub.run(code, "env-1", require="any", timeout=30)["env-1"]
    assert r.ok, r.error
    assert r.value == ["env-1", ["-c"], 0, str(hub.core.rt.app)], r.value
    j = hub.submit("import os; os.environ.get('ODIUM_NODE')", nodes="env-1").result(30)
    assert j == "env-1"


# --- a slow zygote ----------------------------------------------------------------------------


def test_a_slow_zygote_does_not_make_the_node_lost(hub: odium.Hub, tmp_path: Path) -> None:
    """The first worker waits for the zygote's imports where the zygote is a new interpreter
    (seconds on a loaded machine); the node's loop must go on beating meanwhile, or its hub
    calls it lost (5 beats: 1 s here)."""
    slow = tmp_path / "slow"
    slow.mkdir()
    # a loaded machine, made certain: the zygote (only it) takes 3 s to start
    (slow / "sitecustomize.py").write_text(f"import sys, time\n{IN_ZYGOTE}    time.sleep(3)\n")
    path = os.pathsep.join(p for p in (str(slow), os.environ.get("PYTHONPATH", "")) if p)
    hub.start_local(1, prefix="slow", capacity=1, env={"PYTHONPATH": path, **EXEC})
    r = hub.run("1 + 1", require="any", timeout=30)
    assert r["slow-1"].status is Status.OK and r["slow-1"].value == 2, r["slow-1"]
    assert hub.submit("2 + 2", nodes="slow-1").result(30) == 4
    assert hub.nodes("slow-1")[0]["status"] == "ready"


# --- no zygote ------------------------------------------------------------------------------


def no_zygote_env(tmp_path: Path) -> dict[str, str]:
    """An environment in which the zygote cannot start (it exits as it starts): workers are
    then new interpreters, children of the node itself."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "sitecustomize.py").write_text(f"import os, sys\n{IN_ZYGOTE}    os._exit(3)\n")
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(broken), os.environ.get("PYTHONPATH", ""))
                                          if p), **EXEC}


def test_workers_without_a_zygote_live_and_die_with_the_node(hub: odium.Hub,
                                                             tmp_path: Path) -> None:
    hub.start_local(1, prefix="tree", env=no_zygote_env(tmp_path))
    r = hub.run("import os; os.getppid()", "tree-1", require="any", timeout=30)["tree-1"]
    assert r.ok and r.value == hub.local[0].proc.pid, r  # a child of the node: no zygote
    pidfile = tmp_path / "worker.pid"
    hub.submit_broadcast(sleeper(pidfile), "tree-1", require="any")
    kill_and_watch(hub, pidfile, forked=False)


# --- a zygote started again -----------------------------------------------------------------


def test_a_zygote_started_again_lives_on_with_its_workers(hub: odium.Hub) -> None:
    """A killed zygote takes its workers with it; the node's next workers come from a new one
    (a new interpreter: the node has threads now, it cannot fork itself again). The
    parent-death signal follows the node's *thread* that made the zygote: one started again
    from a short-lived thread would die when that thread ended, and take the session's
    worker, and its namespace, with it."""
    hub.start_local(1, prefix="again")
    node_pid = hub.local[0].proc.pid
    assert hub.run("1", "again-1", require="any", timeout=30)["again-1"].ok
    first = wait_until(lambda: zygotes(node_pid), 10, "the zygote")

    def workers() -> int:
        try:
            return sum(len(psutil.Process(p).children()) for p in first)
        except psutil.Error:
            return 0

    # the session's worker and the spare one: the spare's death makes the node start another
    wait_until(lambda: workers() >= 2, 20, "the session's worker and a spare")
    forked = [c for p in first for c in psutil.Process(p).children()]
    for pid in first:
        psutil.Process(pid).kill()
    wait_until(lambda: all(gone(p) for p in forked), 10, "the old zygote's workers to die")
    # a command may still meet a worker the node has not yet seen die (its namespace is
    # lost: WorkerDied); then the node's next workers come from a new zygote, and live
    for _ in range(3):
        first_ = hub.run("x = 41", "again-1", require="any", timeout=30)["again-1"]
        r = hub.run("x + 1", "again-1", require="any", timeout=30)["again-1"]
        if first_.ok and r.ok:
            break
        for bad in (first_, r):
            assert bad.ok or (bad.error or {}).get("ename") == "WorkerDied", bad.error
    assert r.ok and r.value == 42, (r.status, r.error)
    assert zygotes(node_pid) - first


# --- the hub's launcher of local nodes --------------------------------------------------------


def test_local_nodes_are_forked_from_one_launcher_that_ends_with_the_hub(
        tmp_path: Path) -> None:
    """``start_local`` forks its nodes from one launcher process per hub (the node's code
    imported once); a node whose environment changes the interpreter (PYTHONPATH) is a new
    interpreter instead. A node killed with SIGKILL is reported lost, and the launcher and
    every node end with the hub."""
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p)
    with odium.Hub(tmp_path / "hub", ports=0, hb_interval=HB, app=tmp_path) as hub:
        hub.start_local(2, prefix="fork")
        hub.start_local(1, prefix="exec", env={"PYTHONPATH": path})
        forked = [psutil.Process(n.proc.pid) for n in hub.local if n.name.startswith("fork")]
        launchers = {p.parent().pid for p in forked}
        assert len(launchers) == 1, describe(forked)
        launcher = psutil.Process(launchers.pop())
        assert launcher.name() == "odium-launcher" and launcher.ppid() == os.getpid()
        assert all(p.name() == "odium-node" for p in forked), describe(forked)
        execd = psutil.Process(next(n.proc.pid for n in hub.local if n.name == "exec-1"))
        assert execd.ppid() == os.getpid(), describe([execd])
        r = hub.run("import os; os.getpid()", require="any", timeout=30)
        assert all(r[n].ok for n in ("fork-1", "fork-2", "exec-1")), r
        os.kill(forked[0].pid, signal.SIGKILL)
        wait_until(lambda: hub.nodes("fork-1")[0]["status"] == "lost", 30, "fork-1 lost")
        r = hub.run("1", nodes="fork-2", require="any", timeout=30)
        assert r["fork-2"].value == 1, r
        everyone = [launcher, *forked, execd]
    wait_until(lambda: all(gone(p) for p in everyone), DEATH, "the launcher and nodes to end")


HUB_WITH_LOCAL_NODES = """
import pathlib, sys, time, odium
hub = odium.Hub(pathlib.Path(sys.argv[1]) / "hub", ports=0, app=sys.argv[1])
hub.start()
hub.start_local(2, prefix="orphan")
print(" ".join(str(n.proc.pid) for n in hub.local), flush=True)
time.sleep(600)
"""


def test_a_hub_killed_with_sigkill_takes_its_launcher_and_local_nodes(tmp_path: Path) -> None:
    """Nobody calls Hub.close: the launcher dies with the hub (parent-death signal), and
    each local node with the launcher."""
    proc = subprocess.Popen([sys.executable, "-c", HUB_WITH_LOCAL_NODES, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # (the hub prints it once its nodes are ready)
        nodes = [psutil.Process(int(p)) for p in line.split()]
        assert len(nodes) == 2, line
        launcher = nodes[0].parent()
        assert launcher is not None and launcher.name() == "odium-launcher"
        everyone = [launcher, *nodes, *(c for n in nodes for c in n.children(recursive=True))]
        proc.kill()
        proc.wait(10)
        wait_until(lambda: all(gone(p) for p in everyone), DEATH,
                   "the launcher and the nodes to end with their hub")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
