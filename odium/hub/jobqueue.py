"""The hub's job queue: jobs stored before they are dispatched, credit-based dispatch over the
jobs socket, each result recorded once, retries, cancels, and recovery after a restart.

Everything here runs in the hub's loop thread, except ``submit_threadsafe`` (any thread) and
the callbacks the store's writer thread hands back through the loop. The decisions
(state machine, retry policy, which jobs go now) are in ``odium.core.jobs``; this is the adapter
between them, the sockets and the store. The wire is described in docs/protocol.md, "Job
queue".
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
import zmq
from sqlalchemy.orm import Session

from ..core import wire as P
from ..core.jobs import (
    MAX_BATCH,
    MAX_BATCH_BYTES,
    JobEvent,
    JobRecord,
    JobStatus,
    advance,
    after_failure,
    known,
    new_job_id,
    path_to,
    plan_dispatch,
)
from ..core.targeting import name_matches
from ..errors import AuthError, ConfigError, NotConnectedError, OdiumError
from ..local.state import satisfies
from .store import JobFnRow, JobRow

if TYPE_CHECKING:
    from .server import HubCore, KeyInfo, NodeInfo

log = logging.getLogger(__name__)

Q, A, R = JobStatus.QUEUED, JobStatus.ASSIGNED, JobStatus.RUNNING
CHECK_EVERY = 0.1  # seconds between checks of batches on the way, orphans, overdue jobs
FLUSH_EVERY = 0.01  # seconds: new jobs are written at most this often while they pour in
FLUSH_UPDATES = 0.05  # and moves of jobs (coalesced: one row update for several moves)
KEEP_FINISHED = 20_000  # finished jobs kept in memory (older ones are read from the store)
KEEP_BATCHES = 100_000  # batches remembered (which jobs each carried), to check reports
_JOB_COLS = ("id", "seq", "kind", "code", "fn", "args", "kwargs", "args_pickle", "nodes",
             "retries", "timeout", "require", "issuer", "status", "node", "attempts", "created",
             "updated", "started", "finished", "result", "reason")
_MUTABLE = ("status", "node", "attempts", "updated", "started", "finished", "result", "reason")
_EVENT_COLS = ("job_seq", "job_id", "ts", "prev", "status", "node", "detail")
_VALUE = {s: s.value for s in JobStatus}

Watcher = Callable[[Callable[[], dict[str, Any]]], None]  # gets a job's info, lazily


@dataclass
class NodeSlots:
    """What the hub knows of one node's job slots."""

    name: str
    boot: str = ""  # the node run that last reported (job_state); "" when gone
    capacity: int = 0
    free: int = 0  # as the node last said
    reserved: int = 0  # planned against its free slots, on the way


@dataclass
class Flight:
    """A batch on the way: sent on the PUSH socket, not yet reported by the node it reached."""

    node: str  # whose free slots it was planned for
    sent: float  # monotonic
    jobs: list[str]


