"""``odium``: the command's entry point (``main``) and its table of commands."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from ..core.term import clean
from ..errors import OdiumError
from . import commands as C
from . import jobcmds as J
from . import serve as S
from .kernel import cmd_kernel
from .parser import build_parser, parse

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "hub": S.cmd_hub, "node": S.cmd_node, "nodes": C.cmd_nodes, "run": C.cmd_run,
    "keys": C.cmd_keys, "token": C.cmd_token, "state": C.cmd_state, "log": C.cmd_log,
    "demo": C.cmd_demo, "kernel": cmd_kernel, "submit": J.cmd_submit, "jobs": J.cmd_jobs,
    "job": J.cmd_job}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse(parser, sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(COMMANDS[args.command](args) or 0)
    except OdiumError as e:
        first = str(e).split("\n")[0] if str(e) else type(e).__name__
        print(f"odium: {clean(first)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("odium: interrupted", file=sys.stderr)
        return 130
