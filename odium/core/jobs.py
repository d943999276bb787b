"""The job queue's pure core: job records, the state machine, retries, and the dispatch decision.

No sockets, no database, no threads. The hub's queue manager (``odium.hub.jobqueue``), the
node's job pool (``odium.node.jobs``, ``odium.node.jobpool``) and the client handles
(``odium.api.jobs``) are thin adapters around what is here.

A job moves ``queued → assigned → running → done | failed | timeout | cancelled``; a job
whose node is lost, or whose run failed, goes back to ``queued`` while it has retries left.
Every move goes through :func:`advance`, which checks it against :data:`TRANSITIONS` and
returns the :class:`JobEvent` the hub records.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import heapq
import itertools
import json
import math
import os
import secrets
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

from ..errors import ConfigError, JobCancelledError, JobStateError, RemoteError

K = TypeVar("K", bound=Hashable)

JOB_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z"
MAX_BATCH = 256  # jobs in one message, either way
MAX_BATCH_BYTES = 4 * 1024 * 1024  # payload bytes in one job batch (well under the frame limit)


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    ASSIGNED = "assigned"  # sent to the nodes, not yet taken by one
    RUNNING = "running"  # a node took it and runs it
    DONE = "done"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


Q, A, R = JobStatus.QUEUED, JobStatus.ASSIGNED, JobStatus.RUNNING
_VALUES = {s: s.value for s in JobStatus}
TERMINAL = frozenset({JobStatus.DONE, JobStatus.FAILED, JobStatus.TIMEOUT, JobStatus.CANCELLED})

# from -> the states a job may move to. Back to queued: declined by the node it reached
# (assigned), or its node lost / its run failed with retries left (running).
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    Q: frozenset({A, JobStatus.CANCELLED}),
    A: frozenset({R, Q, JobStatus.CANCELLED}),
    R: frozenset({Q, JobStatus.DONE, JobStatus.FAILED, JobStatus.TIMEOUT, JobStatus.CANCELLED}),
    JobStatus.DONE: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.TIMEOUT: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


def path_to(start: JobStatus, goal: JobStatus) -> list[JobStatus]:
    """The shortest sequence of moves from ``start`` to ``goal`` (without ``start``).

    Used when a node reports a job further along than the hub knew (a result for a job the
    hub still saw as assigned after a restart): each step in between is recorded too.
    """
    if start == goal:
        return []
    seen = {start}
    frontier: list[tuple[JobStatus, list[JobStatus]]] = [(start, [])]
    while frontier:
        nxt = []
        for s, p in frontier:
            for t in sorted(TRANSITIONS[s], key=lambda x: x.value):
                if t == goal:
                    return p + [t]
                if t not in seen and t != Q:  # never route through queued
                    seen.add(t)
                    nxt.append((t, p + [t]))
        frontier = nxt
    raise JobStateError(f"no way from {start} to {goal}")


@dataclass
class JobRecord:
    """The hub's view of one job: what to run, where it is, what came of it."""

    id: str
    kind: str = "python"  # python (a code string, run like a cell) | call (a function)
    code: str = ""
    fn: str | None = None  # the function's hash (its serialised form is kept apart)
    args: list[Any] | None = None
    kwargs: dict[str, Any] | None = None
    args_pickle: str | None = None  # base64 pickle of (args, kwargs) when they are not JSON
    nodes: str = "*"
    retries: int = 0
    timeout: float | None = None
    require: str = "any"
    issuer: str = ""
    status: JobStatus = JobStatus.QUEUED
    node: str = ""
    attempts: int = 0
    created: float = 0.0
    updated: float = 0.0
    started: float | None = None
    finished: float | None = None
    result: dict[str, Any] | None = None  # value, value_repr, value_json, stdout, stderr, error
    reason: str = ""  # why it last moved (declined, node lost, retry, cancelled by ...)
    seq: int = 0  # queue order

    @property
    def key(self) -> tuple[str, str]:
        """The dispatch class: jobs with the same targets and requirement share a queue."""
        return (self.nodes, self.require)

    def to_dict(self) -> dict[str, Any]:
        r = self.result or {}
        return {"id": self.id, "kind": self.kind, "status": self.status.value, "node": self.node,
                "nodes": self.nodes, "require": self.require, "retries": self.retries,
                "attempts": self.attempts, "timeout": self.timeout, "created": self.created,
                "updated": self.updated, "started": self.started, "finished": self.finished,
                "reason": self.reason, "issuer": self.issuer,
                "code": self.code if self.kind == "python" else "",
                "value": r.get("value"), "value_repr": r.get("value_repr"),
                "value_json": r.get("value_json", True), "stdout": r.get("stdout", ""),
                "stderr": r.get("stderr", ""), "error": r.get("error")}


