"""One view of many nodes (issue 15): ``Result.groups()`` puts nodes that answered the same in
one group, whatever state id they ran; the text and HTML forms show one entry per group.
Pure: Results built in the test (the real nodes are in test_magics and test_notebooks)."""

from __future__ import annotations

import html
import re
import time

import pytest

from odium.core.results import GROUP_AFTER, NodeResult, Result, Status, format_text
from odium.jupyter import display as D

HUB = "a" * 40
OTHER = "b" * 40
TB = "Traceback (most recent call last):\n  File \"<cell>\", line 1\nZeroDivisionError: oops\n"


def ok(node: str, value: object = 42, state: str = HUB, **kw: object) -> NodeResult:
    return NodeResult(node, Status.OK, value=value, value_repr=repr(value), state=state,
                      **kw)  # type: ignore[arg-type]


def err(node: str, evalue: str = "oops", state: str = HUB) -> NodeResult:
    return NodeResult(node, Status.ERROR, state=state, error={
        "ename": "ZeroDivisionError", "evalue": evalue, "traceback": TB})


def result(*entries: NodeResult, hub: str = HUB) -> Result:
    return Result("c" * 32, {r.node: r for r in entries}, hub)


def shape(r: Result) -> list[list[str]]:
    return [g.nodes for g in r.groups()]


# --- groups() -----------------------------------------------------------------------------------


def test_identical_answers_are_one_group() -> None:
    r = result(*(ok(f"pc-{i:02d}", stdout="hi\n") for i in range(1, 13)))
    (g,) = r.groups()
    assert g.nodes == [f"pc-{i:02d}" for i in range(1, 13)] and len(g) == 12
    assert g.result is r["pc-01"] and g.states == {HUB: g.nodes}
    assert (g.label, g.headline, g.short) == ("12 nodes", "42", "42")


def test_a_differing_value_and_an_error_are_groups_of_their_own_largest_first() -> None:
    entries = [ok(f"pc-{i:02d}") for i in range(1, 13)]
    entries[6] = ok("pc-07", 41)
    entries[10] = err("pc-11")
    r = result(*entries)
    groups = r.groups()
    assert shape(r) == [[n for n in r if n not in ("pc-07", "pc-11")], ["pc-07"], ["pc-11"]]
    assert [g.headline for g in groups] == ["42", "41", "ZeroDivisionError: oops"]
    assert [g.label for g in groups] == ["10 nodes", "pc-07", "pc-11"]
    from odium.core.results import differences

    assert differences(groups) == "2 nodes differ: pc-07 → 41, pc-11 → error"
    assert differences(groups[:1]) == ""


def test_every_part_of_an_answer_counts_but_not_the_state_name_or_times() -> None:
    base = ok("n1", stdout="x\n", stderr="w\n", outputs=[{"data": {"text/plain": "p"}}])
    variants = {
        "stdout": ok("n2", stdout="y\n", stderr="w\n", outputs=base.outputs),
        "stderr": ok("n3", stdout="x\n", stderr="", outputs=base.outputs),
        "outputs": ok("n4", stdout="x\n", stderr="w\n", outputs=[{"data": {"text/plain": "q"}}]),
        "value": ok("n5", 43, stdout="x\n", stderr="w\n", outputs=base.outputs),
        "exit": ok("n6", stdout="x\n", stderr="w\n", outputs=base.outputs, exit=3),
    }
    same = ok("n7", state=OTHER, stdout="x\n", stderr="w\n", outputs=list(base.outputs),
              started=1.0, finished=9.0)
    r = result(base, *variants.values(), same)
    assert shape(r) == [["n1", "n7"], ["n2"], ["n3"], ["n4"], ["n5"], ["n6"]]
    assert r.groups()[0].states == {HUB: ["n1"], OTHER: ["n7"]}


def test_errors_differ_by_name_value_or_traceback_and_an_error_is_not_ok() -> None:
    other_tb = NodeResult("e4", Status.ERROR, error={"ename": "ZeroDivisionError",
                                                     "evalue": "oops", "traceback": "x"})
    timeout = NodeResult("e5", Status.TIMEOUT, error={"ename": "ZeroDivisionError",
                                                      "evalue": "oops", "traceback": TB})
    r = result(err("e1"), err("e2"), err("e3", "other"), other_tb, timeout,
               NodeResult("e6", Status.OK))
    assert shape(r) == [["e1", "e2"], ["e3"], ["e4"], ["e5"], ["e6"]]
    assert r.groups()[-1].headline == "ok, no output"


