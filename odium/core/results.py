"""Results of a broadcast: one NodeResult per targeted node, gathered in a Result. Pure data."""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import RemoteError
from .term import clean, clean_lines


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


def short_state(state: str) -> str:
    if len(state) >= 40 and all(c in "0123456789abcdef" for c in state[:40]):
        return state[:10] + ("+dirty" if "+dirty" in state else "")
    return state


def format_text(result: Result, color: bool = False) -> str:
    """Readable per-node text for terminals."""
    def paint(s: str, code: str) -> str:
        return f"\x1b[{code}m{s}\x1b[0m" if color else s

    def block(text: str) -> list[str]:  # a node's lines, each indented, escapes visible
        return [clean_lines(ln) for ln in text.rstrip("\n").split("\n")]

    lines: list[str] = []
    if result.extra.get("hint"):
        lines.append(clean(f"(ran without a state requirement: {result.extra['hint']})"))
    for name, r in result.nodes.items():
        dur = f"{r.duration * 1000:.1f} ms" if r.duration is not None else "-"
        st = paint(clean(r.status.value), "32" if r.ok else "31")
        same = "" if r.state == result.hub_state else " (differs from hub)"
        lines.append(f"[{clean(name)}] {st}  {dur}  state {clean(short_state(r.state))}{same}")
        if r.stdout:
            lines.extend("  " + ln for ln in block(r.stdout))
        if r.stderr:
            lines.extend("  " + paint(ln, "33") for ln in block(r.stderr))
        if r.value_repr is not None:
            note = "" if r.value_json else "   (not JSON: shown as repr)"
            lines.append(f"  => {clean(r.value_repr)}{note}")
        if r.error and not r.ok:
            tb = r.error.get("traceback") or ""
            if tb:
                lines.extend("  " + ln for ln in block(str(tb)))
            else:
                lines.append(clean(f"  {r.error.get('ename', '')}: {r.error.get('evalue', '')}"))
        if r.exit not in (None, 0) and not r.error:  # an error says it already
            lines.append(clean(f"  exit status {r.exit}"))
        if r.mismatch:
            lines.append(clean(f"  required state {r.mismatch.get('required')}, "
                               f"node has {short_state(str(r.mismatch.get('state')))}"))
            text = str(r.mismatch.get("text") or "")
            lines.extend("  " + ln for ln in block(text) if text)
    return "\n".join(lines)
