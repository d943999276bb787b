"""The ``%odium`` line magic and the ``%%odium`` / ``%%local`` cell magics.

Thin by design: each sub-command parses its arguments with ``magic_arguments``, raises
``UsageError`` (one line) on bad input, and calls the public ``odium.Hub`` API; what it
returns (a ``Result``, a table) is data that renders itself. Nothing here that a script
could not do with ``odium.Hub``.
"""

from __future__ import annotations

import argparse
import atexit
import os
import re
import secrets
import shlex
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from ..api.hub import BroadcastHandle, Hub
from ..cli.commands import _requirement
from ..core.keys import fingerprint
from ..core.results import NodeResult, Result, short_state
from ..core.term import clean, clean_lines
from ..errors import NotConnectedError, OdiumError
from ..errors import TimeoutError as OdiumTimeout
from . import display as D

ENV_HOME = "ODIUM_HOME"  # read by odium itself: the hub's home directory
ENV_PORTS = "ODIUM_PORTS"  # "0" (any free ports) or PUB,QUERY,JOBS,RESULTS
ENV_INTERFACE = "ODIUM_INTERFACE"  # address to listen on (default 127.0.0.1)
ENV_HEARTBEAT = "ODIUM_HEARTBEAT"  # seconds between heartbeats (default 1)
ENV_APP = "ODIUM_APP"  # the application directory (default: the notebook's git work tree)

PORT_NAMES = ("pub", "query", "jobs", "results")
POLL = 0.1  # seconds between two looks at a running command's progress
LIVE_AFTER = 0.3  # a command that takes longer than this gets a live display
INTERRUPT_GRACE = 10.0  # seconds the nodes get to answer an interrupt
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,40}\Z")

