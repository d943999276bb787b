"""What a node obeyed from above its hub, kept across its restarts: the ids of the commands
that came through relays (``odium.node.tree``).

The replay window says a message is fresh by its timestamp, and the node's clock is its hub's
time (odium.core.clock), which a compromised relay, the hub of its leaves, sets. Within one
run the replay cache remembers every id it took; a node that restarted remembers nothing, so a
relay that set its clock back could hand it an old command of the root as new. The ledger
remembers the last ``KEEP`` such ids on disk (one line each, appended as obeyed; the file is
rewritten with the newest ``KEEP`` when it holds twice as many), and the node refuses any of
them again, but for the sync this node restarted for: the new process hears it again and
answers it (the note the old one left, ``sync.json`` beside the ledger, names it).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import OrderedDict
from pathlib import Path

from ..local.files import atomic_write

log = logging.getLogger(__name__)

KEEP = 50_000  # ids remembered (32 hex each: a few MB of memory at most)
_ID = re.compile(r"\A[0-9a-f]{32}\Z")


class Ledger:
    """The ids of relayed commands this node obeyed, in memory and in ``path`` (0600)."""

    def __init__(self, path: Path, keep: int = KEEP) -> None:
        self.path, self.keep = path, keep
        self.ids: OrderedDict[str, None] = OrderedDict()
        self._lines = 0
        try:
            lines = path.read_text().split()
        except FileNotFoundError:
            lines = []
        except (OSError, UnicodeDecodeError) as e:
            log.warning("%s cannot be read (%s): relayed commands are remembered from now", path,
                        e)
            lines = []
        for mid in lines[-keep:]:
            if _ID.match(mid):
                self.ids[mid] = None
        self._lines = len(lines)
        if self._lines > 2 * keep:
            self._rewrite()

    def __contains__(self, msg_id: str) -> bool:
        return msg_id in self.ids

    def resumes(self, cmd: str) -> bool:
        """Whether ``cmd`` is the sync this node restarted for (odium.node.sync's note)."""
        try:
            note = json.loads((self.path.parent / "sync.json").read_text())
        except (OSError, ValueError):
            return False
        return bool(cmd) and isinstance(note, dict) and note.get("cmd") == cmd

    def add(self, msg_id: str) -> None:
        if msg_id in self.ids or not _ID.match(msg_id):
            return
        self.ids[msg_id] = None
        while len(self.ids) > self.keep:
            self.ids.popitem(last=False)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, msg_id.encode() + b"\n")
            finally:
                os.close(fd)
            self._lines += 1
            if self._lines > 2 * self.keep:
                self._rewrite()
        except OSError as e:  # a full disk: remembered for this run only
            log.warning("cannot write %s (%s)", self.path, e)

    def _rewrite(self) -> None:
        atomic_write(self.path, "".join(f"{m}\n" for m in self.ids))
        self._lines = len(self.ids)


__all__ = ["KEEP", "Ledger"]