def test_values_compare_as_json_and_a_repr_when_not_json() -> None:
    a = NodeResult("a", Status.OK, value={"x": 1, "y": [1, 2]}, value_repr="{'x': 1, 'y': [1, 2]}")
    b = NodeResult("b", Status.OK, value={"y": [1, 2], "x": 1}, value_repr="{'y': [1, 2], 'x': 1}")
    one = NodeResult("c", Status.OK, value=1, value_repr="1")
    true = NodeResult("d", Status.OK, value=True, value_repr="True")
    none = NodeResult("e", Status.OK, value=None, value_repr="None")  # returned None
    nothing = NodeResult("f", Status.OK)  # no value at all
    obj1 = NodeResult("g", Status.OK, value_repr="<Thing 1>", value_json=False)
    obj2 = NodeResult("h", Status.OK, value_repr="<Thing 1>", value_json=False)
    obj3 = NodeResult("i", Status.OK, value_repr="<Thing 2>", value_json=False)
    r = result(a, b, one, true, none, nothing, obj1, obj2, obj3)
    assert shape(r) == [["a", "b"], ["g", "h"], ["c"], ["d"], ["e"], ["f"], ["i"]]


def test_ties_go_by_the_first_node_name_and_states_by_their_count() -> None:
    r = result(ok("z1", 1), ok("a1", 2), ok("z2", 1), ok("a2", 2),
               ok("m1", 3, state=OTHER), ok("m2", 3), ok("m3", 3, state=OTHER))
    assert shape(r) == [["m1", "m2", "m3"], ["a1", "a2"], ["z1", "z2"]]
    assert list(r.groups()[0].states.items()) == [(OTHER, ["m1", "m3"]), (HUB, ["m2"])]
    numbered = result(ok("pc-11", 1), ok("pc-7", 2), ok("pc-10", 3), ok("pc-1", 4), ok("pc", 5))
    assert shape(numbered) == [["pc"], ["pc-1"], ["pc-7"], ["pc-10"], ["pc-11"]]
    assert result().groups() == []


def test_headlines() -> None:
    long = "x" * 200
    cases = [
        (ok("v", long), "'" + "x" * 78 + "…"),
        (ok("m", "two\nlines"), "'two\\nlines'"),
        (NodeResult("p", Status.OK, stdout="\n  first line\nsecond\n"),
         "ok, printed: first line …"),
        (NodeResult("d", Status.OK, outputs=[{"data": {}}] * 2), "ok, displayed 2 outputs"),
        (NodeResult("s", Status.ERROR, exit=3), "error: exit status 3"),
        (NodeResult("t", Status.TIMEOUT, error={"ename": "TimeoutError",
                                                "evalue": "timed out after 1 s\nat line 3"}),
         "TimeoutError: timed out after 1 s …"),
        (NodeResult("l", Status.LOST), "lost"),
    ]
    for entry, headline in cases:
        (g,) = result(entry).groups()
        assert g.headline == headline and len(g.headline) <= 80, entry.node
    assert result(ok("v", long)).groups()[0].short == "'" + "x" * 22 + "…"


def test_differences_name_at_most_three_nodes_and_five_groups() -> None:
    entries = [ok(f"n{i:02d}") for i in range(20)]
    entries += [ok(f"v{i}", 7) for i in range(5)]
    entries += [ok(f"w{i}", 100 + i) for i in range(8)]
    from odium.core.results import differences

    text = differences(result(*entries).groups())
    assert text.startswith("13 nodes differ: v0/v1/v2 +2 → 7, w0 → 100, w1 → 101, w2 → 102, "
                           "w3 → 103, … 4 more")
    all_differ = differences(result(ok("a", 1), ok("b", 2), ok("c", 3)).groups())
    assert all_differ == "all 3 nodes differ: b → 2, c → 3"
    assert differences(result(ok("a"), ok("b"), ok("c", 1)).groups()) == "1 node differs: c → 1"


@pytest.mark.timeout(10)
def test_a_thousand_nodes_group_fast() -> None:
    entries = [ok(f"n{i:04d}", [i % 3, "same"], stdout="line\n" * 20,
                  state=HUB if i % 10 else OTHER) for i in range(1000)]
    entries[500] = err("n0500")
    r = result(*entries)
    t = time.perf_counter()
    groups = r.groups()
    took = time.perf_counter() - t
    assert [len(g) for g in groups] == [334, 333, 332, 1]
    assert sum(len(ns) for g in groups for ns in g.states.values()) == 1000
    assert took < 0.5, took
    t = time.perf_counter()
    page = D.render_html(r)
    assert time.perf_counter() - t < 1.0 and page.count('class="odium-group"') == 4


# --- which view ---------------------------------------------------------------------------------


def test_grouped_by_default_above_the_threshold_and_as_asked() -> None:
    few = result(*(ok(f"n{i}") for i in range(GROUP_AFTER)))
    many = result(*(ok(f"n{i}") for i in range(GROUP_AFTER + 1)))
    assert not few.grouped and many.grouped
    assert few.with_view(True).grouped and not many.with_view(False).grouped
    assert few.with_view(True).nodes is few.nodes and few.extra == {}
    assert Result.from_dict(many.with_view(False).to_dict()).grouped is False


