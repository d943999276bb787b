"""Guards on what arrives before it is trusted: nesting depth, checked without parsing, and
replays, refused by message id within a time window (pure)."""

import time
from collections import OrderedDict
from collections.abc import Callable

from ..errors import AuthError, ClockError, ProtocolError

MAX_DEPTH = 64  # deepest nesting of arrays and objects in one message (the envelope is 1)
REPLAY_WINDOW = 300.0  # seconds a message stays acceptable (and remembered)

_STRUCTURE = bytes.maketrans(b"{}", b"[]")  # count both kinds of bracket alike
_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b'[]{}"')


def too_deep(data: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether JSON text nests arrays and objects deeper than ``limit``, without parsing it
    (a recursive decoder would overflow the stack on it). Brackets inside strings do not
    count; escapes are honoured. Malformed text may be judged too deep: it fails anyway."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return False  # the common case: too few brackets to nest that deep
    s = data
    if b"\\" in s:  # an escaped backslash, then an escaped quote: neither ends a string
        s = s.replace(b"\\\\", b"").replace(b'\\"', b"")
    # quotes now only open and close strings. Keep only quotes and brackets; drop every "":
    # an empty string, or the end of one string and the start of the next with no bracket
    # in between (the two merge); then keep what is outside the strings that are left
    s = s.translate(_STRUCTURE, _NOT_STRUCTURE).replace(b'""', b"")
    if b'"' in s:
        s = b"".join(s.split(b'"')[::2])
    if b"[" * (limit + 1) in s:
        return True
    passes = 0  # each pass takes away the innermost level
    while True:
        t = s.replace(b"[]", b"")
        if len(t) == len(s):
            break
        passes += 1
        if passes > limit:
            return True
        s = t
    # what is left is unbalanced: "]]][[[": the opens that never close nest around the rest
    return passes + s.count(b"[") > limit


def check_depth(data: bytes, limit: int = MAX_DEPTH) -> None:
    if too_deep(data, limit):
        raise ProtocolError(f"message nested deeper than the limit of {limit} levels "
                            "(MAX_DEPTH) of arrays and objects")


class ReplayCache:
    """Remembers message ids for the replay window; rejects repeats and stale messages, by
    ``clock`` (the instance's: its hub's time, odium.core.clock)."""

    def __init__(self, window: float = REPLAY_WINDOW, max_entries: int = 1_000_000,
                 clock: Callable[[], float] = time.time) -> None:
        self.window = window
        self.max_entries = max_entries
        self.clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()

    def check(self, msg_id: str, ts: float, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        if abs(now - ts) > self.window:
            raise ClockError(f"message timestamp is {ts - now:+.0f} s off the receiver's "
                             f"clock (window {self.window} s)")
        seen = self._seen
        while seen:
            oldest_id, t = next(iter(seen.items()))
            if now - t > 2 * self.window or len(seen) >= self.max_entries:
                seen.popitem(last=False)
            else:
                break
        if msg_id in seen:
            raise AuthError(f"replayed message {msg_id}")
        seen[msg_id] = now
