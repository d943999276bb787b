#!/usr/bin/env python
"""Tree benchmark: a root with relays and their leaves against the same leaves flat.

    python bench/bench_tree.py [--relays 2] [--leaves 4] [--rounds 200] [--json OUT]

In ONE run, on OS-chosen 127.0.0.1 ports in one temporary directory:
  * tree   a root hub (in this process), ``--relays`` relay processes joined to it
           (``odium node --serve``), and ``--leaves`` leaf processes joined to each relay;
           the root targets the leaves as ``relay/leaf``, ``nodes="*/*"``;
  * flat   a second root hub (in this process) with the same number of leaves
           (relays x leaves) joined to it directly (``hub.start_local``), ``nodes="*"``.
Measured for each:
  * ready       from just before ``Hub(...)`` is created until the root sees every leaf
                ``ready`` (for the tree: relays joined with tokens, then the leaves with
                tokens made at their relay);
  * broadcast   round trip of ``hub.run("x = 1", nodes=PATTERN, timeout=10)`` to every leaf,
                after a warm-up, in alternating blocks (tree, flat, tree, flat, ...) so that
                the machine's noise hits both; every result is checked (one entry per leaf,
                all ``ok``) and a failed round is counted, never timed.
Goals: tree median <= 2 x flat median, and tree median <= 8 ms.

Nothing here sleeps to synchronise: every wait is on a condition with a deadline. Every
process started is stopped at the end (and looked for afterwards), and the temporary
directory is removed. The sections are functions over ``Topology`` objects (``SECTIONS``):
``broadcast`` (above) and ``jobs``: ``hub.map`` of ``--jobs`` trivial jobs to every leaf
(tree: through the relays' own queues and stores), ``--job-runs`` runs each, alternating;
goal: tree >= 50 % of flat.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import percentile, summary  # noqa: E402
from runtag import RunTag, wait_until

perf = time.perf_counter

# Every process this run starts (and everything they start) carries this in its environment,
# so that one left behind is found at the end even once it is an orphan.
RUN = RunTag("ODIUM_BENCH_TREE")


# --- processes -----------------------------------------------------------------------------


class Proc:
    """An ``odium node`` process started by this benchmark (a relay or a leaf of one)."""

    def __init__(self, label: str, home: Path, args: list[str], app: Path,
                 env: dict[str, str] | None = None) -> None:
        self.label, self.home = label, home
        self.log = home.parent / f"{home.name}.log"
        with open(self.log, "ab") as logf:
            # its own session (a Ctrl-C here reaches only this process, which stops it), and it
            # stops by itself should this process die (its parent: ODIUM_DIE_WITH_PARENT)
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "odium", "node", "--home", str(home), "--app", str(app),
                 *args], stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                cwd=app, start_new_session=True,
                env={**os.environ, **(env or {}), "ODIUM_DIE_WITH_PARENT": str(os.getpid())})

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 8) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def stop_all(procs: list[Proc], timeout: float = 10.0) -> list[str]:
    """SIGTERM every process, wait for them all (one deadline), SIGKILL what is left.
    Returns what had to be killed, or had exited before it was asked to."""
    notes = []
    for p in procs:
        if p.alive():
            p.proc.send_signal(signal.SIGTERM)
        else:
            notes.append(f"{p.label} had exited already ({p.proc.returncode})")
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.proc.wait(max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait()
            notes.append(f"{p.label} killed: no exit {timeout} s after SIGTERM")
    return notes


# --- the two topologies --------------------------------------------------------------------


class Topology:
    """A root hub in this process and its leaves; ``pattern`` targets every leaf."""

    label = "?"
    pattern = "*"

    def __init__(self, base: Path, app: Path, n_leaves: int) -> None:
        self.base, self.app, self.n_leaves = base, app, n_leaves
        self.hub: Any = None
        self.leaves: list[str] = []  # the leaves' names at the root
        self.info: dict[str, Any] = {}  # timings of the start, and what was seen

    def _hub(self, name: str) -> Any:
        from odium.api.hub import Hub

        home = self.base / name
        home.mkdir(mode=0o700)
        self.hub = Hub(home, ports=0, interface="127.0.0.1", app=self.app)
        self.hub.start()
        return self.hub

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def run_all(self) -> Any:
        return self.hub.run("x = 1", nodes=self.pattern, timeout=10)


class Flat(Topology):
    """Leaves joined straight to the root, as ``bench_core.py`` makes them."""

    label = "flat"
    pattern = "*"

    def start(self) -> None:
        t0 = perf()
        hub = self._hub("flat-root")
        t_hub = perf()
        started = hub.start_local(self.n_leaves, prefix="leaf", timeout=60)
        t_ready = perf()
        self.leaves = [s.name for s in started]
        self.info.update(ready_s=t_ready - t0, hub_up_s=t_hub - t0,
                         leaves_ready_s=t_ready - t_hub)

    def close(self) -> None:
        if self.hub is not None:
            t = perf()
            self.hub.close()
            self.info["stop_s"] = perf() - t


class Tree(Topology):
    """Relays joined to the root with join tokens (``odium node --serve``), each with its
    leaves joined to it with tokens made at the relay, as tests/test_tree.py ``make_tree``
    builds it. The tokens are made in this process (``Hub.token`` at the root,
    ``odium.Admin(relay home).token()`` at a relay: what ``odium token`` does, without a
    Python start per token)."""

    label = "tree"
    pattern = "*/*"

    def __init__(self, base: Path, app: Path, relays: int, leaves: int, heartbeat: float
                 ) -> None:
        super().__init__(base, app, relays * leaves)
        self.relay_names = [f"lab{i + 1}" for i in range(relays)]
        self.per_relay = leaves
        self.heartbeat = heartbeat
        self.procs: list[Proc] = []

    def _token_file(self, token: str, name: str) -> Path:
        from odium.local.home import write_token_file

        path = self.base / f"{name}.token"
        write_token_file(path, token)
        return path

    def start(self) -> None:
        import odium

        t0 = perf()
        hub = self._hub("tree-root")
        t_hub = perf()
        relays: dict[str, Proc] = {}
        for r in self.relay_names:
            tok = self._token_file(hub.token(ttl=600), r)
            relays[r] = Proc(r, self.base / f"relay-{r}", [
                "--token-file", str(tok), "--name", r, "--serve", "--ports", "0",
                "--heartbeat", str(self.heartbeat)], self.app)
            self.procs.append(relays[r])
        self._wait(lambda: hub.wait_for_nodes(self.relay_names, 60), "relays ready at the root")
        t_relays = perf()
        for r, p in relays.items():  # each relay's hub part wrote its hub.json before joining
            info = p.home / "hub.json"
            wait_until(lambda: info.exists() or not p.alive(), 30,  # noqa: B023 - waited here
                       f"{r}'s hub.json")
            if not p.alive():
                raise RuntimeError(f"relay {r} exited ({p.proc.returncode}):\n{p.tail()}")
        paths = []
        with_tokens = []
        for r, p in relays.items():
            with odium.Admin(p.home) as admin:
                toks = [admin.token(600) for _ in range(self.per_relay)]
            for i, text in enumerate(toks):
                leaf = f"pc-{i + 1}"
                with_tokens.append((r, leaf, self._token_file(text, f"{r}-{leaf}")))
        t_tokens = perf()
        for r, leaf, path in with_tokens:
            self.procs.append(Proc(f"{r}/{leaf}", self.base / f"leaf-{r}-{leaf}",
                                   ["--token-file", str(path), "--name", leaf], self.app))
            paths.append(f"{r}/{leaf}")
        self._wait(lambda: hub.wait_for_nodes(paths, 60), "every leaf ready at the root")
        t_ready = perf()
        self.leaves = paths
        self.info.update(ready_s=t_ready - t0, hub_up_s=t_hub - t0,
                         relays_ready_s=t_relays - t_hub, leaf_tokens_s=t_tokens - t_relays,
                         leaves_ready_s=t_ready - t_tokens)
        # what the root lists: the relays, and every leaf through its relay
        listed = {n["name"]: n for n in hub.nodes()}
        want = sorted(self.relay_names + paths)
        if sorted(listed) != want:
            raise RuntimeError(f"the root lists {sorted(listed)}, wanted {want}")
        bad = [f"{p}: via {listed[p].get('via')!r}" for p in paths
               if listed[p].get("via") != p.split("/")[0]]
        if bad:
            raise RuntimeError("leaves not listed through their relay: " + "; ".join(bad))

    def _wait(self, wait: Callable[[], None], what: str) -> None:
        try:
            wait()
        except Exception as e:
            dead = [f"{p.label} exited ({p.proc.returncode}):\n{p.tail()}"
                    for p in self.procs if not p.alive()]
            raise RuntimeError(f"{what}: {type(e).__name__}: {e}"
                               + ("\n" + "\n".join(dead) if dead else "")) from e

    def close(self) -> None:
        t = perf()
        leaves = [p for p in self.procs if "/" in p.label]
        notes = stop_all(leaves) + stop_all([p for p in self.procs if "/" not in p.label])
        if self.hub is not None:
            self.hub.close()
        self.info["stop_s"] = perf() - t
        if notes:
            self.info["stop_notes"] = notes


def warm_up_imports(base: Path) -> float:
    """Import the hub's code and start and close a throwaway hub, untimed: the first hub this
    process makes would otherwise pay for the imports (and lazy imports) alone."""
    t = perf()
    from odium.api.hub import Hub

    home = base / "warm-up"
    home.mkdir(mode=0o700)
    with Hub(home, ports=0, interface="127.0.0.1", app=base):
        pass
    shutil.rmtree(home, ignore_errors=True)
    return perf() - t


def first_after_ready(t: Topology) -> None:
    """The first broadcast straight after ready: what a leaf still does after it says ready
    (starting its worker) shows up here."""
    t0 = perf()
    r = t.run_all()
    t.info["first_ms"] = (perf() - t0) * 1000
    t.info["first_problem"] = checker(t.leaves)(r)


# --- sections ------------------------------------------------------------------------------


def checker(want: list[str]) -> Callable[[Any], str | None]:
    """None when the result has exactly one entry per leaf and every one is ok."""
    want_sorted = sorted(want)

    def check(r: Any) -> str | None:
        got = sorted(r.nodes)
        if got != want_sorted:
            return f"entries for {got}, wanted {want_sorted}"
        bad = [f"{k}: {v.status} {v.error}" for k, v in r.nodes.items() if not v.ok]
        return "; ".join(bad) if bad else None
    return check


def section_broadcast(topos: list[Topology], args: argparse.Namespace) -> dict[str, Any]:
    """Round trip of ``x = 1`` to every leaf, each topology timed in alternating blocks."""
    blocks = max(1, min(args.blocks, args.rounds))
    per_block = [args.rounds // blocks + (1 if i < args.rounds % blocks else 0)
                 for i in range(blocks)]
    out: dict[str, Any] = {"blocks": blocks, "per_block": per_block}
    checks = {t.label: checker(t.leaves) for t in topos}
    data: dict[str, dict[str, Any]] = {
        t.label: {"samples": [], "failures": [], "block_medians_ms": [], "phases": {
            k: [] for k in ("submit_to_issued", "issued_to_last_start", "exec_max",
                            "last_finish_to_return")}} for t in topos}

    def one(t: Topology, measured: bool) -> None:
        d = data[t.label]
        c0 = time.time()
        t0 = perf()
        try:
            r = t.run_all()
        except Exception as e:  # a raised error is a failed round too
            d["failures"].append(f"{type(e).__name__}: {e}")
            return
        dt = perf() - t0
        c1 = time.time()
        err = checks[t.label](r)
        if err:
            d["failures"].append(err if measured else f"warm-up: {err}")
            return
        if not measured:
            return
        d["samples"].append(dt)
        es = list(r.nodes.values())
        if all(e.started and e.finished for e in es) and r.issued:
            ph = d["phases"]
            ph["submit_to_issued"].append(r.issued - c0)
            ph["issued_to_last_start"].append(max(e.started for e in es) - r.issued)
            ph["exec_max"].append(max(e.finished - e.started for e in es))
            ph["last_finish_to_return"].append(c1 - max(e.finished for e in es))

    for t in topos:  # warm-up, not timed
        for _ in range(args.warmup):
            one(t, False)
    stopped = ""
    for b, n in enumerate(per_block):
        for t in topos:  # tree, flat, tree, flat, ...
            for _ in range(min(args.block_warmup, n)):
                one(t, False)
            before = len(data[t.label]["samples"])
            for _ in range(n):
                one(t, True)
            got = data[t.label]["samples"][before:]
            data[t.label]["block_medians_ms"].append(
                percentile(got, 50) * 1000 if got else None)
        fails = sum(len(d["failures"]) for d in data.values())
        if fails > args.max_failures:
            stopped = f"stopped after block {b + 1}: {fails} failed rounds"
            break
    for t in topos:
        d = data[t.label]
        s = summary(d["samples"])
        s["failed"] = len(d["failures"])
        if d["failures"]:
            s["first_failure"] = d["failures"][0][:500]
        s.update(block_medians_ms=d["block_medians_ms"],
                 breakdown_ms={k: {"median": percentile(v, 50) * 1000,
                                   "p90": percentile(v, 90) * 1000}
                               for k, v in d["phases"].items() if v},
                 raw_ms=[round(x * 1000, 4) for x in d["samples"]])
        out[t.label] = s
    if stopped:
        out["stopped"] = stopped
    tr, fl = out.get("tree", {}), out.get("flat", {})
    if tr.get("n") and fl.get("n"):
        out["ratio_tree_flat"] = tr["median"] / fl["median"]
        pairs = [a / b for a, b in zip(tr["block_medians_ms"], fl["block_medians_ms"], strict=True)
                 if a and b]
        out["block_ratios"] = pairs
    return out


def goals_broadcast(res: dict[str, Any]) -> dict[str, Any]:
    tr = res.get("tree", {})
    if not tr.get("n") or "ratio_tree_flat" not in res:
        return {"broadcast": {"met": False, "why": "no samples"}}
    ratio, med = res["ratio_tree_flat"], tr["median"]
    return {"tree/flat median": {"value": ratio, "target": "<= 2", "met": ratio <= 2.0},
            "tree median ms": {"value": med, "target": "<= 8", "met": med <= 8.0}}


def inc(x: int) -> int:
    return x + 1


def section_jobs(topos: list[Topology], args: argparse.Namespace) -> dict[str, Any]:
    """Job throughput: ``hub.map(inc, range(--jobs))`` to every leaf (tree: through the
    relays' own queues and stores), in alternating runs; every value checked."""
    out: dict[str, Any] = {"jobs": args.jobs, "runs": args.job_runs}
    rates: dict[str, list[float]] = {t.label: [] for t in topos}
    for t in topos:  # warm-up: every job worker started, the function shipped
        slots = max(1, sum(n.get("capacity", 1) for n in t.hub.nodes(t.pattern)))
        t.hub.map(inc, range(slots * 10), nodes=t.pattern, wait=300)
    for _ in range(args.job_runs):
        for t in topos:
            t0 = perf()
            got = t.hub.map(inc, range(args.jobs), nodes=t.pattern, wait=600)
            dt = perf() - t0
            if got != [x + 1 for x in range(args.jobs)]:
                raise AssertionError(f"{t.label}: wrong values from map")
            rates[t.label].append(args.jobs / dt)
    for label, rs in rates.items():
        out[label] = {"rates": rs, "median": statistics.median(rs) if rs else 0.0}
    if rates.get("tree") and rates.get("flat"):
        out["ratio_tree_flat"] = out["tree"]["median"] / out["flat"]["median"]
    return out


def goals_jobs(res: dict[str, Any]) -> dict[str, Any]:
    if "ratio_tree_flat" not in res:
        return {"jobs": {"met": False, "why": "no runs"}}
    r = res["ratio_tree_flat"]
    return {"jobs tree/flat": {"value": r, "target": ">= 0.5", "met": r >= 0.5}}


# name -> (measure, goals); every section gets the same started topologies.
SECTIONS: dict[str, tuple[Callable[[list[Topology], argparse.Namespace], dict[str, Any]],
                          Callable[[dict[str, Any]], dict[str, Any]]]] = {
    "broadcast": (section_broadcast, goals_broadcast),
    "jobs": (section_jobs, goals_jobs),
}


# --- report --------------------------------------------------------------------------------


def _row(label: str, s: dict[str, Any]) -> str:
    if not s.get("n"):
        return f"  {label:<8} (no samples) {s.get('first_failure', '')}"
    extra = f"  FAILED {s['failed']}" if s.get("failed") else ""
    return (f"  {label:<8} {s['median']:8.2f} {s['p90']:8.2f} {s['min']:8.2f} "
            f"{s['max']:8.2f} {s['n']:5d}{extra}")


def report(res: dict[str, Any]) -> str:
    env, a = res["env"], res["args"]
    n = a["relays"] * a["leaves"]
    lines = [f"odium tree benchmark  {env['when']}  python {env['python']}  "
             f"pyzmq {env['pyzmq']} libzmq {env['libzmq']}  cpus {env['cpus']}  "
             f"load {env['loadavg_before']}", "",
             f"tree: root (this process) -> {a['relays']} relays -> {a['leaves']} leaves each "
             f"(relay heartbeat {a['heartbeat']} s);  flat: a second root -> {n} leaves; "
             "CURVE + Ed25519, 127.0.0.1"]
    st = res.get("start", {})
    for label in ("tree", "flat"):
        i = st.get(label)
        if not i or "ready_s" not in i:
            continue
        if label == "tree":
            parts = (f"hub up {i['hub_up_s']:.3f} + relays ready {i['relays_ready_s']:.3f} + "
                     f"leaf tokens {i['leaf_tokens_s']:.3f} + leaves ready "
                     f"{i['leaves_ready_s']:.3f}")
        else:
            parts = f"hub up {i['hub_up_s']:.3f} + leaves ready {i['leaves_ready_s']:.3f}"
        lines.append(f"  ready {label}  {i['ready_s']:.3f} s  [{parts}]")
        if "first_ms" in i:
            lines.append(f"    then the first 'x = 1' {i['first_ms']:.1f} ms"
                         + (f"  NOT ok: {i['first_problem']}" if i["first_problem"] else ""))
    if "warm_s" in res:
        lines.append(f"  (not counted: imports and a throwaway hub first, {res['warm_s']:.3f} s)")
    b = res.get("broadcast")
    if b:
        lines.append("")
        lines.append(f"broadcast 'x = 1' to all {n} leaves (tree '*/*', flat '*'), "
                     f"{len(b['per_block'])} blocks of {b['per_block'][0]} per side, "
                     "alternating tree, flat, ...")
        lines.append(f"  {'ms':<8} {'median':>8} {'p90':>8} {'min':>8} {'max':>8} {'n':>5}")
        for label in ("tree", "flat"):
            if label in b:
                lines.append(_row(label, b[label]))
        for label in ("tree", "flat"):
            s = b.get(label, {})
            if "block_medians_ms" in s:
                meds = " ".join(f"{m:.2f}" if m else "-" for m in s["block_medians_ms"])
                lines.append(f"  {label}: block medians {meds}")
                bd = s.get("breakdown_ms", {})
                if bd:
                    lines.append("    median ms: run() -> issued {:.2f}, issued -> last start "
                                 "{:.2f}, slowest exec {:.2f}, last finish -> return {:.2f}"
                                 .format(*(bd.get(k, {}).get("median", float("nan")) for k in (
                                     "submit_to_issued", "issued_to_last_start", "exec_max",
                                     "last_finish_to_return"))))
        if "ratio_tree_flat" in b:
            lines.append(f"  ratio tree/flat of the medians {b['ratio_tree_flat']:.2f}  "
                         f"(per block {' '.join(f'{x:.2f}' for x in b['block_ratios'])})")
        if b.get("stopped"):
            lines.append(f"  {b['stopped']}")
    jb = res.get("jobs")
    if jb and "tree" in jb:
        lines.append("")
        lines.append(f"jobs: hub.map of {jb['jobs']} trivial jobs to the leaves, {jb['runs']} "
                     "runs each, alternating")
        for label in ("tree", "flat"):
            rs = " ".join(f"{x:.0f}" for x in jb[label]["rates"])
            lines.append(f"  {label:<8} median {jb[label]['median']:8.0f} jobs/s  ({rs})")
        if "ratio_tree_flat" in jb:
            lines.append(f"  ratio tree/flat {jb['ratio_tree_flat']:.2f}")
    g = res.get("goals")
    if g:
        lines.append("")
        lines.append("goals: " + "; ".join(
            f"{k} {'MET' if v.get('met') else 'MISSED'}"
            + (f" ({v['value']:.3g}, {v['target']})" if "value" in v else f" ({v.get('why')})")
            for k, v in g.items()))
    if "error" in res:
        lines.append("")
        lines.append(f"ERROR: {res['error']}")
    for label in ("tree", "flat"):
        for note in st.get(label, {}).get("stop_notes", []):
            lines.append(f"  stop: {note}")
    left = res.get("left_behind")
    lines.append("")
    lines.append("processes left after the end: "
                 + ("none" if not left else f"{len(left)} (killed): " + "; ".join(left)))
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--relays", type=int, default=2, help="relays under the root (default 2)")
    ap.add_argument("--leaves", type=int, default=4, help="leaves per relay (default 4)")
    ap.add_argument("--rounds", type=int, default=200,
                    help="measured broadcasts per topology (default 200)")
    ap.add_argument("--blocks", type=int, default=4,
                    help="blocks per topology the rounds are split into, alternating (4)")
    ap.add_argument("--warmup", type=int, default=20, help="warm-up rounds each (default 20)")
    ap.add_argument("--block-warmup", type=int, default=2,
                    help="untimed rounds at the start of every block (default 2)")
    ap.add_argument("--heartbeat", type=float, default=1.0,
                    help="the relays' heartbeat to their leaves, s (default 1.0, as the roots')")
    ap.add_argument("--app", default=None,
                    help="application directory of every hub and node (default: an empty "
                         "directory in the temporary one: state 'unversioned', require 'any')")
    ap.add_argument("--max-failures", type=int, default=10,
                    help="stop measuring after a block once this many rounds failed (10)")
    ap.add_argument("--jobs", type=int, default=2000, help="jobs per map (default 2000)")
    ap.add_argument("--job-runs", type=int, default=3, help="maps per side (default 3)")
    ap.add_argument("--sections", default="broadcast,jobs",
                    help="which to measure, of: " + ", ".join(SECTIONS))
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    ap.add_argument("--json", metavar="OUT", help="write every number (and raw samples) here")
    args = ap.parse_args(argv)
    if not (1 <= args.relays <= 16 and 1 <= args.leaves <= 32 and args.rounds >= 1
            and args.blocks >= 1 and args.warmup >= 0 and args.block_warmup >= 0
            and args.heartbeat > 0):
        ap.error("--relays 1..16, --leaves 1..32, --rounds >= 1, --blocks >= 1, "
                 "--warmup/--block-warmup >= 0, --heartbeat > 0")

    import zmq

    RUN.mark()

    def terminated(signum: int, frame: Any) -> None:
        raise SystemExit(f"signal {signum}")  # unwinds into the finally below: stop everything

    signal.signal(signal.SIGTERM, terminated)
    env = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(),
           "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "cpus": os.cpu_count(),
           "platform": platform.platform(),
           "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    res: dict[str, Any] = {"env": env, "args": vars(args), "start": {}}
    t_all = perf()
    base = Path(tempfile.mkdtemp(prefix="odium-bench-tree-"))
    if args.app:
        app = Path(args.app).resolve()
    else:
        app = base / "app"
        app.mkdir()
    topos: list[Topology] = [Tree(base, app, args.relays, args.leaves, args.heartbeat),
                             Flat(base, app, args.relays * args.leaves)]
    try:
        res["warm_s"] = warm_up_imports(base)
        for t in topos:  # the tree first, nothing else running; then flat, the tree idle
            res["start"][t.label] = t.info
            t.start()
            first_after_ready(t)
        goals: dict[str, Any] = {}
        chosen = [x.strip() for x in args.sections.split(",") if x.strip()]
        unknown = [x for x in chosen if x not in SECTIONS]
        if unknown:
            raise SystemExit(f"unknown section(s) {unknown}; choose of {list(SECTIONS)}")
        for name, (measure, goal) in SECTIONS.items():
            if name not in chosen:
                continue
            res[name] = measure(topos, args)
            goals.update(goal(res[name]))
        res["goals"] = goals
    except BaseException as e:  # report, and still stop everything (Ctrl-C included)
        res["error"] = f"{type(e).__name__}: {e}"
        res["traceback"] = traceback.format_exc()
    finally:
        for t in topos:
            try:
                t.close()
            except Exception as e:
                res.setdefault("close_errors", []).append(f"{t.label}: {type(e).__name__}: {e}")
        res["left_behind"] = RUN.left_behind()
        if args.keep:
            res["dir"] = str(base)
        else:
            shutil.rmtree(base, ignore_errors=True)
    env["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    res["total_s"] = perf() - t_all
    print(report(res))
    if res.get("close_errors"):
        print("close errors: " + "; ".join(res["close_errors"]))
    print(f"\n(total {res['total_s']:.1f} s; load after {env['loadavg_after']}"
          + (f"; kept {base}" if args.keep else "") + ")")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
        print(f"wrote {args.json}")
    ok = "error" not in res and not res["left_behind"] and all(
        not res.get(s, {}).get(t, {}).get("failed") for s in SECTIONS for t in ("tree", "flat"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
