"""What an instance says about its state, and how two such reports differ (pure).

Owns the report's parts as data: ``Declaration`` (what the application says matters, and
its validation), ``Fingerprint`` (hashes of the environment, part by part) and
``StateInfo`` (state id, tree, declaration, fingerprint), each with the checked
``from_dict`` another instance's report goes through; and ``diff``/``format_diff``, the
hub's comparison of its report with a node's. Reading them off this machine (git, files,
installed packages) is odium.local's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, NoReturn

from ..errors import ConfigError, OdiumError, ProtocolError
from .requirements import STATE_RE, is_commit_id
from .term import CONTROL

PARTS = ("python", "packages", "system", "env", "files")
DECLARATION_KEYS = ("pip", "system", "env", "files")
RELATIONS = ("same", "ahead", "behind", "diverged", "unknown")
# what another instance may say about its state (StateInfo.from_dict): ids by their patterns,
# names and versions one printable line each, and not too many of them
_STATE = re.compile(STATE_RE)
_SHA = re.compile(r"^[0-9a-f]{64}\Z")
_LINE = re.compile(f"^[^{CONTROL}]{{0,4096}}\\Z")
MAX_ITEMS = 100_000  # entries in one list or map of a state report
_DEB = re.compile(r"^[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?\Z")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")


def _check_line(value: Any, what: str) -> str:
    """One printable line (no control characters, at most 4096 characters), or ProtocolError
    that names the field without echoing the bad text."""
    if not isinstance(value, str):
        raise ProtocolError(f"{what} must be a string, not {type(value).__name__}")
    if not _LINE.match(value):
        raise ProtocolError(f"{what} is not one printable line of at most 4096 characters "
                            f"(got {len(value)} characters)")
    return value


def _check_lines(values: Any, what: str) -> list[str]:
    if not isinstance(values, list):
        raise ProtocolError(f"{what} must be a list of strings")
    if len(values) > MAX_ITEMS:
        raise ProtocolError(f"{what} has {len(values)} entries, over the limit of {MAX_ITEMS}")
    return [_check_line(v, f"{what} entry") for v in values]


def canon(obj: Any) -> bytes:
    """The canonical JSON bytes of ``obj`` (sorted keys, no spaces, ASCII): what is hashed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


# --------------------------------------------------------------------------- declaration


@dataclass(frozen=True)
class Declaration:
    """What the application declares matters to its state (odium.local.appstate reads it:
    ``load_declaration``)."""

    pip: tuple[str, ...] = ()
    system: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    source: str = "none"

    def to_dict(self) -> dict[str, Any]:
        return {"pip": list(self.pip), "system": list(self.system), "env": list(self.env),
                "files": list(self.files), "source": self.source}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Declaration:
        """The inverse of ``to_dict``; a malformed dict raises ProtocolError."""
        if not isinstance(d, Mapping):
            raise ProtocolError(f"declaration: expected an object, got {type(d).__name__}")
        source = _check_line(d.get("source", "none"), "declaration: 'source'")
        table = {k: v for k, v in d.items() if k != "source"}
        for key, v in table.items():
            if isinstance(v, list):
                _check_lines(v, f"declaration: {_check_line(key, 'a declaration key')!r}")
        return parse_declaration(table, source, ProtocolError)


_EXAMPLES = {"pip": "['numpy>=1.26', 'requests']", "system": "['libhdf5-dev']",
             "env": "['OMP_NUM_THREADS']", "files": "['data/params.json']"}


