"""The job queue on real processes and sockets: the API, capacity, cancels, timeouts, a node
killed mid-job, the hub killed and restarted, and the CLI. Those marked ``@both_stores`` run
on SQLite and on a real PostgreSQL server.

Jobs that must wait for the test block on a file the test creates (``release``); the test
itself never sleeps: it waits for conditions with a deadline.
"""

from __future__ import annotations

import concurrent.futures
import json
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import odium
from odium.core.jobs import Repr
from odium.errors import ConfigError, JobCancelledError, NotConnectedError, RemoteError

from .conftest import HB, HubProcess, NodeProcess, both_stores, odium_cli, wait_until


def blocker(flag: Path, log: Path, name: str, value: Any = 42) -> str:
    """Code for a job that notes it started, waits for ``flag`` to exist, notes it ended."""
    return (f"import pathlib, time\n"
            f"log = pathlib.Path({str(log)!r})\n"
            f"with log.open('a') as f: f.write('{name} start\\n')\n"
            f"while not pathlib.Path({str(flag)!r}).exists():\n"
            f"    time.sleep(0.01)\n"
            f"with log.open('a') as f: f.write('{name} end\\n')\n"
            f"{value!r}")


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def events(hub: odium.Hub, job_id: str) -> list[dict[str, Any]]:
    return list(hub.job(job_id)["events"])


def add(x: int, y: int = 0) -> int:
    return x + y


def triple(x: int) -> int:
    return 3 * x


@pytest.fixture
def hub2(hub: odium.Hub) -> odium.Hub:
    hub.start_local(2, prefix="w", capacity=2)
    return hub


# --- the API ---------------------------------------------------------------------------------


@both_stores
def test_submit_code_and_functions(hub2: odium.Hub) -> None:
    assert hub2.submit("6 * 7").result(20) == 42
    assert hub2.submit(add, 2, y=3).result(20) == 5
    assert hub2.submit(lambda: {"a": [1, 2]}).result(20) == {"a": [1, 2]}
    assert hub2.submit("sum(args) + kwargs['k']", 1, 2, k=3).result(20) == 6
    # not JSON: the repr travels, and prints like the value did
    v = hub2.submit("{1, 2}").result(20)
    assert isinstance(v, Repr) and repr(v) == "{1, 2}"
    # arguments that are not JSON travel pickled
    assert hub2.submit(lambda t: t[0] * len(t), (3, 4)).result(20) == 6
    job = hub2.submit("import os\nprint('out'); os.getpid()")
    info = job.wait(20)
    assert info["status"] == "done" and info["stdout"] == "out\n"
    assert info["node"] in ("w-1", "w-2") and info["attempts"] == 1
    assert job.status == "done" and job.done()


def test_errors_come_back_with_the_remote_traceback(hub2: odium.Hub) -> None:
    job = hub2.submit("def f():\n    raise ValueError('boom')\nf()")
    with pytest.raises(RemoteError) as ei:
        job.result(20)
    assert ei.value.ename == "ValueError" and "boom" in ei.value.traceback
    assert job.status == "failed"
    assert isinstance(job.exception(0), RemoteError)


@both_stores
def test_map_in_order_unordered_and_executor(hub2: odium.Hub) -> None:
    assert hub2.map(triple, range(50), wait=60) == [3 * x for x in range(50)]
    assert sorted(hub2.map_unordered(triple, range(20), wait=60)) == [3 * x for x in range(20)]
    jobs = [hub2.submit(add, i, 1) for i in range(10)]
    assert sorted(j.result(0) for j in odium.Hub.as_completed(jobs, 60)) == list(range(1, 11))
    with hub2.executor(retries=1) as ex:
        futs = [ex.submit(add, i, y=10) for i in range(10)]
        assert [f.result(60) for f in futs] == [i + 10 for i in range(10)]
        assert list(ex.map(triple, [1, 2, 3], timeout=60)) == [3, 6, 9]
        bad = ex.submit(eval, "1/0")
        with pytest.raises(RemoteError, match="ZeroDivisionError"):
            bad.result(60)
    assert isinstance(bad, concurrent.futures.Future)


def test_bad_submissions_fail_at_once(hub2: odium.Hub) -> None:
    with pytest.raises(NotConnectedError, match="no node matches 'gpu\\*'"):
        hub2.submit("1", nodes="gpu*")
    with pytest.raises(ConfigError):
        hub2.submit("   ")
    with pytest.raises(ConfigError, match="retries"):
        hub2.submit("1", retries=-1)
    with pytest.raises(ConfigError, match="timeout"):
        hub2.submit("1", timeout=0)
    with pytest.raises(ConfigError, match="job id"):
        hub2.submit("1", job_id="../etc/passwd")
    with pytest.raises(ConfigError, match="code string or a function"):
        hub2.submit(42)  # type: ignore[arg-type]
    with pytest.raises(odium.OdiumError, match="cannot serialise"):
        hub2.submit(add, __import__("threading").Lock())


