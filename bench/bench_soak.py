#!/usr/bin/env python
"""Soak benchmark: many broadcasts and many jobs through one hub; memory, store, throughput.

    python bench/bench_soak.py [--broadcasts 5000] [--jobs 100000] [--chunk 5000]
                               [--windows 10] [--nodes 4] [--json OUT] [--keep]

A hub in this process (``odium.Hub(home, ports=0, app=DIR)``, DIR an empty directory in the
temporary one) and ``--nodes`` (4) local node processes (``hub.start_local``), encrypted and
signed as always, every command and job written to the hub's store (SQLite, WAL). After a
short warm-up (untimed) it runs, one after the other:

  * broadcasts  ``--broadcasts`` calls of ``hub.run("x = 1", timeout=30)`` to every node, in
                ``--windows`` windows; every result is checked (one entry per node, all
                ``ok``); a failed one is counted and reported, never timed;
  * jobs        ``--jobs`` trivial jobs (``inc(x)``) in chunks of ``--chunk``:
                ``hub.submit_many`` of a chunk, then every ``Job.result()``, every value
                checked; a job that fails or has a wrong value is counted.

Measured: the RSS of this process (it hosts the hub) at the start, after every window and
chunk, after the broadcasts, after the jobs and after a ``gc.collect()``; the RSS of every node
process (and of its workers) before and after; the size of the SQLite file and its WAL before,
after the broadcasts and after the jobs (bytes per broadcast and per job); the throughput of
every window and chunk and the ratio last / first; the lengths of the hub's in-memory
containers (dicts, lists, sets, deques on the hub's objects) before and after, to name what
grew; the load average before and after.

Goals (issue 12, row 7):
  * hub RSS growth (after the run and a ``gc.collect()``, against the start) <= ``--rss-bound``
    MB (default 100). Why 100 MB: a finished job's or broadcast's result lives in the store,
    not in memory, so what may grow is bounded by design, not by the number of jobs: the book
    keeps the last ``KEEP_FINISHED`` (20,000) finished job records for fast reads, about 1 KB
    each (odium/hub/jobbook.py: 20 MB); the dispatcher the last ``KEEP_BATCHES`` (100,000)
    batches it sent, about 350 B each (odium/hub/jobsend.py: 34 MB); the inbox's replay cache
    every message id it took in the last 600 s (2 x REPLAY_WINDOW), at most 1,000,000, about
    190 B each (odium/core/guards.py: some 20 MB in the few minutes of the default run, 180 MB
    at its cap). On top come SQLite's page cache, the allocator's arenas (CPython rarely gives
    freed memory back) and the chunk of ``Job`` handles in hand. That is about 70 MB for the
    default run; 100 MB leaves room for the allocator and still catches growth per job (1 KB
    kept per job would be 100 MB at the default size). It is a bound for a run of this
    length: the report prints each capped container's size at its cap, and where the replay
    cache levels off at the run's message rate, because a run longer than about 10 minutes
    keeps more (all of it bounded);
  * throughput of the last window >= ``--min-ratio`` (70 %) of the first, for the
    broadcasts and for the job chunks;
  * zero failures.

The odium loggers' warnings are counted by their text (ids taken out) and summed up in the
report instead of printed one by one, with the store's event log by kind.

Nothing here sleeps to synchronise: every wait is on a result or a condition with a
deadline. Every process started is stopped at the end and looked for afterwards (by a tag in
its environment, workers and zygotes included), and the temporary directory is removed
(``--keep`` keeps it, logs and store). ``--tracemalloc`` (a diagnostic: it slows the hub down
a lot) also prints where the Python heap grew between the start and the end.
"""

from __future__ import annotations

import argparse
import enum
import gc
import json
import logging
import os
import platform
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
import types
from collections import deque
from pathlib import Path
from typing import Any

from runtag import RunTag

perf = time.perf_counter
MB = 1024 * 1024

# Every process this run starts (and everything they start) carries this in its environment,
# so that one left behind is found at the end even once it is an orphan (as bench_tree.py).
RUN = RunTag("ODIUM_BENCH_SOAK")


