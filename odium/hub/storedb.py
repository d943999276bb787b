"""The database behind a store, from its URL: the engine, and what a server database needs that
SQLite does not (docs/store.md says when to choose which).

* ``postgresql://`` means psycopg (3), the driver the ``postgresql`` extra installs, not
  SQLAlchemy's default psycopg2; a driver named in the URL is used as named.
* A server's connections can be cut (the server restarted): each is checked as it is taken
  from the pool, so a restart costs no failed write or read once the server is back.
* A lock another session holds makes a write wait ``LOCK_TIMEOUT_MS`` at most (PostgreSQL
  waits for ever by default), as SQLite's busy timeout does: then the store says so and tries
  again (storefaults), instead of hanging without a word.
* A string column holds a string of any length, as in SQLite (which ignores the lengths the
  models give): PostgreSQL would refuse the whole write of a longer value (a command to a
  long list of nodes, a long note) and the store drop it; ``Str`` is that type.
* PostgreSQL's text cannot hold NUL (SQLite's can): a job's output or error with one would
  be refused, and a result never stored (nor acknowledged, so sent again forever). Through
  psycopg, NUL is stored as U+2400 (the symbol for NUL) instead.
* A URL is shown without its password.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from sqlalchemy import String, create_engine, event
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.types import TypeEngine

NUL_STORED_AS = "\u2400"  # what PostgreSQL stores for a NUL in a string (see above)
LOCK_TIMEOUT_MS = 2000  # (store._sqlite_pragmas: SQLite's busy_timeout is the same)


def parse(url: str) -> URL:
    """The URL, with psycopg for a PostgreSQL one that names no driver."""
    u = make_url(url)
    return u.set(drivername="postgresql+psycopg") if u.drivername == "postgresql" else u


def shown(url: str) -> str:
    """The URL as messages show it: without its password."""
    try:
        return parse(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL at all: it has no password to hide either
        return url


def engine_for(url: str) -> Engine:
    u = parse(url)
    server = u.get_backend_name() != "sqlite"
    try:
        engine = create_engine(u, future=True, pool_pre_ping=server)
    except ImportError as e:
        if u.get_backend_name() != "postgresql":
            raise
        raise ImportError(f"{e} (PostgreSQL's driver: pip install 'odium[postgresql]')"
                          ) from None
    if engine.dialect.name == "postgresql":
        event.listen(engine, "connect", _postgresql_session)
        if engine.dialect.driver == "psycopg":
            event.listen(engine, "connect", _psycopg_nul)
    return engine


def Str(length: int) -> TypeEngine[str]:  # (a column type: named like one)
    """A string column: ``length`` is its size where the database needs one; PostgreSQL's
    is unbounded (as every string is in SQLite)."""
    return String(length).with_variant(postgresql.VARCHAR(), "postgresql")


def _postgresql_session(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute(f"SET lock_timeout = {int(LOCK_TIMEOUT_MS)}")
    cur.close()
    dbapi_conn.commit()


def _psycopg_nul(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.adapters.register_dumper(str, _nul_safe())


@cache
def _nul_safe() -> type:
    """psycopg's default string dumper, that stores a NUL as NUL_STORED_AS."""
    from psycopg.types.string import StrDumperUnknown

    class NulSafe(StrDumperUnknown):
        def dump(self, obj: str) -> Any:
            return super().dump(obj.replace("\x00", NUL_STORED_AS) if "\x00" in obj else obj)

    return NulSafe


__all__ = ["LOCK_TIMEOUT_MS", "NUL_STORED_AS", "Str", "engine_for", "parse", "shown"]
