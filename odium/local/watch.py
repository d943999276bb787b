"""This process's view of its own application state, kept fresh off the loop.

One per runtime: the hub part and the node part of one process read the same view and hear
of the same changes. A check runs in a thread of its own (hashing a dirty tree and listing
packages takes a while), never two at once; what it found is taken in the loop thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from ..core.statediff import Declaration, StateInfo
from ..core.term import clean
from ..errors import ConfigError
from .appstate import snapshot

log = logging.getLogger(__name__)


class StateWatch:
    """The latest ``StateInfo`` of the application at ``app``.

    ``on_change(info)`` listeners hear of a new state id or fingerprint; ``on_bad(text)``
    listeners hear once of each distinct malformed declaration (the fingerprint is then taken
    without it). ``call_soon`` hands work to the loop thread (``Loop.call_soon_threadsafe``).
    """

    def __init__(self, app: Path, call_soon: Callable[[Callable[[], None]], None],
                 on_state: Callable[[str], None]) -> None:
        self.app = app
        self._call_soon = call_soon
        self._on_state = on_state
        self.info: StateInfo | None = None
        self.on_change: list[Callable[[StateInfo], None]] = []
        self.on_bad: list[Callable[[str], None]] = []
        self._busy = False
        self._said_bad = ""

    def current(self) -> StateInfo:
        """The latest view; computed now (in the caller's thread) if there is none yet. What
        it finds wrong reaches the listeners in the loop thread (they send, and log)."""
        if self.info is None:
            info, bad = self._snapshot()
            if bad:
                self._call_soon(lambda: self._bad(bad))
            self.info = info
        return self.info

    def warm(self) -> None:
        """Compute the first view in the background, so that the first question is quick."""
        threading.Thread(target=self.current, name="odium-state", daemon=True).start()

    def now(self) -> StateInfo:
        """A fresh view, computed now (a sync and a state report must not use an old one)."""
        info, bad = self._snapshot()
        if bad:
            self._bad(bad)
        self.take(info)
        return info

    def take(self, info: StateInfo) -> None:
        """A new view (from a check, or computed by a part itself): keep it, say if it moved."""
        old = self.info
        self.info = info
        self._on_state(info.state)
        if old is None or info.state != old.state or info.fingerprint.id != old.fingerprint.id:
            for fn in list(self.on_change):
                fn(info)

    def refresh(self) -> None:
        """Check again off the loop; a check already running makes this one a no-op."""
        if self._busy:
            return
        self._busy = True

        def work() -> None:
            try:
                info, bad = self._snapshot()
            except Exception as e:  # noqa: BLE001 - reported, never fatal
                log.warning("state check failed: %s", e)
                info, bad = None, ""
            self._call_soon(lambda: self._checked(info, bad))

        threading.Thread(target=work, name="odium-state", daemon=True).start()

    def _checked(self, info: StateInfo | None, bad: str) -> None:
        self._busy = False
        if bad:
            self._bad(bad)
        if info is not None:
            self.take(info)

    def _snapshot(self) -> tuple[StateInfo, str]:
        """The state now, and the declaration's error if it is malformed (then the
        fingerprint is taken without the declaration)."""
        try:
            return snapshot(self.app), ""
        except ConfigError as e:
            return snapshot(self.app, Declaration()), clean(e)[:4000] or "malformed"

    def _bad(self, text: str) -> None:
        if text != self._said_bad:
            self._said_bad = text
            for fn in list(self.on_bad):
                fn(text)
