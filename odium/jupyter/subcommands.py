"""The ``%odium`` sub-commands (``%odium nodes``, ``%odium local 4``, ...) and the hub the
magics keep: started at ``%load_ext odium``, stopped with ``%odium stop`` or at exit.

Each sub-command parses its arguments with ``magic_arguments`` (the types are those of the
``odium`` command, odium/cli/args.py), raises ``UsageError`` (one line) on bad input, and
calls the public ``odium.Hub`` API; what it returns (a ``Result``, a table) renders itself.
"""

from __future__ import annotations

import argparse
import atexit
import os
import secrets
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics
from IPython.core.magic_arguments import argument, magic_arguments

from ..api.hub import Hub
from ..cli import args as A
from ..cli.launchargs import LaunchHelp
from ..core.keys import fingerprint
from ..core.results import Result, short_state
from ..core.term import clean
from ..errors import NotConnectedError, OdiumError
from ..errors import TimeoutError as OdiumTimeout
from . import display as D

ENV_HOME = "ODIUM_HOME"  # read by odium itself: the hub's home directory
ENV_PORTS = "ODIUM_PORTS"  # "0" (any free ports) or PUB,QUERY,JOBS,RESULTS
ENV_INTERFACE = "ODIUM_INTERFACE"  # address to listen on (default 127.0.0.1)
ENV_HEARTBEAT = "ODIUM_HEARTBEAT"  # seconds between heartbeats (default 1)
ENV_APP = "ODIUM_APP"  # the application directory (default: the notebook's git work tree)

SUBCOMMANDS = ("local", "nodes", "token", "accept", "reject", "revoke", "keys", "state", "sync",
               "log", "forget", "launch", "push", "pull", "scatter", "gather", "start", "stop",
               "autorun", "help")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def state_report(hub: Hub, pattern: str | None) -> dict[str, Any]:
    """The hub's state and each node's differences from it (``Hub.state_report``)."""
    return dict(hub.state_report(pattern))


def hub_state_id(hub: Hub) -> str:
    """This hub's own state id."""
    return str(hub.state)



class HubMagics(Magics):
    """The hub of the magics: start, stop, and what every sub-command needs of it."""

    def __init__(self, shell: Any, session: str | None = None) -> None:
        super().__init__(shell)
        self.hub: Hub | None = None
        self.session = session or f"nb-{secrets.token_hex(4)}"
        self.start_error: str | None = None
        self._atexit = False


    @property
    def sh(self) -> Any:
        """The shell (typed loosely: IPython's own annotations allow None)."""
        assert self.shell is not None
        return self.shell

    @property
    def rich(self) -> bool:
        """Whether this shell is a kernel with display ids (else: terminal IPython)."""
        return getattr(self.shell, "kernel", None) is not None

    # --- hub lifecycle ----------------------------------------------------------------------

    def start_hub(self, home: str | None = None, ports: int | dict[str, int] | None = None,
                  interface: str | None = None, heartbeat: float | None = None,
                  app: str | None = None) -> Hub:
        """Start the hub; options default to the ODIUM_* environment variables."""
        if self.hub is not None and self.hub.rt is not None:
            raise UsageError(f"the hub is already running on {self.hub.address}; "
                             "%odium stop first to start it with other options")
        try:
            if ports is None and os.environ.get(ENV_PORTS):
                ports = A.ports(os.environ[ENV_PORTS])
            if heartbeat is None and os.environ.get(ENV_HEARTBEAT):
                heartbeat = A.seconds(os.environ[ENV_HEARTBEAT])
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"bad environment for odium: {e}") from None
        interface = interface or os.environ.get(ENV_INTERFACE) or "127.0.0.1"
        app = app or os.environ.get(ENV_APP) or None
        hub = Hub(home, ports=ports, interface=interface, hb_interval=heartbeat or 1.0, app=app)
        hub.session = self.session  # hub.run, apply, push ... see what %%odium cells see
        try:
            hub.start()
        except OdiumError as e:
            msg = _first_line(e)
            if "busy" in msg or "in use" in msg:
                msg = (f"{msg.split(';')[0]}: another hub (another notebook?) listens there. "
                       "Choose other ports with %odium start --ports 0 (free ones) or --ports "
                       "PUB,QUERY,JOBS,RESULTS, or set ODIUM_PORTS before %load_ext odium; a "
                       "second hub on this machine also needs its own --home")
            self.start_error = msg
            raise UsageError(msg) from None
        self.hub = hub
        self.start_error = None
        if not self._atexit:
            atexit.register(self.stop_hub)
            self._atexit = True
        return hub

    def hello(self) -> str:
        hub = self._need_hub()
        where = "" if hub.core.interface != "127.0.0.1" else " (this machine only)"
        return (f"odium hub {fingerprint(hub.key)} on {hub.address}{where}, state "
                f"{short_state(hub_state_id(hub))}; add nodes: %odium local 4, or %odium token "
                f"for another machine")

    def stop_hub(self) -> int:
        """Stop the hub and the local nodes it started; the number of local nodes stopped."""
        hub, self.hub = self.hub, None
        if hub is None:
            return 0
        n = sum(1 for ln in hub.local if ln.proc.poll() is None)
        hub.close()
        return n

    def _need_hub(self) -> Hub:
        hub = self.hub
        if hub is None or hub.rt is None:
            why = f" (it could not start: {self.start_error})" if self.start_error else ""
            raise UsageError(f"the hub is not running{why}; start it with %odium start "
                             "(options: %odium help start)")
        return hub

    def _usage(self, e: OdiumError, what: str) -> UsageError:
        """An Odium error as the one-line message the notebook shows."""
        msg = _first_line(e)
        if isinstance(e, NotConnectedError) and "none yet" in msg and self.hub is not None:
            msg = ("no node has joined this hub yet: start local ones with %odium local 4, or "
                   "run %odium token and start a node on another machine")
        return UsageError(f"{what}: {msg}")

    # --- parsing ----------------------------------------------------------------------------

    @staticmethod
    def _parse(fn: Callable[..., Any], line: str, prog: str) -> Any:
        """Split ``line`` as a shell would (quotes, spaces; like the ``odium`` command), then
        parse it with the magic's ``magic_arguments`` parser."""
        see = "%odium help cell" if prog == "%%odium" else f"%odium help {prog.split()[-1]}"
        try:
            argv = shlex.split(line)
        except ValueError as e:  # unbalanced quotes
            raise UsageError(f"{prog}: cannot split the arguments: {e}") from None
        try:
            return fn.parser.parse_args(argv)  # type: ignore[attr-defined]
        except UsageError as e:
            raise UsageError(f"{prog}: {e} (see: {see})") from None


