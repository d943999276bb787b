"""The small pieces of Odium's HTML in Jupyter: colours, styles, escaping, badges, states.

Shared by the result and table renderers (odium/jupyter/display.py) and the live view
(odium/jupyter/live.py); pure functions, no IPython.
"""

from __future__ import annotations

import html
import time

from ..core.results import short_state
from ..core.term import clean_lines

BADGE_COLORS = {
    "ok": "#1a7f37",
    "error": "#cf222e",
    "timeout": "#9a6700",
    "interrupted": "#6e7781",
    "state mismatch": "#8250df",
    "not connected": "#57606a",
    "lost": "#bc4c00",
    "running": "#0969da",
    "waiting": "#8c959f",
    # node statuses (the nodes table)
    "ready": "#1a7f37",
    "connecting": "#0969da",
    "restarting": "#8250df",
    "offline": "#6e7781",
    "left": "#6e7781",
    # key roles
    "admin": "#0969da",
    "node": "#1a7f37",
    "pending": "#9a6700",
    "rejected": "#cf222e",
    "revoked": "#cf222e",
    "token": "#6e7781",
}

TABLE = ("border-collapse:collapse;font-size:13px;margin:2px 0;"
          "font-family:var(--jp-ui-font-family,system-ui,sans-serif)")
TH = ("text-align:left;padding:4px 10px;border-bottom:2px solid rgba(128,128,128,.45);"
       "white-space:nowrap")
TD = ("text-align:left;vertical-align:top;padding:4px 10px;"
       "border-bottom:1px solid rgba(128,128,128,.2)")
PRE = ("margin:0 0 2px 0;padding:2px 4px;white-space:pre-wrap;word-break:break-word;"
        "max-height:24em;overflow:auto;font-size:12px;background:transparent;"
        "font-family:var(--jp-code-font-family,monospace)")
STDERR = "background:rgba(207,34,46,.07);border-left:3px solid rgba(207,34,46,.5);"
STATE_SAME = "font-family:monospace"
STATE_DIFF = ("font-family:monospace;background:#fff8c5;color:#6a4a00;font-weight:600;"
               "padding:0 3px;border-radius:3px")
MUTED = "opacity:.65;font-size:11px"

def e(text: str, quote: bool = True) -> str:
    """HTML for foreign text: markup escaped, control characters shown as escapes."""
    return html.escape(clean_lines(text), quote)


def badge(text: str, kind: str | None = None) -> str:
    """A coloured status label; ``data-status`` carries the plain value for tests and tools."""
    color = BADGE_COLORS.get(kind or text, "#57606a")
    return (f'<span class="odium-badge" data-status="{e(text)}" style="background:{color};'
            f'color:#fff;border-radius:9px;padding:1px 8px;font-size:12px;white-space:nowrap">'
            f"{e(text)}</span>")


def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    return f"{seconds / 60:.1f} min"


def ago_text(ts: float | None, now: float | None = None) -> str:
    if not ts:
        return "never"
    d = max(0.0, (now or time.time()) - ts)
    if d < 1:
        return "just now"
    if d < 90:
        return f"{d:.0f} s ago"
    if d < 5400:
        return f"{d / 60:.0f} min ago"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def state_html(state: str, hub_state: str) -> str:
    same = state == hub_state
    note = "= hub" if same else "≠ hub"
    title = f"{state} (hub: {hub_state})"
    style = STATE_SAME if same else STATE_DIFF
    cls = "odium-state-same" if same else "odium-state-differs"
    return (f'<span class="odium-state {cls}" data-state="{e(state)}" title="{e(title)}" '
            f'style="{style}">{e(short_state(state))}</span> <span style="{MUTED}">{note}</span>')


def pre(text: str, cls: str, extra: str = "") -> str:
    return f'<pre class="{cls}" style="{PRE}{extra}">{e(text)}</pre>'