def inc(x: int) -> int:
    return x + 1


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / MB


def node_rss(hub: Any) -> dict[str, dict[str, Any]]:
    """RSS of every local node process and of its descendants (job workers, zygotes)."""
    import psutil

    out: dict[str, dict[str, Any]] = {}
    for n in hub.local:
        try:
            p = psutil.Process(n.proc.pid)
            kids = p.children(recursive=True)
            own = p.memory_info().rss
            rest = 0
            for k in kids:
                try:
                    rest += k.memory_info().rss
                except psutil.Error:
                    pass
            out[n.name] = {"node_mb": own / MB, "children": len(kids), "children_mb": rest / MB}
        except psutil.Error as e:
            out[n.name] = {"error": f"{type(e).__name__}: {e}"}
    return out


def store_files(home: Path) -> dict[str, int]:
    out = {}
    for suffix in ("", "-wal", "-shm"):
        p = home / f"odium.db{suffix}"
        out["db" + suffix] = p.stat().st_size if p.exists() else 0
    out["db+wal"] = out["db"] + out["db-wal"]
    return out


def settle_store(hub: Any) -> None:
    """Everything the hub holds for the store written (the queue's book, the writer)."""
    core = hub.core
    hub._call(core.jobq.flush_now)
    core.store.flush(60)


def event_kinds(hub: Any) -> dict[str, int]:
    from sqlalchemy import func, select

    from odium.hub.store import EventRow

    with hub.core.store.session() as s:
        rows = s.execute(select(EventRow.kind, func.count()).group_by(EventRow.kind)).all()
    return {str(k): int(n) for k, n in rows}


class LogCount(logging.Handler):
    """The odium loggers' warnings and errors, counted by their text with ids taken out
    (and kept for the report) instead of printed one by one to stderr."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: dict[str, int] = {}
        self.first: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad record must not stop the run
            msg = str(record.msg)
        if len(self.first) < 50:
            self.first.append(f"{record.levelname} {record.name}: {msg}"[:400])
        shape = re.sub(r"\b[0-9a-f]{12,}\b", "<id>", msg)
        shape = re.sub(r"(<id>(, )?)+", "<ids>", shape)
        shape = re.sub(r"from \S+:", "from <key>:", shape)
        shape = re.sub(r"\(and \d+ more\)", "(and <n> more)", shape)
        shape = re.sub(r"\bsoak-\d+\b", "soak-<n>", shape)  # one line for every node
        key = f"{record.levelname} {record.name}: {shape}"[:300]
        self.counts[key] = self.counts.get(key, 0) + 1


def store_counts(hub: Any) -> dict[str, int]:
    from sqlalchemy import func, select

    from odium.hub.store import CommandRow, EventRow, JobEventRow, JobRow, ResultRow

    out = {}
    with hub.core.store.session() as s:
        for name, model in (("commands", CommandRow), ("results", ResultRow),
                            ("events", EventRow), ("jobs", JobRow),
                            ("job_events", JobEventRow)):
            out[name] = int(s.scalar(select(func.count()).select_from(model)) or 0)
    return out


# --- the hub's containers -------------------------------------------------------------------


def containers(root: Any, depth: int = 4, objs: dict[str, Any] | None = None
               ) -> dict[str, int]:
    """``path -> len`` of every dict, list, set and deque held by an odium object reachable
    from ``root`` through attributes (each object once), to name what grows; ``objs`` gets
    ``path -> the container``. Run in the hub's loop thread (``hub._call``), where those are
    changed."""
    out: dict[str, int] = {}
    seen: set[int] = set()
    todo: deque[tuple[str, Any, int]] = deque([("core", root, 0)])
    while todo:
        path, obj, d = todo.popleft()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        try:
            attrs = dict(vars(obj))
        except TypeError:
            attrs = {}
            for name in getattr(type(obj), "__slots__", ()):
                if hasattr(obj, name):
                    attrs[name] = getattr(obj, name)
        for name, value in attrs.items():
            p = f"{path}.{name}"
            if isinstance(value, (dict, list, set, frozenset, deque)):
                try:
                    out[p] = len(value)
                except TypeError:
                    continue
                if objs is not None:
                    objs[p] = value
                # the values of a dict of odium objects (one level): e.g. the queues
                if isinstance(value, dict) and len(value) <= 64 and d < depth:
                    for k, v in list(value.items()):
                        if type(v).__module__.startswith("odium"):
                            todo.append((f"{p}[{k!r}]", v, d + 1))
            elif d < depth and type(value).__module__.startswith("odium") and not callable(
                    value):
                todo.append((p, value, d + 1))
    return out


def deep_size(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of ``obj`` and of everything it holds (containers, objects' attributes), each
    object once; classes, functions and modules are not followed. Approximate: a string
    shared with another container is counted here too."""
    seen = set() if seen is None else seen
    total = 0
    todo = [obj]
    while todo:
        o = todo.pop()
        if id(o) in seen or isinstance(o, (type, types.ModuleType, types.FunctionType,
                                           types.MethodType)):
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)
        if isinstance(o, dict):
            todo.extend(o.keys())
            todo.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset, deque)):
            todo.extend(o)
        elif not isinstance(o, (str, bytes, int, float, bool, enum.Enum)) and o is not None:
            if hasattr(o, "__dict__"):
                todo.append(vars(o))
            for name in getattr(type(o), "__slots__", ()):
                if hasattr(o, name):
                    todo.append(getattr(o, name))
    return total


