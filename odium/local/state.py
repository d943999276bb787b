"""Application state: state ids, declarations, environment fingerprints, requirements, diffs, sync.

Everything here is pure or talks only to the local git repository (through GitPython),
the local Python installation (importlib.metadata) and dpkg-query; nothing imports zmq.
The hub, node, protocol and CLI are thin adapters around these functions.

Vocabulary
    state id      ``<40-hex commit>``, ``<commit>+dirty.<16 hex>`` or ``unversioned``.
    declaration   what the application says matters: pip requirements, Debian packages,
                  environment variable names and files, in ``pyproject.toml [tool.odium]``
                  or ``odium.toml``.
    fingerprint   hashes of the Python build, installed distributions, declared system
                  packages, declared environment variables (hashed) and declared files.
    requirement   ``any``, ``match`` (the issuer's own clean commit) or an explicit commit
                  (40 hex digits, or a prefix of at least 7).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, NoReturn

from ..core.term import CONTROL
from ..errors import ConfigError, OdiumError, ProtocolError, TimeoutError

if TYPE_CHECKING:
    import git

__all__ = [
    "UNVERSIONED", "UNKNOWN", "ANY", "MATCH", "PARTS", "StateError",
    "find_app", "state_id", "commit_of", "is_clean",
    "Declaration", "load_declaration",
    "Fingerprint", "fingerprint", "installed_packages", "clear_cache", "unsatisfied",
    "missing_system", "normalize_name",
    "StateInfo", "snapshot",
    "normalize_requirement", "satisfies", "default_requirement", "resolve_state",
    "commit_relation", "diff", "format_diff",
    "make_bundle", "apply_bundle", "install_declared",
]

UNVERSIONED = "unversioned"
UNKNOWN = "unknown"
ANY = "any"
MATCH = "match"
SYNC_REF = "refs/odium/sync"
PARTS = ("python", "packages", "system", "env", "files")
# what another instance may say about its state (StateInfo.from_dict): ids by their patterns,
# names and versions one printable line each, and not too many of them
_STATE = re.compile(r"^(unversioned|unknown|[0-9a-f]{40}(\+dirty\.[0-9a-f]{12,64})?)\Z")
_SHA = re.compile(r"^[0-9a-f]{64}\Z")
_LINE = re.compile(f"^[^{CONTROL}]{{0,4096}}\\Z")
MAX_ITEMS = 100_000  # entries in one list or map of a state report


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
DECLARATION_KEYS = ("pip", "system", "env", "files")
RELATIONS = ("same", "ahead", "behind", "diverged", "unknown")

_HEX40 = re.compile(r"^[0-9a-f]{40}\Z")
_PREFIX = re.compile(r"^[0-9a-f]{7,40}\Z")
_DEB = re.compile(r"^[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?\Z")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
_NORM = re.compile(r"[-_.]+")
_GIT_ENV = {"GIT_OPTIONAL_LOCKS": "0"}  # a status never rewrites the user's index
_RACY_NS = 1_000_000_000  # an mtime this close to "now" may hide a change: do not cache on it
_CACHE_MAX = 16
_CACHE_LOCK = threading.Lock()
_CACHE: dict[tuple[Any, ...], Fingerprint] = {}  # fingerprints, by _cache_key
_DIRTY_CACHE: dict[tuple[Any, ...], str] = {}  # dirty hashes, by _dirty_key


class StateError(OdiumError):
    """Sync or install could not bring this instance to the wanted state (nothing was lost)."""


def normalize_name(name: str) -> str:
    """The PEP 503 normalised form of a distribution name."""
    return _NORM.sub("-", name).lower()


def _canon(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- state id


def find_app(path: str | os.PathLike[str] | None = None) -> Path:
    """The application directory: the git work tree that holds ``path`` (default: cwd), or path."""
    start = Path(path or os.getcwd()).resolve()
    for p in (start, *start.parents):
        if (p / ".git").exists():
            return p
    return start


@dataclass(frozen=True)
class _Tree:
    """What git says about the work tree: commit, files that differ from it, state id."""

    commit: str | None
    dirty: tuple[str, ...]
    state: str


def _open_repo(app: str | os.PathLike[str]) -> git.Repo | None:
    try:
        import git
    except ImportError:  # pragma: no cover - GitPython is a dependency
        return None
    try:
        return git.Repo(app)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return None


def _head_commit(repo: git.Repo) -> str | None:
    """HEAD's commit id read from the refs alone (no object database process), or None."""
    from git.refs.symbolic import SymbolicReference

    try:
        sha = SymbolicReference.dereference_recursive(repo, "HEAD")
    except ValueError:  # unborn branch: no commit yet
        return None
    return sha if _HEX40.match(sha) else None


