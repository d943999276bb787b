"""A relay: one instance that is a node to its hub and a hub to nodes of its own, its two
parts joined (``odium node --serve``).

The node part hands what came from above for the paths below (``odium.node.tree``) to the hub
part, which sends it on down (``odium.hub.tree``); the hub part hands the answers of the nodes
below to the node part, which sends them up; and the node part reports the subtree, whole,
whenever it changes (and every few seconds, in case a report was lost).
"""

from __future__ import annotations

import time

from .core import wire as P
from .hub.server import HubCore
from .node.agent import NodeCore
from .relayjobs import RelayJobs
from .runtime import Runtime

REPORT_EVERY = 0.1  # seconds between looks at the subtree
REPORT_AGAIN = 5.0  # seconds after which an unchanged subtree is reported again


class Relay:
    """Joins ``hub`` (this instance's hub part) and ``node`` (its node part) on ``rt``'s loop."""

    def __init__(self, rt: Runtime, hub: HubCore, node: NodeCore) -> None:
        self.rt, self.hub, self.node = rt, hub, node
        self._last: tuple[object, ...] | None = None
        self._sent = 0.0
        node.tree.down = self._down
        hub.tree.up = self._up
        hub.tree.above = node.tree.above
        self.jobs = RelayJobs(hub, node)  # jobs for the subtree, through this relay's queue
        rt.loop.every(REPORT_EVERY, self._report)

    def _down(self, cmd: str | None, raw: bytes, below: list[str], sync: P.Sync | None) -> None:
        """From above, for the paths below: sent on down. A sync waits while this relay syncs
        itself (it restarts, and fetches the sync again when back); its nodes then get their
        bundles here."""
        if sync is not None:
            if self.node.sync.syncing:
                return
            self.hub.syncs.relay(sync.cmd, sync.commit, {p.split("/", 1)[0] for p in below})
        self.hub.tree.relay_down(cmd, raw, below)

    def _up(self, path: str, raw: bytes, keep: bool) -> None:
        self.node.outbox.send("relayed", P.Relayed(path, raw.decode()), keep)

    def subtree(self) -> list[P.SubNode]:
        """Every instance below this relay that its hub part targets, as it knows them."""
        nodes = self.hub.registry.nodes
        return [P.SubNode(name, n.key_id, n.status.value, n.state, n.host, n.capacity,
                          round(n.skew, 3))
                for name in self.hub.registry.targetable() if (n := nodes.get(name))]

    def _report(self) -> None:
        node = self.node
        if not node.registered:
            self._last = None  # report again once registered (the hub may be new)
            return
        subtree = self.subtree()
        key = (node.hub_boot, *((s.path, s.key, s.status, s.state, s.skew) for s in subtree))
        now = time.monotonic()
        if key != self._last or now - self._sent >= REPORT_AGAIN:
            node.outbox.send("subtree", P.Subtree(subtree))
            self._last, self._sent = key, now


def start_relay(rt: Runtime, hub: HubCore, node: NodeCore) -> Relay:
    """Join the hub part and the node part of ``rt``'s process (call it in its loop, as the
    node part is made: before anything reaches the node part)."""
    return Relay(rt, hub, node)


__all__ = ["Relay", "start_relay"]
