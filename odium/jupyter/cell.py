"""The ``%odium`` line magic and the ``%%odium`` / ``%%local`` cell magics.

Thin by design: each sub-command (odium/jupyter/subcommands.py) parses its arguments with
``magic_arguments``, raises ``UsageError`` (one line) on bad input, and calls the public
``odium.Hub`` API; what it returns (a ``Result``, a table) is data that renders itself.
Nothing here that a script could not do with ``odium.Hub``.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from ..api.hub import BroadcastHandle, Hub
from ..api.progress import wait_job
from ..cli import args as A
from ..core.results import GROUP_AFTER, NodeResult, Result
from ..core.term import clean, clean_lines
from ..errors import OdiumError
from ..errors import TimeoutError as OdiumTimeout
from . import display as D
from .datamagics import DataCommands
from .live import LiveView
from .subcommands import SUBCOMMANDS

POLL = 0.1  # seconds between two looks at a running command's progress
LIVE_AFTER = 0.3  # a command that takes longer than this gets a live display
INTERRUPT_GRACE = 10.0  # seconds the nodes get to answer an interrupt


# --- progress of a running command ----------------------------------------------------------


def progress(hub: Hub, handle: BroadcastHandle) -> tuple[list[str], list[str],
                                                         dict[str, NodeResult]]:
    """(nodes done, nodes targeted, their entries so far) of a running command.

    The handle has them as the hub's loop thread hands them over (``targets``, ``partial``,
    each replaced whole); a handle that was given no targets asks the hub for a copy taken
    in its loop thread (``Hub.progress``).
    """
    if handle.targets:
        entries = dict(handle.partial)
        return list(entries), list(handle.targets), entries
    targets, entries = hub.progress(handle.cmd)
    return list(entries), targets, entries


def viewed(result: Result, group: bool | None) -> Result:
    """The Result as ``--group`` (True) or ``--no-group`` (False) shows it; None: by its size."""
    return result if group is None else result.with_view(group)


# --- a command running in the background ------------------------------------------------------


class BackgroundRun:
    """What ``%%odium --bg`` returns: the command runs on; its display updates itself.

    ``ready()``, ``wait(timeout)`` (Ctrl-C interrupts the nodes), ``result()``,
    ``interrupt()``; ``cmd`` is the command id.
    """

    def __init__(self, hub: Hub, handle: BroadcastHandle, live: LiveView | None,
                 group: bool | None = None) -> None:
        self.hub = hub
        self.handle = handle
        self.group = group  # --group / --no-group: how its Result shows
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
        """The Result, waiting for it if the command still runs; by then the display shows
        it too (a notebook run to its end otherwise could stop before the display's last
        update)."""
        result = viewed(self.handle.wait(timeout), self.group)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)  # it has only the result's display left to publish
        return result

    def result(self, timeout: float | None = None) -> Result:
        """The Result, waiting for it if the command still runs."""
        return self.wait(timeout)

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
            live.replace(D.result_bundle(viewed(self.handle.wait(1.0), self.group)))
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
            display(viewed(self.handle.wait(1.0), self.group))
        else:
            display({"text/plain": repr(self)}, raw=True)




@magics_class
class OdiumMagics(DataCommands):
    """``%odium`` (hub, nodes, keys, state), ``%%odium`` (run a cell on nodes), ``%%local``."""

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
                [--bg] [-o NAME] [--session NAME] [--quiet] [--group|--no-group]
            runs the cell on every matching node and returns a Result (grouped by answer
            for more than 8 nodes).
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
    @argument("--nodes", "-n", type=A.glob, default="*",
              help="glob or comma list of node names (default: every node)")
    @argument("--shell", action="store_true", help="run the cell with the node's shell")
    @argument("--timeout", type=A.seconds, default=None, help="seconds; then interrupted")
    @argument("--require-state", dest="require", type=A.requirement, default=None,
              metavar="any|match|ID", help="the state nodes must be in (default: match when "
              "the hub's application is a clean commit, else any)")
    @argument("--bg", action="store_true",
              help="return at once with a handle (.ready(), .wait(), .result(), .interrupt())")
    @argument("--queue", action="store_true",
              help="run the cell once, as a job on one available node (fresh namespace); "
              "the value is the job's result")
    @argument("--retries", type=int, default=0, metavar="N",
              help="with --queue: run again up to N times after an error or a lost node")
    @argument("-o", "--out", dest="out", type=A.identifier, default=None, metavar="NAME",
              help="also store the Result (with --bg: the handle) in this variable")
    @argument("--session", type=A.short_name, default=None,
              help="namespace on the nodes (default: this notebook's own)")
    @argument("--quiet", "-q", action="store_true", help="no live output, only the Result")
    @argument("--group", dest="group", action="store_const", const=True, default=None,
              help="show the Result grouped: one entry per answer, with its nodes (the "
              f"default for more than {GROUP_AFTER} nodes)")
    @argument("--no-group", dest="group", action="store_const", const=False,
              help="show the Result with one row per node, however many")
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
        live = None if args.quiet else LiveView(self.rich, label)
        try:
            handle = hub.submit_broadcast(
                cell, args.nodes, shell=args.shell, timeout=args.timeout,
                session=args.session or self.session, require=args.require,
                on_output=live.add if live is not None else None)
        except OdiumError as e:
            raise self._usage(e, "%%odium") from None
        if args.bg:
            bg = BackgroundRun(hub, handle, live if self.rich else None, args.group)
            if args.out:
                self.sh.user_ns[args.out] = bg
            return bg
        result = viewed(self._wait(hub, handle, live, args.timeout), args.group)
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
            # "job … running on …" while it runs (a notebook, a terminal), gone at the end
            info = wait_job(job, None if args.timeout is None else args.timeout + 30.0)
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

    def _wait(self, hub: Hub, handle: BroadcastHandle, live: LiveView | None,
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


__all__ = ["OdiumMagics", "BackgroundRun", "progress"]