_event = tuple.__new__  # builds a JobEvent without its Python-level __new__


class JobEvent(NamedTuple):
    """One recorded move of one job."""

    job: str
    ts: float
    prev: str
    status: str
    node: str = ""
    detail: str = ""
    seq: int = 0  # the job's queue order (its key in the store)


def advance(job: JobRecord, to: JobStatus, now: float, *, node: str | None = None,
            reason: str = "") -> JobEvent:
    """Move a job to ``to`` if the state machine allows it; return the event to record."""
    if to not in TRANSITIONS[job.status]:
        raise JobStateError(f"job {job.id}: {job.status} -> {to} is not allowed")
    prev = job.status
    job.status = to
    job.updated = now
    if node is not None:
        job.node = node
    if to is R:
        job.attempts += 1
        job.started = now
    elif to is Q:
        job.node = ""
    elif to in TERMINAL:
        job.finished = now
    job.reason = reason
    return _event(JobEvent, (job.id, now, _VALUES[prev], _VALUES[to], job.node, reason, job.seq))


def after_failure(job: JobRecord) -> JobStatus:
    """The retry policy: a run that failed (an error, a lost node, a dead worker) goes back to
    the queue while the job has retries left; after ``1 + retries`` runs it is failed."""
    return JobStatus.QUEUED if job.attempts <= job.retries else JobStatus.FAILED


# --- dispatch ------------------------------------------------------------------------------


