"""``%odium launch ssh|slurm|list|stop``: the ``odium launch`` command in a notebook, with a
live "k of n nodes up" display while the nodes come up (odium.launch).

The options are the command's (``odium.cli.parser.launch_parser``), so what works in a
terminal works here as written.
"""

from __future__ import annotations

import shlex
from typing import Any

from IPython.core.error import UsageError

from ..api.hub import Hub
from ..cli.launchargs import launch_parser
from ..cli.launchcmds import launcher_from
from ..errors import OdiumError
from ..launch import LaunchError, progress_line, where_logs
from . import display as D
from .style import MUTED, badge, e


class LaunchProgress:
    """The launch's nodes as they come up: one display updated in place (a kernel), or a line
    printed at each change (terminal IPython)."""

    def __init__(self, rich: bool) -> None:
        self.rich = rich
        self._handle: Any = None

    def html(self, v: dict[str, Any]) -> str:
        nodes = " ".join(f"{e(n)} {badge(s)}" for n, s in v["nodes"].items())
        extra = f'<div style="{MUTED}">{e(v["launcher"])}</div>' if v.get("launcher") else ""
        return (f'<div class="odium-launch" data-ready="{v["ready"]}" data-count="{v["count"]}">'
                f'<b>launch {e(v["id"])}</b>: {v["ready"]} of {v["count"]} nodes up'
                f'<div style="margin-top:4px">{nodes}</div>{extra}</div>')

    def update(self, v: dict[str, Any]) -> None:
        if not self.rich:
            print(progress_line(v))
            return
        from IPython.display import display

        bundle = {"text/html": self.html(v), "text/plain": progress_line(v)}
        if self._handle is None:
            self._handle = display(bundle, raw=True, display_id=True)
        else:
            self._handle.update(bundle, raw=True)


def launches_table(launches: list[dict[str, Any]]) -> D.Table:
    rows = [[D.Cell(v["id"]), D.Cell(v["kind"]), D.Cell(v["status"], badge(v["status"])),
             D.Cell(f"{v['ready']}/{v['count']}"), D.Cell(v["place"][:60]),
             D.Cell(v.get("launcher") or "")] for v in launches]
    return D.Table("launches", ["id", "kind", "status", "ready", "where", "launcher"], rows,
                   data=launches, kind="launches")


def launch_magic(hub: Hub, line: str, rich: bool) -> Any:
    """Run ``%odium launch LINE`` against ``hub``; what the cell shows."""
    try:
        args = launch_parser().parse_args(["launch", *shlex.split(line)])
    except ValueError as err:  # unbalanced quotes
        raise UsageError(f"%odium launch: cannot split the arguments: {err}") from None
    except OdiumError as err:
        raise UsageError(f"%odium launch: {err}") from None
    except SystemExit:  # (--help: printed already)
        return None
    try:
        if args.action is None:
            raise UsageError("%odium launch needs an action: ssh, slurm, manual, list or stop")
        if args.action == "list":
            return launches_table(hub.launches())
        if args.action == "stop":
            v = hub.launch_stop(args.launch_id)
            print("\n".join([f"launch {v['id']} stopped", *v["done"]]))
            return None
        launcher = launcher_from(args)
        manual = args.action == "manual"
        progress = LaunchProgress(rich)
        v = hub.launch(launcher, name=args.name, ttl=args.ttl, dry_run=args.dry_run,
                       wait=0.0 if manual else args.wait,
                       progress=None if manual else progress.update)
    except LaunchError as err:
        raise UsageError("%odium launch: " + "\n".join(err.lines)
                         + "\n(the launch was stopped; nothing of it is left running)") from None
    except OdiumError as err:
        raise UsageError(f"%odium launch: {err}") from None
    if args.dry_run:
        print(v["plan"], end="")
        return None
    if manual:
        print(f"launch {v['id']}: on each machine:\n\n" + "\n".join(
            f"    {c}" for c in launcher.commands) + "\n")
        return None
    if v["ready"] < v["count"]:
        waiting = ", ".join(n for n, s in v["nodes"].items() if s != "ready")
        print(f"{v['ready']} of {v['count']} nodes ready after {args.wait:.0f} s; not yet: "
              f"{waiting} (the launch goes on: %odium launch list, %odium launch stop "
              f"{v['id']})" + (f"; {where_logs(v)}" if where_logs(v) else ""))
    return None


__all__ = ["LaunchProgress", "launch_magic", "launches_table"]
