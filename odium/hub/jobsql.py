"""The job queue's hot writes as plain SQL (``Store.write_jobs``): its columns, its three
statements in the driver's own parameter style, and JSON columns' text. The column types
are the models' (``odium.hub.store``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import msgspec

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


__all__ = ["JOB_COLS", "JOB_EVENT_COLS", "JOB_MUTABLE", "dumps_json", "job_statements"]
