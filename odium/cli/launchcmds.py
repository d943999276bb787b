"""``odium launch ssh|slurm|list|stop``: nodes started elsewhere as one launch (odium.launch),
through the hub of ``--home``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..core.term import clean
from ..errors import ConfigError
from .commands import ago, connect, print_table


def cmd_launch(args: argparse.Namespace) -> int:
    if args.action is None:
        raise ConfigError("odium launch needs an action: ssh, slurm, manual, list or stop "
                          "(see: odium launch --help)")
    if args.action == "list":
        return _list(args)
    if args.action == "stop":
        return _stop(args)
    return _start(args)


def launcher_from(args: argparse.Namespace) -> Any:
    """The launcher an ``odium launch ssh|slurm`` command line says (the magic's too)."""
    from ..launch import SSH, Manual, Slurm

    if args.action == "manual":
        return Manual(count=args.count, file=args.file)
    if args.action == "ssh":
        return SSH(list(args.hosts), per_host=args.per_host, python=args.python, app=args.app,
                   ssh_config=args.ssh_config, ssh_options=list(args.ssh_options),
                   remote_dir=args.remote_dir, bootstrap=args.bootstrap,
                   wheelhouse=args.wheelhouse)
    return Slurm(nodes=args.nodes, tasks_per_node=args.tasks_per_node,
                 partition=args.partition, time=args.time, account=args.account,
                 sbatch_args=list(args.sbatch_args), python=args.python, app=args.app)


def _start(args: argparse.Namespace) -> int:
    from ..launch import LaunchError, progress_line, where_logs

    launcher = launcher_from(args)
    tty = sys.stderr.isatty()
    last = [""]

    def progress(v: dict[str, Any]) -> None:
        line = progress_line(v)
        if line != last[0]:
            print(("\r\033[K" if tty else "") + clean(line), end="" if tty else "\n",
                  file=sys.stderr, flush=True)
            last[0] = line

    manual = args.action == "manual"
    with connect(args) as admin:
        try:
            v = admin.launch(launcher, name=args.name, ttl=args.ttl, dry_run=args.dry_run,
                             wait=0.0 if manual else args.wait,
                             progress=None if args.json or manual else progress)
        except LaunchError as e:
            for line in e.lines:
                print(f"odium: {clean(line)}", file=sys.stderr)
            print("odium: the launch was stopped; nothing of it is left running",
                  file=sys.stderr)
            return 1
    if tty and last[0]:
        print(file=sys.stderr)
    if args.json:
        print(json.dumps(v, indent=2))
    elif args.dry_run:
        print(v["plan"], end="")
    if args.dry_run:
        return 0
    if manual:
        if not args.json:
            print(f"launch {v['id']}: {v['count']} node(s) may join with its credential"
                  + (f" (in {args.file}, 0600)" if args.file else "") + "; on each machine:\n")
            print("\n".join(f"    {c}" for c in launcher.commands) + "\n")
        return 0
    if v["ready"] < v["count"]:
        waiting = [n for n, s in v["nodes"].items() if s != "ready"]
        print(f"odium: launch {v['id']}: {v['ready']} of {v['count']} nodes ready after "
              f"{args.wait:.0f} s; not yet: {', '.join(waiting)} (it goes on: odium launch "
              f"list; odium launch stop {v['id']})", file=sys.stderr)
        if where_logs(v):
            print(f"odium: {where_logs(v)}", file=sys.stderr)
        return 1
    if not args.json:
        print(f"launch {v['id']}: {v['count']} nodes ready: {', '.join(v['nodes'])}")
    return 0


def _list(args: argparse.Namespace) -> int:
    with connect(args) as admin:
        launches = admin.launches()
    if args.json:
        print(json.dumps(launches, indent=2))
        return 0
    if not launches:
        print("no launches")
        return 0
    rows = [("ID", "KIND", "STATUS", "READY", "WHERE", "OPENED", "")]
    for v in launches:
        rows.append((v["id"], v["kind"], v["status"], f"{v['ready']}/{v['count']}",
                     v["place"][:40], ago(v["created"]), v.get("launcher") or ""))
    print_table(rows)
    return 0


def _stop(args: argparse.Namespace) -> int:
    with connect(args) as admin:
        v = admin.launch_stop(args.launch_id)
    if args.json:
        print(json.dumps(v, indent=2))
        return 0
    print(f"launch {v['id']} stopped: its credential and {v['joined']} node key(s) revoked")
    for line in v["done"]:
        print(f"  {clean(line)}")
    return 1 if any("could not" in line for line in v["done"]) else 0
