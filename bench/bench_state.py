#!/usr/bin/env python
"""State benchmark: state id + environment fingerprint, cold and warm; sync of one commit.

    python bench/bench_state.py [--app PATH] [--rounds 50] [--json OUT]

Applications measured (each a real git repository):
  * clean    a temporary app with a declaration (3 pip requirements, 2 Debian packages,
             2 environment variables, 2 files), on a clean commit;
  * dirty    the same app with one modified and one untracked file;
  * --app    any other path you name (e.g. this repository).
For each: ``state_id(app)`` + ``fingerprint(app, decl)`` together, and ``snapshot(app)``
(which also reads the declaration and checks it against the installed packages):
  * cold     in this process after ``clear_cache()`` (every part recomputed);
  * warm     repeated calls, caches warm (the target: under 50 ms);
  * process  a fresh ``python -c`` that imports odium.local.appstate and computes both once, timed
             inside the child from before the import (the target: under 300 ms), and the
             child's whole wall time including interpreter start-up.
Sync: a clone one commit behind, ``make_bundle`` on the hub's repository and
``apply_bundle`` on the clone (target: under 2 s).
Every result is checked (the state id has the right shape, the clone reaches the target).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from odium.core.requirements import UNVERSIONED, commit_of  # noqa: E402
from odium.local.appstate import load_declaration, snapshot, state_id  # noqa: E402
from odium.local.fingerprint import clear_cache, fingerprint  # noqa: E402
from odium.local.sync import apply_bundle, make_bundle  # noqa: E402

perf = time.perf_counter
GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@example.invalid",
           "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@example.invalid"}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True,
                          env=GIT_ENV).stdout


def make_app(root: Path) -> Path:
    app = root / "app"
    (app / "data").mkdir(parents=True)
    (app / "pyproject.toml").write_text(
        '[project]\nname = "benchapp"\nversion = "0.1"\n\n[tool.odium]\n'
        'pip = ["pyzmq>=25", "GitPython>=3.1", "msgspec"]\n'
        'system = ["bash", "odium-no-such-package"]\n'
        'env = ["HOME", "OMP_NUM_THREADS"]\n'
        'files = ["data/params.json", "data/absent.csv"]\n')
    (app / "data" / "params.json").write_text('{"alpha": 0.5}\n')
    for i in range(50):
        (app / f"mod{i}.py").write_text(f"X = {i}\n" * 20)
    git(app, "init", "-q", "-b", "main")
    git(app, "add", "-A")
    git(app, "commit", "-q", "-m", "bench app")
    old = time.time() - 60  # age the files, as on a machine where nobody is typing
    for p in [*app.rglob("*")]:
        os.utime(p, (old, old))
    return app


def dirty_copy(root: Path, app: Path) -> Path:
    d = root / "dirty"
    git(root, "clone", "-q", str(app), str(d))
    (d / "mod3.py").write_text("X = 'changed'\n")
    (d / "notes.txt").write_text("untracked\n")
    old = time.time() - 60
    for p in [*d.rglob("*")]:
        os.utime(p, (old, old))
    return d


def ms(xs: list[float]) -> dict[str, float]:
    s = sorted(x * 1000 for x in xs)
    return {"median": s[len(s) // 2], "min": s[0], "max": s[-1], "n": len(s)}


def check_state(s: str) -> None:
    assert s == UNVERSIONED or commit_of(s), s


def measure(app: Path, rounds: int) -> dict[str, Any]:
    decl = load_declaration(app)

    def pair() -> None:
        check_state(state_id(app))
        fingerprint(app, decl)

    def snap() -> None:
        check_state(snapshot(app).state)

    out: dict[str, Any] = {"state": state_id(app)}
    for name, fn in (("state_id+fingerprint", pair), ("snapshot", snap)):
        cold: list[float] = []
        for _ in range(max(5, rounds // 5)):
            clear_cache()
            t = perf()
            fn()
            cold.append(perf() - t)
        fn()
        warm: list[float] = []
        for _ in range(rounds):
            t = perf()
            fn()
            warm.append(perf() - t)
        out[name] = {"cold": ms(cold), "warm": ms(warm)}
    out["process"] = fresh_process(app, max(3, rounds // 10))
    return out


CHILD = """
import time
t0 = time.perf_counter()
from odium.local.appstate import load_declaration, state_id
from odium.local.fingerprint import fingerprint
from pathlib import Path
app = Path({app!r})
s = state_id(app)
fp = fingerprint(app, load_declaration(app))
print(time.perf_counter() - t0, s)
"""


def fresh_process(app: Path, n: int) -> dict[str, Any]:
    inside: list[float] = []
    wall: list[float] = []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(n):
        t = perf()
        r = subprocess.run([sys.executable, "-c", CHILD.format(app=str(app))], env=env,
                           capture_output=True, text=True, timeout=60, check=True)
        wall.append(perf() - t)
        secs, state = r.stdout.split()
        check_state(state)
        inside.append(float(secs))
    return {"import+compute": ms(inside), "wall": ms(wall)}


def measure_sync(root: Path, app: Path, rounds: int) -> dict[str, Any]:
    times: list[float] = []
    for i in range(rounds):
        node = root / f"node{i}"
        git(root, "clone", "-q", str(app), str(node))
        have = git(node, "rev-parse", "HEAD").strip()
        (app / "mod0.py").write_text(f"X = {i}\n")
        git(app, "commit", "-q", "-am", f"advance {i}")
        target = git(app, "rev-parse", "HEAD").strip()
        t = perf()
        data = make_bundle(app, target, [have])
        apply_bundle(node, data, target)
        times.append(perf() - t)
        assert state_id(node) == target
    return {"make+apply": ms(times), "bundle_bytes": len(data)}


def show(name: str, r: dict[str, Any]) -> None:
    print(f"{name}: {r['state']}")
    for k in ("state_id+fingerprint", "snapshot"):
        c, w = r[k]["cold"], r[k]["warm"]
        print(f"  {k:22} cold {c['median']:7.1f} ms (max {c['max']:.1f})   "
              f"warm {w['median']:6.2f} ms (max {w['max']:.2f})")
    p = r["process"]
    print(f"  {'fresh process':22} import+compute {p['import+compute']['median']:7.1f} ms   "
          f"whole process {p['wall']['median']:.1f} ms")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--app", action="append", default=[], help="another application to measure")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    results: dict[str, Any] = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="odium-bench-state-") as tmp:
        root = Path(tmp)
        app = make_app(root)
        runs: list[tuple[str, Path]] = [("clean", app), ("dirty", dirty_copy(root, app))]
        runs += [(p, Path(p)) for p in a.app]
        for name, path in runs:
            results[name] = measure(path, a.rounds)
            show(name, results[name])
        results["sync"] = measure_sync(root, app, max(3, a.rounds // 10))
        s = results["sync"]
        print(f"sync one commit behind: make_bundle+apply_bundle {s['make+apply']['median']:.1f} ms"
              f" (max {s['make+apply']['max']:.1f}), bundle {s['bundle_bytes']} bytes")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

