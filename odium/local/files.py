"""Atomic file writes: the one way this machine's secrets and records reach the disk.

A reader sees the old file or the new one, never a part of either: the data goes to a
private temporary file in the same directory (same file system), is flushed to the disk,
then renamed over the target. A failed write leaves no temporary file behind.
"""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: str | os.PathLike[str], data: bytes | str, mode: int = 0o600) -> None:
    """Replace (or create) ``path`` with ``data`` (str is written as UTF-8), with ``mode``.

    OSError when the directory cannot be written; the target is then left as it was.
    """
    target = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    # a name no one else uses, created only if absent (tempfile would cost the odium command
    # 10 ms of imports: shutil, bz2, lzma)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{os.urandom(6).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