def _rev_commit(repo: git.Repo, rev: str) -> str | None:
    """The full id of the commit ``rev`` names in ``repo``, or None (never an option)."""
    import git

    if not rev or rev.startswith("-"):
        return None
    try:
        out = repo.git.rev_parse("--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}")
    except git.CommandError:
        return None
    out = str(out).strip()
    return out if _HEX40.match(out) else None


def _status(repo: git.Repo) -> tuple[bytes, list[str], list[str]]:
    """(raw status, every path that differs from HEAD, the untracked ones); no ignored files."""
    raw = repo.git.status("--porcelain=v1", "-z", "--untracked-files=all", "--no-renames",
                          env=_GIT_ENV, stdout_as_string=False, strip_newline_in_stdout=False)
    dirty: list[str] = []
    untracked: list[str] = []
    for entry in raw.split(b"\0"):
        if len(entry) < 4:
            continue
        path = entry[3:].decode("utf-8", "surrogateescape")
        dirty.append(path)
        if entry[:2] == b"??":
            untracked.append(path)
    return raw, sorted(set(dirty)), sorted(untracked)


def _dirty_hash(repo: git.Repo, root: Path, untracked: list[str]) -> str:
    """A hash of the diff against HEAD and of the untracked files' names and contents.

    Options pin the diff format so that the same dirty tree hashes the same on any machine,
    whatever the user's diff configuration.
    """
    h = hashlib.sha256(b"odium-dirty-v1\0")
    h.update(repo.git.diff("HEAD", "--binary", "--full-index", "--no-color", "--no-ext-diff",
                           "--no-textconv", "--no-renames", "--src-prefix=a/", "--dst-prefix=b/",
                           env=_GIT_ENV, stdout_as_string=False, strip_newline_in_stdout=False))
    for rel in untracked:
        name = rel.encode("utf-8", "surrogateescape")
        f = root / rel
        try:
            data = b"link\0" + os.readlink(f).encode() if f.is_symlink() else f.read_bytes()
        except OSError:
            data = b"unreadable"
        h.update(b"\0untracked\0" + name + b"\0" + len(data).to_bytes(8, "big") + data)
    return h.hexdigest()[:16]


def _dirty_key(repo: git.Repo, root: Path, commit: str, raw: bytes,
               dirty: list[str]) -> tuple[tuple[Any, ...], bool]:
    """(key, racy) for the dirty hash: the status, the index and every dirty file's stat.

    The diff is the slow part of a dirty state id; it is reused while nothing in the key
    changed and no mtime in it is recent enough to hide a change within one clock tick.
    """
    items: list[Any] = [str(root), commit, raw]
    newest = 0
    for p in [Path(repo.git_dir) / "index", *(root / d for d in dirty)]:
        try:
            st = os.lstat(p)
        except OSError:
            items.append(None)
            continue
        items.append((st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino, st.st_mode))
        newest = max(newest, st.st_mtime_ns, st.st_ctime_ns)
    return tuple(items), newest > time.time_ns() - _RACY_NS


def _bounded_put(cache: dict[Any, Any], key: Any, value: Any) -> None:
    while len(cache) >= _CACHE_MAX:
        cache.pop(next(iter(cache)))
    cache[key] = value


