"""Results of a broadcast: one NodeResult per targeted node, gathered in a Result. Pure data."""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..errors import RemoteError
from .term import clean, clean_lines

GROUP_AFTER = 8  # a Result of more nodes than this is shown grouped: one entry per answer


class Status(str, enum.Enum):
    OK = "ok"
    ERROR = "error"
    TIMEOUT = "timeout"
    INTERRUPTED = "interrupted"
    STATE_MISMATCH = "state mismatch"
    NOT_CONNECTED = "not connected"
    LOST = "lost"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class NodeResult:
    """What one node did with one command."""

    node: str
    status: Status
    stdout: str = ""
    stderr: str = ""
    value: Any = None
    value_repr: str | None = None
    value_json: bool = True
    error: dict[str, str] | None = None  # ename, evalue, traceback
    exit: int | None = None
    state: str = "unknown"
    started: float | None = None
    finished: float | None = None
    mismatch: dict[str, Any] | None = None  # state mismatch: required, state, diff
    outputs: list[dict[str, Any]] = field(default_factory=list)  # display outputs (mimebundles)

    @property
    def ok(self) -> bool:
        return self.status is Status.OK

    @property
    def duration(self) -> float | None:
        if self.started is None or self.finished is None:
            return None
        return self.finished - self.started

    def raise_for_error(self) -> None:
        if not self.ok:
            e = self.error or {}
            raise RemoteError(self.node, e.get("ename", str(self.status)),
                              e.get("evalue", str(self.status)), e.get("traceback", ""))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status.value
        d["duration"] = self.duration
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NodeResult:
        keys = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in keys}
        kw["status"] = Status(kw.get("status", "error"))
        return cls(**kw)


