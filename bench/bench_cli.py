#!/usr/bin/env python
"""CLI start-up: wall time of ``odium nodes`` against a running hub, and of the admin import.

    python bench/bench_cli.py [--runs 15] [--nodes 2] [--json OUT]

A hub runs in this process (an in-process ``Hub`` on OS-chosen 127.0.0.1 ports, in a temporary
home, with ``--nodes`` local nodes); each run is a fresh ``python -m odium nodes --home H``
process, timed from before ``subprocess.run`` until it has exited (time.perf_counter), and
checked: exit status 0 and every node listed. Also timed, the same way: ``python -c 'import
odium; odium.Admin'`` and ``python -c pass`` (the interpreter alone, for scale). Reported: the
median, min and max of each, with the load average before and after (the machine is shared).
Nothing sleeps to synchronise.

Each series runs twice: as this environment runs Python (with ``PYTHONDONTWRITEBYTECODE=1``,
as the shared machine sets it, every odium module is compiled again in every process), and
with bytecode cached, as an installed package has it (``PYTHONPYCACHEPREFIX`` a temporary
directory, so nothing is written into the tree).
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


def timed(cmd: list[str], check: str | None, runs: int, env: dict[str, str],
          cwd: Path) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = perf()
        # cwd: not the checkout (python -c and -m put the cwd first on sys.path)
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd=cwd)
        dt = perf() - t0
        if p.returncode != 0 or (check is not None and check not in p.stdout):
            raise SystemExit(f"{' '.join(cmd)} failed: {p.returncode}\n{p.stdout}{p.stderr}")
        out.append(dt)
    return out


def summary(xs: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(xs) * 1000, "min_ms": min(xs) * 1000,
            "max_ms": max(xs) * 1000}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--json", default=None, metavar="OUT")
    args = ap.parse_args()

    import odium

    tmp = Path(tempfile.mkdtemp(prefix="odium-bench-cli-"))
    report: dict[str, Any] = {"python": platform.python_version(), "runs": args.runs,
                              "odium": str(Path(odium.__file__).parent),
                              "nodes": args.nodes, "load_before": os.getloadavg()}
    try:
        with odium.Hub(tmp / "hub", ports=0, app=tmp) as hub:
            hub.start_local(args.nodes, prefix="b")
            py = sys.executable
            series = {
                "odium nodes": ([py, "-m", "odium", "nodes", "--home", str(hub.home)],
                                f"b-{args.nodes}"),
                "import odium; odium.Admin": ([py, "-c", "import odium; odium.Admin"], None),
                "python -c pass": ([py, "-c", "pass"], None),
            }
            plain = dict(os.environ)
            cached = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
            cached["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
            modes = {f"as run here (PYTHONDONTWRITEBYTECODE="
                     f"{os.environ.get('PYTHONDONTWRITEBYTECODE', '')})": plain,
                     "bytecode cached": cached}
            for mode, env in modes.items():
                report[mode] = {}
                for name, (cmd, check) in series.items():
                    timed(cmd, check, 2, env, tmp)  # warm the file cache (and the bytecode)
                    report[mode][name] = summary(timed(cmd, check, args.runs, env, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["load_after"] = os.getloadavg()
    for mode in modes:
        print(mode)
        for name in series:
            s = report[mode][name]
            print(f"  {name:<28} median {s['median_ms']:6.0f} ms   min {s['min_ms']:6.0f}   "
                  f"max {s['max_ms']:6.0f}")
    before, after = (" ".join(f"{x:.2f}" for x in report[k])
                     for k in ("load_before", "load_after"))
    print(f"load average before {before}, after {after}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
