"""A relay's jobs: its hub sends it jobs for its subtree, against its subtree's free slots; it
keeps them in its own job queue (its store), which sends them on to its nodes; and it reports
how each ended, as any node reports its own.

Each level persists what it holds: a job the relay took is in its store before its nodes run
it, and a result is in its store before it goes up. After the relay restarts it claims the
jobs its queue still runs (``job_state``), so its hub waits for them instead of running them
again elsewhere (``odium.hub.jobreports``: a relay's jobs wait for it), and it reports again
the ends of jobs its hub may not have recorded (the hub records one end per job).

A job is queued here under its hub's id (its ``attempt`` after the first: ``id..N``), for the
nodes below this relay that its pattern matches, by name (``nodes``: ``pc-1,pc-2``; each checks
its own state), with no retries of its own: retrying is its hub's policy.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from .core import wire as P
from .core.targeting import name_matches
from .hub.jobbook import record_of
from .hub.jobqueue import JobQueue
from .hub.nodes import NodeStatus
from .hub.server import HubCore
from .node.agent import NodeCore

PREFETCH = 3  # jobs queued at the relay ahead of its nodes, per slot below it
REPORT_AGAIN = 10_000  # jobs from above, latest first, whose ends are reported after a restart
_LOCAL = re.compile(r"^(.+)\.\.([0-9]+)\Z")
_STATUS = {"done": "ok", "failed": "error", "timeout": "timeout", "cancelled": "cancelled"}


def local_id(job_id: str, attempt: int) -> str | None:
    """The id a job from above has in this relay's queue (None: too long to say its attempt)."""
    if attempt <= 1:
        return job_id
    out = f"{job_id}..{attempt}"
    return out if len(out) <= 64 else None


def upstream(local: str) -> tuple[str, int]:
    """(the hub's id, the attempt) of a job in this relay's queue that came from above."""
    m = _LOCAL.match(local)
    return (m.group(1), int(m.group(2))) if m and int(m.group(2)) >= 2 else (local, 1)


class RelayJobs:
    """The subtree's slots as the node part's job slots see them (``odium.node.ports.Below``)."""

    def __init__(self, hub: HubCore, node: NodeCore) -> None:
        self.hub, self.node, self.jobq = hub, node, hub.jobq
        self.above = node.hub_key  # the issuer of jobs from above, in this relay's store
        node.jobs.below = self
        self._resume()

    # --- what the node part's slots ask ----------------------------------------------------

    def _paths(self, nodes: str) -> list[str]:
        """This relay's instances that ``nodes`` (a pattern its hub wrote) matches."""
        prefix = self.node.name + "/"
        return [p for p in self.hub.registry.targetable() if name_matches(nodes, prefix + p)]

    def matches(self, nodes: str) -> bool:
        return bool(self._paths(nodes))

    def _ready(self) -> list[Any]:
        nodes = self.hub.registry.nodes
        return [ns for name, ns in self.jobq.sender.slots.items()
                if (n := nodes.get(name)) is not None and n.status is NodeStatus.READY
                and ns.boot == n.boot]

    def capacity(self) -> int:
        return sum(ns.capacity for ns in self._ready())

    def free(self) -> int:
        """The subtree's free slots, and as many again to queue here: its nodes find their
        next jobs waiting at the relay, not a round trip away at its hub."""
        waiting = sum(len(dq) for dq in self.jobq.book.queues.values())
        ahead = self.capacity() * PREFETCH
        return max(0, sum(self.jobq.sender.credit().values()) + ahead - waiting)

    def take(self, spec: P.JobSpec, fn: str | None) -> None:
        """A job from above, into this relay's queue (and its store) for its nodes."""
        local = local_id(spec.id, spec.attempt)
        if local is None:
            self.node.jobs.finished_below(spec.id, _refused(
                f"the job id {spec.id!r} is too long for a relay to run attempt {spec.attempt}"))
            return
        fields = {"id": local, "kind": spec.kind, "code": spec.code, "fn": spec.fn,
                  "args": spec.args, "kwargs": spec.kwargs, "args_pickle": spec.args_pickle}
        rec = JobQueue.record(fields, nodes=",".join(self._paths(spec.nodes)), retries=0,
                              timeout=spec.timeout, required=spec.require, issuer=self.above,
                              now=time.time())
        self.jobq.add([rec], {spec.fn: fn} if spec.fn and fn else {},
                      {local: self._ended(spec.id)}, named={local})

    def cancel(self, job_id: str) -> None:
        self.jobq.cancel([j for j in self.jobq.jobs if upstream(j)[0] == job_id],
                         by="the relay's hub")

    # --- ends, and restarts ----------------------------------------------------------------

    def _ended(self, job_id: str) -> Callable[[Callable[[], dict[str, Any]]], None]:
        def ended(info: Callable[[], dict[str, Any]]) -> None:
            self.node.jobs.finished_below(job_id, _outcome(info()))
        return ended

    def _resume(self) -> None:
        """After a restart: claim what this relay's queue still runs for its hub, and report
        again the ends its hub may not have recorded."""
        jobs = self.node.jobs
        for local, rec in list(self.jobq.jobs.items()):
            if rec.issuer == self.above:
                job_id, attempt = upstream(local)
                jobs.hold_below(P.JobSpec(job_id, "python", attempt=attempt))
                self.jobq.watch(local, self._ended(job_id))
        for row in self.hub.store.job_list(None, REPORT_AGAIN):
            rec = record_of(row)
            if rec.issuer == self.above and rec.status.terminal:
                job_id, attempt = upstream(rec.id)
                res = _outcome(rec.to_dict())
                jobs.report_again(P.JobOutcome(
                    job_id, _OUT.get(res["status"], "failed"), attempt,  # type: ignore
                    res["started"], res["finished"], res["stdout"], res["stderr"],
                    res["value"], res["value_repr"], res["value_json"],
                    P.ErrorInfo(**res["error"]) if res["error"] else None))


_OUT = {"ok": "done", "error": "failed", "timeout": "timeout", "cancelled": "cancelled",
        "lost": "lost"}


def _outcome(d: dict[str, Any]) -> dict[str, Any]:
    """A job's end in this relay's queue, as the node part's pool says it (``_done``)."""
    err = d.get("error")
    status = _STATUS.get(d["status"], "error")
    if status == "error" and isinstance(err, dict) and err.get("ename") == "NodeLost":
        status = "lost"  # lost below: its hub's retry policy decides
    return {"status": status, "started": d.get("started") or 0.0,
            "finished": d.get("finished") or 0.0, "stdout": d.get("stdout", ""),
            "stderr": d.get("stderr", ""), "value": d.get("value"),
            "value_repr": d.get("value_repr"), "value_json": d.get("value_json", True),
            "error": {k: str(err.get(k, "")) for k in ("ename", "evalue", "traceback")}
            if isinstance(err, dict) else None}


def _refused(why: str) -> dict[str, Any]:
    now = time.time()
    return {"status": "error", "started": now, "finished": now, "stdout": "", "stderr": "",
            "value": None, "value_repr": None, "value_json": True,
            "error": {"ename": "RelayError", "evalue": why, "traceback": ""}}


__all__ = ["RelayJobs", "local_id", "upstream"]
