#!/usr/bin/env python
"""What durable acknowledgements cost: SQLite ``synchronous=FULL`` (the default) against
``NORMAL``, on the job queue end to end and on the store's commits alone.

    python bench/bench_durability.py [--jobs 5000] [--nodes 2] [--capacity 8] [--rounds 3]
                                     [--commits 300] [--dir DIR] [--json OUT]

A job's result is acknowledged to its node (which then forgets it) once the hub's store has
committed it. In WAL mode ``NORMAL`` syncs the log only at checkpoints, so an OS crash or a
power cut can take back commits already acknowledged; ``FULL`` syncs it at every commit.

  * jobs      ``bench_jobs.bench_odium`` (hub.map and hub.submit of trivial jobs over local
              nodes, every job stored, every move recorded), once per setting per round,
              the settings alternating so that a change in the machine's load hits both;
  * commits   ``--commits`` single-row writes into a fresh store, each waited for
              (``Store.flush``): the latency of one commit, the cost the writer's batching
              spreads over many jobs.

The home is made under ``--dir`` (default: the system's temporary directory): it must be on
the disk you mean to measure (a tmpfs makes every fsync free). Medians over the rounds are
reported with the load average before and after. Nothing sleeps to synchronise.
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_jobs  # noqa: E402

SETTINGS = ("NORMAL", "FULL")


def set_synchronous(value: str) -> None:
    import odium.hub.store

    odium.hub.store.SQLITE_SYNCHRONOUS = value


def bench_commits(n: int, where: Path) -> dict[str, Any]:
    """n single-row writes, each committed before the next is queued."""
    from odium.hub.store import Store, default_url

    home = Path(tempfile.mkdtemp(prefix="odium-bench-commit-", dir=where))
    try:
        store = Store(default_url(home))
        try:
            with store.engine.connect() as c:
                mode = c.exec_driver_sql("PRAGMA synchronous").scalar()
            store.flush()
            t = time.perf_counter()
            for i in range(n):
                store.event("bench", f"commit {i}")
                store.flush()
            dt = time.perf_counter() - t
            # and bare: one transaction of one insert at a time on one connection, no writer
            # thread (what is left is SQLite's commit, with or without its fsync)
            with store.engine.connect() as c:
                t = time.perf_counter()
                for i in range(n):
                    c.exec_driver_sql("INSERT INTO meta (key, value) VALUES (?, 'x')",
                                      (f"bench-{i}",))
                    c.commit()
                bare = time.perf_counter() - t
        finally:
            store.close()
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return {"commits": n, "per_s": n / dt, "ms_each": 1000 * dt / n, "pragma": mode,
            "bare_ms_each": 1000 * bare / n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=5000, help="0: the commit timings only")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--capacity", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--commits", type=int, default=300)
    ap.add_argument("--dir", default=None, help="where the temporary homes go")
    ap.add_argument("--json", default=None, metavar="OUT")
    args = ap.parse_args(argv)
    where = Path(args.dir or tempfile.gettempdir())
    tempfile.tempdir = str(where)  # bench_jobs makes its home with mkdtemp
    res: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "load_before": os.getloadavg(),
                                       "python": platform.python_version(),
                                       "dir": str(where)}}
    runs: dict[str, dict[str, list[float]]] = {
        s: {"map": [], "submit": [], "commit_ms": [], "bare_commit_ms": []} for s in SETTINGS}
    errors = []
    for r in range(args.rounds):
        order = SETTINGS if r % 2 == 0 else SETTINGS[::-1]
        for setting in order:
            set_synchronous(setting)
            c = bench_commits(args.commits, where)
            assert c["pragma"] == {"NORMAL": 1, "FULL": 2}[setting], c
            runs[setting]["commit_ms"].append(c["ms_each"])
            runs[setting]["bare_commit_ms"].append(c["bare_ms_each"])
            if args.jobs == 0:
                print(f"round {r + 1} {setting:<6}: one commit {c['ms_each']:.2f} ms through "
                      f"the store, {c['bare_ms_each']:.2f} ms bare", flush=True)
                continue
            o = bench_jobs.bench_odium(args.jobs, args.nodes, args.capacity, 1)
            if "error" in o:
                errors.append(f"{setting} round {r + 1}: {o['error']}\n{o.get('traceback')}")
                continue
            runs[setting]["map"].append(o["map"]["runs"][0])
            runs[setting]["submit"].append(o["submit"]["runs"][0])
            print(f"round {r + 1} {setting:<6}: map {o['map']['runs'][0]:6.0f} jobs/s, submit "
                  f"{o['submit']['runs'][0]:6.0f} jobs/s, one commit {c['ms_each']:.2f} ms "
                  f"({c['bare_ms_each']:.2f} bare), load {os.getloadavg()[0]:.2f}", flush=True)
    set_synchronous("FULL")
    res["machine"]["load_after"] = os.getloadavg()
    res["runs"] = runs
    med = {s: {k: statistics.median(v) for k, v in runs[s].items() if v} for s in SETTINGS}
    res["median"] = med
    m = res["machine"]
    print(f"machine: {m['cpus']} cpus, python {m['python']}, homes in {m['dir']}; load before "
          f"{'/'.join(f'{x:.2f}' for x in m['load_before'])}, after "
          f"{'/'.join(f'{x:.2f}' for x in m['load_after'])}")
    print((f"{args.jobs} trivial jobs per run over {args.nodes} nodes x {args.capacity} "
           "slots; " if args.jobs else "") + f"median of {args.rounds} rounds:")
    for s in SETTINGS:
        d = med[s]
        jobs = (f"map {d['map']:7.0f} jobs/s  submit {d['submit']:7.0f} jobs/s  "
                if "map" in d else "")
        print(f"  synchronous={s:<6}  {jobs}one commit {d.get('commit_ms', 0):6.2f} ms "
              f"through the store, {d.get('bare_commit_ms', 0):5.2f} ms bare")
    if med["NORMAL"].get("map") and med["FULL"].get("map"):
        for k in ("map", "submit"):
            res[f"{k}_cost"] = 1 - med["FULL"][k] / med["NORMAL"][k]
            print(f"  FULL costs {100 * res[f'{k}_cost']:+.1f} % of {k} throughput")
    for e in errors:
        print("FAILED:", e)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