class _JobIds:
    """Job ids: 32 hex digits, a random prefix per process and a counter (no system call per
    job, unlike a uuid4); the prefix is drawn again in a forked child."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self.prefix = secrets.token_hex(8)
        self.count = itertools.count(secrets.randbelow(1 << 32))

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.count) & 0xFFFFFFFFFFFFFFFF:016x}"


new_job_id = _JobIds()


def plan_dispatch(queues: Mapping[K, Iterable[tuple[int, str]]], credit: Mapping[str, int],
                  eligible: Callable[[K, str], bool]) -> dict[str, list[str]]:
    """Which queued jobs to send now, and for which node's free slots.

    ``queues``: per dispatch class, the queued jobs as (order, id), oldest first.
    ``credit``: per node, how many more jobs it can hold now (its free slots less what is
    already on the way to it). ``eligible(class, node)``: whether that node may run jobs of
    that class (name glob, required state).

    Jobs are taken oldest first across classes; each goes to the eligible node with the most
    free slots left (ties: the order of ``credit``). A class none of whose eligible nodes has
    a free slot is skipped without looking at its jobs, so a long queue for an absent node
    costs nothing. Nothing is planned beyond the free slots: the total is at most
    ``sum(credit.values())`` and each node's share at most its credit.
    """
    free = {n: c for n, c in credit.items() if c > 0}
    plan: dict[str, list[str]] = {}
    if not free:
        return plan
    iters: dict[K, Iterator[tuple[int, str]]] = {}
    heads: dict[K, tuple[int, str]] = {}
    nodes_for: dict[K, list[str]] = {}
    heap: list[tuple[int, int, K]] = []
    for i, (k, q) in enumerate(queues.items()):
        el = [n for n in free if eligible(k, n)]
        if not el:
            continue
        it = iter(q)
        head = next(it, None)
        if head is None:
            continue
        iters[k], heads[k], nodes_for[k] = it, head, el
        heap.append((head[0], i, k))
    heapq.heapify(heap)
    left = sum(free.values())
    while heap and left > 0:
        _, i, k = heapq.heappop(heap)
        best, most = "", 0
        for n in nodes_for[k]:  # the first of the nodes with the most free slots
            f = free[n]
            if f > most:
                best, most = n, f
        if not most:
            continue  # every node this class may use is full: skip the whole class
        plan.setdefault(best, []).append(heads[k][1])
        free[best] -= 1
        left -= 1
        nxt = next(iters[k], None)
        if nxt is not None:
            heads[k] = nxt
            heapq.heappush(heap, (nxt[0], i, k))
    return plan


PREFETCH = 16  # times its slots a node holds, at most, while its jobs are short: ...
AHEAD = 0.05  # ... as many as take this many seconds a slot, by how long they took lately


def slots_offered(capacity: int, held: int, job_seconds: float) -> int:
    """The jobs a node asks for: its slots, and while its jobs are short (``job_seconds``, how
    long they took lately) more, to wait in its pool, so that a worker never waits a round
    trip to the hub for its next one (jobs of 1 ms came in batches of one or two at 2 slots
    a node); never more than about AHEAD seconds of work a slot that another node could have
    done."""
    depth = max(1, min(PREFETCH, int(AHEAD / max(job_seconds, 1e-4))))
    return max(0, capacity * depth - held)


class FlightClock:
    """How long a batch may go unreported before its jobs go back to the queue: ``floor``
    seconds, or ``margin`` times the slowest flight (sent -> reported, a late one too) seen
    lately, whose memory halves every ``half_life`` seconds. A hub (or nodes) too busy to
    report a batch within the floor then waits for it instead of sending everything again,
    which makes it busier still (1,000 swarm nodes under a profiler: 118 jobs/s and jobs not
    done after minutes with a fixed 3 s; 1,403 jobs/s with this)."""

    def __init__(self, floor: float, margin: float = 3.0, half_life: float = 10.0) -> None:
        self.floor, self.margin, self.half_life = floor, margin, half_life
        self.slowest, self._at = 0.0, 0.0

    def _faded(self, now: float) -> float:
        return self.slowest * 0.5 ** (max(0.0, now - self._at) / self.half_life)

    def seen(self, took: float, now: float) -> None:
        """A batch was reported ``took`` seconds after it was sent."""
        self.slowest, self._at = max(took, self._faded(now)), now

    def limit(self, now: float) -> float:
        return max(self.floor, self.margin * self._faded(now))


def split_batch(jobs: Iterable[tuple[str, bool]], free: int) -> tuple[list[str], list[str]]:
    """A node's decision on a batch that reached it: (take, decline).

    ``jobs``: (id, eligible here) in the order sent. It takes eligible jobs while it has free
    slots and declines the rest at once, so that none waits behind its busy workers.
    """
    take: list[str] = []
    decline: list[str] = []
    for job, ok in jobs:
        if ok and len(take) < free:
            take.append(job)
        else:
            decline.append(job)
    return take, decline


# --- what travels: functions, arguments, values ----------------------------------------------


def is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (TypeError, ValueError, RecursionError):
        return False


def pack_function(fn: Callable[..., Any], app: str | None = None) -> tuple[str, str]:
    """(hash, base64 of cloudpickle(fn)).

    A function of a module the nodes can import too travels by reference: a module of an
    installed package or the standard library, or of the application (``app``: nodes run
    the same application, as its state says). Any other function (``__main__``, a notebook,
    a script or test directory of your own) travels by value, with the globals it uses.
    """
    try:
        import cloudpickle
    except ImportError:  # pragma: no cover - a declared dependency
        raise ConfigError("submitting a function needs cloudpickle (pip install cloudpickle); "
                          "or submit code as a string") from None
    mod = _local_module(fn, app)
    try:
        if mod is not None:
            cloudpickle.register_pickle_by_value(mod)
        try:
            data = cloudpickle.dumps(fn, protocol=4)
        finally:
            if mod is not None:
                cloudpickle.unregister_pickle_by_value(mod)
    except Exception as e:  # noqa: BLE001 - whatever the pickler raises, say what failed
        raise ConfigError(f"cannot serialise {fn!r} for a job: {e}") from None
    return hashlib.sha256(data).hexdigest()[:32], base64.b64encode(data).decode("ascii")


def _local_module(fn: Callable[..., Any], app: str | None) -> Any:
    """The module of ``fn`` if the nodes cannot be counted on to import it, else None."""
    import os
    import sys
    import sysconfig

    name = getattr(fn, "__module__", None)
    mod = sys.modules.get(name or "")
    path = getattr(mod, "__file__", None)
    if mod is None or name == "__main__" or not path:
        return None  # __main__ and built-ins: cloudpickle decides
    path = os.path.realpath(path)
    shared = [sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")]
    if app:
        shared.append(app)
    for root in shared:
        root = os.path.realpath(root)
        if path == root or path.startswith(root.rstrip(os.sep) + os.sep):
            return None
    return mod


def pack_args(args: tuple[Any, ...], kwargs: dict[str, Any]
              ) -> tuple[list[Any] | None, dict[str, Any] | None, str | None]:
    """(args, kwargs, None) when both are JSON (they travel as they are); else
    (None, None, base64 of a pickle of (args, kwargs))."""
    a = list(args)
    if not kwargs and all(type(x) in _SCALARS for x in a):  # the common case, quickly
        if all(_scalar_ok(x) for x in a):
            return (a or None), None, None
    if is_json([a, kwargs]) and _json_keeps(a) and _json_keeps(kwargs):
        return (a or None), (kwargs or None), None
    try:
        import cloudpickle
    except ImportError:  # pragma: no cover
        raise ConfigError("arguments that are not JSON need cloudpickle") from None
    try:
        data = cloudpickle.dumps((tuple(args), kwargs), protocol=4)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"cannot serialise the job's arguments: {e}") from None
    return None, None, base64.b64encode(data).decode("ascii")


_SCALARS = frozenset({int, str, float, bool, type(None)})


def _scalar_ok(x: Any) -> bool:
    return type(x) is not float or math.isfinite(x)


def _json_keeps(value: Any) -> bool:
    """True when JSON gives back the same value (no tuples becoming lists, no int keys)."""
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if type(value) is list:
        return all(_json_keeps(v) for v in value)
    if type(value) is dict:
        return all(type(k) is str and _json_keeps(v) for k, v in value.items())
    return False


class Repr:
    """The value of a job whose result was not JSON (a set, an object): only its ``repr()``
    text travelled, so this is that text and nothing more. ``repr()``/``str()`` give it, and
    IPython shows it, as the original would print; it does not pretend to be the value (no
    ``len()``, no indexing, not a ``str``). ``text`` is the text itself."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = str(text)

    def __repr__(self) -> str:
        return self.text

    def __str__(self) -> str:
        return self.text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Repr) and other.text == self.text

    def __hash__(self) -> int:
        return hash((Repr, self.text))

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.text)


