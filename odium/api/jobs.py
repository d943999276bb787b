"""Client handles for queued jobs: ``Job``, ``as_completed``, and a concurrent.futures
``Executor`` whose work runs on the hub's nodes.

The same handles serve the in-process ``odium.Hub`` (finished jobs are pushed to them by the
hub's loop) and ``odium.Admin`` (they ask the hub over its query socket).
"""

from __future__ import annotations

import concurrent.futures
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from ..core.jobs import (
    JOB_ID_RE,
    JobStatus,
    job_value,
    known,
    pack_args,
    pack_function,
    raise_for_job,
)
from ..errors import ConfigError, JobCancelledError, NotConnectedError, OdiumError
from ..errors import TimeoutError as OdiumTimeout
from .progress import job_bar


def pack_jobs(items: Iterable[tuple[Any, tuple[Any, ...], dict[str, Any], str | None]],
              app: str | None = None) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Jobs as they travel: (code string | function, args, kwargs, job id) -> the request
    fields of each, and the functions they call (hash -> base64 cloudpickle), each once.
    ``app``: the application directory nodes share (its modules travel by reference)."""
    fns: dict[str, str] = {}
    packed: dict[int, str] = {}  # id(function) -> hash, for this call only
    out = []
    for what, args, kwargs, job_id in items:
        if job_id is not None and (not isinstance(job_id, str)
                                   or not re.fullmatch(JOB_ID_RE, job_id)):
            raise ConfigError(f"a job id is 1 to 64 letters, digits, '.', '_', '-' (starting "
                              f"with a letter or digit), not {job_id!r}")
        fn = None
        if isinstance(what, str):
            if not what.strip():
                raise ConfigError("a job needs code: a string to run, or a function")
            kind, code = "python", what
        elif callable(what):
            kind, code = "call", ""
            fn = packed.get(id(what))
            if fn is None:
                fn, data = pack_function(what, app)
                packed[id(what)] = fn
                fns[fn] = data
        else:
            raise ConfigError(f"a job is a code string or a function, not "
                              f"{type(what).__name__}")
        a, k, p = pack_args(tuple(args), dict(kwargs))
        out.append({"id": job_id, "kind": kind, "code": code, "fn": fn, "args": a,
                    "kwargs": k, "args_pickle": p})
    return out, fns


def check_options(retries: Any, timeout: Any, nodes: Any) -> None:
    if not isinstance(retries, int) or isinstance(retries, bool) or not 0 <= retries <= 1000:
        raise ConfigError(f"retries must be a whole number from 0 to 1000, not {retries!r}")
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ConfigError(f"timeout must be a positive number of seconds, not {timeout!r}")
    if not isinstance(nodes, str) or not nodes.strip():
        raise ConfigError(f"nodes must be a glob or a comma list of names, not {nodes!r}")


def check_status(status: str | None) -> None:
    """A job status to list jobs by: one of JobStatus's values, or None (every job)."""
    if status is not None and status not in {s.value for s in JobStatus}:
        raise ConfigError(f"unknown job status {status!r}; one of: "
                          f"{', '.join(s.value for s in JobStatus)}")


class Backend(Protocol):
    def job_status(self, job_id: str) -> str: ...
    def job_info(self, job_id: str) -> dict[str, Any]: ...
    def wait_jobs(self, ids: list[str], timeout: float | None) -> list[dict[str, Any]]: ...
    def cancel_jobs(self, ids: list[str]) -> dict[str, str]: ...


_LOCK = threading.Lock()  # guards every handle's finishing (brief; shared to stay light)


