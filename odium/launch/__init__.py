"""Starting nodes where the user's machines are: over SSH (``SSH``) and through Slurm
(``Slurm``), each launch tracked by the hub with one credential for all its nodes
(``odium.hub.launches``). ``hub.launch(SSH([...]))``, ``odium launch ssh HOST…``; see
docs/launch.md."""

from __future__ import annotations

from .base import LaunchError, launch, progress_line, stop, view, wait_up, where_logs
from .manual import Manual
from .slurm import Slurm
from .ssh import SSH

__all__ = ["SSH", "LaunchError", "Manual", "Slurm", "launch", "progress_line", "stop", "view",
           "wait_up", "where_logs"]
