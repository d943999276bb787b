#!/usr/bin/env python
"""Core benchmark: time to ready and broadcast round trip, Odium (and optionally ipyparallel).

    python bench/bench_core.py [--nodes 4] [--rounds 200] [--ipyparallel] [--json OUT]

Odium: a hub (this process) and N local node processes, CURVE-encrypted and
Ed25519-signed as always, on OS-chosen 127.0.0.1 ports in a temporary home.
Measured:
  * ready      from before ``Hub(...)`` is created until ``hub.start_local(N)`` returns
               (it waits until every node is ``ready``);
  * python     round trip of ``hub.run("x = 1", nodes="*", timeout=10)``;
  * shell      round trip of ``hub.run("true", nodes="*", shell=True, timeout=10)``;
  * one node   round trip of ``hub.run("x = 1", nodes=<first node>, timeout=10)``.
Every round trip is measured with time.perf_counter after a warm-up, and every
result is checked (all nodes ok) so a fast failure never counts as a fast run.

ipyparallel (``--ipyparallel``): ``ipp.Cluster(n=N)`` started in the same run,
``start_and_connect_sync()`` timed to all engines registered, then
``view.execute('x = 1', block=True)`` on a DirectView of all engines and a
``%px``-like call (``execute(silent=False)`` then wait for the result and its
output), one engine too. A failure to start is caught and reported.

Nothing here sleeps to synchronise: every wait is on the result itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

perf = time.perf_counter

# --- statistics -----------------------------------------------------------------------------


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty list."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(samples: list[float]) -> dict[str, Any]:
    """Milliseconds: n, median, p90, p99, min, max, mean."""
    ms = [x * 1000.0 for x in samples]
    if not ms:
        return {"n": 0}
    return {"n": len(ms), "median": percentile(ms, 50), "p90": percentile(ms, 90),
            "p99": percentile(ms, 99), "min": min(ms), "max": max(ms),
            "mean": sum(ms) / len(ms)}


def timed(fn: Callable[[], Any], check: Callable[[Any], str | None], warmup: int,
          rounds: int, budget: float) -> dict[str, Any]:
    """Warm up, then time ``rounds`` calls of fn (stopping early past ``budget`` seconds).

    ``check(result)`` returns None when the result is right, else a description; failed
    rounds are counted and kept out of the timings.
    """
    failures: list[str] = []
    for _ in range(warmup):
        err = check(fn())
        if err:
            failures.append(f"warm-up: {err}")
    samples: list[float] = []
    t_end = perf() + budget
    for _ in range(rounds):
        t0 = perf()
        r = fn()
        dt = perf() - t0
        err = check(r)
        if err:
            failures.append(err)
        else:
            samples.append(dt)
        if perf() > t_end:
            break
    out = summary(samples)
    out["failed"] = len(failures)
    if failures:
        out["first_failure"] = failures[0][:500]
    out["raw_ms"] = [round(x * 1000.0, 4) for x in samples]
    return out


# --- Odium ----------------------------------------------------------------------------------


def _state_of(hub: Any) -> str:
    """The hub's state id, whether the API offers it as a property or a method."""
    try:
        st = hub.core.rt.state
        st = st() if callable(st) else st
        return str(getattr(st, "id", st))
    except Exception as e:  # informative only
        return f"? ({type(e).__name__})"


