"""The job queue's dispatch: which queued jobs go to which node now, in credit-based batches
over the jobs socket, each sealed to the nodes that may run every job in it.

Everything here runs in the hub's loop thread. The decision is ``odium.core.jobs
.plan_dispatch``; this keeps the credit (each node's free slots, less what is on the way) and
the batches on the way (``Flight``), which a node's report settles (``odium.hub.jobreports``).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from ..core import wire as P
from ..core.jobs import MAX_BATCH, MAX_BATCH_BYTES, JobRecord, JobStatus, plan_dispatch
from ..core.requirements import satisfies
from ..core.targeting import name_matches
from .jobbook import JobBook, QueueKey
from .links import JobWire, Timers
from .nodes import NodeInfo, NodeStatus

Q, A = JobStatus.QUEUED, JobStatus.ASSIGNED
KEEP_BATCHES = 100_000  # batches remembered (which jobs each carried), to check reports


@dataclass
class NodeSlots:
    """What the hub knows of one node's job slots."""

    name: str
    boot: str = ""  # the node run that last reported (job_state); "" when gone
    capacity: int = 0
    free: int = 0  # as the node last said
    reserved: int = 0  # planned against its free slots, on the way
    relay: bool = False  # a relay: its slots are its subtree's, and it outlives its restarts


@dataclass
class Flight:
    """A batch on the way: sent on the PUSH socket, not yet reported by the node it reached."""

    node: str  # whose free slots it was planned for
    sent: float  # monotonic
    jobs: list[str]


