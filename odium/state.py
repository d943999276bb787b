"""State ids: which version of the application an instance runs (git commit, dirty, or none)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

UNVERSIONED = "unversioned"


def find_app(path: str | os.PathLike[str] | None = None) -> Path:
    """The application directory: the git work tree that holds ``path`` (default: cwd), or path."""
    start = Path(path or os.getcwd()).resolve()
    for p in (start, *start.parents):
        if (p / ".git").exists():
            return p
    return start


def state_id(app: str | os.PathLike[str]) -> str:
    """``<commit>``, ``<commit>+dirty.<hash>`` when the tree differs from it, or ``unversioned``."""
    try:
        import git
    except ImportError:  # pragma: no cover - GitPython is a dependency
        return UNVERSIONED
    try:
        repo = git.Repo(app)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return UNVERSIONED
    try:
        with repo:
            try:
                commit = repo.head.commit.hexsha
            except ValueError:  # no commit yet
                return UNVERSIONED
            out = repo.git.status("--porcelain=v1", "-z", "--untracked-files=all")
            if not out:
                return commit
            h = hashlib.sha256()
            h.update(repo.git.diff("HEAD", "--binary").encode("utf-8", "surrogateescape"))
            for entry in out.split("\0"):
                if entry.startswith("?? "):
                    rel = entry[3:]
                    h.update(rel.encode("utf-8", "surrogateescape") + b"\0")
                    f = Path(repo.working_tree_dir or app) / rel
                    try:
                        h.update(f.read_bytes())
                    except OSError:
                        pass
            return f"{commit}+dirty.{h.hexdigest()[:16]}"
    except git.GitCommandError:
        return UNVERSIONED
