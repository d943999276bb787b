"""How results look in Jupyter: per-node HTML tables and readable text (the live per-node
output while a command runs is odium/jupyter/live.py).

The renderers are pure functions from Odium's data (``Result``, node lists, state reports)
to HTML or text; IPython is only told about them (``register_formatters``).

HTML from nodes (``text/html`` outputs) is shown in a sandboxed iframe without scripts: a
node must never be able to run code in the notebook, which is the hub's admin.
"""

from __future__ import annotations

import base64
import html
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..core.results import Group, NodeResult, Result, Status, differences, format_text, short_state
from ..core.term import clean
from .style import (
    MUTED,
    PRE,
    STATE_DIFF,
    STDERR,
    TABLE,
    TD,
    TH,
    ago_text,
    badge,
    duration_text,
    e,
    pre,
    state_html,
)

# --- rich outputs from nodes -------------------------------------------------------------------

_IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")


def _b64(data: Any) -> str | None:
    if isinstance(data, list):  # nbformat allows a list of lines
        data = "".join(str(x) for x in data)
    if not isinstance(data, str):
        return None
    clean = "".join(data.split())
    try:
        base64.b64decode(clean, validate=True)
    except (ValueError, TypeError):
        return None
    return clean


def _text(data: Any) -> str:
    if isinstance(data, list):
        return "".join(str(x) for x in data)
    return data if isinstance(data, str) else str(data)


def output_html(output: Mapping[str, Any]) -> str:
    """One display output of a node (a mimebundle), safely: images as data URIs, HTML in a
    sandboxed iframe (no scripts, no same origin), anything else as text."""
    data = output.get("data") if isinstance(output, Mapping) else None
    if not isinstance(data, Mapping):
        return ""
    for mime in _IMAGE_TYPES:
        if mime in data:
            b = _b64(data[mime])
            if b is not None:
                return (f'<img class="odium-image" alt="{e(mime)} from node" '
                        f'src="data:{mime};base64,{b}" style="max-width:100%;display:block"/>')
    if "image/svg+xml" in data:
        svg = base64.b64encode(_text(data["image/svg+xml"]).encode()).decode()
        return (f'<img class="odium-image" alt="SVG from node" src="data:image/svg+xml;base64,'
                f'{svg}" style="max-width:100%;display:block"/>')
    if "text/html" in data:
        doc = _text(data["text/html"])
        rows = sum(doc.count(t) for t in ("<tr", "<br", "<p", "<li", "<h", "<div", "\n"))
        height = max(60, min(480, 22 * rows + 24))
        return (f'<iframe class="odium-html" sandbox="" srcdoc="{html.escape(doc, quote=True)}" '
                f'style="border:1px solid rgba(128,128,128,.25);width:100%;height:{height}px;'
                f'resize:vertical;background:#fff"></iframe>')
    for mime in ("text/markdown", "text/latex", "application/json", "text/plain"):
        if mime in data:
            return pre(_text(data[mime]), "odium-display")
    return ""


def outputs_of(r: NodeResult) -> list[Mapping[str, Any]]:
    """The display outputs a node sent with its result (empty before the core sends any)."""
    outs = getattr(r, "outputs", None) or []
    return [o for o in outs if isinstance(o, Mapping)]


# --- a Result as HTML ---------------------------------------------------------------------------


def _counts(result: Result) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for r in result.nodes.values():
        counts[r.status.value] = counts.get(r.status.value, 0) + 1
    order = [s.value for s in Status]
    return sorted(counts.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99)


GRID_MIN = 2  # nodes with outputs of the same shape that are laid out in a grid
GRID_CELL = "260px"  # the narrowest column of that grid


def output_kind(output: Mapping[str, Any]) -> str:
    """What an output shows, as the renderer picks it: an image type, html, or text."""
    data = output.get("data") if isinstance(output, Mapping) else None
    if not isinstance(data, Mapping):
        return ""
    for mime in (*_IMAGE_TYPES, "image/svg+xml"):
        if mime in data:
            return "image"
    return "html" if "text/html" in data else "text"


def output_shape(r: NodeResult) -> tuple[str, ...]:
    """The kinds of a node's outputs in order: nodes with the same shape line up."""
    return tuple(output_kind(o) for o in outputs_of(r))


def grid_nodes(result: Result) -> list[str]:
    """The nodes whose display outputs go in a grid: at least GRID_MIN nodes whose outputs
    have the same shape, with an image in it (plots from many nodes, side by side)."""
    shapes: dict[tuple[str, ...], list[str]] = {}
    for name, r in result.nodes.items():
        shape = output_shape(r)
        if "image" in shape:
            shapes.setdefault(shape, []).append(name)
    best = max(shapes.values(), key=len, default=[])
    return best if len(best) >= GRID_MIN else []


