"""Functions on nodes and data in and out of their namespaces (odium.api.data) on real local
nodes: apply, remote, parallel, push, pull, scatter, gather; arrays over the frame limit in
parts; an error on one node; a node that dies during a scatter (lost; no node given a
part); what a node sends back decoded as data only (odium.core.arrays)."""

from __future__ import annotations

import base64
import math
import os
import signal
from pathlib import Path

import pytest

import odium
from odium.api.data import ScatterError, join_parts, split_seq
from odium.core import arrays as A
from odium.errors import ConfigError, RemoteError
from tests.conftest import odium_shell, wait_until

np = pytest.importorskip("numpy")

pytestmark = pytest.mark.timeout(120)


def _sq(x: int) -> int:  # a function of a test module: travels by value
    return x * x


def test_apply_runs_a_function_on_every_node_with_arrays_and_refs(hub4: odium.Hub) -> None:
    r = hub4.apply(_sq, 7)
    assert r.ok and {n: r[n].value for n in r} == {f"n-{k}": 49 for k in range(1, 5)}
    r = hub4.apply(lambda a, k=1: a * k, np.arange(6, dtype=np.int32).reshape(2, 3), k=3)
    for n in r:
        v = r[n].value
        assert isinstance(v, np.ndarray) and v.dtype == np.int32 and v.shape == (2, 3)
        assert v.tolist() == [[0, 3, 6], [9, 12, 15]]
    hub4.run("base = 10")
    r = hub4.apply(lambda b, x: b + x, A.Ref("base"), 5, nodes="n-1")
    assert r["n-1"].value == 15
    r = hub4.apply(lambda: {1, 2})  # not data: its repr comes back, as a cell's
    assert repr(r["n-2"].value) == "{1, 2}"


def test_an_error_on_one_node_is_that_nodes_entry(hub4: odium.Hub) -> None:
    def boom() -> str:
        import os

        if os.environ["ODIUM_NODE"] == "n-3":
            raise ValueError("only here")
        return os.environ["ODIUM_NODE"]

    r = hub4.apply(boom)
    assert {n: r[n].status.value for n in r} == {"n-1": "ok", "n-2": "ok", "n-3": "error",
                                                 "n-4": "ok"}
    assert r["n-3"].error["ename"] == "ValueError" and r["n-1"].value == "n-1"
    remote = hub4.remote(nodes="n-[12]")(boom)
    assert {n: remote()[n].value for n in ("n-1", "n-2")} == {"n-1": "n-1", "n-2": "n-2"}
    with pytest.raises(RemoteError, match="n-3: ValueError: only here"):
        hub4.parallel()(lambda part: [boom() for _ in part])(list(range(8)))


def test_parallel_splits_across_nodes_in_name_order_and_joins(hub4: odium.Hub) -> None:
    @hub4.parallel(nodes="n-*")
    def where(part: list[int]) -> list[tuple[str, int]]:
        import os

        return [[os.environ["ODIUM_NODE"], x * 2] for x in part]

    got = where(range(10))
    assert [x for _, x in got] == [x * 2 for x in range(10)]
    assert [n for n, _ in got] == ["n-1"] * 3 + ["n-2"] * 3 + ["n-3"] * 2 + ["n-4"] * 2
    total = hub4.parallel()(lambda a: a.sum(keepdims=True))(np.arange(100.0))
    assert float(total.sum()) == 4950.0