class Job:
    """A queued job: ``.id``, ``.status``, ``.result(timeout)``, ``.cancel()``.

    ``result()`` returns the job's value: the JSON value it returned, or, for a value that is
    not JSON, a :class:`odium.core.jobs.Repr` of its ``repr()``. A job that failed or timed out
    raises :class:`odium.RemoteError` (with the remote traceback); a cancelled one
    :class:`odium.errors.JobCancelledError`.
    """

    def __init__(self, job_id: str, backend: Backend, pushed: bool = False) -> None:
        self.id = job_id
        self._backend = backend
        self._pushed = pushed  # the backend calls _finished; otherwise we ask it
        self._get: Callable[[], dict[str, Any]] | None = None  # set once it has finished
        self._info: dict[str, Any] | None = None
        self._event: threading.Event | None = None  # made only if someone has to wait
        self._callbacks: list[Callable[[Job], None]] | None = None

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.status}>"

    def _finished(self, get_info: Callable[[], dict[str, Any]]) -> None:
        """It finished; ``get_info()`` gives its info (called lazily, in the reader's
        thread). Pushed handles get this from the hub's loop thread."""
        with _LOCK:
            if self._get is not None:
                return
            self._get = get_info
            event, callbacks, self._callbacks = self._event, self._callbacks, None
        if event is not None:
            event.set()
        for fn in callbacks or ():
            try:
                fn(self)
            except Exception:  # noqa: BLE001 - a callback must not break the others
                pass

    def _final(self) -> dict[str, Any] | None:
        if self._info is None and self._get is not None:
            self._info = self._get()
        return self._info

    def add_done_callback(self, fn: Callable[[Job], None]) -> None:
        """Call fn(job) when it finishes (at once if it has). Pushed handles call it from the
        hub's loop thread: keep it short."""
        with _LOCK:
            if self._get is None:
                self._callbacks = (self._callbacks or []) + [fn]
                return
        fn(self)

    @property
    def status(self) -> str:
        info = self._final()
        if info is not None and not info.get("hub_closed"):
            return str(info["status"])
        st = self._backend.job_status(self.id)
        return "queued" if st == "unknown" and self._pushed else st  # not taken in yet

    def done(self) -> bool:
        if self._get is not None:
            return True
        if self._pushed:
            return False
        if JobStatus(self.status).terminal:
            self.wait(0)
        return self._get is not None

    def info(self) -> dict[str, Any]:
        """Everything the hub knows about the job (status, node, attempts, value, error...)."""
        info = self._final()
        return dict(info) if info is not None else self._backend.job_info(self.id)

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait until the job has finished; its info. Raises odium.TimeoutError."""
        if self._get is None:
            if self._pushed:
                with _LOCK:
                    if self._get is None and self._event is None:
                        self._event = threading.Event()
                    event = self._event if self._get is None else None
                if event is not None and not event.wait(timeout):
                    raise OdiumTimeout(f"job {self.id} did not finish within {timeout} s "
                                       f"(it is {self.status})")
            else:
                got = self._backend.wait_jobs([self.id], timeout)[0]
                st = str(got.get("status", "queued"))
                if st != "unknown" and not JobStatus(st).terminal:
                    raise OdiumTimeout(f"job {self.id} did not finish within {timeout} s "
                                       f"(it is {st})")
                self._finished(known(got))
        info = self._final()
        assert info is not None
        if info.get("hub_closed"):
            raise NotConnectedError(f"the hub stopped before job {self.id} finished (it was "
                                    f"{info.get('status')}); it is kept in the store "
                                    "and goes on when the hub starts again")
        return info

    def result(self, timeout: float | None = None) -> Any:
        info = self.wait(timeout)
        if info.get("status") == "unknown":
            raise OdiumError(f"the hub knows no job {self.id}")
        raise_for_job(info)
        return job_value(info)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            self.result(timeout)
        except OdiumTimeout:
            raise
        except OdiumError as e:
            return e
        return None

    def cancel(self) -> bool:
        """Cancel the job if it has not finished; True if it is cancelled now."""
        if self._info is not None:
            return False
        st = self._backend.cancel_jobs([self.id]).get(self.id)
        return st == JobStatus.CANCELLED.value


def as_completed(jobs: Iterable[Job], timeout: float | None = None,
                 progress: bool | None = None) -> Iterator[Job]:
    """Yield jobs as they finish (any order). Raises odium.TimeoutError when ``timeout``
    seconds pass before all have. ``progress``: a bar of how many have, in a notebook or on a
    terminal (None: there only; True: on stderr even when it is no terminal; False: never)."""
    jobs = list(jobs)
    bar = job_bar(len(jobs), progress)
    finishing = _as_completed(jobs, timeout)
    return finishing if bar is None else bar.follow(finishing)


def _as_completed(jobs: list[Job], timeout: float | None) -> Iterator[Job]:
    deadline = None if timeout is None else time.monotonic() + timeout
    pushed = [j for j in jobs if j._pushed]
    polled = [j for j in jobs if not j._pushed]
    q: queue.SimpleQueue[Job] = queue.SimpleQueue()
    for j in pushed:
        j.add_done_callback(q.put)
    left = len(pushed)
    while polled:
        # ask for the polled ones in short waits, so that pushed ones are yielded meanwhile
        wait = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
        infos = polled[0]._backend.wait_jobs([j.id for j in polled], wait)
        still = []
        for j, info in zip(polled, infos, strict=True):
            if info.get("status") == "unknown" or JobStatus(info["status"]).terminal:
                j._finished(known(info))
                yield j
            else:
                still.append(j)
        polled = still
        while left:
            try:
                yield q.get_nowait()
                left -= 1
            except queue.Empty:
                break
        if polled and deadline is not None and time.monotonic() >= deadline:
            raise OdiumTimeout(f"{len(polled) + left} job(s) not finished within {timeout} s")
    while left:
        rest = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            yield q.get(timeout=rest)
        except queue.Empty:
            raise OdiumTimeout(f"{left} job(s) not finished within {timeout} s") from None
        left -= 1


def results_in_order(jobs: list[Job], wait: float | None, progress: bool | None) -> list[Any]:
    """Each job's value in order (the first that failed raises), within ``wait`` seconds."""
    deadline = None if wait is None else time.monotonic() + wait
    bar = job_bar(len(jobs), progress)
    if bar is not None:
        return list(bar.in_order(jobs, lambda j, t: j.result(t), deadline))
    return [j.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
            for j in jobs]


