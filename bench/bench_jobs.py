#!/usr/bin/env python
"""Job queue benchmark: many trivial jobs over local nodes, end to end; ipyparallel optionally.

    python bench/bench_jobs.py [--jobs 10000] [--nodes 4] [--capacity 16] [--ipyparallel]
                               [--repeat 3] [--latency 300] [--db URL|temp-postgresql]
                               [--json OUT]

Odium: a hub (this process) and ``--nodes`` local node processes with ``--capacity``
job workers each (``0``: each node's default, its number of cores), CURVE-encrypted and
Ed25519-signed as always, every job stored before dispatch with every move recorded, on
OS-chosen 127.0.0.1 ports in a temporary home. The store is SQLite (WAL, synchronous=FULL)
in that home, or ``--db URL`` (an empty database: the check at the end counts its rows), or
``--db temp-postgresql``: a throwaway PostgreSQL server (Debian's binaries, default
settings: fsync and synchronous_commit on) started on 127.0.0.1 for the run
(tests/pgserver.py). Timed, after a warm-up that starts every worker:

  * map       ``hub.map(inc, range(N))``: N jobs submitted at once, until every value is in
              hand (in order) and checked; and the CPU each kind of process took a job
              (this process, the nodes, their workers: psutil, median over the runs);
  * submit    N separate ``hub.submit(inc, i)`` calls, then every ``Job.result()``;
  * latency   ``--latency`` single jobs on an idle queue, one after the other:
              ``hub.submit(inc, i).result()``, submit to result in hand (median, p90).

Each is run ``--repeat`` times; the report gives every run and the best and median jobs/s.
At the end the store is checked: N done jobs per run, each with its four moves.

ipyparallel (``--ipyparallel``): ``ipp.Cluster(n=N)`` in a throwaway profile,
``load_balanced_view().map_sync(inc, range(--ipp-jobs))``, timed the same way (after a
warm-up), and ``apply_sync(inc, i)`` one after the other for the latency, in the same run;
the ratios Odium / ipyparallel are printed.

Nothing here sleeps to synchronise: every wait is on the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench_core import summary as ms_summary  # (run as a script: its directory is on sys.path)
from ippcluster import have_ipp, ipp_cluster

perf = time.perf_counter


def inc(x: int) -> int:
    return x + 1


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def summary(rates: list[float]) -> dict[str, Any]:
    return {"runs": rates, "best": max(rates), "median": statistics.median(rates)}


SERVERS: list[int] = []  # the pid of a database server this run started (temp-postgresql)


def tree_cpu() -> dict[str, float]:
    """CPU seconds (user + system) of this process and each kind of process under it, by
    process name (odium-node, odium-worker, odium-zygote, ...), and of a database server the
    run started (its backends that ended meanwhile are not counted)."""
    import psutil

    me = psutil.Process()
    out = {"hub (this process)": sum(me.cpu_times()[:2])}
    procs = me.children(recursive=True)
    for pid in SERVERS:
        try:
            server = psutil.Process(pid)
            procs += [server, *server.children(recursive=True)]
        except psutil.Error:
            continue
    for p in procs:
        try:
            name, t = p.name(), sum(p.cpu_times()[:2])
        except psutil.Error:
            continue
        out[name] = out.get(name, 0.0) + t
    return out


def latency(call: Any, n: int) -> dict[str, Any]:
    """``call(i)`` n times one after the other (each returns i + 1): ``bench_core.summary``
    of the times (ms)."""
    took = []
    for i in range(n):
        t = perf()
        assert call(i) == i + 1, "wrong value"
        took.append(perf() - t)
    return ms_summary(took)


# --- Odium ----------------------------------------------------------------------------------


@contextmanager
def database(db: str | None) -> Iterator[str | None]:
    """The store's URL: None (SQLite in the hub's home), the URL given, or a database on a
    throwaway PostgreSQL server (``temp-postgresql``), stopped and removed after."""
    if db != "temp-postgresql":
        yield db
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.pgserver import PgServer, unavailable

    why = unavailable()
    if why:
        raise SystemExit(f"bench_jobs: --db temp-postgresql: {why}")
    server = PgServer()
    try:
        server.init()
        server.start()
        SERVERS.append(int((server.data / "postmaster.pid").read_text().split()[0]))
        with server.database() as url:
            yield url
    finally:
        if server.port and server.running():
            server.stop()
        server.remove()


def bench_odium(jobs: int, nodes: int, capacity: int, repeat: int,
                lat: int = 0, db: str | None = None) -> dict[str, Any]:
    import odium
    from odium.hub.store import JobEventRow, JobRow
    from odium.hub.storedb import shown

    out: dict[str, Any] = {"nodes": nodes, "capacity": capacity or "default (cores)",
                           "jobs": jobs, "store": shown(db) if db else "sqlite (the home)"}
    home = Path(tempfile.mkdtemp(prefix="odium-bench-jobs-"))
    try:
        with odium.Hub(home / "hub", ports=0, app=home, db=db) as hub:
            t0 = perf()
            hub.start_local(nodes, prefix="b", capacity=capacity or None)
            out["ready_s"] = perf() - t0
            slots = sum(n["capacity"] for n in hub.nodes())
            out["slots"] = slots
            # warm-up: every worker process started, the function shipped to it
            hub.map(inc, range(slots * 20), wait=120)
            maps, submits = [], []
            cpu: dict[str, list[float]] = {}
            for _ in range(repeat):
                before = tree_cpu()
                t = perf()
                values = hub.map(inc, range(jobs), wait=600)
                maps.append(_rate(jobs, perf() - t))
                after = tree_cpu()
                for k, v in after.items():  # (a process that ended meanwhile is left out)
                    cpu.setdefault(k, []).append((v - before.get(k, 0.0)) / jobs * 1e6)
                assert values == [x + 1 for x in range(jobs)], "wrong values from map"
                t = perf()
                handles = [hub.submit(inc, i) for i in range(jobs)]
                got = [h.result(600) for h in handles]
                submits.append(_rate(jobs, perf() - t))
                assert got == [i + 1 for i in range(jobs)], "wrong values from submit"
            out["map"] = summary(maps)
            out["map_cpu_us_per_job"] = {k: statistics.median(v) for k, v in cpu.items()
                                         if statistics.median(v) >= 0.5}
            out["submit"] = summary(submits)
            if lat:
                out["latency"] = latency(lambda i: hub.submit(inc, i).result(30), lat)
            out["queue_stats"] = dict(hub.core.jobq.stats)
            # everything is in the store: every job done, every move recorded
            store = hub.core.store
            hub.core.jobq.flush_now()
            store.flush(60)
            from sqlalchemy import func, select

            with store.session() as s:
                done = s.scalar(select(func.count()).select_from(JobRow)
                                .where(JobRow.status == "done"))
                moves = s.scalar(select(func.count()).select_from(JobEventRow))
            out["stored_done"], out["stored_moves"] = int(done or 0), int(moves or 0)
            expected = slots * 20 + 2 * repeat * jobs + lat
            assert out["stored_done"] == expected, (out["stored_done"], expected)
            assert out["stored_moves"] >= 4 * expected, (out["stored_moves"], 4 * expected)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return out


# --- ipyparallel ----------------------------------------------------------------------------


def bench_ipp(jobs: int, engines: int, repeat: int, lat: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {"engines": engines, "jobs": jobs}
    if not have_ipp(out):
        return out
    try:
        with ipp_cluster(engines, out, "ipp-bench-jobs-") as rc:
            view = rc.load_balanced_view()
            view.map_sync(inc, range(engines * 20))  # warm-up
            rates = []
            for _ in range(repeat):
                t = perf()
                values = view.map_sync(inc, range(jobs))
                rates.append(_rate(jobs, perf() - t))
                assert list(values) == [x + 1 for x in range(jobs)], "wrong values"
            out["map"] = summary(rates)
            if lat:
                out["latency"] = latency(lambda i: view.apply_sync(inc, i), lat)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()
    return out


# --- report ---------------------------------------------------------------------------------


def report(res: dict[str, Any]) -> str:
    lines = [f"machine: {res['machine']['cpus']} cpus, load {res['machine']['load']}, "
             f"python {res['machine']['python']}"]
    o = res["odium"]
    lines.append(f"odium: {o['nodes']} nodes x capacity {o['capacity']} "
                 f"({o.get('slots', '?')} job slots), {o['jobs']} trivial jobs per run, "
                 f"stored ({o['store']}), encrypted, signed")
    if "error" in o:
        lines.append(f"  FAILED: {o['error']}")
        lines.append(o.get("traceback", ""))
    for k in ("map", "submit"):
        if k in o:
            runs = ", ".join(f"{r:.0f}" for r in o[k]["runs"])
            lines.append(f"  {k:<7} best {o[k]['best']:7.0f} jobs/s  median "
                         f"{o[k]['median']:7.0f} jobs/s   (runs: {runs})")
    if "map_cpu_us_per_job" in o:
        lines.append("  map CPU per job (median): " + ", ".join(
            f"{k} {v:.0f} us" for k, v in o["map_cpu_us_per_job"].items()))
    if "latency" in o:
        la = o["latency"]
        lines.append(f"  latency median {la['median']:.2f} ms  p90 {la['p90']:.2f} ms  "
                     f"(one job at a time, idle queue, {la['n']} jobs)")
    if "stored_done" in o:
        lines.append(f"  store: {o['stored_done']} jobs done, {o['stored_moves']} moves "
                     f"recorded; queue: {o.get('queue_stats')}")
    ipp = res.get("ipyparallel")
    if ipp is not None:
        lines.append(f"ipyparallel {ipp.get('version', '?')}: {ipp['engines']} engines, "
                     f"load-balanced view, {ipp['jobs']} tasks per run")
        if "map" in ipp:
            runs = ", ".join(f"{r:.0f}" for r in ipp["map"]["runs"])
            lines.append(f"  map_sync best {ipp['map']['best']:7.0f} tasks/s  median "
                         f"{ipp['map']['median']:7.0f} tasks/s   (runs: {runs})")
        if "latency" in ipp:
            la = ipp["latency"]
            lines.append(f"  apply_sync latency median {la['median']:.2f} ms  p90 "
                         f"{la['p90']:.2f} ms  ({la['n']} tasks)")
        if "error" in ipp:
            lines.append(f"  ipyparallel FAILED: {ipp['error']}")
    for k, v in res.get("ratios", {}).items():
        lines.append(f"ratio odium / ipyparallel, {k}: {v:.1f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=10000)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--capacity", type=int, default=16,
                    help="job workers per node (0: the node's default, its cores)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ipyparallel", action="store_true", help="also time ipyparallel")
    ap.add_argument("--ipp-jobs", type=int, default=None,
                    help="tasks per ipyparallel run (default: --jobs)")
    ap.add_argument("--latency", type=int, default=300, metavar="N",
                    help="single jobs timed one at a time on an idle queue")
    ap.add_argument("--db", default=None, metavar="URL",
                    help="the hub's store: an SQLAlchemy URL of an empty database, or "
                    "temp-postgresql (a throwaway server); default: SQLite in the home")
    ap.add_argument("--json", default=None, metavar="OUT")
    args = ap.parse_args(argv)
    res: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "load": os.getloadavg(),
                                       "python": platform.python_version()}}
    with database(args.db) as db:
        res["odium"] = bench_odium(args.jobs, args.nodes, args.capacity, args.repeat,
                                   args.latency, db)
    if args.ipyparallel:
        res["ipyparallel"] = bench_ipp(args.ipp_jobs or args.jobs, args.nodes, args.repeat,
                                       args.latency)
        o, i = res["odium"], res["ipyparallel"]
        if "map" in o and "map" in i:
            res["ratios"] = {"best map": o["map"]["best"] / i["map"]["best"],
                             "median map": o["map"]["median"] / i["map"]["median"]}
        if "latency" in o and "latency" in i:
            res["ratios"]["median latency (ipyparallel / odium)"] = (
                i["latency"]["median"] / o["latency"]["median"])
    print(report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    return 0 if "error" not in res["odium"] else 1


if __name__ == "__main__":
    sys.exit(main())
