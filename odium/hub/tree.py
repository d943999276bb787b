"""A hub's side of a tree of hubs: the instances below its relays, and what crosses the relays.

A relay (a node of this hub that serves nodes of its own) reports its whole subtree
(``subtree``): each instance's path below it, key, status and state. They are entries of the
registry here, ``relay/path``, targeted while the relay's key is trusted; their keys are pinned
when first reported (a relay cannot swap the key of an instance already known). A relay that is
lost takes its subtree with it: every entry below it is ``lost``, and what it ran with them.

Down: a command for paths below a relay is sealed to those instances' own keys and signed here,
and goes to the relays inside a ``relay`` message (``send_down``). A relay in the middle of a
tree hands such messages on unchanged (``relay_down``), remembering which commands it relayed.

Up: an instance below a relay answers its own hub, signed with its own key; each relay wraps it
(``relayed``) and sends it up unchanged. The hub whose command it is opens it with the key the
instance was reported with, and files it as that instance's answer; a relay in the middle sends
it further up (``up``). Everything runs in the hub's loop thread.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from ..core import wire as P
from ..core.dispatch import Dispatch
from ..core.guards import ReplayCache
from ..core.keys import fingerprint, verify_key
from ..core.sealing import Keyring
from ..errors import AuthError, ProtocolError
from .links import Publisher
from .nodes import LIVE, NodeInfo, NodeStatus, Registry
from .store import Store

UP_TYPES = ("ack", "output", "result")  # what an instance below a relay sends up
RELAYED_KEPT = 10_000  # commands relayed down, remembered for their results and for fetch
RELAYED_FOR = 86_400.0  # seconds a relayed command is remembered at most

Up = Callable[[str, bytes, bool], None]  # (path below this hub, signed message, keep)


@dataclass
class Relayed:
    """A message this hub sent down through its relays: for fetch, and for routing answers."""

    cmd: str | None
    raw: bytes  # the ``relay`` message as published here (signed here)
    seq: int
    pending: set[str] = field(default_factory=set)  # paths that have not answered yet
    sent: float = field(default_factory=time.monotonic)


class Tree:
    """The subtrees below this hub's relays (entries of ``registry``), and the relaying."""

    def __init__(self, store: Store, registry: Registry, wire: Publisher, keyring: Keyring,
                 results: Dispatch[NodeInfo], *, seq: Callable[[], int],
                 changed: Callable[[], None], own: Callable[[str], bool],
                 max_message: int = P.MAX_MESSAGE,
                 clock: Callable[[], float] = time.time) -> None:
        self.store, self.registry, self.wire, self.keyring = store, registry, wire, keyring
        self.results = results  # where an opened answer from below is filed
        self._seq, self._changed, self._own = seq, changed, own
        self.max_message = max_message
        self.replay = ReplayCache(clock=clock)
        self.relayed: OrderedDict[str, Relayed] = OrderedDict()  # cmd -> what went down
        self.up: Up | None = None  # set when this hub is a relay: send an answer up
        self.above: Callable[[], list[dict[str, str]]] = list  # authorities over this hub
        self.handlers: Dispatch[NodeInfo] = Dispatch("results (tree)")
        self.handlers.on("subtree", P.Subtree, self._r_subtree)
        self.handlers.on("relayed", P.Relayed, self._r_relayed)
        registry.on_lost.append(self._relay_lost)

    # --- the subtrees ----------------------------------------------------------------------

    def _r_subtree(self, msg: P.Message, body: P.Subtree, relay: NodeInfo) -> None:
        if relay.via:
            raise AuthError("only a node of this hub reports a subtree")
        reg, now = self.registry, time.time()
        seen: set[str] = set()
        for sub in body.nodes:
            path = f"{relay.name}/{sub.path}"
            if path.count("/") >= P.MAX_DEPTH or not P.is_key_point(sub.key):
                raise ProtocolError(f"bad subtree entry {sub.path!r}")
            seen.add(path)
            if reg.forgotten.get(path) == sub.key:
                continue  # forgotten here
            node = reg.nodes.get(path)
            if node is None:
                node = reg.add(NodeInfo(path, sub.key, via=relay.name))
                self.keyring.shared(sub.key)
                self.store.event("subtree_node", f"{path} ({fingerprint(sub.key)}) reported by "
                                 f"relay {relay.name}", node=path, key_id=sub.key)
            elif node.key_id != sub.key:
                self.store.event("subtree_key_refused", f"relay {relay.name} reported a new "
                                 f"key for {path} ({fingerprint(sub.key)}); the key it was "
                                 "reported with stays (forget it first)", level="warning",
                                 node=path, key_id=sub.key)
                continue
            was_live = node.status in LIVE
            node.status = NodeStatus(sub.status)
            node.state, node.host, node.capacity = sub.state, sub.host, sub.capacity
            node.skew = sub.skew
            node.last_seen = now
            if was_live and node.status not in LIVE:  # (a sync's restart is on purpose)
                reg.lose_running(node, f"{node.status.value} at relay {relay.name}",
                                 restart=node.status is NodeStatus.RESTARTING)
        prefix = relay.name + "/"
        for path in [p for p in reg.forgotten if p.startswith(prefix) and p not in seen]:
            del reg.forgotten[path]  # the relay forgot it too
        for node in reg.below(relay.name):
            if node.name not in seen:  # forgotten by the relay
                reg.lose_running(node, f"forgotten by relay {relay.name}")
                reg.remove(node.name)
        self._changed()

    def _relay_lost(self, node: NodeInfo, why: str, restart: bool) -> None:
        """A node is lost: if it is a relay, everything below it is lost with it."""
        for sub in self.registry.below(node.name):
            if sub.status in LIVE or sub.status is NodeStatus.RESTARTING:
                # a relay that restarts for a sync comes back with its subtree: until then
                # only what is not a sync is lost
                sub.status = NodeStatus.RESTARTING if restart else NodeStatus.LOST
                self.registry.lose_running(sub, f"its relay {node.name} "
                                           f"{'restarted' if restart else 'is lost'}: {why}",
                                           restart=restart)

    # --- down ------------------------------------------------------------------------------

    def send_down(self, cmd: str | None, raw: bytes, paths: list[str], *, seq: int = 0,
                  keep: bool = True) -> None:
        """Send a signed message (``raw``) to instances below this hub's relays (``paths``,
        as this hub names them); ``keep``: remembered for fetch and for its answers."""
        relays = sorted({p.split("/", 1)[0] for p in paths})
        out = self.wire.publish("relay", P.Relay(raw.decode(), paths, cmd), to=relays, seq=seq)
        if keep and cmd is not None:
            self.relayed[cmd] = Relayed(cmd, out, seq, set(paths))
            while len(self.relayed) > RELAYED_KEPT:
                self.relayed.popitem(last=False)

    def relay_down(self, cmd: str | None, raw: bytes, paths: list[str]) -> None:
        """This hub is a relay: a message from above for ``paths`` below it goes on down,
        byte for byte (the instances below check who signed it and for whom)."""
        known = [p for p in paths if p.split("/", 1)[0] in self.registry.nodes]
        if not known:
            return
        is_cmd = P.peek_type(raw) == "sealed"
        self.send_down(cmd, raw, known, seq=self._seq() if is_cmd else 0, keep=is_cmd)

    def fetch_for(self, name: str, since: int) -> list[str]:
        """What a node of this hub missed of the messages relayed down (fetch)."""
        self._expire()
        prefix = name + "/"
        return [r.raw.decode() for r in self.relayed.values()
                if r.seq > since and any(p == name or p.startswith(prefix) for p in r.pending)]

    def _expire(self) -> None:
        limit = time.monotonic() - RELAYED_FOR
        while self.relayed and next(iter(self.relayed.values())).sent < limit:
            self.relayed.popitem(last=False)

    # --- up --------------------------------------------------------------------------------

    def tap(self, msg: P.Message, node: NodeInfo, raw: bytes) -> bool:
        """An answer from one of this hub's own nodes: if it answers a command relayed down
        from above, it goes up (and is not this hub's to file)."""
        if msg.type not in UP_TYPES:
            return False
        return self._route_up(msg, node.name, raw)

    def _route_up(self, msg: P.Message, path: str, raw: bytes) -> bool:
        cmd = getattr(msg.body, "cmd", None)
        if not isinstance(cmd, str):
            return False
        r = self.relayed.get(cmd)
        if r is not None and msg.type == "result":
            r.pending.discard(path)
            if not r.pending:
                del self.relayed[cmd]
        if r is None or self.up is None or self._own(cmd):
            return False
        self.up(path, raw, msg.type == "result")
        return True

    def _r_relayed(self, msg: P.Message, body: P.Relayed, relay: NodeInfo) -> None:
        """An answer from below one of this hub's relays: opened with the key its instance was
        reported with, then filed as that instance's (or sent further up)."""
        path = f"{relay.name}/{body.path}"
        node = self.registry.nodes.get(path)
        if node is None or node.via != relay.name:
            raise AuthError(f"{path} is not known below relay {relay.name}")
        raw = body.msg.encode()
        try:
            inner = P.open_message(raw, verify_key(node.key_id), node.key_id,
                                   max_size=self.max_message, replay=self.replay)
        except (AuthError, ProtocolError) as e:  # say whose answer it claimed to be
            raise type(e)(f"an answer relayed for {path}: {e}") from None
        if inner.type not in UP_TYPES:
            raise ProtocolError(f"message type {inner.type!r} does not come up through relays")
        if self._route_up(inner, path, raw):
            return
        node.last_seen = time.time()
        node.state = inner.env.state
        self.results.handle(inner, node)


__all__ = ["Tree", "UP_TYPES"]
