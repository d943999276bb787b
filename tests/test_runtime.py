"""One runtime, both parts: a process that is a node to its hub and a hub to its own nodes.

Nothing relays yet (trees of hubs come next); this checks what the layout promises them: the
hub part and the node part run side by side on one runtime and one loop, each answering its
own side, with one state and one signer, and they close together.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import odium
from odium.core.keys import Token
from odium.hub.start import start_hub
from odium.node.agent import start_node
from odium.runtime import Runtime

from .conftest import NodeProcess, wait_until


def test_one_process_is_a_node_to_its_hub_and_a_hub_to_its_own(
        hub: odium.Hub, tmp_path: Path, node_processes: Callable[..., NodeProcess]) -> None:
    rt = Runtime(tmp_path / "middle")
    rt.start_thread()
    try:
        own = start_hub(rt, ports={"pub": 0, "query": 0, "jobs": 0, "results": 0})
        tok = Token.decode(hub.token(60))
        node = start_node(rt, tok.address, tok.hub_key, "middle", token=tok)
        hub.wait_for_nodes(["middle"], 20)

        # its own node joins its hub part, with a token of that hub
        leaf_token = tmp_path / "leaf.token"
        leaf_token.write_text(rt.call(lambda: own.make_token(60)))
        leaf_token.chmod(0o600)
        leaf = node_processes("leaf", "--token-file", str(leaf_token))
        rt.wait_for(lambda: own.nodes.get("leaf") is not None
                    and own.nodes["leaf"].status == "ready", 30, "leaf ready at the middle")

        # the root runs on the middle's node part; the middle's hub part runs on its leaf
        r = hub.run("6 * 7", nodes="middle", timeout=20)
        assert r["middle"].value == 42 and r["middle"].state == rt.state
        with odium.Admin(home=rt.home) as admin:
            got = admin.run("import os; os.environ['ODIUM_NODE']", nodes="*", timeout=20)
        assert list(got) == ["leaf"] and got["leaf"].value == "leaf", got
        # each part knows only its own side: the root does not see the leaf (no relaying yet)
        assert [n["name"] for n in hub.nodes()] == ["middle"]
        assert node.registered
    finally:
        rt.close()
    # closing the runtime closed both parts: the root sees its node leave, the leaf loses
    # its hub, and the middle's home no longer says a hub runs there
    wait_until(lambda: {n["name"]: n["status"] for n in hub.nodes()}["middle"] != "ready", 15,
               "the middle to leave the root")
    assert not (rt.home / "hub.json").exists()
    assert leaf.proc is not None and leaf.proc.poll() is None  # it waits for its hub to return