@dataclass(frozen=True)
class Result(Mapping[str, NodeResult]):
    """A broadcast's outcome: node name -> NodeResult, for every node the command targeted."""

    command: str
    nodes: dict[str, NodeResult]
    hub_state: str = "unknown"
    issued: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> NodeResult:
        return self.nodes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def ok(self) -> bool:
        return bool(self.nodes) and all(r.ok for r in self.nodes.values())

    @property
    def errors(self) -> dict[str, NodeResult]:
        return {n: r for n, r in self.nodes.items() if not r.ok}

    def values(self) -> list[Any]:  # type: ignore[override]
        """The value each node returned, in node order."""
        return [r.value for r in self.nodes.values()]

    def results(self) -> list[NodeResult]:
        return list(self.nodes.values())

    def raise_for_error(self) -> None:
        for r in self.nodes.values():
            r.raise_for_error()

    def groups(self) -> list[Group]:
        """The nodes grouped by their answer: nodes whose status, stdout, stderr, value,
        error, exit status and display outputs are identical are one group, whatever state
        id they ran (each group says which nodes ran which). Largest group first, ties by
        their first node's name (pc-7 before pc-11); a group's nodes in this Result's order."""
        found: dict[tuple[Any, ...], list[str]] = {}
        for name, r in self.nodes.items():
            found.setdefault(answer_key(r), []).append(name)
        out = []
        for names in found.values():
            states: dict[str, list[str]] = {}
            for n in names:
                states.setdefault(self.nodes[n].state, []).append(n)
            ranked = sorted(states.items(), key=lambda kv: -len(kv[1]))  # stable: first seen
            out.append(Group(names, self.nodes[names[0]], dict(ranked)))
        return sorted(out, key=lambda g: (-len(g.nodes), natural(g.nodes[0])))

    @property
    def grouped(self) -> bool:
        """Whether it is shown grouped: as asked (``with_view``; ``%%odium --group`` and
        ``--no-group``), else when it has more than GROUP_AFTER nodes."""
        view = self.extra.get("view")
        return view == "groups" if view in ("groups", "nodes") else len(self) > GROUP_AFTER

    def with_view(self, grouped: bool) -> Result:
        """The same Result, shown grouped (``True``) or one entry per node (``False``)."""
        return replace(self, extra={**self.extra, "view": "groups" if grouped else "nodes"})

    def to_dict(self) -> dict[str, Any]:
        return {"command": self.command, "hub_state": self.hub_state, "issued": self.issued,
                "ok": self.ok, "extra": self.extra,
                "nodes": {n: r.to_dict() for n, r in self.nodes.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Result:
        return cls(d["command"], {n: NodeResult.from_dict(r) for n, r in d["nodes"].items()},
                   d.get("hub_state", "unknown"), d.get("issued", 0.0), dict(d.get("extra") or {}))

    def __str__(self) -> str:
        return format_text(self)

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for r in self.nodes.values():
            counts[r.status.value] = counts.get(r.status.value, 0) + 1
        summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        return f"<Result {self.command[:8]} on {len(self.nodes)} nodes: {summary or 'none'}>"


def natural(name: str) -> tuple[Any, ...]:
    """A node name's place in human order: its numbers as numbers (pc-7 before pc-11)."""
    return tuple(int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", name)))


def _canonical(data: Any) -> str:
    try:
        return json.dumps(data, sort_keys=True, separators=(",", ":"), default=repr)
    except (TypeError, ValueError):  # keys of mixed types, a cycle: compare the repr
        return repr(data)


def answer_key(r: NodeResult) -> tuple[Any, ...]:
    """What two nodes must share to be in one group: everything they answered, not their
    name, state id or times."""
    if r.value_repr is None:
        value = None
    else:
        value = _canonical(r.value) if r.value_json else r.value_repr
    err = r.error or {}
    error = (tuple(str(err.get(k) or "") for k in ("ename", "evalue", "traceback"))
             if r.error else None)
    return (r.status.value, r.stdout, r.stderr, r.value_repr is None, r.value_json, value,
            error, r.exit, _canonical(r.outputs) if r.outputs else "")


def _first_line(text: str, width: int) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()] or [""]
    line = lines[0].strip() + (" …" if len(lines) > 1 else "")
    return line if len(line) <= width else line[: width - 1] + "…"


@dataclass(frozen=True)
class Group:
    """Nodes that answered the same: their names, one of their entries, their state ids."""

    nodes: list[str]
    result: NodeResult  # the first node's entry: what every node of the group answered
    states: dict[str, list[str]]  # state id -> the nodes of the group that ran it

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def label(self) -> str:
        """``28 nodes``, or the node's name when it is alone."""
        return f"{len(self.nodes)} nodes" if len(self.nodes) > 1 else self.nodes[0]

    @property
    def headline(self) -> str:
        """The answer in one line: the value, ``ok, printed: …``, or the error."""
        r = self.result
        if r.ok:
            if r.value_repr is not None:
                return _first_line(r.value_repr, 80)
            if r.stdout.strip():
                return "ok, printed: " + _first_line(r.stdout, 66)
            n = len(r.outputs)
            return f"ok, displayed {n} output{'s' if n != 1 else ''}" if n else "ok, no output"
        err = r.error or {}
        if err.get("ename"):
            return _first_line(f"{err['ename']}: {err.get('evalue') or ''}".rstrip(": "), 80)
        if r.exit not in (None, 0):
            return f"{r.status.value}: exit status {r.exit}"
        return r.status.value

    @property
    def short(self) -> str:
        """The answer in a word, for a list of differences: the value, or the status."""
        r = self.result
        return _first_line(r.value_repr, 24) if r.ok and r.value_repr is not None \
            else r.status.value


def differences(groups: list[Group], most: int = 5) -> str:
    """The headline of all but the largest group: ``2 nodes differ: pc-07 → 41, pc-19 →
    error`` (at most ``most`` groups, three names each); empty when every node agrees."""
    rest = groups[1:]
    if not rest:
        return ""
    n = sum(len(g) for g in rest)
    parts = ["/".join(g.nodes[:3]) + (f" +{len(g) - 3}" if len(g) > 3 else "") + f" → {g.short}"
             for g in rest[:most]]
    if len(rest) > most:
        parts.append(f"… {len(rest) - most} more")
    who = f"all {n + len(groups[0])} nodes" if len(groups[0]) == 1 else \
        f"{n} node{'s' if n != 1 else ''}"
    return f"{who} differ{'s' if n == 1 and len(groups[0]) > 1 else ''}: " + ", ".join(parts)


def short_state(state: str) -> str:
    if len(state) >= 40 and all(c in "0123456789abcdef" for c in state[:40]):
        return state[:10] + ("+dirty" if "+dirty" in state else "")
    return state


def _painter(color: bool) -> Callable[[str, str], str]:
    def paint(s: str, code: str) -> str:
        return f"\x1b[{code}m{s}\x1b[0m" if color else s
    return paint


def _block(text: str) -> list[str]:  # a node's lines, each indented, escapes visible
    return [clean_lines(ln) for ln in text.rstrip("\n").split("\n")]


def _entry_lines(r: NodeResult, color: bool = False) -> list[str]:
    """What one node answered, every line indented under its header."""
    paint = _painter(color)
    lines: list[str] = []
    if r.stdout:
        lines.extend("  " + ln for ln in _block(r.stdout))
    if r.stderr:
        lines.extend("  " + paint(ln, "33") for ln in _block(r.stderr))
    if r.value_repr is not None:
        note = "" if r.value_json else "   (not JSON: shown as repr)"
        lines.append(f"  => {clean(r.value_repr)}{note}")
    if r.error and not r.ok:
        tb = r.error.get("traceback") or ""
        if tb:
            lines.extend("  " + ln for ln in _block(str(tb)))
        else:
            lines.append(clean(f"  {r.error.get('ename', '')}: {r.error.get('evalue', '')}"))
    if r.exit not in (None, 0) and not r.error:  # an error says it already
        lines.append(clean(f"  exit status {r.exit}"))
    if r.mismatch:
        lines.append(clean(f"  required state {r.mismatch.get('required')}, "
                           f"node has {short_state(str(r.mismatch.get('state')))}"))
        text = str(r.mismatch.get("text") or "")
        lines.extend("  " + ln for ln in _block(text) if text)
    return lines


def format_text(result: Result, color: bool = False, group: bool | None = None) -> str:
    """Readable per-node text for terminals; grouped by answer (``format_groups``) when
    ``group`` says so, or by default when the result is (``Result.grouped``)."""
    if group if group is not None else result.grouped:
        return format_groups(result, color)
    paint = _painter(color)
    lines: list[str] = []
    if result.extra.get("hint"):
        lines.append(clean(f"(ran without a state requirement: {result.extra['hint']})"))
    for name, r in result.nodes.items():
        dur = f"{r.duration * 1000:.1f} ms" if r.duration is not None else "-"
        st = paint(clean(r.status.value), "32" if r.ok else "31")
        same = "" if r.state == result.hub_state else " (differs from hub)"
        lines.append(f"[{clean(name)}] {st}  {dur}  state {clean(short_state(r.state))}{same}")
        lines.extend(_entry_lines(r, color))
    return "\n".join(lines)


def _states_text(g: Group, hub_state: str) -> str:
    def one(state: str) -> str:
        return short_state(state) + (" (same as hub)" if state == hub_state else
                                     " (differs from hub)")
    if len(g.states) == 1:
        return "state " + one(next(iter(g.states)))
    (most, many), *rest = g.states.items()  # the most common by its count, the others by name
    return "states " + "; ".join([f"{one(most)} {len(many)} node{'s' if len(many) != 1 else ''}",
                                  *(f"{one(s)}: {', '.join(ns)}" for s, ns in rest)])


def format_groups(result: Result, color: bool = False) -> str:
    """Readable text for many nodes: one entry per group of nodes that answered the same
    (``Result.groups``), the largest first, then what the others answered differently."""
    paint = _painter(color)
    lines: list[str] = []
    if result.extra.get("hint"):
        lines.append(clean(f"(ran without a state requirement: {result.extra['hint']})"))
    groups = result.groups()
    for i, g in enumerate(groups):
        if i == 1:
            lines.append(clean(differences(groups)))
        st = paint(clean(g.result.status.value), "32" if g.result.ok else "31")
        lines.append(f"[{clean(g.label)}] {st}  {clean(g.headline)}")
        if len(g) > 1:
            lines.append(clean(f"  nodes: {', '.join(g.nodes)}"))
        lines.append(clean(f"  {_states_text(g, result.hub_state)}"))
        lines.extend(_entry_lines(g.result, color))
    return "\n".join(lines)
