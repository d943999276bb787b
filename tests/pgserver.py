"""A real PostgreSQL server for the store's tests: Debian's binaries (``postgresql``), a
cluster made in a temporary directory, listening on 127.0.0.1 on a free port, with a fresh
database per test (``PgServer.database``).

Run as root, the server runs as the ``postgres`` system user (PostgreSQL refuses to run as
root). It is started by ``pg_ctl`` (which leaves it running on its own, not a child of the
test session) without the session's tag in its environment: its backends, which come and go
with every connection, are not processes the tests leaked (tests/conftest.py); the fixture
that starts it stops it, and removes its directory.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SUPERUSER = "odium"


def binaries() -> Path | None:
    """The directory of Debian's PostgreSQL server binaries (the newest version), if any."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                   else 0)
    if found:
        return found[-1].parent
    which = shutil.which("pg_ctl")
    return Path(which).parent if which else None


def unavailable() -> str:
    """Why a PostgreSQL server cannot be started here ("" if it can)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e '.[test]')"
    if binaries() is None:
        return "PostgreSQL is not installed (Debian: apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a postgres user to run PostgreSQL as"
    return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """One PostgreSQL cluster in a temporary directory, and its server."""

    def __init__(self) -> None:
        bindir = binaries()
        assert bindir is not None
        self.bin = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="odium-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.port = 0
        self.user = None if os.geteuid() != 0 else "postgres"
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.dir.chmod(0o700)

    def _run(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """A server binary, as the server's user, without the test session's tag."""
        env = {k: v for k, v in os.environ.items() if k != "ODIUM_TEST_SESSION"}
        env.update(LC_ALL="C.UTF-8", LANG="C.UTF-8")
        argv = [str(self.bin / cmd[0]), *cmd[1:]]
        if self.user:
            argv = ["runuser", "-u", self.user, "--", *argv]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                              cwd=self.dir)

    def init(self) -> None:
        p = self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "-A", "trust",
                      "-E", "UTF8", "--no-sync", "--no-instructions")
        if p.returncode != 0:
            raise RuntimeError(f"initdb failed: {p.stdout}{p.stderr}")

    def start(self) -> None:
        """Start the server (again) on a free port (the same one when restarted)."""
        for _ in range(3):  # a free port taken meanwhile by someone else: another one
            self.port = self.port or free_port()
            opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} "
                    "-c max_connections=200")
            p = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts,
                          "-w", "-t", "30", "start")
            if p.returncode == 0:
                return
            if "already in use" not in self.log.read_text(errors="replace"):
                break
            self.port = 0
        raise RuntimeError(f"PostgreSQL did not start: {p.stdout}{p.stderr}\n"
                           f"{self.log.read_text(errors='replace')[-2000:]}")

    def stop(self, mode: str = "fast") -> None:
        p = self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")
        if p.returncode != 0 and self.running():
            raise RuntimeError(f"PostgreSQL did not stop: {p.stdout}{p.stderr}")

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status").returncode == 0

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=SUPERUSER,
                             dbname="postgres", autocommit=True, connect_timeout=10) as c:
            c.execute(sql)

    @contextmanager
    def database(self) -> Iterator[str]:
        """A new, empty database for one test; dropped after it (its connections ended)."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        self._admin(f"CREATE DATABASE {name}")
        try:
            yield self.url(name)
        finally:
            if self.running():
                self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
