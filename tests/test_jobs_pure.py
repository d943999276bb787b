"""The job queue's pure core, without sockets or processes: the state machine, the retry
policy, the dispatch decision, what travels, and one job run in this process."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from odium.core.jobs import (
    TERMINAL,
    TRANSITIONS,
    JobRecord,
    JobStatus,
    Repr,
    advance,
    after_failure,
    job_value,
    pack_args,
    pack_function,
    path_to,
    plan_dispatch,
    raise_for_job,
    split_batch,
)
from odium.core.targeting import match_nodes, name_matches
from odium.errors import JobCancelledError, JobStateError, RemoteError
from odium.node.workers.job import run_job

Q, A, R = JobStatus.QUEUED, JobStatus.ASSIGNED, JobStatus.RUNNING
DONE, FAILED, TIMEOUT, CANCELLED = (JobStatus.DONE, JobStatus.FAILED, JobStatus.TIMEOUT,
                                    JobStatus.CANCELLED)


# --- the state machine -------------------------------------------------------------------------


def test_the_happy_path_is_allowed_and_recorded() -> None:
    job = JobRecord("j1", created=1.0)
    events = [advance(job, A, 2.0, node="n-1", reason="sent"),
              advance(job, R, 3.0, node="n-1", reason="taken"),
              advance(job, DONE, 4.0)]
    assert [(e.prev, e.status) for e in events] == [("queued", "assigned"),
                                                   ("assigned", "running"),
                                                   ("running", "done")]
    assert job.status is DONE and job.node == "n-1"
    assert job.attempts == 1 and job.started == 3.0 and job.finished == 4.0
    assert events[0].node == "n-1" and events[0].detail == "sent"


@pytest.mark.parametrize("start,to", [
    (Q, R), (Q, DONE), (Q, FAILED), (A, DONE), (A, A),
    *[(t, s) for t in TERMINAL for s in JobStatus],
])
def test_forbidden_moves_raise(start: JobStatus, to: JobStatus) -> None:
    job = JobRecord("j", status=start)
    with pytest.raises(JobStateError, match="not allowed"):
        advance(job, to, 1.0)
    assert job.status is start  # nothing changed


def test_every_state_is_in_the_table_and_terminal_states_are_final() -> None:
    assert set(TRANSITIONS) == set(JobStatus)
    for s in JobStatus:
        assert s.terminal == (s in TERMINAL)
        assert (not TRANSITIONS[s]) == s.terminal
    # back to the queue only from where a job can be lost or declined
    assert [s for s in JobStatus if Q in TRANSITIONS[s]] == [A, R]


def test_back_to_queued_forgets_the_node_and_counts_runs() -> None:
    job = JobRecord("j")
    for _ in range(3):
        advance(job, A, 1.0, node="n-1")
        advance(job, R, 1.0, node="n-1")
        advance(job, Q, 1.0, reason="node lost")
        assert job.node == ""
    assert job.attempts == 3 and job.reason == "node lost"


def test_path_to_walks_through_the_states_in_between() -> None:
    assert path_to(Q, R) == [A, R]
    assert path_to(A, DONE) == [R, DONE]
    assert path_to(R, R) == []
    with pytest.raises(JobStateError):
        path_to(DONE, R)


@pytest.mark.parametrize("retries,runs,expect", [
    (0, 1, FAILED), (1, 1, Q), (1, 2, FAILED), (3, 3, Q), (3, 4, FAILED),
])
def test_retry_policy_allows_one_plus_retries_runs(retries: int, runs: int,
                                                   expect: JobStatus) -> None:
    job = JobRecord("j", retries=retries, attempts=runs, status=R)
    assert after_failure(job) is expect


# --- dispatch ------------------------------------------------------------------------------


def q(*ids: str, start: int = 0) -> list[tuple[int, str]]:
    return [(start + i, j) for i, j in enumerate(ids)]


ANY = lambda k, n: True  # noqa: E731


def test_plan_never_exceeds_a_nodes_credit_and_takes_oldest_first() -> None:
    plan = plan_dispatch({"*": q("a", "b", "c", "d", "e")}, {"n1": 2, "n2": 1}, ANY)
    assert sorted(sum(plan.values(), [])) == ["a", "b", "c"]
    assert len(plan["n1"]) == 2 and len(plan["n2"]) == 1


def test_plan_gives_to_the_node_with_most_free_slots() -> None:
    plan = plan_dispatch({"*": q("a", "b", "c")}, {"n1": 1, "n2": 5}, ANY)
    assert plan == {"n2": ["a", "b", "c"]}  # n2 keeps having more free slots than n1


def test_no_credit_no_plan() -> None:
    assert plan_dispatch({"*": q("a")}, {"n1": 0}, ANY) == {}
    assert plan_dispatch({"*": q("a")}, {}, ANY) == {}
    assert plan_dispatch({}, {"n1": 3}, ANY) == {}


def test_a_class_no_free_node_may_run_is_skipped_without_reading_its_jobs() -> None:
    read = []

    def gpu_jobs() -> Any:
        for i in itertools.count():
            read.append(i)
            yield (i, f"gpu{i}")

    elig = {("gpu",): {"gpu-1"}, ("*",): {"cpu-1", "gpu-1"}}
    plan = plan_dispatch({("gpu",): gpu_jobs(), ("*",): q("x", "y", start=100)},
                         {"cpu-1": 2}, lambda k, n: n in elig[k])
    assert plan == {"cpu-1": ["x", "y"]}
    assert read == []  # the endless gpu queue was never touched


def test_a_class_whose_nodes_fill_up_stops_while_others_go_on() -> None:
    elig = {"small": {"s"}, "all": {"s", "b"}}
    plan = plan_dispatch({"small": q("s1", "s2", "s3"), "all": q("a1", "a2", start=10)},
                         {"s": 1, "b": 2}, lambda k, n: n in elig[k])
    assert plan["s"] == ["s1"]
    assert plan["b"] == ["a1", "a2"]


def test_plan_is_fifo_across_classes() -> None:
    plan = plan_dispatch({"x": [(0, "x0"), (2, "x1")], "y": [(1, "y0")]}, {"n": 2}, ANY)
    assert plan == {"n": ["x0", "y0"]}


def test_plan_respects_credit_under_random_load() -> None:
    rnd = random.Random(7)
    for _ in range(300):
        nodes = {f"n{i}": rnd.randint(0, 5) for i in range(rnd.randint(1, 5))}
        classes = {f"c{i}": q(*[f"c{i}-{j}" for j in range(rnd.randint(0, 8))], start=i * 100)
                   for i in range(rnd.randint(1, 4))}
        allowed = {(c, n): rnd.random() < 0.7 for c in classes for n in nodes}
        plan = plan_dispatch(classes, nodes, lambda k, n, a=allowed: a[(k, n)])
        sent = sum(plan.values(), [])
        assert len(sent) == len(set(sent))
        for n, jobs in plan.items():
            assert len(jobs) <= nodes[n]
            for j in jobs:
                assert allowed[(j.split("-")[0], n)]
        # nothing left undone that could have gone: every unplanned job's class has no
        # eligible node with a slot left
        left = {n: nodes[n] - len(plan.get(n, [])) for n in nodes}
        for c, jobs in classes.items():
            if any(j not in sent for _, j in jobs):
                assert all(left[n] == 0 for n in nodes if allowed[(c, n)])


def test_split_batch_takes_what_fits_and_declines_the_rest() -> None:
    assert split_batch([("a", True), ("b", True), ("c", True)], 2) == (["a", "b"], ["c"])
    assert split_batch([("a", False), ("b", True)], 5) == (["b"], ["a"])
    assert split_batch([("a", True)], 0) == ([], ["a"])


def test_node_globs() -> None:
    assert name_matches("*", "n-1")
    assert name_matches("gpu*,cpu-2", "cpu-2")
    assert not name_matches("gpu*", "cpu-1")
    assert not name_matches(" , ", "x")
    assert not name_matches("n-1", "n-10")  # a glob matches the whole name
    assert not name_matches("n-1", "n-1\n")  # anchored with \Z, not $
    assert not name_matches("N-1", "n-1")  # case-sensitive
    assert match_nodes(" b* , a ", ["a", "b1", "c", "b2"]) == ["a", "b1", "b2"]
    assert match_nodes("", ["a"]) == []


# --- what travels ------------------------------------------------------------------------------


def square(x: int) -> int:
    return x * x


def test_json_arguments_travel_as_json_others_pickled() -> None:
    assert pack_args((1, "a", [2.5, None]), {"k": {"n": True}}) == (
        [1, "a", [2.5, None]], {"k": {"n": True}}, None)
    assert pack_args((), {}) == (None, None, None)
    assert pack_args((3, 2.5, "x", None, True), {}) == ([3, 2.5, "x", None, True], None, None)
    assert pack_args((2**70,), {}) == ([2**70], None, None)
    for args in [((1, 2),), ({1: "a"},), (float("nan"),), (b"x",), ({"a": (1,)},),
                 (float("inf"),)]:
        a, k, p = pack_args(args, {})
        assert a is None and k is None and isinstance(p, str), args


def test_functions_travel_by_reference_or_value_and_run_in_a_fresh_namespace() -> None:
    import base64

    h, data = pack_function(square)
    assert len(h) == 32
    counter = {"n": 0}

    def closure(x: int) -> int:
        counter["n"] += 1
        return x + counter["n"]

    hc, dc = pack_function(closure)
    fns = {h: base64.b64decode(data), hc: base64.b64decode(dc)}
    assert run_job({"kind": "call", "fn": h, "args": [7]}, fns)["value"] == 49
    # each run unpickles the function again: the closure's state never carries over
    for _ in range(3):
        assert run_job({"kind": "call", "fn": hc, "args": [1]}, fns)["value"] == 2


def test_code_jobs_run_like_a_cell_in_a_clean_namespace() -> None:
    r = run_job({"kind": "python", "code": "x = 40\nprint('hi')\nx + 2"})
    assert r["status"] == "ok" and r["value"] == 42 and r["stdout"] == "hi\n"
    r = run_job({"kind": "python", "code": "x"})  # x from the previous job is not there
    assert r["status"] == "error" and r["error"]["ename"] == "NameError"
    assert "<odium-cell-" in r["error"]["traceback"]
    r = run_job({"kind": "python", "code": "sum(args) + kwargs['k']", "args": [1, 2],
                 "kwargs": {"k": 3}})
    assert r["value"] == 6


def test_values_that_are_not_json_come_back_as_repr() -> None:
    r = run_job({"kind": "python", "code": "{1, 2}"})
    assert r["value_json"] is False and r["value"] is None and r["value_repr"] == "{1, 2}"
    v = job_value({"status": "done", **r})
    assert isinstance(v, Repr) and repr(v) == str(v) == v.text == "{1, 2}"
    assert job_value({"value": [1, 2], "value_json": True}) == [1, 2]


def test_errors_in_functions_keep_the_remote_traceback() -> None:
    import base64

    def boom() -> None:
        raise ValueError("no good")

    h, data = pack_function(boom)
    r = run_job({"kind": "call", "fn": h}, {h: base64.b64decode(data)})
    assert r["status"] == "error"
    assert r["error"]["ename"] == "ValueError" and "no good" in r["error"]["traceback"]
    assert "node/workers/" not in r["error"]["traceback"]  # our frames are cut off


def test_raise_for_job() -> None:
    raise_for_job({"status": "done"})
    with pytest.raises(RemoteError, match="ValueError: x"):
        raise_for_job({"status": "failed", "node": "n", "error": {"ename": "ValueError",
                                                                  "evalue": "x"}})
    with pytest.raises(RemoteError, match="TimeoutError"):
        raise_for_job({"status": "timeout", "node": "n"})
    with pytest.raises(JobCancelledError):
        raise_for_job({"status": "cancelled", "id": "j"})
    with pytest.raises(JobStateError):
        raise_for_job({"status": "running", "id": "j"})


def test_a_node_holds_more_than_its_slots_only_while_its_jobs_are_short() -> None:
    from odium.core.jobs import AHEAD, PREFETCH, slots_offered

    assert slots_offered(2, 0, 1.0) == 2  # long jobs (and none yet: 1 s): its slots only
    assert slots_offered(2, 1, 1.0) == 1
    assert slots_offered(2, 2, AHEAD) == 0
    assert slots_offered(2, 0, AHEAD / 4) == 8  # about AHEAD seconds of work a slot
    assert slots_offered(2, 0, 0.0001) == 2 * PREFETCH  # never more than this
    assert slots_offered(2, 40, 0.0001) == 0


def test_the_flight_clock_waits_longer_while_batches_are_slow_to_be_reported() -> None:
    """A batch goes back to the queue after the floor, or after three times the slowest
    flight seen lately, whose memory halves every half-life: a busy hub does not send every
    batch again (which made it busier still), and a quiet one is quick again soon."""
    from odium.core.jobs import FlightClock

    c = FlightClock(3.0, margin=3.0, half_life=10.0)
    assert c.limit(100.0) == 3.0  # nothing seen: the floor
    c.seen(0.2, 100.0)
    assert c.limit(100.0) == 3.0  # fast flights: the floor
    c.seen(5.0, 101.0)  # a late report (its batch may have gone back already)
    assert c.limit(101.0) == pytest.approx(15.0)
    assert c.limit(111.0) == pytest.approx(7.5)  # one half-life later
    c.seen(1.0, 111.0)  # a faster one does not hide the slow one still remembered
    assert c.limit(111.0) == pytest.approx(7.5)
    assert c.limit(200.0) == 3.0  # long quiet: back to the floor
