"""The hub part of an instance: its parts put together, and what the API asks of them.

The parts, each given only what it uses (``odium.hub.links``): the key table and its ZAP view
(``keytable``), the node registry (``nodes``) and the nodes' requests (``nodedesk``),
broadcasts (``broadcasts``), syncs (``bundles``), the job queue (``jobqueue``), the sockets
(``sockets``) and their readers (``inbox``). Everything runs in the instance's loop thread,
except the ZAP policy, which reads an immutable snapshot of the key table.
"""

from __future__ import annotations

import json
import os
import socket as pysocket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from ..core import wire as P
from ..core.dispatch import Dispatch
from ..core.keys import Identity, fingerprint
from ..core.requirements import is_commit_id, resolve_requirement
from ..core.results import NodeResult, Result
from ..core.sealing import Keyring
from ..core.statediff import StateInfo, format_diff
from ..core.statediff import diff as state_diff
from ..core.targeting import match_nodes
from ..io.transport import ZapHandler
from ..local.appstate import commit_relation, resolve_state
from ..local.files import atomic_write
from .asking import Asker
from .beat import Beat
from .broadcasts import Broadcast, Broadcasts
from .bundles import Syncs
from .inbox import Inbox
from .jobqueue import JobQueue
from .keytable import KeyInfo, KeyTable, key_fp, shown
from .launches import Launches
from .links import HubRuntime
from .nodedesk import DeskHooks, NodeDesk
from .nodes import LIVE, NodeInfo, NodeStatus, Registry
from .sockets import HubSockets
from .store import Store
from .tree import Tree

STATE_EVERY = 2.0  # seconds between checks of the hub's own state
DEFAULT_PORTS = P.DEFAULT_PORTS