def parse_declaration(table: Mapping[str, Any], source: str,
                      err: type[OdiumError] = ConfigError) -> Declaration:
    """The declaration a table (``[tool.odium]``, odium.toml, a report) says, checked entry by
    entry; ``err`` (naming ``source``) says what is wrong and what was expected."""
    def fail(msg: str) -> NoReturn:
        raise err(f"{source}: {msg}")

    unknown = sorted(set(table) - set(DECLARATION_KEYS))
    if unknown:
        fail(f"unknown key(s) {', '.join(unknown)}; expected only "
             f"{', '.join(DECLARATION_KEYS)} (each a list of strings)")
    values: dict[str, tuple[str, ...]] = {}
    for key in DECLARATION_KEYS:
        raw = table.get(key, [])
        if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
            fail(f"'{key}' must be a list of strings, e.g. {key} = {_EXAMPLES[key]}; "
                 f"got {raw!r}")
        values[key] = tuple(dict.fromkeys(s.strip() for s in raw))  # order kept, no repeats
    if values["pip"]:
        from packaging.requirements import InvalidRequirement, Requirement

        for s in values["pip"]:
            try:
                Requirement(s)
            except InvalidRequirement as e:
                fail(f"pip requirement {s!r} is not a PEP 508 requirement ({e}); "
                     "expected e.g. 'numpy>=1.26' or 'requests'")
    for s in values["system"]:
        if not _DEB.match(s):
            fail(f"system package {s!r} is not a Debian package name; "
                 "expected e.g. 'libhdf5-dev' (lower case, optional ':arch')")
    for s in values["env"]:
        if not _ENV.match(s):
            fail(f"environment variable {s!r} is not a variable name; "
                 "expected e.g. 'OMP_NUM_THREADS' (letters, digits, '_')")
    files: list[str] = []
    for s in values["files"]:
        p = PurePosixPath(s)
        bad = not s or "\\" in s or "\0" in s or s.startswith("~")
        if bad or p.is_absolute() or ".." in p.parts:
            fail(f"file {s!r} must be a path relative to the application, inside it "
                 "(no leading '/', '~' or '..'); expected e.g. 'data/params.json'")
        if str(p) == ".":
            fail(f"file {s!r} names the application directory itself; name a file in it")
        files.append(str(p))
    return Declaration(values["pip"], values["system"], values["env"],
                       tuple(dict.fromkeys(files)), source)


# --------------------------------------------------------------------------- fingerprint


@dataclass(frozen=True)
class Fingerprint:
    """Hashes of the environment, part by part, and what was hashed (env values hashed too)."""

    id: str
    parts: dict[str, str] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "parts": dict(self.parts), "detail": json.loads(canon(self.detail))}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Fingerprint:
        """The inverse of ``to_dict``; a malformed dict raises ProtocolError."""
        if not isinstance(d, Mapping):
            raise ProtocolError(f"fingerprint: expected an object, got {type(d).__name__}")
        fid, parts, detail = d.get("id"), d.get("parts", {}), d.get("detail", {})
        if not isinstance(fid, str) or not (fid == "" or _SHA.match(fid)):
            raise ProtocolError("fingerprint: 'id' must be a sha256 (64 hex digits)")
        if not isinstance(parts, dict) or not all(
                k in PARTS and isinstance(v, str) and _SHA.match(v) for k, v in parts.items()):
            raise ProtocolError(f"fingerprint: 'parts' must map part names ({', '.join(PARTS)}) "
                                "to sha256 hashes")
        if not isinstance(detail, dict) or not all(
                k in PARTS and isinstance(v, dict) for k, v in detail.items()):
            raise ProtocolError("fingerprint: 'detail' must map part names to objects")
        for part, entries in detail.items():
            if len(entries) > MAX_ITEMS:
                raise ProtocolError(f"fingerprint: detail {part!r} has too many entries")
            for k, v in entries.items():  # names -> versions or hashes (None: absent)
                _check_line(k, f"fingerprint: a name in {part!r}")
                if v is not None:
                    _check_line(v, f"fingerprint: the value of a name in {part!r}")
        return cls(fid, dict(parts), dict(detail))


# --------------------------------------------------------------------------- state info


@dataclass(frozen=True)
class StateInfo:
    """Everything one instance says about its state: id, tree, declaration, environment."""

    state: str
    commit: str | None
    dirty_files: tuple[str, ...]
    declaration: Declaration
    fingerprint: Fingerprint
    unsatisfied: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state, "commit": self.commit, "dirty_files": list(self.dirty_files),
                "declaration": self.declaration.to_dict(),
                "fingerprint": self.fingerprint.to_dict(), "unsatisfied": list(self.unsatisfied)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StateInfo:
        """The inverse of ``to_dict``; a malformed dict raises ProtocolError."""
        if not isinstance(d, Mapping):
            raise ProtocolError(f"state info: expected an object, got {type(d).__name__}")
        state, commit = d.get("state"), d.get("commit")
        dirty, unsat = d.get("dirty_files", []), d.get("unsatisfied", [])
        if not isinstance(state, str) or not _STATE.match(state):
            shown = f"{len(state)} characters" if isinstance(state, str) else type(state).__name__
            raise ProtocolError("state info: 'state' is not a state id (unknown, unversioned, a "
                                f"commit, or <commit>+dirty.<hash>); got {shown}")
        if commit is not None and not (isinstance(commit, str) and is_commit_id(commit)):
            raise ProtocolError("state info: 'commit' must be 40 hex digits or null")
        for key, v in (("dirty_files", dirty), ("unsatisfied", unsat)):
            _check_lines(v, f"state info: '{key}'")
        return cls(state, commit, tuple(dirty), Declaration.from_dict(d.get("declaration", {})),
                   Fingerprint.from_dict(d.get("fingerprint", {"id": ""})), tuple(unsat))


