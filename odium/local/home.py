"""The home directory and its secret files: key files and join-token files, on this machine.

A home holds an instance's key (and the hub's admin key and records); like ``~/.ssh`` it
must be the running user's and private, or its keys could have been planted. Every read
checks that; every write is atomic (odium.local.files). The keys themselves are
odium.core.keys's.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..core.keys import Identity
from ..errors import ConfigError
from .files import atomic_write


def default_home() -> Path:
    """The instance home: ``$ODIUM_HOME`` or ``~/.odium``."""
    return Path(os.environ.get("ODIUM_HOME", "~/.odium")).expanduser()


def _user_name(uid: int) -> str | None:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return None


def _owner(uid: int) -> str:
    name = _user_name(uid)
    return f"uid {uid} ({name})" if name else f"uid {uid}"


def check_private(path: Path, what: str, st: os.stat_result | None = None) -> None:
    """Refuse a home or secret file another user owns or may write (the way ssh treats
    ``~/.ssh``): its keys could have been planted. One-line error saying how to fix it."""
    st = st or path.stat()
    me = os.geteuid()
    if st.st_uid != me:
        raise ConfigError(
            f"{what} {path} is owned by {_owner(st.st_uid)}, not by you ({_owner(me)}): "
            f"another user could have planted its keys; use one of your own, or if it is yours: "
            f"chown {_user_name(me) or me} {path}")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        fix = "chmod 700" if stat.S_ISDIR(st.st_mode) else "chmod 600"
        raise ConfigError(f"{what} {path} is writable by group or others (mode {mode:o}): "
                          f"anyone could plant keys in it; run: {fix} {path}")


def check_home(home: str | os.PathLike[str]) -> Path:
    """An existing home directory, checked as ``ensure_home`` checks it, without creating it."""
    path = Path(home).expanduser().resolve()
    try:
        st = path.stat()
    except OSError as e:
        raise ConfigError(f"cannot use {path} as home: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"home {path} exists and is not a directory")
    check_private(path, "home", st)
    return path


def ensure_home(home: str | os.PathLike[str]) -> Path:
    """Create the home directory (0700) if needed; refuse one another user owns or can write
    to; make one others can read private (0700)."""
    path = Path(home).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError:
        raise ConfigError(f"home {path} exists and is not a directory") from None
    except OSError as e:
        raise ConfigError(f"cannot use {path} as home: {e.strerror}") from None
    check_home(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        os.chmod(path, 0o700)
    return path


def check_secret_file(path: Path, what: str = "key file") -> None:
    """A key or token file must be the running user's and private (no group/other bits)."""
    st = path.stat()
    check_private(path, what, st)
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise ConfigError(f"{what} {path} is readable by others (mode {mode:o}); "
                          f"run: chmod 600 {path}")


def load_or_create(path: Path) -> Identity:
    """Read a key file (hex seed, mode 0600, the running user's) or make a new one atomically."""
    if path.exists():
        check_secret_file(path)
        text = path.read_text().strip()
        try:
            return Identity.from_seed(bytes.fromhex(text))
        except ValueError:
            raise ConfigError(f"key file {path} is damaged (expected 64 hex digits)") from None
    ident = Identity.generate()
    write_key(path, ident)
    return ident


def write_key(path: Path, ident: Identity) -> None:
    """Write a key file (the seed in hex, 0600), atomically; an existing one is replaced."""
    atomic_write(path, ident.seed.hex() + "\n")


def write_token_file(path: Path, token: str) -> None:
    """Write a token to a private file (0600), atomically; an existing one is replaced."""
    try:
        atomic_write(path, token + "\n")
    except OSError as e:
        raise ConfigError(f"cannot write the token to {path}: {e.strerror}") from None


def read_token_file(path: Path) -> str:
    """A token from a file the running user owns and nobody else can read (checked like a key
    file). The file is left where it is: it is the user's; the token in it is single-use."""
    try:
        check_secret_file(path, "token file")
        return path.read_text().strip()
    except FileNotFoundError:
        raise ConfigError(f"no token file {path}; write one with: odium token --file "
                          f"{path}") from None
    except OSError as e:
        raise ConfigError(f"cannot read the token file {path}: {e.strerror}") from None