def test_push_pull_scatter_gather(hub4: odium.Hub) -> None:
    arr = np.linspace(0, 1, 1000)
    hub4.push({"arr": arr, "meta": {"n": 3, "tag": b"\x00\x01"}}, nodes="n-[12]")
    got = hub4.pull("arr", nodes="n-[12]")
    assert set(got) == {"n-1", "n-2"} and all(np.array_equal(v, arr) for v in got.values())
    assert hub4.pull("meta", nodes="n-1") == {"n-1": {"n": 3, "tag": b"\x00\x01"}}
    r = hub4.run("float(arr.mean())", nodes="n-1")  # the notebook's namespace: cells see it
    assert r["n-1"].value == pytest.approx(0.5)
    spans = hub4.scatter("part", np.arange(10))
    assert spans == {"n-1": (0, 3), "n-2": (3, 6), "n-3": (6, 8), "n-4": (8, 10)}
    assert hub4.pull("part", nodes="n-3")["n-3"].tolist() == [6, 7]
    hub4.run("part = part * 10")
    assert hub4.gather("part").tolist() == [x * 10 for x in range(10)]
    hub4.scatter("names", ["a", "b", "c", "d", "e"])
    assert hub4.gather("names") == ["a", "b", "c", "d", "e"]
    with pytest.raises(RemoteError, match="name 'nope' is not defined on this node"):
        hub4.pull("nope", nodes="n-1")
    with pytest.raises(ConfigError, match="does not travel"):
        hub4.push({"s": {1, 2}})
    with pytest.raises(ConfigError, match="variable name"):
        hub4.push({"not a name": 1})