def bounded(hub: Any, objs: dict[str, Any], before: dict[str, int], after: dict[str, int],
            sizes: dict[str, float], seconds: float) -> dict[str, dict[str, Any]]:
    """The hub's containers that are capped by design (their caps read from odium): entries
    now, the cap, bytes per entry as measured, and what they would hold at the cap. The replay
    cache is capped by age too (``2 x window`` s): at this run's message rate it levels off at
    rate x age, or at its entry cap, whichever is less."""
    from odium.hub import jobbook, jobsend

    replay = hub.core.inbox.replay
    caps = {"core.jobq.book.finished": (jobbook.KEEP_FINISHED, "KEEP_FINISHED",
                                        "odium/hub/jobbook.py"),
            "core.jobq.sender.batch_jobs": (jobsend.KEEP_BATCHES, "KEEP_BATCHES",
                                            "odium/hub/jobsend.py"),
            "core.inbox.replay._seen": (replay.max_entries, "ReplayCache.max_entries",
                                        "odium/core/guards.py")}
    out: dict[str, dict[str, Any]] = {}
    for path, (cap, name, where) in caps.items():
        n = after.get(path)
        if not n or path not in sizes:
            continue
        per = sizes[path] * MB / n
        row = {"entries": n, "cap": cap, "cap_name": f"{name} ({where})", "bytes_per_entry": per,
               "mb_at_cap": per * cap / MB}
        if path.endswith("replay._seen") and seconds > 0:
            rate = (n - before.get(path, 0)) / seconds
            level = min(cap, rate * 2 * replay.window)
            row.update(msgs_per_s=rate, age_s=2 * replay.window, level_entries=level,
                       mb_level=per * level / MB)
        out[path] = row
    return out


def grown(before: dict[str, int], after: dict[str, int], least: int) -> dict[str, list[int]]:
    return {k: [before.get(k, 0), v] for k, v in sorted(after.items())
            if v - before.get(k, 0) >= least}


# --- the sections ---------------------------------------------------------------------------


def check_broadcast(r: Any, want: list[str]) -> str | None:
    got = sorted(r.nodes)
    if got != want:
        return f"entries for {got}, wanted {want}"
    bad = [f"{k}: {v.status} {v.error}" for k, v in r.nodes.items() if not v.ok]
    return "; ".join(bad) if bad else None