class JobSender:
    """Dispatch rounds: one is due whenever something may have freed a slot or queued a job."""

    def __init__(self, book: JobBook, wire: JobWire, nodes: Mapping[str, NodeInfo],
                 loop: Timers) -> None:
        self.book, self.wire, self.nodes, self.loop = book, wire, nodes, loop
        self.slots: dict[str, NodeSlots] = {}
        self.flights: dict[str, Flight] = {}
        # every batch sent lately (its flight: when, which jobs), to check reports
        self.batch_jobs: OrderedDict[str, Flight] = OrderedDict()
        self._eligible_cache: dict[tuple[str, ...], bool] = {}
        self._due = False

    def kick(self) -> None:
        if not self._due and not self.book.closed:
            self._due = True
            self.loop.call_later(0, self.dispatch)

    def _live(self, dq: deque[tuple[int, str, int]]) -> Iterator[tuple[int, str]]:
        jobs, tokens = self.book.jobs, self.book.qtoken
        for seq, j, tok in dq:
            rec = jobs.get(j)
            if rec is not None and rec.status is Q and tokens.get(j) == tok:
                yield seq, j

    def _clean(self, dq: deque[tuple[int, str, int]]) -> None:
        jobs, tokens = self.book.jobs, self.book.qtoken
        while dq:
            _seq, j, tok = dq[0]
            rec = jobs.get(j)
            if rec is not None and rec.status is Q and tokens.get(j) == tok:
                return
            dq.popleft()

    def clean_all(self) -> None:
        queues = self.book.queues
        empty = []
        for k, dq in queues.items():
            self._clean(dq)
            if not dq:
                empty.append(k)
        for k in empty:
            del queues[k]

    def eligible(self, key: QueueKey, name: str) -> bool:
        nodes, require = key
        ck = (nodes, name)
        ok = self._eligible_cache.get(ck)
        if ok is None:
            if len(self._eligible_cache) > 10000:
                self._eligible_cache.clear()
            ns = self.slots.get(name)
            relay = ns is not None and ns.relay  # a relay takes jobs for its subtree, never
            ok = self._eligible_cache[ck] = (self._below_matches(nodes, name) if relay  # for
                                             else name_matches(nodes, name))  # itself
            self._eligible_cache[ck + ("relay",)] = relay
        if not ok:
            return False
        if require == "any" or self._eligible_cache.get(ck + ("relay",)):
            return True  # (below a relay, each instance checks its own state)
        info = self.nodes.get(name)
        return info is not None and satisfies(require, info.state, info.state)

    def _below_matches(self, nodes: str, name: str) -> bool:
        """Whether ``nodes`` matches an instance below the relay ``name``."""
        return any(i.via == name and name_matches(nodes, n) for n, i in self.nodes.items())

    def forget_eligibility(self) -> None:
        """The subtrees changed: who is eligible for what is looked at again."""
        self._eligible_cache.clear()

    def credit(self) -> dict[str, int]:
        """Free slots per ready node, less what is on the way to it."""
        out: dict[str, int] = {}
        for name, ns in self.slots.items():
            info = self.nodes.get(name)
            if info is None or info.status != NodeStatus.READY or ns.boot != info.boot:
                continue
            c = ns.free - ns.reserved
            if c > 0:
                out[name] = c
        return out

    def dispatch(self) -> None:
        self._due = False
        book = self.book
        if book.closed or not any(book.queues.values()):
            return
        credit = self.credit()
        if not self.wire.can_push() or not credit:
            return
        queues = {k: self._live(dq) for k, dq in book.queues.items() if dq}
        plan = plan_dispatch(queues, credit, self.eligible)
        live = [n for n, i in self.nodes.items()
                if i.status in (NodeStatus.READY, NodeStatus.CONNECTING)]
        may_run: dict[QueueKey, frozenset[str]] = {}
        keys: dict[frozenset[str], list[str]] = {}  # (each set's keys made once a round)

        def readers(chunk: list[JobRecord]) -> list[str]:
            """The nodes that may run every job of a batch: the only ones it is sealed to
            (PUSH hands a batch to any connected node; the others learn nothing of it)."""
            names: frozenset[str] | None = None
            for k in {r.key for r in chunk}:
                el = may_run.get(k)
                if el is None:
                    el = may_run[k] = frozenset(n for n in live if self.eligible(k, n))
                names = el if names is None else names & el
            names = names or frozenset()
            if names not in keys:
                keys[names] = [self.nodes[n].key_id for n in sorted(names)]
            return keys[names]

        mono = time.monotonic()
        for node, ids in plan.items():
            if not self._send_share(node, ids, readers, mono):
                break  # no node connected on the jobs socket (yet): try later
        self.clean_all()

    def _send_share(self, node: str, ids: list[str],
                    readers: Callable[[list[JobRecord]], list[str]], mono: float) -> bool:
        """Send a node's share of a round, batch by batch; False if a batch could not go."""
        start = 0
        while start < len(ids):
            chunk, fns, start = self._chunk(ids, start)
            if not self._send(node, chunk, fns, readers(chunk), mono):
                return False
        return True

    def _chunk(self, ids: list[str], start: int) -> tuple[list[JobRecord], dict[str, str], int]:
        """The next batch of a node's share: up to MAX_BATCH jobs or MAX_BATCH_BYTES."""
        chunk: list[JobRecord] = []
        size = 0
        fns: dict[str, str] = {}
        jobs, known = self.book.jobs, self.book.fns
        while start < len(ids) and len(chunk) < MAX_BATCH and size < MAX_BATCH_BYTES:
            rec = jobs[ids[start]]
            start += 1
            chunk.append(rec)
            size += len(rec.code) + len(rec.args_pickle or "") + 200
            if rec.fn and rec.fn not in fns:
                fns[rec.fn] = known.get(rec.fn, "")
                size += len(fns[rec.fn])
        return chunk, fns, start

    def _send(self, node: str, chunk: list[JobRecord], fns: dict[str, str], readers: list[str],
              mono: float) -> bool:
        """Send one batch planned for ``node``'s slots; False if nobody could take it."""
        specs = [P.JobSpec(r.id, r.kind, r.code, r.fn,  # type: ignore[arg-type]
                           r.args, r.kwargs, r.args_pickle, r.timeout, r.nodes,
                           r.require, r.attempts + 1) for r in chunk]
        mid = P.new_id()
        if not self.wire.push_sealed("job_batch", P.JobBatch(specs, fns), readers, mid):
            return False
        book = self.book
        book.stats["batches"] += 1
        for rec in chunk:
            book.move(rec, A, node=node, reason=f"sent in batch {mid[:12]}")
        self.flights[mid] = Flight(node, mono, [r.id for r in chunk])
        self.batch_jobs[mid] = self.flights[mid]
        if len(self.batch_jobs) > KEEP_BATCHES:
            self.batch_jobs.popitem(last=False)
        self.slots[node].reserved += len(chunk)
        return True

    def release(self, f: Flight) -> None:
        ns = self.slots.get(f.node)
        if ns is not None:
            ns.reserved = max(0, ns.reserved - len(f.jobs))

    def slots_of(self, name: str) -> NodeSlots:
        ns = self.slots.get(name)
        if ns is None:
            ns = self.slots[name] = NodeSlots(name)
        return ns


__all__ = ["Flight", "JobSender", "NodeSlots"]
