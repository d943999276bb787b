"""Text from other machines made safe to print: control characters become visible escapes.

A node's host name, an event's detail, a file name in a state report, a cell's output: any of
it may hold a newline, a carriage return or an ESC sequence, which a terminal would obey
(fake log lines, rewritten lines, a changed title, a clipboard write). Every printer of text
that did not come from this process passes it through ``clean`` (one line) or ``clean_lines``
(several lines: a command's output). HTML pages escape with ``html.escape`` instead.
"""

from __future__ import annotations

import re

# what a terminal (or an editor) obeys rather than shows: C0 and C1 controls, DEL, Unicode's
# line and paragraph separators, and the bidirectional overrides and isolates
# (regex escapes, not the characters: a pattern shown in an error message stays printable)
CONTROL = r"\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_CONTROL = re.compile(f"[{CONTROL}]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    if c in _NAMED:
        return _NAMED[c]
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}"


def clean(text: object) -> str:
    """One line of foreign text, every control character shown as an escape (``\\x1b``)."""
    return _CONTROL.sub(_escape, str(text))


def clean_lines(text: object) -> str:
    """Several lines of foreign text: newlines and tabs stay, every other control character
    (carriage return, ESC, ...) is shown as an escape."""
    return _CONTROL.sub(lambda m: m.group() if m.group() in "\n\t" else _escape(m), str(text))


__all__ = ["CONTROL", "clean", "clean_lines"]