# --------------------------------------------------------------------------- diff


def _pairs(hub: Mapping[str, Any], node: Mapping[str, Any]) -> dict[str, list[Any]]:
    return {k: [hub.get(k), node.get(k)] for k in sorted(set(hub) | set(node))
            if hub.get(k) != node.get(k) or (k in hub) != (k in node)}


def diff(hub: StateInfo, node: StateInfo, relation: str | None = None) -> dict[str, Any]:
    """What differs between the hub's state and a node's, part by part; {} when nothing.

    Keys (present only when they differ): ``commit`` {hub, node, relation}; ``dirty`` (the
    node's uncommitted files) and ``hub_dirty`` (the hub's); ``packages`` {added, removed,
    changed} from the node's point of view; ``python`` {field: [hub, node]}; ``system``
    {package: [hub version, node version]} (None = missing); ``env`` (names only);
    ``files`` (paths); ``unsatisfied`` (the node's own declaration, not met on the node).
    ``relation`` comes from ``commit_relation`` on the hub; None reads as ``unknown``.
    """
    out: dict[str, Any] = {}
    if hub.commit != node.commit:
        out["commit"] = {"hub": hub.commit, "node": node.commit,
                         "relation": relation if relation in RELATIONS else "unknown"}
    if hub.state != node.state:
        if node.dirty_files:
            out["dirty"] = list(node.dirty_files)
        if hub.dirty_files:
            out["hub_dirty"] = list(hub.dirty_files)
    hp, np_ = hub.fingerprint.parts, node.fingerprint.parts
    hd, nd = hub.fingerprint.detail, node.fingerprint.detail
    if hp.get("packages") != np_.get("packages"):
        a, b = hd.get("packages", {}), nd.get("packages", {})
        pk = {"added": {k: b[k] for k in sorted(set(b) - set(a))},
              "removed": {k: a[k] for k in sorted(set(a) - set(b))},
              "changed": {k: [a[k], b[k]] for k in sorted(set(a) & set(b)) if a[k] != b[k]}}
        pk = {k: v for k, v in pk.items() if v}
        if pk:
            out["packages"] = pk
    for part in ("python", "system"):
        if hp.get(part) != np_.get(part):
            pairs = _pairs(hd.get(part, {}), nd.get(part, {}))
            if pairs:
                out[part] = pairs
    for part in ("env", "files"):
        if hp.get(part) != np_.get(part):
            names = sorted(_pairs(hd.get(part, {}), nd.get(part, {})))
            if names:
                out[part] = names
    if node.unsatisfied:
        out["unsatisfied"] = list(node.unsatisfied)
    return out


def _short(v: Any) -> str:
    if v is None:
        return "none"
    s = str(v)
    return s[:12] if is_commit_id(s) else s


def format_diff(d: Mapping[str, Any]) -> str:
    """``diff``'s result as readable lines, one difference per line."""
    if not d:
        return "same state and environment"
    lines: list[str] = []
    c = d.get("commit")
    if c:
        rel = c.get("relation", "unknown")
        words = {"same": "is at the hub's commit", "ahead": "is ahead of the hub",
                 "behind": "is behind the hub", "diverged": "has diverged from the hub",
                 "unknown": "is unknown to the hub"}.get(rel, rel)
        lines.append(f"commit: node {_short(c.get('node'))} {words} "
                     f"(hub {_short(c.get('hub'))})")
    for key, who in (("dirty", "node"), ("hub_dirty", "hub")):
        for f in d.get(key, []):
            lines.append(f"uncommitted on {who}: {f}")
    pk = d.get("packages", {})
    for name, v in pk.get("added", {}).items():
        lines.append(f"package only on node: {name} {v}")
    for name, v in pk.get("removed", {}).items():
        lines.append(f"package missing on node: {name} {v} (on hub)")
    for name, (a, b) in pk.get("changed", {}).items():
        lines.append(f"package {name}: {a} on hub, {b} on node")
    for k, (a, b) in d.get("python", {}).items():
        lines.append(f"python {k}: {a} on hub, {b} on node")
    for k, (a, b) in d.get("system", {}).items():
        lines.append(f"system package {k}: {a or 'missing'} on hub, {b or 'missing'} on node")
    for name in d.get("env", []):
        lines.append(f"environment variable differs: {name}")
    for path in d.get("files", []):
        lines.append(f"file differs: {path}")
    for s in d.get("unsatisfied", []):
        lines.append(f"not satisfied on node: {s}")
    return "\n".join(lines)
