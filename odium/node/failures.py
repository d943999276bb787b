"""What a node does with a message that failed: bad input is rejected (logged and reported,
within a rate limit), anything else logged with its traceback and reported to the hub."""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..core import wire as P
from ..core.ratelimit import TokenBucket
from ..core.term import clean
from ..errors import AuthError, OdiumError, ProtocolError
from .ports import Sends

log = logging.getLogger(__name__)


class Failures:
    """The node's dispatch wrapper, as the hub's. ``registered()``: whether the hub can be
    told (an event it lands in its log)."""

    def __init__(self, send: Sends, registered: Callable[[], bool]) -> None:
        self.send = send
        self.registered = registered
        self._bad_input_log = TokenBucket(20, 2)  # 20 lines, then 2 a second

    def failed(self, where: str, err: Exception) -> None:
        """One message failed: bad input is rejected; anything else is logged with its
        traceback and reported to the hub."""
        if isinstance(err, (ProtocolError, AuthError)):
            self.rejected(where, err)
            return
        if isinstance(err, OdiumError):
            text = f"on {where}: {err}"
        else:
            text = f"on {where}: {type(err).__name__}: {err}"
        if self._may_log():
            log.error("handling a message %s failed", text, exc_info=err)
            if self.registered():
                self.send("event", P.NodeEvent("handler_failed", text[:4000], "error"))

    def rejected(self, where: str, err: Exception) -> None:
        """Log a message this node refused, and tell the hub so it lands in the event log."""
        if self._may_log():
            log.warning("rejected message on %s: %s", where, err)
            if self.registered():
                self.send("event", P.NodeEvent("rejected", clean(f"on {where}: {err}")[:4000]))

    def _may_log(self) -> bool:
        """May bad input be logged and reported now? (A flood of it must fill neither this
        node's log nor the hub's.)"""
        return self._bad_input_log.take()


__all__ = ["Failures"]