def split(n: int, parts: int) -> list[int]:
    parts = max(1, min(parts, n)) if n else 1
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def section_broadcasts(hub: Any, names: list[str], args: argparse.Namespace,
                       res: dict[str, Any]) -> dict[str, Any]:
    want = sorted(names)
    windows = []
    failures: list[str] = []
    n_failed = 0
    for size in split(args.broadcasts, args.windows):
        samples: list[float] = []
        failed = 0
        t_win = perf()
        for _ in range(size):
            t0 = perf()
            try:
                r = hub.run("x = 1", timeout=30)
            except Exception as e:  # a raised error is a failure too
                err: str | None = f"{type(e).__name__}: {e}"
            else:
                err = check_broadcast(r, want)
            dt = perf() - t0
            if err:
                failed += 1
                if len(failures) < 20:
                    failures.append(err[:300])
            else:
                samples.append(dt)
        wall = perf() - t_win
        n_failed += failed
        busy = sum(samples)
        windows.append({
            "n": size, "ok": len(samples), "failed": failed, "wall_s": wall,
            "rate": len(samples) / busy if busy > 0 else 0.0,
            "median_ms": statistics.median(samples) * 1000 if samples else None,
            "p90_ms": sorted(samples)[int(0.9 * (len(samples) - 1))] * 1000 if samples else None,
            "rss_mb": rss_mb(), "load1": os.getloadavg()[0]})
        if n_failed > args.max_failures:
            res.setdefault("stopped", []).append(
                f"broadcasts stopped after window {len(windows)}: {n_failed} failed")
            break
    rates = [w["rate"] for w in windows if w["ok"]]
    return {"windows": windows, "failed": n_failed, "failures": failures,
            "done": sum(w["n"] for w in windows),
            "ratio_last_first": rates[-1] / rates[0] if len(rates) >= 2 and rates[0] else None}


