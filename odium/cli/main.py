"""``odium``: the command's entry point (``main``) and its table of commands."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from ..core.term import clean
from ..errors import OdiumError
from .parser import build_parser, parse

# command -> the module (of odium.cli) that runs it, imported for that command only: a node
# process loads neither the admin's commands nor the job queue's
COMMANDS: dict[str, str] = {
    "hub": "serve", "node": "serve", "nodes": "commands", "run": "commands",
    "keys": "commands", "token": "commands", "state": "commands", "log": "commands",
    "demo": "commands", "kernel": "kernel", "submit": "jobcmds", "jobs": "jobcmds",
    "job": "jobcmds", "launch": "launchcmds"}


def command(name: str) -> Callable[[argparse.Namespace], int]:
    """The function that runs ``odium NAME``: ``cmd_NAME`` of its module."""
    module = importlib.import_module(f"{__package__}.{COMMANDS[name]}")
    fn: Callable[[argparse.Namespace], int] = getattr(module, f"cmd_{name}")
    return fn


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse(parser, sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(command(args.command)(args) or 0)
    except OdiumError as e:
        first = str(e).split("\n")[0] if str(e) else type(e).__name__
        print(f"odium: {clean(first)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("odium: interrupted", file=sys.stderr)
        return 130
