"""The hub's key table: every public key it knows and its role, the view the ZAP thread reads,
keys that knocked and wait (pending), and accepting, rejecting and revoking keys.

Everything here runs in the hub's loop thread, except ``zap`` (the ZAP thread), which reads an
immutable snapshot of the table: a change builds a new table and its indexes, then swaps them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core import wire as P
from ..core.keys import (
    Token,
    check_key_id,
    curve_fingerprint,
    curve_form,
    curve_public,
    curve_shown,
    fingerprint,
)
from ..core.targeting import match_nodes
from ..errors import ConfigError, OdiumError
from ..io.transport import ZapDecision
from .store import Store

ALLOWED_ROLES = ("admin", "node", "token")
KEY_ROLES = (*ALLOWED_ROLES, "pending", "rejected", "revoked", "used")
_FINGERPRINT_RE = r"^[0-9a-f]{4}(:[0-9a-f]{4}){3}\Z"
_NEW_ROLE = {"accept": "node", "reject": "rejected", "revoke": "revoked"}


@dataclass
class KeyInfo:
    key_id: str
    role: str
    name: str = ""
    expires: float | None = None
    note: str = ""


def key_fp(key_id: str) -> str:
    """A key's fingerprint: of its key id, or of its CURVE key for one known only by that."""
    return curve_fingerprint(key_id.encode()) if len(key_id) == 40 else fingerprint(key_id)


def shown(k: KeyInfo) -> str:
    """A key as a shell can paste it: its key id, or ``curve:<hex>`` for a CURVE key alone."""
    return k.key_id if len(k.key_id) == 43 else curve_shown(k.key_id)


