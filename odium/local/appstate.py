"""The application on this machine: its directory, its git tree and state id, its
declaration file, and the snapshot of its state (StateInfo).

Talks to the local git repository through GitPython (imported when first needed) and reads
``pyproject.toml [tool.odium]`` or ``odium.toml``; what a state id or requirement means is
odium.core.requirements's, the report's form odium.core.statediff's.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.requirements import UNVERSIONED, commit_of, is_commit_id
from ..core.statediff import DECLARATION_KEYS, Declaration, StateInfo, parse_declaration
from ..errors import ConfigError
from .fingerprint import RACY_NS, BoundedCache, fingerprint, unsatisfied

if TYPE_CHECKING:
    import git

_GIT_ENV = {"GIT_OPTIONAL_LOCKS": "0"}  # a status never rewrites the user's index
_DIRTY_CACHE: BoundedCache[str] = BoundedCache()  # dirty hashes, by _dirty_key


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


def open_repo(app: str | os.PathLike[str]) -> git.Repo | None:
    """The git repository at ``app`` (use it in a ``with``), or None when there is none."""
    try:
        import git
    except ImportError:  # pragma: no cover - GitPython is a dependency
        return None
    try:
        return git.Repo(app)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return None


def head_commit(repo: git.Repo) -> str | None:
    """HEAD's commit id read from the refs alone (no object database process), or None."""
    from git.refs.symbolic import SymbolicReference

    try:
        sha = SymbolicReference.dereference_recursive(repo, "HEAD")
    except ValueError:  # unborn branch: no commit yet
        return None
    return sha if is_commit_id(sha) else None


def rev_commit(repo: git.Repo, rev: str) -> str | None:
    """The full id of the commit ``rev`` names in ``repo``, or None (never an option)."""
    import git

    if not rev or rev.startswith("-"):
        return None
    try:
        out = repo.git.rev_parse("--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}")
    except git.CommandError:
        return None
    out = str(out).strip()
    return out if is_commit_id(out) else None


def git_status(repo: git.Repo) -> tuple[bytes, list[str], list[str]]:
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
    return tuple(items), newest > time.time_ns() - RACY_NS


def _tree(app: str | os.PathLike[str]) -> _Tree:
    repo = open_repo(app)
    if repo is None:
        return _Tree(None, (), UNVERSIONED)
    import git

    try:
        with repo:
            commit = head_commit(repo)
            if commit is None:
                return _Tree(None, (), UNVERSIONED)
            raw, dirty, untracked = git_status(repo)
            if not dirty:
                return _Tree(commit, (), commit)
            root = Path(repo.working_tree_dir or app)
            key, racy = _dirty_key(repo, root, commit, raw, dirty)
            digest = _DIRTY_CACHE.get(key)
            if digest is None:
                digest = _dirty_hash(repo, root, untracked)
                if not racy:
                    _DIRTY_CACHE.put(key, digest)
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


# --------------------------------------------------------------------------- declaration


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
    return parse_declaration(table, source)


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


# --------------------------------------------------------------------------- commits


def resolve_state(app: str | os.PathLike[str], rev: str) -> str:
    """A user's revision (branch, tag, short id, ``HEAD~1``) as the full 40-hex commit."""
    repo = open_repo(app)
    if repo is None:
        raise ConfigError(f"{app}: not a git repository, cannot resolve state {rev!r}")
    if not rev or rev.startswith("-"):
        raise ConfigError(f"state {rev!r}: expected a commit, branch or tag")
    with repo:
        sha = rev_commit(repo, rev)
    if sha is None:
        raise ConfigError(f"state {rev!r}: no such commit in {app}")
    return sha


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
    repo = open_repo(app)
    if repo is None:
        return "unknown"
    import git

    with repo:
        if rev_commit(repo, hub_c) is None or rev_commit(repo, node_c) is None:
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
