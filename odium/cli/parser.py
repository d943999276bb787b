"""The ``odium`` command's argument parser: one function per group of commands.

The argument types are odium/cli/args.py's (the magics use the same ones).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any, NoReturn

from . import args as A
from .kernel import add_kernel_parser
from .launchargs import add_launch_parsers

JOB_STATUSES = ["queued", "assigned", "running", "done", "failed", "timeout", "cancelled"]


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # "--node" is an error, never "--nodes"
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"odium: error: {message} (see: {self.prog} --help)\n")


def _home(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--home", default=None,
                    help="instance home directory (default $ODIUM_HOME or ~/.odium)")


def build_parser() -> argparse.ArgumentParser:
    from ..version import __version__

    p = _Parser(prog="odium", description="Run Python on many machines; know what ran where.")
    p.add_argument("--version", action="version", version=f"odium {__version__}")
    p.add_argument("--log-level", default=os.environ.get("ODIUM_LOG", "warning"),
                   choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    add_serve_parsers(sub)
    add_node_parsers(sub)
    add_key_parsers(sub)
    add_job_parsers(sub)
    add_launch_parsers(sub, _Parser)
    sp = sub.add_parser("demo", help="hub + 3 local nodes, a Python and a shell broadcast")
    sp.add_argument("--nodes", type=A.count, default=3)
    add_kernel_parser(sub)
    return p


def add_serve_parsers(sub: Any) -> None:
    """``odium hub`` and ``odium node``: the processes that run in the foreground."""
    sp = sub.add_parser("hub", help="run a hub in the foreground")
    _home(sp)
    _hub_options(sp)
    sp.add_argument("--app", default=None, help="application directory (default: cwd)")

    sp = sub.add_parser("node", help="run a node in the foreground, joined to a hub")
    _home(sp)
    sp.add_argument("--join", metavar="tcp://HOST:PORT", help="the hub's query address")
    sp.add_argument("--token", help="join token from: odium token (visible to every local "
                    "user in ps while the node runs: prefer --token-file or $ODIUM_TOKEN)")
    sp.add_argument("--token-file", metavar="PATH",
                    help="read the join token from this file (yours, mode 0600; left in place)")
    sp.add_argument("--hub-key", help="the hub's public key (join as pending, without a token)")
    sp.add_argument("--name", help="node name (default: this host's name)")
    sp.add_argument("--app", default=None, help="application directory (default: cwd)")
    sp.add_argument("--capacity", type=A.count, default=None, help="worker processes")
    sp.add_argument("--find-links", default=None,
                    help="where a sync installs declared packages from (a directory of wheels)")
    sp.add_argument("--index-url", default=None, help="package index a sync installs from")
    sp.add_argument("--serve", action="store_true",
                    help="be a hub to nodes of its own too (its own ports and store, in this "
                    "home; invite them with: odium token --home THIS_HOME)")
    _hub_options(sp, "with --serve: ")


def _hub_options(sp: argparse.ArgumentParser, when: str = "") -> None:
    """How a hub listens: ``odium hub``'s options, and ``odium node --serve``'s."""
    sp.add_argument("--interface", default="127.0.0.1", help=f"{when}address to listen on")
    sp.add_argument("--ports", type=A.ports, default=None, help=f"{when}PUB,QUERY,JOBS,RESULTS "
                    "ports (default 18202,18203,18220,18221; 0 = any)")
    sp.add_argument("--db", default=None,
                    help=f"{when}SQLAlchemy URL (default: SQLite in the home)")
    sp.add_argument("--heartbeat", type=A.positive, default=1.0,
                    help=f"{when}seconds between beats")
    sp.add_argument("--wheelhouse", default=None,
                    help=f"{when}directory of wheels sent to nodes that sync (no index needed)")


def add_node_parsers(sub: Any) -> None:
    """``odium nodes``, ``odium run``, ``odium state``: the nodes and what runs on them."""
    sp = sub.add_parser("nodes", help="list the hub's nodes; nodes forget NAME|GLOB: remove "
                        "ones that are not connected")
    _home(sp)
    sp.add_argument("pattern", nargs="?", default=None,
                    help="the nodes to list (glob or comma list), or: forget")
    sp.add_argument("forget", nargs="?", default=None, metavar="NAME|GLOB",
                    help="after forget: the nodes to forget, with their keys")
    sp.set_defaults(_late_positionals=("pattern", "forget"))
    sp.add_argument("--json", action="store_true")

    sp = sub.add_parser("run", help="run code on nodes and print each node's result")
    _home(sp)
    sp.add_argument("--nodes", default="*", help="glob or comma list of node names")
    sp.add_argument("--shell", action="store_true", help="run as a shell command")
    sp.add_argument("--timeout", type=A.positive, default=None, help="seconds")
    sp.add_argument("--session", default=None, help="keep a namespace across runs by name")
    sp.add_argument("--require-state", default=None, metavar="any|match|ID",
                    type=A.requirement, help="the state nodes must be in (default: match when "
                    "the hub's application is a clean commit, else any)")
    sp.add_argument("--json", action="store_true")
    view = sp.add_mutually_exclusive_group()
    view.add_argument("--group", dest="group", action="store_const", const=True, default=None,
                      help="one entry per answer, with its nodes (default above 8 nodes)")
    view.add_argument("--no-group", dest="group", action="store_const", const=False,
                      help="one entry per node, however many")
    sp.add_argument("-c", dest="code", default=None, help="the code")
    sp.add_argument("file", nargs="?", default=None, help="a file with the code, or - for stdin")
    sp.set_defaults(_late_positionals=("file",))

    sp = sub.add_parser("state", help="state ids, fingerprints, diffs and sync")
    _home(sp)
    sp.add_argument("action", nargs="?", default="show", choices=["show", "diff", "sync"],
                    help="show: this instance's state; diff: every node against the hub; "
                    "sync: bring nodes to the hub's commit")
    sp.add_argument("--nodes", default=None, help="glob or comma list of node names")
    sp.add_argument("--app", default=None, help="application directory (show; default: cwd)")
    sp.add_argument("--timeout", type=A.positive, default=300.0, help="seconds (sync)")
    sp.add_argument("--json", action="store_true")


def add_key_parsers(sub: Any) -> None:
    """``odium keys``, ``odium token``, ``odium log``: trust, joining, and what happened."""
    sp = sub.add_parser("keys", help="this instance's key; the hub's trusted keys")
    _home(sp)
    sp.add_argument("action", choices=["show", "list", "accept", "reject", "revoke"])
    sp.add_argument("pattern", nargs="?",
                    help="key id or fingerprint (any role), or node name or glob (node keys)")
    sp.set_defaults(_late_positionals=("pattern",))
    sp.add_argument("--role", choices=["node", "admin"], default=None,
                    help="the role of the keys a name or glob chooses (default: node)")
    sp.add_argument("--json", action="store_true")

    sp = sub.add_parser("token", help="issue a single-use join token")
    _home(sp)
    sp.add_argument("--ttl", type=A.positive, default=3600.0, help="seconds it stays valid")
    sp.add_argument("--file", metavar="PATH", default=None,
                    help="write the token to this new 0600 file instead of printing it")
    sp.add_argument("--name", type=A.node_name, default=None,
                    help="the name the node takes (in the command printed; default: its host "
                    "name)")

    sp = sub.add_parser("log", help="recent events of the hub")
    _home(sp)
    sp.add_argument("-n", type=A.count, default=30, help="how many")
    sp.add_argument("--json", action="store_true")


def add_job_parsers(sub: Any) -> None:
    """``odium submit``, ``odium jobs [--status S]``, ``odium jobs cancel ID``, ``odium job ID``."""
    sp = sub.add_parser("submit", help="queue a job: it runs once, on one node with a free slot")
    _home(sp)
    sp.add_argument("--nodes", default="*", help="glob or comma list of node names it may run on")
    sp.add_argument("--retries", type=A.retries, default=0,
                    help="run again after an error or a lost node, up to N times")
    sp.add_argument("--timeout", type=A.positive, default=None, help="seconds one run may take")
    sp.add_argument("--require-state", default=None, metavar="any|match|ID", type=A.requirement,
                    help="the state its node must be in (default as for run)")
    sp.add_argument("--id", dest="job_id", type=A.job_id, default=None,
                    help="your own job id (submitting it again gives the same job)")
    sp.add_argument("--wait", type=A.non_negative, default=None, metavar="SECONDS",
                    help="wait for the job and print its result")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("-c", dest="code", default=None, help="the code")
    sp.add_argument("file", nargs="?", default=None, help="a file with the code, or - for stdin")
    sp.set_defaults(_late_positionals=("file",))

    sp = sub.add_parser("jobs", help="list queued and recent jobs; jobs cancel ID")
    _home(sp)
    sp.add_argument("action", nargs="?", default=None, choices=["list", "cancel"])
    sp.add_argument("job_ids", nargs="*", type=A.job_id, default=[], metavar="ID")
    sp.add_argument("--status", choices=JOB_STATUSES, default=None)
    sp.add_argument("-n", type=A.count, default=30, help="how many")
    sp.add_argument("--follow", "-f", action="store_true",
                    help="then keep showing how many of them have finished, until all have "
                    "(or Ctrl-C): in place on a terminal, a line per change otherwise")
    sp.add_argument("--json", action="store_true")

    sp = sub.add_parser("job", help="one job: status, result, every move it made")
    _home(sp)
    sp.add_argument("job_id", nargs="?", default=None, type=A.job_id, metavar="ID")
    sp.set_defaults(_late_positionals=("job_id",))
    sp.add_argument("--wait", type=A.non_negative, default=0.0, metavar="SECONDS",
                    help="wait for it to finish first")
    sp.add_argument("--json", action="store_true")


def key_words(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split off the words argparse would take for options though they are values: all after
    a "--", and a whole key id that begins with "-" (base64url has "-"; ``-h…`` would even ask
    for help). Only for a ``keys`` command; anything else is parsed as given."""
    words = list(argv)
    try:
        at = words.index("keys")
    except ValueError:
        return words, []
    head, tail = words[: at + 1], []
    rest = words[at + 1 :]
    if "--" in rest:
        cut = rest.index("--")
        rest, tail = rest[:cut], rest[cut + 1 :]
    for w in rest:
        (tail if w.startswith("-") and A.is_key_id(w) else head).append(w)
    return head, tail


