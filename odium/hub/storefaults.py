"""When the store cannot write: which errors are the store's (disk full, locked, file gone or
damaged) rather than a write's own, and how loudly the store says so.

A write that fails for the store's reasons is held and tried again (``Store._attempt``); one
that fails for its own is dropped alone. ``Health`` is what the API reads (``Store.health``).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import MetaData, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from ..errors import ConfigError

log = logging.getLogger("odium.hub.store")

# what SQLite says when the store, not the write, is at fault (its primary result codes): the
# write is kept and tried again until it commits; any other error is the write's own (LOCKED,
# 6, too: a conflict within one connection, not another process's lock, which is BUSY)
FAULTS = {5: "the database is locked (another process holds a lock on it)", 7: "out of memory",
          8: "the database is read-only", 10: "disk I/O error",
          11: "the database file is damaged (stop the hub: its next start says what to do)",
          13: "the disk is full",
          14: "the database file cannot be opened",
          26: "the file is not a database (stop the hub: its next start says what to do)"}
RETRY_FIRST, RETRY_MAX = 0.05, 2.0  # seconds between tries of a write the store could not make
SHOUT_EVERY = 30.0  # a fault that lasts is logged again at most this often
WATCH_EVERY = 1.0  # an idle writer checks this often that its database file is still there


class StoreFault(Exception):
    """The store cannot write now for a reason outside the write: disk, lock, file."""


def fault_of(e: BaseException) -> str | None:
    """What is wrong with the store, if the error is the store's (see FAULTS) and not the
    write's; a server database's OperationalError (connection refused or cut, the server
    shutting down, its disk full, a deadlock) is the store's too: held until the server takes
    it."""
    if isinstance(e, StoreFault | OSError):
        return str(e)
    orig = getattr(e, "orig", e)
    code = getattr(orig, "sqlite_errorcode", None)
    if code is not None:
        what = FAULTS.get(code & 0xFF)
        return f"{what} (SQLite: {orig})" if what else None
    if not isinstance(e, OperationalError):
        return None
    said = " ".join(str(orig).split())  # (psycopg's are several lines)
    return f"the database server cannot take the write now ({type(orig).__name__}: {said})"


def relieve(engine: Engine, e: BaseException) -> None:
    """A full disk: fold the write-ahead log into the database and truncate it. SQLite does
    that by itself only once the log has 1000 pages (4 MiB), more than a small disk may hold,
    so without this a log that filled the disk keeps it full after space is freed."""
    if getattr(getattr(e, "orig", e), "sqlite_errorcode", 0) & 0xFF != 13:
        return
    try:
        with engine.connect() as c:
            c.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    except SQLAlchemyError as err:
        log.debug("store: checkpoint on a full disk failed: %s", err)


def identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class DbFile:
    """The SQLite file a store writes, as it was when the store opened it: one deleted or
    replaced while the hub runs would take every write since (keys, results) with it at the
    next start, so the store checks it before each commit and while idle."""

    def __init__(self, engine: Engine) -> None:
        db = engine.url.database if engine.dialect.name == "sqlite" else None
        self.path = (Path(db).absolute() if db and db != ":memory:" and not db.startswith(
            "file:") and "uri" not in engine.url.query else None)
        self.identity: tuple[int, int] | None = None
        self.saved: str | None = None  # the copy made when the file went, "" if it failed

    def opened(self, engine: Engine) -> None:
        """The schema is in: this is the file. From now on a new connection opens it and never
        makes one, so a deleted file does not come back empty under a reader."""
        if self.path is not None:
            self.identity = identity(self.path)
            event.listen(engine, "do_connect", self._no_create)

    def _no_create(self, _dialect: Any, _rec: Any, cargs: list[Any], cparams: dict[str, Any]
                   ) -> None:
        cargs[:] = [f"file:{quote(str(self.path))}?mode=rw"]
        cparams["uri"] = True

    def check(self, engine: Engine) -> None:
        """Raise StoreFault if the file at the path is not the one the store opened; the first
        time, save a copy of what the store still holds (its connections keep the old file)."""
        if self.path is None:
            return
        now = identity(self.path)
        if now == self.identity:
            return
        if self.saved is None:
            self.saved = self._save(engine)
        copy = (f"a copy of what it held is in {self.saved}: stop the hub, move the copy to "
                f"{self.path.name} and start again" if self.saved else
                "stop the hub and put the file back (writes since are lost)")
        raise StoreFault(f"the database file {self.path} was "
                         f"{'deleted' if now is None else 'replaced'} while the hub runs; "
                         f"nothing is stored until it is back (results stay with the nodes); "
                         f"{copy}")

    def closed(self) -> None:
        """The store closed: if its file was deleted, its log and shared memory left beside the
        path are the old file's, and must not be read as the saved copy's once it is put back."""
        if self.saved is not None and self.path is not None and not self.path.exists():
            for end in ("-wal", "-shm"):
                self.path.with_name(self.path.name + end).unlink(missing_ok=True)

    def _save(self, engine: Engine) -> str:
        """Copy the database the store's open connections still see to a new file beside it
        (SQLite's online backup: a consistent snapshot); "" if that fails."""
        assert self.path is not None
        dst = self.path.with_name(f"{self.path.name}.saved-{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            with engine.connect() as c:
                out = sqlite3.connect(dst)
                try:
                    c.connection.driver_connection.backup(out)  # type: ignore[union-attr]
                    out.execute("PRAGMA journal_mode=DELETE")  # one file, to move in place
                finally:
                    out.close()
        except (SQLAlchemyError, sqlite3.Error, OSError) as e:
            log.error("store: cannot save a copy of the database to %s: %s", dst, e)
            return ""
        log.error("store: saved a copy of the database to %s", dst)
        return str(dst)


def open_schema(engine: Engine, metadata: MetaData, url: str, file: DbFile) -> None:
    """The schema, and a check of the file: a damaged one is one clear line now (ConfigError),
    not a traceback or lost writes later."""
    try:
        metadata.create_all(engine)
        if file.path is not None:
            with engine.connect() as c:
                said = c.exec_driver_sql("PRAGMA quick_check(1)").scalar()
            if said != "ok":
                raise StoreFault("quick_check: " + " ".join(str(said).split())[:200])
    except (SQLAlchemyError, StoreFault) as e:
        raise ConfigError(open_error(url, file.path, e)) from None
    file.opened(engine)


class Health:
    """What stops the store from writing now, said loudly (an error in the log and the event
    log) when it starts or changes and then at most every SHOUT_EVERY s, and what it cost:
    writes held meanwhile, dropped (bad ones), abandoned (the hub stopped first)."""

    def __init__(self, emit: Callable[..., None]) -> None:
        self.emit = emit  # Store.event
        self.problem = ""
        self.since = 0.0  # wall clock of the fault's start
        self.shouted = 0.0
        self.dropped = self.abandoned = 0
        self.failed = 0  # tries that failed since the fault began

    def fault(self, why: str, held: int) -> None:
        now = time.monotonic()
        self.failed += 1
        if why == self.problem and now - self.shouted < SHOUT_EVERY:
            return
        if not self.problem:
            self.since = time.time()
        if why != self.problem:
            self.emit("store_fault", f"cannot store: {why}; {held} write(s) held, retrying",
                      level="error")
        self.problem, self.shouted = why, now
        log.error("store: cannot store: %s; %d write(s) held, retrying for %.0f s", why, held,
                  time.time() - self.since)

    def recovered(self, held: int) -> None:
        if self.problem:
            took = time.time() - self.since
            log.warning("store: writing again after %.1f s (%s)", took, self.problem)
            self.emit("store_recovered", f"stored again after {took:.1f} s ({self.problem}); "
                      f"{held} write(s) it held are in", level="warning")
            self.problem, self.failed = "", 0

    def state(self, waiting: int) -> dict[str, Any]:
        return {"ok": not self.problem, "problem": self.problem,
                "since": self.since if self.problem else None, "waiting": waiting,
                "failed": self.failed, "dropped": self.dropped, "abandoned": self.abandoned}


def open_error(url: str, path: Path | None, e: BaseException) -> str:
    """One line for a database the store cannot open, and for a damaged file what to do."""
    orig = getattr(e, "orig", None) or e
    code = getattr(orig, "sqlite_errorcode", 11 if isinstance(e, StoreFault) else None)
    if path is not None and code is not None and code & 0xFF in (11, 26):
        return (f"cannot open database {path}: it is damaged ({orig}); move it away to start "
                "with an empty store (nodes then join again), or recover what it holds "
                f"(sqlite3 {path} .recover | sqlite3 recovered.db) and put that in its place")
    return f"cannot open database {url!r}: {e}"


__all__ = ["FAULTS", "DbFile", "Health", "StoreFault", "fault_of", "identity", "open_error",
           "open_schema", "relieve"]
