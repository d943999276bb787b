"""Nodes started as one Slurm batch job: ``sbatch`` a script that ``srun``s one node per task.

The script (``--dry-run`` shows it) names each task's node from its rank (``SLURM_PROCID``),
gives it a home of its own in the launch's directory (a file system the compute nodes share
with this machine, as a cluster's home directories are), and runs ``python -m odium node``.
The credential travels in the environment of ``sbatch`` alone (``ODIUM_TOKEN``: Slurm hands
the submitting environment to the job, and each node takes it out of its own environment at
once), never in the script or on a command line. The job's id is the launch's; ``odium launch
stop`` runs ``scancel``; while the job waits in the queue, the launch says so ("PENDING").
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.keys import TOKEN_ENV
from ..errors import ConfigError
from .common import CREDENTIAL_SHOWN, LaunchError, Opened

SUBMIT_TIMEOUT = 60.0
_TIME_CHARS = set("0123456789:-")


@dataclass
class Slurm:
    """``nodes`` machines, ``tasks_per_node`` Odium nodes on each; ``partition``, ``time``
    (Slurm's forms: ``30``, ``1:00:00``, ``2-0``), ``account``; ``sbatch_args``: more, as
    given; ``python``: the Python with Odium on the compute nodes; ``app``: the application
    directory there."""

    nodes: int = 1
    tasks_per_node: int = 1
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    sbatch_args: list[str] = field(default_factory=list)
    python: str = "python3"
    app: str | None = None
    names: list[str] | None = None
    kind: str = "slurm"

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= 4096 or not 1 <= self.tasks_per_node <= 256:
            raise ConfigError(f"--nodes is 1 to 4096 and --tasks-per-node 1 to 256, not "
                              f"{self.nodes} and {self.tasks_per_node}")
        if self.time is not None and (not self.time or set(self.time) - _TIME_CHARS):
            raise ConfigError(f"--time is as Slurm writes it (30, 1:00:00, 2-0), not "
                              f"{self.time!r}")
        for what, v in (("partition", self.partition), ("account", self.account)):
            if v is not None and (not v or any(c.isspace() or c in "'\"\\$`;" for c in v)):
                raise ConfigError(f"not a Slurm {what}: {v!r}")

    @property
    def count(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def place(self) -> str:
        return f"slurm {self.nodes}x{self.tasks_per_node}" + (
            f" partition {self.partition}" if self.partition else "")

    def check(self) -> None:
        if shutil.which("sbatch") is None:
            raise LaunchError(["sbatch not found: this machine is no Slurm submit host (or "
                               "Slurm's client commands are not on PATH)"])

    def script(self, opened: Opened, workdir: Path) -> str:
        head = ["#!/bin/sh", f"#SBATCH --job-name=odium-{opened.id}",
                f"#SBATCH --nodes={self.nodes}", f"#SBATCH --ntasks-per-node={self.tasks_per_node}",
                f"#SBATCH --output={workdir}/slurm-%j.out"]
        head += [f"#SBATCH --{k}={v}" for k, v in (("partition", self.partition),
                                                   ("time", self.time),
                                                   ("account", self.account)) if v]
        cases = " ".join(f"{i}) N={n} ;;" for i, n in enumerate(opened.names))
        app = f" --app {shlex.quote(self.app)}" if self.app else ""
        task = (f'case "$SLURM_PROCID" in {cases} *) exit 3 ;; esac; umask 077; '
                f'mkdir -p {shlex.quote(str(workdir))}/"$N"; exec {shlex.quote(self.python)} '
                f'-m odium node --home {shlex.quote(str(workdir))}/"$N" --name "$N"{app}')
        return "\n".join([
            *head,
            f"# Odium launch {opened.id}: one node per task, named by its rank; the",
            f"# credential is in ${TOKEN_ENV}, from sbatch's environment",
            f"exec srun --kill-on-bad-exit=0 sh -c {shlex.quote(task)}", ""])

    def submit_command(self, path: Path) -> list[str]:
        return ["sbatch", "--parsable", *self.sbatch_args, str(path)]

    def plan(self, opened: Opened, workdir: Path) -> str:
        path = workdir / "launch.sbatch"
        return (f"# {path}\n{self.script(opened, workdir)}\n# submitted with the credential "
                f"in sbatch's environment only:\n{TOKEN_ENV}={CREDENTIAL_SHOWN} "
                + shlex.join(self.submit_command(path)) + "\n")

    def start(self, opened: Opened, workdir: Path) -> dict[str, Any]:
        workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = workdir / "launch.sbatch"
        path.write_text(self.script(opened, workdir))
        cmd = self.submit_command(path)
        env = {**os.environ, TOKEN_ENV: opened.token}
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, env=env,
                               timeout=SUBMIT_TIMEOUT)
        except FileNotFoundError:
            raise LaunchError(["sbatch not found"]) from None
        except subprocess.TimeoutExpired:
            raise LaunchError([f"sbatch gave no answer in {SUBMIT_TIMEOUT:.0f} s"]) from None
        job = p.stdout.strip().split(";")[0]
        if p.returncode != 0 or not job.isdigit():
            why = " ".join(p.stderr.split())[:300] or f"exit status {p.returncode}"
            raise LaunchError([f"sbatch failed: {why}"])
        return {"job": job, "script": str(path), "command": shlex.join(cmd)}


def job_status(detail: dict[str, Any]) -> str:
    """'slurm job 12 PENDING', or '' once the job is no longer in the queue."""
    job = str(detail.get("job", ""))
    if not job.isdigit() or shutil.which("squeue") is None:
        return ""
    try:
        p = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                           text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return f"slurm job {job}: squeue gave no answer"
    state = p.stdout.strip().split("\n")[0] if p.returncode == 0 else ""
    return f"slurm job {job} {state}" if state else ""


def stop_slurm(detail: dict[str, Any]) -> list[str]:
    job = str(detail.get("job", ""))
    if not job.isdigit():
        return []
    try:
        p = subprocess.run(["scancel", job], capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired) as e:
        return [f"could not cancel slurm job {job}: {e}"]
    if p.returncode != 0:
        return [f"could not cancel slurm job {job}: {' '.join(p.stderr.split())[:300]}"]
    return [f"slurm job {job} cancelled"]


__all__ = ["Slurm", "job_status", "stop_slurm"]
