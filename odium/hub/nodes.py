"""The node registry: every node the hub knows, its status and state, and its liveness.

A node's status moves only along ``TRANSITIONS`` (``Registry.set_status``); a move not in the
table is a bug, logged loudly (with the stack) where it happens.

    offline ──(a word from it)──> connecting ──(a beat that knows this hub)──> ready
    connecting, ready ──> lost (silent), left (said bye), restarting (syncing, in place)
    restarting ──> connecting (registered again), lost (did not come back)
    any ──> lost (its key was revoked); lost, left ──> connecting (back)
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.statediff import StateInfo
from ..core.targeting import match_nodes
from ..errors import OdiumError, ProtocolError
from .keytable import KeyInfo
from .store import Store

log = logging.getLogger(__name__)

LIVENESS_BEATS = 5  # heartbeat intervals without a word from a node before it is lost


class NodeStatus(str, enum.Enum):
    OFFLINE = "offline"  # known (from the store), not heard from since the hub started
    CONNECTING = "connecting"  # registered or heard from; its SUB socket not proven yet
    READY = "ready"
    LOST = "lost"
    LEFT = "left"
    RESTARTING = "restarting"

    def __str__(self) -> str:
        return self.value


S = NodeStatus
# from -> the statuses a node may move to
TRANSITIONS: dict[NodeStatus, frozenset[NodeStatus]] = {
    S.OFFLINE: frozenset({S.CONNECTING, S.LOST}),
    S.CONNECTING: frozenset({S.READY, S.LOST, S.LEFT, S.RESTARTING}),
    S.READY: frozenset({S.LOST, S.LEFT, S.RESTARTING}),
    S.LOST: frozenset({S.CONNECTING, S.LOST}),
    S.LEFT: frozenset({S.CONNECTING, S.LOST}),
    S.RESTARTING: frozenset({S.CONNECTING, S.LOST, S.RESTARTING}),
}
LIVE = frozenset({S.READY, S.CONNECTING})  # connected: a command goes to it
AWAY = frozenset({S.LOST, S.OFFLINE, S.LEFT})  # a word from it: it is back


@dataclass
class NodeInfo:
    name: str
    key_id: str
    status: NodeStatus = NodeStatus.OFFLINE
    state: str = "unknown"
    boot: str = ""
    host: str = ""
    pid: int = 0
    capacity: int = 1
    last_seen: float = 0.0
    running: set[str] = field(default_factory=set)
    info: dict[str, Any] | None = None  # the node's StateInfo as JSON (odium.core.statediff)
    via: str = ""  # below a relay: the relay (one of this hub's own nodes) that reports it
    skew: float = 0.0  # how far its wall clock is off this hub's time, s (it uses the hub's)

    @property
    def fingerprint(self) -> str:
        return str(((self.info or {}).get("fingerprint") or {}).get("id", ""))

    @property
    def unsatisfied(self) -> list[str]:
        return list((self.info or {}).get("unsatisfied") or [])

    @property
    def missing_system(self) -> list[str]:
        detail = ((self.info or {}).get("fingerprint") or {}).get("detail") or {}
        return sorted(k for k, v in (detail.get("system") or {}).items() if v is None)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key_id, "status": self.status.value,
                "state": self.state, "fingerprint": self.fingerprint,
                "unsatisfied": self.unsatisfied, "missing_system": self.missing_system,
                "host": self.host, "pid": self.pid, "capacity": self.capacity,
                "last_seen": self.last_seen, "running": sorted(self.running),
                "clock_skew": self.skew,
                **({"via": self.via} if self.via else {})}


LostHook = Callable[[NodeInfo, str, bool], None]  # (node, why, restart)


class Registry:
    """The nodes by name and by key. ``keys``: the key table's current snapshot (a node is
    targeted only while its key is a node key); ``on_lost``: what else a lost node ends
    (its broadcasts' entries, its jobs), called in order."""

    def __init__(self, store: Store, keys: Callable[[], Mapping[str, KeyInfo]]) -> None:
        self.store = store
        self._keys = keys
        self.nodes: dict[str, NodeInfo] = {}
        self.by_key: dict[str, str] = {}  # node key id -> name
        self.on_lost: list[LostHook] = []
        # below a relay, forgotten here: path -> key (its relay's reports of it are ignored
        # until the relay no longer reports it, or reports it with another key)
        self.forgotten: dict[str, str] = {}
        # (name, key id) of every node, replaced whole when a node comes or goes, so that
        # any thread may read who can be targeted (``targetable``) without the loop
        self._roster: dict[str, str] = {}  # replaced whole, never changed in place
        self._leaves: dict[str, set[str]] = {}  # relay -> the names below it
        for n in store.nodes():
            self.add(NodeInfo(n.name, n.key_id, S.OFFLINE, n.state, n.boot, n.host,
                              n.pid, n.capacity, n.last_seen, info=n.info))
            self.by_key[n.key_id] = n.name

    def add(self, node: NodeInfo) -> NodeInfo:
        """A node the hub did not know (in the loop thread)."""
        self.nodes[node.name] = node
        if node.via:
            self._leaves.setdefault(node.via, set()).add(node.name)
        self._new_roster(node.name)
        return node

    def remove(self, name: str) -> NodeInfo:
        """Forget a node (in the loop thread)."""
        node = self.nodes.pop(name)
        if node.via and node.via in self._leaves:
            self._leaves[node.via].discard(name)
        self._new_roster(name)
        return node

    def _new_roster(self, changed: str) -> None:
        """(name -> the key whose trust decides whether it is targeted): below a relay, the
        relay's key (the relay vouches for what is below it). Only what ``changed`` changes
        is worked out again (a join storm adds 1,000 nodes: not 1,000 times all of them)."""
        nodes = self.nodes
        roster = dict(self._roster)
        for n in (changed, *self._leaves.get(changed, ())):
            i = nodes.get(n)
            if i is None:
                roster.pop(n, None)
            else:
                roster[n] = nodes[i.via].key_id if i.via in nodes else i.key_id
        self._roster = roster

    def below(self, relay: str) -> list[NodeInfo]:
        """The instances a relay reports below it."""
        return [n for n in self.nodes.values() if n.via == relay]

    def of_key(self, key_id: str) -> NodeInfo | None:
        name = self.by_key.get(key_id)
        return self.nodes.get(name) if name else None

    # --- status ----------------------------------------------------------------------------

    @staticmethod
    def set_status(node: NodeInfo, to: NodeStatus) -> None:
        """Move a node's status along TRANSITIONS; any other move is a bug, logged loudly."""
        if to not in TRANSITIONS[node.status]:
            log.error("node %s: status %s -> %s is not in the table of transitions",
                      node.name, node.status.value, to.value, stack_info=True)
        node.status = to

    def seen(self, node: NodeInfo, state: str) -> None:
        """A message from the node: it is alive, in this state."""
        node.last_seen = time.time()
        if node.state != state:
            node.state = state
            self.store.put_node(node.name, state=state)
        if node.status in AWAY:  # "restarting" ends with a register
            self.set_status(node, S.CONNECTING)
            self.store.event("node_back", f"{node.name} is back", node=node.name)
            self.store.put_node(node.name, status=S.CONNECTING.value)

    def check_liveness(self, hb_interval: float) -> None:
        now = time.time()
        limit = LIVENESS_BEATS * hb_interval
        for node in self.nodes.values():
            if node.via:
                continue  # below a relay: alive as long as the relay says so (and is)
            if node.status is S.RESTARTING and now - node.last_seen > max(limit, 60.0):
                self.gone(node, S.LOST, "did not come back after restarting")
            if node.status in LIVE and now - node.last_seen > limit:
                self.gone(node, S.LOST, f"no heartbeat for {now - node.last_seen:.1f} s")

    def gone(self, node: NodeInfo, status: NodeStatus, why: str) -> None:
        self.set_status(node, status)
        self.store.event(f"node_{status.value}", f"{node.name}: {why}", level="warning",
                         node=node.name)
        self.store.put_node(node.name, status=status.value, last_seen=node.last_seen)
        self.lose_running(node, why)

    def lose_running(self, node: NodeInfo, why: str, restart: bool = False) -> None:
        for fn in self.on_lost:
            fn(node, why, restart)
        node.running.clear()

    # --- what a node reports ---------------------------------------------------------------

    def take_info(self, node: NodeInfo, info: dict[str, Any]) -> None:
        """A node told us its whole state: keep it, its declaration, and say what is wrong."""
        try:
            parsed = StateInfo.from_dict(info)
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"bad state info: {e}") from None
        old = node.unsatisfied
        old_missing = node.missing_system
        node.info = parsed.to_dict()
        node.state = parsed.state
        self.store.put_node(node.name, state=node.state, info=node.info)
        self.store.put_state(parsed.state, parsed.declaration.to_dict())
        if node.unsatisfied and node.unsatisfied != old:
            self.store.event("unsatisfied", f"{node.name}: installed packages do not satisfy "
                             f"its declaration: {'; '.join(node.unsatisfied)}", level="warning",
                             node=node.name)
        if node.missing_system and node.missing_system != old_missing:
            self.store.event("missing_system", f"{node.name}: declared system packages are "
                             f"missing: {', '.join(node.missing_system)} (Odium never installs "
                             "them)", level="warning", node=node.name)

    # --- views -----------------------------------------------------------------------------

    def targetable(self) -> list[str]:
        """The names a pattern may target (any thread may ask): nodes whose key is trusted as
        a node key. A node whose key was revoked or rejected is still listed, never targeted;
        one that is only off (a lab PC shut down for the night) is targeted, and answers
        ``not connected``."""
        keys = self._keys()  # both snapshots, replaced whole: any thread may read them
        return sorted(n for n, key_id in self._roster.items()
                      if (k := keys.get(key_id)) is not None and k.role == "node")

    def node_list(self, pattern: str | None = None) -> list[dict[str, Any]]:
        names = sorted(self.nodes)
        if pattern:
            names = match_nodes(pattern, names)
        keys = self._keys()
        trust = self._roster
        out = []
        for n in names:
            d = self.nodes[n].to_dict()
            k = keys.get(trust.get(n, d["key"]))
            if k is None or k.role != "node":  # listed, never targeted
                d["status"] = k.role if k is not None else "untrusted"
            out.append(d)
        return out

    def matching(self, pattern: str) -> list[str]:
        """The known names a pattern matches; OdiumError if none."""
        matched = match_nodes(pattern, sorted(self.nodes))
        if not matched:
            known = ", ".join(sorted(self.nodes)) or "none yet"
            raise OdiumError(f"no node matches {pattern!r}; nodes: {known}")
        return matched


__all__ = ["LIVE", "LIVENESS_BEATS", "NodeInfo", "NodeStatus", "Registry", "TRANSITIONS"]
