"""The keys of the hub's groups of readers (odium.core.sealing) that this node has missed.

The hub seals what many nodes read under one key per group of readers: a broadcast, or the
job batches any of them may take. Only the group's first message on PUB, or its announcement
there, carries that key wrapped for each reader. A node can miss it: it joined a moment
before, or PUB dropped the message. Such a node cannot open the next message that names the
group. It asks the hub for the key on the query socket, one request at a time, and handles
what waited for the key when the key comes. The hub answers only for the groups the node
reads; for the others it answers None, and the node then knows the group is not its own.

A command on PUB that cannot be held (more are waiting than MAX_HELD, or for more than
MAX_WAITING groups) is not lost: its sequence number is remembered (``lost``), and the next
fetch asks for what the hub sent from there on (``since``), sealed to this node alone.

Pure of sockets: ``ask`` sends the request, ``refetch`` a fetch.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ..core import wire as P
from ..core.encoding import unb64url
from ..core.sealing import Keyring, UnknownGroup, open_inner
from ..errors import ProtocolError

log = logging.getLogger(__name__)

MAX_WAITING = 64  # groups whose key this node waits for
MAX_HELD = 256  # messages held for their group's key, over all groups
ASKED_AT_ONCE = 16  # group ids in one request (P.GroupKeys)
ASK_AFTER = 0.02  # seconds a message waits for its group's announcement before the key is asked

Ask = Callable[[str, P.Body, Callable[[Any], None]], None]


class MissedKeys:
    """What waits for a group's key, and the one request for the keys missing.

    ``later(seconds, fn)``: the node's loop. A key is asked for ASK_AFTER after a message
    first needs it: a job batch often comes a moment before the group's announcement, which
    the hub published first but on another socket."""

    def __init__(self, keyring: Keyring, hub_key: str, name: str, ask: Ask,
                 pending: Callable[[str], bool], failed: Callable[[str, Exception], None],
                 later: Callable[[float, Callable[[], None]], object],
                 refetch: Callable[[], None] = lambda: None) -> None:
        self.keyring, self.hub_key, self.name = keyring, hub_key, name
        self._ask, self._pending, self._failed, self._later = ask, pending, failed, later
        self._refetch = refetch
        self.lost: int | None = None  # the first PUB command given up, to be fetched again
        # group id -> what waits for its key: (open it again, give it up)
        self._waiting: OrderedDict[str, list[tuple[Callable[[], None], Callable[[], None]]]] \
            = OrderedDict()
        self._held = 0
        self._asked: list[str] = []
        self._due = False  # an ask is scheduled

    def open(self, msg: P.Message, where: str, then: Callable[[P.Message], None],
             not_mine: Callable[[], None], hold: bool = True) -> None:
        """Open a sealed message: what it holds for this node goes to ``then``; ``not_mine``
        when it is not sealed to this node. One sealed to a group whose key is missing is held
        until the key comes, then opened again (``hold=False``: the key is kept by then, or
        that the group is not this node's; past MAX_HELD it is not held)."""
        try:
            inner = open_inner(self.keyring, msg, where, self.name)
        except UnknownGroup as e:
            if hold:
                self.missing(e.gid, lambda: self.open(msg, where, then, not_mine, hold=False),
                             lambda: self.give_up(msg, where))
                return
            inner = None  # (its kept key made room for others meanwhile)
        if inner is not None:
            then(inner)
        else:
            not_mine()

    def missing(self, gid: str, then: Callable[[], None],
                given_up: Callable[[], None] = lambda: None) -> None:
        """A message named group ``gid``, whose key this node lacks: ``then`` when it comes;
        ``given_up`` if it cannot wait for it (too many others wait)."""
        held = self._waiting.get(gid)
        if held is None:
            held = self._waiting[gid] = []
            while len(self._waiting) > MAX_WAITING:
                dropped = self._waiting.popitem(last=False)[1]
                self._held -= len(dropped)
                for _, give_up in dropped:
                    give_up()
        if self._held < MAX_HELD:
            held.append((then, given_up))
            self._held += 1
        else:
            given_up()
        if not self._due:
            self._due = True
            self._later(ASK_AFTER, self._ask_due)

    def give_up(self, msg: P.Message, where: str) -> None:
        """A message that could not wait for its group's key: one from PUB is fetched again
        (``since``); a job batch the hub sends again when no report of it comes."""
        if where != "pub":
            return
        seq = msg.env.seq
        log.warning("a command on PUB (#%d) could not wait for its group's key: fetching it "
                    "again", seq)
        self.lost = seq if self.lost is None else min(self.lost, seq)
        self._refetch()

    def since(self, seq: int) -> int:
        """Where a fetch starts: after ``seq``, the last command seen, or before the first
        one given up (it is fetched again now)."""
        lost, self.lost = self.lost, None
        return seq if lost is None else min(seq, lost - 1)

    def _ask_due(self) -> None:
        self._due = False
        self.ask()

    def learn(self, sealed: P.Sealed) -> None:
        """A group's announcement on PUB: keep its key (or that it is not this node's)."""
        self.keyring.learn(self.hub_key, sealed)
        self._release(sealed.g or "")

    def ask(self) -> None:
        """Ask for the keys still missing, unless a request for them waits for its answer
        (again after the query socket was opened anew: the old request is gone with it)."""
        if self._pending("group_key") or not self._waiting:
            return
        self._asked = list(self._waiting)[:ASKED_AT_ONCE]
        log.info("asking the hub for the keys of %d group(s) of readers", len(self._asked))
        self._ask("group_key", P.GroupKeys(self._asked), self._got)

    def _got(self, data: Any) -> None:
        keys = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(keys, dict):
            raise ProtocolError("a group_key reply without its keys")
        asked, self._asked = self._asked, []
        for gid in asked:
            text = keys.get(gid)
            key = unb64url(text) if isinstance(text, str) else None
            if key is not None and len(key) != 32:
                raise ProtocolError(f"group {gid}'s key is {len(key)} bytes, not 32")
            self.keyring.keep(self.hub_key, gid, key)
            self._release(gid)
        self.ask()

    def _release(self, gid: str) -> None:
        for fn, _ in self._waiting.pop(gid, ()):
            self._held -= 1
            try:
                fn()
            except Exception as e:  # one held message that fails is that message's failure
                self._failed("PUB", e)


__all__ = ["MissedKeys"]
