"""A node's side of a tree of hubs: commands that came through relays, and the authorities
this node obeys.

A command issued above this node's hub reaches it inside a ``relay`` message from its hub: the
issuer's own signed message, byte for byte. The node obeys it only if the issuer is an
*authority* its hub vouched for when the node registered (``above`` in the register reply:
each key above the hub, with the hub's path as that key knows it), only if the message names
this node's path as that authority knows it, and only once (the replay window). A relay can
drop such a message or hold it back; it cannot forge, alter, retarget or replay one.

When this instance is a relay itself (``odium node --serve``), the paths below it are handed to
``down`` (``odium.relay``), which sends them on to its own nodes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import msgspec

from ..core import wire as P
from ..core.dispatch import Dispatch
from ..core.guards import ReplayCache
from ..core.keys import verify_key
from ..core.sealing import Keyring, open_inner
from ..errors import AuthError, ProtocolError
from .commands import Received
from .ledger import Ledger

# (cmd, the signed message, the paths below this instance it is for, and the sync it is when
# it is one sealed to this instance too: a relay serves the bundles of syncs below it)
Down = Callable[[str | None, bytes, list[str], P.Sync | None], None]
Interrupts = Callable[[P.Message, P.Interrupt], None]


class NodeTree:
    """What came through relays for this node, and the authorities it obeys (``authorities``:
    key id -> this node's path as that key knows it; its own hub's key -> its name)."""

    def __init__(self, name: str, hub_key: str, keyring: Keyring, received: Received,
                 sealed: Dispatch[None], interrupt: Interrupts, *,
                 max_message: int = P.MAX_MESSAGE, clock: Callable[[], float] = time.time,
                 ledger: Ledger | None = None) -> None:
        self.name, self.hub_key, self.keyring = name, hub_key, keyring
        self.received, self.sealed, self.interrupt = received, sealed, interrupt
        self.max_message = max_message
        self.authorities: dict[str, str] = {hub_key: name}
        self.vouched = ""  # the digest of what the hub vouched for at register
        self.replay = ReplayCache(clock=clock)
        self.ledger = ledger  # what it obeyed from above, across restarts (odium.node.ledger)
        self.down: Down | None = None  # set when this instance is a relay

    def welcome(self, data: dict[str, Any]) -> None:
        """The register reply: the keys above this node's hub that it vouches for."""
        out = {self.hub_key: self.name}
        above = data.get("above") or []
        self.vouched = P.digest(above) if above else ""
        if not isinstance(above, list) or len(above) > P.MAX_DEPTH:
            raise ProtocolError("bad 'above' in the register reply")
        for a in above:
            key, path = (a.get("key"), a.get("path")) if isinstance(a, dict) else (None, None)
            if not (isinstance(key, str) and re.match(P.KEY_RE, key) and P.is_key_point(key)
                    and isinstance(path, str) and re.match(P.PATH_RE, path)):
                raise ProtocolError("bad authority in the register reply")
            if key != self.hub_key:
                out.setdefault(key, f"{path}/{self.name}")
        self.authorities = out

    def stale(self, beat: P.HubBeat) -> bool:
        """Whether the hub vouches for other authorities now than when this node registered
        (a relay learns those above it after its own nodes may have registered)."""
        return beat.above != self.vouched

    def above(self) -> list[dict[str, str]]:
        """What this instance's own hub part tells its nodes: every authority over it, with
        this instance's path as that authority knows it."""
        return [{"key": k, "path": p} for k, p in self.authorities.items()]

    def on_relay(self, msg: P.Message, body: P.Relay, _: None = None) -> None:
        """A ``relay`` from this node's hub (already verified as its): obey what is for this
        node, and hand on what is for the nodes below it."""
        mine, below = False, []
        prefix = self.name + "/"
        for p in body.paths:
            if p == self.name:
                mine = True
            elif p.startswith(prefix):
                below.append(p[len(prefix):])
        if not mine and not below:
            return
        raw = body.msg.encode()
        if (mine and body.cmd is not None and body.cmd in self.received
                and P.peek_type(raw) == "sealed"):
            mine = False  # already run (it came over fetch too)
        if not mine and self.down is None:
            return  # paths below a node that is not a relay: nothing to do with them
        inner, path = self._open(raw, replay=mine)
        if mine:
            self._obey(inner, path)
        if below and self.down is not None:
            opened = open_inner(self.keyring, inner, "pub") if inner.type == "sealed" else None
            sync = opened.body if opened is not None and opened.type == "sync" else None
            self.down(body.cmd, raw, below, sync)  # type: ignore[arg-type]

    def _open(self, raw: bytes, *, replay: bool) -> tuple[P.Message, str]:
        """Open a relayed message: signed by an authority over this node, which names it."""
        sender = P.peek_from(raw)
        path = self.authorities.get(sender or "")
        if sender is None or path is None:
            raise AuthError("a relayed message from a key this node's hub does not vouch for")
        inner = P.open_message(raw, verify_key(sender), sender, max_size=self.max_message,
                               replay=self.replay if replay else None)
        if inner.type not in ("sealed", "interrupt"):
            raise ProtocolError(f"message type {inner.type!r} is not relayed")
        return inner, path

    def _obey(self, inner: P.Message, path: str) -> None:
        if inner.type == "interrupt":
            if path in inner.env.to:
                self.interrupt(_as_mine(inner, self.name), inner.body)  # type: ignore[arg-type]
            return
        opened = open_inner(self.keyring, inner, "pub")
        if opened is None:
            raise AuthError("a relayed command that is not sealed to this node")
        if path not in opened.env.to:
            raise AuthError(f"a relayed command not addressed to this node ({path})")
        ledger = self.ledger
        if ledger is not None and inner.env.from_ != self.hub_key:
            if inner.env.id in ledger and not ledger.resumes(getattr(opened.body, "cmd", "")):
                raise AuthError(f"replayed message {inner.env.id} (obeyed before this node "
                                "restarted)")
            ledger.add(inner.env.id)
        self.sealed.handle(_as_mine(opened, self.name), None)


def _as_mine(msg: P.Message, name: str) -> P.Message:
    """The message as this node's parts read it: addressed to its own name (its path was
    checked against the authority that sent it)."""
    return P.Message(msgspec.structs.replace(msg.env, to=[name]), msg.body)


__all__ = ["NodeTree"]