# --- text ---------------------------------------------------------------------------------------


def lab() -> Result:
    entries = [ok(f"pc-{i:02d}", stdout="hi\n") for i in range(1, 13)]
    entries[3] = ok("pc-04", stdout="hi\n", state=OTHER)
    entries[6] = ok("pc-07", 41)
    entries[10] = err("pc-11")
    return result(*entries)


def test_the_text_form_has_one_entry_per_group() -> None:
    r = lab()
    text = str(r)
    assert text == format_text(r) == format_text(r.with_view(False), group=True)
    lines = text.split("\n")
    heads = [ln for ln in lines if not ln.startswith("  ")]
    assert heads == ["[10 nodes] ok  42", "2 nodes differ: pc-07 → 41, pc-11 → error",
                     "[pc-07] ok  41", "[pc-11] error  ZeroDivisionError: oops"]
    assert "  nodes: pc-01, pc-02, pc-03, pc-04, pc-05, pc-06, pc-08, pc-09, pc-10, pc-12" in lines
    assert ("  states aaaaaaaaaa (same as hub) 9 nodes; bbbbbbbbbb (differs from hub): pc-04"
            in lines)
    assert text.count("=> 42") == 1 and "  ZeroDivisionError: oops" in lines
    per_node = format_text(r, group=False)
    assert per_node.count("=> 42") == 10 and per_node == str(r.with_view(False))
    plain = D.render_text(r)
    assert plain.startswith("odium result cccccccccccc: 12 nodes, 11 ok, 1 error")
    assert "[10 nodes] ok  42" in plain


def test_node_text_in_the_text_form_is_escaped() -> None:
    evil = "\x1b[2J\r[pc-01] ok  fake\n"
    r = result(*(ok(f"n{i}", evil, stdout=evil) for i in range(10)))
    text = format_text(r)
    assert "\x1b" not in text and "\r" not in text
    assert not any(ln.startswith("[pc-01]") for ln in text.split("\n"))


# --- HTML ---------------------------------------------------------------------------------------


def groups_in(page: str) -> list[tuple[str, str, str]]:
    """(data-nodes, data-status, summary text) of every group in a page."""
    found = re.findall(r'<details class="odium-group" data-nodes="(\d+)" data-status="([^"]+)"'
                       r'[^>]*><summary[^>]*>(.*?)</summary>', page)
    return [(n, s, html.unescape(re.sub(r"<[^>]+>", "", text)).strip()) for n, s, text in found]


def test_the_html_form_has_one_expandable_entry_per_group() -> None:
    page = D.render_html(lab())
    assert 'data-view="groups"' in page and "odium-table" not in page
    assert groups_in(page) == [("10", "ok", "ok 10 nodes: 42 2 state ids"),
                               ("1", "ok", "ok pc-07: 41"),
                               ("1", "error", "error pc-11: ZeroDivisionError: oops")]
    differ = re.search(r'<div class="odium-differ" data-nodes="2"[^>]*>(.*?)</div>', page)
    assert differ and html.unescape(differ.group(1)) == \
        "2 nodes differ: pc-07 → 41, pc-11 → error"
    assert page.index("odium-differ") < page.index("pc-07</b>")
    first = page.split('<details class="odium-group"')[1]
    names = re.findall(r'<span class="odium-group-node" data-node="([^"]+)"', first)
    assert names == ["pc-01", "pc-02", "pc-03", "pc-04", "pc-05", "pc-06", "pc-08", "pc-09",
                     "pc-10", "pc-12", "pc-04"]  # the nodes, then the one on another state
    assert re.findall(r'data-state="([^"]+)"', first) == [HUB, OTHER]
    assert first.count("odium-state-differs") == 1 and first.count('class="odium-stdout"') == 1
    assert 'class="odium-value"' in first and "<details class=\"odium-error\"" in page
    per_node = D.render_html(lab().with_view(False))
    assert 'data-view="nodes"' in per_node and per_node.count('class="odium-row"') == 12


def test_node_text_in_the_html_form_is_escaped() -> None:
    evil = '<img src=x onerror="alert(1)">'
    r = result(*(ok(f"n{i}", evil, stdout=evil) for i in range(9)),
               NodeResult("n9", Status.ERROR, error={"ename": evil, "evalue": evil}))
    page = D.render_html(r)
    assert "<img src=x" not in page and "&lt;img src=x" in page


def test_a_small_result_stays_a_table_unless_asked() -> None:
    r = result(ok("a"), ok("b"))
    assert 'data-view="nodes"' in D.render_html(r) and "odium-group" not in D.render_html(r)
    assert groups_in(D.render_html(r.with_view(True))) == [("2", "ok", "ok 2 nodes: 42")]
    assert "odium-differ" not in D.render_html(r.with_view(True))
