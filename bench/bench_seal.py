#!/usr/bin/env python
"""Sealing benchmark: what it costs to make a command readable only by its targets.

    python bench/bench_seal.py [--targets 1,4,100,1000] [--rounds 50] [--json OUT]

For each number of targets N, with N real node identities (Ed25519, their X25519 keys
derived as the hub derives them):
  * seal     the hub's side: ``Keyring.seal`` of an ``exec`` body (a 200-byte cell) to N key ids
             with the shared keys already computed (the hub computes each node's shared key
             once, when it registers), plus signing the outer message: what a broadcast adds;
  * cold     the same with no shared key computed yet (one X25519 per target): what the
             first command to N nodes would cost if registration had not done it;
  * open     one node's side: verify, find its wrap by tag, unwrap, decrypt, decode (the
             message sealed to N targets);
  * bytes    the wire size of the sealed message.
Medians (and p90) over ``--rounds`` runs. The load average is printed with the results:
this machine is shared. Every sealed message is opened and checked by one of its targets,
and checked not to open for an identity outside them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from odium.core import wire as P  # noqa: E402
from odium.core.keys import Identity  # noqa: E402
from odium.core.sealing import Keyring, open_inner  # noqa: E402

perf = time.perf_counter
CODE = "import numpy as np\nx = np.arange(1000)\n" + "# padding to a typical cell\n" * 5


def quantiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"median_ms": statistics.median(xs) * 1e3,
            "p90_ms": xs[min(len(xs) - 1, int(len(xs) * 0.9))] * 1e3}


def measure(n: int, rounds: int, nodes: list[Identity]) -> dict[str, Any]:
    hub = Identity.generate()
    targets = nodes[:n]
    ids = [t.key_id for t in targets]
    names = [f"n-{i}" for i in range(n)]
    kr = Keyring(hub)
    for k in ids:
        kr.shared(k)
    seal_t, open_t, cold_t = [], [], []
    raw = b""
    for r in range(rounds):
        body = P.Exec(P.new_id(), "python", CODE)
        t0 = perf()
        sealed = kr.seal("exec", body, ids, to=names)
        raw = P.seal(hub.signing, hub.key_id, "unknown", "sealed", sealed, seq=r + 1)
        seal_t.append(perf() - t0)
        reader = targets[r % n]
        rk = Keyring(reader)
        rk.shared(hub.key_id)
        t0 = perf()
        msg = P.open_message(raw, hub.signing.verify_key, hub.key_id)
        inner = open_inner(rk, msg, "pub")
        open_t.append(perf() - t0)
        assert inner is not None and inner.body.code == CODE  # type: ignore[attr-defined]
    outsider = Keyring(Identity.generate())
    assert open_inner(outsider, P.open_message(raw, hub.signing.verify_key, hub.key_id),
                      "pub") is None
    for _ in range(max(1, rounds // 10)):
        cold = Keyring(hub)
        t0 = perf()
        cold.seal("exec", P.Exec(P.new_id(), "python", CODE), ids, to=names)
        cold_t.append(perf() - t0)
    return {"targets": n, "seal": quantiles(seal_t), "cold": quantiles(cold_t),
            "open": quantiles(open_t), "bytes": len(raw)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", default="1,4,100,1000")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    counts = [int(x) for x in a.targets.split(",")]
    nodes = [Identity.generate() for _ in range(max(counts))]
    out = {"load": os.getloadavg(), "results": [measure(n, a.rounds, nodes) for n in counts]}
    print(f"load average {out['load'][0]:.2f} {out['load'][1]:.2f} {out['load'][2]:.2f}")
    print(f"{'targets':>8} {'seal ms':>10} {'p90':>8} {'cold ms':>10} {'open ms':>9} "
          f"{'bytes':>9}")
    for r in out["results"]:
        print(f"{r['targets']:>8} {r['seal']['median_ms']:>10.3f} {r['seal']['p90_ms']:>8.3f} "
              f"{r['cold']['median_ms']:>10.2f} {r['open']['median_ms']:>9.3f} "
              f"{r['bytes']:>9}")
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
