"""``odium launch slurm`` against a real one-machine Slurm (Debian's slurm-wlm: munged,
slurmctld and slurmd started by tests/slurmhost.py): two nodes up through sbatch and srun, a
broadcast, ``odium launch stop`` cancelling the job; a job held in the queue shown as pending;
sbatch refusing the job is one line and leaves no launch open. Through the CLI, as a user
runs it, with the hub in a process of its own."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import HubProcess, odium_cli, wait_until
from tests.slurmhost import SlurmCluster, slurm_unavailable

pytestmark = pytest.mark.timeout(150)


@pytest.fixture
def slurm(tmp_path: Path) -> Iterator[SlurmCluster]:
    """Two Slurm nodes (two slurmd on this machine: Debian's build has multiple-slurmd)."""
    if why := slurm_unavailable():
        pytest.skip(why)
    with SlurmCluster(tmp_path / "slurm", nodes=2) as cluster:
        yield cluster


@pytest.fixture
def hub_home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "hubhome"
    home.mkdir(mode=0o700)
    hub = HubProcess(home, app=tmp_path).start()
    yield home
    hub.stop()


def _cli(slurm: SlurmCluster, *args: str, timeout: float = 60.0) -> Any:
    return odium_cli(*args, env=slurm.environ(), timeout=timeout)


def _launches(slurm: SlurmCluster, home: Path) -> list[dict[str, Any]]:
    p = _cli(slurm, "launch", "list", "--json", "--home", str(home))
    assert p.returncode == 0, p.stderr
    return list(json.loads(p.stdout))


def test_two_nodes_through_sbatch_a_broadcast_and_scancel(slurm: SlurmCluster, hub_home: Path,
                                                         tmp_path: Path) -> None:
    home = str(hub_home)
    p = _cli(slurm, "launch", "slurm", "--nodes", "2", "--name", "hpc",
             "--python", sys.executable, "--app", str(tmp_path), "--time", "10", "--wait", "90",
             "--home", home, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr + slurm.log_tail()
    assert "launch hpc: 2 nodes ready: hpc-1, hpc-2" in p.stdout
    (v,) = _launches(slurm, hub_home)
    job = v["detail"]["job"]
    assert v["kind"] == "slurm" and v["ready"] == 2 and v["launcher"] == f"slurm job {job} RUNNING"
    script = Path(v["detail"]["script"]).read_text()
    assert "odt1." not in script  # the credential is not in the batch script
    run = _cli(slurm, "run", "--nodes", "hpc-*", "--json", "--home", home, "-c",
               "import os; e = os.environ; e['SLURM_JOB_ID'], e['SLURMD_NODENAME'], "
               "'ODIUM_TOKEN' in e")
    assert run.returncode == 0, run.stderr
    values = {n: r["value"] for n, r in json.loads(run.stdout)["nodes"].items()}
    # one Odium node on each Slurm node, in the job; the credential gone from its environment
    assert values == {"hpc-1": [job, "n1", False], "hpc-2": [job, "n2", False]}
    stop = _cli(slurm, "launch", "stop", "hpc", "--home", home)
    assert stop.returncode == 0, stop.stderr
    assert f"slurm job {job} cancelled" in stop.stdout
    slurm.wait_job_gone(job, timeout=30)  # the job and each of its processes ended
    assert slurm.job_pids(job) == set()
    (v,) = _launches(slurm, hub_home)
    assert v["status"] == "stopped" and v["nodes"] == {"hpc-1": "revoked", "hpc-2": "revoked"}


def test_a_job_waiting_in_the_queue_shows_as_pending(slurm: SlurmCluster, hub_home: Path,
                                                     tmp_path: Path) -> None:
    home = str(hub_home)
    p = _cli(slurm, "launch", "slurm", "--nodes", "1", "--name", "later", "--python",
             sys.executable, "--wait", "0", "--home", home, "--", "--begin=now+3600")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "0 of 1 nodes ready" in p.stderr and "later-1" in p.stderr
    assert "the job's output is in " in p.stderr and "/launches/later/slurm-" in p.stderr
    (v,) = _launches(slurm, hub_home)
    job = v["detail"]["job"]
    assert v["nodes"] == {"later-1": "pending"}
    assert v["launcher"] == f"slurm job {job} PENDING"
    table = _cli(slurm, "launch", "list", "--home", home).stdout
    assert "later" in table and "0/1" in table and f"slurm job {job} PENDING" in table
    stop = _cli(slurm, "launch", "stop", "later", "--home", home)
    assert stop.returncode == 0 and f"slurm job {job} cancelled" in stop.stdout
    wait_until(lambda: slurm.job_state(job) in (None, "CANCELLED"), 30, "the job cancelled")


def test_sbatch_refusing_the_job_is_one_line_and_no_launch_stays_open(
        slurm: SlurmCluster, hub_home: Path) -> None:
    p = _cli(slurm, "launch", "slurm", "--nodes", "1", "--partition", "nosuch", "--name",
             "bad", "--home", str(hub_home))
    assert p.returncode == 1
    first = p.stderr.splitlines()[0]
    assert first.startswith("odium: sbatch failed: ") and "partition" in first, p.stderr
    (v,) = _launches(slurm, hub_home)
    assert v["status"] == "stopped" and v["detail"]["failed"] is True
    assert slurm.squeue() == []
