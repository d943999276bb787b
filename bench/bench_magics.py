#!/usr/bin/env python
"""Notebook benchmark: ``%load_ext odium`` + ``%odium local N`` to ready, and ``%%odium x = 1``.

    python bench/bench_magics.py [--nodes 4] [--rounds 300] [--ready-runs 5] [--ipyparallel]
                                 [--json OUT]

Everything runs through a real IPython ``InteractiveShell`` in this process, with a real hub
(CURVE, signed messages) on OS-chosen 127.0.0.1 ports in a temporary home, and N local node
processes. Measured:
  * ready       from before ``%load_ext odium`` until ``%odium local N`` returns (every node
                ready), each run in a fresh Python process that has imported IPython only, as
                a kernel has: Odium's own imports are counted;
  * cell        ``shell.run_cell_magic("odium", "", "x = 1")`` on every node (the issue's
                measure), after a warm-up; each Result is checked: all nodes ok;
  * cell quiet  the same with ``--quiet`` (no live view object);
  * run_cell    ``shell.run_cell("%%odium\\nx = 1")``: the whole cell path, including
                IPython's transformers and the Result's HTML and text rendering;
  * hub.run     ``Hub.run("x = 1")`` in the same session: the core round trip, for scale.
  * ipyparallel (``--ipyparallel``): ``%%px --block x=1`` through ``run_cell_magic`` on N engines.
Timings are time.perf_counter; nothing sleeps to synchronise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

perf = time.perf_counter


def summary(samples: list[float]) -> dict[str, Any]:
    ms = sorted(x * 1000.0 for x in samples)
    if not ms:
        return {"n": 0}

    def pct(q: float) -> float:
        k = (len(ms) - 1) * q / 100.0
        lo, hi = int(k), min(int(k) + 1, len(ms) - 1)
        return ms[lo] + (ms[hi] - ms[lo]) * (k - lo)

    return {"n": len(ms), "median_ms": round(statistics.median(ms), 3),
            "p90_ms": round(pct(90), 3), "p99_ms": round(pct(99), 3),
            "min_ms": round(ms[0], 3), "max_ms": round(ms[-1], 3)}


def _env(home: Path) -> None:
    os.environ["ODIUM_HOME"] = str(home)
    os.environ["ODIUM_PORTS"] = "0"
    os.environ.pop("ODIUM_APP", None)


def ready_once(nodes: int) -> float:
    """In this (fresh) process: seconds from %load_ext odium to N local nodes ready."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    ip = InteractiveShell.instance()
    work = Path(tempfile.mkdtemp(prefix="odium-bench-magics-"))
    _env(work / "home")
    os.chdir(work)
    try:
        with capture_output():
            t0 = perf()
            ip.run_line_magic("load_ext", "odium")
            ip.run_line_magic("odium", f"local {nodes}")
            took = perf() - t0
            ip.run_line_magic("unload_ext", "odium")
        return took
    finally:
        os.chdir("/")
        shutil.rmtree(work, ignore_errors=True)


