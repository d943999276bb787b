"""Bad links: a node far from its hub (every byte delayed 400 ms each way, tests/slowlink.py)
joins with a token, works, and registers again after a restart without waiting long.

Measured before the fix: the join's 2 s retry made the answer to the first attempt count for
nothing, and the retry found its token used ("sender's key is not trusted"); a node restarted
over such a link stayed "connecting" for 90 s, each retry opening a new socket (a new CURVE
handshake, several round trips). Now an answer to any attempt counts, retries back off, the
socket is reopened only after a refused handshake, and a repeated join gets the same answer.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import odium
from odium.core.keys import Token
from odium.local.home import write_token_file

from .conftest import NodeProcess, wait_until
from .slowlink import SlowLink

pytestmark = pytest.mark.timeout(150)

DELAY = 0.4  # seconds, each way


@pytest.fixture
def far(hub: odium.Hub, tmp_path: Path) -> Iterator[tuple[SlowLink, NodeProcess]]:
    """A node that reaches the hub only through a slow link (its token names the link)."""
    link = SlowLink(hub.ports.values(), DELAY)
    tok = Token.decode(hub.token())
    tok = dataclasses.replace(tok, address=tok.address.replace("127.0.0.1", link.host))
    path = tmp_path / "far.token"
    write_token_file(path, tok.encode())
    node = NodeProcess(tmp_path / "far", ["--token-file", str(path), "--name", "far",
                                          "--app", str(tmp_path)])
    try:
        yield link, node
    finally:
        node.stop()
        link.close()


def ready_within(hub: odium.Hub, node: NodeProcess, timeout: float) -> float:
    t0 = time.monotonic()
    try:
        hub.wait_for_nodes(["far"], timeout)
    except odium.OdiumError:
        raise AssertionError(f"not ready in {timeout} s:\n{node.output()[-3000:]}") from None
    return time.monotonic() - t0


def test_a_far_node_joins_works_and_registers_again_quickly(
        hub: odium.Hub, far: tuple[SlowLink, NodeProcess]) -> None:
    link, node = far
    node.start()
    joined = ready_within(hub, node, 60)
    out = node.output()
    assert "not trusted" not in out and "refused" not in out, out
    assert link.bytes > 0  # it did go through the slow link
    t0 = time.monotonic()
    r = hub.run("6 * 7", nodes="far", timeout=30)
    took = time.monotonic() - t0
    assert r["far"].ok and r["far"].value == 42, r["far"]
    assert took >= 2 * DELAY  # a round trip at least: the delay is real
    jobs = [hub.submit(f"{i} + 1", nodes="far") for i in range(20)]
    assert [j.result(60) for j in jobs] == [i + 1 for i in range(20)]
    node.stop()
    wait_until(lambda: next(n for n in hub.nodes() if n["name"] == "far")["status"] != "ready",
               15, "the node gone")
    node.start()  # the same home: it registers again, no token
    again = ready_within(hub, node, 30)
    assert again < 20, f"registering again took {again:.1f} s"
    assert hub.run("1", nodes="far", timeout=30)["far"].ok
    print(f"over {DELAY * 1000:.0f} ms each way: joined and ready in {joined:.1f} s, "
          f"a broadcast took {took:.2f} s, ready again after a restart in {again:.1f} s")