def grid_html(result: Result, names: Sequence[str]) -> str:
    """Those nodes' outputs as a grid of cards, each under its node's name and status."""
    cards = []
    for name in names:
        r = result.nodes[name]
        outs = "".join(f'<div class="odium-output">{output_html(o)}</div>'
                       for o in outputs_of(r))
        cards.append(f'<figure class="odium-card" data-node="{e(name)}" style="margin:0;'
                     f'padding:4px;border:1px solid rgba(128,128,128,.25);border-radius:4px;'
                     f'min-width:0"><figcaption style="font-size:12px;margin-bottom:2px">'
                     f'<b>{e(name)}</b> {badge(r.status.value)}</figcaption>{outs}</figure>')
    return (f'<div class="odium-grid" style="display:grid;grid-template-columns:repeat('
            f'auto-fill,minmax({GRID_CELL},1fr));gap:6px;margin:2px 0 6px 0">'
            f'{"".join(cards)}</div>')


def _detail_html(r: NodeResult, in_grid: bool = False) -> str:
    """The right-hand cell of a node's row: streams, displays, value, error, mismatch.
    ``in_grid``: its displays are in the grid above the table, so the row only says so."""
    parts: list[str] = []
    if r.stdout:
        parts.append(pre(r.stdout.rstrip("\n"), "odium-stdout"))
    if r.stderr:
        parts.append(pre(r.stderr.rstrip("\n"), "odium-stderr", STDERR))
    outs = outputs_of(r)
    if in_grid and outs:
        n = len(outs)
        parts.append(f'<div class="odium-in-grid" style="{MUTED}">{n} output'
                     f'{"s" if n != 1 else ""}: in the grid above</div>')
    for out in () if in_grid else outs:
        parts.append(f'<div class="odium-output">{output_html(out)}</div>')
    if r.value_repr is not None:
        note = ("" if r.value_json else
                f' <span class="odium-note" style="{MUTED}">(not JSON: shown as its repr)</span>')
        parts.append(f'<div class="odium-value"><span style="{MUTED}">value</span> '
                     f'<code style="white-space:pre-wrap">{e(r.value_repr)}</code>{note}</div>')
    if r.exit not in (None, 0) and not r.error:  # an error says it already
        parts.append(f'<div class="odium-exit" style="{MUTED}">exit status {r.exit}</div>')
    if r.error and not r.ok and not r.mismatch:  # a mismatch says it better below
        head = f"{r.error.get('ename', '')}: {r.error.get('evalue', '')}"
        tb = r.error.get("traceback") or ""
        if tb:
            parts.append(f'<details class="odium-error"><summary style="cursor:pointer;'
                         f'color:#cf222e">{e(head)}</summary>{pre(tb.rstrip(), "odium-traceback")}'
                         f"</details>")
        else:
            parts.append(f'<div class="odium-error" style="color:#cf222e">{e(head)}</div>')
    if r.mismatch:
        required = short_state(str(r.mismatch.get("required", "?")))
        have = short_state(str(r.mismatch.get("state", r.state)))
        text = str(r.mismatch.get("text") or "")
        parts.append(f'<div class="odium-mismatch">required state <code>{e(required)}</code>, '
                     f"the node has <code>{e(have)}</code></div>")
        if text:
            parts.append(pre(text, "odium-mismatch-diff"))
    return "".join(parts) or f'<span style="{MUTED}">no output</span>'


def _row_html(name: str, r: NodeResult, hub_state: str, in_grid: bool = False) -> str:
    return (f'<tr class="odium-row" data-node="{e(name)}" data-status="{e(r.status.value)}">'
            f'<td style="{TD};font-weight:600;white-space:nowrap" class="odium-node">'
            f"{e(name)}</td>"
            f'<td style="{TD}">{badge(r.status.value)}</td>'
            f'<td style="{TD};white-space:nowrap">{state_html(r.state, hub_state)}</td>'
            f'<td style="{TD};white-space:nowrap">{duration_text(r.duration)}</td>'
            f'<td style="{TD};width:100%">{_detail_html(r, in_grid)}</td></tr>')


_HEAD = (f'<thead><tr><th style="{TH}">node</th><th style="{TH}">status</th>'
         f'<th style="{TH}">state</th><th style="{TH}">duration</th>'
         f'<th style="{TH}">output</th></tr></thead>')


