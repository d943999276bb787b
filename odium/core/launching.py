"""What a launch is named and what it names: the rules the hub (odium.hub.launches) and the
launchers (odium.launch) share. A launch of N nodes names them ``<launch>-1`` ..
``<launch>-N`` unless it is given N names of its own."""

from __future__ import annotations

import re

from ..errors import ConfigError
from .wire import LAUNCH_RE, NAME_RE

LAUNCH_KINDS = ("ssh", "slurm", "manual")
MAX_LAUNCH = 4096  # nodes one launch may admit
LAUNCH_ID_RE = LAUNCH_RE


def check_launch_id(launch_id: str) -> str:
    if not re.match(LAUNCH_ID_RE, launch_id):
        raise ConfigError(f"a launch's name is a letter, then up to 31 letters, digits, '-' or "
                          f"'_', not {launch_id!r}")
    return launch_id


def launch_names(launch_id: str, count: int, names: list[str] | None = None) -> list[str]:
    """The names a launch's nodes take: those given (as many as ``count``, all different,
    each a valid node name), else ``<launch>-1`` .. ``<launch>-<count>``."""
    if not 1 <= count <= MAX_LAUNCH:
        raise ConfigError(f"a launch starts 1 to {MAX_LAUNCH} nodes, not {count}")
    if not names:
        return [f"{launch_id}-{k}" for k in range(1, count + 1)]
    if len(names) != count:
        raise ConfigError(f"{len(names)} names given for {count} nodes")
    if len(set(names)) != len(names):
        raise ConfigError("the names of a launch's nodes must all differ")
    for n in names:
        if not re.match(NAME_RE, n):
            raise ConfigError(f"not a node name: {n!r} (letters, digits, '.', '_', '-')")
    return list(names)


__all__ = ["LAUNCH_ID_RE", "LAUNCH_KINDS", "MAX_LAUNCH", "check_launch_id", "launch_names"]
