"""The hub's job queue: jobs stored before they are dispatched, credit-based dispatch over the
jobs socket, each result recorded once, retries, cancels, and recovery after a restart.

Everything here runs in the hub's loop thread, except ``submit_threadsafe`` (any thread) and
the callbacks the store's writer thread hands back through the loop. The decisions
(state machine, retry policy, which jobs go now) are in ``odium.core.jobs``; this is the adapter
between them, the sockets and the store, in four parts: the book of jobs and their writes
(``jobbook``), dispatch (``jobsend``), what nodes report and the clocks (``jobreports``), and
here what admins ask (submit, look, cancel). The wire is described in docs/protocol.md, "Job
queue".
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..core import wire as P
from ..core.dispatch import Dispatch
from ..core.jobs import JobEvent, JobRecord, JobStatus, known, new_job_id
from ..core.targeting import name_matches
from ..errors import ConfigError, NotConnectedError, OdiumError
from .asking import Asker
from .jobbook import JobBook, Watcher, record_of
from .jobreports import JobReports
from .jobsend import JobSender
from .links import JobWire, Reject, Timers
from .nodes import NodeInfo, NodeStatus
from .store import Store

log = logging.getLogger(__name__)

Q, A, R = JobStatus.QUEUED, JobStatus.ASSIGNED, JobStatus.RUNNING
CHECK_EVERY = 0.1  # seconds between checks of batches on the way, orphans, overdue jobs
Resolve = Callable[[str | None], tuple[str, str | None]]  # a required state, resolved


class JobQueue:
    """The hub's job queue. See the module docstring and docs/protocol.md.

    ``nodes``: the registry's nodes; ``reject``: logs what a node sent that was refused;
    ``targetable``: the names jobs may target;
    ``resolve``: a required state as nodes check it (``any`` or a commit)."""

    def __init__(self, store: Store, loop: Timers, wire: JobWire, nodes: Mapping[str, NodeInfo],
                 reject: Reject, *, hb_interval: float, targetable: Callable[[], list[str]],
                 resolve: Resolve) -> None:
        self.store = store
        self.loop = loop
        self.nodes = nodes
        self._targetable, self._resolve = targetable, resolve
        hb = hb_interval

        def ack(acks: dict[str, list[str]]) -> None:
            for name, ids in acks.items():  # each to its node alone (PUB topics)
                wire.publish_to(name, "job_ack", P.JobAck({name: ids}))

        self.book = JobBook(store, loop, max(2.0, 3 * hb), ack=ack)
        self.sender = JobSender(self.book, wire, nodes, loop)
        self.book.kick = self.sender.kick
        self.reports = JobReports(self.book, self.sender, wire, reject,
                                  flight_timeout=max(2.0, 3 * hb),
                                  relay_grace=max(30.0, 10 * hb), lost_grace=25 * hb)
        self._incoming: list[tuple[list[JobRecord], dict[str, str], dict[str, Watcher],
                                   set[str]]] = []
        self._incoming_lock = threading.Lock()
        self.book.load(orphan_grace=max(2.0, 5 * hb))  # after a restart, nodes claim jobs
        if self.book.orphans:
            self.reports.await_claims([n for n, i in nodes.items() if not i.via],
                                      cap=max(30.0, 10 * hb))
        loop.every(CHECK_EVERY, self.reports.check)
        self.query_handlers: Dispatch[Asker] = Dispatch("query (jobs)")
        self.query_handlers.on("submit", P.Submit, self._h_submit)
        self.query_handlers.on("job", P.JobQuery, self._h_job)
        self.query_handlers.on("jobs", P.JobQuery, self._h_jobs)
        self.query_handlers.on("job_cancel", P.JobCancel, self._h_cancel)
        self.result_handlers = self.reports.handlers

    @property
    def jobs(self) -> dict[str, JobRecord]:
        return self.book.jobs

    @property
    def finished(self) -> Mapping[str, JobRecord]:
        return self.book.finished

    @property
    def stats(self) -> dict[str, int]:
        return self.book.stats

    def flush_now(self) -> None:
        """Queue every pending change for the store now (the hub is stopping)."""
        self.book.flush(force=True)

    def node_lost(self, name: str, why: str, silent: bool = False) -> None:
        """A node is gone (lost, left, restarted): its jobs run again elsewhere or fail
        (``silent``: it only went quiet; see JobReports.node_lost)."""
        self.reports.node_lost(name, why, silent)

    # --- submitting, looking, cancelling ---------------------------------------------------

    def target(self, nodes: str, require: str | None) -> str:
        """Check that jobs for ``nodes`` could ever run; the state they require, resolved
        (``any`` or a commit). Any thread: it reads only node names and the hub's state."""
        names = self._targetable()  # not revoked or rejected ones (any thread may ask)
        matched = [n for n in names if name_matches(nodes, n)]
        if not matched:
            known = ", ".join(sorted(names)) or "none yet (add some: odium token)"
            raise NotConnectedError(f"no node matches {nodes!r}; nodes: {known}")
        relays = {n.split("/")[0] for n in names if "/" in n}
        if all(n in relays for n in matched):
            raise OdiumError(f"{nodes!r} matches only relays ({', '.join(matched)}): jobs run "
                             "on the instances below a relay (e.g. 'relay/*'), not on the "
                             "relay itself")
        return self._resolve(require)[0]

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
        book = self.book
        for h, data in fns.items():
            if h not in book.fns:
                book.fns[h] = data
                book.new_fns.append((h, data))
        unknown = [r.id for r in recs if r.id in (named or ())
                   and r.id not in book.jobs and r.id not in book.finished]
        old = {row.id: record_of(row) for row in book.rows(unknown)} if unknown else {}
        jobs, finished, new, events = book.jobs, book.finished, book.new, book.events
        for rec in recs:
            j = rec.id
            known = jobs.get(j) or finished.get(j) or old.get(j)
            if known is not None:
                if known.status.terminal and j not in finished:
                    finished[j] = known
                if watchers and j in watchers:
                    self.watch(j, watchers[j])
                continue
            book.seq += 1
            rec.seq = book.seq
            rec.status = Q
            jobs[j] = rec
            new.append(j)
            events.append(JobEvent(j, rec.created, "", "queued", "", "submitted", rec.seq))
            if watchers:
                fn = watchers.get(j)
                if fn is not None:
                    book.watchers[j] = [fn]
        book.touch()
        return [r.id for r in recs]

    def watch(self, job_id: str, fn: Watcher) -> None:
        """Call fn(info) when the job finishes (at once if it has)."""
        if job_id in self.book.jobs:
            self.book.watchers.setdefault(job_id, []).append(fn)
            return
        rec = self.book.lookup(job_id)
        if rec is not None:
            fn(rec.to_dict)
        else:
            fn(lambda: {"id": job_id, "status": "failed", "reason": "no such job",
                        "error": {"ename": "UnknownJob", "evalue": f"no job {job_id}",
                                  "traceback": ""}})

    def info(self, job_id: str, events: bool = False) -> dict[str, Any] | None:
        rec = self.book.lookup(job_id)
        if rec is None:
            return None
        d = rec.to_dict()
        if rec.status is Q:
            d["waiting"] = self._why_waiting(rec)
        if events:  # every move so far: what is pending is written first (if it can be)
            if not self.store.problem:
                self.book.flush()
                self.store.flush()
            d["events"] = [{"ts": e.ts, "prev": e.prev, "status": e.status, "node": e.node,
                            "detail": e.detail} for e in self.store.job_events(job_id)]
        return d

    def _why_waiting(self, rec: JobRecord) -> str:
        names = [n for n in self.nodes if self.sender.eligible(rec.key, n)]
        ready = [n for n in names if self.nodes[n].status == NodeStatus.READY]
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
            rec = self.book.jobs.get(j)
            if rec is None:
                i = self.info(j)
                out[j] = f"already {i['status']}" if i else "unknown"
                continue
            node = rec.node if rec.status is R else ""
            self.book.move(rec, JobStatus.CANCELLED,
                           reason=f"cancelled{' by ' + by if by else ''}")
            if node:
                self.reports.cancel_on(node, [j])
            out[j] = rec.status.value
        return out

    def listing(self, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Newest first: the store's rows, with what is newer in memory laid over them."""
        jobs, finished = self.book.jobs, self.book.finished
        rows = self.store.job_list(None, max(limit * 4, 200) if status else limit)
        out = []
        seen = set()
        for row in rows:
            rec = jobs.get(row.id) or finished.get(row.id) or record_of(row)
            seen.add(row.id)
            if status is None or rec.status.value == status:
                out.append(_brief(rec))
        for rec in sorted(jobs.values(), key=lambda r: -r.seq):
            if rec.id not in seen and (status is None or rec.status.value == status):
                out.append(_brief(rec))
        out.sort(key=lambda d: -d["seq"])
        return out[:limit]

    # --- admin requests (query socket) -----------------------------------------------------

    def _h_submit(self, msg: P.Message, body: P.Submit, ask: Asker) -> None:
        if not body.jobs:
            raise ConfigError("nothing to submit")
        if self.store.problem:  # a job is stored before it goes out: none can go now
            raise OdiumError(f"the hub cannot store jobs now: {self.store.problem}")
        for r in body.jobs:
            if r.kind == "call" and r.fn not in body.fns and r.fn not in self.book.fns:
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
                                    issuer=ask.key.key_id, now=now))
        ids = self.add(recs, dict(body.fns), named={r.id for r in body.jobs if r.id})
        reply = ask.reply
        self.book.after_persist.append(lambda: reply({"ids": ids}))
        self.book.touch()

    def _h_job(self, msg: P.Message, body: P.JobQuery, ask: Asker) -> None:
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
            ask.reply({"jobs": jobs})

        pending = [j for j in body.ids if j in self.book.jobs]
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

    def _h_jobs(self, msg: P.Message, body: P.JobQuery, ask: Asker) -> None:
        ask.reply({"jobs": self.listing(body.status, body.limit)})

    def _h_cancel(self, msg: P.Message, body: P.JobCancel, ask: Asker) -> None:
        ask.reply({"status": self.cancel(list(body.jobs),
                                         by=ask.key.name or ask.key.key_id[:12])})

    def close(self) -> None:
        """The hub stops: pending changes go to the store; whoever waits for a job hears that
        the hub stopped (the job itself stays in the store and goes on at the next start)."""
        self.flush_now()
        book = self.book
        book.closed = True
        watchers, book.watchers = book.watchers, {}
        for j, fns in watchers.items():
            rec = book.jobs.get(j)
            info = {**(rec.to_dict() if rec else {"id": j, "status": "queued"}),
                    "hub_closed": True}
            for fn in fns:
                try:
                    fn(known(info))
                except Exception:
                    log.exception("job watcher failed")


def _brief(rec: JobRecord) -> dict[str, Any]:
    return {"id": rec.id, "seq": rec.seq, "status": rec.status.value, "node": rec.node,
            "kind": rec.kind, "attempts": rec.attempts, "created": rec.created,
            "finished": rec.finished, "reason": rec.reason,
            "what": (rec.code.strip().splitlines() or [""])[0][:60] if rec.kind == "python"
            else f"function {rec.fn}"}


__all__ = ["JobQueue", "OdiumError"]
