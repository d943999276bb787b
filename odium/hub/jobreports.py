"""What nodes say of their jobs (results socket), and the job queue's clocks.

A node reports the batches it got (taken, declined, unopened), the jobs it finished, and, after
it (or the hub) restarted, the jobs it runs. A node speaks only for jobs that reached it. The
clocks: batches nobody reported on go back to the queue, jobs no node claimed after a restart
too, and a running job past its timeout (and a grace) times out.
"""

from __future__ import annotations

import time

from ..core import wire as P
from ..core.dispatch import Dispatch
from ..core.jobs import FlightClock, JobRecord, JobStatus, after_failure
from ..core.requirements import satisfies
from ..core.targeting import name_matches
from ..errors import AuthError
from .jobbook import JobBook
from .jobsend import JobSender
from .links import JobWire, Reject
from .nodes import NodeInfo

Q, A, R = JobStatus.QUEUED, JobStatus.ASSIGNED, JobStatus.RUNNING


class JobReports:
    """The results socket's job messages, and the timers that stand in for silent nodes."""

    def __init__(self, book: JobBook, sender: JobSender, wire: JobWire, reject: Reject, *,
                 flight_timeout: float, relay_grace: float, lost_grace: float = 25.0) -> None:
        self.book, self.sender, self.wire, self.reject = book, sender, wire, reject
        # a batch nobody reported on goes back: after flight_timeout, or longer while batches
        # are slow to be reported (a busy hub must not send everything again)
        self.flight_clock = FlightClock(flight_timeout)
        self.relay_grace = relay_grace  # how long a lost relay's jobs wait for it
        # a job with no retry left whose node went silent waits this long for the node to
        # come back (frozen, cut off) and answer before it fails: job -> (node, its boot then,
        # until when); a node that comes back restarted fails it at once
        self.lost_grace = lost_grace
        self.lost_wait: dict[str, tuple[str, str, float]] = {}
        # after a restart: the nodes that may hold unfinished jobs and have not said which yet
        # (``job_state``), and until when the unclaimed jobs wait for them at most
        self.claimants: set[str] = set()
        self.claim_cap = 0.0
        self.handlers: Dispatch[NodeInfo] = Dispatch("results (jobs)")
        self.handlers.on("job_report", P.JobReport, self._r_report)
        self.handlers.on("job_state", P.JobState, self._r_state)

    def await_claims(self, names: list[str], cap: float) -> None:
        """After a restart: unclaimed jobs wait (past the grace) until each of these nodes has
        said what it runs, or ``cap`` seconds: a job may have reached one just before the hub
        stopped, and must not run twice."""
        self.claimants = set(names)
        self.claim_cap = time.monotonic() + cap

    def cancel_on(self, node: str, ids: list[str]) -> None:
        if ids:
            self.wire.publish_to(node, "job_cancel", P.JobCancel(ids))

    def _holds(self, j: str, rec: JobRecord, node: str) -> bool:
        """Whether a node may speak for a job: a batch that carried it reached that node, or
        the node is the job's assignment (recorded in the store)."""
        return node in self.book.holders.get(j, ()) or rec.node == node

    def _may_claim(self, j: str, rec: JobRecord, node: str) -> bool:
        """Whether a node may say it runs a job, or how it ended: it holds it, or, after a
        restart (the job an orphan: who held what is known no more, and a batch reaches any
        node that may run it), it is one that may run it."""
        return self._holds(j, rec, node) or (j in self.book.orphans
                                             and self.sender.eligible(rec.key, node))

    def _refuse(self, node: NodeInfo, what: str, ids: list[str]) -> None:
        """A node spoke for jobs that never reached it: nothing changes; it is logged."""
        ids = sorted(set(ids))
        more = f" (and {len(ids) - 5} more)" if len(ids) > 5 else ""
        self.reject("results", node.key_id, AuthError(
            f"{node.name} reported {what} for job(s) not sent to it: {', '.join(ids[:5])}{more}"))

    def why_declined(self, rec: JobRecord, node: NodeInfo) -> str:
        """Why a node declined a job, as far as the hub can tell from its view of the node: a
        node declines a job it may not run (its name or state) as well as one it has no slot
        for."""
        if not name_matches(rec.nodes, node.name):
            if self.sender.eligible(rec.key, node.name):
                return "no free slot below it"  # a relay, for its subtree
            return f"not one of nodes={rec.nodes!r}"
        if rec.require != "any" and not satisfies(rec.require, node.state, node.state):
            return f"its state {node.state[:12]} is not the required {rec.require[:12]}"
        return "no free slot"

    # --- from nodes ------------------------------------------------------------------------

    def _r_report(self, msg: P.Message, body: P.JobReport, node: NodeInfo) -> None:
        """What a node did with the batches it got, and the jobs it finished."""
        if body.batches or body.taken or body.declined or body.unopened:
            self._batches(body, node)
            self._taken(body, node)
        if body.results:
            self._results(body, node)
        self.sender.slots_of(node.name).free = body.free
        self.sender.kick()

    def _batches(self, body: P.JobReport, node: NodeInfo) -> None:
        """The batches that reached the node: off the way; those it could not open go on."""
        book, sender = self.book, self.sender
        now = time.monotonic()
        for bid in body.batches:
            f = sender.flights.pop(bid, None)
            if f is not None:
                sender.release(f)
            sent = sender.batch_jobs.get(bid)
            if sent is None:
                continue
            self.flight_clock.seen(now - sent.sent, now)
            for j in sent.jobs:
                if j in book.jobs:
                    book.holders.setdefault(j, set()).add(node.name)
        for bid in body.unopened:  # it reached a node that may not run it: send it on
            f = sender.flights.pop(bid, None)
            if f is None:
                continue
            sender.release(f)
            for j in f.jobs:
                rec = book.jobs.get(j)
                if rec is not None and rec.status is A:
                    book.move(rec, Q, reason=f"reached {node.name}, which may not run it")

    def _taken(self, body: P.JobReport, node: NodeInfo) -> None:
        book = self.book
        stop, refused = [], []
        for j in body.taken:
            rec = book.jobs.get(j)
            if rec is None:
                stop.append(j)  # finished (cancelled, or another node's result came first)
            elif not self._holds(j, rec, node.name):
                refused.append(j)
            elif rec.status is A:
                book.move(rec, R, node=node.name, reason="taken")
            elif rec.status is Q:  # its batch was given up on, but it did arrive
                book.walk(rec, R, node.name, "taken late")
            book.orphans.discard(j)
        self.cancel_on(node.name, stop)
        for j in body.declined:
            rec = book.jobs.get(j)
            if rec is None:
                continue
            if node.name not in book.holders.get(j, ()):
                refused.append(j)
                continue
            book.holders[j].discard(node.name)
            if rec.status is A:
                why = self.why_declined(rec, node)
                book.move(rec, Q, reason=f"declined by {node.name} ({why})")
        if refused:
            self._refuse(node, "taken/declined", refused)
        book.stats["taken"] += len(body.taken)
        book.stats["declined"] += len(body.declined)

    def _results(self, body: P.JobReport, node: NodeInfo) -> None:
        book = self.book
        acks = book.acks.setdefault(node.name, set())
        refused = []
        for o in body.results:
            if o.id not in book.unstored:  # (a refused one too: the node need not keep it)
                acks.add(o.id)  # once the write that holds it (and all before) commits
            rec = book.jobs.get(o.id)
            if rec is None:
                continue  # recorded already: the first result stands (acknowledged again)
            if not self._may_claim(o.id, rec, node.name):
                refused.append(o.id)
                continue
            if o.attempt < rec.attempts and o.status != "done":
                continue  # an earlier run's end, dealt with already (sent again)
            self._result(rec, o, node)
        if refused:
            self._refuse(node, "results", refused)
        book.touch()

    def _result(self, rec: JobRecord, o: P.JobOutcome, node: NodeInfo) -> None:
        """One job's end, the first reported: it is recorded, retried or failed."""
        book = self.book
        book.stats["results"] += 1
        book.orphans.discard(rec.id)
        other = rec.node if rec.status is R and rec.node != node.name else ""
        if other:  # it ran on two nodes: this result is the first
            book.reattribute(rec, node.name)
        elif rec.status is not R:
            book.walk(rec, R, node.name, "result reported")
        err = P.to_builtins(o.error) if o.error is not None else None
        rec.result = {"value": o.value, "value_repr": o.value_repr,
                      "value_json": o.value_json, "stdout": o.stdout, "stderr": o.stderr,
                      "error": err, "started": o.started, "finished": o.finished}
        if o.status == "done":
            book.move(rec, JobStatus.DONE, reason="")
        elif o.status == "timeout":
            book.move(rec, JobStatus.TIMEOUT, reason=f"timed out after {rec.timeout} s")
        elif o.status == "cancelled":
            book.move(rec, JobStatus.CANCELLED, reason="cancelled on the node")
        else:
            e = err or {}
            why = (f"{e.get('ename', 'Error')}: {e.get('evalue', '')}" if o.status == "failed"
                   else f"its worker died on {node.name}: {e.get('evalue', '')}")
            book.requeue_or_fail(rec, why, err)
        if other:
            self.cancel_on(other, [rec.id])

    def _r_state(self, msg: P.Message, body: P.JobState, node: NodeInfo) -> None:
        book = self.book
        self.claimants.discard(node.name)
        ns = self.sender.slots_of(node.name)
        if ns.relay != body.relay:
            self.sender.forget_eligibility()
        self._back(node, set(body.running))
        if body.relay and ns.boot != node.boot:  # a relay back: what it does not claim now,
            claimed = set(body.running)          # it lost (its store never had it)
            for j in sorted(book.running_on.get(node.name, set()) & book.orphans - claimed):
                rec = book.jobs.get(j)
                if rec is not None and rec.status is R and rec.node == node.name:
                    book.orphans.discard(j)  # it never ran below: it queues again as it was
                    book.move(rec, Q, reason=f"relay {node.name} came back without it")
        ns.boot, ns.capacity, ns.free, ns.relay = node.boot, body.capacity, body.free, body.relay
        stop, refused = [], []
        for j in body.running:
            rec = book.jobs.get(j)
            if rec is None:
                stop.append(j)
            elif not self._may_claim(j, rec, node.name):
                refused.append(j)
            elif rec.status is R and rec.node == node.name:
                book.orphans.discard(j)
            elif rec.status is R and j in book.orphans:
                book.reattribute(rec, node.name)
                book.orphans.discard(j)
            elif rec.status in (Q, A):
                book.walk(rec, R, node.name, "claimed after a restart" if j in book.orphans
                          else "reported running")
                book.orphans.discard(j)
        self.cancel_on(node.name, stop)
        if refused:
            self._refuse(node, "running", refused)
        self.sender.kick()

    def node_lost(self, name: str, why: str, silent: bool = False) -> None:
        """A node is gone (lost, left, restarted): its jobs run again elsewhere or fail.
        ``silent``: it only went quiet (lost, not known to have stopped): a job of it with no
        retry left waits ``lost_grace`` for it to come back and answer."""
        book = self.book
        ns = self.sender.slots.get(name)
        boot = ns.boot if ns is not None else ""
        if ns is not None:
            ns.boot, ns.free, ns.reserved = "", 0, 0
            if ns.relay:  # its subtree runs them still, and it keeps them in its store: they
                held = [j for j in book.running_on.get(name, set()) if j in book.jobs]
                book.orphans.update(held)  # wait for it to claim them, as after a restart
                book.orphan_deadline = max(book.orphan_deadline,
                                           time.monotonic() + self.relay_grace)
                return
        waiting = set()
        for j in sorted(book.running_on.pop(name, set())):
            rec = book.jobs.get(j)
            if rec is not None and rec.status is R and rec.node == name:
                book.orphans.discard(j)
                if silent and after_failure(rec) is not Q and j not in self.lost_wait:
                    self.lost_wait[j] = (name, boot, time.monotonic() + self.lost_grace)
                    waiting.add(j)  # (it may still answer: a frozen node's run is not lost)
                    continue
                self.lost_wait.pop(j, None)
                self._node_lost(rec, name, why)
        if waiting:
            book.running_on[name] = waiting

    def _node_lost(self, rec: JobRecord, name: str, why: str) -> None:
        self.book.requeue_or_fail(rec, f"node {name} lost while running it: {why}", {
            "ename": "NodeLost", "evalue": f"node {name} lost while running the job: {why}",
            "traceback": ""})

    def _back(self, node: NodeInfo, running: set[str]) -> None:
        """A node says what it runs: the jobs that waited for it (lost) and that it no longer
        has, because it restarted, are lost now; what it still runs goes on."""
        for j, (name, boot, _until) in list(self.lost_wait.items()):
            if name != node.name:
                continue
            rec = self.book.jobs.get(j)
            if rec is None or rec.status is not R or rec.node != name:
                del self.lost_wait[j]
            elif j in running:
                del self.lost_wait[j]  # it never stopped: it answers in time
            elif node.boot != boot:
                del self.lost_wait[j]
                self._node_lost(rec, name, "it came back restarted, without it")

    def _lost_expired(self, mono: float) -> None:
        for j, (name, _boot, until) in list(self.lost_wait.items()):
            if mono < until:
                continue
            del self.lost_wait[j]
            rec = self.book.jobs.get(j)
            if rec is not None and rec.status is R and rec.node == name:
                self.book.running_on.get(name, set()).discard(j)
                self._node_lost(rec, name, f"no word from it for {self.lost_grace:.0f} s more")

    # --- timers ----------------------------------------------------------------------------

    def check(self) -> None:
        mono = time.monotonic()
        book, sender = self.book, self.sender
        limit = self.flight_clock.limit(mono)
        for bid, f in list(sender.flights.items()):
            if mono - f.sent > limit:
                del sender.flights[bid]
                sender.release(f)
                for j in f.jobs:
                    rec = book.jobs.get(j)
                    if rec is not None and rec.status is A:
                        book.move(rec, Q, reason=f"no node took it within {limit:.1f} s; "
                                  "sent again")
        if (book.orphans and mono > book.orphan_deadline
                and (not self.claimants or mono > self.claim_cap)):
            for j in sorted(book.orphans):
                rec = book.jobs.get(j)
                if rec is not None and rec.status in (A, R):
                    book.move(rec, Q, reason="no node claimed it after the hub restarted")
                elif rec is not None and rec.status is Q:
                    book.enqueue(rec)  # queued before the restart, and claimed by none
            book.orphans.clear()
        self._overdue(mono)
        self._lost_expired(mono)
        if any(book.queues.values()):
            sender.kick()

    def _overdue(self, mono: float) -> None:
        """Running jobs past their timeout and the grace: timed out, cancelled on the node."""
        book = self.book
        for j, deadline in list(book.timed.items()):
            rec = book.jobs.get(j)
            if rec is None or rec.status is not R:
                book.timed.pop(j, None)
            elif mono > deadline:
                name = rec.node
                rec.result = {**(rec.result or {}), "error": {
                    "ename": "TimeoutError", "evalue": f"no result from {name} within "
                    f"{rec.timeout} s (+{book.overdue_grace:.0f} s grace)", "traceback": ""}}
                book.move(rec, JobStatus.TIMEOUT, reason=f"no result from {name} in time")
                self.cancel_on(name, [j])


__all__ = ["JobReports"]