def _tree(app: str | os.PathLike[str]) -> _Tree:
    repo = _open_repo(app)
    if repo is None:
        return _Tree(None, (), UNVERSIONED)
    import git

    try:
        with repo:
            commit = _head_commit(repo)
            if commit is None:
                return _Tree(None, (), UNVERSIONED)
            raw, dirty, untracked = _status(repo)
            if not dirty:
                return _Tree(commit, (), commit)
            root = Path(repo.working_tree_dir or app)
            key, racy = _dirty_key(repo, root, commit, raw, dirty)
            with _CACHE_LOCK:
                digest = _DIRTY_CACHE.get(key)
            if digest is None:
                digest = _dirty_hash(repo, root, untracked)
                if not racy:
                    with _CACHE_LOCK:
                        _bounded_put(_DIRTY_CACHE, key, digest)
            return _Tree(commit, tuple(dirty), f"{commit}+dirty.{digest}")
    except git.CommandError:
        return _Tree(None, (), UNVERSIONED)


def state_id(app: str | os.PathLike[str]) -> str:
    """``<commit>``, ``<commit>+dirty.<hash>`` when the tree differs from it, or ``unversioned``.

    The dirty hash covers the diff against HEAD (staged and not) and every untracked,
    not ignored file's name and contents, so two different dirty trees get two ids.
    A directory that is not a git work tree, or one without a commit, is ``unversioned``.
    """
    return _tree(app).state


def commit_of(state: str) -> str | None:
    """The commit part of a state id, or None for ``unversioned``/``unknown``/garbage."""
    head = state.split("+", 1)[0]
    return head if _HEX40.match(head) else None


def is_clean(state: str) -> bool:
    """True for a state id that is exactly a commit (not dirty, not unversioned)."""
    return bool(_HEX40.match(state))


# --------------------------------------------------------------------------- declaration


@dataclass(frozen=True)
class Declaration:
    """What the application declares matters to its state (see ``load_declaration``)."""

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
        return _parse_declaration(table, source, ProtocolError)


_EXAMPLES = {"pip": "['numpy>=1.26', 'requests']", "system": "['libhdf5-dev']",
             "env": "['OMP_NUM_THREADS']", "files": "['data/params.json']"}


def _parse_declaration(table: Mapping[str, Any], source: str,
                       err: type[OdiumError] = ConfigError) -> Declaration:
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


def _read_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):  # imported here: a node's start does not need it
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None


def load_declaration(app: str | os.PathLike[str]) -> Declaration:
    """The application's declaration: ``[tool.odium]`` in pyproject.toml, or odium.toml.

    Both tables have the same keys, each a list of strings::

        [tool.odium]
        pip = ["numpy>=1.26", "requests"]      # PEP 508 requirements
        system = ["libhdf5-dev"]               # Debian packages (checked with dpkg-query)
        env = ["OMP_NUM_THREADS"]              # variables whose values matter (hashed)
        files = ["data/params.json"]           # files, relative to the app, that matter

    No declaration gives an empty one (source ``none``); a declaration in both places, an
    unknown key, a wrong type or a bad entry raises ConfigError saying what was expected.
    """
    root = Path(app)
    found: list[tuple[str, Any]] = []
    pyproject = root / "pyproject.toml"
    if pyproject.is_file():
        tool = _read_toml(pyproject).get("tool")
        if isinstance(tool, dict) and "odium" in tool:
            found.append(("pyproject.toml [tool.odium]", tool["odium"]))
    odium_toml = root / "odium.toml"
    if odium_toml.is_file():
        found.append(("odium.toml", _read_toml(odium_toml)))
    if len(found) > 1:
        raise ConfigError(f"{root}: the state is declared both in pyproject.toml [tool.odium] "
                          "and in odium.toml; keep exactly one of them")
    if not found:
        return Declaration()
    source, table = found[0]
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: expected a table with keys {', '.join(DECLARATION_KEYS)}")
    return _parse_declaration(table, source)


# --------------------------------------------------------------------------- fingerprint


@dataclass(frozen=True)
class Fingerprint:
    """Hashes of the environment, part by part, and what was hashed (env values hashed too)."""

    id: str
    parts: dict[str, str] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "parts": dict(self.parts), "detail": json.loads(_canon(self.detail))}

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


@cache
def _python_detail() -> dict[str, str]:
    return {"implementation": sys.implementation.name,
            "version": platform.python_version(),
            "abi": str(sysconfig.get_config_var("SOABI") or f"abiflags:{sys.abiflags}"),
            "platform": sysconfig.get_platform()}


