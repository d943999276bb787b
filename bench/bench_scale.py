#!/usr/bin/env python
"""Scale: one hub and a swarm of N real nodes (bench/swarm.py) on this machine.

    python bench/bench_scale.py --nodes 10,100,300,1000 [--procs 4] [--json OUT]

For each N, a new hub (this process, SQLite store in a temporary home) and N swarm nodes in
``--procs`` processes:

  * join storm  every node joins at once, with a token of its own (``--join token``, the
                default: the join handshake, then register) or with its key trusted first
                (``--join trusted``: register only); timed from the processes' start until
                the hub has every node ready; the nodes' retried requests and refused
                handshakes are counted by the swarm;
  * broadcast   ``hub.run("x = 1", nodes="sw*")`` to all N, ``--rounds`` times: median and
                p90 in ms, per node, and the hub process's CPU per round (its mean);
  * idle        for ``--idle`` seconds, nothing asked: the hub's CPU (% of one core) and the
                swarm's, the hub's RSS;
  * jobs        ``hub.map(inc, range(--jobs))`` over the swarm (``--capacity`` slots a node):
                jobs/s, every value checked.

Every result is checked: a broadcast where a node is not ``ok`` counts as failed (and is
reported); a map whose values are wrong fails. Nothing sleeps to synchronise: waits are on
conditions with deadlines; the idle window is a measurement period.
With more than one size the report ends with the cost per added node (the slopes between
the smallest and largest size).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import psutil  # noqa: E402
from bench_core import percentile  # noqa: E402
from runtag import wait_until  # noqa: E402
from swarm import Swarm  # noqa: E402

perf = time.perf_counter


def inc(x: int) -> int:
    return x + 1


def cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


def one_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    import odium
    from odium.api.hub import remove_home, temporary_home

    me = psutil.Process()
    out: dict[str, Any] = {"nodes": n, "procs": args.procs, "join": args.join,
                           "capacity": args.capacity,
                           "load_before": os.getloadavg()}
    home = temporary_home("odium-scale-")
    hub = odium.Hub(home, ports=0).start()
    sw = None
    try:
        sw = Swarm(hub, n, args.procs, join=args.join, capacity=args.capacity)
        out["prepare_s"] = round(sw.prepared, 2)
        t0, c0 = perf(), cpu(me)
        sw.start()
        wait_until(lambda: sw.ready() == n, args.ready_timeout, f"{n} nodes ready", 0.05)
        out["ready_s"] = round(perf() - t0, 2)
        out["join_hub_cpu_s"] = round(cpu(me) - c0, 2)  # (less noisy than the time: one core)
        wait_until(lambda: sw.counts()["ready"] == n, 10, "the swarm's counts", 0.05)
        out["join_counts"] = sw.counts()
        # broadcast round trip
        samples, failed = [], []
        for i in range(args.warmup + args.rounds):
            if i == args.warmup:
                c0 = cpu(me)
            t = perf()
            res = hub.run("x = 1", nodes="sw*", timeout=60)
            dt = perf() - t
            bad = [k for k in res if res[k].status != "ok"]
            if len(res) != n or bad:
                failed.append(f"round {i}: {len(res)} entries, not ok: {bad[:5]}")
            elif i >= args.warmup:
                samples.append(dt)
        hub_cpu = (cpu(me) - c0) / max(args.rounds, 1)  # (the hub's CPU ticks: 10 ms each)
        ms = [x * 1000 for x in samples]
        out["broadcast"] = {"rounds": len(ms), "failed": failed,
                            "median_ms": round(percentile(ms, 50), 1) if ms else None,
                            "p90_ms": round(percentile(ms, 90), 1) if ms else None,
                            "per_node_ms": round(percentile(ms, 50) / n, 3) if ms else None,
                            "hub_cpu_ms_per_round": round(hub_cpu * 1000, 1)}
        # idle: what the hub and the swarm spend on heartbeats
        procs = [psutil.Process(pid) for pid in sw.pids()]
        h0, s0, t = cpu(me), sum(cpu(p) for p in procs), perf()
        time.sleep(args.idle)  # a measurement window, not a wait for anything
        dt = perf() - t
        out["idle"] = {"seconds": round(dt, 1),
                       "hub_cpu_pct": round(100 * (cpu(me) - h0) / dt, 1),
                       "swarm_cpu_pct": round(100 * (sum(cpu(p) for p in procs) - s0) / dt, 1),
                       "hub_rss_mb": round(me.memory_info().rss / 2**20, 1),
                       "swarm_rss_mb": round(sum(p.memory_info().rss for p in procs) / 2**20, 1)}
        lost = [x["name"] for x in hub.nodes() if x["name"].startswith("sw")
                and x["status"] != "ready"]
        out["idle"]["not_ready_after"] = lost
        # jobs
        if args.jobs:
            hub.map(inc, range(200), nodes="sw*", wait=120)  # warm-up
            out["jobs"] = jobs(hub, args.jobs, args.jobs_wait)
        out["load_after"] = os.getloadavg()
        return out
    finally:
        if sw is not None:
            sw.close()
        hub.close()
        remove_home(home)


def jobs(hub: Any, n: int, wait: float) -> dict[str, Any]:
    """``n`` jobs at once (as ``hub.map`` submits them); every value checked. One not done in
    ``wait`` seconds is reported with every move it made (nothing may be lost)."""
    t = perf()
    submitted = hub.submit_many([(inc, (x,), {}, None) for x in range(n)], nodes="sw*")
    values, stuck = [], []
    for j in submitted:
        try:
            values.append(j.result(max(0.1, wait - (perf() - t))))
        except Exception as e:  # noqa: BLE001 - reported, with what the hub knows of it
            stuck.append((j.id, f"{type(e).__name__}: {e}"))
    dt = perf() - t
    out: dict[str, Any] = {"jobs": n, "seconds": round(dt, 2), "per_s": round(n / dt),
                           "values_ok": values == [x + 1 for x in range(n)],
                           "not_done": len(stuck)}
    if stuck:
        out["not_done_examples"] = [{"error": why, "job": hub.job(jid)} for jid, why in stuck[:3]]
    return out


def report(r: dict[str, Any]) -> None:
    b, idle, jc = r["broadcast"], r["idle"], r["join_counts"]
    print(f"\n== {r['nodes']} nodes in {r['procs']} swarm processes (join: {r['join']}); "
          f"load {r['load_before'][0]:.2f} -> {r['load_after'][0]:.2f}")
    print(f"  join storm   all ready in {r['ready_s']} s; retried: {jc['retries'] or 'none'}; "
          f"refused handshakes: {jc['refused']}; hub CPU {r['join_hub_cpu_s']} s")
    print(f"  broadcast    median {b['median_ms']} ms, p90 {b['p90_ms']} ms "
          f"({b['per_node_ms']} ms per node), hub CPU {b['hub_cpu_ms_per_round']} ms a round; "
          f"{b['rounds']} rounds, {len(b['failed'])} failed {b['failed'][:2]}")
    print(f"  idle         hub {idle['hub_cpu_pct']} % of a core, swarm {idle['swarm_cpu_pct']} "
          f"%; hub RSS {idle['hub_rss_mb']} MB, swarm RSS {idle['swarm_rss_mb']} MB; "
          f"not ready: {idle['not_ready_after'] or 'none'}")
    if "jobs" in r:
        j = r["jobs"]
        print(f"  jobs         {j['jobs']} in {j['seconds']} s: {j['per_s']} jobs/s "
              f"(values {'ok' if j['values_ok'] else 'WRONG'}; not done: {j['not_done']})")
        for ex in j.get("not_done_examples", []):
            print(f"    NOT DONE {ex['error']}: {json.dumps(ex['job'], default=str)[:3000]}")


def slopes(results: list[dict[str, Any]]) -> dict[str, float]:
    a, b = results[0], results[-1]
    dn = b["nodes"] - a["nodes"]
    out = {"ready_ms_per_node": 1000 * (b["ready_s"] - a["ready_s"]) / dn,
           "hub_rss_kb_per_node": 1024 * (b["idle"]["hub_rss_mb"] - a["idle"]["hub_rss_mb"]) / dn,
           "hub_idle_cpu_pct_per_100_nodes":
               100 * (b["idle"]["hub_cpu_pct"] - a["idle"]["hub_cpu_pct"]) / dn}
    if a["broadcast"]["median_ms"] and b["broadcast"]["median_ms"]:
        out["broadcast_ms_per_node"] = (b["broadcast"]["median_ms"]
                                        - a["broadcast"]["median_ms"]) / dn
    return {k: round(v, 3) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", default="10,100,300,1000",
                    help="comma-separated sizes (default 10,100,300,1000)")
    ap.add_argument("--procs", type=int, default=4, help="swarm processes (default 4)")
    ap.add_argument("--join", choices=("token", "trusted"), default="token")
    ap.add_argument("--capacity", type=int, default=4, help="job slots of each swarm node")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of the idle window")
    ap.add_argument("--jobs", type=int, default=10_000, help="jobs in the map (0: none)")
    ap.add_argument("--jobs-wait", type=float, default=120.0,
                    help="seconds the jobs may take before those not done are reported")
    ap.add_argument("--ready-timeout", type=float, default=300.0)
    ap.add_argument("--json", help="write every number here")
    args = ap.parse_args()
    sizes = [int(x) for x in args.nodes.split(",")]
    results = []
    for n in sizes:
        r = one_size(n, args)
        report(r)
        results.append(r)
    doc: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                           "results": results}
    if len(results) > 1:
        doc["per_added_node"] = slopes(results)
        print(f"\nper added node ({sizes[0]} -> {sizes[-1]}): {doc['per_added_node']}")
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
