"""The store: SQLAlchemy models and sessions for keys, nodes, commands, results and the event log.

SQLite in the instance's home by default (WAL), PostgreSQL or any SQLAlchemy URL by
configuration (odium.hub.storedb; docs/store.md says when to choose which). Writes go through
one writer thread that commits in batches, so the hub's loop never waits on the disk; reads
run in the caller's thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Float,
    Integer,
    Text,
    UniqueConstraint,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from ..errors import ConfigError
from ..errors import TimeoutError as OdiumTimeout
from . import storefaults as sf
from .jobsql import dumps_json, job_statements, upsert_statement
from .storedb import Str, engine_for, shown

log = logging.getLogger(__name__)

QUIET = 0.003  # the writer waits this long for more writes before committing a batch
QUIET_MAX = 0.05  # but never longer than this


class Base(DeclarativeBase):
    pass


class KeyRow(Base):
    """A public key the hub knows, and what it may do: admin, node, token, pending, rejected,
    revoked. Only admin, node and unexpired token keys complete a handshake."""

    __tablename__ = "keys"
    key_id: Mapped[str] = mapped_column(Str(43), primary_key=True)
    role: Mapped[str] = mapped_column(Str(16), index=True)
    name: Mapped[str] = mapped_column(Str(64), default="")
    address: Mapped[str] = mapped_column(Str(128), default="")
    created: Mapped[float] = mapped_column(Float)
    updated: Mapped[float] = mapped_column(Float)
    expires: Mapped[float | None] = mapped_column(Float, nullable=True)
    note: Mapped[str] = mapped_column(Str(256), default="")


class NodeRow(Base):
    __tablename__ = "nodes"
    name: Mapped[str] = mapped_column(Str(64), primary_key=True)
    key_id: Mapped[str] = mapped_column(Str(43), index=True)
    status: Mapped[str] = mapped_column(Str(16))
    state: Mapped[str] = mapped_column(Str(128), default="unknown")
    host: Mapped[str] = mapped_column(Str(256), default="")
    pid: Mapped[int] = mapped_column(Integer, default=0)
    capacity: Mapped[int] = mapped_column(Integer, default=1)
    boot: Mapped[str] = mapped_column(Str(32), default="")
    first_seen: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float)
    info: Mapped[Any] = mapped_column(JSON, nullable=True)  # StateInfo: fingerprint and parts


class StateRow(Base):
    """Every state id the hub has seen, with the declaration its commit makes."""

    __tablename__ = "states"
    state: Mapped[str] = mapped_column(Str(128), primary_key=True)
    declaration: Mapped[Any] = mapped_column(JSON)
    first_seen: Mapped[float] = mapped_column(Float)


class CommandRow(Base):
    __tablename__ = "commands"
    id: Mapped[str] = mapped_column(Str(32), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, index=True)
    kind: Mapped[str] = mapped_column(Str(16))
    code: Mapped[str] = mapped_column(Text)
    session: Mapped[str] = mapped_column(Str(64))
    nodes: Mapped[str] = mapped_column(Str(4096))
    targets: Mapped[list[str]] = mapped_column(JSON)
    issuer: Mapped[str] = mapped_column(Str(43))
    state: Mapped[str] = mapped_column(Str(128))
    timeout: Mapped[float | None] = mapped_column(Float, nullable=True)
    created: Mapped[float] = mapped_column(Float)
    finished: Mapped[float | None] = mapped_column(Float, nullable=True)
    status: Mapped[str] = mapped_column(Str(16), default="running")


class ResultRow(Base):
    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("command_id", "node"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    command_id: Mapped[str] = mapped_column(Str(32), index=True)
    node: Mapped[str] = mapped_column(Str(64))
    status: Mapped[str] = mapped_column(Str(16))
    state: Mapped[str] = mapped_column(Str(128), default="unknown")
    stdout: Mapped[str] = mapped_column(Text, default="")
    stderr: Mapped[str] = mapped_column(Text, default="")
    value: Mapped[Any] = mapped_column(JSON, nullable=True)
    value_repr: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[Any] = mapped_column(JSON, nullable=True)
    exit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    started: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished: Mapped[float | None] = mapped_column(Float, nullable=True)


class EventRow(Base):
    """The log: joins, leaves, commands, rejected messages, errors."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ts: Mapped[float] = mapped_column(Float, index=True)
    level: Mapped[str] = mapped_column(Str(8))
    kind: Mapped[str] = mapped_column(Str(32), index=True)
    node: Mapped[str] = mapped_column(Str(64), default="")
    key_id: Mapped[str] = mapped_column(Str(43), default="")
    detail: Mapped[str] = mapped_column(Text, default="")


