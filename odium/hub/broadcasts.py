"""Broadcasts: commands published to the nodes a pattern matches, and what each node answers.

A broadcast gets one entry per matched node: its result, or ``not connected`` at once, ``lost``
when the node goes, ``timeout`` past the deadline. A node that missed the command (its SUB
socket was late) fetches it on the query socket, sealed again for it alone. Everything here
runs in the hub's loop thread.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from ..core import wire as P
from ..core.dispatch import Dispatch
from ..core.encoding import b64url
from ..core.requirements import is_commit_id
from ..core.results import NodeResult, Result, Status
from ..core.sealing import Keyring
from ..core.targeting import match_nodes
from ..errors import NotConnectedError, ProtocolError
from ..local.appstate import commit_relation
from .asking import Asker
from .links import HubRuntime, Publisher
from .nodes import LIVE, NodeInfo, Registry
from .store import CommandRow, ResultRow, Store

if TYPE_CHECKING:
    from .tree import Tree

log = logging.getLogger(__name__)

Resolve = Callable[[str | None], tuple[str, str | None]]  # a required state, resolved
DiffFor = Callable[[NodeInfo], dict[str, Any]]  # how a node's state differs from the hub's


CODE_KEPT = 64 * 1024  # characters of a command's code the store keeps


def kept_code(code: str) -> str:
    """The code as the store keeps it: whole, or, when longer than CODE_KEPT (data pushed in
    parts: megabytes of base64), its head and the whole's length and SHA-256, which say
    exactly what ran without a database write of megabytes for each part."""
    if len(code) <= CODE_KEPT:
        return code
    digest = hashlib.sha256(code.encode("utf-8", "surrogatepass")).hexdigest()
    return (f"{code[:CODE_KEPT]}\n# [odium: kept {CODE_KEPT} of {len(code)} characters; the "
            f"whole's sha256 is {digest}]")


@dataclass
class Broadcast:
    cmd: str
    seq: int
    inner: tuple[str, P.Body] | None  # the sealed message's type and body (sealed again on fetch)
    targets: list[str]
    results: dict[str, NodeResult]
    deadline: float | None
    issued: float
    callbacks: list[Callable[[Result], None]] = field(default_factory=list)
    output: list[Callable[[str, str, str], None]] = field(default_factory=list)
    on_node: list[Callable[[NodeResult], None]] = field(default_factory=list)
    acked: set[str] = field(default_factory=set)
    required: str = "any"
    hint: str | None = None
    kind: str = "python"
    code: str = ""
    targeted: frozenset[str] = field(init=False)  # the targets, to ask whether one is

    def __post_init__(self) -> None:
        self.targeted = frozenset(self.targets)

    @property
    def done(self) -> bool:
        return len(self.results) == len(self.targets)


def _error(ename: str, evalue: str) -> dict[str, Any]:
    return {"ename": ename, "evalue": evalue, "traceback": ""}


class Broadcasts:
    """The broadcasts going on, their sequence numbers, and their results.

    ``resolve``: a required state as nodes check it; ``diff_for``: what a mismatched node
    is told of its state."""

    def __init__(self, rt: HubRuntime, store: Store, registry: Registry, wire: Publisher,
                 keyring: Keyring, *, hb_interval: float, resolve: Resolve,
                 diff_for: DiffFor) -> None:
        self.rt, self.store, self.registry, self.wire = rt, store, registry, wire
        self.keyring = keyring
        self.hb_interval = hb_interval
        self._resolve, self._diff_for = resolve, diff_for
        self.broadcasts: dict[str, Broadcast] = {}
        # entries recorded as lost or timed out, that an answer may still come for: cmd ->
        # node -> the status recorded (an answer that comes later is said, not counted)
        self.unanswered: OrderedDict[str, dict[str, str]] = OrderedDict()
        self.seq = store.max_seq()
        self._abandon()
        self.tree: Tree | None = None  # what goes to instances below this hub's relays
        self.queries: Dispatch[Asker] = Dispatch("query (broadcasts)")
        self.queries.on("run", P.Run, self._h_run)
        self.queries.on("interrupt", P.Interrupt, self._h_interrupt)
        self.queries.on("fetch", P.Fetch, self._h_fetch)
        self.queries.on("group_key", P.GroupKeys, self._h_group_key)
        self.results: Dispatch[NodeInfo] = Dispatch("results (broadcasts)")
        self.results.on("ack", P.Ack, self._r_ack)
        self.results.on("output", P.Output, self._r_output)
        self.results.on("result", P.ResultBody, self._r_result)

    # --- starting --------------------------------------------------------------------------

    def targets(self, nodes: str, none_yet: str) -> tuple[list[str], list[str]]:
        """The targetable nodes a pattern matches, and those of them connected now."""
        matched = match_nodes(nodes, self.registry.targetable())
        if not matched:
            known = ", ".join(self.registry.targetable()) or none_yet
            raise NotConnectedError(f"no node matches {nodes!r}; nodes: {known}")
        reg = self.registry.nodes
        return matched, [n for n in matched if reg[n].status in LIVE]

    def publish_sealed(self, type_: str, body: P.Body, targets: list[str], seq: int) -> bytes:
        """Publish a message whose body only its targets can read (odium.core.sealing); what
        is for instances below this hub's relays goes to them through the relays."""
        nodes = self.registry.nodes
        keys = [nodes[n].key_id for n in targets]
        below = [n for n in targets if "/" in n]
        if not below or self.tree is None:
            return self.wire.publish_sealed(type_, body, keys, targets, seq)
        if type_ == "sync":  # every relay on the way reads it: it serves the bundles below it
            on_way = {"/".join(p.split("/")[:i]) for p in below for i in range(1, p.count("/") + 1)}
            keys += [nodes[r].key_id for r in sorted(on_way) if r in nodes]
        sealed = self.keyring.seal(type_, body, keys, to=targets)
        if len(below) < len(targets):
            raw = self.wire.publish("sealed", sealed, seq=seq)
        else:  # nobody here to hear it on PUB: only the relays get it
            raw = self.rt.sign("sealed", sealed, seq=seq)
        self.tree.send_down(getattr(body, "cmd", None), raw, below, seq=seq)
        return raw

    def broadcast(self, code: str, nodes: str = "*", *, kind: str = "python",
                  timeout: float | None = None, session: str = "default",
                  issuer: str | None = None, cmd: str | None = None, ephemeral: bool = False,
                  require: str | None = None,
                  on_done: Callable[[Result], None] | None = None,
                  on_output: Callable[[str, str, str], None] | None = None,
                  on_node: Callable[[NodeResult], None] | None = None) -> Broadcast:
        """Publish a command to the nodes matching ``nodes``; ``on_done`` gets the Result,
        ``on_node`` each node's entry as it comes, ``on_output`` streamed output.

        ``require``: ``any``, ``match`` (this hub's own commit), an explicit state id, or
        ``default``/None (``match`` when this hub's application is a clean commit, else ``any``).
        """
        if kind not in ("python", "shell"):
            raise ProtocolError(f"kind must be 'python' or 'shell', not {kind!r}")
        required, hint = self._resolve(require)
        matched, targets = self.targets(nodes, "none yet (add some: odium token)")
        cmd = cmd or P.new_id()
        own = self.rt.ident.key_id
        self.seq += 1
        body = P.Exec(cmd, kind, code, session, timeout,  # type: ignore[arg-type]
                      issuer if issuer != own else None, ephemeral, required,
                      time.time() + timeout if timeout else None)
        if targets:
            self.publish_sealed("exec", body, targets, self.seq)
        grace = max(2.0, 3 * self.hb_interval)
        b = Broadcast(cmd, self.seq, ("exec", body), matched, {}, time.monotonic() + timeout
                      + grace if timeout else None, time.time())
        b.required, b.hint = required, hint
        b.callbacks.extend([on_done] if on_done else [])
        b.output.extend([on_output] if on_output else [])
        b.on_node.extend([on_node] if on_node else [])
        self.broadcasts[cmd] = b
        self.store.insert(CommandRow, dict(
            id=cmd, seq=self.seq, kind=kind, code=kept_code(code), session=session, nodes=nodes,
            targets=matched, issuer=issuer or own, state=self.rt.state,
            timeout=timeout, created=b.issued, finished=None, status="running"))
        self.store.event("command", f"{kind} {cmd[:12]} to {nodes!r} ({len(targets)} of "
                         f"{len(matched)} connected)", key_id=issuer or "")
        self.not_connected(b, targets)
        return b

    def not_connected(self, b: Broadcast, connected: list[str]) -> None:
        """Every matched node that is not connected gets its entry at once."""
        nodes, connected_ = self.registry.nodes, set(connected)
        for name in b.targets:
            if name not in connected_:
                self.record(b, NodeResult(name, Status.NOT_CONNECTED, state=nodes[name].state,
                                          error=_error("NotConnected",
                                                       f"node is {nodes[name].status.value}")))

    def _state(self, name: str) -> str:
        node = self.registry.nodes.get(name)  # (an instance below a relay may be gone)
        return node.state if node is not None else "unknown"

    def interrupt(self, cmd: str) -> bool:
        b = self.broadcasts.get(cmd)
        if b is None:
            return False
        left = [n for n in b.targets if n not in b.results]
        if left:
            raw = self.wire.publish("interrupt", P.Interrupt(cmd), to=left)
            below = [n for n in left if "/" in n]
            if below and self.tree is not None:
                self.tree.send_down(cmd, raw, below, keep=False)
        return bool(left)

    # --- results ---------------------------------------------------------------------------

    def record(self, b: Broadcast, r: NodeResult) -> None:
        if r.node in b.results:
            return
        b.results[r.node] = r
        if r.status in _MAY_ANSWER:
            self.unanswered.setdefault(b.cmd, {})[r.node] = r.status.value
            while len(self.unanswered) > UNANSWERED_KEPT:
                self.unanswered.popitem(last=False)
        for on_node in b.on_node:
            try:
                on_node(r)
            except Exception:
                log.exception("node entry callback failed")
        self._store_result(b.cmd, r)
        if b.done:
            self._finish(b)

    def _store_result(self, cmd: str, r: NodeResult) -> None:
        self.store.insert(ResultRow, dict(
            command_id=cmd, node=r.node, status=r.status.value, state=r.state,
            stdout=r.stdout, stderr=r.stderr, value=r.value, value_repr=r.value_repr,
            error=r.error, exit=r.exit, started=r.started, finished=r.finished))

    def _finish(self, b: Broadcast) -> None:
        del self.broadcasts[b.cmd]
        extra: dict[str, Any] = {"required": b.required}
        if b.hint:
            extra["hint"] = b.hint
        result = Result(b.cmd, dict((n, b.results[n]) for n in b.targets), self.rt.state,
                        b.issued, extra)
        status = "ok" if result.ok else "failed"
        fin = time.time()
        self.store.update(CommandRow, b.cmd, {"status": status, "finished": fin})
        for fn in b.callbacks:
            try:
                fn(result)
            except Exception:
                log.exception("result callback failed")

    def lose_running(self, node: NodeInfo, why: str, restart: bool = False) -> None:
        """A node is gone: what it was running is lost (a sync's restart is on purpose)."""
        for b in list(self.broadcasts.values()):
            if restart and b.kind == "sync":
                continue  # a sync restarts the node on purpose; it answers when it is back
            if node.name in b.targeted and node.name not in b.results:
                self.record(b, NodeResult(node.name, Status.LOST, state=node.state, error=_error(
                    "NodeLost", f"node lost while running: {why}")))

    def check_deadlines(self) -> None:
        for b in list(self.broadcasts.values()):
            if b.deadline is not None and time.monotonic() > b.deadline:
                for name in b.targets:
                    if name not in b.results:
                        self.record(b, NodeResult(
                            name, Status.TIMEOUT, state=self._state(name),
                            error=_error("TimeoutError", "no result from the node in time")))

    def check_running(self, node: NodeInfo, body: P.NodeBeat) -> None:
        """A command the hub thinks is running that the node does not know: it was lost."""
        for cmd in list(node.running):
            b = self.broadcasts.get(cmd)
            if b is None or node.name in b.results:
                node.running.discard(cmd)
            elif cmd not in body.running and body.seq >= b.seq and cmd in b.acked:
                self.record(b, NodeResult(node.name, Status.LOST, state=node.state, error=_error(
                    "NodeLost", "the node no longer runs this command")))

    def stop(self) -> None:
        """The hub stops: every broadcast still waiting gets its answer (nobody waits on a hub
        that is gone)."""
        for b in list(self.broadcasts.values()):
            for name in b.targets:
                if name not in b.results:
                    self.record(b, NodeResult(name, Status.LOST, state=self._state(name),
                                              error=_error("HubStopped", "the hub stopped "
                                                           "before the node answered")))

    # --- query handlers --------------------------------------------------------------------

    def _h_run(self, msg: P.Message, body: P.Run, ask: Asker) -> None:
        if msg.env.id in self.broadcasts:
            raise ProtocolError("a run with this id is already going")
        reply = ask.reply
        self.broadcast(body.code, body.nodes, kind=body.kind, timeout=body.timeout,
                       session=body.session or f"cli-{msg.env.id[:12]}", issuer=ask.key.key_id,
                       cmd=msg.env.id, ephemeral=body.session is None or body.ephemeral,
                       require=body.require,
                       on_done=lambda r: reply({"result": r.to_dict()}))

    def _h_interrupt(self, msg: P.Message, body: P.Interrupt, ask: Asker) -> None:
        ask.reply({"sent": self.interrupt(body.cmd)})

    def _h_fetch(self, msg: P.Message, body: P.Fetch, ask: Asker) -> None:
        key_id = ask.key.key_id
        name = self.registry.by_key.get(key_id, "")
        out = [self._seal_for(b, name, key_id).decode()
               for b in sorted(self.broadcasts.values(), key=lambda b: b.seq)
               if b.seq > body.since and name in b.targeted and name not in b.results
               and b.inner is not None]
        if self.tree is not None:  # and what went down for the nodes below it, if a relay
            out.extend(self.tree.fetch_for(name, body.since))
        ask.reply({"commands": out, "seq": self.seq}, sealed=True)

    def _h_group_key(self, msg: P.Message, body: P.GroupKeys, ask: Asker) -> None:
        """The keys of groups of readers (odium.core.sealing) a node missed: of those it is
        one of the readers of; None for the others."""
        keys = {g: self.keyring.group_key(g, ask.key.key_id) for g in body.g}
        ask.reply({"keys": {g: b64url(k) if k else None for g, k in keys.items()}},
                  sealed=True)

    def _seal_for(self, b: Broadcast, name: str, key_id: str) -> bytes:
        """A missed command again, sealed to the one node that asks for it."""
        assert b.inner is not None
        type_, body = b.inner
        return self.rt.sign("sealed", self.keyring.seal(type_, body, [key_id], to=[name]),
                            seq=b.seq)

    # --- results handlers ------------------------------------------------------------------

    def _r_ack(self, msg: P.Message, body: P.Ack, node: NodeInfo) -> None:
        b = self.broadcasts.get(body.cmd)
        if b is not None and node.name in b.targeted:
            b.acked.add(node.name)
            node.running.add(body.cmd)

    def _r_output(self, msg: P.Message, body: P.Output, node: NodeInfo) -> None:
        b = self.broadcasts.get(body.cmd)
        if b is not None and node.name in b.targeted:  # a node speaks only for itself
            for fn in b.output:
                fn(node.name, body.stream, body.text)

    def _r_result(self, msg: P.Message, body: P.ResultBody, node: NodeInfo) -> None:
        node.running.discard(body.cmd)
        b = self.broadcasts.get(body.cmd)
        status = Status(body.status) if body.status != "state_mismatch" else Status.STATE_MISMATCH
        if b is None or node.name not in b.targeted or node.name in b.results:
            # late or duplicate: the first answer (or lost) stands
            self._late(body.cmd, _entry(msg, body, node, status, None))
            return
        mismatch = None
        if status is Status.STATE_MISMATCH:
            mismatch = dict(body.mismatch or {})
            mismatch.update(self._diff_for(node))
            node_commit = msg.env.state.split("+")[0]
            if is_commit_id(b.required) and is_commit_id(node_commit):
                # where the node stands against what was required (ahead, behind, ...)
                mismatch["relation"] = commit_relation(self.rt.app, b.required, node_commit)
        self.record(b, _entry(msg, body, node, status, mismatch))

    def _abandon(self) -> None:
        """The commands this hub's last run left running (it was killed): ``abandoned`` now,
        and what their nodes still answer is recorded as it comes (``_late``)."""
        with self.store.session() as s:
            rows = s.execute(select(CommandRow.id, CommandRow.targets)
                             .where(CommandRow.status == "running")
                             .order_by(CommandRow.seq.desc()).limit(UNANSWERED_KEPT)).all()
            ids = [r.id for r in rows]
            answered = set(s.execute(select(ResultRow.command_id, ResultRow.node)
                                     .where(ResultRow.command_id.in_(ids))).tuples()) \
                if ids else set()
        now = time.time()
        for cmd, targets in reversed(rows):
            self.unanswered[cmd] = {n: "abandoned" for n in targets if (cmd, n) not in answered}
            self.store.update(CommandRow, cmd, {"status": "abandoned", "finished": now})
        if rows:
            self.store.event("commands_abandoned", f"{len(rows)} command(s) the hub's last run "
                             "left unfinished (it was stopped or killed) are abandoned; what "
                             "their nodes answer from now on is recorded", level="warning")

    def _late(self, cmd: str, r: NodeResult) -> None:
        """An answer after the node's entry was recorded as lost or timed out (a node frozen
        or cut off, then back): said in the event log, once; the outcome recorded stands."""
        waiting = self.unanswered.get(cmd, {})
        recorded = waiting.pop(r.node, None)
        if recorded is None:
            return  # a duplicate, or not this hub's
        if not waiting:
            self.unanswered.pop(cmd, None)
        took = (f", ran {r.duration:.1f} s" if r.started and r.finished
                and r.finished >= r.started else "")
        what = f"{r.node} answered command {cmd[:12]} ({r.status}{took})"
        if recorded == "abandoned":  # nothing was recorded for it: this is its outcome
            self._store_result(cmd, r)
            self.store.event("late_result", f"{what}, which the hub's last run left "
                             "unfinished: recorded", node=r.node)
            return
        self.store.event("late_result", f"{what} after it was recorded as {recorded}; the "
                         "recorded outcome stands", level="warning", node=r.node)


def _entry(msg: P.Message, body: P.ResultBody, node: NodeInfo, status: Status,
           mismatch: dict[str, Any] | None) -> NodeResult:
    """A node's answer as its entry in a Result."""
    return NodeResult(
        node.name, status, body.stdout, body.stderr, body.value, body.value_repr,
        body.value_json, P.to_builtins(body.error) if body.error else None, body.exit,
        msg.env.state, body.started, body.finished, mismatch,
        P.to_builtins(body.outputs) if body.outputs else [])


_MAY_ANSWER = (Status.LOST, Status.TIMEOUT)  # entries a node may still answer for
UNANSWERED_KEPT = 10_000  # finished broadcasts whose lost entries are remembered

__all__ = ["Broadcast", "Broadcasts"]
