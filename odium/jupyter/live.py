"""Each node's output while a command runs, in one display updated in place (``LiveView``).

``add`` is called from the hub's loop thread; everything else from the thread that owns the
display. IPython is imported only when something is shown.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..core.progress import still_running
from ..core.results import NodeResult
from ..core.term import clean
from .style import MUTED, STDERR, TABLE, TD, badge, e, pre

LIVE_KEEP = 8_000  # the last characters of each node's stream shown live (the Result has all)
LIVE_LINES = 30  # and at most this many lines of it


@dataclass
class _NodeLive:
    stdout: str = ""
    stderr: str = ""
    cut: bool = False


def _tail(text: str, lines: int = LIVE_LINES) -> tuple[str, bool]:
    """The last lines of a live stream, and whether some were left out."""
    parts = text.splitlines(keepends=True)
    if len(parts) <= lines:
        return text, False
    return "".join(parts[-lines:]), True


def _running(done: Sequence[str], targets: Sequence[str]) -> str:
    """The targets not done yet: the first ten names, then "…" and how many more."""
    finished = set(done)
    return still_running([t for t in targets if t not in finished])


class LiveView:
    """Each node's output while a command runs, shown in one display updated in place.

    ``add`` is called from the hub's loop thread (it only appends under a lock); ``refresh``
    from the thread that owns the display. Without a kernel (terminal IPython) the view
    prints new output as ``[node] line`` instead of updating a display.
    """

    def __init__(self, rich: bool, label: str = "") -> None:
        self.rich = rich
        self.label = label
        self._lock = threading.Lock()
        self._nodes: dict[str, _NodeLive] = {}
        self._fresh: list[tuple[str, str, str]] = []  # for the terminal form
        self._partial: dict[tuple[str, str], str] = {}  # (node, stream) -> a line begun
        self._dirty = False
        self._shown_key: tuple[Any, ...] | None = None
        self._shown_at = 0.0
        self._handle: Any = None
        self.started = time.monotonic()

    def add(self, node: str, stream: str, text: str) -> None:
        with self._lock:
            nl = self._nodes.setdefault(node, _NodeLive())
            if stream == "stderr":
                nl.stderr += text
                if len(nl.stderr) > LIVE_KEEP:
                    nl.stderr, nl.cut = nl.stderr[-LIVE_KEEP:], True
            else:
                nl.stdout += text
                if len(nl.stdout) > LIVE_KEEP:
                    nl.stdout, nl.cut = nl.stdout[-LIVE_KEEP:], True
            self._fresh.append((node, stream, text))
            self._dirty = True

    @property
    def shown(self) -> bool:
        return self._handle is not None

    def html(self, done: Sequence[str], targets: Sequence[str],
             finals: Mapping[str, NodeResult] | None = None) -> str:
        with self._lock:
            nodes = {k: (v.stdout, v.stderr, v.cut) for k, v in self._nodes.items()}
        k, n = len(done), len(targets)
        pct = 100 * k // n if n else 0
        running = _running(done, targets)
        progress = (f'<div class="odium-progress" style="margin:2px 0 4px 0">'
                    f'<b>{k} of {n} nodes done</b> <span style="{MUTED}">{e(self.label)} · '
                    f'{time.monotonic() - self.started:.1f} s</span>'
                    + (f'<div class="odium-running" style="{MUTED}">still running: '
                       f'{e(running)}</div>' if running else "") +
                    f'<div style="height:4px;background:rgba(128,128,128,.2);width:240px;'
                    f'border-radius:2px"><div style="height:4px;width:{pct}%;'
                    f'background:#0969da;border-radius:2px"></div></div></div>')
        rows = []
        for name in targets or sorted(nodes):
            out, err, cut = nodes.get(name, ("", "", False))
            final = (finals or {}).get(name)
            status = final.status.value if final else ("done" if name in done else "running")
            out, cut_out = _tail(out)
            err, cut_err = _tail(err)
            cell = ""
            if cut or cut_out or cut_err:
                cell += f'<div style="{MUTED}">(earlier lines hidden; the result has all)</div>'
            if out:
                cell += pre(out.rstrip("\n"), "odium-stdout")
            if err:
                cell += pre(err.rstrip("\n"), "odium-stderr", STDERR)
            rows.append(f'<tr class="odium-live-row" data-node="{e(name)}">'
                        f'<td style="{TD};font-weight:600;white-space:nowrap">{e(name)}</td>'
                        f'<td style="{TD}">{badge(status, status)}</td>'
                        f'<td style="{TD};width:100%">{cell}</td></tr>')
        return (f'<div class="odium-live">{progress}<table style="{TABLE}"><tbody>'
                f'{"".join(rows)}</tbody></table></div>')

    def text(self, done: Sequence[str], targets: Sequence[str]) -> str:
        running = _running(done, targets)
        return (f"{len(done)} of {len(targets)} nodes done"
                + (f"; still running: {running}" if running else ""))

    def refresh(self, done: Sequence[str], targets: Sequence[str], force: bool = False,
                finals: Mapping[str, NodeResult] | None = None) -> None:
        """Show what is new: update the display (kernel) or print new lines (terminal)."""
        if not self.rich:
            with self._lock:
                fresh, self._fresh = self._fresh, []
            import sys

            for node, stream, text in fresh:  # whole lines only: output comes in any pieces
                dest = sys.stderr if stream == "stderr" else sys.stdout
                *lines, self._partial[(node, stream)] = (
                    self._partial.get((node, stream), "") + text).split("\n")
                for line in lines:
                    print(f"[{node}] {clean(line)}", file=dest)
            for node, stream in [k for k in self._partial if k[0] in (finals or {})]:
                rest = self._partial.pop((node, stream))  # done: a last line without "\n"
                if rest:
                    print(f"[{node}] {clean(rest)}",
                          file=sys.stderr if stream == "stderr" else sys.stdout)
            return
        now = time.monotonic()
        key = (len(done), len(targets), tuple(sorted((finals or {}).keys())))
        if not (force or self._dirty or key != self._shown_key or now - self._shown_at >= 1.0):
            return
        with self._lock:
            self._dirty = False
        self._shown_key, self._shown_at = key, now
        bundle = {"text/html": self.html(done, targets, finals),
                  "text/plain": self.text(done, targets)}
        self._publish(bundle)

    def _publish(self, bundle: dict[str, str]) -> None:
        from IPython.display import display

        if self._handle is None:
            self._handle = display(bundle, raw=True, display_id=True)
        else:
            self._handle.update(bundle, raw=True)

    def replace(self, bundle: dict[str, str]) -> None:
        """Put something else in the live display's place (the final result, or nothing)."""
        if self._handle is not None:
            self._handle.update(bundle, raw=True)

    def clear(self) -> None:
        self.replace({"text/plain": ""})