class JobRow(Base):
    """A queued job: what to run, where, its status now, and what came of it."""

    __tablename__ = "jobs"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)  # order
    id: Mapped[str] = mapped_column(Str(64), unique=True)
    kind: Mapped[str] = mapped_column(Str(16))  # python | call
    code: Mapped[str] = mapped_column(Text, default="")
    fn: Mapped[str | None] = mapped_column(Str(32), nullable=True)  # JobFnRow.hash
    args: Mapped[Any] = mapped_column(JSON, nullable=True)
    kwargs: Mapped[Any] = mapped_column(JSON, nullable=True)
    args_pickle: Mapped[str | None] = mapped_column(Text, nullable=True)
    nodes: Mapped[str] = mapped_column(Str(4096), default="*")
    retries: Mapped[int] = mapped_column(Integer, default=0)
    timeout: Mapped[float | None] = mapped_column(Float, nullable=True)
    require: Mapped[str] = mapped_column(Str(64), default="any")
    issuer: Mapped[str] = mapped_column(Str(43), default="")
    status: Mapped[str] = mapped_column(Str(16), index=True)
    node: Mapped[str] = mapped_column(Str(64), default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created: Mapped[float] = mapped_column(Float)
    updated: Mapped[float] = mapped_column(Float)
    started: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished: Mapped[float | None] = mapped_column(Float, nullable=True)
    result: Mapped[Any] = mapped_column(JSON, nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")


class JobEventRow(Base):
    """Every move of every job: from, to, where, why."""

    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_seq: Mapped[int] = mapped_column(Integer, index=True)  # JobRow.seq
    job_id: Mapped[str] = mapped_column(Str(64))
    ts: Mapped[float] = mapped_column(Float)
    prev: Mapped[str] = mapped_column(Str(16))
    status: Mapped[str] = mapped_column(Str(16))
    node: Mapped[str] = mapped_column(Str(64), default="")
    detail: Mapped[str] = mapped_column(Text, default="")


class JobFnRow(Base):
    """A function jobs call, serialised once (base64 cloudpickle), by its hash."""

    __tablename__ = "job_functions"
    hash: Mapped[str] = mapped_column(Str(32), primary_key=True)
    data: Mapped[str] = mapped_column(Text)
    created: Mapped[float] = mapped_column(Float)


# What the hub acknowledges (a job's result: the node then forgets it) must survive an OS
# crash or a power cut. In WAL mode, synchronous=NORMAL syncs the log only at checkpoints, so
# the last commits can vanish; FULL syncs it at every commit (the writer thread's: one per
# batch). bench/bench_durability.py measures what it costs. Not a user option: benchmarks
# set it to compare.
SQLITE_SYNCHRONOUS = "FULL"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    if SQLITE_SYNCHRONOUS not in ("FULL", "EXTRA", "NORMAL"):
        raise ConfigError(f"SQLITE_SYNCHRONOUS is FULL, EXTRA or NORMAL, not "
                          f"{SQLITE_SYNCHRONOUS!r}")
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA synchronous={SQLITE_SYNCHRONOUS}")
    cur.execute("PRAGMA busy_timeout=2000")  # then the writer retries (FAULTS), and says so
    cur.close()


def _shape(item: Any) -> tuple[Any, ...] | None:
    """What makes queued rows one executemany: inserts into one table; upserts into one
    table, of the same columns and changes. None: not a row."""
    if isinstance(item, tuple) and item[0] == "insert":
        return ("insert", item[1])
    if isinstance(item, tuple) and item[0] == "upsert":
        return ("upsert", item[1], tuple(item[2]), item[3])
    return None


def default_url(home: Path) -> str:
    return f"sqlite:///{home / 'odium.db'}"


class Store:
    """Engine, schema, a batching writer thread and the reads the hub and CLI need."""

    def __init__(self, url: str) -> None:
        try:
            self.engine: Engine = engine_for(url)
        except (SQLAlchemyError, ValueError, ImportError) as e:
            raise ConfigError(f"cannot use database {shown(url)!r}: {e}") from None
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.file = sf.DbFile(self.engine)  # the SQLite file it writes, if it writes one
        sf.open_schema(self.engine, Base.metadata, shown(url), self.file)
        self.session = sessionmaker(self.engine, expire_on_commit=False)
        self._job_sql = job_statements(self.engine.dialect.paramstyle)
        self._upserts: dict[tuple[str, tuple[str, ...]], Any] = {}  # statements made so far
        self._queue: queue.Queue[Any] = queue.Queue()
        self._urgent = False  # an urgent write is queued (write_jobs): commit without waiting
        self._health = sf.Health(self.event)
        self._closing = threading.Event()  # the store stops: a write it cannot make is given up
        self._writer = threading.Thread(target=self._write_loop, name="odium-store", daemon=True)
        self._writer.start()

    def health(self) -> dict[str, Any]:
        """Whether the store writes: ``problem`` is "" when it does, else what stops it (since
        ``since``, ``failed`` tries, ``waiting`` writes); writes ``dropped`` as bad ones, and
        ``abandoned`` because the store closed first."""
        return self._health.state(self._queue.unfinished_tasks)

    @property
    def problem(self) -> str:
        """What stops the store from writing now ("" when nothing does)."""
        return self._health.problem

    # --- writing ---------------------------------------------------------------------------

    def write(self, fn: Callable[[Session], object],
              on_commit: Callable[[], None] | None = None,
              on_fail: Callable[[], None] | None = None) -> None:
        """Queue a change made through the ORM; the writer thread applies it in a batch.
        ``on_commit`` is called (in the writer thread) once the transaction that holds this
        change has committed (durably: see SQLITE_SYNCHRONOUS), never if it failed; ``on_fail``
        if it was bad and is dropped. One the store cannot make for its own reasons
        (storefaults.FAULTS: disk full, locked, file gone) is held and tried until it commits."""
        self._queue.put(fn if on_commit is None and on_fail is None
                        else ("write", fn, on_commit, on_fail))

    def insert(self, model: type[Base], values: dict[str, Any]) -> None:
        """Queue a plain row insert (the cheap path: many become one executemany)."""
        self._queue.put(("insert", model, values))

    def upsert(self, model: type[Base], values: dict[str, Any], changes: tuple[str, ...]) -> None:
        """Queue a row's insert that, where the row is there already, sets only ``changes``
        (from ``values``; none: leaves it as it is). Those of one shape queued together are
        one executemany: a join storm writes thousands of keys and nodes."""
        self._queue.put(("upsert", model, values, changes))

    def update(self, model: type[Base], key: Any, values: dict[str, Any]) -> None:
        """Queue an update of one row by primary key."""
        self._queue.put(("update", model, key, values))

    def _write_loop(self) -> None:
        q = self._queue
        while True:
            try:
                batch = [q.get(timeout=sf.WATCH_EVERY)]
            except queue.Empty:
                self._watch_file()
                continue
            # let a burst finish (bounded) so that one transaction takes it all and the
            # writer does not compete with the loop thread in the middle of a round; but an
            # urgent write (jobs wait for it) takes only what is queued already
            urgent = False
            deadline = time.monotonic() + QUIET_MAX
            while len(batch) < 5000 and batch[-1] is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if self._urgent:
                    self._urgent, urgent = False, True
                try:
                    batch.append(q.get_nowait() if urgent else q.get(timeout=min(QUIET, left)))
                except queue.Empty:
                    break
            stop = None in batch
            work = [f for f in batch if f is not None]
            if work and self._attempt(work) is not None:
                self._one_by_one(work)
            for _ in batch:
                q.task_done()
            if stop:
                return

    def _one_by_one(self, work: list[Any]) -> None:
        """A batch failed for a write's own reason: each write alone, the bad ones dropped."""
        log.warning("batch of %d writes failed; retrying one by one", len(work))
        for item in work:
            e = self._attempt([item])
            if e is None:
                continue
            self._health.dropped += 1
            log.error("write dropped (the write itself failed): %s", e, exc_info=e)
            if isinstance(item, tuple) and item[0] == "write" and item[3] is not None:
                try:
                    item[3]()
                except Exception:  # noqa: BLE001 - the writer must outlive any callback
                    log.exception("on-fail callback failed")

    def _attempt(self, work: list[Any]) -> Exception | None:
        """Commit these writes, again and again with backoff while the store is at fault (held,
        never dropped; a closing store gives them up, loudly); the error if it is their own."""
        delay = sf.RETRY_FIRST
        while True:
            try:
                self.file.check(self.engine)
                self._apply(work)
            except Exception as e:  # noqa: BLE001 - the writer must outlive any one bad write
                why = sf.fault_of(e)
                if why is None:
                    return e
                self._health.fault(why, self._queue.unfinished_tasks)
                sf.relieve(self.engine, e)
                if self._closing.wait(delay):
                    self._health.abandoned += len(work)
                    log.error("store closed: %d write(s) not stored: %s", len(work), why)
                    return None
                delay = min(2 * delay, sf.RETRY_MAX)
                continue
            self._health.recovered(self._queue.unfinished_tasks)
            return None

    def _watch_file(self) -> None:
        """An idle writer: a deleted or replaced file is said at once, not at the next write."""
        try:
            self.file.check(self.engine)
        except sf.StoreFault as e:
            self._health.fault(str(e), 0)
        else:
            self._health.recovered(0)  # a file put back while no write waited

    def _apply(self, work: list[Any]) -> None:
        committed: list[Callable[[], None]] = []
        with self.session.begin() as s:
            i = 0
            while i < len(work):
                item = work[i]
                shape = _shape(item)
                if shape is not None:  # inserts or upserts: those of one shape, one executemany
                    rows = [item[2]]
                    while i + 1 < len(work) and _shape(work[i + 1]) == shape:
                        i += 1
                        rows.append(work[i][2])
                    if item[0] == "insert":
                        s.execute(insert(item[1].__table__), rows)
                    else:
                        self._upsert(s, item[1], rows, item[3])
                elif isinstance(item, tuple) and item[0] == "update":
                    _, model, key, values = item
                    table = model.__table__  # type: ignore[attr-defined]
                    pk = list(table.primary_key.columns)[0]
                    s.execute(update(table).where(pk == key).values(**values))
                elif isinstance(item, tuple) and item[0] == "write":
                    item[1](s)
                    s.flush()
                    if item[2] is not None:
                        committed.append(item[2])
                else:
                    item(s)
                    s.flush()
                i += 1
        for fn in committed:  # the transaction has committed: tell whoever waits for it
            try:
                fn()
            except Exception:  # noqa: BLE001 - a callback must not undo a commit
                log.exception("after-commit callback failed")

    def _upsert(self, s: Session, model: Any, rows: list[dict[str, Any]],
                changes: tuple[str, ...]) -> None:
        table = model.__table__
        key = (table.name, changes)
        if key not in self._upserts:
            self._upserts[key] = upsert_statement(self.engine.dialect.name, table, changes)
        stmt = self._upserts[key]
        if stmt is not None:
            s.execute(stmt, rows)
            return
        pk = list(table.primary_key.columns)[0].name  # (no ON CONFLICT: through the ORM)
        for values in rows:
            row = s.get(model, values[pk])
            if row is None:
                s.add(model(**values))
            for c in changes if row is not None else ():
                setattr(row, c, values[c])
        s.flush()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every queued write is committed."""
        done = threading.Event()
        self.write(lambda s: done.set())
        if not done.wait(timeout):
            why = f": {self.problem}" if self.problem else ""
            raise OdiumTimeout(f"store writes not committed after {timeout} s{why}")
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.001)

    def close(self) -> None:
        """Commit what is queued; at fault (or after 10 s), what cannot be stored is given up,
        and said (``health()["abandoned"]``)."""
        if self._writer.is_alive():
            self._queue.put(None)
            if self._health.problem:
                self._closing.set()
            self._writer.join(10)
            self._closing.set()
            self._writer.join(5)
        self.engine.dispose()
        self.file.closed()

    # --- convenience writes ----------------------------------------------------------------

    def event(self, kind: str, detail: str = "", *, level: str = "info", node: str = "",
              key_id: str = "") -> None:
        self.insert(EventRow, {"ts": time.time(), "level": level, "kind": kind,
                               "node": node[:64], "key_id": key_id[:43],
                               "detail": detail[:4000]})

    def put_key(self, key_id: str, role: str, *, name: str = "", address: str = "",
                expires: float | None = None, note: str = "") -> None:
        """A key's row, or its role and expiry changed (and its name, address and note, when
        given)."""
        now = time.time()
        given = {"name": name, "address": address, "note": note}
        self.upsert(KeyRow, {"key_id": key_id, "role": role, "created": now, "updated": now,
                             "expires": expires, **given},
                    ("role", "updated", "expires", *(k for k, v in given.items() if v)))

    def put_node(self, name: str, **fields: Any) -> None:
        """A node's row, or the fields given changed."""
        now = time.time()
        self.upsert(NodeRow, {"name": name, "key_id": "", "status": "new", "first_seen": now,
                              "last_seen": now, **fields}, tuple(fields))

    def forget_node(self, name: str, key_id: str = "") -> None:
        """Delete a node's row, and its key's row when given (what the hub forgot)."""

        def fn(s: Session) -> None:
            s.query(NodeRow).filter_by(name=name).delete()
            if key_id:
                s.query(KeyRow).filter_by(key_id=key_id).delete()

        self.write(fn)

    def drop_key(self, key_id: str) -> None:
        """Delete one key's row (a pending key known by its CURVE key that became its key id)."""
        self.write(lambda s: s.query(KeyRow).filter_by(key_id=key_id).delete())

    def put_state(self, state: str, declaration: dict[str, Any]) -> None:
        """A state's declaration, the first time it is seen (it never changes)."""
        self.upsert(StateRow, {"state": state, "declaration": declaration,
                               "first_seen": time.time()}, ())

    # --- reads -----------------------------------------------------------------------------

    def keys(self) -> list[KeyRow]:
        with self.session() as s:
            return list(s.scalars(select(KeyRow).order_by(KeyRow.created)))

    def nodes(self) -> list[NodeRow]:
        with self.session() as s:
            return list(s.scalars(select(NodeRow).order_by(NodeRow.name)))

    def events(self, limit: int = 50, kind: str | None = None) -> list[EventRow]:
        with self.session() as s:
            q = select(EventRow).order_by(EventRow.id.desc()).limit(limit)
            if kind:
                q = q.where(EventRow.kind == kind)
            return list(reversed(list(s.scalars(q))))

    def max_seq(self) -> int:
        with self.session() as s:
            from sqlalchemy import func

            return int(s.scalar(select(func.max(CommandRow.seq))) or 0)

    # --- the job queue ---------------------------------------------------------------------

    def after_commit(self, fn: Callable[[], None]) -> None:
        """Call fn (in the writer thread) once every write queued before it has been tried
        (to know that one write itself committed, give it ``on_commit``)."""
        self.write(lambda s: None, on_commit=fn)

    def write_jobs(self, jobs: list[tuple[Any, ...]], updates: list[tuple[Any, ...]],
                   events: list[tuple[Any, ...]], fns: list[tuple[str, str]],
                   on_commit: Callable[[], None], on_fail: Callable[[], None],
                   urgent: bool = False) -> None:
        """Queue the job queue's changes as one write: new jobs (tuples in ``JOB_COLS``
        order), updates (``JOB_MUTABLE`` then the row's seq), job events (``JOB_EVENT_COLS``)
        and functions (hash, data). Plain executemany: this is the queue's hot path.
        ``on_commit`` and ``on_fail`` as for ``write``; ``urgent``: someone waits for this
        commit (new jobs go out only after it), so the writer takes what is queued already and
        does not wait for more."""
        created = time.time()
        sql = self._job_sql

        def work(s: Session) -> None:
            for h, data in fns:
                s.merge(JobFnRow(hash=h, data=data, created=created))
            conn = s.connection()
            dumps = dumps_json
            if jobs:
                conn.exec_driver_sql(sql["insert"], sql["fit"]([
                    r[:5] + (dumps(r[5]), dumps(r[6])) + r[7:20] + (dumps(r[20]), r[21])
                    for r in jobs]))
            if updates:
                conn.exec_driver_sql(sql["update"], sql["fit"]([
                    u[:6] + (dumps(u[6]), u[7], u[8]) for u in updates]))
            if events:
                conn.exec_driver_sql(sql["event"], sql["fit"](events))

        if urgent:
            self._urgent = True
        self.write(work, on_commit=on_commit, on_fail=on_fail)

    def jobs_unfinished(self) -> list[JobRow]:
        with self.session() as s:
            return list(s.scalars(select(JobRow).where(
                JobRow.status.in_(("queued", "assigned", "running"))).order_by(JobRow.seq)))

    def job_rows(self, ids: list[str]) -> list[JobRow]:
        with self.session() as s:
            return list(s.scalars(select(JobRow).where(JobRow.id.in_(ids))))

    def job_list(self, status: str | None = None, limit: int = 50) -> list[JobRow]:
        with self.session() as s:
            q = select(JobRow).order_by(JobRow.seq.desc()).limit(limit)
            if status:
                q = q.where(JobRow.status == status)
            return list(s.scalars(q))

    def job_events(self, job_id: str) -> list[JobEventRow]:
        with self.session() as s:
            seq = s.scalar(select(JobRow.seq).where(JobRow.id == job_id))
            if seq is None:
                return []
            return list(s.scalars(select(JobEventRow).where(JobEventRow.job_seq == seq)
                                  .order_by(JobEventRow.id)))

    def job_functions(self, hashes: list[str]) -> dict[str, str]:
        with self.session() as s:
            return {r.hash: r.data for r in s.scalars(
                select(JobFnRow).where(JobFnRow.hash.in_(hashes)))}

    def max_job_seq(self) -> int:
        with self.session() as s:
            from sqlalchemy import func

            return int(s.scalar(select(func.max(JobRow.seq))) or 0)