class _JobFuture(concurrent.futures.Future):  # type: ignore[type-arg]
    """A Future bound to a job, keeping concurrent.futures' contract: cancelling it cancels
    the job; a job cancelled (here or elsewhere) makes the future cancelled, so that
    ``cancelled()`` is True and ``result()``/``exception()`` raise ``CancelledError``."""

    job: Job | None = None

    def __init__(self) -> None:
        super().__init__()
        self._settled = threading.Lock()
        self._notified = False

    def cancel(self) -> bool:
        if self.cancelled():
            return True
        if self.done():
            return False
        if self.job is None:
            return super().cancel()
        if not self.job.cancel() and not _was_cancelled(self.job):
            return False
        return self._mark_cancelled()

    def _mark_cancelled(self) -> bool:
        """Cancelled, and waiters (``wait``, ``as_completed``) told so, exactly once."""
        with self._settled:
            if not super().cancel():
                return False
            if not self._notified:
                self._notified = True
                self.set_running_or_notify_cancel()
            return True


def _was_cancelled(job: Job) -> bool:
    info = job._final()
    return info is not None and info.get("status") == JobStatus.CANCELLED.value


class JobExecutor(concurrent.futures.Executor):
    """``concurrent.futures.Executor`` over the hub's job queue: each ``submit`` is a job.

    Functions and arguments travel as described for ``Hub.submit``; the options (nodes,
    retries, timeout, required state) are the executor's.
    """

    def __init__(self, submit: Callable[..., Job], **options: Any) -> None:
        self._submit = submit
        self._options = options
        self._futures: set[_JobFuture] = set()
        self._lock = threading.Lock()
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
               ) -> concurrent.futures.Future[Any]:
        if self._shutdown:
            raise RuntimeError("cannot submit after shutdown")
        fut = _JobFuture()
        job = self._submit(fn, args, kwargs, self._options)
        fut.job = job
        with self._lock:
            self._futures.add(fut)

        def done(j: Job) -> None:
            with self._lock:
                self._futures.discard(fut)
            if _was_cancelled(j):
                fut._mark_cancelled()
                return
            with fut._settled:
                if fut.cancelled():
                    return
                fut.set_running_or_notify_cancel()
            try:
                fut.set_result(j.result(0))
            except (OdiumError, JobCancelledError) as e:
                fut.set_exception(e)

        job.add_done_callback(done)
        return fut

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any],  # type: ignore[override]
            timeout: float | None = None, chunksize: int = 1, progress: bool | None = None
            ) -> Iterator[Any]:
        """``Executor.map`` (each call one job, every one submitted at once, values in order;
        what is not yet run is cancelled when the iteration stops), with ``progress`` as for
        ``as_completed``."""
        bar = job_bar(0, progress)
        if bar is None:
            return super().map(fn, *iterables, timeout=timeout, chunksize=chunksize)
        deadline = None if timeout is None else time.monotonic() + timeout
        futures = [self.submit(fn, *args) for args in zip(*iterables, strict=False)]  # as map()
        bar.total = len(futures)

        def values() -> Iterator[Any]:
            try:
                yield from bar.in_order(futures, lambda f, t: f.result(t), deadline)
            except OdiumTimeout as e:  # as concurrent.futures says it
                raise concurrent.futures.TimeoutError(str(e)) from None
            finally:
                for f in futures:
                    f.cancel()

        return values()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shutdown = True
        with self._lock:
            futures = list(self._futures)
        if cancel_futures:
            for f in futures:
                f.cancel()
        if wait:
            concurrent.futures.wait(futures)


__all__ = ["Job", "JobExecutor", "as_completed", "results_in_order", "Backend", "pack_jobs",
           "check_options", "known"]
