"""Syncing nodes to this hub's commit: the sync broadcast, and the git bundle (and wheels) a
syncing node asks for over the query socket, made off the loop.
"""

from __future__ import annotations

import base64
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from ..core import wire as P
from ..core.dispatch import Dispatch
from ..core.requirements import is_commit_id
from ..core.results import Result
from ..errors import AuthError, OdiumError, StateMismatchError
from ..local.sync import make_bundle
from .asking import Asker
from .broadcasts import Broadcast, Broadcasts
from .links import HubRuntime
from .store import CommandRow


class Syncs:
    """``sync_nodes`` and the bundles it leads to. ``max_message``: the largest message the
    nodes read (a bundle and its wheels must fit)."""

    def __init__(self, rt: HubRuntime, broadcasts: Broadcasts, *, max_message: int,
                 wheelhouse: Path | None) -> None:
        self.rt, self.broadcasts = rt, broadcasts
        self.max_message = max_message
        self.wheelhouse = wheelhouse
        # syncs from above that pass through this hub (a relay): cmd -> (commit, its nodes)
        self.relayed: OrderedDict[str, tuple[str, set[str]]] = OrderedDict()
        self.queries: Dispatch[Asker] = Dispatch("query (syncs)")
        self.queries.on("sync_nodes", P.SyncRequest, self._h_sync_nodes)
        self.queries.on("bundle", P.BundleRequest, self._h_bundle)

    def sync_nodes(self, nodes: str = "*", *, timeout: float = 300.0, issuer: str | None = None,
                   on_done: Callable[[Result], None] | None = None) -> Broadcast:
        """Bring the matching nodes to this hub's commit (git bundle over the query socket)."""
        bc = self.broadcasts
        matched, targets = bc.targets(nodes, "none yet")
        target = self.rt.watch.now().state
        if not is_commit_id(target):
            raise StateMismatchError(f"cannot sync nodes to this hub's state {target!r}: it is "
                                     "not a clean commit; commit your changes first")
        cmd = P.new_id()
        bc.seq += 1
        sync = P.Sync(cmd, target)
        if targets:
            bc.publish_sealed("sync", sync, targets, bc.seq)
        b = Broadcast(cmd, bc.seq, ("sync", sync), matched, {}, time.monotonic() + timeout,
                      time.time())
        b.kind, b.code, b.required = "sync", target, "any"
        if on_done:
            b.callbacks.append(on_done)
        bc.broadcasts[cmd] = b
        bc.store.insert(CommandRow, dict(
            id=cmd, seq=bc.seq, kind="sync", code=target, session="-", nodes=nodes,
            targets=matched, issuer=issuer or self.rt.ident.key_id, state=target,
            timeout=timeout, created=b.issued, finished=None, status="running"))
        bc.store.event("sync", f"sync {cmd[:12]} of {nodes!r} to {target[:12]} "
                       f"({len(targets)} of {len(matched)} connected)", key_id=issuer or "")
        bc.not_connected(b, targets)
        return b

    def _h_sync_nodes(self, msg: P.Message, body: P.SyncRequest, ask: Asker) -> None:
        reply = ask.reply
        self.sync_nodes(body.nodes, timeout=body.timeout, issuer=ask.key.key_id,
                        on_done=lambda r: reply({"result": r.to_dict()}))

    def _h_bundle(self, msg: P.Message, body: P.BundleRequest, ask: Asker) -> None:
        """A node in a sync asks for the commits it lacks: made off the loop, then answered."""
        name = self.broadcasts.registry.by_key.get(ask.key.key_id, "")
        b = self.broadcasts.broadcasts.get(body.cmd)
        relayed = self.relayed.get(body.cmd)
        if b is not None and b.kind == "sync" and name in b.targeted:
            target = b.code
        elif relayed is not None and name in relayed[1]:  # a sync from above, through here
            target = relayed[0]
        else:
            raise AuthError("no sync of this node is going on")
        have = list(body.have)
        threading.Thread(target=lambda: self._bundle(target, have, ask), name="odium-bundle",
                         daemon=True).start()

    def relay(self, cmd: str, commit: str, names: set[str]) -> None:
        """A sync from above goes through this hub (a relay) to its nodes ``names``: they
        get their bundles from this hub's own repository (the relay synced itself first)."""
        self.relayed[cmd] = (commit, names)
        while len(self.relayed) > 1000:
            self.relayed.popitem(last=False)

    def _bundle(self, target: str, have: list[str], ask: Asker) -> None:
        """Make a bundle (a thread of its own), and answer in the loop."""
        reply, call_soon = ask.reply, self.rt.loop.call_soon_threadsafe
        try:
            data = make_bundle(self.rt.app, target, have)
            wheels = _wheels(self.wheelhouse)
            out = {"commit": target, "bundle": base64.b64encode(data).decode(),
                   "wheels": wheels}
            size = len(out["bundle"]) + sum(len(w) for w in wheels.values())
            if size > self.max_message - 64 * 1024:
                raise OdiumError(
                    f"the sync would be {size} bytes, over the message limit of "
                    f"{self.max_message}: serve the wheels from an index the nodes reach "
                    "(odium node --index-url/--find-links), or raise the limit")
            call_soon(lambda: reply(out, sealed=True))
        except Exception as e:  # noqa: BLE001 - every request gets an answer
            err = e if isinstance(e, OdiumError) else OdiumError(
                f"the hub failed to make the bundle: {type(e).__name__}: {e}")
            if isinstance(e, OdiumError) and "is not a commit in" in str(e):
                err = OdiumError(f"{e}: a hub (or relay) serves a sync only of commits it "
                                 "has; sync it first (a pattern such as 'lab1/**' includes "
                                 "the relay itself)")
            call_soon(lambda: reply(error=err))


def _wheels(wheelhouse: Path | None, limit: int = 8 * 1024 * 1024) -> dict[str, str]:
    """The wheels a hub offers syncing nodes (base64), from its wheelhouse directory."""
    out: dict[str, str] = {}
    if wheelhouse is None or not wheelhouse.is_dir():
        return out
    total = 0
    for f in sorted(wheelhouse.glob("*.whl")):
        data = f.read_bytes()
        total += len(data)
        if total > limit:
            raise OdiumError(f"wheels in {wheelhouse} exceed {limit} bytes; serve them from an "
                             "index the nodes can reach instead")
        out[f.name] = base64.b64encode(data).decode()
    return out


__all__ = ["Syncs"]