def section_jobs(hub: Any, args: argparse.Namespace, res: dict[str, Any]) -> dict[str, Any]:
    chunks = []
    failures: list[str] = []
    n_failed = 0
    start = 0
    for size in split(args.jobs, -(-args.jobs // args.chunk) if args.chunk else 1):
        xs = range(start, start + size)
        start += size
        failed = 0
        t0 = perf()
        handles = hub.submit_many([(inc, (x,), {}, None) for x in xs])
        t_sub = perf() - t0
        deadline = time.monotonic() + args.chunk_wait
        for j, x in zip(handles, xs, strict=True):
            try:
                v = j.result(max(0.0, deadline - time.monotonic()))
            except Exception as e:  # failed, timed out, cancelled: counted
                failed += 1
                if len(failures) < 20:
                    failures.append(f"job {j.id} ({x}): {type(e).__name__}: {str(e)[:200]}")
                continue
            if v != x + 1:
                failed += 1
                if len(failures) < 20:
                    failures.append(f"job {j.id}: inc({x}) gave {v!r}")
        wall = perf() - t0
        del handles
        n_failed += failed
        chunks.append({"n": size, "failed": failed, "wall_s": wall, "submit_s": t_sub,
                       "rate": (size - failed) / wall if wall > 0 else 0.0,
                       "rss_mb": rss_mb(), "load1": os.getloadavg()[0]})
        if n_failed > args.max_failures:
            res.setdefault("stopped", []).append(
                f"jobs stopped after chunk {len(chunks)}: {n_failed} failed")
            break
    rates = [c["rate"] for c in chunks if c["n"] > c["failed"]]
    return {"chunks": chunks, "failed": n_failed, "failures": failures,
            "done": sum(c["n"] for c in chunks),
            "ratio_last_first": rates[-1] / rates[0] if len(rates) >= 2 and rates[0] else None}


# --- the run --------------------------------------------------------------------------------


def run(args: argparse.Namespace, base: Path, res: dict[str, Any]) -> None:
    import odium

    app = Path(args.app).resolve() if args.app else base / "app"
    app.mkdir(exist_ok=True)
    home = base / "hub"
    home.mkdir(mode=0o700)
    mem: dict[str, Any] = {}
    res["memory"] = mem
    mem["rss_mb_before_hub"] = rss_mb()
    hub = odium.Hub(home, ports=0, app=app)
    res["_hub"] = hub  # closed by main, whatever happens
    t0 = perf()
    hub.start()
    started = hub.start_local(args.nodes, prefix="soak", capacity=args.capacity or None,
                              timeout=60)
    res["ready_s"] = perf() - t0
    names = [n.name for n in started]
    res["slots"] = sum(n.get("capacity", 0) for n in hub.nodes())
    # warm-up: every node's worker started, every job worker started and the function shipped
    for _ in range(args.warmup):
        r = hub.run("x = 1", timeout=30)
        if check_broadcast(r, sorted(names)):
            raise RuntimeError(f"warm-up broadcast failed: {check_broadcast(r, sorted(names))}")
    got = hub.map(inc, range(max(res["slots"], 1) * 20), wait=300)
    if got != [x + 1 for x in range(max(res["slots"], 1) * 20)]:
        raise RuntimeError("warm-up map: wrong values")
    settle_store(hub)
    gc.collect()
    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start(args.tracemalloc)
        snap0 = tracemalloc.take_snapshot()
    mem["rss_mb_start"] = rss_mb()
    mem["gc_objects_start"] = len(gc.get_objects())
    res["nodes_before"] = node_rss(hub)
    res["store_start"] = store_files(home)
    res["counts_start"] = store_counts(hub)
    cont0 = hub._call(lambda: containers(hub.core))
    res["load_start"] = loadavg()
    t_measure = perf()

    if args.broadcasts:
        res["broadcasts"] = section_broadcasts(hub, names, args, res)
    settle_store(hub)
    mem["rss_mb_after_broadcasts"] = rss_mb()
    res["store_after_broadcasts"] = store_files(home)
    res["counts_after_broadcasts"] = store_counts(hub)

    if args.jobs:
        res["jobs"] = section_jobs(hub, args, res)
    settle_store(hub)
    mem["rss_mb_after_jobs"] = rss_mb()
    res["store_after_jobs"] = store_files(home)
    res["counts_after_jobs"] = store_counts(hub)
    gc.collect()
    mem["rss_mb_after_gc"] = rss_mb()
    mem["gc_objects_end"] = len(gc.get_objects())
    res["nodes_after"] = node_rss(hub)
    objs: dict[str, Any] = {}
    cont1 = hub._call(lambda: containers(hub.core, objs=objs))
    res["containers_grown"] = grown(cont0, cont1, args.grown)
    # what the grown ones hold now (in the loop thread: they change there), in MB
    paths = list(res["containers_grown"])
    res["containers_mb"] = hub._call(
        lambda: {p: deep_size(objs[p]) / MB for p in paths}, timeout=120)
    res["bounded"] = bounded(hub, objs, cont0, cont1, res["containers_mb"], perf() - t_measure)
    objs.clear()
    res["event_kinds"] = event_kinds(hub)
    if args.tracemalloc:
        snap1 = tracemalloc.take_snapshot()
        top = snap1.compare_to(snap0, "traceback")
        res["tracemalloc"] = [
            {"size_kb": s.size_diff / 1024, "count": s.count_diff,
             "where": [f"{f.filename}:{f.lineno}" for f in s.traceback]}
            for s in top[:args.tracemalloc_top]]
        tracemalloc.stop()
    mem["growth_mb"] = mem["rss_mb_after_gc"] - mem["rss_mb_start"]
    res["goals"] = goals(res, args)


def goals(res: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    g: dict[str, Any] = {}
    growth = res["memory"]["growth_mb"]
    g["hub RSS growth MB"] = {"value": growth, "target": f"<= {args.rss_bound:g}",
                              "met": growth <= args.rss_bound}
    for sec in ("broadcasts", "jobs"):
        s = res.get(sec)
        if not s:
            continue
        ratio = s.get("ratio_last_first")
        g[f"{sec} last/first"] = (
            {"value": ratio, "target": f">= {args.min_ratio:g}", "met": ratio >= args.min_ratio}
            if ratio is not None else {"met": False, "why": "fewer than 2 windows"})
    fails = sum(res.get(s, {}).get("failed", 0) for s in ("broadcasts", "jobs"))
    g["failures"] = {"value": fails, "target": "== 0", "met": fails == 0}
    return g


# --- report ---------------------------------------------------------------------------------


def _per(delta: int, n: int) -> str:
    return f"{delta / n:.0f} B" if n else "-"


def report(res: dict[str, Any]) -> str:
    env, a = res["env"], res["args"]
    lines = [f"odium soak benchmark  {env['when']}  python {env['python']}  cpus {env['cpus']}  "
             f"load {env['loadavg_before']}", "",
             f"hub in this process, {a['nodes']} local nodes "
             f"({res.get('slots', '?')} job slots), CURVE + Ed25519, 127.0.0.1, "
             f"ready in {res.get('ready_s', float('nan')):.2f} s"]
    b = res.get("broadcasts")
    if b:
        lines += ["", f"broadcasts: hub.run('x = 1', timeout=30) to all {a['nodes']} nodes, "
                  f"{b['done']} in {len(b['windows'])} windows",
                  f"  {'window':>6} {'n':>6} {'ok/s':>8} {'median':>8} {'p90 ms':>8} "
                  f"{'failed':>6} {'RSS MB':>8} {'load1':>6}"]
        for i, w in enumerate(b["windows"], 1):
            med = f"{w['median_ms']:8.2f}" if w["median_ms"] is not None else f"{'-':>8}"
            p90 = f"{w['p90_ms']:8.2f}" if w["p90_ms"] is not None else f"{'-':>8}"
            lines.append(f"  {i:>6} {w['n']:>6} {w['rate']:8.1f} {med} {p90} "
                         f"{w['failed']:>6} {w['rss_mb']:8.1f} {w['load1']:6.2f}")
        if b["ratio_last_first"] is not None:
            lines.append(f"  last/first window {b['ratio_last_first']:.2f}")
        for f in b["failures"][:5]:
            lines.append(f"  failure: {f}")
    j = res.get("jobs")
    if j:
        lines += ["", f"jobs: hub.submit_many of {a['chunk']} inc(x) at a time, then every "
                  f"result(); {j['done']} in {len(j['chunks'])} chunks",
                  f"  {'chunk':>6} {'n':>6} {'jobs/s':>8} {'submit s':>8} {'failed':>6} "
                  f"{'RSS MB':>8} {'load1':>6}"]
        for i, c in enumerate(j["chunks"], 1):
            lines.append(f"  {i:>6} {c['n']:>6} {c['rate']:8.0f} {c['submit_s']:8.2f} "
                         f"{c['failed']:>6} {c['rss_mb']:8.1f} {c['load1']:6.2f}")
        if j["ratio_last_first"] is not None:
            lines.append(f"  last/first chunk {j['ratio_last_first']:.2f}")
        for f in j["failures"][:5]:
            lines.append(f"  failure: {f}")
    m = res.get("memory", {})
    if "rss_mb_after_gc" in m:
        lines += ["", "hub process RSS MB: before the hub {:.1f}, start (after warm-up) {:.1f}, "
                  "after broadcasts {:.1f}, after jobs {:.1f}, after gc.collect() {:.1f}: "
                  "growth {:+.1f}".format(m["rss_mb_before_hub"], m["rss_mb_start"],
                                          m["rss_mb_after_broadcasts"], m["rss_mb_after_jobs"],
                                          m["rss_mb_after_gc"], m["growth_mb"]),
                  f"  Python objects tracked by gc: {m['gc_objects_start']} -> "
                  f"{m['gc_objects_end']}"]
        nb, na = res.get("nodes_before", {}), res.get("nodes_after", {})
        for name in sorted(nb):
            x, y = nb[name], na.get(name, {})
            if "node_mb" in x and "node_mb" in y:
                lines.append(f"  node {name}: {x['node_mb']:.1f} -> {y['node_mb']:.1f} MB "
                             f"({y['node_mb'] - x['node_mb']:+.1f}); its {x['children']} -> "
                             f"{y['children']} workers {x['children_mb']:.1f} -> "
                             f"{y['children_mb']:.1f} MB")
            else:
                lines.append(f"  node {name}: {x.get('error', '')} {y.get('error', '')}")
        cg = res.get("containers_grown") or {}
        lines.append("  hub containers grown by >= {}: {}".format(
            a["grown"], "none" if not cg else "; ".join(f"{k} {v[0]} -> {v[1]}"
                                                        for k, v in cg.items())))
    s0, s1, s2 = (res.get(k) for k in ("store_start", "store_after_broadcasts",
                                       "store_after_jobs"))
    if s0 and s1 and s2:
        nb_, nj = (b or {}).get("done", 0), (j or {}).get("done", 0)
        c0, c1, c2 = (res[k] for k in ("counts_start", "counts_after_broadcasts",
                                       "counts_after_jobs"))
        lines += ["", "store (odium.db + -wal) bytes: start {} + {}, after broadcasts {} + {}, "
                  "after jobs {} + {}".format(s0["db"], s0["db-wal"], s1["db"], s1["db-wal"],
                                              s2["db"], s2["db-wal"]),
                  f"  per broadcast {_per(s1['db+wal'] - s0['db+wal'], nb_)} "
                  f"(db alone {_per(s1['db'] - s0['db'], nb_)}), per job "
                  f"{_per(s2['db+wal'] - s1['db+wal'], nj)} (db alone "
                  f"{_per(s2['db'] - s1['db'], nj)})",
                  "  rows: " + ", ".join(f"{k} {c0[k]} -> {c1[k]} -> {c2[k]}" for k in c0)]
    cm = res.get("containers_mb")
    if cm:
        lines.append("  what those hold now (deep size, approximate): " + "; ".join(
            f"{k.rsplit('.', 1)[-1]} {v:.1f} MB" for k, v in cm.items()))
    for k, v in (res.get("bounded") or {}).items():
        extra = (f"; by age ({v['age_s']:.0f} s at {v['msgs_per_s']:.0f} messages/s) it levels"
                 f" off at {v['level_entries']:.0f} = {v['mb_level']:.0f} MB"
                 if "mb_level" in v else "")
        lines.append(f"  capped: {k.rsplit('.', 1)[-1]} {v['entries']} of {v['cap']} "
                     f"({v['cap_name']}), {v['bytes_per_entry']:.0f} B each, "
                     f"{v['mb_at_cap']:.0f} MB at the cap{extra}")
    ek = res.get("event_kinds")
    if ek:
        lines.append("  event log of the store by kind: " + ", ".join(
            f"{k} {v}" for k, v in sorted(ek.items())))
    lc = res.get("log_counts")
    lines += ["", "odium log, warnings and errors: " + ("none" if not lc else "")]
    for k, v in sorted((lc or {}).items(), key=lambda kv: -kv[1]):
        lines.append(f"  {v:6d} x {k}")
    tm = res.get("tracemalloc")
    if tm:
        lines += ["", "tracemalloc, biggest growth start -> end:"]
        for t in tm:
            lines.append(f"  {t['size_kb']:+10.1f} KB {t['count']:+8d}  "
                         + " <- ".join(t["where"][::-1][:4]))
    g = res.get("goals")
    if g:
        lines += ["", "goals: " + "; ".join(
            f"{k} {'MET' if v.get('met') else 'MISSED'}"
            + (f" ({v['value']:.3g}, {v['target']})" if "value" in v else f" ({v.get('why')})")
            for k, v in g.items())]
    for s in res.get("stopped", []):
        lines.append(f"STOPPED: {s}")
    if "error" in res:
        lines += ["", f"ERROR: {res['error']}", res.get("traceback", "")]
    for e in res.get("close_errors", []):
        lines.append(f"close error: {e}")
    left = res.get("left_behind")
    lines += ["", "processes left after the end: "
              + ("none" if not left else f"{len(left)} (killed): " + "; ".join(left))]
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--broadcasts", type=int, default=5000, help="broadcasts (default 5000)")
    ap.add_argument("--jobs", type=int, default=100_000, help="trivial jobs (default 100000)")
    ap.add_argument("--chunk", type=int, default=5000, help="jobs per submit_many (5000)")
    ap.add_argument("--windows", type=int, default=10,
                    help="windows the broadcasts are split into (default 10)")
    ap.add_argument("--nodes", type=int, default=4, help="local nodes (default 4)")
    ap.add_argument("--capacity", type=int, default=0,
                    help="job workers per node (default 0: the node's default, its cores)")
    ap.add_argument("--warmup", type=int, default=20, help="untimed broadcasts first (20)")
    ap.add_argument("--chunk-wait", type=float, default=600.0,
                    help="seconds a chunk's results may take (default 600)")
    ap.add_argument("--rss-bound", type=float, default=100.0,
                    help="goal: hub RSS growth at most this many MB (default 100)")
    ap.add_argument("--min-ratio", type=float, default=0.7,
                    help="goal: last window's throughput at least this of the first's (0.7)")
    ap.add_argument("--max-failures", type=int, default=50,
                    help="stop a section after a window/chunk once this many failed (50)")
    ap.add_argument("--grown", type=int, default=100,
                    help="report hub containers that grew by at least this many (100)")
    ap.add_argument("--app", default=None,
                    help="application directory (default: an empty one in the temporary "
                         "directory)")
    ap.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES",
                    help="trace Python allocations with this many frames (slow; diagnostic)")
    ap.add_argument("--tracemalloc-top", type=int, default=15, help="growth sites shown (15)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--json", metavar="OUT", help="write every number here")
    args = ap.parse_args(argv)
    if not (args.broadcasts >= 0 and args.jobs >= 0 and args.chunk >= 1 and args.windows >= 1
            and 1 <= args.nodes <= 64 and args.capacity >= 0 and args.warmup >= 0):
        ap.error("--broadcasts/--jobs >= 0, --chunk/--windows >= 1, --nodes 1..64, "
                 "--capacity/--warmup >= 0")

    RUN.mark()
    logs = LogCount()
    odium_log = logging.getLogger("odium")
    odium_log.addHandler(logs)  # (then Python's last-resort stderr handler stays quiet)

    def terminated(signum: int, frame: Any) -> None:
        raise SystemExit(f"signal {signum}")  # unwinds into the finally below

    signal.signal(signal.SIGTERM, terminated)
    env = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(),
           "cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_before": loadavg()}
    res: dict[str, Any] = {"env": env, "args": vars(args)}
    t_all = perf()
    base = Path(tempfile.mkdtemp(prefix="odium-bench-soak-"))
    try:
        run(args, base, res)
    except BaseException as e:  # report, and still stop everything (Ctrl-C included)
        res["error"] = f"{type(e).__name__}: {e}"
        res["traceback"] = traceback.format_exc()
    finally:
        hub = res.pop("_hub", None)
        if hub is not None:
            try:
                t = perf()
                hub.close()
                res["stop_s"] = perf() - t
            except Exception as e:
                res.setdefault("close_errors", []).append(f"{type(e).__name__}: {e}")
        res["left_behind"] = RUN.left_behind()
        if args.keep:
            res["dir"] = str(base)
        else:
            shutil.rmtree(base, ignore_errors=True)
        odium_log.removeHandler(logs)
        res["log_counts"], res["log_first"] = logs.counts, logs.first
    env["loadavg_after"] = loadavg()
    res["total_s"] = perf() - t_all
    print(report(res))
    print(f"\n(total {res['total_s']:.1f} s; load before {env['loadavg_before']}, after "
          f"{env['loadavg_after']}" + (f"; kept {base}" if args.keep else "") + ")")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
        print(f"wrote {args.json}")
    ok = ("error" not in res and not res["left_behind"]
          and all(v.get("met") for v in res.get("goals", {}).values()))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
