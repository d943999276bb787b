"""Nodes you start yourself, as one launch: a credential for N named nodes, written to a
0600 file (or shown once), and the command each node runs. For machines no launcher
reaches: lab PCs started by a login script, a container platform, a cluster without Slurm.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.keys import TOKEN_ENV
from ..errors import ConfigError
from .common import CREDENTIAL_SHOWN, Opened


@dataclass
class Manual:
    """``count`` nodes (named ``names``, or ``<launch>-k``) to be started by hand with the
    credential in ``file`` (a new 0600 file), or, without a file, in ``ODIUM_TOKEN``."""

    count: int = 1
    file: str | None = None
    names: list[str] | None = None
    kind: str = "manual"
    commands: list[str] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.count <= 4096:
            raise ConfigError(f"--count is 1 to 4096, not {self.count}")

    @property
    def place(self) -> str:
        return "by hand"

    def check(self) -> None:
        if self.file is not None and Path(self.file).expanduser().exists():
            raise ConfigError(f"{self.file} exists already; give a new file for the credential")

    def _commands(self, opened: Opened, token: str) -> list[str]:
        if self.file is not None:
            where = shlex.quote(str(Path(self.file).expanduser()))
            return [f"odium node --token-file {where} --name {n}" for n in opened.names]
        return [f"{TOKEN_ENV}={token} odium node --name {n}" for n in opened.names]

    def plan(self, opened: Opened, workdir: Path) -> str:
        return "\n".join(self._commands(opened, CREDENTIAL_SHOWN)) + "\n"

    def start(self, opened: Opened, workdir: Path) -> dict[str, Any]:
        if self.file is not None:
            from ..local.home import write_token_file

            write_token_file(Path(self.file).expanduser(), opened.token)
        self.commands = self._commands(opened, opened.token)
        return {"file": self.file, "command": self.plan(opened, workdir)}

    def status(self, detail: dict[str, Any]) -> str:
        return ""


__all__ = ["Manual"]