def ready_runs(nodes: int, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        p = subprocess.run([sys.executable, __file__, "--ready-only", "--nodes", str(nodes)],
                           capture_output=True, text=True, timeout=120)
        if p.returncode != 0:
            raise RuntimeError(f"ready run failed: {p.stderr[-2000:]}")
        out.append(float(p.stdout.strip().splitlines()[-1]))
    return out


def cells(nodes: int, rounds: int, warmup: int) -> dict[str, Any]:
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    import odium.jupyter

    ip = InteractiveShell.instance()
    work = Path(tempfile.mkdtemp(prefix="odium-bench-magics-"))
    _env(work / "home")
    os.chdir(work)
    res: dict[str, Any] = {}
    try:
        with capture_output():
            ip.run_line_magic("load_ext", "odium")
            ip.run_line_magic("odium", f"local {nodes}")
        magics = odium.jupyter.current()
        hub = magics.hub

        def measure(fn: Any) -> list[float]:
            for _ in range(warmup):
                fn()
            xs = []
            for _ in range(rounds):
                t0 = perf()
                r = fn()
                xs.append(perf() - t0)
                assert r.ok and len(r) == nodes, r
            return xs

        res["cell"] = summary(measure(lambda: ip.run_cell_magic("odium", "", "x = 1")))
        res["cell_quiet"] = summary(measure(
            lambda: ip.run_cell_magic("odium", "--quiet", "x = 1")))

        def full_cell() -> Any:
            with capture_output():
                out = ip.run_cell("%%odium\nx = 1", store_history=False)
            return out.result

        res["run_cell"] = summary(measure(full_cell))
        res["hub_run"] = summary(measure(
            lambda: hub.run("x = 1", session=magics.session)))
        with capture_output():
            ip.run_line_magic("unload_ext", "odium")
    finally:
        os.chdir("/")
        shutil.rmtree(work, ignore_errors=True)
    return res


def ipyparallel_px(nodes: int, rounds: int, warmup: int) -> dict[str, Any]:
    try:
        import ipyparallel as ipp
        from IPython.core.interactiveshell import InteractiveShell
        from IPython.utils.capture import capture_output
    except ImportError as e:
        return {"error": f"not installed: {e}"}
    ip = InteractiveShell.instance()
    cluster = ipp.Cluster(n=nodes, log_level=40)
    try:
        t0 = perf()
        rc = cluster.start_and_connect_sync()
        rc.wait_for_engines(nodes, timeout=60)
        ready = perf() - t0
        rc[:].activate()
        xs = []
        with capture_output():
            for i in range(warmup + rounds):
                t0 = perf()
                ip.run_cell_magic("px", "--block", "x=1")
                if i >= warmup:
                    xs.append(perf() - t0)
        return {"ready_s": round(ready, 3), "px": summary(xs)}
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        return {"error": repr(e)}
    finally:
        try:
            cluster.stop_cluster_sync()
        except Exception:  # noqa: BLE001
            pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--ready-runs", type=int, default=5)
    ap.add_argument("--ipyparallel", action="store_true", help="also time %%%%px --block x=1")
    ap.add_argument("--json", metavar="OUT")
    ap.add_argument("--ready-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ready_only:
        print(ready_once(args.nodes))
        return 0
    out: dict[str, Any] = {"nodes": args.nodes, "python": platform.python_version(),
                           "cpus": os.cpu_count(), "load": os.getloadavg()}
    ready = ready_runs(args.nodes, args.ready_runs)
    out["ready_s"] = {"median": round(statistics.median(ready), 3),
                      "runs": [round(x, 3) for x in ready]}
    out.update(cells(args.nodes, args.rounds, args.warmup))
    if args.ipyparallel:
        out["ipyparallel"] = ipyparallel_px(args.nodes, args.rounds, args.warmup)
    print(f"%load_ext odium + %odium local {args.nodes} to ready: median "
          f"{out['ready_s']['median']:.2f} s (runs {out['ready_s']['runs']})")
    for key, label in (("cell", "%%odium x = 1 (run_cell_magic)"),
                       ("cell_quiet", "%%odium --quiet x = 1"),
                       ("run_cell", "run_cell('%%odium\\nx = 1')"),
                       ("hub_run", "Hub.run('x = 1') (core)")):
        s = out[key]
        print(f"{label:34} median {s['median_ms']:.2f} ms  p90 {s['p90_ms']:.2f}  "
              f"p99 {s['p99_ms']:.2f}  (n={s['n']})")
    if args.ipyparallel:
        ipp_out = out["ipyparallel"]
        if "px" in ipp_out:
            px = ipp_out["px"]
            print(f"{'ipyparallel %%px --block x=1':34} median {px['median_ms']:.2f} ms  "
                  f"p90 {px['p90_ms']:.2f}  (ready {ipp_out['ready_s']} s)")
        else:
            print(f"ipyparallel: {ipp_out['error']}")
    print(f"(machine: {out['cpus']} CPUs, load {tuple(round(x, 2) for x in out['load'])})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