class KeyTable:
    """The keys. ``own``: this hub's key id (never acted on); ``call_soon_threadsafe``: how the
    ZAP thread hands refused handshakes to the loop."""

    def __init__(self, store: Store, own: str,
                 call_soon_threadsafe: Callable[[Callable[[], None]], None]) -> None:
        self.store = store
        self.own = own
        self._call_soon = call_soon_threadsafe
        self._pending_seen: dict[str, float] = {}
        self.keys: dict[str, KeyInfo] = {}  # replaced whole on every change
        self._zap_view: tuple[dict[bytes, KeyInfo], dict[bytes, KeyInfo]] = ({}, {})
        self._curves: dict[str, bytes] = {}  # key id -> its CURVE public key (z85)
        keys = {}
        for row in store.keys():
            if len(row.key_id) == 43 and not P.is_key_point(row.key_id):
                store.event("key_dropped", f"stored key {row.key_id!r} ({row.role}) is not a "
                            "valid Ed25519 public key; ignored", level="warning")
                continue
            keys[row.key_id] = KeyInfo(row.key_id, row.role, row.name, row.expires, row.note)
        self.publish(keys)

    def put(self, info: KeyInfo, persist: bool = True) -> None:
        """Add or change one key. A key id that is not a real key is refused here, before
        anything changes (ConfigError); one in the table was checked as it came in."""
        # 40: a pending key known only by its CURVE key (z85)
        if len(info.key_id) != 40 and info.key_id not in self.keys:
            check_key_id(info.key_id)
        if info.role not in KEY_ROLES:
            raise ConfigError(f"a key's role is one of {', '.join(KEY_ROLES)}, not "
                              f"{info.role!r}")
        keys = dict(self.keys)
        keys[info.key_id] = info
        by_curve, pending = self._zap_view  # (one key changes: only its entry is made again)
        if len(info.key_id) == 43:
            by_curve = {**by_curve, self._curve(info.key_id): info}
        else:
            pending = {**pending, info.key_id.encode(): info}
        self.keys = keys
        self._zap_view = (by_curve, pending)
        if persist:
            self.store.put_key(info.key_id, info.role, name=info.name, expires=info.expires,
                               note=info.note)

    def publish(self, keys: dict[str, KeyInfo]) -> None:
        """Swap in a new key table with its CURVE indexes, all computed first: if anything
        fails, the old table stays whole. The ZAP thread reads the indexes as one snapshot."""
        if len(self._curves) > 2 * len(keys) + 1024:  # (keys dropped since: forget theirs)
            self._curves = {k: c for k, c in self._curves.items() if k in keys}
        by_curve = {self._curve(k): v for k, v in keys.items() if len(k) == 43}
        # pending/rejected entries of keys never trusted are keyed by their CURVE key (z85)
        pending = {k.encode(): v for k, v in keys.items() if len(k) == 40}
        self.keys = keys
        self._zap_view = (by_curve, pending)

    def _curve(self, key_id: str) -> bytes:
        """A key's CURVE key, computed once, not at every change of the table."""
        c = self._curves.get(key_id)
        if c is None:
            c = self._curves[key_id] = curve_public(key_id)
        return c

    def drop(self, key_id: str) -> None:
        """Take one key out of the table and the store."""
        keys = dict(self.keys)
        del keys[key_id]
        self.publish(keys)
        self.store.drop_key(key_id)

    def bind(self, curve: str, info: KeyInfo) -> None:
        """A key known by its CURVE key alone becomes its key id (same role)."""
        keys = dict(self.keys)
        keys.pop(curve, None)
        keys[info.key_id] = info
        self.publish(keys)
        self.store.drop_key(curve)
        self.store.put_key(info.key_id, info.role, name=info.name, note=info.note)
        self.store.event("key_bound", f"{info.role} key {fingerprint(info.key_id)} is "
                         f"{info.key_id}", key_id=info.key_id)

    # --- the handshake ---------------------------------------------------------------------

    def zap(self, mech: str, client_key: bytes, address: str, domain: str) -> ZapDecision:
        """Runs in the ZAP thread: allow only admin and node keys, and live token keys on the
        query socket (a token may only join: it hears no broadcast; a used one, until it would
        have expired, only to repeat the join that used it: the answer may have been lost)."""
        if mech != "CURVE":
            return ZapDecision(False, reason=f"mechanism {mech} refused: CURVE only")
        by_curve, by_curve_pending = self._zap_view
        info = by_curve.get(client_key)
        if info is not None and (info.role in ALLOWED_ROLES or info.role == "used"):
            if info.role not in ("token", "used"):
                return ZapDecision(True, user_id=info.key_id)
            if (info.expires or 0) >= time.time() and domain == "odium.query":
                return ZapDecision(True, user_id=info.key_id)
            why = "join token expired" if (info.expires or 0) < time.time() else \
                f"a join token may only join (not on {domain})"
            self._call_soon(lambda: self.note_denied(client_key, address, info, why))
            return ZapDecision(False, reason=why)
        if info is None:
            info = by_curve_pending.get(client_key)
            if info is not None and info.role == "node" and domain == "odium.query":
                # accepted by its fingerprint or CURVE key: its first signed request says
                # its key id, which the hub checks against this CURVE key and binds
                return ZapDecision(True, user_id=info.key_id)
        self._call_soon(lambda: self.note_denied(client_key, address, info, "unknown key"))
        return ZapDecision(False, reason="unknown key")

    def note_denied(self, client_key: bytes, address: str, info: KeyInfo | None,
                    why: str = "") -> None:
        """A key that failed the handshake: remember unknown ones as pending (bounded)."""
        now = time.time()
        ck = client_key.decode()
        if now - self._pending_seen.get(ck, 0) < 10:
            return
        self._pending_seen[ck] = now
        if len(self._pending_seen) > 10000:
            self._pending_seen.clear()
        fp = curve_fingerprint(client_key)
        if info is not None:
            self.store.event("handshake_refused", f"{info.role} key {fp} from {address}"
                             + (f": {why}" if why and why != "unknown key" else ""),
                             level="warning", key_id=info.key_id)
            return
        if ck in self.keys:  # already pending (or rejected)
            return
        pending = sum(1 for k in self.keys.values() if k.role == "pending")
        if pending >= 1000:
            self.store.event("handshake_refused", f"unknown key {fp} from {address} "
                             "(too many pending keys)", level="warning")
            return
        self.put(KeyInfo(ck, "pending", "", None, f"from {address}"))
        self.store.event("key_pending", f"unknown key {fp} from {address} waits; accept it "
                         f"with: odium keys accept {fp}")

    # --- admin views and actions -----------------------------------------------------------

    def key_list(self) -> list[dict[str, Any]]:
        """The keys, as a shell can paste them: a key id, or ``curve:<hex>`` for a key known
        only by its CURVE key (a pending one: the handshake shows the hub nothing else)."""
        return [{"key": shown(k), "role": k.role, "name": k.name, "fingerprint": key_fp(k.key_id),
                 "note": k.note, "expires": k.expires}
                for k in self.keys.values() if k.role not in ("used",)
                and not (k.role == "token" and (k.expires or 0) < time.time())]

    def issue_token(self, address: str, ttl: float) -> str:
        """A join token for ``address`` (this hub's query socket), trusted until it expires."""
        tok = Token.new(address, self.own, ttl)
        self.put(KeyInfo(tok.identity.key_id, "token", "", tok.expires, tok.token_id))
        self.store.event("token", f"join token issued, expires in {ttl:.0f} s")
        return tok.encode()

    def key_action(self, action: str, pattern: str, role: str | None = None,
                   on_revoke: Callable[[str], None] = lambda _k: None) -> list[KeyInfo]:
        """accept / reject / revoke keys chosen by key id, fingerprint, CURVE key (any form
        odium keys list shows: ``curve:<hex>``, or z85) whatever their role, or by a glob over
        their names (node keys; admin keys only with ``role="admin"``). Returns the keys acted
        on, as they were. Nothing changes unless the whole action can be done; every change is
        a ``key_<action>`` event, and ``on_revoke(key_id)`` follows each revoke. Never leaves
        the hub without an admin key.

        A pending key accepted by its key id becomes that key id at once; one accepted by its
        fingerprint or CURVE key stays a CURVE key, admitted on the query socket only, until
        its node's first signed request proves its key id (``key_bound``)."""
        if role not in (None, "node", "admin"):
            raise ConfigError(f"a key role to act on is 'node' or 'admin', not {role!r}")
        if action not in _NEW_ROLE:
            raise ConfigError(f"a key action is accept, reject or revoke, not {action!r}")
        pattern = pattern.strip()
        ids, bind = self._named(pattern)
        chosen = self._choose(action, pattern, role, ids)
        self._refuse_last_admin(action, chosen)
        for k in chosen:  # all checked: now change
            kid = bind.get(k.key_id, k.key_id)
            if kid != k.key_id:  # a pending key named by its key id: it is that key now
                self.drop(k.key_id)
            self.put(KeyInfo(kid, _NEW_ROLE[action], k.name, None, k.note))
            self.store.event(f"key_{action}", f"{k.role} key {k.name or '?'} "
                             f"{key_fp(kid)}", key_id=kid if len(kid) == 43 else "")
            if action == "revoke":
                on_revoke(k.key_id)
        return chosen

    def _named(self, pattern: str) -> tuple[set[str], dict[str, str]]:
        """The keys a pattern names exactly (any role), if it names keys: by CURVE key, key
        id or fingerprint; and the table entries known by their CURVE key that it names by
        key id (entry -> key id). Nothing for names and globs."""
        ids: set[str] = set()
        bind: dict[str, str] = {}
        curve = curve_form(pattern)
        if curve is not None:
            ids = {curve} | {k for k in self.keys if len(k) == 43
                             and curve_public(k).decode() == curve}
        elif re.match(P.KEY_RE, pattern) and P.is_key_point(pattern):
            ids = {pattern}
            c = curve_public(pattern).decode()
            if c in self.keys and pattern not in self.keys:
                ids.add(c)
                bind[c] = pattern
        elif re.match(P.KEY_RE, pattern):
            if not any(k.name == pattern for k in self.keys.values()):  # (a node's name?)
                check_key_id(pattern)  # raises: it has a key's shape, but is not a key
        elif re.match(_FINGERPRINT_RE, pattern):
            ids = {k.key_id for k in self.keys.values() if key_fp(k.key_id) == pattern}
            ids = ids or {pattern}  # (nothing has it: "no key matches")
        return ids, bind

    def _choose(self, action: str, pattern: str, role: str | None, ids: set[str]
                ) -> list[KeyInfo]:
        """The keys an action takes: named exactly, or by names and globs; in a role it may
        change; never this hub's own key. OdiumError if none."""
        if ids:  # keys named exactly: whatever their role (if it is the one asked for)
            chosen = [k for k in self.keys.values() if k.key_id in ids
                      and (role is None or (k.role == "admin") == (role == "admin"))]
        else:  # names and globs: node keys, or admin keys when asked for by role
            chosen = [k for k in self.keys.values() if k.name and match_nodes(pattern, [k.name])
                      and (k.role == "admin") == (role == "admin")]
        chosen = [k for k in chosen if k.role not in ("used", "token") and k.key_id != self.own]
        if action == "accept":
            chosen = [k for k in chosen if k.role in ("pending", "rejected", "revoked")]
        elif action == "reject":
            chosen = [k for k in chosen if k.role == "pending"]
        else:
            chosen = [k for k in chosen if k.role in ("node", "admin")]
        if not chosen:
            hint = "" if ids or role == "admin" else (
                " (names and globs choose node keys; for an admin key give its key id or "
                "--role admin)")
            raise OdiumError(f"no key to {action} matches {pattern!r}{hint}; see: odium keys list")
        return chosen

    def _refuse_last_admin(self, action: str, chosen: list[KeyInfo]) -> None:
        admins = [k for k in self.keys.values() if k.role == "admin" and k.key_id != self.own]
        if action != "accept" and admins and all(k in chosen for k in admins):
            last = admins[0]
            raise OdiumError(
                f"refused to {action} admin key {last.name or '?'} ({fingerprint(last.key_id)}): "
                "it is this hub's last admin key, the one odium commands use from its home, "
                "and you would be locked out; trust another admin key first")


__all__ = ["ALLOWED_ROLES", "KEY_ROLES", "KeyInfo", "KeyTable", "key_fp", "shown"]