def _summary_html(result: Result) -> str:
    """The line above a Result: its nodes, their statuses, the command, the hub's state."""
    counts = " ".join(f"{badge(f'{n} {s}', s)}" for s, n in _counts(result))
    required = result.extra.get("required")
    req = f" · required <code>{e(short_state(str(required)))}</code>" if required else ""
    hint = result.extra.get("hint")
    note = (f'<div class="odium-hint" style="{MUTED};margin-bottom:4px">ran without a state '
            f"requirement: {e(str(hint))}</div>") if hint else ""
    return (f'<div class="odium-summary" style="margin:2px 0 4px 0">'
            f'<b>{len(result)} node{"s" if len(result) != 1 else ""}</b> {counts} '
            f'<span style="{MUTED}">· command {e(result.command[:12])} · hub state '
            f'<code>{e(short_state(result.hub_state))}</code>{req}</span></div>{note}')


def render_html(result: Result) -> str:
    """The rich form of a Result: a summary line and one table row per targeted node, or
    one entry per group of nodes that answered the same (``Result.grouped``)."""
    if result.grouped:
        body = groups_html(result)
    else:
        gridded = grid_nodes(result)
        grid = grid_html(result, gridded) if gridded else ""
        rows = "".join(_row_html(n, r, result.hub_state, n in gridded)
                       for n, r in result.nodes.items())
        body = (f'{grid}<table class="odium-table" style="{TABLE}">{_HEAD}<tbody>{rows}'
                f"</tbody></table>")
    return (f'<div class="odium-result" data-command="{e(result.command)}" '
            f'data-hub-state="{e(result.hub_state)}" '
            f'data-view="{"groups" if result.grouped else "nodes"}">'
            f"{_summary_html(result)}{body}</div>")


def _names_html(names: Sequence[str]) -> str:
    return ", ".join(f'<span class="odium-group-node" data-node="{e(n)}">{e(n)}</span>'
                     for n in names)


def _group_html(g: Group, hub_state: str) -> str:
    """One group: its answer in the summary; behind a click, its nodes, which state ids they
    ran, and the answer in full (as a node's row shows it)."""
    r = g.result
    differs = [s for s in g.states if s != hub_state]
    mark = (f'{len(g.states)} state ids' if len(g.states) > 1 else
            "state ≠ hub" if differs else "")
    mark = f' <span class="odium-group-mark" style="{STATE_DIFF}">{mark}</span>' if mark else ""
    color = "" if r.ok else ";color:#cf222e"
    states = "".join(
        f'<div class="odium-group-state">{state_html(s, hub_state)} '
        f'<span style="{MUTED}">{len(ns)} node{"s" if len(ns) != 1 else ""}</span>'
        + (f": {_names_html(ns)}" if i else "") + "</div>"  # the most common: its count
        for i, (s, ns) in enumerate(g.states.items()))
    return (f'<details class="odium-group" data-nodes="{len(g)}" '
            f'data-status="{e(r.status.value)}" data-states="{len(g.states)}">'
            f'<summary style="cursor:pointer;margin:2px 0">{badge(r.status.value)} '
            f'<b>{e(g.label)}</b>: <code class="odium-group-answer" style="white-space:pre-wrap'
            f'{color}">{e(g.headline)}</code>{mark}</summary>'
            f'<div class="odium-group-body" style="margin:2px 0 6px 18px;font-size:13px">'
            f'<div class="odium-group-nodes"><span style="{MUTED}">nodes</span> '
            f"{_names_html(g.nodes)}</div>"
            f'<div class="odium-group-states">{states}</div>'
            f'<div class="odium-group-detail" style="margin-top:2px">{_detail_html(r)}</div>'
            f"</div></details>")


def groups_html(result: Result) -> str:
    """The grouped view: the largest group, what the other nodes answered instead, then each
    other group (``Result.groups``)."""
    groups = result.groups()
    parts = [_group_html(g, result.hub_state) for g in groups]
    if len(groups) > 1:
        rest = sum(len(g) for g in groups[1:])
        parts.insert(1, f'<div class="odium-differ" data-nodes="{rest}" style="margin:4px 0 '
                        f'2px 0;font-weight:600">{e(differences(groups))}</div>')
    return (f'<div class="odium-groups" data-groups="{len(groups)}" style="font-size:13px;'
            f'font-family:var(--jp-ui-font-family,system-ui,sans-serif)">{"".join(parts)}</div>')


