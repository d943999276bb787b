"""The store's hot writes as plain SQL: the job queue's (``Store.write_jobs``: its columns, its
three statements in the driver's own parameter style, and JSON columns' text) and the upserts
of a join storm's keys and nodes (``Store.upsert``). The column types are the models'
(``odium.hub.store``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import msgspec
from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite

# the job queue's hot writes (Store.write_jobs) take plain tuples, in these columns' order
JOB_COLS = ("id", "seq", "kind", "code", "fn", "args", "kwargs", "args_pickle", "nodes",
            "retries", "timeout", "require", "issuer", "status", "node", "attempts", "created",
            "updated", "started", "finished", "result", "reason")
JOB_MUTABLE = ("status", "node", "attempts", "updated", "started", "finished", "result",
               "reason")  # an update's columns, then the seq of its row
JOB_EVENT_COLS = ("job_seq", "job_id", "ts", "prev", "status", "node", "detail")


def dumps_json(value: Any, _encode: Callable[[Any], bytes] = msgspec.json.encode) -> str | None:
    """A JSON column's text (what SQLAlchemy's JSON type reads back)."""
    if value is None:
        return None
    try:
        return _encode(value).decode()
    except (TypeError, OverflowError, msgspec.EncodeError):
        return json.dumps(value, default=str)


def job_statements(paramstyle: str) -> dict[str, Any]:
    """The job queue's three hot statements in the driver's own parameter style, and a function
    that shapes rows (tuples in column order) for it. The column types are the models'."""
    def marks(names: tuple[str, ...]) -> list[str]:
        if paramstyle == "qmark":
            return ["?"] * len(names)
        if paramstyle == "format":
            return ["%s"] * len(names)
        if paramstyle == "numeric":
            return [f":{i + 1}" for i in range(len(names))]
        if paramstyle == "named":
            return [f":p{i}" for i in range(len(names))]
        return [f"%(p{i})s" for i in range(len(names))]  # pyformat

    def insert_sql(table: str, cols: tuple[str, ...]) -> str:
        return f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join(marks(cols))})"

    m = marks(JOB_MUTABLE + ("seq",))
    sets = ", ".join(f"{c} = {x}" for c, x in zip(JOB_MUTABLE, m[:-1], strict=True))
    update_sql = f"UPDATE jobs SET {sets} WHERE seq = {m[-1]}"

    def fit(rows: list[tuple[Any, ...]]) -> list[Any]:
        if paramstyle in ("named", "pyformat"):
            return [{f"p{i}": v for i, v in enumerate(r)} for r in rows]
        return rows

    return {"insert": insert_sql("jobs", JOB_COLS), "update": update_sql,
            "event": insert_sql("job_events", JOB_EVENT_COLS), "fit": fit}


def upsert_statement(dialect: str, table: Table, changes: tuple[str, ...]) -> Any:
    """An insert that, where a row with its primary key is there already, sets only the
    ``changes`` columns from the row given instead (none: leaves that row as it is). One
    statement for many rows: executemany. None for a database without ``ON CONFLICT``
    (SQLite and PostgreSQL have it)."""
    make = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}.get(dialect)
    if make is None:
        return None
    ins: Any = make(table)  # (each dialect's own Insert: on_conflict_*, excluded)
    pk = [c.name for c in table.primary_key.columns]
    if not changes:
        return ins.on_conflict_do_nothing(index_elements=pk)
    return ins.on_conflict_do_update(index_elements=pk,
                                     set_={c: ins.excluded[c] for c in changes})


__all__ = ["JOB_COLS", "JOB_EVENT_COLS", "JOB_MUTABLE", "dumps_json", "job_statements",
           "upsert_statement"]