@both_stores
def test_job_ids_are_idempotent_and_the_job_runs_once(hub2: odium.Hub, tmp_path: Path) -> None:
    log = tmp_path / "once.log"
    code = f"open({str(log)!r}, 'a').write('ran\\n')\n7"
    a = hub2.submit(code, job_id="report-1")
    b = hub2.submit(code, job_id="report-1")
    assert a.id == b.id == "report-1"
    assert a.result(20) == 7 and b.result(20) == 7
    c = hub2.submit(code, job_id="report-1")  # finished already: the same job, not run again
    assert c.result(20) == 7
    assert lines(log) == ["ran"]


@both_stores
def test_every_move_is_recorded_and_jobs_are_stored_before_dispatch(hub2: odium.Hub) -> None:
    import threading

    gate = threading.Event()
    store = hub2.core.store
    store.write(lambda s: gate.wait(20))  # the store's writer is stuck until the gate opens
    try:
        job = hub2.submit("1 + 1")
        q = hub2.core.jobq
        wait_until(lambda: job.id in q.jobs, 10, "the hub to take the job")
        hub2._call(q.sender.dispatch)  # a dispatch round: nothing may go before the job is stored
        assert job.status == "queued"
        assert not q.sender.flights
    finally:
        gate.set()
    assert job.result(20) == 2
    moves = [(e["prev"], e["status"]) for e in events(hub2, job.id)]
    assert moves == [("", "queued"), ("queued", "assigned"), ("assigned", "running"),
                     ("running", "done")]
    listed = hub2.jobs(status="done", limit=5)
    assert any(j["id"] == job.id for j in listed)


def test_nodes_glob_and_required_state(hub2: odium.Hub) -> None:
    jobs = [hub2.submit("1", nodes="w-2") for _ in range(6)]
    assert {j.wait(30)["node"] for j in jobs} == {"w-2"}
    # a state no node has: the job waits, and says why
    job = hub2.submit("1", require_state="0" * 40)
    wait_until(lambda: "waiting" in hub2.job(job.id), 10, "the job to be looked at")
    assert job.status == "queued"
    assert "no node matches" in hub2.job(job.id)["waiting"]
    assert job.cancel()


# --- capacity ----------------------------------------------------------------------------------


def test_capacity_is_honoured_and_an_idle_node_takes_the_work(hub: odium.Hub,
                                                              tmp_path: Path) -> None:
    hub.start_local(1, prefix="slow", capacity=1)
    hub.start_local(1, prefix="fast", capacity=2)
    release, log = tmp_path / "release", tmp_path / "slow.log"
    slow_job = hub.submit(blocker(release, log, "slow"), nodes="slow-1")
    wait_until(lambda: slow_job.status == "running", 20, "the slow job to start")
    quick = [hub.submit("import time; time.sleep(0.05); 1") for _ in range(20)]
    # every quick job finishes while the slow node is still busy: none waited behind it
    for j in quick:
        assert j.result(60) == 1
    assert slow_job.status == "running"
    assert {j.wait(0)["node"] for j in quick} == {"fast-1"}
    release.touch()
    assert slow_job.result(20) == 42

    # from the recorded moves: no node ever ran more jobs at once than its capacity
    rows = [(e, j) for j in [slow_job] + quick for e in events(hub, j.id)]
    rows.sort(key=lambda r: r[0]["ts"])
    running: dict[str, int] = {"slow-1": 0, "fast-1": 0}
    peak = dict(running)
    for e, _j in rows:
        if e["status"] == "running":
            running[e["node"]] += 1
            peak[e["node"]] = max(peak[e["node"]], running[e["node"]])
        elif e["prev"] == "running":
            running[e["node"]] -= 1
    assert peak == {"slow-1": 1, "fast-1": 2}, peak


# --- cancel and timeout ------------------------------------------------------------------------


@both_stores
def test_cancel_a_queued_and_a_running_job(hub: odium.Hub, tmp_path: Path) -> None:
    hub.start_local(1, prefix="c", capacity=1)
    never, log = tmp_path / "never", tmp_path / "cancel.log"
    running = hub.submit(blocker(never, log, "running"))
    wait_until(lambda: lines(log) == ["running start"], 20, "the first job to start")
    queued = hub.submit(f"open({str(log)!r}, 'a').write('queued ran\\n')")
    assert queued.status == "queued"  # the only slot is taken

    assert queued.cancel() is True
    assert queued.status == "cancelled"
    with pytest.raises(JobCancelledError):
        queued.result(5)
    assert running.cancel() is True
    assert running.status == "cancelled"
    assert running.cancel() is False  # finished: nothing to cancel

    # the running job's worker was stopped: the slot is free for the next job
    assert hub.submit("'next'").result(20) == "next"
    assert lines(log) == ["running start"]  # the queued job never ran
    reasons = [e["detail"] for e in events(hub, running.id)]
    assert reasons[-1] == "cancelled by api"


