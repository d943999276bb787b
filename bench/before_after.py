#!/usr/bin/env python
"""The same benchmarks on two versions of Odium, back to back, on this machine.

    python bench/before_after.py --before REV [--after REV] [--runs 3] [--bench core,jobs,...]

Each version is a git worktree of its revision in a temporary directory (``--after``
defaults to the checkout itself, as it is). Each benchmark of each version is run as a
subprocess, ``python <tree>/bench/bench_X.py --json OUT`` with ``PYTHONPATH=<tree>``, so every
version runs its own benchmark scripts against its own code. The two versions alternate,
``--runs`` times each, in the order before, after, after, before, before, after, ...: each
goes first as often as second, so that what a run leaves behind (processes still ending,
warm caches) and load that comes and goes fall on both alike. Both run with their bytecode
compiled and cached (in the temporary directory), as an installed package runs. Reported:
for every median, p90, best and ready time in the benchmarks' JSON, the median over the runs
for each version and the ratio after / before, with the load average before and after.
(For times lower is better; for "best" and rates higher is.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCHES = {  # name: extra arguments (short enough to run several times)
    "core": ["--rounds", "200", "--shell-rounds", "50"],
    "jobs": ["--jobs", "5000", "--repeat", "3"],
    "magics": ["--rounds", "200", "--ready-runs", "3"],
    "cli": ["--runs", "15"],
}
KEEP = ("median", "median_ms", "p90", "best", "ready_s", "import_s")


def flatten(obj: Any, path: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{path}.{k}" if path else str(k)))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        if path.rsplit(".", 1)[-1] in KEEP:
            out[path] = float(obj)
    return out


def worktree(rev: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), rev],
                   check=True, capture_output=True)
    return where


def pycache(tree: Path, where: Path) -> dict[str, str]:
    """The environment that runs ``tree`` with its bytecode cached in ``where`` (as an
    installed package has it), compiled now: the versions have different numbers of modules,
    and compiling them again in every process would be counted against the one with more."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(PYTHONPATH=str(tree), PYTHONPYCACHEPREFIX=str(where))
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "odium")], env=env,
                   check=True, capture_output=True)
    return env


def run(tree: Path, env: dict[str, str], bench: str, out: Path) -> dict[str, float]:
    cmd = [sys.executable, str(tree / "bench" / f"bench_{bench}.py"), *BENCHES[bench],
           "--json", str(out)]
    p = subprocess.run(cmd, env=env, cwd=tempfile.gettempdir(), capture_output=True,
                       text=True, timeout=900)
    if p.returncode != 0 or not out.exists():
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}"
                         f"{p.stderr[-2000:]}")
    return flatten(json.loads(out.read_text()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="git revision to compare against")
    ap.add_argument("--after", default=None, help="git revision (default: this checkout)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--bench", default=",".join(BENCHES),
                    help=f"comma list of {', '.join(BENCHES)}")
    ap.add_argument("--json", default=None, metavar="OUT")
    args = ap.parse_args()
    benches = [b.strip() for b in args.bench.split(",") if b.strip()]
    unknown = set(benches) - set(BENCHES)
    if unknown:
        ap.error(f"unknown benchmarks: {', '.join(sorted(unknown))}")
    load_before = os.getloadavg()
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    with tempfile.TemporaryDirectory(prefix="odium-before-after-") as td:
        tmp = Path(td)
        trees = {"before": worktree(args.before, tmp / "before"),
                 "after": worktree(args.after, tmp / "after") if args.after else ROOT}
        envs = {side: pycache(tree, tmp / f"pycache-{side}") for side, tree in trees.items()}
        try:
            for bench in benches:
                got = results.setdefault(bench, {"before": {}, "after": {}})
                for i in range(args.runs):
                    for side in (("before", "after"), ("after", "before"))[i % 2]:
                        nums = run(trees[side], envs[side], bench,
                                   tmp / f"{bench}-{side}-{i}.json")
                        for k, v in nums.items():
                            got[side].setdefault(k, []).append(v)
                        print(f"{bench} {side} run {i + 1}/{args.runs} done", flush=True)
        finally:
            for side in ("before", "after"):
                if trees[side] != ROOT:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                    str(trees[side])], capture_output=True)
    load_after = os.getloadavg()
    report: dict[str, Any] = {"before": args.before, "after": args.after or "checkout",
                              "runs": args.runs, "load_before": load_before,
                              "load_after": load_after, "benches": {}}
    print(f"\nbefore {args.before}, after {args.after or 'this checkout'}; medians over "
          f"{args.runs} alternating runs")
    for bench, sides in results.items():
        print(f"\n{bench}")
        rows = report["benches"].setdefault(bench, {})
        for key in sorted(set(sides["before"]) & set(sides["after"])):
            b = statistics.median(sides["before"][key])
            a = statistics.median(sides["after"][key])
            rows[key] = {"before": b, "after": a, "ratio": a / b if b else None}
            ratio = f"{a / b:6.2f}" if b else "   n/a"
            print(f"  {key:60s} {b:10.3f} -> {a:10.3f}  x{ratio}")
    print(f"\nload average before {' '.join(f'{x:.2f}' for x in load_before)}, after "
          f"{' '.join(f'{x:.2f}' for x in load_after)}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
