"""``%odium push|pull|scatter|gather``: the notebook's variables to the nodes' namespace (the
one ``%%odium`` cells run in) and back (odium.api.data)."""

from __future__ import annotations

from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument, magic_arguments

from ..cli import args as A
from ..errors import OdiumError
from .subcommands import SubCommands


class DataCommands(SubCommands):
    """The data sub-commands (on top of the others)."""

    def _kernel_value(self, name: str, what: str) -> Any:
        if not name.isidentifier():
            raise UsageError(f"{what}: {name!r} is not a variable name")
        if name not in self.sh.user_ns:
            raise UsageError(f"{what}: no variable {name!r} here, in the notebook")
        return self.sh.user_ns[name]

    @magic_arguments(name="odium push")
    @argument("names", nargs="+", help="the notebook's variables to give the nodes")
    @argument("--nodes", type=A.glob, default="*", help="glob or comma list of node names")
    def sub_push(self, line: str) -> None:
        """Give the matching nodes these variables of the notebook, by the same names."""
        args = self._parse(self.sub_push, line, "%odium push")
        hub = self._need_hub()
        values = {n: self._kernel_value(n, "%odium push") for n in args.names}
        try:
            r = hub.push(values, nodes=args.nodes)
        except OdiumError as e:
            raise self._usage(e, "%odium push") from None
        bad = {n: e.status.value for n, e in r.items() if not e.ok}
        print(f"pushed {', '.join(args.names)} to {len(r) - len(bad)} of {len(r)} nodes"
              + (f"; not to: {', '.join(f'{n} ({s})' for n, s in bad.items())}" if bad else ""))

    @magic_arguments(name="odium pull")
    @argument("name", help="the variable to take from the nodes")
    @argument("--nodes", type=A.glob, default="*", help="glob or comma list of node names")
    @argument("-o", dest="out", type=A.identifier, default=None, metavar="VAR",
              help="also keep {node: value} in this notebook variable")
    def sub_pull(self, line: str) -> dict[str, Any]:
        """Each matching node's value of a variable: {node: value}."""
        args = self._parse(self.sub_pull, line, "%odium pull")
        hub = self._need_hub()
        try:
            got = hub.pull(args.name, nodes=args.nodes)
        except OdiumError as e:
            raise self._usage(e, "%odium pull") from None
        if args.out:
            self.sh.user_ns[args.out] = got
        return got

    @magic_arguments(name="odium scatter")
    @argument("name", help="the notebook's sequence (list, array) to split over the nodes")
    @argument("--nodes", type=A.glob, default="*", help="glob or comma list of node names")
    def sub_scatter(self, line: str) -> dict[str, tuple[int, int]]:
        """Split a sequence over the ready matching nodes in name order, each its part by
        the same name: which part each got."""
        args = self._parse(self.sub_scatter, line, "%odium scatter")
        hub = self._need_hub()
        seq = self._kernel_value(args.name, "%odium scatter")
        try:
            return hub.scatter(args.name, seq, nodes=args.nodes)
        except OdiumError as e:
            raise self._usage(e, "%odium scatter") from None

    @magic_arguments(name="odium gather")
    @argument("name", help="the variable to join from the nodes' parts")
    @argument("--nodes", type=A.glob, default="*", help="glob or comma list of node names")
    @argument("-o", dest="out", type=A.identifier, default=None, metavar="VAR",
              help="keep the joined value in this notebook variable (default: the name)")
    def sub_gather(self, line: str) -> Any:
        """The nodes' parts of a variable joined in one, in the scatter's order; kept in the
        notebook by that name (or -o VAR)."""
        args = self._parse(self.sub_gather, line, "%odium gather")
        hub = self._need_hub()
        try:
            value = hub.gather(args.name, nodes=args.nodes)
        except OdiumError as e:
            raise self._usage(e, "%odium gather") from None
        self.sh.user_ns[args.out or args.name] = value
        return value


__all__ = ["DataCommands"]