def test_arrays_over_the_frame_limit_travel_in_parts(hub4: odium.Hub) -> None:
    big = np.random.default_rng(1).random(3 * A.CHUNK // 8 + 1000)  # ~3.1 chunks of float64
    hub4.push({"big": big}, nodes="n-[12]")
    r = hub4.run("float(big.sum()), big.shape[0]", nodes="n-[12]")
    assert r["n-1"].value == [pytest.approx(float(big.sum())), big.shape[0]]
    back = hub4.pull("big", nodes="n-2")["n-2"]
    assert back.dtype == big.dtype and np.array_equal(back, big)
    r = hub4.run("__odium_data__['in'], __odium_data__['out']", nodes="n-2")
    assert r["n-2"].value == [{}, {}]  # nothing kept once taken


def test_a_node_that_dies_during_a_scatter_is_lost_and_no_node_has_a_part(
        hub4: odium.Hub) -> None:
    pid = hub4.run("import os; os.environ['ODIUM_NODE_PID']", nodes="n-4")["n-4"].value
    # n-4's worker kills its node as the first piece of its part comes: mid-scatter
    data = np.zeros(2 * A.CHUNK // 8 * 4)  # each node's part two pieces and more
    hub4.run("import odium.node.workers.data as d, os, signal\n"
             "_take = d.take_part\n"
             f"d.take_part = lambda *a: (os.kill({int(pid)}, signal.SIGKILL), _take(*a))",
             nodes="n-4")
    with pytest.raises(ScatterError, match="n-4 lost") as e:
        hub4.scatter("z", data)
    assert e.value.result["n-4"].status.value == "lost"
    r = hub4.run("'z' in globals()", nodes="n-[123]")
    assert {n: r[n].value for n in r} == {"n-1": False, "n-2": False, "n-3": False}
    assert not any(r2.value for r2 in hub4.run(
        "__odium_data__['staged'] or __odium_data__['in']", nodes="n-[123]").results())
    assert {n["name"]: n["status"] for n in hub4.nodes()}["n-4"] == "lost"


def test_encoding_refuses_what_is_not_data() -> None:
    for bad in ({A.TAG: "ndarray", "dtype": "|O8", "shape": [1], "data": ""},  # objects
                {A.TAG: "ndarray", "dtype": "<f8", "shape": [2], "data": "AAAA"},  # 3 bytes
                {A.TAG: "ndarray", "dtype": "<f8", "shape": [-1], "data": ""},
                {A.TAG: "pickle", "data": ""}, {A.TAG: "bytes", "data": "*not base64*"}):
        with pytest.raises(ValueError):
            A.decode(bad)
    doc = A.encode({"a": np.arange(3, dtype=">i2"), "b": [1.5, b"xy"], "c": np.float32(2)})
    back = A.decode(doc)
    assert back["a"].dtype == np.dtype(">i2") and back["a"].tolist() == [0, 1, 2]
    assert back["b"] == [1.5, b"xy"] and back["c"] == 2.0
    with pytest.raises(ValueError):
        A.encode(math.nan)
    big = {"a": np.arange(10**6), "small": np.arange(3), "b": b"x" * 250_001}
    skeleton, parts = A.encode_parts(big, chunk=100_000)
    assert len(parts) == 80 + 3 and skeleton["small"]["data"] == "AAAAAAAAAAABAAAAAAAAAAIAAAAAAAAA"
    raw = [base64.b64decode(p()) for p in parts]
    back = A.decode(A.join(skeleton, raw))
    assert np.array_equal(back["a"], big["a"]) and back["b"] == big["b"]
    back["a"][0] = 5  # writable, as an array made here is
    with pytest.raises(ValueError, match="outside the parts"):
        A.join(skeleton, raw[:-1])


def test_split_and_join_keep_order() -> None:
    assert split_seq(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_seq(range(4), 4) == [[0], [1], [2], [3]]
    assert join_parts([[1], [2, 3]]) == [1, 2, 3] and join_parts([1, 2]) == [1, 2]
    assert join_parts(split_seq("abcdefg", 3)) == "abcdefg"


def test_the_notebook_magics_push_pull_scatter_gather(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("IPython")
    from IPython.core.error import UsageError
    from IPython.utils.capture import capture_output

    with odium_shell(monkeypatch, tmp_path) as ip:
        with capture_output():
            ip.run_line_magic("odium", "local 2 --prefix m")
        ip.user_ns.update(w=np.arange(5.0), k=3)
        with capture_output() as cap:
            ip.run_line_magic("odium", "push w k")
        assert cap.stdout.strip() == "pushed w, k to 2 of 2 nodes"
        r = ip.run_cell_magic("odium", "", "float(w.sum()) * k")
        assert {n: r[n].value for n in r} == {"m-1": 30.0, "m-2": 30.0}
        got = ip.run_line_magic("odium", "pull w --nodes m-2 -o back")
        assert list(got) == ["m-2"] and ip.user_ns["back"]["m-2"].tolist() == [0, 1, 2, 3, 4]
        assert ip.run_line_magic("odium", "scatter w") == {"m-1": (0, 3), "m-2": (3, 5)}
        ip.run_cell_magic("odium", "", "w = w * 2")
        del ip.user_ns["w"]
        assert ip.run_line_magic("odium", "gather w").tolist() == [0, 2, 4, 6, 8]
        assert ip.user_ns["w"].tolist() == [0, 2, 4, 6, 8]  # kept by its name
        for bad, says in (("push nope", "no variable 'nope' here"),
                          ("pull nope", "name 'nope' is not defined on this node"),
                          ("push", "the following arguments are required")):
            with pytest.raises(UsageError, match=says):
                ip.run_line_magic("odium", bad)


def test_gather_refuses_a_scatter_with_a_part_gone(hub4: odium.Hub) -> None:
    """pull and gather ask the ready nodes; a scatter's part whose node is gone makes the
    gather an error, not a shorter answer."""
    hub4.scatter("p", list(range(8)))
    pid = int(hub4.run("import os; os.environ['ODIUM_NODE_PID']", nodes="n-2")["n-2"].value)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: {n["name"]: n["status"] for n in hub4.nodes()}["n-2"] == "lost", 30,
               "n-2 lost")
    assert sorted(hub4.pull("p")) == ["n-1", "n-3", "n-4"]  # the ready ones
    with pytest.raises(odium.OdiumError, match=r"parts \[0, 2, 3\] of a scatter"):
        hub4.gather("p")
    hub4.scatter("p", list(range(6)))  # over the nodes there now
    assert hub4.gather("p") == list(range(6))
