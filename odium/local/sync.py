"""Bringing this machine's application to a commit: git bundles made and applied, HEAD
saved and put back, and the declared pip requirements installed.

Refuses rather than loses: a tree with uncommitted or untracked files is never synced, and
a branch is only fast-forwarded (StateError says why not, with git's or pip's last lines).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.requirements import is_commit_id
from ..core.statediff import Declaration
from ..errors import StateError, TimeoutError
from .appstate import git_status, head_commit, open_repo, rev_commit

if TYPE_CHECKING:
    import git

SYNC_REF = "refs/odium/sync"


_BUNDLE_LOCK = threading.Lock()


def make_bundle(app: str | os.PathLike[str], target: str, have: Iterable[str]) -> bytes:
    """A git bundle of the commits reachable from ``target`` and not from ``have``.

    ``have`` lists the node's commits (its HEAD, branches); ids unknown to this repository
    or not 40-hex are ignored. The bundle's one ref, ``refs/odium/sync``, points at target;
    the hub's repository keeps that ref at the last commit it bundled. When the node already
    has ``target``, the bundle holds just that commit (prerequisites: its parents), so
    ``apply_bundle`` works the same way.
    """
    repo = open_repo(app)
    if repo is None:
        raise StateError(f"{app}: not a git repository; nothing to sync from")
    import git

    with repo, _BUNDLE_LOCK, tempfile.TemporaryDirectory(prefix="odium-bundle-") as tmp:
        sha = rev_commit(repo, target) if isinstance(target, str) else None
        if sha is None:
            raise StateError(f"sync target {target!r} is not a commit in {app}")
        commit = repo.commit(sha)
        known = [h for h in dict.fromkeys(have)
                 if isinstance(h, str) and is_commit_id(h) and rev_commit(repo, h) == h]
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
    if not isinstance(target, str) or not is_commit_id(target):
        raise StateError(f"sync target {target!r}: expected a full 40-hex commit id")
    repo = open_repo(app)
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

    _, dirty, _ = git_status(repo)
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
    fetched = rev_commit(repo, SYNC_REF)
    if fetched != target:
        raise StateError(f"fetched {fetched}, not the expected {target}")
    head = head_commit(repo)
    try:
        if (head is not None and not repo.head.is_detached
                and repo.is_ancestor(repo.commit(head), repo.commit(target))):
            repo.git.merge("--ff-only", "--quiet", target)
        else:
            repo.git.checkout("--detach", "--quiet", target)
    except git.CommandError as e:
        raise StateError(f"checking out {target} failed: {_last_lines(e.stderr)}") from None
    now = head_commit(repo)
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