def render_node_html(r: NodeResult, hub_state: str | None = None) -> str:
    """One NodeResult alone (``r["gpu-01"]``): the same row as in its Result's table."""
    return (f'<table class="odium-table" style="{TABLE}">{_HEAD}<tbody>'
            f"{_row_html(r.node, r, hub_state or r.state)}</tbody></table>")


def render_text(result: Result) -> str:
    """The plain form (terminal IPython, text/plain): a summary line, then each node."""
    counts = ", ".join(f"{n} {s}" for s, n in _counts(result)) or "no nodes"
    plural = "" if len(result) == 1 else "s"
    lines = [f"odium result {result.command[:12]}: {len(result)} node{plural}, {counts}; "
             f"hub state {short_state(result.hub_state)}"]
    body = format_text(result)
    if body:
        lines.append(body)
    shown = [(g.label, g.result) for g in result.groups()] if result.grouped else \
        list(result.nodes.items())
    for name, r in shown:
        for out in outputs_of(r):
            mimes = ", ".join(sorted((out.get("data") or {}).keys())) or "nothing"
            lines.append(clean(f"[{name}] displayed {mimes}"))
    return "\n".join(lines)


def render_node_text(r: NodeResult) -> str:
    return format_text(Result("", {r.node: r}, r.state))


# --- plain tables: nodes, keys, log, state ------------------------------------------------------


class Cell(NamedTuple):
    text: str
    html: str | None = None


@dataclass
class Table:
    """A titled table with an HTML and a text form; ``data`` keeps the rows as dicts."""

    title: str
    columns: list[str]
    rows: list[list[Cell]]
    data: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    kind: str = "table"

    def _repr_html_(self) -> str:
        head = "".join(f'<th style="{TH}">{e(c)}</th>' for c in self.columns)
        body = "".join(
            "<tr>" + "".join(f'<td style="{TD}">{c.html if c.html is not None else e(c.text)}'
                             "</td>" for c in row) + "</tr>" for row in self.rows)
        notes = "".join(f'<div style="{MUTED}">{e(n)}</div>' for n in self.notes)
        empty = (f'<div style="{MUTED}">(none)</div>' if not self.rows else "")
        return (f'<div class="odium-{e(self.kind)}"><div style="font-weight:600;margin:2px 0">'
                f'{e(self.title)}</div><table class="odium-table" style="{TABLE}"><thead><tr>'
                f"{head}</tr></thead><tbody>{body}</tbody></table>{empty}{notes}</div>")

    def text(self) -> str:
        cols = [[c] + [r[i].text for r in self.rows] for i, c in enumerate(self.columns)]
        widths = [max(len(line) for v in col for line in (v.splitlines() or [""]))
                  for col in cols]
        widths = [min(w, 60) for w in widths]

        def fmt(values: Sequence[str]) -> str:  # node text: control characters escaped
            return "  ".join(clean(v.replace("\n", " | ")).ljust(w) for v, w in
                             zip(values, widths, strict=False)).rstrip()

        lines = [clean(self.title), fmt(self.columns)]
        lines += [fmt([c.text for c in row]) for row in self.rows]
        if not self.rows:
            lines.append("(none)")
        lines += [clean(n) for n in self.notes]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.text()

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.text())

    def __len__(self) -> int:
        return len(self.rows)


def nodes_table(nodes: Iterable[Mapping[str, Any]], hub_state: str,
                diffs: Mapping[str, str] | None = None, now: float | None = None) -> Table:
    """``%odium nodes``: name, status, state id (same as the hub's, or what differs), last seen."""
    rows: list[list[Cell]] = []
    data = [dict(n) for n in nodes]
    for n in data:
        state = str(n.get("state", "unknown"))
        same = state == hub_state
        differs = (diffs or {}).get(str(n["name"]), "")
        text = "same as hub" if same else (differs or "differs from hub")
        if same and differs and differs != "same state and environment":
            text = differs  # same commit, different environment
        state_cell = Cell(f"{short_state(state)} ({text})",
                          f'{state_html(state, hub_state)}'
                          + (f'<div style="{MUTED};white-space:pre-wrap">{e(text)}</div>'
                             if text != "same as hub" else ""))
        status = str(n.get("status", "?"))
        running = n.get("running") or []
        rows.append([Cell(str(n["name"]), f"<b style='white-space:nowrap'>{e(str(n['name']))}</b>"),
                     Cell(status, badge(status)),
                     state_cell,
                     Cell(ago_text(n.get("last_seen"), now)),
                     Cell(str(len(running)) if running else "-")])
    notes = [] if data else ["no nodes yet: start local ones with %odium local 4, or invite "
                             "a machine with %odium token"]
    notes += [f"{n['name']}'s clock is {abs(s):.0f} s {'ahead of' if s > 0 else 'behind'} the "
              "hub's (it uses the hub's time)" for n in data
              if abs(s := float(n.get("clock_skew") or 0)) >= 1]
    return Table(f"nodes of this hub (hub state {short_state(hub_state)})",
                 ["node", "status", "state", "last seen", "running"], rows, data, notes, "nodes")


