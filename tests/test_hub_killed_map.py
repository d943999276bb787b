"""A hub killed mid-map, its nodes alive: once it is back on the same home and ports, it first
hears from the nodes what each holds (a result, or a job still running) and queues again only
what no node has. Every job runs exactly once: counted by its side effect, a line per run."""

from __future__ import annotations

import collections
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

import odium

from .conftest import HubProcess, NodeProcess, wait_until
from .test_jobs import hub_with_nodes  # noqa: F401 - the fixture

pytestmark = pytest.mark.timeout(180)

N = 1000


def runs(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


@pytest.mark.parametrize("kill_after", [150, 600])
def test_a_hub_killed_mid_map_runs_every_job_exactly_once(
        hub_with_nodes: tuple[HubProcess, Callable[..., NodeProcess]],  # noqa: F811
        tmp_path: Path, kill_after: int) -> None:
    hp, node = hub_with_nodes
    node("m1", 4)
    node("m2", 4)

    def ready() -> bool:
        with odium.Admin(hp.home) as a:
            return sum(n["status"] == "ready" for n in a.nodes()) == 2

    wait_until(ready, 30, "two nodes ready")
    log = tmp_path / "runs.txt"
    code = f"import time; time.sleep(0.01); open({str(log)!r}, 'a').write(job_id + '\\n'); 1"
    with odium.Admin(hp.home) as a:
        jobs = a.submit_many([(code, (), {"job_id": f"j{i}"}, f"j{i}") for i in range(N)])
        ids = [j.id for j in jobs]
    wait_until(lambda: len(runs(log)) >= kill_after, 60, f"{kill_after} jobs run")
    ports = hp.ports
    hp.stop(signal.SIGKILL)  # mid-map: batches in flight, results not yet acknowledged
    hp.ports_arg = ports
    hp.start()
    with odium.Admin(hp.home) as a:
        def all_done() -> bool:
            return sum(j["status"] == "done" for j in a.jobs(status="done", limit=N + 10)) == N

        wait_until(all_done, 120, "every job done")
        infos = [a.job(j) for j in ids[:: N // 20]]
    assert all(i["status"] == "done" and i["value"] == 1 for i in infos)
    counts = collections.Counter(runs(log))
    twice = sorted(j for j, c in counts.items() if c > 1)
    assert not twice, f"{len(twice)} job(s) ran more than once: {twice[:10]}"
    assert set(counts) == set(ids)  # and every one ran
