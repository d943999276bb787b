"""A launch from the caller's side: open it on the hub, start its nodes through a launcher,
note what was started, wait for the nodes, and stop it all again.

A launcher (``odium.launch.ssh.SSH``, ``odium.launch.slurm.Slurm``) knows one way of starting
processes elsewhere. It runs in the caller's process (the CLI's, the notebook's), where the
user's SSH agent and Slurm client are; the hub only keeps the launch's record and its
credential. What a launcher does is all said by ``plan`` (``--dry-run``) before it does it;
the credential is never in the plan, never on a command line.

``api`` below is a ``Hub`` or an ``Admin`` (both have ``launch_request``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from ..core import wire as P
from ..core.launching import check_launch_id, launch_names
from ..errors import OdiumError
from .common import CREDENTIAL_SHOWN, Launcher, LaunchError, Opened
from .slurm import job_status, stop_slurm
from .ssh import stop_ssh

POLL = 0.25  # seconds between looks at the launch's nodes while waiting for them


def stop_detail(kind: str, detail: dict[str, Any]) -> list[str]:
    """Stop what a launch of this kind started (its ``detail``); a line per thing done."""
    if kind == "ssh":
        return stop_ssh(detail)
    if kind == "slurm":
        return stop_slurm(detail)
    return []


def status_of(kind: str, detail: dict[str, Any]) -> str:
    if kind == "slurm":
        return job_status(detail)
    return ""


def launch(api: Any, launcher: Launcher, *, workdir: Path, name: str | None = None,
           ttl: float | None = None, dry_run: bool = False, wait: float = 120.0,
           progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Open a launch on the hub, start its nodes, wait up to ``wait`` seconds until they are
    ready (``progress(view)`` at each change). The launch as ``launches`` shows it. With
    ``dry_run`` nothing is opened or started: the view has only ``id``, ``nodes`` and
    ``plan``, what would run."""
    launcher.check()
    if dry_run:
        lid = check_launch_id(name) if name else f"{launcher.kind}-XXXX"
        names = launch_names(lid, launcher.count, getattr(launcher, "names", None))
        plan = launcher.plan(Opened(lid, names, CREDENTIAL_SHOWN), workdir / lid)
        return {"id": lid, "kind": launcher.kind, "dry_run": True, "plan": plan,
                "nodes": dict.fromkeys(names, "pending")}
    rec = api.launch_request("launch", P.LaunchOpen(
        cast(Any, launcher.kind), launcher.count, getattr(launcher, "names", None),
        launcher.place[:1024], ttl, name))
    opened = Opened(rec["id"], list(rec["nodes"]), rec["token"])
    workdir = workdir / opened.id
    try:
        detail = launcher.start(opened, workdir)
    except LaunchError as e:
        _undo(api, opened.id, launcher.kind, e.detail)
        raise
    except BaseException:  # (interrupted: nothing half-started stays)
        _undo(api, opened.id, launcher.kind, {})
        raise
    api.launch_request("launch_note", P.LaunchNote(opened.id, detail))
    return wait_up(api, opened.id, wait, progress)


def _undo(api: Any, lid: str, kind: str, detail: dict[str, Any]) -> None:
    try:
        api.launch_request("launch_note", P.LaunchNote(lid, {**detail, "failed": True}))
    finally:
        api.launch_request("launch_stop", P.LaunchNote(lid))
        stop_detail(kind, detail)


def views(api: Any, pattern: str | None = None) -> list[dict[str, Any]]:
    """The launches the hub has (whose id matches ``pattern``), each with ``launcher``: what
    the launcher's side says of it now (a Slurm job's state)."""
    found = api.launch_request("launches", P.Query(pattern=pattern))["launches"]
    return [{**v, "launcher": status_of(v["kind"], v["detail"])
             if v["status"] != "stopped" else ""} for v in found]


def view(api: Any, lid: str) -> dict[str, Any]:
    found = [v for v in views(api, lid) if v["id"] == lid]
    if not found:
        raise OdiumError(f"no launch {lid!r}")
    return found[0]


def wait_up(api: Any, lid: str, wait: float,
            progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Wait until every node of the launch is ready, or ``wait`` seconds; the last view."""
    deadline = time.monotonic() + wait
    seen: tuple[Any, ...] | None = None
    while True:
        v = view(api, lid)
        now = (v["ready"], tuple(sorted(v["nodes"].items())), v["launcher"])
        if now != seen and progress is not None:
            progress(v)
        seen = now
        if v["ready"] >= v["count"] or time.monotonic() >= deadline:
            return v
        time.sleep(POLL)  # (polling the hub's view of the nodes, with a deadline)


def stop(api: Any, lid: str) -> dict[str, Any]:
    """Stop a launch: the hub revokes its credential and its nodes' keys, then what the
    launcher started is cancelled. The view, with ``done``: a line per thing done."""
    v = api.launch_request("launch_stop", P.LaunchNote(lid))
    return {**v, "done": stop_detail(v["kind"], v["detail"])}


def where_logs(v: dict[str, Any]) -> str:
    """Where a launch's nodes write what they say (for a node that does not come up)."""
    d = v.get("detail") or {}
    if v.get("kind") == "ssh" and d.get("dir"):
        return f"each node's log is on its host in {d['dir']}/NAME/node.log"
    if v.get("kind") == "slurm" and d.get("script") and d.get("job"):
        return f"the job's output is in {Path(d['script']).parent}/slurm-{d['job']}.out"
    return ""


def progress_line(v: dict[str, Any]) -> str:
    """'launch lab: 1 of 2 nodes up; lab-2 pending (slurm job 12 PENDING)'."""
    waiting = [f"{n} {s}" for n, s in v["nodes"].items() if s != "ready"]
    tail = "; " + ", ".join(waiting[:8]) + (" …" if len(waiting) > 8 else "") if waiting else ""
    extra = f" ({v['launcher']})" if v.get("launcher") else ""
    return f"launch {v['id']}: {v['ready']} of {v['count']} nodes up{tail}{extra}"


__all__ = ["LaunchError", "Launcher", "Opened", "launch", "progress_line", "stop", "view",
           "views", "wait_up", "where_logs"]
