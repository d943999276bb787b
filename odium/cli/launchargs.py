"""The options of ``odium launch ssh|slurm|list|stop``, which ``%odium launch`` takes too
(odium.cli.parser for the command, odium.jupyter.launching for the magic)."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from ..errors import ConfigError
from . import args as A


class _Raising(argparse.ArgumentParser):
    """A parser whose errors raise ConfigError (the magics' parsers: no exit)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see: %odium help launch)")


def launch_parser() -> argparse.ArgumentParser:
    """``launch ...`` alone, for ``%odium launch``: the same options as ``odium launch``."""
    p = _Raising(prog="%odium", add_help=False)
    add_launch_parsers(p.add_subparsers(dest="command", parser_class=_Raising), _Raising)
    return p


class LaunchHelp:
    """What ``%odium help launch`` shows: each action's options."""

    def format_help(self) -> str:
        p = launch_parser()
        launch = _choices(p)["launch"]
        parts = [launch.format_help()]
        parts += [sp.format_help() for sp in _choices(launch).values()]
        return "\n".join(parts)


def _choices(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in p._actions:  # (argparse keeps its subparsers there, and nowhere public)
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def add_launch_parsers(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """``odium launch ssh|slurm|manual|list|stop``: nodes started elsewhere, as one launch."""
    sp = sub.add_parser("launch", help="start nodes over SSH or through Slurm; list, stop")
    lsub = sp.add_subparsers(dest="action", metavar="ACTION", parser_class=parser_class)
    _ssh(lsub.add_parser("ssh", help="start nodes on these hosts over ssh"))
    _slurm(lsub.add_parser("slurm", help="start nodes as one Slurm batch job (sbatch)"))
    lp = lsub.add_parser("manual", help="a credential for N nodes you start yourself, and "
                         "the command each runs")
    _common(lp)
    lp.add_argument("--count", type=A.count, default=1, help="how many nodes")
    lp.add_argument("--file", metavar="PATH", default=None,
                    help="write the credential to this new 0600 file (else: in the commands)")
    lp = lsub.add_parser("list", help="the launches and their nodes")
    _home(lp)
    lp.add_argument("--json", action="store_true")
    lp = lsub.add_parser("stop", help="stop a launch: its credential, nodes and batch job")
    _home(lp)
    lp.add_argument("launch_id", metavar="ID")
    lp.add_argument("--json", action="store_true")


def _home(lp: argparse.ArgumentParser) -> None:
    lp.add_argument("--home", default=None, help="the hub's home directory (default "
                    "$ODIUM_HOME or ~/.odium)")


def _common(lp: argparse.ArgumentParser) -> None:
    """What every way of starting a launch takes."""
    _home(lp)
    lp.add_argument("--name", default=None, help="the launch's name (its nodes are "
                    "NAME-1, NAME-2, ...; default: made up)")
    lp.add_argument("--ttl", type=A.positive, default=None,
                    help="seconds the credential admits nodes (default: until stopped)")
    lp.add_argument("--dry-run", action="store_true",
                    help="print exactly what would run, and run nothing")
    lp.add_argument("--json", action="store_true")


def _started(lp: argparse.ArgumentParser) -> None:
    """What the launches Odium starts itself take (ssh, slurm)."""
    _common(lp)
    lp.add_argument("--python", default="python3", help="the Python with Odium there")
    lp.add_argument("--app", default=None, help="the application directory there")
    lp.add_argument("--wait", type=A.non_negative, default=120.0, metavar="SECONDS",
                    help="how long to wait for the nodes to be ready")


def _ssh(lp: argparse.ArgumentParser) -> None:
    _started(lp)
    lp.add_argument("hosts", nargs="+", metavar="HOST", help="as ssh knows them")
    lp.add_argument("--per-host", type=A.how_many, default=1, help="nodes on each host")
    lp.add_argument("--ssh-config", metavar="FILE", default=None,
                    help="ssh config file (ssh -F; default: your own)")
    lp.add_argument("-o", dest="ssh_options", action="append", default=[],
                    metavar="OPTION", help="an ssh -o option, for every host")
    lp.add_argument("--remote-dir", default="$HOME/.odium/launches",
                    help="where on each host the nodes keep their homes and logs")
    lp.add_argument("--bootstrap", action="store_true",
                    help="install this machine's Odium on each host first, from wheels "
                    "sent over ssh (no internet, no install needed there)")
    lp.add_argument("--wheelhouse", metavar="DIR", default=None,
                    help="with --bootstrap: these wheels (pip wheel -w DIR odium pip), "
                    "not ones gathered by pip wheel")


def _slurm(lp: argparse.ArgumentParser) -> None:
    _started(lp)
    lp.add_argument("--nodes", type=A.count, default=1, help="machines")
    lp.add_argument("--tasks-per-node", type=A.how_many, default=1,
                    help="Odium nodes on each machine")
    lp.add_argument("--partition", default=None)
    lp.add_argument("--time", default=None, help="time limit, as Slurm writes it")
    lp.add_argument("--account", default=None)
    lp.add_argument("sbatch_args", nargs="*", metavar="-- SBATCH-ARG",
                    help="after --: more arguments for sbatch, as given")


__all__ = ["LaunchHelp", "add_launch_parsers", "launch_parser"]