def bench_odium(n: int, rounds: int, warmup: int, shell_rounds: int, app: str | None,
                budget: float) -> dict[str, Any]:
    t_imp = perf()
    from odium.api.hub import Hub

    import_s = perf() - t_imp
    home = Path(tempfile.mkdtemp(prefix="odium-bench-"))
    out: dict[str, Any] = {"nodes": n, "import_s": import_s}
    hub = None
    try:
        t0 = perf()
        hub = Hub(home, ports=0, interface="127.0.0.1", app=app)
        hub.start()
        t_hub = perf()
        started = hub.start_local(n, prefix="bench", timeout=60)
        t_ready = perf()
        names = [s.name for s in started]
        out.update(hub_up_s=t_hub - t0, ready_s=t_ready - t0, nodes_ready_s=t_ready - t_hub,
                   ports=hub.ports, state=_state_of(hub))
        # the first command after ready: whatever a node still does after "ready" shows here
        t1 = perf()
        first = hub.run("x = 1", nodes="*", timeout=30)
        out["first_python_s"] = perf() - t1
        out["first_python_ok"] = bool(first.ok)

        def all_ok(want: list[str]) -> Callable[[Any], str | None]:
            def check(r: Any) -> str | None:
                got = sorted(r.nodes)
                if got != sorted(want):
                    return f"entries for {got}, wanted {sorted(want)}"
                bad = [f"{k}: {v.status} {v.error}" for k, v in r.nodes.items() if not v.ok]
                return "; ".join(bad) if bad else None
            return check

        # the python broadcast, with a per-round breakdown from the result's own timestamps
        phases: dict[str, list[float]] = {k: [] for k in (
            "submit_to_issued", "issued_to_first_start", "issued_to_last_start",
            "exec_max", "last_finish_to_return")}

        def run_py() -> Any:
            c0 = time.time()
            r = hub.run("x = 1", nodes="*", timeout=10)
            c1 = time.time()
            entries = list(r.nodes.values())
            starts = [e.started for e in entries if e.started]
            fins = [e.finished for e in entries if e.finished]
            if len(starts) == len(r) and len(fins) == len(r):
                phases["submit_to_issued"].append(r.issued - c0)
                phases["issued_to_first_start"].append(min(starts) - r.issued)
                phases["issued_to_last_start"].append(max(starts) - r.issued)
                phases["exec_max"].append(max((e.finished or 0.0) - (e.started or 0.0)
                                              for e in entries))
                phases["last_finish_to_return"].append(c1 - max(fins))
            return r

        out["python"] = timed(run_py, all_ok(names), warmup, rounds, budget)
        for k, v in phases.items():  # keep only the measured rounds
            phases[k] = v[warmup:]
        out["python_breakdown_ms"] = {k: {"median": percentile(v, 50) * 1000,
                                          "p90": percentile(v, 90) * 1000}
                                      for k, v in phases.items() if v}
        one = names[0]
        out["one_node"] = timed(lambda: hub.run("x = 1", nodes=one, timeout=10), all_ok([one]),
                                warmup, rounds, budget)
        out["shell"] = timed(lambda: hub.run("true", nodes="*", shell=True, timeout=10),
                             all_ok(names), min(warmup, 5), shell_rounds, budget)
    except Exception as e:  # report, don't crash: the other half may still run
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()
    finally:
        t_stop = perf()
        if hub is not None:
            hub.close()
        out["stop_s"] = perf() - t_stop
        shutil.rmtree(home, ignore_errors=True)
    return out


# --- ipyparallel ----------------------------------------------------------------------------


def bench_ipp(n: int, rounds: int, warmup: int, budget: float) -> dict[str, Any]:
    out: dict[str, Any] = {"engines": n}
    try:
        t_imp = perf()
        import ipyparallel as ipp

        out["import_s"] = perf() - t_imp
        out["version"] = ipp.__version__
    except Exception as e:
        out["error"] = f"ipyparallel not importable: {type(e).__name__}: {e}"
        return out
    cluster = None
    profile_dir = Path(tempfile.mkdtemp(prefix="ipp-bench-"))
    try:
        t0 = perf()
        # a throwaway profile dir keeps the user's ~/.ipython out of it; loopback only
        cluster = ipp.Cluster(n=n, profile_dir=str(profile_dir), log_level=40,
                              controller_ip="127.0.0.1")
        rc = cluster.start_and_connect_sync()
        rc.wait_for_engines(n, timeout=120)
        t_ready = perf()
        out["ready_s"] = t_ready - t0
        view = rc[:]
        ids = list(rc.ids)

        def ok_list(want: int) -> Callable[[Any], str | None]:
            def check(r: Any) -> str | None:
                return None  # execute(block=True) raises on any engine's error
            return check

        out["python"] = timed(lambda: view.execute("x = 1", block=True), ok_list(n), warmup,
                              rounds, budget)

        def px_like() -> Any:
            ar = view.execute("x = 1", silent=False, block=False)
            ar.get(timeout=10)
            ar.wait_for_output(timeout=10)
            return ar

        out["px"] = timed(px_like, ok_list(n), warmup, rounds, budget)
        one = rc[ids[0]]
        out["one_node"] = timed(lambda: one.execute("x = 1", block=True), ok_list(1), warmup,
                                rounds, budget)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()
    finally:
        t_stop = perf()
        if cluster is not None:
            try:
                cluster.stop_cluster_sync()
            except Exception as e:
                out["stop_error"] = f"{type(e).__name__}: {e}"
        out["stop_s"] = perf() - t_stop
        shutil.rmtree(profile_dir, ignore_errors=True)
    return out


