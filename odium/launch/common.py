"""What launchers share: the error a failed start raises, the launch as the hub opened it,
and the shape of a launcher (odium.launch.ssh, odium.launch.slurm)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import OdiumError

CREDENTIAL_SHOWN = "<credential>"  # what a plan shows where the credential goes


class LaunchError(OdiumError):
    """A launch that could not start: one line per place that failed. ``detail``: what did
    start before it failed (the launcher stops it)."""

    def __init__(self, lines: list[str], detail: dict[str, Any] | None = None) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines
        self.detail = detail or {}


@dataclass(frozen=True)
class Opened:
    """A launch the hub opened: its id, its nodes' names, its credential (encoded)."""

    id: str
    names: list[str]
    token: str


class Launcher(Protocol):
    kind: str  # "ssh", "slurm"

    @property
    def count(self) -> int:
        """How many nodes it starts."""
        ...

    @property
    def place(self) -> str:
        """Where, in a line: hosts, partition."""
        ...

    def check(self) -> None:
        """Refuse (LaunchError) what cannot start at all, before the hub opens anything."""
        ...

    def plan(self, opened: Opened, workdir: Path) -> str:
        """Exactly what ``start`` runs (the credential shown as ``CREDENTIAL_SHOWN``)."""
        ...

    def start(self, opened: Opened, workdir: Path) -> dict[str, Any]:
        """Start the nodes; what it started (the launch's ``detail``: enough to stop it from
        another process). LaunchError if any place failed, with what did start."""
        ...

    def status(self, detail: dict[str, Any]) -> str:
        """What the launcher's side says now ("" if nothing more than the nodes do)."""
        ...


__all__ = ["CREDENTIAL_SHOWN", "LaunchError", "Launcher", "Opened"]