KEY_OPTIONS = ("--hub-key",)  # options whose value is a key id: it may begin with "-"


def glue_keys(argv: Sequence[str]) -> list[str]:
    """``--hub-key KEY`` as ``--hub-key=KEY``: a key id is base64url, one in 64 begins with
    "-", and argparse would take it for an option."""
    out: list[str] = []
    words = iter(argv)
    for w in words:
        value = next(words, None) if w in KEY_OPTIONS else None
        out.append(w if value is None else f"{w}={value}")
    return out


def parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """The arguments of one command line (argparse's errors exit with status 2)."""
    argv = glue_keys(argv)
    words, values = key_words(argv)
    args, extra = parser.parse_known_args(words)
    if values and args.command != "keys":  # "keys" was some other word: parse as given
        args, extra = parser.parse_known_args(argv)
        values = []
    # argparse fills optional positionals before it sees options ("keys accept --home H KEY"):
    # give words it left over to the positionals that are still empty, in order
    extra = [w for w in extra if not w.startswith("-")] + values + \
        [w for w in extra if w.startswith("-")]
    for dest in getattr(args, "_late_positionals", ()):
        if extra and (not extra[0].startswith("-") or extra[0] in values) \
                and getattr(args, dest) is None:
            setattr(args, dest, extra.pop(0))
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args