def _name_version(text: str) -> tuple[str | None, str | None]:
    """Name and Version from a METADATA/PKG-INFO header, without the slow email parser."""
    name = version = None
    for line in text.splitlines():
        if not line:
            break  # end of the headers
        key, _, value = line.partition(":")
        key = key.lower()
        if key == "name":
            name = value.strip()
        elif key == "version":
            version = value.strip()
        if name is not None and version is not None:
            break
    return name, version


def installed_packages() -> dict[str, str]:
    """{normalised name: version} of every distribution importlib.metadata sees on sys.path.

    When a name is installed twice, the first one on sys.path (the one imported) wins.
    """
    import importlib.metadata  # here, not at import: a node's start does not need it

    out: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        try:
            text = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""
        except (OSError, UnicodeDecodeError):
            continue
        name, version = _name_version(text)
        if not name:
            continue
        norm = normalize_name(name)
        if norm not in out:
            out[norm] = version or ""
    return dict(sorted(out.items()))


def _system_detail(names: Iterable[str], timeout: float = 10.0) -> dict[str, str | None]:
    """{package: version, or None when not installed or when there is no dpkg-query}."""
    wanted = list(names)
    out: dict[str, str | None] = {n: None for n in wanted}
    exe = shutil.which("dpkg-query")
    if not wanted or exe is None:
        return out
    fmt = "--showformat=${Package}\\t${binary:Package}\\t${db:Status-Abbrev}\\t${Version}\\n"
    try:
        r = subprocess.run([exe, "-W", fmt, *wanted], capture_output=True, text=True,
                           timeout=timeout, env={**os.environ, "LC_ALL": "C"})
    except (OSError, subprocess.TimeoutExpired):
        return out
    found: dict[str, set[str]] = {}
    for line in r.stdout.splitlines():
        cols = line.split("\t")
        if len(cols) != 4 or len(cols[2]) < 2 or cols[2][1] != "i" or not cols[3]:
            continue  # not installed (e.g. only its configuration files are left)
        pkg, binary, _, version = cols
        for n in wanted:
            if n in (pkg, binary):
                found.setdefault(n, set()).add(version)
    for n, versions in found.items():
        out[n] = ",".join(sorted(versions))
    return out


def _env_hash(name: str, value: str) -> str:
    """A variable's value, hashed with its name (the same value in two variables differs)."""
    data = value.encode("utf-8", "surrogateescape")
    return _sha(b"odium-env-v1\0" + name.encode() + b"\0" + data)


