"""Which node names a pattern names: one glob, or a comma-separated list of globs.

One rule for every place a pattern chooses nodes: broadcasts, the registry, the key table
(names of keys), the hub's job queue and a node's own check of a job (``odium.node.jobs``).

A glob is matched against the whole name (fnmatch translates it to a regular expression
anchored with ``\\Z``), case-sensitively, ``*``, ``?`` and ``[...]`` as in fnmatch. Blanks
around each part are dropped and empty parts are skipped: ``"gpu*, cpu-2"`` is two globs, and
``" , "`` none (it matches nothing).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable


def globs(pattern: str) -> list[str]:
    """The globs of a pattern, stripped, empty ones left out."""
    return [p.strip() for p in pattern.split(",") if p.strip()]


def name_matches(pattern: str, name: str) -> bool:
    """Whether one node name matches a glob or a comma-separated list of globs."""
    return any(fnmatch.fnmatchcase(name, p) for p in globs(pattern))


def match_nodes(pattern: str, names: Iterable[str]) -> list[str]:
    """The names matching a glob or a comma-separated list of globs, in the order given."""
    pats = globs(pattern)
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)]


__all__ = ["globs", "match_nodes", "name_matches"]
