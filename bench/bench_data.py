"""Data benchmark: a NumPy array pushed to every node, pulled back from one, scattered and
gathered; ipyparallel's DirectView push/pull/scatter/gather in the same run, optionally.

    python bench/bench_data.py [--mb 200] [--nodes 4] [--repeat 3] [--ipyparallel] [--json OUT]

Odium: ``hub.push({"x": arr})`` to the ``--nodes`` local nodes (every byte encrypted and
signed; the array's raw buffer in base64, in 4 MB parts: odium.core.arrays), checked on each
node by its sum; ``hub.pull("x", nodes=one)``; ``scatter``/``gather`` of the same array.
MB/s is of the array's size (``--mb``), per operation: a push to 4 nodes delivers 4 times
that. The hub process's peak RSS growth during the push is given: the hub holds each part
once for all nodes, not one copy a node. ipyparallel (``--ipyparallel``): ``ipp.Cluster(n=N)``
in a throwaway profile, ``dview.push(..., block=True)`` and the rest; medians of
``--repeat`` runs, and the ratios Odium / ipyparallel.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ippcluster import have_ipp, ipp_cluster  # noqa: E402 (run as a script: its directory is on sys.path)

perf = time.perf_counter


def _array(mb: float) -> Any:
    import numpy as np

    return np.random.default_rng(7).random(int(mb * 1e6 / 8))


def _median(xs: list[float]) -> float:
    return round(statistics.median(xs), 1)


def _timed(fn: Any, repeat: int, mb: float) -> dict[str, Any]:
    rates = []
    for _ in range(repeat):
        t = perf()
        fn()
        rates.append(mb / (perf() - t))
    return {"mb_s": _median(rates), "runs": [round(r, 1) for r in rates]}


def _peak_rss_growth(fn: Any) -> float:
    """MB the process's peak RSS grew by while ``fn`` ran (Linux: VmHWM, reset first)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        read = lambda: int(next(ln for ln in Path("/proc/self/status").read_text()  # noqa: E731
                                .splitlines() if ln.startswith("VmHWM")).split()[1])
        before = int(next(ln for ln in Path("/proc/self/status").read_text().splitlines()
                          if ln.startswith("VmRSS")).split()[1])
        fn()
        return round((read() - before) / 1024, 1)
    except (OSError, StopIteration):
        fn()
        return -1.0


def bench_odium(mb: float, nodes: int, repeat: int) -> dict[str, Any]:
    import numpy as np

    import odium

    out: dict[str, Any] = {"nodes": nodes, "mb": mb}
    home = Path(tempfile.mkdtemp(prefix="odium-bench-data-"))
    arr = _array(mb)
    total = float(arr.sum())
    try:
        with odium.Hub(home / "hub", ports=0, app=home) as hub:
            hub.start_local(nodes, prefix="d")
            hub.push({"warm": np.zeros(10)})

            def push() -> None:
                hub.push({"x": arr})
                r = hub.run("float(x.sum())")
                assert all(abs(r[n].value - total) < 1e-6 * abs(total) for n in r), "bad sum"

            out["push_rss_growth_mb"] = _peak_rss_growth(push)
            out["push"] = _timed(push, repeat, mb)
            one = sorted(n["name"] for n in hub.nodes())[0]
            out["pull"] = _timed(lambda: np.testing.assert_array_equal(
                hub.pull("x", nodes=one)[one], arr), repeat, mb)
            out["scatter"] = _timed(lambda: hub.scatter("s", arr), repeat, mb)
            out["gather"] = _timed(lambda: np.testing.assert_array_equal(
                hub.gather("s"), arr), repeat, mb)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return out


def bench_ipp(mb: float, engines: int, repeat: int) -> dict[str, Any]:
    out: dict[str, Any] = {"engines": engines, "mb": mb}
    if not have_ipp(out):
        return out
    import numpy as np

    arr = _array(mb)
    try:
        with ipp_cluster(engines, out, "ipp-bench-data-") as rc:
            dv = rc[:]
            dv.push({"warm": np.zeros(10)}, block=True)
            out["push"] = _timed(lambda: (dv.push({"x": arr}, block=True),
                                          dv.execute("float(x.sum())", block=True)), repeat, mb)
            one = rc[rc.ids[0]]
            out["pull"] = _timed(lambda: np.testing.assert_array_equal(
                one.pull("x", block=True), arr), repeat, mb)
            out["scatter"] = _timed(lambda: dv.scatter("s", arr, block=True), repeat, mb)
            out["gather"] = _timed(lambda: np.testing.assert_array_equal(
                dv.gather("s", block=True), arr), repeat, mb)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()
    return out


OPS = ("push", "pull", "scatter", "gather")


def report(res: dict[str, Any]) -> str:
    o = res["odium"]
    lines = [f"load average {res['load'][0]:.2f} before, {res['load'][1]:.2f} after",
             f"odium: {o['nodes']} local nodes, an array of {o['mb']:.0f} MB"]
    if "error" in o:
        lines.append(f"  odium FAILED: {o['error']}")
    for op in OPS:
        if op in o:
            lines.append(f"  {op:<8} {o[op]['mb_s']:>8.1f} MB/s median  (runs {o[op]['runs']})")
    if "push_rss_growth_mb" in o:
        lines.append(f"  hub peak RSS growth during a push: {o['push_rss_growth_mb']} MB")
    ipp = res.get("ipyparallel")
    if ipp:
        lines.append(f"ipyparallel {ipp.get('version', '?')}: {ipp['engines']} engines")
        if "error" in ipp:
            lines.append(f"  ipyparallel FAILED: {ipp['error']}")
        for op in OPS:
            if op in ipp:
                lines.append(f"  {op:<8} {ipp[op]['mb_s']:>8.1f} MB/s median  "
                             f"(runs {ipp[op]['runs']})")
        for op in OPS:
            if op in o and op in ipp:
                lines.append(f"ratio odium / ipyparallel, {op}: "
                             f"{o[op]['mb_s'] / ipp[op]['mb_s']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import os

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=200.0, help="the array's size, MB")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ipyparallel", action="store_true", help="also time ipyparallel")
    ap.add_argument("--json", default=None, metavar="OUT")
    args = ap.parse_args(argv)
    load0 = os.getloadavg()[0]
    res: dict[str, Any] = {"odium": bench_odium(args.mb, args.nodes, args.repeat)}
    if args.ipyparallel:
        res["ipyparallel"] = bench_ipp(args.mb, args.nodes, args.repeat)
    res["load"] = [load0, os.getloadavg()[0]]
    print(report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 1 if any("error" in v for v in res.values() if isinstance(v, dict)) else 0


if __name__ == "__main__":
    sys.exit(main())