def job_value(result: Mapping[str, Any] | None) -> Any:
    """A finished job's value: the JSON value, or a :class:`Repr` of what was not JSON."""
    if not result:
        return None
    if result.get("value_json", True):
        return result.get("value")
    rep = result.get("value_repr")
    return None if rep is None else Repr(rep)


def known(info: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    """A job's info that is known already, as a getter (what job watchers are given)."""
    return lambda: info


def raise_for_job(info: Mapping[str, Any]) -> None:
    """Raise what a finished job that did not succeed ended with."""
    status = info.get("status")
    if status == JobStatus.DONE.value:
        return
    if status == JobStatus.CANCELLED.value:
        raise JobCancelledError(f"job {info.get('id')} was cancelled"
                                + (f": {info['reason']}" if info.get("reason") else ""))
    err = info.get("error") or {}
    node = info.get("node") or "?"
    if status == JobStatus.TIMEOUT.value:
        raise RemoteError(node, err.get("ename", "TimeoutError"),
                          err.get("evalue", f"job {info.get('id')} timed out"),
                          err.get("traceback", ""))
    if status == JobStatus.FAILED.value:
        raise RemoteError(node, err.get("ename", "JobFailed"),
                          err.get("evalue", info.get("reason") or "failed"),
                          err.get("traceback", ""))
    raise JobStateError(f"job {info.get('id')} has not finished (it is {status})")


__all__ = ["JobStatus", "JobRecord", "JobEvent", "TRANSITIONS", "TERMINAL", "advance",
           "after_failure", "plan_dispatch", "split_batch", "FlightClock", "path_to", "Repr",
           "job_value", "raise_for_job", "JobStateError", "JobCancelledError", "pack_function",
           "pack_args", "known"]