def test_timeout_stops_the_job_and_frees_its_slot(hub: odium.Hub) -> None:
    hub.start_local(1, prefix="t", capacity=1)
    job = hub.submit("import time\ntime.sleep(60)", timeout=0.5)
    info = job.wait(20)
    assert info["status"] == "timeout", info
    with pytest.raises(RemoteError):
        job.result(0)
    # a job that ignores the interrupt is killed with its worker
    stubborn = hub.submit("import time\nwhile True:\n    try:\n        time.sleep(60)\n"
                          "    except KeyboardInterrupt:\n        pass", timeout=0.5)
    assert stubborn.wait(30)["status"] == "timeout"
    assert hub.submit("3").result(20) == 3


# --- a node killed mid-job ---------------------------------------------------------------------


def test_jobs_of_a_killed_node_run_elsewhere_then_fail_when_retries_run_out(
        hub: odium.Hub, tmp_path: Path) -> None:
    hub.start_local(2, prefix="k", capacity=1)
    release, log = tmp_path / "release", tmp_path / "kill.log"
    job = hub.submit(blocker(release, log, "j"), retries=1)
    wait_until(lambda: lines(log) == ["j start"] and job.status == "running", 20,
               "the job to start")
    first = job.info()["node"]
    victim = next(n for n in hub.local if n.name == first)
    victim.kill()
    victim.proc.wait(10)
    # after the heartbeat timeout it runs again, on the other node
    wait_until(lambda: lines(log) == ["j start", "j start"], 10 + 10 * HB,
               "the job to run again")
    second = job.info()["node"]
    release.touch()
    assert job.result(20) == 42
    info = job.wait(0)
    assert info["attempts"] == 2 and info["node"] == second != first
    assert lines(log).count("j start") == 2
    moves = events(hub, job.id)
    lost = [e for e in moves if e["status"] == "queued" and e["prev"] == "running"]
    assert len(lost) == 1 and f"node {first} lost" in lost[0]["detail"]

    # no retries left: failed, with the reason
    release.unlink()
    job2 = hub.submit(blocker(release, log, "j2"), retries=0)
    wait_until(lambda: "j2 start" in lines(log) and job2.status == "running", 20,
               "the second job to start")
    victim = next(n for n in hub.local if n.name == job2.info()["node"])
    victim.kill()
    info = job2.wait(10 + 10 * HB)
    assert info["status"] == "failed"
    assert "lost" in info["reason"]
    assert info["error"]["ename"] == "NodeLost"
    with pytest.raises(RemoteError, match="NodeLost"):
        job2.result(0)


# --- the hub killed and restarted ------------------------------------------------------------


@pytest.fixture
def hub_with_nodes(tmp_path: Path, store_db: str | None
                   ) -> Iterator[tuple[HubProcess, Callable[..., NodeProcess]]]:
    home = tmp_path / "hubhome"
    home.mkdir(mode=0o700)
    hp = HubProcess(home, app=tmp_path, db=store_db).start()
    started: list[NodeProcess] = []

    def node(name: str, capacity: int) -> NodeProcess:
        p = odium_cli("token", "--home", str(home))
        assert p.returncode == 0, p.stderr
        token = p.stdout.split()[0].split("=", 1)[1]  # ODIUM_TOKEN=... odium node ...
        np = NodeProcess(tmp_path / f"node-{name}", ["--name", name, "--token", token, "--app",
                                                     str(tmp_path), "--capacity",
                                                     str(capacity)]).start()
        started.append(np)
        return np

    yield hp, node
    for np in started:
        np.stop()
    hp.stop()