def keys_table(keys: Iterable[Mapping[str, Any]]) -> Table:
    data = [dict(k) for k in keys]
    rows = [[Cell(str(k.get("name") or "-")), Cell(str(k.get("role")), badge(str(k.get("role")))),
             Cell(str(k.get("fingerprint", ""))), Cell(str(k.get("key", ""))[:20] + "…"),
             Cell(str(k.get("note") or ""))] for k in data]
    notes = []
    if any(k.get("role") == "pending" for k in data):
        notes.append("accept a pending key with %odium accept KEY-ID (the id the node printed)")
    return Table("keys this hub knows", ["name", "role", "fingerprint", "key", "note"], rows,
                 data, notes, "keys")


def log_table(events: Iterable[Mapping[str, Any]]) -> Table:
    data = [dict(ev) for ev in events]
    rows = []
    for ev in data:
        level = str(ev.get("level", "info"))
        when = time.strftime("%H:%M:%S", time.localtime(float(ev.get("ts") or 0)))
        color = {"warning": "#9a6700", "error": "#cf222e"}.get(level)
        kind = str(ev.get("kind", ""))
        rows.append([Cell(when), Cell(level, f'<span style="color:{color}">{e(level)}</span>'
                                      if color else None),
                     Cell(kind), Cell(str(ev.get("node") or "")), Cell(str(ev.get("detail", "")))])
    return Table("hub log (oldest first)", ["time", "level", "event", "node", "detail"], rows,
                 data, [], "log")


def state_table(report: Mapping[str, Any], details: bool = False) -> Table:
    """``%odium state`` (one line per node) and ``%odium state diff`` (every difference)."""
    hub = report.get("hub") or {}
    hub_state = str(hub.get("state", "unknown"))
    fp = str((hub.get("fingerprint") or {}).get("id", ""))[:12]
    rows = []
    data = []
    for name, n in (report.get("nodes") or {}).items():
        state = str(n.get("state", "unknown"))
        text = str(n.get("text") or "")
        same = text in ("", "same state and environment")
        data.append({"node": name, **dict(n)})
        shown = text if details else (text.splitlines()[0] if text else "")
        if not details and len(text.splitlines()) > 1:
            shown += f" (+{len(text.splitlines()) - 1} more: %odium state diff)"
        rows.append([Cell(name, f"<b>{e(name)}</b>"),
                     Cell(str(n.get("status", "?")), badge(str(n.get("status", "?")))),
                     Cell(short_state(state), state_html(state, hub_state)),
                     Cell("same as hub" if same else shown,
                          f'<span style="{MUTED}">same as hub</span>' if same else
                          f'<pre style="{PRE}">{e(shown)}</pre>')])
    title = (f"state of the hub: {short_state(hub_state)}"
             + (f", environment {fp}" if fp else "")
             + (f"; uncommitted: {', '.join(hub.get('dirty_files') or [])}"
                if hub.get("dirty_files") else ""))
    return Table(title, ["node", "status", "state", "differences from the hub"], rows, data,
                 [], "state")



def result_bundle(result: Result) -> dict[str, str]:
    return {"text/html": render_html(result), "text/plain": render_text(result)}


def register_formatters(shell: Any) -> Callable[[], None]:
    """Teach IPython to show Results and NodeResults richly; returns the undo function."""
    formatters = shell.display_formatter.formatters
    html_f, text_f = formatters["text/html"], formatters["text/plain"]
    old = [(html_f, Result, html_f.for_type(Result, render_html)),
           (html_f, NodeResult, html_f.for_type(NodeResult, render_node_html)),
           (text_f, Result, text_f.for_type(
               Result, lambda obj, p, cycle: p.text(render_text(obj)))),
           (text_f, NodeResult, text_f.for_type(
               NodeResult, lambda obj, p, cycle: p.text(render_node_text(obj))))]

    def undo() -> None:
        for f, typ, previous in old:
            f.pop(typ, None)
            if previous is not None:
                f.for_type(typ, previous)

    return undo