# --- argument types: each raises ArgumentTypeError with what was expected --------------------


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, not {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return v


def _count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if not 1 <= v <= 256:
        raise argparse.ArgumentTypeError(f"must be 1 to 256, not {text}")
    return v


def _identifier(text: str) -> str:
    if not text.isidentifier():
        raise argparse.ArgumentTypeError(f"expected a Python variable name, not {text!r}")
    return text


def _name(text: str) -> str:
    if not _NAME.match(text):
        raise argparse.ArgumentTypeError(
            f"expected letters, digits, '.', '_' or '-' (at most 41), not {text!r}")
    return text


def _glob(text: str) -> str:
    if not text.strip() or not re.fullmatch(r"[A-Za-z0-9._*?\[\]!,-]+", text):
        raise argparse.ArgumentTypeError(
            f"expected a glob or comma list of node names (e.g. 'gpu*' or 'a,b'), not {text!r}")
    return text


def parse_ports(text: str) -> int | dict[str, int]:
    """``0`` (every port chosen by the OS) or four ports ``PUB,QUERY,JOBS,RESULTS``."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if nums == [0]:
        return 0
    if len(nums) != 4 or any(not 0 <= n <= 65535 for n in nums):
        raise argparse.ArgumentTypeError(
            f"expected 0 (free ports) or PUB,QUERY,JOBS,RESULTS such as "
            f"18202,18203,18220,18221, not {text!r}")
    return dict(zip(PORT_NAMES, nums, strict=True))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# --- progress of a running command ----------------------------------------------------------


def progress(hub: Hub, handle: BroadcastHandle) -> tuple[list[str], list[str],
                                                         dict[str, NodeResult]]:
    """(nodes done, nodes targeted, their entries so far) of a running command.

    Uses ``handle.targets`` / ``handle.partial`` when the Hub API offers them; until then it
    takes a read-only copy of the hub's table of running broadcasts.
    """
    partial = getattr(handle, "partial", None)
    targets = getattr(handle, "targets", None)
    if partial is not None and targets is not None:
        entries = dict(partial)
        return list(entries), list(targets), entries
    core = hub._core
    b = core.broadcasts.get(handle.cmd) if core is not None else None
    if b is None:
        return [], [], {}
    entries = dict(b.results)
    return list(entries), list(b.targets), entries


def state_report(hub: Hub, pattern: str | None) -> dict[str, Any]:
    """The hub's state and each node's differences from it (``Hub.state_report``)."""
    return dict(hub.state_report(pattern))


def hub_state_id(hub: Hub) -> str:
    """This hub's own state id."""
    return str(hub.state)


# --- a command running in the background ------------------------------------------------------


class BackgroundRun:
    """What ``%%odium --bg`` returns: the command runs on; its display updates itself.

    ``ready()``, ``wait(timeout)`` (Ctrl-C interrupts the nodes), ``result()``,
    ``interrupt()``; ``cmd`` is the command id.
    """

    def __init__(self, hub: Hub, handle: BroadcastHandle, live: D.LiveView | None) -> None:
        self.hub = hub
        self.handle = handle
        self.cmd = handle.cmd
        self.live = live
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._shown = False  # whether it was displayed once (as the cell's value)
        if live is not None:
            live.refresh(*progress(hub, handle)[:2], force=True)
            self._thread = threading.Thread(target=self._watch, daemon=True,
                                            name=f"odium-bg-{self.cmd[:8]}")
            self._thread.start()

    def ready(self) -> bool:
        return self.handle.ready()

    def wait(self, timeout: float | None = None) -> Result:
        return self.handle.wait(timeout)

    def result(self, timeout: float | None = None) -> Result:
        """The Result, waiting for it if the command still runs."""
        return self.handle.wait(timeout)

    def interrupt(self) -> bool:
        return self.hub.interrupt(self.cmd)

    def _watch(self) -> None:
        live = self.live
        assert live is not None
        try:
            while not self.handle.ready():
                if self.hub.rt is None:  # the hub stopped under us
                    return
                try:
                    self.handle.wait(POLL * 2)
                except OdiumTimeout:
                    done, targets, finals = progress(self.hub, self.handle)
                    live.refresh(done, targets, finals=finals)
            live.replace(D.result_bundle(self.handle.wait(1.0)))
        except BaseException as e:  # noqa: BLE001 - kept for the user; a thread must not die loud
            self.error = e

    def __repr__(self) -> str:
        if self.handle.ready():
            return f"<odium background command {self.cmd[:12]}: done; .result() has it>"
        done, targets, _ = progress(self.hub, self.handle)
        return (f"<odium background command {self.cmd[:12]}: {len(done)} of {len(targets)} nodes "
                f"done; .result() waits for it, .interrupt() stops it>")

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))

    def _ipython_display_(self) -> None:
        """As the cell's value, the handle adds nothing to its live display, which turns into
        the Result when it is there (a saved notebook shows that, not a stale "0 of n nodes
        done"); shown again later, it is the Result, or where the command is now."""
        from IPython.display import display

        if self.live is not None and not self._shown:
            self._shown = True
            return
        if self.handle.ready():
            display(self.handle.wait(1.0))
        else:
            display({"text/plain": repr(self)}, raw=True)


# --- the magics ---------------------------------------------------------------------------------

SUBCOMMANDS = ("local", "nodes", "token", "accept", "reject", "revoke", "keys", "state", "sync",
               "log", "forget", "start", "stop", "autorun", "help")