class JobQueue:
    """The hub's job queue. See the module docstring and docs/protocol.md."""

    def __init__(self, hub: HubCore) -> None:
        self.hub = hub
        self.store = hub.store
        self.loop = hub.rt.loop
        hb = hub.hb_interval
        self.flight_timeout = max(2.0, 3 * hb)  # a batch nobody reported on goes back
        self.orphan_grace = max(2.0, 5 * hb)  # after a restart, nodes claim their jobs
        self.overdue_grace = max(2.0, 3 * hb)  # beyond a job's timeout, the hub gives up
        self.jobs: dict[str, JobRecord] = {}  # every job not finished
        self.finished: OrderedDict[str, JobRecord] = OrderedDict()
        self.queues: dict[tuple[str, str], deque[tuple[int, str, int]]] = {}
        self.qtoken: dict[str, int] = {}  # a queue entry is live while its token is current
        self.fns: dict[str, str] = {}  # function hash -> base64 cloudpickle
        self.slots: dict[str, NodeSlots] = {}
        self.running_on: dict[str, set[str]] = {}
        self.timed: dict[str, float] = {}  # running job with a timeout -> when the hub gives up
        self.flights: dict[str, Flight] = {}
        # which jobs each batch carried, and which nodes reported a batch that carried a job:
        # a node speaks for a job only if the job reached it (or it is the job's assignment)
        self.batch_jobs: OrderedDict[str, list[str]] = OrderedDict()
        self.holders: dict[str, set[str]] = {}
        self.watchers: dict[str, list[Watcher]] = {}
        self.orphans: set[str] = set()
        self.orphan_deadline = 0.0
        self._eligible_cache: dict[tuple[str, str], bool] = {}
        self._new: list[str] = []
        self._dirty: set[str] = set()
        self._events: list[JobEvent] = []
        self._new_fns: list[tuple[str, str]] = []
        self._acks: dict[str, list[str]] = {}
        self._after_persist: list[Callable[[], None]] = []
        self._flush_due = False
        self._flushed_at = 0.0
        self._sql = _statements(self.store.engine.dialect.paramstyle)
        self._dispatch_due = False
        self._incoming: list[tuple[list[JobRecord], dict[str, str], dict[str, Watcher],
                                   set[str]]] = []
        self._incoming_lock = threading.Lock()
        self.closed = False
        self.stats = {"batches": 0, "declined": 0, "results": 0, "taken": 0}
        self.seq = self.store.max_job_seq()
        self._load()
        self.loop.every(CHECK_EVERY, self._check)
        self.query_handlers = {t: h for t, h in (
            ("submit", self._h_submit), ("job", self._h_job), ("jobs", self._h_jobs),
            ("job_cancel", self._h_cancel))}
        self.result_handlers = {"job_report": self._r_report, "job_state": self._r_state}

    # --- the store -------------------------------------------------------------------------

    def _load(self) -> None:
        """A restarted hub: queued jobs queue again; assigned and running ones wait for the node
        that has them to say so (``job_state``), or go back to the queue after a grace."""
        rows = self.store.jobs_unfinished()
        if not rows:
            return
        self.fns.update(self.store.job_functions(sorted({r.fn for r in rows if r.fn})))
        for row in rows:
            rec = _record(row)
            self.jobs[rec.id] = rec
            if rec.status is Q:
                self._enqueue(rec)
            else:
                self.orphans.add(rec.id)
                if rec.status is R and rec.node:
                    self.running_on.setdefault(rec.node, set()).add(rec.id)
                    if rec.timeout:  # the clock starts again: the hub was away
                        self.timed[rec.id] = (time.monotonic() + rec.timeout
                                              + self.overdue_grace)
        self.orphan_deadline = time.monotonic() + self.orphan_grace
        self.store.event("jobs_reloaded", f"{len(rows)} unfinished job(s) reloaded: "
                         f"{len(rows) - len(self.orphans)} queued, {len(self.orphans)} waiting "
                         "for their nodes")

    def _touch(self) -> None:
        """Changes are waiting: write them at the end of this loop round, or, while writes
        come thick and fast, at most every FLUSH_EVERY (so one row update covers a job's
        several moves)."""
        if not self._flush_due:
            self._flush_due = True
            every = FLUSH_EVERY if self._new or self._after_persist else FLUSH_UPDATES
            wait = every - (time.monotonic() - self._flushed_at)
            self.loop.call_later(max(0.0, wait), self._flush)

    def _flush(self) -> None:
        """Hand the changes to the store as one write (plain executemany: this is the queue's
        hot path); once committed, queue the new jobs and acknowledge the results."""
        self._flush_due = False
        self._flushed_at = time.monotonic()
        if not (self._new or self._dirty or self._events or self._acks or self._after_persist
                or self._new_fns):
            return
        new_ids, self._new = self._new, []
        get, get_done = self.jobs.get, self.finished.get
        new_recs = [r for r in (get(j) or get_done(j) for j in new_ids) if r is not None]
        new_set = set(new_ids)
        dirty = [r for r in (get(j) or get_done(j) for j in self._dirty if j not in new_set)
                 if r is not None]
        self._dirty = set()
        rows = [(r.id, r.seq, r.kind, r.code, r.fn, r.args, r.kwargs, r.args_pickle, r.nodes,
                 r.retries, r.timeout, r.require, r.issuer, _VALUE[r.status], r.node,
                 r.attempts, r.created, r.updated, r.started, r.finished, r.result, r.reason)
                for r in new_recs]
        upd = [(_VALUE[r.status], r.node, r.attempts, r.updated, r.started, r.finished,
                r.result, r.reason, r.seq) for r in dirty]
        events, self._events = self._events, []
        fns, self._new_fns = self._new_fns, []
        acks, self._acks = self._acks, {}
        after, self._after_persist = self._after_persist, []
        created = time.time()
        sql = self._sql

        def work(s: Session) -> None:
            for h, data in fns:
                s.merge(JobFnRow(hash=h, data=data, created=created))
            conn = s.connection()
            dumps = _dumps
            if rows:
                conn.exec_driver_sql(sql["insert"], sql["fit"]([
                    r[:5] + (dumps(r[5]), dumps(r[6])) + r[7:20] + (dumps(r[20]), r[21])
                    for r in rows]))
            if upd:
                conn.exec_driver_sql(sql["update"], sql["fit"]([
                    u[:6] + (dumps(u[6]), u[7], u[8]) for u in upd]))
            if events:
                conn.exec_driver_sql(sql["event"], sql["fit"](
                    [(e.seq, e.job, e.ts, e.prev, e.status, e.node, e.detail[:4000])
                     for e in events]))

        loop = self.loop
        # the results are acknowledged (and nodes forget them) only once this very write has
        # committed, durably (store.SQLITE_SYNCHRONOUS); never if it failed
        self.store.write(work, on_commit=lambda: loop.call_soon_threadsafe(
            lambda: self._committed(new_ids, acks, after)))

    def _committed(self, new_ids: list[str], acks: dict[str, list[str]],
                   after: list[Callable[[], None]]) -> None:
        """In the store: the new jobs may go, the results may be acknowledged."""
        for j in new_ids:
            rec = self.jobs.get(j)
            if rec is not None and rec.status is Q:
                self._enqueue(rec)
        if acks:
            self.hub._publish("job_ack", P.JobAck(acks), to=sorted(acks))
        for fn in after:
            try:
                fn()
            except Exception:
                log.exception("job callback failed")
        self._kick()

    def flush_now(self) -> None:
        """Queue every pending change for the store now (the hub is stopping)."""
        self._flush()

    # --- moving jobs -----------------------------------------------------------------------

    def _move(self, rec: JobRecord, to: JobStatus, *, node: str | None = None,
              reason: str = "") -> None:
        """Move a job (the state machine checks it), record the move, keep the indexes."""
        was, where = rec.status, rec.node
        self._events.append(advance(rec, to, time.time(), node=node, reason=reason))
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
            self._enqueue(rec, front=True)
        elif to is not A:  # finished
            self._finish(rec)
        if not self._flush_due:
            self._touch()

    def _walk(self, rec: JobRecord, to: JobStatus, node: str, reason: str) -> None:
        """Move through every state in between (a node reported a job further along)."""
        for step in path_to(rec.status, to):
            self._move(rec, step, node=node, reason=reason)

    def _reattribute(self, rec: JobRecord, node: str) -> None:
        """A running job turned out to run on another node (it ran twice, or a node claimed it
        after a restart): it stays running, on that node."""
        self.running_on.get(rec.node, set()).discard(rec.id)
        rec.node = node
        self.running_on.setdefault(node, set()).add(rec.id)
        self._dirty.add(rec.id)

    def _enqueue(self, rec: JobRecord, front: bool = False) -> None:
        tok = self.qtoken.get(rec.id, 0) + 1
        self.qtoken[rec.id] = tok
        dq = self.queues.setdefault(rec.key, deque())
        (dq.appendleft if front else dq.append)((rec.seq, rec.id, tok))
        self._kick()

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

    def _requeue_or_fail(self, rec: JobRecord, why: str, error: dict[str, Any] | None) -> None:
        to = after_failure(rec)
        if to is Q:
            self._move(rec, Q, reason=f"retry {rec.attempts}/{rec.retries}: {why}")
        else:
            rec.result = {**(rec.result or {}), "error": error or {
                "ename": "JobFailed", "evalue": why, "traceback": ""}}
            tries = f" after {rec.attempts} run(s)" if rec.attempts > 1 else ""
            self._move(rec, JobStatus.FAILED, reason=f"{why}{tries}")

    # --- dispatch --------------------------------------------------------------------------

    def _kick(self) -> None:
        if not self._dispatch_due and not self.closed:
            self._dispatch_due = True
            self.loop.call_later(0, self._dispatch)

    def _live(self, dq: deque[tuple[int, str, int]]) -> Iterator[tuple[int, str]]:
        jobs, tokens = self.jobs, self.qtoken
        for seq, j, tok in dq:
            rec = jobs.get(j)
            if rec is not None and rec.status is Q and tokens.get(j) == tok:
                yield seq, j

    def _clean(self, dq: deque[tuple[int, str, int]]) -> None:
        jobs, tokens = self.jobs, self.qtoken
        while dq:
            _seq, j, tok = dq[0]
            rec = jobs.get(j)
            if rec is not None and rec.status is Q and tokens.get(j) == tok:
                return
            dq.popleft()

    def _eligible(self, key: tuple[str, str], name: str) -> bool:
        nodes, require = key
        ck = (nodes, name)
        ok = self._eligible_cache.get(ck)
        if ok is None:
            if len(self._eligible_cache) > 10000:
                self._eligible_cache.clear()
            ok = self._eligible_cache[ck] = name_matches(nodes, name)
        if not ok:
            return False
        if require == "any":
            return True
        info = self.hub.nodes.get(name)
        return info is not None and satisfies(require, info.state, info.state)

    def _why_declined(self, rec: JobRecord, node: NodeInfo) -> str:
        """Why a node declined a job, as far as the hub can tell from its view of the node: a
        node declines a job it may not run (its name or state) as well as one it has no slot
        for."""
        if not name_matches(rec.nodes, node.name):
            return f"not one of nodes={rec.nodes!r}"
        if rec.require != "any" and not satisfies(rec.require, node.state, node.state):
            return f"its state {node.state[:12]} is not the required {rec.require[:12]}"
        return "no free slot"

    def credit(self) -> dict[str, int]:
        """Free slots per ready node, less what is on the way to it."""
        out: dict[str, int] = {}
        for name, ns in self.slots.items():
            info = self.hub.nodes.get(name)
            if info is None or info.status != "ready" or ns.boot != info.boot:
                continue
            c = ns.free - ns.reserved
            if c > 0:
                out[name] = c
        return out

    def _dispatch(self) -> None:
        self._dispatch_due = False
        if self.closed or not any(self.queues.values()):
            return
        sock = self.hub.sockets.get("jobs")
        credit = self.credit()
        if sock is None or not credit:
            return
        queues = {k: self._live(dq) for k, dq in self.queues.items() if dq}
        plan = plan_dispatch(queues, credit, self._eligible)
        mono = time.monotonic()
        hub_nodes = self.hub.nodes
        live = [n for n, i in hub_nodes.items() if i.status in ("ready", "connecting")]
        may_run: dict[tuple[str, str], frozenset[str]] = {}

        def readers(chunk: list[JobRecord]) -> list[str]:
            """The nodes that may run every job of a batch: the only ones it is sealed to
            (PUSH hands a batch to any connected node; the others learn nothing of it)."""
            names: frozenset[str] | None = None
            for k in {r.key for r in chunk}:
                el = may_run.get(k)
                if el is None:
                    el = may_run[k] = frozenset(n for n in live if self._eligible(k, n))
                names = el if names is None else names & el
            return [hub_nodes[n].key_id for n in sorted(names or ())]
        for node, ids in plan.items():
            start = 0
            while start < len(ids):
                chunk: list[JobRecord] = []
                size = 0
                fns: dict[str, str] = {}
                while start < len(ids) and len(chunk) < MAX_BATCH and size < MAX_BATCH_BYTES:
                    rec = self.jobs[ids[start]]
                    start += 1
                    chunk.append(rec)
                    size += len(rec.code) + len(rec.args_pickle or "") + 200
                    if rec.fn and rec.fn not in fns:
                        fns[rec.fn] = self.fns.get(rec.fn, "")
                        size += len(fns[rec.fn])
                specs = [P.JobSpec(r.id, r.kind, r.code, r.fn,  # type: ignore[arg-type]
                                   r.args, r.kwargs, r.args_pickle, r.timeout, r.nodes,
                                   r.require, r.attempts + 1) for r in chunk]
                mid = P.new_id()
                sealed = self.hub.keyring.seal("job_batch", P.JobBatch(specs, fns),
                                               readers(chunk))
                raw = self.hub.rt.sign("sealed", sealed, msg_id=mid)
                try:
                    sock.send(raw, zmq.NOBLOCK)
                except zmq.Again:  # no node connected on the jobs socket (yet): try later
                    self._clean_all()
                    return
                self.stats["batches"] += 1
                for rec in chunk:
                    self._move(rec, A, node=node, reason=f"sent in batch {mid[:12]}")
                self.flights[mid] = Flight(node, mono, [r.id for r in chunk])
                self.batch_jobs[mid] = self.flights[mid].jobs
                if len(self.batch_jobs) > KEEP_BATCHES:
                    self.batch_jobs.popitem(last=False)
                self.slots[node].reserved += len(chunk)
        self._clean_all()

    def _clean_all(self) -> None:
        empty = []
        for k, dq in self.queues.items():
            self._clean(dq)
            if not dq:
                empty.append(k)
        for k in empty:
            del self.queues[k]

    def _release(self, f: Flight) -> None:
        ns = self.slots.get(f.node)
        if ns is not None:
            ns.reserved = max(0, ns.reserved - len(f.jobs))

    # --- from nodes (results socket) -------------------------------------------------------

    def _slots_of(self, node: NodeInfo) -> NodeSlots:
        ns = self.slots.get(node.name)
        if ns is None:
            ns = self.slots[node.name] = NodeSlots(node.name)
        return ns

    def _cancel_on(self, node: str, ids: list[str]) -> None:
        if ids:
            self.hub._publish("job_cancel", P.JobCancel(ids), to=[node])

    def _holds(self, j: str, rec: JobRecord, node: str) -> bool:
        """Whether a node may speak for a job: a batch that carried it reached that node, or
        the node is the job's assignment (recorded in the store)."""
        return node in self.holders.get(j, ()) or rec.node == node

    def _refuse(self, node: NodeInfo, what: str, ids: list[str]) -> None:
        """A node spoke for jobs that never reached it: nothing changes; it is logged."""
        ids = sorted(set(ids))
        more = f" (and {len(ids) - 5} more)" if len(ids) > 5 else ""
        self.hub._reject("results", node.key_id, AuthError(
            f"{node.name} reported {what} for job(s) not sent to it: {', '.join(ids[:5])}{more}"))

    def _r_report(self, msg: P.Message, node: NodeInfo) -> None:
        """What a node did with the batches it got, and the jobs it finished."""
        body: P.JobReport = msg.body  # type: ignore[assignment]
        if body.batches or body.taken or body.declined or body.unopened:
            self._taken(body, node)
        if body.results:
            self._results(body, node)
        self._slots_of(node).free = body.free
        self._kick()

    def _taken(self, body: P.JobReport, node: NodeInfo) -> None:
        for bid in body.batches:
            f = self.flights.pop(bid, None)
            if f is not None:
                self._release(f)
            for j in self.batch_jobs.get(bid, ()):
                if j in self.jobs:
                    self.holders.setdefault(j, set()).add(node.name)
        for bid in body.unopened:  # it reached a node that may not run it: send it on
            f = self.flights.pop(bid, None)
            if f is None:
                continue
            self._release(f)
            for j in f.jobs:
                rec = self.jobs.get(j)
                if rec is not None and rec.status is A:
                    self._move(rec, Q, reason=f"reached {node.name}, which may not run it")
        stop, refused = [], []
        for j in body.taken:
            rec = self.jobs.get(j)
            if rec is None:
                stop.append(j)  # finished (cancelled, or another node's result came first)
            elif not self._holds(j, rec, node.name):
                refused.append(j)
            elif rec.status is A:
                self._move(rec, R, node=node.name, reason="taken")
            elif rec.status is Q:  # its batch was given up on, but it did arrive
                self._walk(rec, R, node.name, "taken late")
            self.orphans.discard(j)
        self._cancel_on(node.name, stop)
        for j in body.declined:
            rec = self.jobs.get(j)
            if rec is None:
                continue
            if node.name not in self.holders.get(j, ()):
                refused.append(j)
                continue
            self.holders[j].discard(node.name)
            if rec.status is A:
                why = self._why_declined(rec, node)
                self._move(rec, Q, reason=f"declined by {node.name} ({why})")
        if refused:
            self._refuse(node, "taken/declined", refused)
        self.stats["taken"] += len(body.taken)
        self.stats["declined"] += len(body.declined)

    def _results(self, body: P.JobReport, node: NodeInfo) -> None:
        acks = self._acks.setdefault(node.name, [])
        refused = []
        for o in body.results:
            acks.append(o.id)  # (a refused one too: the node need not keep sending it)
            rec = self.jobs.get(o.id)
            if rec is None:
                continue  # recorded already: the first result stands (acknowledged again)
            if not self._holds(o.id, rec, node.name):
                refused.append(o.id)
                continue
            if o.attempt < rec.attempts and o.status != "done":
                continue  # an earlier run's end, dealt with already (sent again)
            self.stats["results"] += 1
            self.orphans.discard(rec.id)
            other = rec.node if rec.status is R and rec.node != node.name else ""
            if other:  # it ran on two nodes: this result is the first
                self._reattribute(rec, node.name)
            elif rec.status is not R:
                self._walk(rec, R, node.name, "result reported")
            err = P.to_builtins(o.error) if o.error is not None else None
            rec.result = {"value": o.value, "value_repr": o.value_repr,
                          "value_json": o.value_json, "stdout": o.stdout, "stderr": o.stderr,
                          "error": err, "started": o.started, "finished": o.finished}
            if o.status == "done":
                self._move(rec, JobStatus.DONE, reason="")
            elif o.status == "timeout":
                self._move(rec, JobStatus.TIMEOUT, reason=f"timed out after {rec.timeout} s")
            elif o.status == "cancelled":
                self._move(rec, JobStatus.CANCELLED, reason="cancelled on the node")
            else:
                e = err or {}
                why = (f"{e.get('ename', 'Error')}: {e.get('evalue', '')}" if o.status == "failed"
                       else f"its worker died on {node.name}: {e.get('evalue', '')}")
                self._requeue_or_fail(rec, why, err)
            if other:
                self._cancel_on(other, [rec.id])
        if refused:
            self._refuse(node, "results", refused)
        self._touch()

    def _r_state(self, msg: P.Message, node: NodeInfo) -> None:
        body: P.JobState = msg.body  # type: ignore[assignment]
        ns = self._slots_of(node)
        ns.boot, ns.capacity, ns.free = node.boot, body.capacity, body.free
        stop, refused = [], []
        for j in body.running:
            rec = self.jobs.get(j)
            if rec is None:
                stop.append(j)
            elif not self._holds(j, rec, node.name):
                refused.append(j)
            elif rec.status is R and rec.node == node.name:
                self.orphans.discard(j)
            elif rec.status is R and j in self.orphans:
                self._reattribute(rec, node.name)
                self.orphans.discard(j)
            elif rec.status in (Q, A):
                self._walk(rec, R, node.name, "claimed after a restart" if j in self.orphans
                           else "reported running")
                self.orphans.discard(j)
        self._cancel_on(node.name, stop)
        if refused:
            self._refuse(node, "running", refused)
        self._kick()

    def node_lost(self, name: str, why: str) -> None:
        """A node is gone (lost, left, restarted): its jobs run again elsewhere or fail."""
        ns = self.slots.get(name)
        if ns is not None:
            ns.boot, ns.free, ns.reserved = "", 0, 0
        for j in sorted(self.running_on.pop(name, set())):
            rec = self.jobs.get(j)
            if rec is not None and rec.status is R and rec.node == name:
                self.orphans.discard(j)
                self._requeue_or_fail(rec, f"node {name} lost while running it: {why}", {
                    "ename": "NodeLost", "evalue": f"node {name} lost while running the job: "
                    f"{why}", "traceback": ""})

    # --- timers ----------------------------------------------------------------------------

    def _check(self) -> None:
        mono = time.monotonic()
        for bid, f in list(self.flights.items()):
            if mono - f.sent > self.flight_timeout:
                del self.flights[bid]
                self._release(f)
                for j in f.jobs:
                    rec = self.jobs.get(j)
                    if rec is not None and rec.status is A:
                        self._move(rec, Q, reason=f"no node took it within "
                                   f"{self.flight_timeout:.1f} s; sent again")
        if self.orphans and mono > self.orphan_deadline:
            for j in sorted(self.orphans):
                rec = self.jobs.get(j)
                if rec is not None and rec.status in (A, R):
                    self._move(rec, Q, reason="no node claimed it after the hub restarted")
            self.orphans.clear()
        for j, deadline in list(self.timed.items()):
            rec = self.jobs.get(j)
            if rec is None or rec.status is not R:
                self.timed.pop(j, None)
            elif mono > deadline:
                name = rec.node
                rec.result = {**(rec.result or {}), "error": {
                    "ename": "TimeoutError", "evalue": f"no result from {name} within "
                    f"{rec.timeout} s (+{self.overdue_grace:.0f} s grace)", "traceback": ""}}
                self._move(rec, JobStatus.TIMEOUT, reason=f"no result from {name} in time")
                self._cancel_on(name, [j])
        if any(self.queues.values()):
            self._kick()

    # --- submitting, looking, cancelling ---------------------------------------------------

    def target(self, nodes: str, require: str | None) -> str:
        """Check that jobs for ``nodes`` could ever run; the state they require, resolved
        (``any`` or a commit). Any thread: it reads only node names and the hub's state."""
        for _ in range(3):
            try:
                names = self.hub.targetable()  # not revoked or rejected ones
                break
            except RuntimeError:  # changed while we read it (another thread)
                continue
        if not any(name_matches(nodes, n) for n in names):
            known = ", ".join(sorted(names)) or "none yet (add some: odium token)"
            raise NotConnectedError(f"no node matches {nodes!r}; nodes: {known}")
        return self.hub.resolve_requirement(require)[0]

    @staticmethod
    def record(fields: dict[str, Any], *, nodes: str, retries: int, timeout: float | None,
               required: str, issuer: str, now: float) -> JobRecord:
        """A new job record from packed fields (``odium.api.jobs.pack_jobs``)."""
        return JobRecord(fields.get("id") or new_job_id(), fields["kind"], fields["code"],
                         fields["fn"], fields["args"], fields["kwargs"], fields["args_pickle"],
                         nodes, retries, timeout, required, issuer, Q, "", 0, now, now)

    def submit_threadsafe(self, recs: list[JobRecord], fns: dict[str, str],
                          watchers: dict[str, Watcher], named: set[str]) -> None:
        """Queue jobs from another thread without waiting for the loop."""
        with self._incoming_lock:
            first = not self._incoming
            self._incoming.append((recs, fns, watchers, named))
        if first:
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._incoming_lock:
            batches, self._incoming = self._incoming, []
        for recs, fns, watchers, named in batches:
            self.add(recs, fns, watchers, named)

    def add(self, recs: list[JobRecord], fns: dict[str, str],
            watchers: dict[str, Watcher] | None = None, named: set[str] | None = None
            ) -> list[str]:
        """Add jobs (loop thread). A job id that exists already is that job (idempotent);
        ``named``: the ids a submitter chose, which are looked up in the store too."""
        for h, data in fns.items():
            if h not in self.fns:
                self.fns[h] = data
                self._new_fns.append((h, data))
        unknown = [r.id for r in recs if r.id in (named or ())
                   and r.id not in self.jobs and r.id not in self.finished]
        old = {row.id: _record(row) for row in self._rows(unknown)} if unknown else {}
        jobs, finished, new, events = self.jobs, self.finished, self._new, self._events
        for rec in recs:
            j = rec.id
            known = jobs.get(j) or finished.get(j) or old.get(j)
            if known is not None:
                if known.status.terminal and j not in finished:
                    finished[j] = known
                if watchers and j in watchers:
                    self.watch(j, watchers[j])
                continue
            self.seq += 1
            rec.seq = self.seq
            rec.status = Q
            jobs[j] = rec
            new.append(j)
            events.append(JobEvent(j, rec.created, "", "queued", "", "submitted", rec.seq))
            if watchers:
                fn = watchers.get(j)
                if fn is not None:
                    self.watchers[j] = [fn]
        if self._flush_due and time.monotonic() - self._flushed_at < FLUSH_EVERY:
            pass  # a flush is coming soon enough
        elif self._flush_due:
            self.loop.call_later(0, self._flush)  # sooner than the update cadence
        self._touch()
        return [r.id for r in recs]

    def _rows(self, ids: list[str]) -> list[JobRow]:
        out: list[JobRow] = []
        for i in range(0, len(ids), 500):
            out.extend(self.store.job_rows(ids[i:i + 500]))
        return out

    def watch(self, job_id: str, fn: Watcher) -> None:
        """Call fn(info) when the job finishes (at once if it has)."""
        rec = self.jobs.get(job_id)
        if rec is not None:
            self.watchers.setdefault(job_id, []).append(fn)
            return
        rec = self.finished.get(job_id)
        if rec is None:
            rows = self._rows([job_id])
            rec = _record(rows[0]) if rows else None
        if rec is not None:
            fn(rec.to_dict)
        else:
            fn(lambda: {"id": job_id, "status": "failed", "reason": "no such job",
                        "error": {"ename": "UnknownJob", "evalue": f"no job {job_id}",
                                  "traceback": ""}})

    def info(self, job_id: str, events: bool = False) -> dict[str, Any] | None:
        rec = self.jobs.get(job_id) or self.finished.get(job_id)
        if rec is None:
            rows = self._rows([job_id])
            if not rows:
                return None
            rec = _record(rows[0])
        d = rec.to_dict()
        if rec.status is Q:
            d["waiting"] = self._why_waiting(rec)
        if events:  # every move so far: what is pending is written first
            self._flush()
            self.store.flush()
            d["events"] = [{"ts": e.ts, "prev": e.prev, "status": e.status, "node": e.node,
                            "detail": e.detail} for e in self.store.job_events(job_id)]
        return d

    def _why_waiting(self, rec: JobRecord) -> str:
        names = [n for n in self.hub.nodes if self._eligible(rec.key, n)]
        ready = [n for n in names if self.hub.nodes[n].status == "ready"]
        if not names:
            return (f"no node matches nodes={rec.nodes!r} with state {rec.require}; it runs "
                    "when one does")
        if not ready:
            return f"the nodes it may run on ({', '.join(names)}) are not connected"
        return f"the nodes it may run on ({', '.join(ready)}) have no free slot"

    def cancel(self, ids: list[str], by: str = "") -> dict[str, str]:
        """Cancel jobs; id -> ``cancelled`` (by this call), ``already <status>`` (it had
        finished), or ``unknown``."""
        out: dict[str, str] = {}
        for j in ids:
            rec = self.jobs.get(j)
            if rec is None:
                i = self.info(j)
                out[j] = f"already {i['status']}" if i else "unknown"
                continue
            node = rec.node if rec.status is R else ""
            self._move(rec, JobStatus.CANCELLED, reason=f"cancelled{' by ' + by if by else ''}")
            if node:
                self._cancel_on(node, [j])
            out[j] = rec.status.value
        return out

    def listing(self, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Newest first: the store's rows, with what is newer in memory laid over them."""
        rows = self.store.job_list(None, max(limit * 4, 200) if status else limit)
        out = []
        seen = set()
        for row in rows:
            rec = self.jobs.get(row.id) or self.finished.get(row.id) or _record(row)
            seen.add(row.id)
            if status is None or rec.status.value == status:
                out.append(_brief(rec))
        for rec in sorted(self.jobs.values(), key=lambda r: -r.seq):
            if rec.id not in seen and (status is None or rec.status.value == status):
                out.append(_brief(rec))
        out.sort(key=lambda d: -d["seq"])
        return out[:limit]

    # --- admin requests (query socket) -----------------------------------------------------

    def _h_submit(self, msg: P.Message, info: KeyInfo, reply: Callable[..., None]) -> None:
        body: P.Submit = msg.body  # type: ignore[assignment]
        if not body.jobs:
            raise ConfigError("nothing to submit")
        for r in body.jobs:
            if r.kind == "call" and r.fn not in body.fns and r.fn not in self.fns:
                raise ConfigError(f"job {r.id or '?'} calls function {r.fn} that is not sent")
        now = time.time()
        targets: dict[tuple[str, str], str] = {}
        recs = []
        for r in body.jobs:
            if r.kind == "python" and not r.code.strip():
                raise ConfigError("a job needs code: a string to run, or a function")
            t = (r.nodes, r.require)
            if t not in targets:
                targets[t] = self.target(r.nodes, r.require)
            fields = {"id": r.id, "kind": r.kind, "code": r.code, "fn": r.fn, "args": r.args,
                      "kwargs": r.kwargs, "args_pickle": r.args_pickle}
            recs.append(self.record(fields, nodes=r.nodes, retries=r.retries,
                                    timeout=r.timeout, required=targets[t],
                                    issuer=info.key_id, now=now))
        ids = self.add(recs, dict(body.fns), named={r.id for r in body.jobs if r.id})
        self._after_persist.append(lambda: reply({"ids": ids}))
        self._touch()

    def _h_job(self, msg: P.Message, info: KeyInfo, reply: Callable[..., None]) -> None:
        body: P.JobQuery = msg.body  # type: ignore[assignment]
        if not body.ids:
            raise ConfigError("which job? give its id")
        one = len(body.ids) == 1
        answered = [False]

        def answer() -> None:
            if answered[0]:
                return
            answered[0] = True
            jobs = []
            for j in body.ids:
                d = self.info(j, events=one)
                jobs.append(d if d is not None else {"id": j, "status": "unknown"})
            reply({"jobs": jobs})

        pending = [j for j in body.ids if j in self.jobs]
        if body.wait <= 0 or not pending:
            answer()
            return
        left = set(pending)

        def done(j: str) -> Watcher:
            def fn(_info: Callable[[], dict[str, Any]]) -> None:
                left.discard(j)
                if not left:
                    answer()
            return fn

        for j in pending:
            self.watch(j, done(j))
        self.loop.call_later(body.wait, answer)

    def _h_jobs(self, msg: P.Message, info: KeyInfo, reply: Callable[..., None]) -> None:
        body: P.JobQuery = msg.body  # type: ignore[assignment]
        reply({"jobs": self.listing(body.status, body.limit)})

    def _h_cancel(self, msg: P.Message, info: KeyInfo, reply: Callable[..., None]) -> None:
        body: P.JobCancel = msg.body  # type: ignore[assignment]
        reply({"status": self.cancel(list(body.jobs), by=info.name or info.key_id[:12])})

    def close(self) -> None:
        """The hub stops: pending changes go to the store; whoever waits for a job hears that
        the hub stopped (the job itself stays in the store and goes on at the next start)."""
        self.flush_now()
        self.closed = True
        watchers, self.watchers = self.watchers, {}
        for j, fns in watchers.items():
            rec = self.jobs.get(j)
            info = {**(rec.to_dict() if rec else {"id": j, "status": "queued"}),
                    "hub_closed": True}
            for fn in fns:
                try:
                    fn(known(info))
                except Exception:
                    log.exception("job watcher failed")


def _dumps(value: Any, _encode: Callable[[Any], bytes] = msgspec.json.encode) -> str | None:
    """A JSON column's text (what SQLAlchemy's JSON type reads back)."""
    if value is None:
        return None
    try:
        return _encode(value).decode()
    except (TypeError, OverflowError, msgspec.EncodeError):
        return json.dumps(value, default=str)


def _statements(paramstyle: str) -> dict[str, Any]:
    """The queue's three hot statements in the driver's own parameter style, and a function
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

    m = marks(_MUTABLE + ("seq",))
    sets = ", ".join(f"{c} = {x}" for c, x in zip(_MUTABLE, m[:-1], strict=True))
    update_sql = f"UPDATE jobs SET {sets} WHERE seq = {m[-1]}"

    def fit(rows: list[tuple[Any, ...]]) -> list[Any]:
        if paramstyle in ("named", "pyformat"):
            return [{f"p{i}": v for i, v in enumerate(r)} for r in rows]
        return rows

    return {"insert": insert_sql("jobs", _JOB_COLS), "update": update_sql,
            "event": insert_sql("job_events", _EVENT_COLS), "fit": fit}


def _record(row: JobRow) -> JobRecord:
    return JobRecord(row.id, row.kind, row.code, row.fn, row.args, row.kwargs, row.args_pickle,
                     row.nodes, row.retries, row.timeout, row.require, row.issuer,
                     JobStatus(row.status), row.node, row.attempts, row.created, row.updated,
                     row.started, row.finished, row.result, row.reason, row.seq)


def _brief(rec: JobRecord) -> dict[str, Any]:
    return {"id": rec.id, "seq": rec.seq, "status": rec.status.value, "node": rec.node,
            "kind": rec.kind, "attempts": rec.attempts, "created": rec.created,
            "finished": rec.finished, "reason": rec.reason,
            "what": (rec.code.strip().splitlines() or [""])[0][:60] if rec.kind == "python"
            else f"function {rec.fn}"}


__all__ = ["JobQueue", "OdiumError"]