@both_stores
def test_hub_killed_and_restarted_jobs_carry_on_results_recorded_once(
        hub_with_nodes: tuple[HubProcess, Callable[..., NodeProcess]], tmp_path: Path) -> None:
    hp, node = hub_with_nodes
    home = hp.home
    nodes = [node("r1", 2), node("r2", 1)]

    def admin() -> odium.Admin:
        return odium.Admin(home)

    def ready() -> bool:
        with admin() as a:
            return sum(n["status"] == "ready" for n in a.nodes()) == 2

    wait_until(ready, 30, "two nodes ready")
    go, go2, log = tmp_path / "go", tmp_path / "go2", tmp_path / "restart.log"
    with admin() as a:
        early = [a.submit(blocker(go, log, f"a{i}", i)).id for i in (1, 2)]
        late = a.submit(blocker(go2, log, "a3", 3)).id
        wait_until(lambda: sorted(lines(log)) == ["a1 start", "a2 start", "a3 start"], 20,
                   "three jobs running")
        queued = a.submit(f"open({str(log)!r}, 'a').write('q ran\\n')\n'q'").id
        assert a.job(queued)["status"] == "queued"  # every slot is busy

    ports = hp.ports
    hp.stop(signal.SIGKILL)
    # while the hub is down, two jobs finish: their results wait on their nodes
    go.touch()
    wait_until(lambda: {"a1 end", "a2 end"} <= set(lines(log)), 20, "a1 and a2 to finish")
    hp.ports_arg = ports
    hp.start()

    with admin() as a:
        infos = {j: a.job(j, wait=20) for j in early}
        for i, j in enumerate(early, 1):
            assert infos[j]["status"] == "done" and infos[j]["value"] == i, infos[j]
        assert a.job(queued, wait=20)["value"] == "q"  # the queued job went on
        assert a.job(late)["status"] == "running"  # still running: claimed by its node
        go2.touch()
        assert a.job(late, wait=20)["value"] == 3
        everything = {j: a.job(j) for j in early + [late, queued]}
    for j, info in everything.items():
        finals = [e for e in info["events"] if e["status"] == "done"]
        assert len(finals) == 1, (j, info["events"])  # recorded exactly once
        assert info["attempts"] == 1, info  # and run once
    assert sorted(lines(log)) == sorted(["a1 start", "a2 start", "a3 start", "a1 end",
                                         "a2 end", "q ran", "a3 end"])
    for np in nodes:
        assert np.proc is not None and np.proc.poll() is None
        assert "Traceback" not in np.output()


# --- the CLI -------------------------------------------------------------------------------


def cli(hub: odium.Hub, *args: str) -> subprocess.CompletedProcess[str]:
    return odium_cli(*args[:1], "--home", str(hub.home), *args[1:])


def test_cli_submit_list_show_cancel(hub2: odium.Hub, tmp_path: Path) -> None:
    p = cli(hub2, "submit", "-c", "print('hello'); 6 * 7", "--wait", "20")
    assert p.returncode == 0, p.stderr
    assert "done" in p.stdout and "hello" in p.stdout and "=> 42" in p.stdout

    p = cli(hub2, "submit", "--json", "--retries", "2", "-c", "1 / 0", "--id", "bad-1")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"id": "bad-1"}
    p = cli(hub2, "job", "bad-1", "--wait", "20")
    assert p.returncode == 1
    assert "ZeroDivisionError" in p.stdout and "-> failed" in p.stdout
    assert p.stdout.count("-> running") == 3  # the first run and two retries

    script = tmp_path / "job.py"
    script.write_text("import time\ntime.sleep(60)\n")
    p = cli(hub2, "submit", str(script))
    assert p.returncode == 0, p.stderr
    jid = p.stdout.strip()
    wait_until(lambda: hub2.job(jid)["status"] == "running", 20, "the job to start")
    p = cli(hub2, "jobs", "--status", "running")
    assert p.returncode == 0 and jid in p.stdout
    p = cli(hub2, "jobs", "cancel", jid)
    assert p.returncode == 0 and f"{jid} cancelled" in p.stdout
    p = cli(hub2, "jobs", "cancel", jid)
    assert p.returncode == 1 and "it is already cancelled" in p.stderr
    p = cli(hub2, "jobs", "--json", "-n", "5")
    listed = json.loads(p.stdout)
    assert [j["status"] for j in listed if j["id"] == jid] == ["cancelled"]


@pytest.mark.parametrize("args,code,words", [
    (("jobs", "--status", "nope"), 2, "invalid choice"),
    (("job", "no/such"), 2, "job id"),
    (("job", "nosuchjob"), 1, "no job"),
    (("job",), 1, "which job"),
    (("jobs", "cancel"), 1, "needs the id"),
    (("jobs", "cancel", "nosuchjob"), 1, "no job nosuchjob"),
    (("submit",), 1, "nothing to submit"),
    (("submit", "-c", "1", "--nodes", "gpu*"), 1, "no node matches"),
    (("submit", "-c", "1", "--retries", "x"), 2, "whole number"),
    (("submit", "-c", "1", "--timeout", "0"), 2, "positive"),
])
def test_cli_bad_input_is_one_line_and_fails(hub2: odium.Hub, args: tuple[str, ...], code: int,
                                             words: str) -> None:
    p = cli(hub2, *args)
    assert p.returncode == code, (p.stdout, p.stderr)
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1 and words in err, err
    assert "Traceback" not in p.stderr
