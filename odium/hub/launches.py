"""Launches: sets of nodes started together (over SSH, through Slurm, by hand), each with one
join credential that admits up to N nodes by the names it gives them.

A launch's credential is a join token (``odium.core.keys.Token``) whose one-time key, in the
key table with role ``token`` and the launch's id as its name, may join up to ``count`` nodes,
each under one of the launch's names, once: a name already joined may repeat its join with
the same node key (the answer may have been lost), never with another. When every name has
joined the credential is spent (``used``); when the launch stops it is ``revoked`` at once
(the handshake refuses it) and so are the keys of the nodes that joined by it. Every join is
an event, ``launch_join`` ("k of n").

The hub records what the launcher did (``note``: the batch job's id, each node's host and
process, the command it ran) so that whoever stops the launch, from any process, knows what
to cancel. Everything here runs in the hub's loop thread.
"""

from __future__ import annotations

import copy
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import JSON, Float, Integer, select
from sqlalchemy.orm import Mapped, mapped_column

from ..core import wire as P
from ..core.dispatch import Dispatch
from ..core.keys import Token, fingerprint
from ..core.launching import LAUNCH_KINDS, check_launch_id, launch_names
from ..core.targeting import match_nodes
from ..errors import AuthError, ConfigError, OdiumError
from .asking import Asker
from .keytable import KeyInfo, KeyTable
from .store import Base, Store
from .storedb import Str

FOREVER = 10 * 365 * 86400.0  # a credential without a ttl lives as long as its launch


class LaunchRow(Base):
    """A launch: its credential's key, the names it admits and those that joined, and what
    its launcher recorded (``detail``: job id, hosts and processes, the command)."""

    __tablename__ = "launches"
    id: Mapped[str] = mapped_column(Str(32), primary_key=True)
    kind: Mapped[str] = mapped_column(Str(16))
    place: Mapped[str] = mapped_column(Str(1024), default="")  # hosts, partition, ...
    count: Mapped[int] = mapped_column(Integer)
    names: Mapped[Any] = mapped_column(JSON)
    joined: Mapped[Any] = mapped_column(JSON)  # name -> node key id
    token_key: Mapped[str] = mapped_column(Str(43))
    status: Mapped[str] = mapped_column(Str(16))  # open, full, stopped
    created: Mapped[float] = mapped_column(Float)
    expires: Mapped[float] = mapped_column(Float)
    stopped: Mapped[float | None] = mapped_column(Float, nullable=True)
    detail: Mapped[Any] = mapped_column(JSON)


@dataclass
class Launch:
    id: str
    kind: str
    place: str
    count: int
    names: list[str]
    token_key: str
    expires: float
    status: str = "open"
    created: float = field(default_factory=time.time)
    stopped: float | None = None
    joined: dict[str, str] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """Its row, copied (the store's writer thread reads it later)."""
        return {"id": self.id, "kind": self.kind, "place": self.place, "count": self.count,
                "names": list(self.names), "joined": dict(self.joined),
                "token_key": self.token_key, "status": self.status, "created": self.created,
                "expires": self.expires, "stopped": self.stopped,
                "detail": copy.deepcopy(self.detail)}


