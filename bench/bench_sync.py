"""Sync of a node one commit behind, code only, end to end: from ``hub.sync()`` to the node
answering from its restarted process at the hub's commit. Target (issue 3): under 2 s.

    python bench/bench_sync.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import odium

GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@example.invalid",
           "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@example.invalid"}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True,
                          env=GIT_ENV).stdout


def one_round(base: Path) -> tuple[float, float]:
    hub_app, node_app = base / "hubapp", base / "nodeapp"
    hub_app.mkdir()
    git(hub_app, "init", "-q", "-b", "main")
    (hub_app / "app.py").write_text("VALUE = 1\n")
    git(hub_app, "add", ".")
    git(hub_app, "commit", "-q", "-m", "one")
    git(base, "clone", "-q", str(hub_app), str(node_app))
    (hub_app / "app.py").write_text("VALUE = 2\n")
    git(hub_app, "commit", "-q", "-am", "two")
    with odium.Hub(base / "hub", ports=0, app=hub_app) as hub:
        hub.start_local(1, prefix="lab", app=node_app)
        t0 = time.perf_counter()
        r = hub.sync("lab-1", timeout=60)
        t_sync = time.perf_counter() - t0
        assert r.ok, r
        hub.wait_for_nodes(["lab-1"], 30)
        nr = hub.run("import app; app.VALUE", timeout=10)["lab-1"]  # requires match
        t_match = time.perf_counter() - t0
        assert nr.ok and nr.value == 2, nr
    return t_sync, t_match


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    syncs, matches = [], []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as d:
            s, m = one_round(Path(d))
        syncs.append(s)
        matches.append(m)
    print(f"sync one commit behind (code only), {args.rounds} rounds:")
    med = statistics.median(syncs)
    print(f"  hub.sync() -> node answers at the hub's commit  median {med:.3f} s"
          f"  min {min(syncs):.3f}  max {max(syncs):.3f}")
    print(f"  ... and a 'match' command has run there         median "
          f"{statistics.median(matches):.3f} s")
    print(f"target < 2 s: {'MET' if statistics.median(syncs) < 2 else 'MISSED'}")


if __name__ == "__main__":
    main()
