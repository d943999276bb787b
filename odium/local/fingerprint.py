"""Environment fingerprints of this machine: Python, installed packages, declared system
packages, environment variables and files, hashed part by part, and the in-process cache.

A fingerprint is recomputed only when something it depends on may have changed (a sys.path
directory, the git HEAD, a declared file or variable, the dpkg database); ``BoundedCache``
holds it, and the dirty hashes of odium.local.appstate, until ``clear_cache``.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from ..core.statediff import PARTS, Declaration, Fingerprint, canon

V = TypeVar("V")
_NORM = re.compile(r"[-_.]+")
RACY_NS = 1_000_000_000  # an mtime this close to "now" may hide a change: do not cache on it
_CACHE_MAX = 16


class BoundedCache(Generic[V]):
    """A map shared by threads that forgets its oldest entry past ``size`` entries.

    ``clear_cache`` empties every one (fingerprints here, dirty hashes in appstate)."""

    every: ClassVar[list[BoundedCache[Any]]] = []

    def __init__(self, size: int = _CACHE_MAX) -> None:
        self._lock = threading.Lock()
        self._items: dict[Any, V] = {}
        self._size = size
        BoundedCache.every.append(self)

    def get(self, key: Any) -> V | None:
        with self._lock:
            return self._items.get(key)

    def put(self, key: Any, value: V) -> None:
        with self._lock:
            while len(self._items) >= self._size:
                self._items.pop(next(iter(self._items)))
            self._items[key] = value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_CACHE: BoundedCache[Fingerprint] = BoundedCache()  # fingerprints, by _cache_key


def normalize_name(name: str) -> str:
    """The PEP 503 normalised form of a distribution name."""
    return _NORM.sub("-", name).lower()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
    parts = {k: _sha(canon(detail[k])) for k in PARTS}
    return Fingerprint(_sha(canon(parts)), parts, detail)


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
    return tuple(items), newest > time.time_ns() - RACY_NS


def clear_cache() -> None:
    """Forget every cached fingerprint and dirty hash (the next calls are cold)."""
    for c in BoundedCache.every:
        c.clear()
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
        hit = _CACHE.get(key)
        if hit is not None:
            return hit
    fp = _compute(root, decl)
    if not racy:
        _CACHE.put(key, fp)
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