class Launches:
    """The hub's launches, and the admin requests about them. ``address()``: the query
    address a credential sends nodes to; ``revoke_nodes(key_ids, why)``: revoke these node
    keys (the hub's own revoke: each node is lost at once); ``status_of(name)``: a node's
    status, None if the hub has no such node."""

    def __init__(self, store: Store, keys: KeyTable, address: Callable[[], str],
                 revoke_nodes: Callable[[list[str], str], None],
                 status_of: Callable[[str], str | None]) -> None:
        self.store, self.keys, self.address = store, keys, address
        self.revoke_nodes, self.status_of = revoke_nodes, status_of
        q: Dispatch[Asker] = Dispatch("query (launches)")
        for t in ("launch", "launch_note", "launches", "launch_stop"):
            q.on(t, P.BODIES[t], lambda m, b, ask: ask.reply(self.answer(m.type, b)))
        self.queries = q
        LaunchRow.__table__.create(store.engine, checkfirst=True)  # type: ignore[attr-defined]
        with store.session() as s:
            rows = list(s.scalars(select(LaunchRow).order_by(LaunchRow.created)))
        self.launches: dict[str, Launch] = {
            r.id: Launch(r.id, r.kind, r.place, r.count, list(r.names), r.token_key, r.expires,
                         r.status, r.created, r.stopped, dict(r.joined), dict(r.detail))
            for r in rows}
        self.by_token = {la.token_key: la for la in self.launches.values()}

    # --- an admin's actions ----------------------------------------------------------------

    def answer(self, type_: str, body: Any) -> Any:
        """The answer to an admin's request about launches (the query socket's, and an
        in-process Hub's): ``launch`` (a P.LaunchOpen), ``launch_note``, ``launches``
        (a P.Query), ``launch_stop``."""
        if type_ == "launch":
            return self.open(body.kind, body.count, names=body.names, place=body.place,
                             ttl=body.ttl, launch_id=body.launch)
        if type_ == "launch_note":
            return self.note(body.launch, body.detail)
        if type_ == "launches":
            return {"launches": self.views(body.pattern)}
        if type_ == "launch_stop":
            return self.stop(body.launch)
        raise ConfigError(f"not a launch request: {type_!r}")

    def open(self, kind: str, count: int, *, names: list[str] | None = None, place: str = "",
             ttl: float | None = None, launch_id: str | None = None) -> dict[str, Any]:
        """A new launch and its credential (encoded: it travels by file, stdin or
        environment, never on a command line). Its id: ``launch_id``, or made up."""
        if kind not in LAUNCH_KINDS:
            raise ConfigError(f"a launch is one of {', '.join(LAUNCH_KINDS)}, not {kind!r}")
        lid = check_launch_id(launch_id or self._new_id(kind))
        if lid in self.launches:
            raise ConfigError(f"there is a launch {lid!r} already; choose another name")
        names = launch_names(lid, count, names)
        self._refuse_taken(names)
        tok = Token.new(self.address(), self.keys.own, ttl or FOREVER, launch=lid)
        la = Launch(lid, kind, place[:1024], count, names, tok.identity.key_id, tok.expires)
        self.keys.put(KeyInfo(la.token_key, "token", lid, tok.expires, tok.token_id))
        self.launches[lid] = la
        self.by_token[la.token_key] = la
        self._save(la)
        self.store.event("launch", f"launch {lid} ({kind}, {count} node{'s' * (count != 1)}"
                         f"{', ' + place[:200] if place else ''}) opened; its credential "
                         + (f"expires in {ttl:.0f} s" if ttl else "lasts as long as it"))
        return {**self.view(la), "token": tok.encode()}

    def _new_id(self, kind: str) -> str:
        while True:
            lid = f"{kind}-{secrets.token_hex(2)}"
            if lid not in self.launches:
                return lid

    def _refuse_taken(self, names: list[str]) -> None:
        """No launch may name a node another live launch, or a trusted node key, has."""
        mine = {n: la.id for la in self.launches.values() if la.status != "stopped"
                for n in la.names}
        keyed = {k.name: k.role for k in self.keys.keys.values()
                 if k.role in ("node", "admin", "revoked", "rejected") and k.name}
        for n in names:
            if n in mine:
                raise ConfigError(f"node name {n!r} belongs to launch {mine[n]} already")
            if n in keyed:
                raise ConfigError(f"node name {n!r} is taken by a{'n' * (keyed[n] == 'admin')} "
                                  f"{keyed[n]} key; choose other names, or forget that node "
                                  f"first (odium nodes forget {n})")

    def note(self, lid: str, detail: dict[str, Any]) -> dict[str, Any]:
        """What the launcher did, merged into the launch's record (job id, hosts, processes,
        the command it ran)."""
        la = self.get(lid)
        la.detail = {**la.detail, **detail}
        self._save(la)
        return self.view(la)

    def stop(self, lid: str) -> dict[str, Any]:
        """Revoke the launch's credential and the keys of the nodes it admitted: none can join
        or be heard from again. The record says what the launcher must cancel."""
        la = self.get(lid)
        if la.status != "stopped":
            la.status, la.stopped = "stopped", time.time()
            cred = self.keys.keys.get(la.token_key)
            if cred is not None:
                self.keys.put(KeyInfo(cred.key_id, "revoked", cred.name, cred.expires, cred.note))
            live = [k for k in la.joined.values()
                    if (info := self.keys.keys.get(k)) is not None and info.role == "node"]
            if live:
                self.revoke_nodes(live, f"its launch {lid} was stopped")
            self._save(la)
            self.store.event("launch_stop", f"launch {lid} stopped: its credential and the "
                             f"keys of its {len(la.joined)} joined node(s) revoked")
        return self.view(la)

    def get(self, lid: str) -> Launch:
        la = self.launches.get(lid)
        if la is None:
            known = ", ".join(self.launches) or "none"
            raise OdiumError(f"no launch {lid!r}; launches: {known}")
        return la

    def view(self, la: Launch) -> dict[str, Any]:
        """A launch as the CLI and API show it: each node's name and status (``pending``: not
        joined yet)."""
        nodes = {n: (self.status_of(n) or "joined") if n in la.joined else "pending"
                 for n in la.names}
        up = sum(1 for s in nodes.values() if s == "ready")
        return {"id": la.id, "kind": la.kind, "place": la.place, "count": la.count,
                "status": la.status, "created": la.created, "expires": la.expires,
                "stopped": la.stopped, "joined": len(la.joined), "ready": up, "nodes": nodes,
                "detail": la.detail}

    def views(self, pattern: str | None = None) -> list[dict[str, Any]]:
        """The launches (those whose id matches ``pattern``, a glob), oldest first."""
        return [self.view(la) for la in self.launches.values()
                if not pattern or match_nodes(pattern, [la.id])]

    def by_node(self) -> dict[str, str]:
        """Node name -> the launch it joined by."""
        return {n: la.id for la in self.launches.values() for n in la.joined}

    # --- the joins -------------------------------------------------------------------------

    def admit(self, cred: KeyInfo, node_key: str, name: str) -> None:
        """A node joins with a launch's credential: under one of its names, once, while the
        launch is open. AuthError, with what is wrong, if not."""
        la = self.by_token.get(cred.key_id)
        if la is None:
            raise AuthError("this join credential belongs to no launch of this hub")
        if la.status == "stopped":
            raise AuthError(f"launch {la.id} was stopped; its credential admits no one")
        had = la.joined.get(name)
        if had is not None:
            if had == node_key:
                return  # the answer to its join was lost: the same again
            raise AuthError(f"{name!r} joined launch {la.id} already, with another key")
        if name not in la.names:
            shown = ", ".join(la.names[:3]) + (f", … {la.names[-1]}" if len(la.names) > 3 else "")
            raise AuthError(f"launch {la.id} admits nodes named {shown}, not {name!r}")
        if len(la.joined) >= la.count:  # (cannot be: every name once; kept as the rule)
            raise AuthError(f"launch {la.id} admitted its {la.count} nodes already")
        la.joined[name] = node_key
        if len(la.joined) == la.count:
            la.status = "full"
            self.keys.put(KeyInfo(cred.key_id, "used", cred.name, cred.expires, cred.note))
        self._save(la)
        self.store.event("launch_join", f"{name} joined launch {la.id} ({len(la.joined)} of "
                         f"{la.count}, key {fingerprint(node_key)})", node=name, key_id=node_key)

    def _save(self, la: Launch) -> None:
        row = la.row()
        self.store.upsert(LaunchRow, row, tuple(k for k in row if k != "id"))


__all__ = ["FOREVER", "Launch", "LaunchRow", "Launches"]