class SubCommands(HubMagics):
    """``%odium SUB-COMMAND ...``: one ``sub_NAME`` method each, with its own parser; and the
    input transformer behind ``%odium autorun``."""

    def __init__(self, shell: Any, session: str | None = None) -> None:
        super().__init__(shell, session)
        self.autorun: str | None = None  # the %%odium line every cell gets while autorun is on
        self._in_local = False
        self._undo_formatters = D.register_formatters(shell)

        def transform(lines: list[str]) -> list[str]:
            return self._autorun_lines(lines)

        transform.has_side_effects = True  # type: ignore[attr-defined]  # not for is_complete
        self._transform = transform
        shell.input_transformers_cleanup.append(transform)


    def close(self) -> None:
        """Undo everything the extension did to the shell (``%unload_ext odium``)."""
        self.stop_hub()
        if self._atexit:
            atexit.unregister(self.stop_hub)
            self._atexit = False
        try:
            self.sh.input_transformers_cleanup.remove(self._transform)
        except ValueError:
            pass
        self._undo_formatters()
        magics = self.sh.magics_manager.magics
        for kind, name in (("line", "odium"), ("cell", "odium"), ("cell", "local")):
            magics[kind].pop(name, None)
        self.sh.magics_manager.registry.pop(type(self).__name__, None)


    @magic_arguments(name="odium local")
    @argument("n", type=A.how_many, help="how many local nodes to start")
    @argument("--prefix", type=A.short_name, default="local",
              help="their names: PREFIX-1, PREFIX-2…")
    @argument("--app", default=None, help="their application directory (default: the hub's)")
    @argument("--capacity", type=A.how_many, default=None, help="worker processes per node")
    @argument("--timeout", type=A.seconds, default=60.0, help="seconds to wait until ready")
    def sub_local(self, line: str) -> None:
        """Start N node processes on this machine, already trusted; they stop with the hub."""
        args = self._parse(self.sub_local, line, "%odium local")
        hub = self._need_hub()
        app = str(Path(args.app).expanduser()) if args.app else None
        if app is not None and not Path(app).is_dir():
            raise UsageError(f"%odium local: --app {args.app!r} is not a directory")
        t0 = time.perf_counter()
        try:
            started = hub.start_local(args.n, args.prefix, app=app, capacity=args.capacity,
                                      timeout=args.timeout)
        except OdiumTimeout as e:
            raise UsageError(f"%odium local: {_first_line(e)}; their logs are in "
                             f"{hub.home / 'local'}/NAME/node.log") from None
        except OdiumError as e:
            raise self._usage(e, "%odium local") from None
        names = ", ".join(n.name for n in started)
        print(f"{len(started)} local node{'s' if len(started) != 1 else ''} ready in "
              f"{time.perf_counter() - t0:.2f} s: {names}")

    @magic_arguments(name="odium nodes")
    @argument("pattern", nargs="?", type=A.glob, default=None, help="glob over node names")
    def sub_nodes(self, line: str) -> D.Table:
        """The hub's nodes: name, status, state id (same as the hub's, or what differs)."""
        args = self._parse(self.sub_nodes, line, "%odium nodes")
        hub = self._need_hub()
        try:
            nodes = hub.nodes(args.pattern)
            diffs: dict[str, str] = {}
            hub_state = hub_state_id(hub)
            try:
                report = state_report(hub, args.pattern)
                hub_state = str(report["hub"]["state"])
                diffs = {n: str(v.get("text") or "") for n, v in report["nodes"].items()}
            except (OdiumError, KeyError, TypeError, AttributeError):
                pass  # the table without the differences
        except OdiumError as e:
            raise self._usage(e, "%odium nodes") from None
        return D.nodes_table(nodes, hub_state, diffs)

    def sub_launch(self, line: str) -> Any:
        """Start nodes over SSH or through Slurm as one launch (the options of odium launch);
        list the launches; stop one."""
        from .launching import launch_magic

        return launch_magic(self._need_hub(), line, self.rich)

    sub_launch.parser = LaunchHelp()  # type: ignore[attr-defined]  # (for %odium help)

    @magic_arguments(name="odium token")
    @argument("--ttl", type=A.seconds, default=3600.0, help="seconds the token stays valid")
    def sub_token(self, line: str) -> None:
        """Print the command that joins another machine to this hub (single-use token)."""
        args = self._parse(self.sub_token, line, "%odium token")
        hub = self._need_hub()
        try:
            cmd = hub.join_command(args.ttl)
        except OdiumError as e:
            raise self._usage(e, "%odium token") from None
        print(f"on the other machine, run:\n\n    {cmd}\n")
        print(f"(single-use, valid {args.ttl:.0f} s; the node takes its host's name, or add "
              "--name NAME)")
        if hub.core.interface in ("127.0.0.1", "localhost", "::1"):
            print("note: this hub listens on 127.0.0.1 only, so other machines cannot reach it: "
                  "%odium stop, then %odium start --interface 0.0.0.0")

    def _key_action(self, action: str, line: str) -> list[str]:
        fn = getattr(self, f"sub_{action}")
        args = self._parse(fn, line, f"%odium {action}")
        hub = self._need_hub()
        try:
            keys = hub.key_action(action, args.pattern)
        except OdiumError as e:
            raise self._usage(e, f"%odium {action}") from None
        past = {"accept": "accepted", "reject": "rejected", "revoke": "revoked"}[action]
        print(f"{past} {len(keys)} key{'s' if len(keys) != 1 else ''}: "
              + ", ".join(clean(f"{k['role']} key {k['name'] or '-'} {k['fingerprint']}")
                          for k in keys))
        return [k["key"] for k in keys]

    @magic_arguments(name="odium accept")
    @argument("pattern", help="the key id a pending node printed, or a glob over node names")
    def sub_accept(self, line: str) -> list[str]:
        """Trust pending keys: their nodes may join."""
        return self._key_action("accept", line)

    @magic_arguments(name="odium reject")
    @argument("pattern", help="a pending key id, or a glob over node names")
    def sub_reject(self, line: str) -> list[str]:
        """Refuse pending keys."""
        return self._key_action("reject", line)

    @magic_arguments(name="odium revoke")
    @argument("pattern", help="a key id, or a glob over node names")
    def sub_revoke(self, line: str) -> list[str]:
        """Stop trusting keys; their nodes are cut off at once."""
        return self._key_action("revoke", line)

    @magic_arguments(name="odium forget")
    @argument("pattern", type=A.glob, help="a node name, glob or comma list")
    def sub_forget(self, line: str) -> list[str]:
        """Remove nodes that are not connected (with their keys): * targets them no more."""
        args = self._parse(self.sub_forget, line, "%odium forget")
        hub = self._need_hub()
        try:
            gone = hub.forget(args.pattern)
        except OdiumError as e:
            raise self._usage(e, "%odium forget") from None
        print(f"forgot {len(gone)} node{'s' if len(gone) != 1 else ''}: {', '.join(gone)}")
        return gone

    @magic_arguments(name="odium keys")
    def sub_keys(self, line: str) -> D.Table:
        """The keys this hub knows: admin, nodes, pending, rejected, revoked."""
        self._parse(self.sub_keys, line, "%odium keys")
        hub = self._need_hub()
        try:
            return D.keys_table(hub.keys())
        except OdiumError as e:
            raise self._usage(e, "%odium keys") from None

    @magic_arguments(name="odium state")
    @argument("action", nargs="?", choices=["show", "diff"], default="show",
              help="show: one line per node; diff: every difference")
    @argument("--nodes", type=A.glob, default=None, help="glob over node names")
    def sub_state(self, line: str) -> D.Table:
        """This hub's state and how each node's differs from it, part by part."""
        args = self._parse(self.sub_state, line, "%odium state")
        hub = self._need_hub()
        try:
            report = state_report(hub, args.nodes)
        except OdiumError as e:
            raise self._usage(e, "%odium state") from None
        return D.state_table(report, details=args.action == "diff")

    @magic_arguments(name="odium sync")
    @argument("pattern", nargs="?", type=A.glob, default="*", help="glob over node names")
    @argument("--timeout", type=A.seconds, default=300.0, help="seconds")
    def sub_sync(self, line: str) -> Result:
        """Bring the matching nodes to this hub's commit (git bundle; no internet needed)."""
        args = self._parse(self.sub_sync, line, "%odium sync")
        hub = self._need_hub()
        try:
            return hub.sync(args.pattern, timeout=args.timeout)
        except OdiumError as e:
            raise self._usage(e, "%odium sync") from None

    @magic_arguments(name="odium log")
    @argument("-n", type=A.how_many, default=30, help="how many events")
    def sub_log(self, line: str) -> D.Table:
        """The hub's recent events: joins, commands, rejected messages."""
        args = self._parse(self.sub_log, line, "%odium log")
        hub = self._need_hub()
        try:
            return D.log_table(hub.log(args.n))
        except OdiumError as e:
            raise self._usage(e, "%odium log") from None

    @magic_arguments(name="odium start")
    @argument("--ports", type=A.ports, default=None,
              help="0 (free ports) or PUB,QUERY,JOBS,RESULTS (default 18202,18203,18220,18221, "
              "or $ODIUM_PORTS)")
    @argument("--home", default=None, help="the hub's home (default $ODIUM_HOME or ~/.odium)")
    @argument("--interface", default=None,
              help="address to listen on (default 127.0.0.1; 0.0.0.0 for other machines)")
    @argument("--heartbeat", type=A.seconds, default=None, help="seconds between heartbeats")
    @argument("--app", default=None, help="application directory (default: the notebook's)")
    def sub_start(self, line: str) -> None:
        """Start the hub (after %odium stop, or when %load_ext could not)."""
        args = self._parse(self.sub_start, line, "%odium start")
        self.start_hub(args.home, args.ports, args.interface, args.heartbeat, args.app)
        print(self.hello())

    @magic_arguments(name="odium stop")
    def sub_stop(self, line: str) -> None:
        """Stop the hub and the local nodes it started (%odium start starts it again)."""
        self._parse(self.sub_stop, line, "%odium stop")
        if self.hub is None:
            print("the hub is not running")
            return
        n = self.stop_hub()
        print(f"hub stopped, and {n} local node{'s' if n != 1 else ''}")

    @magic_arguments(name="odium autorun")
    @argument("action", choices=["on", "off"])
    @argument("--nodes", type=A.glob, default=None, help="glob or comma list of node names")
    @argument("--shell", action="store_true", help="run each cell as a shell command")
    @argument("--timeout", type=A.seconds, default=None, help="seconds per cell")
    @argument("--require-state", dest="require", type=A.requirement, default=None,
              metavar="any|match|ID", help="the state nodes must be in")
    def sub_autorun(self, line: str) -> None:
        """Run every following cell on nodes, until %odium autorun off (%%local: here)."""
        args = self._parse(self.sub_autorun, line, "%odium autorun")
        if args.action == "off":
            was, self.autorun = self.autorun, None
            print("autorun off: cells run in the kernel again" if was else "autorun was off")
            return
        self._need_hub()
        parts = ["%%odium"]
        if args.nodes:
            parts += ["--nodes", shlex.quote(args.nodes)]
        if args.shell:
            parts.append("--shell")
        if args.timeout:
            parts += ["--timeout", repr(args.timeout)]
        if args.require:
            parts += ["--require-state", args.require]
        self.autorun = " ".join(parts)
        print(f"autorun on: every cell now runs on nodes {args.nodes or '*'!r} "
              f"(cells that start with % run here; %%local runs a cell here; "
              f"%odium autorun off stops it)")

    def _autorun_lines(self, lines: list[str]) -> list[str]:
        """The input transformer behind autorun: prefix the cell with its %%odium line.

        A ``%%local`` cell loses that line here, so it runs as an ordinary cell of the
        kernel (its value is the cell's, ``_`` and ``Out`` as usual).
        """
        if self._in_local:
            return lines
        at = next((i for i, ln in enumerate(lines) if ln.strip()), None)
        if at is None:
            return lines
        first = lines[at].strip()
        if first == "%%local":
            return lines[at + 1:]
        if self.autorun is None or first.startswith("%"):
            return lines
        return [self.autorun + "\n", *lines]
