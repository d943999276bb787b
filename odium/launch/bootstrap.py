"""``--bootstrap``: a host that has no Odium gets this machine's, over the SSH connection.

The wheels: Odium's own (built from the checkout this process runs, when it runs one, so
the nodes run the hub's code; else Odium of this version from the package index) and every
dependency's, with pip's (``pip wheel``, from the index or pip's cache; or a directory of
wheels the user made, ``--wheelhouse``). They travel as a tar stream on ssh's standard
input into ``<remote dir>/env-<digest>/wheels`` and are installed there into a virtual
environment of the host's Python (``venv --without-pip``: no ensurepip, no python3-venv
package needed; pip runs from its own wheel), with ``--no-index``: the host needs no internet
and no earlier install. The environment is named by the digest of the wheels: a later launch
with the same wheels finds it complete and installs nothing.

Binary wheels (pyzmq, PyNaCl, msgspec, SQLAlchemy) are this machine's Python's: a host with
another Python version or platform is told so, in one line.
"""

from __future__ import annotations

import hashlib
import io
import platform
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

from ..version import __version__
from .common import LaunchError

BUILD_TIMEOUT = 600.0  # seconds pip may take to gather the wheels
INSTALL_TIMEOUT = 300.0  # seconds a host may take to install them


def _source() -> str:
    """What pip builds Odium's wheel from: this checkout (a project beside the package), or
    this version from the index."""
    here = Path(__file__).resolve().parent.parent.parent
    if (here / "pyproject.toml").is_file() and (here / "odium" / "__init__.py").is_file():
        return str(here)
    return f"odium=={__version__}"


def gather(cache: Path, given: Path | None = None) -> list[Path]:
    """The wheels a node needs (Odium's, its dependencies', pip's), gathered into ``cache``
    by ``pip wheel``, or those of ``given``, a directory of wheels."""
    if given is not None:
        wheels = sorted(given.expanduser().glob("*.whl"))
        names = {w.name.split("-")[0].lower() for w in wheels}
        if not {"odium", "pip"} <= names:
            raise LaunchError([f"--wheelhouse {given} needs Odium's and pip's wheels (and "
                               "their dependencies'), as: pip wheel -w DIR odium pip"])
        return wheels
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "-w",
           str(cache), _source(), "pip"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise LaunchError([f"pip wheel took over {BUILD_TIMEOUT:.0f} s"]) from None
    if p.returncode != 0:
        err = [ln for ln in p.stderr.splitlines() if ln.strip() and "WARNING" not in ln]
        raise LaunchError([f"could not gather the wheels to bootstrap with: "
                           f"{(err or ['pip wheel failed'])[-1].strip()[:300]}"])
    return _newest(sorted(cache.glob("*.whl")))


def _newest(wheels: list[Path]) -> list[Path]:
    """One wheel a project: the last built (a cache keeps older versions of some)."""
    by_name: dict[str, Path] = {}
    for w in sorted(wheels, key=lambda w: w.stat().st_mtime):
        by_name[w.name.split("-")[0].lower()] = w
    return sorted(by_name.values())


def digest(wheels: list[Path]) -> str:
    h = hashlib.sha256()
    for w in wheels:
        h.update(w.name.encode() + b"\0" + hashlib.sha256(w.read_bytes()).digest())
    return h.hexdigest()[:16]


def tar_of(wheels: list[Path]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for w in wheels:
            tar.add(w, arcname=w.name)
    return buf.getvalue()


def env_dir(remote_dir: str, wheels: list[Path]) -> str:
    return f"{remote_dir}/env-{digest(wheels)}"


def install_script(python: str, env: str, wheels: list[Path]) -> str:
    """The host's side: unless the environment is there complete, unpack the wheels from
    standard input and install Odium into a new one; say which."""
    pip = next(w.name for w in wheels if w.name.lower().startswith("pip-"))
    py = shlex.quote(python)
    return "\n".join([
        "set -e", "umask 077", f'E="{env}"',
        'if [ -f "$E/.complete" ]; then cat >/dev/null; echo "odium-bootstrap: ready"; exit 0; fi',
        'rm -rf "$E"', 'mkdir -p "$E/wheels"', 'tar -x -C "$E/wheels"',
        f'{py} -m venv --without-pip "$E" >"$E/install.log" 2>&1 '
        f'|| {{ tail -n 1 "$E/install.log"; exit 4; }}',
        f'"$E/bin/python" "$E/wheels/{pip}/pip" install -q --disable-pip-version-check '
        '--no-index --find-links "$E/wheels" odium pip >>"$E/install.log" 2>&1 '
        '|| { grep -v WARNING "$E/install.log" | tail -n 1; exit 4; }',
        'touch "$E/.complete"', 'echo "odium-bootstrap: installed"', ""])


def mismatch_hint() -> str:
    return (f"(the wheels are for Python {platform.python_version_tuple()[0]}."
            f"{platform.python_version_tuple()[1]} on {platform.machine()}; give the host's "
            "matching Python with --python, or a --wheelhouse made for it)")


__all__ = ["env_dir", "gather", "install_script", "mismatch_hint", "tar_of"]