# --- report ---------------------------------------------------------------------------------


def _row(label: str, s: dict[str, Any] | None) -> str:
    if not s or not s.get("n"):
        fail = (s or {}).get("first_failure", "")
        return f"  {label:<34} (no samples) {fail}"
    extra = f"  FAILED {s['failed']}" if s.get("failed") else ""
    return (f"  {label:<34} {s['median']:8.2f} {s['p90']:8.2f} {s['p99']:8.2f} "
            f"{s['min']:8.2f} {s['max']:8.2f} {s['n']:5d}{extra}")


def report(res: dict[str, Any]) -> str:
    lines = []
    env = res["env"]
    lines.append(f"odium core benchmark  {env['when']}  python {env['python']}  "
                 f"pyzmq {env['pyzmq']} libzmq {env['libzmq']}  cpus {env['cpus']}  "
                 f"load {env['loadavg_before']}")
    o = res["odium"]
    lines.append("")
    lines.append(f"Odium: hub + {o['nodes']} local nodes, CURVE + Ed25519, 127.0.0.1, OS ports")
    if "ready_s" in o:
        lines.append(f"  ready (Hub() -> {o['nodes']} nodes ready)   {o['ready_s']:.3f} s   "
                     f"[hub up {o['hub_up_s']:.3f} s + nodes {o['nodes_ready_s']:.3f} s; "
                     f"import {o['import_s']:.3f} s not counted; stop {o['stop_s']:.3f} s]")
    if "first_python_s" in o:
        lines.append(f"  first 'x = 1' right after ready   {o['first_python_s'] * 1000:.1f} ms"
                     f"{'' if o['first_python_ok'] else '  (NOT ok)'}   -> first result "
                     f"{o['ready_s'] + o['first_python_s']:.3f} s after start")
    hdr = (f"  {'round trip (ms)':<34} {'median':>8} {'p90':>8} {'p99':>8} {'min':>8} "
           f"{'max':>8} {'n':>5}")
    lines.append(hdr)
    lines.append(_row(f"python 'x = 1' -> all {o['nodes']}", o.get("python")))
    lines.append(_row("python 'x = 1' -> one node", o.get("one_node")))
    lines.append(_row(f"shell 'true' -> all {o['nodes']}", o.get("shell")))
    bd = o.get("python_breakdown_ms")
    if bd:
        lines.append("  where the python round trip goes (median / p90 ms, from result "
                     "timestamps):")
        names = {"submit_to_issued": "hub.run() -> broadcast issued in hub loop",
                 "issued_to_first_start": "issued -> first worker starts the code",
                 "issued_to_last_start": "issued -> last worker starts the code",
                 "exec_max": "slowest exec of 'x = 1' in a worker",
                 "last_finish_to_return": "last worker finished -> hub.run() returns"}
        for k, label in names.items():
            if k in bd:
                lines.append(f"    {label:<46} {bd[k]['median']:7.2f} / {bd[k]['p90']:7.2f}")
    if "error" in o:
        lines.append(f"  ERROR: {o['error']}")
    ipp = res.get("ipyparallel")
    if ipp is not None:
        lines.append("")
        lines.append(f"ipyparallel {ipp.get('version', '?')}: cluster of {ipp['engines']} engines "
                     "(local launcher, 127.0.0.1)")
        if "ready_s" in ipp:
            lines.append(f"  ready (Cluster() -> {ipp['engines']} engines)      "
                         f"{ipp['ready_s']:.3f} s   [stop {ipp.get('stop_s', 0):.3f} s]")
        if ipp.get("python"):
            lines.append(hdr)
            lines.append(_row("execute('x = 1', block=True) all", ipp.get("python")))
            lines.append(_row("%px-like (silent=False + output)", ipp.get("px")))
            lines.append(_row("execute('x = 1') one engine", ipp.get("one_node")))
        if "error" in ipp:
            lines.append(f"  ipyparallel FAILED: {ipp['error']}")
    rat = res.get("ratios")
    if rat:
        lines.append("")
        lines.append("ratios ipyparallel / odium (higher = odium faster):")
        for k, v in rat.items():
            lines.append(f"  {k:<34} {v:6.1f}x")
    t = res.get("targets")
    if t:
        lines.append("")
        lines.append("targets (issue 2): " + "; ".join(
            f"{k} {'MET' if v['met'] else 'MISSED'} ({v['value']:.3g} vs < {v['target']})"
            for k, v in t.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=4, help="local nodes / engines (default 4)")
    ap.add_argument("--rounds", type=int, default=200, help="measured rounds (default 200)")
    ap.add_argument("--warmup", type=int, default=20, help="warm-up rounds (default 20)")
    ap.add_argument("--shell-rounds", type=int, default=50,
                    help="measured rounds of the shell broadcast (default 50)")
    ap.add_argument("--ipyparallel", action="store_true", help="also benchmark ipyparallel")
    ap.add_argument("--app", default=None,
                    help="application directory of hub and nodes (default: the git tree "
                         "holding the current directory, as `odium hub` does)")
    ap.add_argument("--budget", type=float, default=20.0,
                    help="seconds at most per measured series (stops early past it)")
    ap.add_argument("--json", metavar="OUT", help="write every number (and raw samples) here")
    args = ap.parse_args(argv)
    if not 1 <= args.nodes <= 64 or args.rounds < 1 or args.warmup < 0:
        ap.error("--nodes 1..64, --rounds >= 1, --warmup >= 0")

    import zmq

    env = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(),
           "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "cpus": os.cpu_count(),
           "platform": platform.platform(),
           "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    res: dict[str, Any] = {"env": env, "args": vars(args)}
    t_all = perf()
    res["odium"] = bench_odium(args.nodes, args.rounds, args.warmup, args.shell_rounds,
                               args.app, args.budget)
    if args.ipyparallel:
        res["ipyparallel"] = bench_ipp(args.nodes, args.rounds, args.warmup, args.budget)
    o, ipp = res["odium"], res.get("ipyparallel") or {}
    ratios = {}
    if "ready_s" in o and "ready_s" in ipp:
        ratios["ready time"] = ipp["ready_s"] / o["ready_s"]
    for label, ok, ik in (("median round trip, all nodes", "python", "python"),
                          ("median round trip, %px-like", "python", "px"),
                          ("median round trip, one node", "one_node", "one_node")):
        if o.get(ok, {}).get("n") and ipp.get(ik, {}).get("n"):
            ratios[label] = ipp[ik]["median"] / o[ok]["median"]
    if ratios:
        res["ratios"] = ratios
    targets = {}
    if "ready_s" in o:
        targets["ready"] = {"value": o["ready_s"], "target": 1.0, "met": o["ready_s"] < 1.0}
    if o.get("python", {}).get("n"):
        m = o["python"]["median"]
        targets["round trip ms"] = {"value": m, "target": 5.0, "met": m < 5.0}
    res["targets"] = targets
    env["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    res["total_s"] = perf() - t_all
    print(report(res))
    print(f"\n(total {res['total_s']:.1f} s; load after {env['loadavg_after']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
        print(f"wrote {args.json}")
    return 0 if "error" not in o else 1


if __name__ == "__main__":
    sys.exit(main())
