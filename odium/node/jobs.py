"""A node's side of the job queue: take or decline the batches that reach it on the jobs socket,
run what it took in its job pool, and keep every result until the hub acknowledges it.

Runs in the node's loop thread. What is said, and when, is in docs/protocol.md ("Job queue").
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any

import zmq

from ..core import wire as P
from ..core.clock import hub_times
from ..core.dispatch import Dispatch
from ..core.jobs import MAX_BATCH, slots_offered, split_batch
from ..core.requirements import satisfies
from ..core.targeting import name_matches
from ..errors import ProtocolError
from ..io.transport import each_message, recv_frames
from .ports import Below, HubLink, NodeRuntime
from .workers.kinds import Workers

log = logging.getLogger(__name__)

TICK = 0.25  # seconds between checks for results to send again and slot reports
REPORT_WAIT = 0.002  # seconds a report of jobs taken or finished waits for more news, at least
REPORT_WAIT_MAX = 0.01  # ... and at most: while the jobs it holds keep its slots busy
STATE_REFRESH = 10  # beats between two job states that say the same
MAX_UNACKED = 100_000  # results kept for a hub that does not acknowledge them
RESULT_BYTES = 4 * 1024 * 1024  # result bytes in one report at most (one larger result goes alone)

_STATUS = {"ok": "done", "error": "failed", "timeout": "timeout", "cancelled": "cancelled",
           "interrupted": "cancelled", "lost": "lost"}


class NodeJobs:
    """Job slots (``capacity``), the pool that fills them, and the results not yet acknowledged.

    ``link``: the node's link to its hub; what comes for the job queue on PUB goes to the
    handlers of ``pub_handlers()``."""

    def __init__(self, rt: NodeRuntime, link: HubLink, capacity: int, workers: Workers) -> None:
        self.rt = rt
        self.link = link
        self.loop = rt.loop
        self.capacity = capacity
        # how long its jobs took lately (a moving average): while they are short, it holds
        # more than its slots (odium.core.jobs.slots_offered)
        self.job_seconds = 1.0
        self.pool = workers.jobs(self.loop, str(rt.app), self.capacity, self._ran)
        self.held: dict[str, P.JobSpec] = {}
        self.below: Below | None = None  # a relay's subtree (odium.relayjobs)
        self.passed: set[str] = set()  # held jobs that run below (in the relay's own queue)
        self.unacked: OrderedDict[str, tuple[P.JobOutcome, float]] = OrderedDict()
        self.pull: zmq.Socket[Any] | None = None
        self._batches: list[str] = []
        self._taken: list[str] = []
        self._declined: list[str] = []
        self._unopened: list[str] = []
        self._results: list[P.JobOutcome] = []
        self._flush_due = False
        self._flush_now = False  # the report due is due at the end of this loop round
        self._names: dict[str, bool] = {}
        self._last_state = 0.0
        self._sent_state: P.JobState | None = None  # the last one the hub was sent
        self._inner: Dispatch[None] = Dispatch("jobs")  # what comes sealed on the jobs socket
        self._inner.on("job_batch", P.JobBatch, self._on_batch)
        self.loop.every(TICK, self._tick)

    def pub_handlers(self) -> Dispatch[None]:
        """The job queue's messages on PUB, for the node's PUB handlers."""
        pub: Dispatch[None] = Dispatch("PUB")
        pub.on("job_ack", P.JobAck, self._on_ack)
        pub.on("job_cancel", P.JobCancel, self._on_cancel)
        return pub

    @property
    def free(self) -> int:
        """Free job slots: a relay's are its subtree's (it runs commands itself, but hands
        every job to the instances below it)."""
        if self.below is not None:
            return self.below.free()
        return slots_offered(self.capacity, len(self.held), self.job_seconds)

    def _state(self) -> P.JobState:
        below = self.below
        cap = max(1, below.capacity()) if below is not None else self.capacity
        return P.JobState(min(cap, 4096), self.free, sorted(self.held), below is not None)

    @property
    def resend_after(self) -> float:
        return max(2.0, 5 * self.link.interval)

    # --- hooks called by NodeCore ----------------------------------------------------------

    def attach(self, pull: zmq.Socket[Any]) -> None:
        """The data sockets are open: listen on the jobs socket."""
        self.pull = pull
        self.loop.add(pull, self._on_pull)

    def detach(self) -> None:
        """The data sockets are closed (the loop no longer listens on them)."""
        self.pull = None

    def registered(self) -> None:
        """(Re-)registered with a hub, perhaps one that restarted: send every result it has
        not acknowledged, then say which jobs run here, so that it can claim them (what
        cannot leave yet goes at the next tick)."""
        for j, (o, _t) in list(self.unacked.items()):
            self.unacked[j] = (o, 0.0)
        self._last_state, self._sent_state = 0.0, None
        self._tick()

    def results_up(self) -> None:
        """The results socket's handshake is done: the job state and any result that could
        not leave before go now, not at the next tick."""
        self._tick()

    def close(self) -> None:
        if self.pull is not None:
            try:
                self.loop.remove(self.pull)
            except KeyError:
                pass
        self.pool.close()

    # --- from the hub ----------------------------------------------------------------------

    def _on_pull(self) -> None:
        assert self.pull is not None
        link = self.link
        each_message(recv_frames(self.pull), self._from_jobs, lambda _f, e: link.failed("jobs", e))

    def _from_jobs(self, frames: list[zmq.Frame]) -> None:
        outer = self.link.open(frames[-1].bytes)
        if outer.type != "sealed":
            raise ProtocolError(f"message type {outer.type!r} does not come on the jobs socket")
        self.link.heard(quietly=True)
        self.link.open_sealed(outer, "jobs", lambda msg: self._inner.handle(msg, None),
                              lambda: self._not_mine(outer.env.id))

    def _not_mine(self, batch: str) -> None:
        """Jobs this node may not run: the hub sends them on at once."""
        self._unopened.append(batch)
        self._schedule()

    def _name_ok(self, pattern: str) -> bool:
        ok = self._names.get(pattern)
        if ok is None:
            ok = self._names[pattern] = name_matches(pattern, self.link.name)
        return ok

    def _on_batch(self, msg: P.Message, body: P.JobBatch, _: None) -> None:
        state = self.rt.state
        fresh: list[P.JobSpec] = []
        again: list[P.JobOutcome] = []
        for spec in body.jobs:
            held = self.held.get(spec.id)
            done = self.unacked.get(spec.id)
            if held is not None and held.attempt >= spec.attempt:
                self._taken.append(spec.id)  # sent again: it runs here already
            elif done is not None and (done[0].attempt >= spec.attempt
                                       or done[0].status == "done"):
                self._taken.append(spec.id)  # it ran here: its result goes (again) at once
                again.append(done[0])
            else:
                fresh.append(spec)  # new, or a new run of a job whose last run failed
        self._results.extend(again)
        runnable = [s for s in fresh if s.kind == "python" or s.fn in body.fns]
        below = self.below
        here = {s.id for s in runnable if below is None and self._name_ok(s.nodes)
                and satisfies(s.require, state, state)}
        take, decline = split_batch([(s.id, s.id in here) for s in fresh], self.free)
        if below is not None and decline:  # what does not run here may run below (each
            by_id = {s.id: s for s in runnable}  # instance there checks its own state)
            down, decline = split_batch(
                [(j, j in by_id and below.matches(by_id[j].nodes)) for j in decline],
                below.free())
            for j in down:
                self.held[j] = by_id[j]  # for the relay's subtree: into its own queue
                self.passed.add(j)
                fn = by_id[j].fn
                below.take(by_id[j], body.fns.get(fn) if fn else None)
            take = take + down
        chosen = set(take) - self.passed
        for spec in fresh:
            if spec.id in chosen:
                self.held[spec.id] = spec
                self.pool.start(spec.id, {"op": "job", "id": spec.id, "kind": spec.kind,
                                          "code": spec.code, "fn": spec.fn, "args": spec.args,
                                          "kwargs": spec.kwargs,
                                          "args_pickle": spec.args_pickle},
                                spec.timeout, body.fns.get(spec.fn) if spec.fn else None)
        self._batches.append(msg.env.id)
        self._taken.extend(take)
        self._declined.extend(decline)
        self._schedule()

    def _on_ack(self, msg: P.Message, body: P.JobAck, _: None) -> None:
        if self.link.name not in msg.env.to:
            return
        for j in body.acks.get(self.link.name, ()):
            self.unacked.pop(j, None)

    def _on_cancel(self, msg: P.Message, body: P.JobCancel, _: None) -> None:
        if self.link.name not in msg.env.to:
            return
        for j in body.jobs:
            if j in self.passed and self.below is not None:
                self.below.cancel(j)
            elif j in self.held:
                self.pool.cancel(j, "cancelled")

    # --- to the hub ------------------------------------------------------------------------

    def _ran(self, job_id: str, res: dict[str, Any]) -> None:
        """A job ended in the pool: its times, taken by this machine's clock, in the hub's."""
        took = max(0.0, float(res.get("finished", 0.0)) - float(res.get("started", 0.0)))
        self.job_seconds += 0.1 * (min(took, 60.0) - self.job_seconds)
        self._done(job_id, hub_times(res, self.rt.clock.skew()))

    def _done(self, job_id: str, res: dict[str, Any]) -> None:
        """A job ended, here (``_ran``) or below (``finished_below``: in the hub's time)."""
        spec = self.held.pop(job_id, None)
        self.passed.discard(job_id)
        if spec is None:
            return
        err = res.get("error")
        o = P.JobOutcome(
            job_id, _STATUS.get(res["status"], "failed"),  # type: ignore[arg-type]
            spec.attempt, res.get("started", 0.0), res.get("finished", 0.0),
            res.get("stdout", ""), res.get("stderr", ""), res.get("value"),
            res.get("value_repr"), res.get("value_json", True),
            P.ErrorInfo(err["ename"], err["evalue"], err.get("traceback", "")) if err else None)
        self.unacked[job_id] = (o, 0.0)  # sent at the end of this loop round
        while len(self.unacked) > MAX_UNACKED:
            dropped, _ = self.unacked.popitem(last=False)
            log.warning("result of job %s dropped: the hub has not acknowledged %d results",
                        dropped, MAX_UNACKED)
        self._results.append(o)
        self._schedule()

    def finished_below(self, job_id: str, res: dict[str, Any]) -> None:
        """A job this relay passed to its own queue ended there (``res`` as the pool's)."""
        self._done(job_id, res)

    def hold_below(self, spec: P.JobSpec) -> None:
        """A job this relay's queue still runs for its hub (after a restart of the relay)."""
        self.held[spec.id] = spec
        self.passed.add(spec.id)

    def report_again(self, o: P.JobOutcome) -> None:
        """A job's end its hub may not have recorded (after a restart of the relay)."""
        if o.id not in self.held:
            self.unacked[o.id] = (o, 0.0)

    def _schedule(self) -> None:
        """Report soon. At the end of this loop round when there is no point waiting: jobs
        were declined (the hub sends them on at once), nothing else runs here, or results
        for half the jobs it holds are waiting already. Otherwise a little later, so that
        jobs taken and several results leave in one message (one signature to make and to
        check, not one a job): a quarter of the time the jobs it holds keep its slots busy,
        within REPORT_WAIT and REPORT_WAIT_MAX."""
        now = (self._declined or self._unopened or not self.held
               or 2 * len(self._results) >= max(self.capacity, len(self.held)))
        if self._flush_due and (self._flush_now or not now):
            return
        self._flush_due, self._flush_now = True, bool(now)
        busy = len(self.held) * self.job_seconds / max(1, self.capacity)
        wait = min(REPORT_WAIT_MAX, max(REPORT_WAIT, busy / 4))
        self.loop.call_later(0 if now else wait, self._flush)

    def _flush(self) -> None:
        self._flush_due = self._flush_now = False
        results, self._results = self._results, []
        taken = (self._batches, self._taken, self._declined, self._unopened)
        self._batches, self._taken, self._declined, self._unopened = [], [], [], []
        self._send_results(results, taken)

    def _send(self, type_: str, body: P.Body) -> bool:
        """Send now if the hub is connected (PUSH with IMMEDIATE); False if it is not."""
        return self.link.send_now(type_, body)

    def _send_results(self, results: list[P.JobOutcome],
                      taken: tuple[list[str], list[str], list[str], list[str]] = ([], [], [], [])
                      ) -> None:
        """Report jobs taken and results (in messages of a bounded size); remember when each
        result left."""
        now = time.monotonic()
        i = 0
        while i < len(results) or taken[0] or taken[3]:
            chunk: list[P.JobOutcome] = []
            size = 0
            while i < len(results) and len(chunk) < MAX_BATCH:
                o = results[i]
                o_size = len(P.encode_json(o))  # as it goes: a fitted result alone fits
                if chunk and size + o_size > RESULT_BYTES:
                    break
                chunk.append(o)
                size += o_size
                i += 1
            batches, took, declined, unopened = taken
            taken = ([], [], [], [])
            if not self._send("job_report", P.JobReport(batches, took, declined, chunk,
                                                        self.free, unopened)):
                return  # the hub is not there: results stay due, and go when it is back
            for o in chunk:
                if o.id in self.unacked:
                    self.unacked[o.id] = (o, now)

    def _send_state(self, state: P.JobState) -> None:
        if self._send("job_state", state):
            self._last_state, self._sent_state = time.monotonic(), state

    def _tick(self) -> None:
        if not self.link.registered or not self.link.connected:
            return
        if self._flush_due:  # a report is due: it goes first, so that neither the state
            self._flush()    # nor a result sent again reaches the hub ahead of the batch
        now = time.monotonic()
        if self.unacked:
            late = [o for o, t in self.unacked.values() if now - t > self.resend_after]
            if late:
                self._send_results(late)
        if now - self._last_state >= self.link.interval:
            # what changed goes at once; the same again only every STATE_REFRESH beats (the
            # hub's view, set right if a report went astray: two messages a beat, not one,
            # is what a hub with many nodes spends most of its idle time on)
            state = self._state()
            if state != self._sent_state or now - self._last_state >= (
                    STATE_REFRESH * self.link.interval):
                self._send_state(state)


__all__ = ["NodeJobs"]
