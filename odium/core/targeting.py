"""Which node names a pattern names: one glob, or a comma-separated list of globs.

One rule for every place a pattern chooses nodes: broadcasts, the registry, the key table
(names of keys), the hub's job queue and a node's own check of a job (``odium.node.jobs``).

Names are paths: in a tree of hubs a relay's nodes are ``relay/child`` (``lab1/pc-1``),
deeper ones ``a/b/c``. In a glob ``*`` matches within one path segment (any run of
characters but ``/``), ``?`` one character but ``/``, ``[...]`` one of a set (``[!...]``
none of it), never ``/``; ``**`` matches across segments: ``**`` alone every name at any
depth, ``lab1/**`` the relay ``lab1`` and everything below it, ``**/pc-*`` a ``pc-*`` at any
depth. On flat names (no ``/``) a glob means what fnmatch says, so a pattern that worked on a
flat hub means the same in a tree.

A glob is matched against the whole name (anchored with ``\\Z``), case-sensitively. Blanks
around each part are dropped and empty parts are skipped: ``"gpu*, cpu-2"`` is two globs, and
``" , "`` none (it matches nothing).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from functools import lru_cache


def globs(pattern: str) -> list[str]:
    """The globs of a pattern, stripped, empty ones left out."""
    return [p.strip() for p in pattern.split(",") if p.strip()]


def _char_class(glob: str, i: int) -> tuple[str, int] | None:
    """The regular expression of the ``[...]`` that starts at ``glob[i]`` (fnmatch's own
    translation of it, never matching ``/``), and where it ends; None when it is not closed
    (then ``[`` stands for itself, as in fnmatch)."""
    j = i + 1
    if j < len(glob) and glob[j] == "!":
        j += 1
    if j < len(glob) and glob[j] == "]":
        j += 1
    j = glob.find("]", j)
    if j < 0:
        return None
    inner = fnmatch.translate(glob[i:j + 1])  # "(?s:" + the class + ")\\Z"
    head, tail = "(?s:", ")\\Z"
    assert inner.startswith(head) and inner.endswith(tail), inner
    return "(?!/)" + inner[len(head):-len(tail)], j + 1


@lru_cache(maxsize=4096)
def compile_glob(glob: str) -> re.Pattern[str]:
    """One glob as an anchored regular expression (see the module's docstring)."""
    out, i, n = [], 0, len(glob)
    while i < n:
        if glob.startswith("**", i):
            before = i == 0 or glob[i - 1] == "/"
            after = i + 2 == n or glob[i + 2] == "/"
            if before and after and i + 2 < n:  # "**/": zero or more whole segments
                out.append("(?:[^/]+/)*")
                i += 3
            elif before and after and i > 0:  # ".../**": the prefix itself, or below it
                out.pop()  # the "/" before it
                out.append("(?:/.*)?")
                i += 2
            else:  # "**" alone, or inside a segment: anything, across segments
                out.append(".*")
                i += 2
        elif glob[i] == "*":
            out.append("[^/]*")
            i += 1
        elif glob[i] == "?":
            out.append("[^/]")
            i += 1
        elif glob[i] == "[" and (cls := _char_class(glob, i)) is not None:
            out.append(cls[0])
            i = cls[1]
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def name_matches(pattern: str, name: str) -> bool:
    """Whether one node name matches a glob or a comma-separated list of globs."""
    return any(compile_glob(p).match(name) for p in globs(pattern))


def match_nodes(pattern: str, names: Iterable[str]) -> list[str]:
    """The names matching a glob or a comma-separated list of globs, in the order given."""
    pats = [compile_glob(p) for p in globs(pattern)]
    return [n for n in names if any(p.match(n) for p in pats)]


__all__ = ["compile_glob", "globs", "match_nodes", "name_matches"]
