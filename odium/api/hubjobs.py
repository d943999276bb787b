"""The job queue of an in-process ``Hub``, as its job methods and its ``Job`` handles see it.

Everything of the queue is read or changed in the hub's loop thread (``call``), except the
submission itself: ``JobQueue.submit_threadsafe`` takes new jobs from any thread without
waiting for the loop, and pushes each finished job to its handle.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ..errors import OdiumError
from .jobs import Job, check_options, pack_jobs

if TYPE_CHECKING:
    from ..hub.jobqueue import JobQueue

Call = Callable[[Callable[[], Any]], Any]  # runs a function in the hub's loop thread


class HubJobs:
    """Submit, list, look at and cancel jobs of the hub's queue (``jobq``); the backend of
    the handles it gives out. ``app``: the directory whose modules functions travel by
    reference from; ``issuer``: the key jobs are submitted under (the hub's own)."""

    def __init__(self, jobq: JobQueue, call: Call, app: str, issuer: str) -> None:
        self.jobq = jobq
        self.call = call
        self.app = app
        self.issuer = issuer

    def submit(self, items: Iterable[tuple[Any, tuple[Any, ...], dict[str, Any], str | None]],
               *, nodes: str, retries: int, timeout: float | None,
               require_state: str | None) -> list[Job]:
        """Queue jobs (code or function, args, kwargs, job id or None); their handles."""
        check_options(retries, timeout, nodes)
        q = self.jobq
        required = q.target(nodes, require_state)
        fields, fns = pack_jobs(items, self.app)
        now = time.time()
        recs = [q.record(f, nodes=nodes, retries=retries, timeout=timeout, required=required,
                         issuer=self.issuer, now=now) for f in fields]
        jobs = [Job(r.id, self, pushed=True) for r in recs]
        q.submit_threadsafe(recs, fns, {j.id: j._finished for j in jobs},
                            {f["id"] for f in fields if f["id"]})
        return jobs

    def listing(self, status: str | None, limit: int) -> list[dict[str, Any]]:
        q = self.jobq
        return list(self.call(lambda: q.listing(status, limit)))

    def job(self, job_id: str, wait: float = 0.0) -> dict[str, Any]:
        """Everything about one job, with its moves; ``wait`` seconds for it to finish."""
        q = self.jobq
        if wait > 0:
            finished = threading.Event()
            self.call(lambda: q.watch(job_id, lambda _info: finished.set()))
            finished.wait(wait)
        info = self.call(lambda: q.info(job_id, events=True))
        if info is None:
            raise OdiumError(f"no job {job_id!r}; see: hub.jobs()")
        return dict(info)

    # --- the Backend of Job handles (odium.api.jobs) ---------------------------------------

    def job_status(self, job_id: str) -> str:
        q = self.jobq

        def status() -> str | None:
            rec = q.jobs.get(job_id) or q.finished.get(job_id)
            return None if rec is None else rec.status.value

        known = self.call(status)
        return str(known) if known is not None else str(self.job_info(job_id)["status"])

    def job_info(self, job_id: str) -> dict[str, Any]:
        q = self.jobq
        info = self.call(lambda: q.info(job_id))
        return dict(info) if info else {"id": job_id, "status": "unknown"}

    def wait_jobs(self, ids: list[str], timeout: float | None) -> list[dict[str, Any]]:
        return [self.job_info(j) for j in ids]  # pushed handles never ask

    def cancel_jobs(self, ids: list[str]) -> dict[str, str]:
        q = self.jobq
        return dict(self.call(lambda: q.cancel(ids, by="api")))