def _env_detail(names: Iterable[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for n in names:
        value = os.environ.get(n)
        out[n] = None if value is None else _env_hash(n, value)
    return out


def _file_hash(path: Path) -> str | None:
    try:
        if not path.is_file():
            return None
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    except OSError:
        return None


def _files_detail(app: Path, paths: Iterable[str]) -> dict[str, str | None]:
    return {p: _file_hash(app / p) for p in paths}


def _compute(app: Path, decl: Declaration) -> Fingerprint:
    importlib.invalidate_caches()
    detail: dict[str, Any] = {
        "python": dict(_python_detail()),
        "packages": installed_packages(),
        "system": _system_detail(decl.system),
        "env": _env_detail(decl.env),
        "files": _files_detail(app, decl.files),
    }
    parts = {k: _sha(_canon(detail[k])) for k in PARTS}
    return Fingerprint(_sha(_canon(parts)), parts, detail)


def _git_dir(app: Path) -> Path | None:
    dot = app / ".git"
    if dot.is_dir():
        return dot
    try:
        text = dot.read_text().strip()  # a worktree or submodule: "gitdir: <path>"
    except OSError:
        return None
    if text.startswith("gitdir:"):
        p = Path(text[7:].strip())
        return p if p.is_absolute() else (app / p)
    return None


def _cache_key(app: Path, decl: Declaration) -> tuple[tuple[Any, ...], bool]:
    """(key, racy): everything the fingerprint depends on, cheap to stat.

    Racy means some mtime in the key is so recent that a change within the same clock
    tick could go unseen; such a fingerprint is computed but not cached.
    """
    items: list[Any] = [sys.executable, tuple(sys.path), str(app), decl]
    newest = 0
    for entry in sys.path:
        p = entry or os.getcwd()
        try:
            st = os.stat(p)
        except OSError:
            items.append((p, None))
            continue
        newest = max(newest, st.st_mtime_ns)
        count = -1
        if os.path.isdir(p):
            try:
                with os.scandir(p) as it:
                    count = sum(1 for e in it if e.name.endswith((".dist-info", ".egg-info")))
            except OSError:
                pass
        items.append((p, st.st_mtime_ns, st.st_size, count))
    gd = _git_dir(app)
    if gd is not None:
        try:
            head = (gd / "HEAD").read_text().strip()
        except OSError:
            head = ""
        items.append(head)
        if head.startswith("ref:"):
            try:
                items.append((gd / head[4:].strip()).read_text().strip())
            except OSError:
                items.append(None)
        try:
            st = os.stat(gd / "packed-refs")
            items.append((st.st_mtime_ns, st.st_size))
            newest = max(newest, st.st_mtime_ns)
        except OSError:
            items.append(None)
    items.append(tuple(_env_detail(decl.env).items()))
    for rel in decl.files:
        try:
            st = os.stat(app / rel)
            items.append((rel, st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino))
            newest = max(newest, st.st_mtime_ns, st.st_ctime_ns)
        except OSError:
            items.append((rel, None))
    if decl.system:
        try:
            st = os.stat("/var/lib/dpkg/status")
            items.append((st.st_mtime_ns, st.st_size))
            newest = max(newest, st.st_mtime_ns)
        except OSError:
            items.append(None)
    return tuple(items), newest > time.time_ns() - _RACY_NS




def clear_cache() -> None:
    """Forget every cached fingerprint and dirty hash (the next calls are cold)."""
    with _CACHE_LOCK:
        _CACHE.clear()
        _DIRTY_CACHE.clear()
    _python_detail.cache_clear()


def fingerprint(app: str | os.PathLike[str], decl: Declaration, *,
                use_cache: bool = True) -> Fingerprint:
    """This process's environment fingerprint for the application ``app`` and ``decl``.

    Parts: ``python`` (implementation, version, ABI, platform), ``packages`` (every
    installed distribution, normalised name -> version), ``system`` (declared Debian
    packages -> version or None), ``env`` (declared variables -> hash of the value, or None
    when unset; never the value) and ``files`` (declared files -> sha256, or None).

    Cached in-process; recomputed when a sys.path directory (site-packages), the git HEAD
    or the branch it points to, a declared file, a declared variable, the dpkg database or
    the declaration itself changes.
    """
    root = Path(app)
    key, racy = _cache_key(root, decl)
    if use_cache:
        with _CACHE_LOCK:
            hit = _CACHE.get(key)
        if hit is not None:
            return hit
    fp = _compute(root, decl)
    if not racy:
        with _CACHE_LOCK:
            _bounded_put(_CACHE, key, fp)
    return fp


def unsatisfied(decl: Declaration, packages: Mapping[str, str]) -> list[str]:
    """Declared pip requirements that ``packages`` (name -> version) does not satisfy.

    Each entry reads like ``numpy>=2 (installed 1.26.4)`` or ``requests (not installed)``.
    Requirements whose environment marker is false here are skipped; pre-releases count.
    """
    if not decl.pip:
        return []
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion, Version

    out: list[str] = []
    for s in decl.pip:
        req = Requirement(s)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        version = packages.get(normalize_name(req.name))
        if version is None:
            out.append(f"{s} (not installed)")
            continue
        if not req.specifier:
            continue
        try:
            ok = req.specifier.contains(Version(version), prereleases=True)
        except InvalidVersion:
            out.append(f"{s} (installed {version}, not a PEP 440 version)")
            continue
        if not ok:
            out.append(f"{s} (installed {version})")
    return out


def missing_system(fp: Fingerprint) -> list[str]:
    """Declared system packages that are not installed (or cannot be checked: no dpkg-query)."""
    system = fp.detail.get("system", {})
    return sorted(k for k, v in system.items() if v is None)


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
        if commit is not None and not (isinstance(commit, str) and _HEX40.match(commit)):
            raise ProtocolError("state info: 'commit' must be 40 hex digits or null")
        for key, v in (("dirty_files", dirty), ("unsatisfied", unsat)):
            _check_lines(v, f"state info: '{key}'")
        return cls(state, commit, tuple(dirty), Declaration.from_dict(d.get("declaration", {})),
                   Fingerprint.from_dict(d.get("fingerprint", {"id": ""})), tuple(unsat))


def snapshot(app: str | os.PathLike[str], decl: Declaration | None = None, *,
             use_cache: bool = True) -> StateInfo:
    """This instance's state for ``app``; ``decl`` defaults to ``load_declaration(app)``.

    Raises ConfigError when the declaration is malformed and ``decl`` is not given.
    """
    root = Path(app)
    tree = _tree(root)
    decl = load_declaration(root) if decl is None else decl
    fp = fingerprint(root, decl, use_cache=use_cache)
    return StateInfo(tree.state, tree.commit, tree.dirty, decl, fp,
                     tuple(unsatisfied(decl, fp.detail["packages"])))


# --------------------------------------------------------------------------- requirements


def normalize_requirement(required: str) -> str:
    """``any``, ``match`` or a lower-case hex commit (7 to 40 digits); else ConfigError."""
    r = required.strip().lower() if isinstance(required, str) else ""
    if r in (ANY, MATCH) or _PREFIX.match(r):
        return r
    raise ConfigError(f"required state {required!r}: expected 'any', 'match' or a commit id "
                      "(40 hex digits, or a prefix of at least 7)")


def satisfies(required: str, state: str, own_state: str) -> bool:
    """Whether a node in ``state`` may run a command that requires ``required``.

    ``own_state`` is the issuer's state, used by ``match``.

    * ``any``: always.
    * ``match``: the issuer's state is a clean commit and ``state`` is exactly it.
    * a commit id: ``state`` is a clean commit equal to it, or starting with it when it is
      a prefix (7 to 39 hex digits). Issuers should send full ids (``resolve_state``): a
      prefix is compared, never resolved, on the node.

    A dirty, unversioned or unknown ``state`` satisfies nothing but ``any``; a malformed
    ``required`` is never satisfied (``normalize_requirement`` reports it to the user).
    """
    r = required.strip().lower() if isinstance(required, str) else ""
    if r == ANY:
        return True
    if not is_clean(state):
        return False
    if r == MATCH:
        return is_clean(own_state) and state == own_state
    return bool(_PREFIX.match(r)) and state.startswith(r)


def default_requirement(own_state: str) -> tuple[str, str | None]:
    """(requirement, hint): ``match`` for a clean commit, else ``any`` and how to version it."""
    if is_clean(own_state):
        return MATCH, None
    if commit_of(own_state):
        return ANY, ("the application has uncommitted changes, so commands run on any state: "
                     "commit them (git add -A && git commit -m '...') so nodes can require "
                     "this exact state")
    return ANY, ("the application is not a git repository with a commit, so commands run on "
                 "any state: version it (git init && git add -A && git commit -m '...') so "
                 "nodes can require this exact state")


def resolve_state(app: str | os.PathLike[str], rev: str) -> str:
    """A user's revision (branch, tag, short id, ``HEAD~1``) as the full 40-hex commit."""
    repo = _open_repo(app)
    if repo is None:
        raise ConfigError(f"{app}: not a git repository, cannot resolve state {rev!r}")
    if not rev or rev.startswith("-"):
        raise ConfigError(f"state {rev!r}: expected a commit, branch or tag")
    with repo:
        sha = _rev_commit(repo, rev)
    if sha is None:
        raise ConfigError(f"state {rev!r}: no such commit in {app}")
    return sha


# --------------------------------------------------------------------------- diff


def commit_relation(app: str | os.PathLike[str], hub_commit: str, node_commit: str) -> str:
    """How the node's commit relates to the hub's, seen from the hub's repository.

    ``same``; ``behind`` (the node's commit is an ancestor of the hub's); ``ahead`` (the
    hub's is an ancestor of the node's); ``diverged``; ``unknown`` (either is not a commit
    in the hub's repository). State ids are accepted: the ``+dirty`` part is ignored.
    """
    hub_c, node_c = commit_of(hub_commit or ""), commit_of(node_commit or "")
    if hub_c is None or node_c is None:
        return "unknown"
    if hub_c == node_c:
        return "same"
    repo = _open_repo(app)
    if repo is None:
        return "unknown"
    import git

    with repo:
        if _rev_commit(repo, hub_c) is None or _rev_commit(repo, node_c) is None:
            return "unknown"
        try:
            hub_obj, node_obj = repo.commit(hub_c), repo.commit(node_c)
            if repo.is_ancestor(node_obj, hub_obj):
                return "behind"
            if repo.is_ancestor(hub_obj, node_obj):
                return "ahead"
            return "diverged"
        except (ValueError, git.CommandError):
            return "unknown"


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
    return s[:12] if _HEX40.match(s) else s


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


# --------------------------------------------------------------------------- sync


_BUNDLE_LOCK = threading.Lock()


def make_bundle(app: str | os.PathLike[str], target: str, have: Iterable[str]) -> bytes:
    """A git bundle of the commits reachable from ``target`` and not from ``have``.

    ``have`` lists the node's commits (its HEAD, branches); ids unknown to this repository
    or not 40-hex are ignored. The bundle's one ref, ``refs/odium/sync``, points at target;
    the hub's repository keeps that ref at the last commit it bundled. When the node already
    has ``target``, the bundle holds just that commit (prerequisites: its parents), so
    ``apply_bundle`` works the same way.
    """
    repo = _open_repo(app)
    if repo is None:
        raise StateError(f"{app}: not a git repository; nothing to sync from")
    import git

    with repo, _BUNDLE_LOCK, tempfile.TemporaryDirectory(prefix="odium-bundle-") as tmp:
        sha = _rev_commit(repo, target) if isinstance(target, str) else None
        if sha is None:
            raise StateError(f"sync target {target!r} is not a commit in {app}")
        commit = repo.commit(sha)
        known = [h for h in dict.fromkeys(have)
                 if isinstance(h, str) and _HEX40.match(h) and _rev_commit(repo, h) == h]
        exclude = [f"^{h}" for h in known]
        try:
            repo.git.update_ref(SYNC_REF, sha)
            missing = repo.git.rev_list("--count", sha, *exclude).strip()
            if missing == "0":  # the node has it: send the commit alone
                exclude = [f"^{p.hexsha}" for p in commit.parents]
            out = Path(tmp) / "sync.bundle"
            repo.git.bundle("create", str(out), SYNC_REF, *exclude)
        except git.CommandError as e:
            raise StateError(f"git bundle create failed: {_last_lines(e.stderr)}") from None
        return out.read_bytes()


def _last_lines(text: Any, n: int = 5) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = str(text or "").strip()
    if text.startswith("stderr: '") and text.endswith("'"):  # GitCommandError's framing
        text = text[9:-1]
    lines = [ln.strip() for ln in str(text or "").strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:]) or "(no output)"


def apply_bundle(app: str | os.PathLike[str], data: bytes, target: str) -> None:
    """Check out exactly ``target`` from the bundle ``data`` (from ``make_bundle``).

    Refuses, with StateError and without touching anything, when the work tree has
    uncommitted changes or untracked files (ignored files do not count). Otherwise: verify
    the bundle against this repository, fetch its ``refs/odium/sync``, check that it is
    ``target``, then move to it. When HEAD is a branch and ``target`` is ahead of it, the
    branch is fast-forwarded (``git merge --ff-only``); in every other case (detached,
    diverged, node ahead, no commit yet) HEAD is detached at ``target`` and the branch is
    left where it was, so no commit is lost.
    """
    if not isinstance(target, str) or not _HEX40.match(target):
        raise StateError(f"sync target {target!r}: expected a full 40-hex commit id")
    repo = _open_repo(app)
    if repo is None:
        raise StateError(f"{app}: not a git repository; cannot sync it (clone the "
                         "application there first)")
    import git

    with repo:
        try:
            _apply(repo, str(app), data, target)
        except git.CommandError as e:  # any git step not already explained below
            raise StateError(f"sync of {app} failed: {_last_lines(e.stderr)}") from None


def _apply(repo: git.Repo, app: str, data: bytes, target: str) -> None:
    import git

    _, dirty, _ = _status(repo)
    if dirty:
        more = f" and {len(dirty) - 5} more" if len(dirty) > 5 else ""
        raise StateError(f"refusing to sync {app}: it has uncommitted changes or untracked "
                         f"files ({', '.join(dirty[:5])}{more}); commit, stash or remove them "
                         "first")
    fd, name = tempfile.mkstemp(prefix="odium-sync-", suffix=".bundle")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            repo.git.bundle("verify", name)
        except git.CommandError as e:
            raise StateError(f"the bundle does not verify against {app}: "
                             f"{_last_lines(e.stderr)}") from None
        heads: dict[str, str] = {}
        for line in repo.git.bundle("list-heads", name).splitlines():
            sha, _, ref = line.partition(" ")
            heads[ref.strip()] = sha.strip()
        if heads.get(SYNC_REF) != target:
            raise StateError(f"the bundle's {SYNC_REF} is {heads.get(SYNC_REF)!r}, "
                             f"not the expected {target}")
        try:
            repo.git.fetch("--no-tags", "--quiet", name, f"+{SYNC_REF}:{SYNC_REF}")
        except git.CommandError as e:
            raise StateError(f"git fetch from the bundle failed: {_last_lines(e.stderr)}") \
                from None
    finally:
        os.unlink(name)
    fetched = _rev_commit(repo, SYNC_REF)
    if fetched != target:
        raise StateError(f"fetched {fetched}, not the expected {target}")
    head = _head_commit(repo)
    try:
        if (head is not None and not repo.head.is_detached
                and repo.is_ancestor(repo.commit(head), repo.commit(target))):
            repo.git.merge("--ff-only", "--quiet", target)
        else:
            repo.git.checkout("--detach", "--quiet", target)
    except git.CommandError as e:
        raise StateError(f"checking out {target} failed: {_last_lines(e.stderr)}") from None
    now = _head_commit(repo)
    if now != target:
        raise StateError(f"after the sync HEAD is {now}, not {target}")


def install_declared(decl: Declaration, python: str = sys.executable,
                     find_links: str | None = None, index_url: str | None = None, *,
                     timeout: float = 600.0) -> list[str]:
    """``python -m pip install`` the declared requirements; the distributions installed.

    With ``find_links`` and no ``index_url``, pip looks only in ``find_links`` (no index:
    wheels the hub sent). Returns ``["name-version", ...]`` as pip reports them (empty when
    everything was already satisfied). Raises StateError with pip's last lines when pip
    fails, and odium's TimeoutError after ``timeout`` seconds.
    """
    if not decl.pip:
        return []
    cmd = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    if find_links:
        cmd += ["--find-links", find_links]
        if not index_url:
            cmd.append("--no-index")
    if index_url:
        cmd += ["--index-url", index_url]
    cmd += list(decl.pip)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"pip install did not finish within {timeout} s") from None
    except OSError as e:
        raise StateError(f"cannot run {python} -m pip: {e.strerror}") from None
    if r.returncode != 0:
        raise StateError(f"pip install {' '.join(decl.pip)} failed (exit {r.returncode}): "
                         f"{_last_lines(r.stderr or r.stdout)}")
    done: list[str] = []
    for line in r.stdout.splitlines():
        if line.startswith("Successfully installed "):
            done += line[len("Successfully installed "):].split()
    return done


def head_ref(app: str | os.PathLike[str]) -> tuple[str | None, str]:
    """Where HEAD is: (branch name or None when detached, commit), to come back to it."""
    import git

    try:
        with git.Repo(app) as repo:
            sha = repo.head.commit.hexsha
            branch = None if repo.head.is_detached else repo.active_branch.name
            return branch, sha
    except (git.GitError, ValueError, TypeError) as e:
        raise StateError(f"cannot read HEAD in {app}: {e}") from None


def restore_head(app: str | os.PathLike[str], where: tuple[str | None, str]) -> None:
    """Put HEAD (and its branch) back where ``head_ref`` found it. The tree was clean before a
    sync and holds only the sync's checkout, so nothing of the user's is lost."""
    import git

    branch, sha = where
    try:
        with git.Repo(app) as repo:
            if branch is None:
                repo.git.checkout("--quiet", "--detach", sha)
            else:
                repo.git.checkout("--quiet", branch)
                repo.git.reset("--quiet", "--hard", sha)
    except git.GitError as e:
        raise StateError(f"cannot put {app} back to {sha[:12]}: {e}") from None
