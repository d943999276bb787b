"""The job queue's book: every job the hub holds, the indexes over them, each job's moves
(through ``odium.core.jobs.advance``), and how the moves reach the store.

Everything here runs in the hub's loop thread. The book decides nothing about where jobs go
(``odium.hub.jobsend``) or what nodes say of them (``odium.hub.jobreports``): it keeps the
record straight and writes it down, coalescing a job's several moves into one row update.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from ..core.jobs import JobEvent, JobRecord, JobStatus, advance, after_failure, path_to
from .links import Timers
from .store import JobRow, Store

log = logging.getLogger(__name__)

Q, A, R = JobStatus.QUEUED, JobStatus.ASSIGNED, JobStatus.RUNNING
FLUSH_EVERY = 0.01  # seconds: a write of new jobs goes next to one still on its way after this
FLUSH_UPDATES = 0.05  # moves of jobs alone are written this often (one row update for several)
KEEP_FINISHED = 20_000  # finished jobs kept in memory (older ones are read from the store)
HOLD_BACK = 0.25  # seconds between flushes while the store cannot write (the book coalesces)
_VALUE = {s: s.value for s in JobStatus}

Watcher = Callable[[Callable[[], dict[str, Any]]], None]  # gets a job's info, lazily
QueueKey = tuple[str, str]  # (nodes, require): the jobs that may run on the same nodes


class JobBook:
    """The jobs, their queues and indexes, and the changes not yet in the store.

    ``kick`` (set by the queue) asks for a dispatch round; ``ack`` publishes acknowledgements
    of results once the write that recorded them has committed."""

    def __init__(self, store: Store, loop: Timers, overdue_grace: float,
                 ack: Callable[[dict[str, list[str]]], None]) -> None:
        self.store = store
        self.loop = loop
        self.overdue_grace = overdue_grace  # beyond a job's timeout, the hub gives up
        self.ack = ack
        self.kick: Callable[[], None] = lambda: None
        self.jobs: dict[str, JobRecord] = {}  # every job not finished
        self.finished: OrderedDict[str, JobRecord] = OrderedDict()
        self.queues: dict[QueueKey, deque[tuple[int, str, int]]] = {}
        self.qtoken: dict[str, int] = {}  # a queue entry is live while its token is current
        self.fns: dict[str, str] = {}  # function hash -> base64 cloudpickle
        self.running_on: dict[str, set[str]] = {}
        self.timed: dict[str, float] = {}  # running job with a timeout -> when the hub gives up
        # which nodes reported a batch that carried a job: a node speaks for a job only if the
        # job reached it (or it is the job's assignment)
        self.holders: dict[str, set[str]] = {}
        self.watchers: dict[str, list[Watcher]] = {}
        self.orphans: set[str] = set()
        self.orphan_deadline = 0.0
        self.closed = False
        self.stats = {"batches": 0, "declined": 0, "results": 0, "taken": 0}
        self.seq = store.max_job_seq()
        self.new: list[str] = []
        self.events: list[JobEvent] = []
        self.new_fns: list[tuple[str, str]] = []
        self.acks: dict[str, set[str]] = {}  # node -> results to acknowledge once stored
        self.unstored: set[str] = set()  # jobs whose result the store dropped: never acked
        self.after_persist: list[Callable[[], None]] = []
        self._dirty: set[str] = set()
        self.flush_due = False
        self._holding = False  # a flush waits for the store to write again
        self.flushed_at = 0.0
        self._writing = 0  # urgent writes of the book handed to the store, not yet committed
        self._flush_soon = False  # a flush at the end of this loop round is coming

    # --- after a restart -------------------------------------------------------------------

    def load(self, orphan_grace: float) -> None:
        """A restarted hub: every unfinished job waits for the node that has it to say so
        (``job_state``); after a grace the unclaimed ones queue (again)."""
        rows = self.store.jobs_unfinished()
        if not rows:
            return
        self.fns.update(self.store.job_functions(sorted({r.fn for r in rows if r.fn})))
        for row in rows:
            rec = record_of(row)
            self.jobs[rec.id] = rec
            # queued ones too: one may have gone to a node just before the hub stopped (its
            # move not written yet), and it must not run twice: nodes claim first
            self.orphans.add(rec.id)
            if rec.status is R and rec.node:
                self.running_on.setdefault(rec.node, set()).add(rec.id)
                if rec.timeout:  # the clock starts again: the hub was away
                    self.timed[rec.id] = (time.monotonic() + rec.timeout + self.overdue_grace)
        self.orphan_deadline = time.monotonic() + orphan_grace
        queued = sum(r.status is Q for r in self.jobs.values())
        self.store.event("jobs_reloaded", f"{len(rows)} unfinished job(s) reloaded: "
                         f"{queued} queued, {len(rows) - queued} running or on the way; all "
                         f"wait {orphan_grace:.1f} s for their nodes to claim them")

    # --- the store -------------------------------------------------------------------------

    def touch(self) -> None:
        """Changes are waiting. New jobs and submitters wait for their write: it goes at the
        end of this loop round when no such write of the book is on its way to the store, else
        as soon as that one commits (a group commit: whatever came meanwhile goes in one write).
        Moves of jobs alone are written at most every FLUSH_UPDATES (one row update covers a
        job's several moves)."""
        if self.new or self.after_persist:
            if not self._writing:
                self._flush_this_round()
            elif not self.flush_due:
                # fallback only (the commit's callback flushes): a store that holds writes
                self.loop.call_later(FLUSH_EVERY, self.flush)
            self.flush_due = True
        elif not self.flush_due:
            self.flush_due = True
            wait = FLUSH_UPDATES - (time.monotonic() - self.flushed_at)
            self.loop.call_later(max(0.0, wait), self.flush)

    def _flush_this_round(self) -> None:
        if not self._flush_soon:
            self._flush_soon = True
            self.loop.call_later(0, self.flush)

    def flush(self, force: bool = False) -> None:
        """Hand the changes to the store as one write; once committed, queue the new jobs and
        acknowledge the results. While the store cannot write, the changes stay here (a job's
        moves coalesce into one row update, so memory is bounded by the jobs), unless
        ``force``d (the hub stops)."""
        if self.store.problem and not force:
            self.flush_due = True
            if not self._holding:  # one timer, however many ask for a flush meanwhile
                self._holding = True
                self.loop.call_later(HOLD_BACK, self._unhold)
            return
        self.flush_due = self._flush_soon = False
        self.flushed_at = time.monotonic()
        if not (self.new or self._dirty or self.events or self.acks or self.after_persist
                or self.new_fns):
            return
        new_ids, self.new = self.new, []
        get, get_done = self.jobs.get, self.finished.get
        new_recs = [r for r in (get(j) or get_done(j) for j in new_ids) if r is not None]
        new_set = set(new_ids)
        dirty = [r for r in (get(j) or get_done(j) for j in self._dirty if j not in new_set)
                 if r is not None]
        self._dirty = set()
        rows = [(r.id, r.seq, r.kind, r.code, r.fn, r.args, r.kwargs, r.args_pickle, r.nodes,
                 r.retries, r.timeout, r.require, r.issuer, _VALUE[r.status], r.node,
                 r.attempts, r.created, r.updated, r.started, r.finished, r.result, r.reason)
                for r in new_recs]  # in jobsql.JOB_COLS order
        upd = [(_VALUE[r.status], r.node, r.attempts, r.updated, r.started, r.finished,
                r.result, r.reason, r.seq) for r in dirty]  # jobsql.JOB_MUTABLE, then seq
        events = [(e.seq, e.job, e.ts, e.prev, e.status, e.node, e.detail[:4000])
                  for e in self.events]
        self.events = []
        fns, self.new_fns = self.new_fns, []
        acks, self.acks = self.acks, {}
        after, self.after_persist = self.after_persist, []
        loop = self.loop
        # the results are acknowledged (and nodes forget them) only once this very write has
        # committed, durably (store.SQLITE_SYNCHRONOUS); never if it failed
        urgent = bool(new_ids or after)
        self._writing += urgent
        self.store.write_jobs(rows, upd, events, fns, on_commit=lambda: loop.call_soon_threadsafe(
            lambda: self._committed(new_ids, acks, after, urgent)), on_fail=lambda: (
            loop.call_soon_threadsafe(lambda: self._dropped(new_ids, acks, urgent))),
            urgent=urgent)

    def _unhold(self) -> None:
        self._holding = False
        self.flush()

    def _dropped(self, new_ids: list[str], acks: dict[str, set[str]], urgent: bool) -> None:
        """The store dropped the write (it was bad, not the store): its results are never
        acknowledged, so their nodes keep them; its new jobs never go out."""
        self._wrote(urgent)
        ids = set().union(*acks.values()) if acks else set()
        self.unstored |= ids
        log.error("the store dropped a write of %d new job(s) and %d result(s): those results "
                  "are not acknowledged, and those jobs are not sent", len(new_ids), len(ids))

    def _committed(self, new_ids: list[str], acks: dict[str, set[str]],
                   after: list[Callable[[], None]], urgent: bool) -> None:
        """In the store: the new jobs may go, the results may be acknowledged."""
        self._wrote(urgent)
        for j in new_ids:
            rec = self.jobs.get(j)
            if rec is not None and rec.status is Q:
                self.enqueue(rec)
        if acks:
            self.ack({n: sorted(ids) for n, ids in acks.items()})
        for fn in after:
            try:
                fn()
            except Exception:
                log.exception("job callback failed")
        self.kick()

    def _wrote(self, urgent: bool) -> None:
        """A write of the book has committed or been dropped: what waited for it goes now."""
        self._writing -= urgent
        if not self._writing and (self.new or self.after_persist):
            self._flush_this_round()

    def rows(self, ids: list[str]) -> list[JobRow]:
        out: list[JobRow] = []
        for i in range(0, len(ids), 500):
            out.extend(self.store.job_rows(ids[i:i + 500]))
        return out

    # --- moving jobs -----------------------------------------------------------------------

    def move(self, rec: JobRecord, to: JobStatus, *, node: str | None = None,
             reason: str = "") -> None:
        """Move a job (the state machine checks it), record the move, keep the indexes."""
        was, where = rec.status, rec.node
        self.events.append(advance(rec, to, time.time(), node=node, reason=reason))
        self._dirty.add(rec.id)
        if was is R:
            ss = self.running_on.get(where)
            if ss is not None:
                ss.discard(rec.id)
            if rec.timeout:
                self.timed.pop(rec.id, None)
        if to is R:
            ss = self.running_on.get(rec.node)
            if ss is None:
                ss = self.running_on[rec.node] = set()
            ss.add(rec.id)
            if rec.timeout:
                self.timed[rec.id] = time.monotonic() + rec.timeout + self.overdue_grace
        elif to is Q:
            self.enqueue(rec, front=True)
        elif to is not A:  # finished
            self._finish(rec)
        if not self.flush_due:
            self.touch()

    def walk(self, rec: JobRecord, to: JobStatus, node: str, reason: str) -> None:
        """Move through every state in between (a node reported a job further along)."""
        for step in path_to(rec.status, to):
            self.move(rec, step, node=node, reason=reason)

    def reattribute(self, rec: JobRecord, node: str) -> None:
        """A running job turned out to run on another node (it ran twice, or a node claimed it
        after a restart): it stays running, on that node."""
        self.running_on.get(rec.node, set()).discard(rec.id)
        rec.node = node
        self.running_on.setdefault(node, set()).add(rec.id)
        self._dirty.add(rec.id)

    def enqueue(self, rec: JobRecord, front: bool = False) -> None:
        tok = self.qtoken.get(rec.id, 0) + 1
        self.qtoken[rec.id] = tok
        dq = self.queues.setdefault(rec.key, deque())
        (dq.appendleft if front else dq.append)((rec.seq, rec.id, tok))
        self.kick()

    def _finish(self, rec: JobRecord) -> None:
        self.jobs.pop(rec.id, None)
        self.holders.pop(rec.id, None)
        self.qtoken.pop(rec.id, None)
        if self.orphans:
            self.orphans.discard(rec.id)
        self.finished[rec.id] = rec
        while len(self.finished) > KEEP_FINISHED:
            self.finished.popitem(last=False)
        fns = self.watchers.pop(rec.id, None)
        if fns:
            get = rec.to_dict  # a finished record does not change any more
            for fn in fns:
                try:
                    fn(get)
                except Exception:
                    log.exception("job watcher failed")

    def requeue_or_fail(self, rec: JobRecord, why: str, error: dict[str, Any] | None) -> None:
        to = after_failure(rec)
        if to is Q:
            self.move(rec, Q, reason=f"retry {rec.attempts}/{rec.retries}: {why}")
        else:
            rec.result = {**(rec.result or {}), "error": error or {
                "ename": "JobFailed", "evalue": why, "traceback": ""}}
            tries = f" after {rec.attempts} run(s)" if rec.attempts > 1 else ""
            self.move(rec, JobStatus.FAILED, reason=f"{why}{tries}")

    def lookup(self, job_id: str) -> JobRecord | None:
        """A job in memory, or else in the store."""
        rec = self.jobs.get(job_id) or self.finished.get(job_id)
        if rec is None:
            rows = self.rows([job_id])
            rec = record_of(rows[0]) if rows else None
        return rec


def record_of(row: JobRow) -> JobRecord:
    return JobRecord(row.id, row.kind, row.code, row.fn, row.args, row.kwargs, row.args_pickle,
                     row.nodes, row.retries, row.timeout, row.require, row.issuer,
                     JobStatus(row.status), row.node, row.attempts, row.created, row.updated,
                     row.started, row.finished, row.result, row.reason, row.seq)


__all__ = ["JobBook", "Watcher", "record_of"]
