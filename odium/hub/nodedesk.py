"""Nodes arriving and going: joining with a token, registering, beating, restarting, leaving,
reporting their state and events; and an admin's view of them (list, forget).

Everything here runs in the hub's loop thread. The registry (``odium.hub.nodes``) keeps the
nodes; the key table (``odium.hub.keytable``) their keys; this is their requests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core import wire as P
from ..core.dispatch import Dispatch
from ..core.keys import fingerprint, is_reserved_name, join_proof_bytes, verify_proof
from ..core.sealing import Keyring
from ..core.statediff import StateInfo
from ..errors import AuthError, OdiumError, ProtocolError
from .asking import Asker
from .keytable import KeyInfo, KeyTable
from .launches import Launches
from .nodes import LIVE, NodeInfo, NodeStatus, Registry
from .store import Store

NODE_EVENT_KINDS = ("rejected", "bad_declaration", "synced", "handler_failed")  # a node's own

SKEW_NOTED = 1.0  # seconds a node's clock must be off (or move) to be said


@dataclass
class DeskHooks:
    """What the rest of the hub does when nodes move."""

    welcome: Callable[[], dict[str, Any]]  # the register reply: this hub's boot, ports, ...
    registered: Callable[[], None]  # a node registered (beat fast, re-check watchers)
    state_changed: Callable[[], None]  # a node's state changed (re-check watchers)
    ready: Callable[[], None]  # a node became ready (wake whoever waits for nodes)
    beat: Callable[[NodeInfo, P.NodeBeat], None]  # a beat from a registered node
    may_log: Callable[[], bool]  # the budget for logging what nodes send
    state: Callable[[], str]  # this hub's state id


class NodeDesk:
    """The node-facing requests and reports, and the admin's node list and forget."""

    def __init__(self, store: Store, registry: Registry, keys: KeyTable, keyring: Keyring, *,
                 boot: str, hooks: DeskHooks) -> None:
        self.store, self.registry, self.keys, self.keyring = store, registry, keys, keyring
        self.boot = boot
        self.hooks = hooks
        self.launches: Launches | None = None  # set by the server
        q: Dispatch[Asker] = Dispatch("query (nodes)")
        q.on("join", P.Join, self._h_join)
        q.on("register", P.Register, self._h_register)
        q.on("nodes", P.Query, self._h_nodes)
        q.on("forget", P.Query, self._h_forget)
        r: Dispatch[NodeInfo] = Dispatch("results (nodes)")
        r.on("node_hb", P.NodeBeat, self._r_hb)
        r.on("bye", P.Empty, self._r_bye)
        r.on("restarting", P.Empty, self._r_restarting)
        r.on("event", P.NodeEvent, self._r_event)
        r.on("state", P.StateReport, self._r_state)
        self.queries, self.results = q, r

    # --- joining and registering -----------------------------------------------------------

    def _h_join(self, msg: P.Message, body: P.Join, ask: Asker) -> None:
        info = ask.key
        if info.note != body.token or (info.expires or 0) < time.time():
            raise AuthError("join token does not match or has expired")
        verify_proof(body.key, join_proof_bytes(body.token, self.keys.own), body.proof)
        if info.name:  # a launch's credential: up to N joins, by the names it gives
            self._join_launch(info, body)
            ask.reply({"name": body.name, "hub": self.keys.own})
            return
        if info.role == "used":  # the answer to the join that used it was lost: the same again
            joined = self.keys.keys.get(body.key)
            if joined is None or joined.role != "node" or joined.name != body.name:
                raise AuthError("this join token was used already, by another join; ask for "
                                "a new one (odium token)")
            ask.reply({"name": body.name, "hub": self.keys.own})
            return
        self._name_free(body.name, body.key)
        self.keys.put(KeyInfo(info.key_id, "used", "", info.expires, body.token))  # burn it
        self.keys.put(KeyInfo(body.key, "node", body.name, None, "joined with a token"))
        self.store.event("join", f"{body.name} joined with a token ({fingerprint(body.key)})",
                         node=body.name, key_id=body.key)
        ask.reply({"name": body.name, "hub": self.keys.own})

    def _name_free(self, name: str, key_id: str) -> None:
        """A joining node's name: not reserved, and no other key's (AuthError if it is)."""
        _refuse_reserved(name)
        taken = self.registry.nodes.get(name)
        if taken is not None and taken.key_id != key_id:
            raise AuthError(f"node name {name!r} is taken by another key; choose another "
                            "--name or revoke the old key")

    def _join_launch(self, cred: KeyInfo, body: P.Join) -> None:
        self._name_free(body.name, body.key)
        had = self.keys.keys.get(body.key)
        if had is not None and had.role in ("revoked", "rejected"):
            raise AuthError(f"this node's key was {had.role} on this hub; start the node with "
                            "a new home (a new key)")
        if had is not None and had.role in ("node", "admin") and had.name != body.name:
            raise AuthError(f"this node's key is trusted already, as {had.name!r}")
        if self.launches is None:
            raise AuthError("this hub has no launches")
        self.launches.admit(cred, body.key, body.name)
        if had is None or had.role not in ("node", "admin"):
            self.keys.put(KeyInfo(body.key, "node", body.name, None,
                                  f"joined by launch {cred.name}"))

    def _h_register(self, msg: P.Message, body: P.Register, ask: Asker) -> None:
        info = ask.key
        node = self._registering(body, info)
        if node.boot and node.boot != body.boot:
            self.registry.lose_running(node, "the node restarted",
                                       restart=node.status is NodeStatus.RESTARTING)
        if node.status in LIVE and node.boot == body.boot:
            pass  # a retried register: nothing changes
        else:
            self.store.event("register", f"{body.name} registered (pid {body.pid} on "
                             f"{body.host})", node=body.name, key_id=info.key_id)
        node.boot, node.host, node.pid = body.boot, body.host, body.pid
        node.capacity = body.capacity
        node.state = msg.env.state
        if body.info is not None:
            self.registry.take_info(node, body.info)
        node.last_seen = time.time()
        if node.status not in (NodeStatus.READY, NodeStatus.CONNECTING):
            self.registry.set_status(node, NodeStatus.CONNECTING)
        self.registry.by_key[info.key_id] = body.name
        self.keyring.shared(info.key_id)  # computed once, here, not while sealing to many
        self.store.put_node(body.name, key_id=info.key_id, status=node.status.value,
                            state=node.state, host=node.host, pid=node.pid,
                            capacity=node.capacity, boot=node.boot, last_seen=node.last_seen)
        self.hooks.registered()
        ask.reply(self.hooks.welcome())

    def _registering(self, body: P.Register, info: KeyInfo) -> NodeInfo:
        """Check a register request; the node it registers (new ones are added)."""
        if info.name and info.name != body.name:
            raise AuthError(f"this key is registered as {info.name!r}, not {body.name!r}")
        _refuse_reserved(body.name)
        nodes = self.registry.nodes
        other = nodes.get(body.name)
        if other is not None and other.key_id != info.key_id:
            raise AuthError(f"node name {body.name!r} belongs to another key")
        if body.info is not None:
            try:
                StateInfo.from_dict(body.info)
            except (KeyError, TypeError, ValueError, OdiumError) as e:
                raise ProtocolError(f"bad state info in register: {e}") from None
        if not info.name:
            self.keys.put(KeyInfo(info.key_id, info.role, body.name, info.expires, info.note))
        node = nodes.get(body.name)
        if node is None:
            node = self.registry.add(NodeInfo(body.name, info.key_id))
        return node

    # --- what nodes report -----------------------------------------------------------------

    def _r_hb(self, msg: P.Message, body: P.NodeBeat, node: NodeInfo) -> None:
        if body.boot != node.boot or node.status is NodeStatus.RESTARTING:
            return  # a beat from an earlier run of the node, or before it registered again
        if body.hub_boot == self.boot and node.status is not NodeStatus.READY:
            self.registry.set_status(node, NodeStatus.READY)
            self.store.put_node(node.name, status=NodeStatus.READY.value,
                                last_seen=node.last_seen)
            self.store.event("node_ready", f"{node.name} is ready", node=node.name)
            self.hooks.ready()
        self.clock(node, body.skew)
        self.hooks.beat(node, body)

    def clock(self, node: NodeInfo, skew: float) -> None:
        """How far a node's wall clock is off this hub's time: said when it changes by a
        second or more (the node stamps with the hub's time whatever it is)."""
        if abs(skew - node.skew) < SKEW_NOTED:
            return
        node.skew = skew
        self.store.event("node_clock", f"{node.name}'s clock is {skew:+.0f} s off the hub's "
                         "(it uses the hub's time)" if abs(skew) >= SKEW_NOTED else
                         f"{node.name}'s clock agrees with the hub's again",
                         level="warning" if abs(skew) >= SKEW_NOTED else "info", node=node.name)

    def _r_event(self, msg: P.Message, body: P.NodeEvent, node: NodeInfo) -> None:
        if self.hooks.may_log():  # the same budget as the hub's own rejections
            kind = body.kind if body.kind in NODE_EVENT_KINDS else "node_event"
            self.store.event(kind, f"reported by {node.name}: {body.detail}",
                             level=body.level, node=node.name, key_id=node.key_id)

    def _r_state(self, msg: P.Message, body: P.StateReport, node: NodeInfo) -> None:
        self.registry.take_info(node, body.info)
        self.hooks.state_changed()

    def _r_restarting(self, msg: P.Message, body: P.Empty, node: NodeInfo) -> None:
        self.registry.set_status(node, NodeStatus.RESTARTING)
        self.store.put_node(node.name, status=NodeStatus.RESTARTING.value)
        self.store.event("node_restarting", f"{node.name} restarts in place", node=node.name)

    def _r_bye(self, msg: P.Message, body: P.Empty, node: NodeInfo) -> None:
        if node.status is NodeStatus.RESTARTING:
            return  # it comes back by itself
        self.registry.gone(node, NodeStatus.LEFT, "the node stopped")

    # --- an admin's view -------------------------------------------------------------------

    def _h_nodes(self, msg: P.Message, body: P.Query, ask: Asker) -> None:
        ask.reply({"nodes": self.node_list(body.pattern),
                   "hub_state": self.hooks.state(), "store": self.store.problem})

    def node_list(self, pattern: str | None = None) -> list[dict[str, Any]]:
        """The nodes as an admin sees them, each with the launch that started it ("" if none)."""
        out = self.registry.node_list(pattern)
        by_name = self.launches.by_node() if self.launches is not None else {}
        for d in out:
            d["launch"] = by_name.get(d["name"], "")
        return out

    def _h_forget(self, msg: P.Message, body: P.Query, ask: Asker) -> None:
        if not body.pattern:
            raise OdiumError("forget needs a node name or glob")
        ask.reply({"forgotten": self.forget(body.pattern)})

    def forget(self, pattern: str, *, force: bool = False) -> list[str]:
        """Remove the nodes matching ``pattern`` (a name, glob or comma list) from the
        registry and the store, with their node keys: such a node can come back only with a
        new token, or by being accepted again as a pending key. A connected node is not
        forgotten (stop it, or revoke its key, first) unless ``force`` (its process is known
        to be gone: local nodes the hub stopped itself). Returns the names forgotten."""
        reg = self.registry
        matched = reg.matching(pattern)
        live = [n for n in matched if reg.nodes[n].status in (*LIVE, NodeStatus.RESTARTING)]
        if live and not force:
            if len(live) == len(matched):
                raise OdiumError(f"not forgotten: {', '.join(live)} "
                                 f"{'is' if len(live) == 1 else 'are'} connected; stop "
                                 f"{'it' if len(live) == 1 else 'them'} first, or revoke "
                                 "the key (odium keys revoke NAME)")
            matched = [n for n in matched if n not in live]
        keys = dict(self.keys.keys)
        below = [n.name for m in matched for n in reg.below(m)]  # a relay goes with its subtree
        matched = list(dict.fromkeys(matched + below))
        for name in matched:
            if name not in reg.nodes:
                continue
            node = reg.remove(name)
            if node.via:
                reg.forgotten[name] = node.key_id
            reg.lose_running(node, "the node was forgotten")
            if reg.by_key.get(node.key_id) == name:
                del reg.by_key[node.key_id]
            k = keys.get(node.key_id)
            drop = k is not None and k.role in ("node", "revoked", "rejected")
            if drop:
                del keys[node.key_id]
            self.store.forget_node(name, node.key_id if drop else "")
            self.store.event("node_forgotten", f"{name} forgotten ({node.status.value}"
                             + (", its key dropped)" if drop else ")"), node=name,
                             key_id=node.key_id)
        self.keys.publish(keys)
        return matched


def _refuse_reserved(name: str) -> None:
    if is_reserved_name(name):
        raise AuthError(f"node name {name!r} is reserved for the hub's own keys; choose another "
                        "--name")


__all__ = ["DeskHooks", "NODE_EVENT_KINDS", "NodeDesk"]