@magics_class
class OdiumMagics(Magics):
    """``%odium`` (hub, nodes, keys, state), ``%%odium`` (run a cell on nodes), ``%%local``."""

    def __init__(self, shell: Any, session: str | None = None) -> None:
        super().__init__(shell)
        self.hub: Hub | None = None
        self.session = session or f"nb-{secrets.token_hex(4)}"
        self.start_error: str | None = None
        self.autorun: str | None = None  # the %%odium line every cell gets while autorun is on
        self._in_local = False
        self._atexit = False
        self._undo_formatters = D.register_formatters(shell)

        def transform(lines: list[str]) -> list[str]:
            return self._autorun_lines(lines)

        transform.has_side_effects = True  # type: ignore[attr-defined]  # not for is_complete
        self._transform = transform
        shell.input_transformers_cleanup.append(transform)

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
                ports = parse_ports(os.environ[ENV_PORTS])
            if heartbeat is None and os.environ.get(ENV_HEARTBEAT):
                heartbeat = _positive(os.environ[ENV_HEARTBEAT])
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"bad environment for odium: {e}") from None
        interface = interface or os.environ.get(ENV_INTERFACE) or "127.0.0.1"
        app = app or os.environ.get(ENV_APP) or None
        hub = Hub(home, ports=ports, interface=interface, hb_interval=heartbeat or 1.0, app=app)
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

    # --- %odium -----------------------------------------------------------------------------

    @line_magic("odium")  # type: ignore[arg-type, unused-ignore]  # IPython 9 stubs
    def odium(self, line: str) -> Any:
        """Odium: this kernel is a hub; run cells on nodes with %%odium.

        %odium local N [--prefix P] [--app DIR]   start N local nodes, already trusted
        %odium nodes [GLOB]                        name, status, state (same as the hub?), last seen
        %odium token [--ttl S]                     the command that joins another machine
        %odium accept|reject|revoke PATTERN        decide about keys (id, or glob over names)
        %odium keys                                the keys this hub knows
        %odium forget GLOB                         remove nodes that are not connected
        %odium state [diff] [--nodes GLOB]         how each node's state differs from the hub's
        %odium sync [GLOB] [--timeout S]           bring nodes to the hub's commit
        %odium log [-n N]                          the hub's recent events
        %odium start [--ports 0|P,Q,J,R] [--home DIR] [--interface ADDR] [--heartbeat S]
                     [--app DIR]                   start the hub (again) with these options
        %odium stop                                stop the hub and its local nodes
        %odium autorun on [--nodes GLOB] ... | off every following cell runs on nodes
        %odium help [SUB-COMMAND]                  this text, or one sub-command's options

        %%odium [--nodes GLOB] [--shell] [--timeout S] [--require-state any|match|ID]
                [--bg] [-o NAME] [--session NAME] [--quiet]
            runs the cell on every matching node and returns a Result.
        %%local   runs the cell here, in the kernel (while autorun is on).

        %load_ext odium starts the hub on ports 18202,18203,18220,18221 of 127.0.0.1, with
        its home in $ODIUM_HOME or ~/.odium. The environment variables ODIUM_PORTS (0 for free
        ports, or PUB,QUERY,JOBS,RESULTS), ODIUM_INTERFACE, ODIUM_HEARTBEAT and ODIUM_APP,
        read at %load_ext, choose otherwise; so does %odium stop + %odium start --ports 0.
        """
        words = line.strip().split(None, 1)
        if not words:
            return self.sub_help("")
        sub, rest = words[0], (words[1] if len(words) > 1 else "")
        fn = getattr(self, f"sub_{sub}", None) if sub in SUBCOMMANDS else None
        if fn is None:
            raise UsageError(f"%odium: unknown sub-command {sub!r}; choose one of "
                             f"{', '.join(SUBCOMMANDS)} (see: %odium help)")
        return fn(rest)

    @magic_arguments(name="odium help")
    @argument("topic", nargs="?", default=None, help="a sub-command, or 'cell' for %%odium")
    def sub_help(self, line: str) -> None:
        """Show what %odium can do, or the options of one sub-command."""
        args = self._parse(self.sub_help, line, "%odium help")
        if args.topic is None:
            print(_dedent(self.odium.__doc__ or ""))
            return
        if args.topic in ("cell", "%%odium", "odium"):
            print(self.odium_cell.parser.format_help())  # type: ignore[attr-defined]
            return
        fn = getattr(self, f"sub_{args.topic}", None) if args.topic in SUBCOMMANDS else None
        if fn is None:
            raise UsageError(f"%odium help: no sub-command {args.topic!r}; choose one of "
                             f"{', '.join(SUBCOMMANDS)}, or cell")
        print(fn.parser.format_help())

    @magic_arguments(name="odium local")
    @argument("n", type=_count, help="how many local nodes to start")
    @argument("--prefix", type=_name, default="local", help="their names: PREFIX-1, PREFIX-2…")
    @argument("--app", default=None, help="their application directory (default: the hub's)")
    @argument("--capacity", type=_count, default=None, help="worker processes per node")
    @argument("--timeout", type=_positive, default=60.0, help="seconds to wait until ready")
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
    @argument("pattern", nargs="?", type=_glob, default=None, help="glob over node names")
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

    @magic_arguments(name="odium token")
    @argument("--ttl", type=_positive, default=3600.0, help="seconds the token stays valid")
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
    @argument("pattern", type=_glob, help="a node name, glob or comma list")
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
    @argument("--nodes", type=_glob, default=None, help="glob over node names")
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
    @argument("pattern", nargs="?", type=_glob, default="*", help="glob over node names")
    @argument("--timeout", type=_positive, default=300.0, help="seconds")
    def sub_sync(self, line: str) -> Result:
        """Bring the matching nodes to this hub's commit (git bundle; no internet needed)."""
        args = self._parse(self.sub_sync, line, "%odium sync")
        hub = self._need_hub()
        try:
            return hub.sync(args.pattern, timeout=args.timeout)
        except OdiumError as e:
            raise self._usage(e, "%odium sync") from None

    @magic_arguments(name="odium log")
    @argument("-n", type=_count, default=30, help="how many events")
    def sub_log(self, line: str) -> D.Table:
        """The hub's recent events: joins, commands, rejected messages."""
        args = self._parse(self.sub_log, line, "%odium log")
        hub = self._need_hub()
        try:
            return D.log_table(hub.log(args.n))
        except OdiumError as e:
            raise self._usage(e, "%odium log") from None

    @magic_arguments(name="odium start")
    @argument("--ports", type=parse_ports, default=None,
              help="0 (free ports) or PUB,QUERY,JOBS,RESULTS (default 18202,18203,18220,18221, "
              "or $ODIUM_PORTS)")
    @argument("--home", default=None, help="the hub's home (default $ODIUM_HOME or ~/.odium)")
    @argument("--interface", default=None,
              help="address to listen on (default 127.0.0.1; 0.0.0.0 for other machines)")
    @argument("--heartbeat", type=_positive, default=None, help="seconds between heartbeats")
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
    @argument("--nodes", type=_glob, default=None, help="glob or comma list of node names")
    @argument("--shell", action="store_true", help="run each cell as a shell command")
    @argument("--timeout", type=_positive, default=None, help="seconds per cell")
    @argument("--require-state", dest="require", type=_requirement, default=None,
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

    # --- %%local ----------------------------------------------------------------------------

    @cell_magic("local")  # type: ignore[arg-type, unused-ignore]
    def local(self, line: str, cell: str) -> None:
        """Run this cell here, in the kernel, even while autorun sends cells to nodes."""
        if line.strip():
            raise UsageError(f"%%local takes no options, not {line.strip()!r}")
        self._in_local = True
        try:
            self.sh.run_cell(cell, store_history=False)
        finally:
            self._in_local = False

    # --- %%odium ----------------------------------------------------------------------------

    @magic_arguments(name="%odium")
    @argument("--nodes", "-n", type=_glob, default="*",
              help="glob or comma list of node names (default: every node)")
    @argument("--shell", action="store_true", help="run the cell with the node's shell")
    @argument("--timeout", type=_positive, default=None, help="seconds; then interrupted")
    @argument("--require-state", dest="require", type=_requirement, default=None,
              metavar="any|match|ID", help="the state nodes must be in (default: match when "
              "the hub's application is a clean commit, else any)")
    @argument("--bg", action="store_true",
              help="return at once with a handle (.ready(), .wait(), .result(), .interrupt())")
    @argument("--queue", action="store_true",
              help="run the cell once, as a job on one available node (fresh namespace); "
              "the value is the job's result")
    @argument("--retries", type=int, default=0, metavar="N",
              help="with --queue: run again up to N times after an error or a lost node")
    @argument("-o", "--out", dest="out", type=_identifier, default=None, metavar="NAME",
              help="also store the Result (with --bg: the handle) in this variable")
    @argument("--session", type=_name, default=None,
              help="namespace on the nodes (default: this notebook's own)")
    @argument("--quiet", "-q", action="store_true", help="no live output, only the Result")
    @cell_magic("odium")  # type: ignore[arg-type, unused-ignore]
    def odium_cell(self, line: str, cell: str) -> Result | BackgroundRun | None:
        """Run the cell on every matching node; the value is a Result (one entry per node).

        Python cells share a namespace per notebook and node across cells. Each node's
        output appears while the cell runs; the stop button interrupts the cell on every node.
        """
        args = self._parse(self.odium_cell, line, "%%odium")
        hub = self._need_hub()
        if not cell.strip():
            raise UsageError("%%odium: the cell is empty; write the code to run below the "
                             "%%odium line")
        if args.queue:
            return self._queue_cell(hub, args, cell)
        label = f"{'shell' if args.shell else 'python'} on {args.nodes}"
        live = None if args.quiet else D.LiveView(self.rich, label)
        try:
            handle = hub.submit_broadcast(
                cell, args.nodes, shell=args.shell, timeout=args.timeout,
                session=args.session or self.session, require=args.require,
                on_output=live.add if live is not None else None)
        except OdiumError as e:
            raise self._usage(e, "%%odium") from None
        if args.bg:
            bg = BackgroundRun(hub, handle, live if self.rich else None)
            if args.out:
                self.sh.user_ns[args.out] = bg
            return bg
        result = self._wait(hub, handle, live, args.timeout)
        if args.out:
            self.sh.user_ns[args.out] = result
        return result

    def _queue_cell(self, hub: Hub, args: Any, cell: str) -> Any:
        """``%%odium --queue``: the cell as one job; its printed output, then its value."""
        if args.shell:
            raise UsageError("%%odium --queue runs Python; drop --shell (or run the command "
                             "with subprocess inside the cell)")
        if args.retries < 0:
            raise UsageError(f"%%odium: --retries must be 0 or more, not {args.retries}")
        try:
            job = hub.submit(cell, nodes=args.nodes, retries=args.retries,
                             timeout=args.timeout, require_state=args.require)
        except OdiumError as e:
            raise self._usage(e, "%%odium --queue") from None
        if args.out:
            self.sh.user_ns[args.out] = job
        if args.bg:
            return job
        try:
            info = job.wait(None if args.timeout is None else args.timeout + 30.0)
        except KeyboardInterrupt:
            job.cancel()
            print(f"job {job.id[:12]} cancelled")
            return None
        except OdiumError as e:
            raise self._usage(e, "%%odium --queue") from None
        if info.get("stdout"):
            print(clean_lines(info["stdout"]), end="")
        if info.get("stderr"):
            print(clean_lines(info["stderr"]), end="", file=sys.stderr)
        print(clean(f"[job {job.id[:12]} {info.get('status')} on {info.get('node') or '-'}]"),
              file=sys.stderr)
        return job.result(0)

    def _wait(self, hub: Hub, handle: BroadcastHandle, live: D.LiveView | None,
              timeout: float | None) -> Result:
        """Wait for every node's entry, showing live output; Ctrl-C interrupts the nodes."""
        limit = None if timeout is None else time.monotonic() + timeout + 30.0
        try:
            while True:
                try:
                    result = handle.wait(POLL if live is not None else
                                         (None if limit is None else
                                          max(0.0, limit - time.monotonic())))
                    break
                except OdiumTimeout:
                    if limit is not None and time.monotonic() > limit:
                        raise UsageError(f"%%odium: no complete result {(timeout or 0) + 30:.0f} s "
                                         f"after the timeout; see %odium log") from None
                    if live is not None and time.monotonic() - live.started >= LIVE_AFTER:
                        done, targets, finals = progress(hub, handle)
                        live.refresh(done, targets, finals=finals)
        except KeyboardInterrupt:
            result = self._interrupted(hub, handle)
        if live is not None:
            if live.rich and live.shown:
                live.clear()
            elif not live.rich and live.started + LIVE_AFTER <= time.monotonic():
                live.refresh([], [])
        return result

    def _interrupted(self, hub: Hub, handle: BroadcastHandle) -> Result:
        if handle.ready():
            return handle.wait(1.0)
        try:
            hub.interrupt(handle.cmd)
        except OdiumError:
            pass
        try:
            return handle.wait(INTERRUPT_GRACE)
        except (OdiumTimeout, KeyboardInterrupt):
            done, targets, _ = progress(hub, handle)
            left = [n for n in targets if n not in done]
            raise UsageError(f"%%odium: interrupted, but {', '.join(left) or 'some nodes'} did "
                             f"not answer within {INTERRUPT_GRACE:.0f} s; the command may still "
                             "run there (see %odium nodes)") from None


def _dedent(text: str) -> str:
    import textwrap

    first, _, rest = text.partition("\n")
    return first + "\n" + textwrap.dedent(rest)


__all__ = ["OdiumMagics", "BackgroundRun", "parse_ports", "progress"]