class HubCore:
    """The hub: four CURVE server sockets, the key table behind ZAP, the registry, broadcasts,
    syncs and the job queue."""

    def __init__(self, rt: HubRuntime, store: Store, *, interface: str = "127.0.0.1",
                 ports: dict[str, int] | None = None, hb_interval: float = 1.0,
                 max_message: int = P.MAX_MESSAGE, admin: Identity | None = None,
                 wheelhouse: Path | None = None) -> None:
        self.rt = rt
        self.store = store
        self.interface = interface
        self.hb_interval = hb_interval
        self.beat = Beat(hb_interval)  # what nodes beat at: longer with many of them
        self.max_message = max_message
        self.boot = P.new_id()
        self.keyring = Keyring(rt.ident)  # keys shared with each node: sealed payloads
        rt.watch.on_bad.append(lambda text: store.event(
            "bad_declaration", f"this hub's declaration: {text}", level="error"))
        rt.watch.warm()
        self.watchers: list[Callable[[], bool]] = []  # re-checked when a node's state changes
        self._connecting_fast = 0
        self.keytable = KeyTable(store, rt.ident.key_id, rt.loop.call_soon_threadsafe)
        self.keytable.put(KeyInfo(rt.ident.key_id, "admin", "hub", None, "this hub"))
        if admin is not None:
            self.keytable.put(KeyInfo(admin.key_id, "admin", "admin", None, "admin key in home"))
        self.registry = Registry(store, lambda: self.keytable.keys)
        self.zap = ZapHandler(rt.ctx, self.keytable.zap)
        try:
            self.wire = HubSockets(rt, store, self.keyring, self.zap, interface=interface,
                                   ports={**DEFAULT_PORTS, **(ports or {})},
                                   max_message=max_message)
        except BaseException:
            self.zap.close()
            raise
        try:
            self._parts(wheelhouse)
        except BaseException:  # (else the context never terminates: these sockets stay open)
            self.wire.close()
            self.zap.close()
            raise
        loop = rt.loop
        self.wire.listen("query", self.inbox.on_query)
        self.wire.listen("results", self.inbox.on_results)
        loop.every(min(hb_interval / 2, 0.25), self._check_liveness)
        loop.every(STATE_EVERY, rt.watch.refresh)
        store.event("hub_start", f"hub {fingerprint(rt.ident.key_id)} listening on "
                    f"{interface} ports {self.ports}")
        self._beat()

    def _parts(self, wheelhouse: Path | None) -> None:
        """Make the parts that handle messages, and take their handlers in."""
        rt, store, reg = self.rt, self.store, self.registry
        self.inbox = Inbox(store, self.keytable, reg, self.wire, self.keyring,
                           max_message=self.max_message, clock=rt.sign.clock)
        self.bc = Broadcasts(rt, store, reg, self.wire, self.keyring,
                             hb_interval=self.hb_interval, resolve=self.resolve_requirement,
                             diff_for=self.diff_for)
        self.syncs = Syncs(rt, self.bc, max_message=self.max_message, wheelhouse=wheelhouse)
        self.desk = NodeDesk(store, reg, self.keytable, self.keyring, boot=self.boot,
                             hooks=DeskHooks(
                                 welcome=self._welcome, registered=self._registered,
                                 state_changed=self._check_watchers, ready=rt.notify,
                                 beat=self.bc.check_running,
                                 may_log=self.inbox.may_log_bad_input, state=lambda: rt.state))
        self.jobq = JobQueue(store, rt.loop, self.wire, reg.nodes, self.inbox.reject,
                             hb_interval=self.hb_interval, targetable=reg.targetable,
                             resolve=self.resolve_requirement)
        self.tree = Tree(store, reg, self.wire, self.keyring, self.inbox.results,
                         seq=self._next_seq, changed=self._tree_changed,
                         own=lambda cmd: cmd in self.bc.broadcasts, max_message=self.max_message,
                         clock=rt.sign.clock)
        self.bc.tree = self.tree
        self.launches = Launches(store, self.keytable, self.public_address, self._revoke_nodes,
                                 self._node_status)
        self.desk.launches = self.launches
        self.inbox.tap = self.tree.tap
        reg.on_lost.append(self.bc.lose_running)
        # a node lost for its silence may be frozen or cut off: a last run may still answer
        reg.on_lost.append(lambda node, why, _restart: self.jobq.node_lost(
            node.name, why, silent=node.status is NodeStatus.LOST))
        own: Dispatch[Asker] = Dispatch("query (hub)")
        own.on("ping", P.Empty, self._h_ping)
        own.on("keys", P.Query, self._h_keys)
        own.on("key", P.KeyAction, self._h_key)
        own.on("token", P.TokenRequest, self._h_token)
        own.on("log", P.Query, self._h_log)
        own.on("state_diff", P.Query, self._h_state_diff)
        for part in (own, self.bc.queries, self.syncs.queries, self.desk.queries,
                     self.jobq.query_handlers, self.launches.queries):
            self.inbox.queries.update(part)
        for results in (self.bc.results, self.desk.results, self.jobq.result_handlers,
                        self.tree.handlers):
            self.inbox.results.update(results)

    # --- the parts' state, as the API reads it ---------------------------------------------

    @property
    def keys(self) -> dict[str, KeyInfo]:
        return self.keytable.keys

    @property
    def nodes(self) -> dict[str, NodeInfo]:
        return self.registry.nodes

    @property
    def broadcasts(self) -> dict[str, Broadcast]:
        return self.bc.broadcasts

    @property
    def seq(self) -> int:
        return self.bc.seq

    @property
    def ports(self) -> dict[str, int]:
        return self.wire.ports

    @property
    def sockets(self) -> dict[str, zmq.Socket[Any]]:
        return self.wire.sockets

    @property
    def query_dispatch(self) -> Dispatch[Asker]:
        return self.inbox.queries

    @property
    def result_dispatch(self) -> Dispatch[NodeInfo]:
        return self.inbox.results

    # --- liveness --------------------------------------------------------------------------

    def _beat(self) -> None:
        """Beat, and beat again after the interval the number of live nodes asks for."""
        self.beat.update(sum(1 for n in self.nodes.values() if n.status in LIVE))
        self._heartbeat()
        self.rt.loop.call_later(self.beat.interval, self._beat)

    def _heartbeat(self) -> None:
        above = self.tree.above()
        self.wire.publish("hb", P.HubBeat(self.boot, self.beat.interval,
                                          P.digest(above) if above else ""), seq=self.seq)

    def _fast_heartbeat(self) -> None:
        """While nodes are connecting, beat often so their SUB sockets prove themselves fast."""
        if self._connecting_fast and any(n.status is NodeStatus.CONNECTING
                                         for n in self.nodes.values()):
            self._connecting_fast -= 1
            self._heartbeat()
            self.rt.loop.call_later(self.beat.fast(len(self.nodes)), self._fast_heartbeat)
        else:
            self._connecting_fast = 0

    def _registered(self) -> None:
        """A node registered: beat fast while it connects; its state may be what one waits for."""
        if not self._connecting_fast:
            self._connecting_fast = 250
            self.rt.loop.call_later(0.005, self._fast_heartbeat)
        else:
            self._connecting_fast = 250
        self._check_watchers()

    def _welcome(self) -> dict[str, Any]:
        """What a registering node is told: this hub's run, its beat, its other ports."""
        return {"hub_boot": self.boot, "seq": self.seq, "interval": self.beat.interval,
                "ports": {k: v for k, v in self.ports.items() if k != "query"},
                "above": self.tree.above()}  # the authorities over this hub (odium.hub.tree)

    def _tree_changed(self) -> None:
        self.jobq.sender.forget_eligibility()  # relays take jobs for their subtrees
        self.rt.notify()

    def _next_seq(self) -> int:
        self.bc.seq += 1
        return self.bc.seq

    def _check_liveness(self) -> None:
        self.registry.check_liveness(self.beat.liveness())
        self.bc.check_deadlines()

    def _check_watchers(self) -> None:
        self.watchers = [w for w in self.watchers if not w()]

    # --- query handlers of the hub's own -------------------------------------------------

    def _h_ping(self, msg: P.Message, body: P.Empty, ask: Asker) -> None:
        ask.reply({"boot": self.boot, "seq": self.seq, "key": self.rt.ident.key_id,
                   "store": self.store.health()})

    def _h_keys(self, msg: P.Message, body: P.Query, ask: Asker) -> None:
        ask.reply({"keys": self.key_list()})

    def _h_key(self, msg: P.Message, body: P.KeyAction, ask: Asker) -> None:
        chosen = self.key_action(body.action, body.pattern, body.role)
        ask.reply({"changed": [k.key_id for k in chosen], "keys": [
            {"key": shown(k), "name": k.name, "role": k.role, "fingerprint": key_fp(k.key_id)}
            for k in chosen]})

    def _h_token(self, msg: P.Message, body: P.TokenRequest, ask: Asker) -> None:
        ask.reply({"token": self.make_token(body.ttl)})

    def _h_log(self, msg: P.Message, body: P.Query, ask: Asker) -> None:
        ask.reply({"events": self.events(body.limit)})

    def _h_state_diff(self, msg: P.Message, body: P.Query, ask: Asker) -> None:
        ask.reply(self.state_report(body.pattern))

    # --- state -----------------------------------------------------------------------------

    @property
    def state_info(self) -> StateInfo:
        """This hub's own state (the process's one view of it)."""
        return self.rt.watch.current()

    def resolve_requirement(self, require: str | None) -> tuple[str, str | None]:
        """The state a command requires, as the node will check it: ``any`` or a commit."""
        return resolve_requirement(require, self.rt.state,
                                   lambda rev: resolve_state(self.rt.app, rev))

    def diff_for(self, node: NodeInfo) -> dict[str, Any]:
        """How a node's state differs from this hub's, part by part."""
        if node.info is None:  # only its state id so far: compare commits, say the rest is unknown
            d: dict[str, Any] = {}
            mine, theirs_state = self.rt.state, node.state
            hub_commit, node_commit = mine.split("+")[0], theirs_state.split("+")[0]
            if hub_commit != node_commit:
                rel = "unknown"
                if is_commit_id(hub_commit) and is_commit_id(node_commit):
                    rel = commit_relation(self.rt.app, hub_commit, node_commit)
                d["commit"] = {"hub": hub_commit, "node": node_commit, "relation": rel}
            if "+dirty" in theirs_state:
                d["dirty"] = ["(files not reported yet)"]
            d["unreported"] = "the node has not reported its fingerprint yet"
            return {"diff": d, "text": format_diff(d)}
        theirs = StateInfo.from_dict(node.info)
        relation = None
        if self.state_info.commit and theirs.commit:
            relation = commit_relation(self.rt.app, self.state_info.commit, theirs.commit)
        d = state_diff(self.state_info, theirs, relation)
        return {"diff": d, "text": format_diff(d)}

    def state_report(self, pattern: str | None = None) -> dict[str, Any]:
        self.rt.watch.now()
        names = match_nodes(pattern, sorted(self.nodes)) if pattern else sorted(self.nodes)
        return {"hub": self.state_info.to_dict(),
                "nodes": {n: {"status": self.nodes[n].status.value, "state": self.nodes[n].state,
                              **self.diff_for(self.nodes[n])} for n in names}}

    # --- what the API asks -----------------------------------------------------------------

    def broadcast(self, code: str, nodes: str = "*", *, kind: str = "python",
                  timeout: float | None = None, session: str = "default",
                  issuer: str | None = None, cmd: str | None = None, ephemeral: bool = False,
                  require: str | None = None,
                  on_done: Callable[[Result], None] | None = None,
                  on_output: Callable[[str, str, str], None] | None = None,
                  on_node: Callable[[NodeResult], None] | None = None) -> Broadcast:
        """Publish a command to the nodes matching ``nodes`` (``Broadcasts.broadcast``)."""
        return self.bc.broadcast(code, nodes, kind=kind, timeout=timeout, session=session,
                                 issuer=issuer, cmd=cmd, ephemeral=ephemeral, require=require,
                                 on_done=on_done, on_output=on_output, on_node=on_node)

    def sync_nodes(self, nodes: str = "*", *, timeout: float = 300.0, issuer: str | None = None,
                   on_done: Callable[[Result], None] | None = None) -> Broadcast:
        """Bring the matching nodes to this hub's commit (``Syncs.sync_nodes``)."""
        return self.syncs.sync_nodes(nodes, timeout=timeout, issuer=issuer, on_done=on_done)

    def interrupt(self, cmd: str) -> bool:
        return self.bc.interrupt(cmd)

    def targetable(self) -> list[str]:
        return self.registry.targetable()

    def forget(self, pattern: str, *, force: bool = False) -> list[str]:
        """Remove the matching nodes and their node keys (``NodeDesk.forget``)."""
        return self.desk.forget(pattern, force=force)

    def node_list(self, pattern: str | None = None) -> list[dict[str, Any]]:
        return self.desk.node_list(pattern)

    def key_list(self) -> list[dict[str, Any]]:
        return self.keytable.key_list()

    def key_action(self, action: str, pattern: str, role: str | None = None) -> list[KeyInfo]:
        """accept / reject / revoke keys (``KeyTable.key_action``). A revoked node is lost at
        once, and the sockets nodes listen on drop every connection, so that it hears nothing
        more."""
        chosen = self.keytable.key_action(action, pattern, role, on_revoke=self._revoked)
        if action == "revoke":
            self.wire.rebind(("pub", "jobs", "results"))
        return chosen

    def _revoked(self, key_id: str, why: str = "its key was revoked") -> None:
        node = self.registry.of_key(key_id)
        if node is not None:
            self.registry.gone(node, NodeStatus.LOST, why)

    def _node_status(self, name: str) -> str | None:
        """A node's status as the node list says it (a key no longer trusted: its role)."""
        node = self.registry.nodes.get(name)
        if node is None:
            return None
        k = self.keytable.keys.get(node.key_id)
        return node.status.value if k is not None and k.role == "node" else (
            k.role if k is not None else "untrusted")

    def _revoke_nodes(self, key_ids: list[str], why: str) -> None:
        """Revoke these node keys (a stopped launch's): each node lost at once, and deaf."""
        for kid in key_ids:
            k = self.keytable.keys[kid]
            self.keytable.put(KeyInfo(kid, "revoked", k.name, None, k.note))
            self.store.event("key_revoke", f"node key {k.name or '?'} {key_fp(kid)}: {why}",
                             key_id=kid)
            self._revoked(kid, why)
        self.wire.rebind(("pub", "jobs", "results"))

    def make_token(self, ttl: float = 3600.0) -> str:
        return self.keytable.issue_token(self.public_address(), ttl)

    def public_address(self) -> str:
        host = self.interface
        if host in ("*", "0.0.0.0"):
            host = pysocket.getfqdn()
        return f"tcp://{host}:{self.ports['query']}"

    def events(self, limit: int = 50) -> list[dict[str, Any]]:
        if not self.store.problem:  # (else what is stored so far: a flush would wait for ever)
            self.store.flush()
        return [{"ts": e.ts, "level": e.level, "kind": e.kind, "node": e.node, "key": e.key_id,
                 "detail": e.detail} for e in self.store.events(limit)]

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "interface": self.interface, "ports": self.ports,
                "key": self.rt.ident.key_id, "boot": self.boot}

    def write_info(self, home: Path) -> None:
        """hub.json: how the commands of this machine reach this hub (0600)."""
        atomic_write(home / "hub.json", json.dumps(self.info()))

    def close(self) -> None:
        self.bc.stop()  # every broadcast still waiting gets its answer
        self.jobq.close()
        self.wire.close()
        self.zap.close()


__all__ = ["HubCore"]
