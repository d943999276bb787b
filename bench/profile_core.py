#!/usr/bin/env python
"""Where the Odium round trip goes: CPU per round per process, hub-side profiles, ablations.

    python bench/profile_core.py [--nodes 4] [--rounds 200] [--top 20] [--ablate]

* CPU time per round of every process (the hub, i.e. this process, split by thread;
  each node; each node's worker), from psutil, over the measured rounds.
* cProfile of the hub's loop thread, of the store's writer thread and of the
  caller's thread, during the measured rounds (printed, top N by own time).
* ``--no-store``: everything above with the hub's store writes dropped.
* ``--ablate``: the same round trip with parts of the hub switched off by
  monkeypatching in this process only (nothing in odium/ is changed): store
  writes dropped; Ed25519 verify skipped on the hub. Shows what each costs.

This is a diagnostic, not the benchmark: profiling slows everything it watches.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

perf = time.perf_counter


def rounds_ms(hub: Any, n: int, code: str = "x = 1") -> list[float]:
    out = []
    for _ in range(n):
        t = perf()
        r = hub.run(code, nodes="*", timeout=10)
        out.append((perf() - t) * 1000)
        assert r.ok, r
    return sorted(out)


def med(xs: list[float]) -> float:
    return xs[len(xs) // 2]


def start(nodes: int) -> tuple[Any, Path]:
    from odium.api.hub import Hub

    home = Path(tempfile.mkdtemp(prefix="odium-prof-"))
    hub = Hub(home, ports=0).start()
    hub.start_local(nodes, prefix="p")
    return hub, home


def cpu_per_round(hub: Any, rounds: int) -> None:
    import psutil

    me = psutil.Process()
    nodes = [psutil.Process(n.proc.pid) for n in hub.local]
    workers = {n.pid: n.children() for n in nodes}

    def snap() -> dict[str, float]:
        s: dict[str, float] = {}
        names = {t.ident: t.name for t in threading.enumerate()}
        by_native = {t.native_id: t.name for t in threading.enumerate()}
        for t in me.threads():
            name = by_native.get(t.id, f"tid{t.id}")
            s[f"hub/{name}"] = t.user_time + t.system_time
        del names
        for i, p in enumerate(nodes):
            c = p.cpu_times()
            s[f"node{i + 1}"] = c.user + c.system
            for j, w in enumerate(workers[p.pid]):
                try:
                    cw = w.cpu_times()
                    s[f"node{i + 1}/worker{j}"] = cw.user + cw.system
                except psutil.NoSuchProcess:
                    pass
        return s

    rounds_ms(hub, 20)
    a = snap()
    t0 = perf()
    xs = rounds_ms(hub, rounds)
    wall = perf() - t0
    b = snap()
    print(f"\n== CPU per round ({rounds} rounds, median round trip {med(xs):.2f} ms, "
          f"wall {wall * 1000 / rounds:.2f} ms/round) ==")
    total = 0.0
    for k in sorted(b):
        d = (b[k] - a.get(k, 0.0)) * 1000 / rounds
        total += d
        if d >= 0.005:
            print(f"  {k:<28} {d:7.3f} ms")
    print(f"  {'TOTAL (2 cores)':<28} {total:7.3f} ms  -> at least {total / 2:.2f} ms wall "
          "when spread on both cores")


def profile_hub(hub: Any, rounds: int, top: int, flush: bool = True) -> None:
    import odium.hub.store as S

    core = hub.core
    loop_prof = cProfile.Profile()
    store_prof = cProfile.Profile()
    main_prof = cProfile.Profile()
    store_cpu = [0.0, 0]
    orig_apply = S.Store._apply

    def apply(self: Any, work: Any) -> None:
        c = time.thread_time()
        store_prof.enable()
        try:
            orig_apply(self, work)
        finally:
            store_prof.disable()
            store_cpu[0] += time.thread_time() - c
            store_cpu[1] += len(work)

    rounds_ms(hub, 20)
    if flush:
        core.store.flush()
    S.Store._apply = apply  # type: ignore[method-assign]
    hub._call(loop_prof.enable)
    main_prof.enable()
    xs = rounds_ms(hub, rounds)
    main_prof.disable()
    hub._call(loop_prof.disable)
    if flush:
        core.store.flush()
    S.Store._apply = orig_apply  # type: ignore[method-assign]
    print(f"\n== cProfile, {rounds} rounds (median under profiling {med(xs):.2f} ms) ==")
    print(f"store writer: {store_cpu[0] * 1000 / rounds:.2f} ms CPU per round, "
          f"{store_cpu[1] / rounds:.1f} writes per round")
    for label, prof in (("hub loop thread", loop_prof), ("store writer thread", store_prof),
                        ("caller thread (hub.run)", main_prof)):
        if not prof.getstats():
            continue
        for key in ("tottime", "cumulative"):
            s = io.StringIO()
            st = pstats.Stats(prof, stream=s)
            st.sort_stats(key).print_stats(top)
            print(f"\n--- {label}: top {top} by {key} (totals over {rounds} rounds) ---")
            text = s.getvalue()
            i = text.find("   ncalls")
            print((text[i:] if i >= 0 else text).rstrip())


def ablate(nodes: int, rounds: int) -> None:
    import odium.core.wire as P
    import odium.hub.store as S

    print(f"\n== ablations ({rounds} rounds each, median / p90 ms; separate hubs) ==")

    def one(label: str) -> None:
        hub, home = start(nodes)
        try:
            rounds_ms(hub, 20)
            xs = rounds_ms(hub, rounds)
            print(f"  {label:<44} {med(xs):6.2f} / {xs[int(len(xs) * 0.9)]:6.2f}")
        finally:
            hub.close()
            shutil.rmtree(home, ignore_errors=True)

    one("as is")
    orig_write = S.Store.write
    S.Store.write = lambda self, fn: None  # type: ignore[method-assign]
    one("hub store writes dropped")
    S.Store.write = orig_write  # type: ignore[method-assign]

    orig_open = P.open_message

    def fast_open(data: bytes, vk: Any, sender: str, **kw: Any) -> Any:
        class NoVerify:
            def verify(self, *a: Any) -> None:
                return None
        nv: Any = NoVerify()
        return orig_open(data, nv, sender, **kw)

    import odium.hub.server as H
    H.P.open_message = fast_open  # type: ignore[assignment]
    one("hub skips Ed25519 verify (DIAGNOSTIC ONLY)")
    H.P.open_message = orig_open  # type: ignore[assignment]
    one("as is (again)")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--ablate", action="store_true")
    ap.add_argument("--no-store", action="store_true",
                    help="drop the hub's store writes (diagnostic: what is left without them)")
    args = ap.parse_args()
    if args.no_store:
        import odium.hub.store as S

        S.Store.write = lambda self, fn: None  # type: ignore[method-assign]
    hub, home = start(args.nodes)
    try:
        cpu_per_round(hub, args.rounds)
        profile_hub(hub, args.rounds, args.top, flush=not args.no_store)
    finally:
        hub.close()
        shutil.rmtree(home, ignore_errors=True)
    if args.ablate:
        ablate(args.nodes, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
