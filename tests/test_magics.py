"""``%load_ext odium``, ``%odium …`` and ``%%odium`` in a real IPython shell, with real hubs,
real local node processes and real sockets on OS-chosen ports."""

from __future__ import annotations

import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("IPython")

from IPython.core.error import UsageError  # noqa: E402
from IPython.core.interactiveshell import InteractiveShell  # noqa: E402
from IPython.utils.capture import capture_output  # noqa: E402

import odium  # noqa: E402
import odium.jupyter  # noqa: E402
from odium import NodeResult, Result, Status  # noqa: E402
from odium.jupyter import display as D  # noqa: E402
from odium.jupyter.cell import BackgroundRun  # noqa: E402
from odium.jupyter.live import LiveView  # noqa: E402

from .conftest import HB, wait_until  # noqa: E402


@pytest.fixture(scope="module")
def shell() -> InteractiveShell:
    return InteractiveShell.instance()


def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ODIUM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ODIUM_PORTS", "0")
    monkeypatch.setenv("ODIUM_HEARTBEAT", str(HB))
    monkeypatch.delenv("ODIUM_APP", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def ip(shell: InteractiveShell, tmp_path: Path,
       monkeypatch: pytest.MonkeyPatch) -> Iterator[InteractiveShell]:
    """The shell with ``%load_ext odium`` done: a hub on free ports, no nodes yet."""
    _env(monkeypatch, tmp_path)
    with capture_output() as cap:
        shell.run_line_magic("load_ext", "odium")
    shell.odium_load_output = cap.stdout + cap.stderr  # type: ignore[attr-defined]
    try:
        yield shell
    finally:
        shell.run_line_magic("unload_ext", "odium")
        assert odium.jupyter.current() is None


def cell(ip: InteractiveShell, line: str, body: str) -> Any:
    return ip.run_cell_magic("odium", line, body)


def hub_of(ip: InteractiveShell) -> odium.Hub:
    magics = odium.jupyter.current()
    assert magics is not None and magics.hub is not None
    return magics.hub


# --- loading --------------------------------------------------------------------------------


def test_load_ext_starts_a_hub_and_says_how_to_add_nodes(ip: InteractiveShell) -> None:
    out = ip.odium_load_output  # type: ignore[attr-defined]
    assert len(out.strip().splitlines()) == 1, out
    hub = hub_of(ip)
    assert hub.address in out
    assert re.search(r"[0-9a-f]{4}(:[0-9a-f]{4}){3}", out)
    assert "%odium local" in out and "%odium token" in out
    assert all(p != 0 for p in hub.ports.values())
    ip.run_line_magic("load_ext", "odium")  # a second time: nothing new starts
    assert hub_of(ip) is hub


def test_busy_ports_say_how_to_choose_others(shell: InteractiveShell, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _env(monkeypatch, tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        monkeypatch.setenv("ODIUM_PORTS", f"0,{busy},0,0")
        with capture_output() as cap:
            shell.run_line_magic("load_ext", "odium")
        try:
            msg = cap.stderr
            assert str(busy) in msg and "%odium start --ports 0" in msg, msg
            with pytest.raises(UsageError, match="not running.*could not start.*busy"):
                cell(shell, "", "1")
            with capture_output() as cap:
                shell.run_line_magic("odium", "start --ports 0")
            assert "odium hub" in cap.stdout
            assert odium.jupyter.current().hub.ports["query"] != busy
        finally:
            shell.run_line_magic("unload_ext", "odium")


def test_unload_stops_the_hub_and_its_local_nodes(shell: InteractiveShell, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _env(monkeypatch, tmp_path)
    shell.run_line_magic("load_ext", "odium")
    shell.run_line_magic("odium", "local 2")
    hub = odium.jupyter.current().hub
    procs = [ln.proc for ln in hub.local]
    shell.run_line_magic("unload_ext", "odium")
    assert all(p.poll() is not None for p in procs)
    assert hub.rt is None
    with pytest.raises(UsageError, match="not found"):
        shell.run_line_magic("odium", "nodes")


# --- cells ----------------------------------------------------------------------------------


def test_cells_share_a_namespace_per_node_and_the_value_is_a_result(ip: InteractiveShell) -> None:
    with capture_output() as cap:
        ip.run_line_magic("odium", "local 2")
    assert "2 local nodes ready" in cap.stdout
    r = cell(ip, "", "x = 20\nimport os\nprint('pid', os.getpid())")
    assert isinstance(r, Result) and sorted(r) == ["local-1", "local-2"] and r.ok
    assert all(nr.stdout.startswith("pid ") for nr in r.results())
    r2 = cell(ip, "", "x + 1")
    assert r2.values() == [21, 21]
    with capture_output():
        res = ip.run_cell("%%odium --nodes local-2\nx * 2")
    assert res.success
    assert ip.user_ns["_"]["local-2"].value == 40  # _ is the Result
    cell(ip, "-o r", "x - 1")
    assert ip.user_ns["r"]["local-1"].value == 19
    other = cell(ip, "--session other --nodes local-1", "'x' in dir()")
    assert other["local-1"].value is False


def test_result_renders_as_html_and_text(ip: InteractiveShell) -> None:
    ip.run_line_magic("odium", "local 2")
    r = cell(ip, "", "import sys\nprint('to out')\nprint('to err', file=sys.stderr)\n{'a': 1}")
    fmt = ip.display_formatter
    assert fmt is not None
    data, _ = fmt.format(r)
    html, text = data["text/html"], data["text/plain"]
    assert html.count('class="odium-row"') == 2
    assert 'data-status="ok"' in html and "odium-state-same" in html
    assert 'class="odium-stdout"' in html and 'class="odium-stderr"' in html
    assert "to out" in html and "to err" in html
    assert "2 nodes, 2 ok" in text and "[local-1] ok" in text
    nr_data, _ = fmt.format(r["local-1"])
    assert 'data-node="local-1"' in nr_data["text/html"]


DIFFER = ("import os\nname = os.environ['ODIUM_NODE']\nprint('hello')\n"
          "41 if name == 'local-7' else 1 / 0 if name == 'local-11' else 42")


def test_many_nodes_show_grouped_by_answer_unless_asked_otherwise(ip: InteractiveShell) -> None:
    ip.run_line_magic("odium", "local 12")  # 12 local nodes start in about 0.4 s
    fmt = ip.display_formatter
    assert fmt is not None
    r = cell(ip, "-o r", DIFFER)
    assert len(r) == 12 and r.grouped and ip.user_ns["r"] is r
    assert [(len(g), g.headline) for g in r.groups()] == [
        (10, "42"), (1, "41"), (1, "ZeroDivisionError: division by zero")]
    data, _ = fmt.format(r)
    html, text = data["text/html"], data["text/plain"]
    assert 'data-view="groups"' in html and 'class="odium-row"' not in html
    assert re.findall(r'<details class="odium-group" data-nodes="(\d+)" data-status="(\w+)"',
                      html) == [("10", "ok"), ("1", "ok"), ("1", "error")]
    assert "2 nodes differ: local-7 → 41, local-11 → error" in html
    assert html.count('class="odium-stdout"') == 3  # once per group, not once per node
    assert "[10 nodes] ok  42" in text and "2 nodes differ: local-7 → 41" in text
    assert re.findall(r"^\[([^]]+)\] ", text, re.M) == ["10 nodes", "local-7", "local-11"]

    flat = cell(ip, "--no-group", DIFFER)
    assert not flat.grouped and len(flat.groups()) == 3
    assert fmt.format(flat)[0]["text/html"].count('class="odium-row"') == 12
    two = cell(ip, "--group --nodes local-1,local-2", "6 * 7")
    assert two.grouped and "12 nodes" not in (t := fmt.format(two)[0]["text/plain"])
    assert "[2 nodes] ok  42" in t
    assert not cell(ip, "--nodes local-1,local-2", "6 * 7").grouped
    bg = cell(ip, "--bg --no-group", DIFFER)
    assert not bg.result(30).grouped and fmt.format(bg.result(30))[0]["text/html"].count(
        'class="odium-row"') == 12


def test_node_errors_are_entries_not_kernel_errors(ip: InteractiveShell) -> None:
    ip.run_line_magic("odium", "local 2")
    with capture_output():
        res = ip.run_cell("%%odium\ndef f():\n    raise ValueError('bad value')\nf()")
    assert res.success  # the cell itself did not fail: each node's error is in the Result
    r = res.result
    assert {nr.status for nr in r.results()} == {Status.ERROR}
    assert r["local-1"].error["ename"] == "ValueError"
    html = D.render_html(r)
    assert "<details" in html and "bad value" in html and "line 2, in f" in html


def test_shell_cells(ip: InteractiveShell, tmp_path: Path) -> None:
    ip.run_line_magic("odium", "local 2")
    r = cell(ip, "--shell --nodes local-1", "pwd; echo oops >&2; exit 3")
    nr = r["local-1"]
    assert nr.status is Status.ERROR and nr.exit == 3
    assert nr.stdout.strip() == str(tmp_path) and nr.stderr == "oops\n"
    assert cell(ip, "--shell", "echo fine").ok


def test_non_json_values_fall_back_to_repr_with_a_note(ip: InteractiveShell) -> None:
    ip.run_line_magic("odium", "local 1")
    r = cell(ip, "", "class Thing:\n    def __repr__(self):\n        return 'Thing()'\nThing()")
    nr = r["local-1"]
    assert nr.ok and nr.value is None and nr.value_repr == "Thing()" and not nr.value_json
    assert "not JSON" in D.render_text(r)
    assert "not JSON" in D.render_html(r)


def test_bg_returns_a_handle_at_once(ip: InteractiveShell, tmp_path: Path) -> None:
    ip.run_line_magic("odium", "local 2")
    gate = tmp_path / "gate"
    t0 = time.monotonic()
    h = cell(ip, "--bg -o h", f"import os, time\nwhile not os.path.exists({str(gate)!r}):\n"
             "    time.sleep(0.01)\n'done'")
    assert isinstance(h, BackgroundRun) and ip.user_ns["h"] is h
    assert time.monotonic() - t0 < 2 and not h.ready()
    assert "0 of 2 nodes done" in repr(h)
    assert ip.run_cell("1 + 1").result == 2  # the shell stays usable
    gate.write_text("go")
    r = h.wait(15)
    assert r.ok and r.values() == ["done", "done"] and h.ready() and h.result() is r


def test_live_output_while_the_cell_runs(ip: InteractiveShell) -> None:
    ip.run_line_magic("odium", "local 1")
    with capture_output() as cap:
        r = cell(ip, "", "import time\nfor i in range(3):\n    print('tick', i, flush=True)\n"
                 "    time.sleep(0.3)")
    assert r.ok
    assert "[local-1] tick 0" in cap.stdout and "[local-1] tick 2" in cap.stdout


def test_live_view_html_has_progress_and_each_nodes_streams() -> None:
    live = LiveView(rich=True, label="python on *")
    live.add("a", "stdout", "hello\n")
    live.add("a", "stderr", "warn\n")
    done_entry = NodeResult("b", Status.OK)
    html = live.html(["b"], ["a", "b"], {"b": done_entry})
    assert "1 of 2 nodes done" in html
    assert 'class="odium-stdout"' in html and 'class="odium-stderr"' in html
    assert 'data-status="running"' in html and 'data-status="ok"' in html


def test_live_view_says_k_of_n_done_and_who_still_runs() -> None:
    live = LiveView(rich=True, label="python on *")
    targets = [f"n{i:02d}" for i in range(14)]
    text = live.text(["n00", "n05"], targets)
    assert text == ("2 of 14 nodes done; still running: n01, n02, n03, n04, n06, n07, n08, "
                    "n09, n10, n11, … (2 more)")
    html = live.html(["n00", "n05"], targets)
    assert "still running: n01, n02, n03, n04, n06, n07, n08, n09, n10, n11, … (2 more)" in html
    assert live.text(targets, targets) == "14 of 14 nodes done"
    assert "still running" not in live.html(targets, targets)


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,line,match", [
    ("line", "local zero", "whole number"),
    ("line", "local 0", "1 to 256"),
    ("line", "frob", "unknown sub-command"),
    ("line", "local 2 --bogus", "unrecognized arguments"),
    ("line", "autorun sideways", "invalid choice"),
    ("line", "start --ports 1,2", "PUB,QUERY,JOBS,RESULTS"),
    ("line", "nodes 'a b'", "glob"),
    ("line", "help frob", "no sub-command"),
    ("cell", "--timeout -1", "positive"),
    ("cell", "--require-state maybe", "'any', 'match' or a commit"),
    ("cell", "-o 1x", "variable name"),
    ("cell", "--bogus", "unrecognized arguments"),
    ("cell", "--nodes 'x", "cannot split"),
])
def test_bad_arguments_raise_one_line_usage_errors(ip: InteractiveShell, kind: str, line: str,
                                                   match: str) -> None:
    with pytest.raises(UsageError, match=match) as info:
        if kind == "line":
            ip.run_line_magic("odium", line)
        else:
            cell(ip, line, "1")
    assert "\n" not in str(info.value)


def test_a_cell_before_any_node_joined(ip: InteractiveShell) -> None:
    with pytest.raises(UsageError, match="no node has joined this hub yet.*%odium local"):
        cell(ip, "", "1")


def test_an_empty_glob_match_says_which_nodes_exist(ip: InteractiveShell) -> None:
    ip.run_line_magic("odium", "local 2")
    with pytest.raises(UsageError, match="no node matches 'gpu\\*'.*local-1, local-2"):
        cell(ip, "--nodes gpu*", "1")


def test_an_empty_cell(ip: InteractiveShell) -> None:
    with pytest.raises(UsageError, match="empty"):
        cell(ip, "", "  \n")


def test_a_stopped_hub(ip: InteractiveShell) -> None:
    ip.run_line_magic("odium", "local 1")
    with capture_output() as cap:
        ip.run_line_magic("odium", "stop")
    assert "hub stopped, and 1 local node" in cap.stdout
    with pytest.raises(UsageError, match="hub is not running.*%odium start"):
        cell(ip, "", "1")
    with pytest.raises(UsageError, match="hub is not running"):
        ip.run_line_magic("odium", "nodes")
    with capture_output():
        ip.run_line_magic("odium", "start --ports 0")
    ip.run_line_magic("odium", "local 1")
    assert cell(ip, "", "1").ok


def test_a_node_that_dies_mid_cell_is_lost(ip: InteractiveShell, tmp_path: Path) -> None:
    ip.run_line_magic("odium", "local 2")
    hub = hub_of(ip)
    victim = next(ln for ln in hub.local if ln.name == "local-2")
    marker = tmp_path / "started"

    def kill_when_running() -> None:
        wait_until(marker.exists, 15, "the cell to start on local-2")
        victim.kill()

    t = threading.Thread(target=kill_when_running)
    t.start()
    t0 = time.monotonic()
    r = cell(ip, "--nodes local-2", f"import pathlib, time\npathlib.Path({str(marker)!r})"
             ".write_text('x')\ntime.sleep(60)")
    t.join()
    assert r["local-2"].status is Status.LOST
    assert time.monotonic() - t0 < 15
    assert "lost" in D.render_html(r)
    assert cell(ip, "--nodes local-1", "1").ok  # the other node is unharmed


def test_keyboard_interrupt_interrupts_every_node(ip: InteractiveShell, tmp_path: Path) -> None:
    ip.run_line_magic("odium", "local 2")
    main = threading.get_ident()
    marks = tmp_path / "marks"
    marks.mkdir()

    def interrupt_when_running() -> None:
        wait_until(lambda: len(list(marks.iterdir())) == 2, 15, "both nodes to run the cell")
        signal.pthread_kill(main, signal.SIGINT)

    t = threading.Thread(target=interrupt_when_running)
    t.start()
    t0 = time.monotonic()
    r = cell(ip, "", f"import os, pathlib, time\npathlib.Path({str(marks)!r}, str(os.getpid()))"
             ".write_text('x')\ntime.sleep(60)")
    t.join()
    assert {nr.status for nr in r.results()} == {Status.INTERRUPTED}, r
    assert time.monotonic() - t0 < 15
    assert cell(ip, "", "1").ok  # and the nodes take the next cell


# --- %odium sub-commands -----------------------------------------------------------------------


def test_nodes_table(ip: InteractiveShell) -> None:
    empty = ip.run_line_magic("odium", "nodes")
    assert len(empty) == 0 and "%odium local" in empty.text()
    ip.run_line_magic("odium", "local 2 --prefix gpu")
    table = ip.run_line_magic("odium", "nodes")
    assert [row["name"] for row in table.data] == ["gpu-1", "gpu-2"]
    text, html = table.text(), table._repr_html_()
    assert "same as hub" in text and "ready" in text and "just now" in text
    assert 'data-status="ready"' in html and "odium-state-same" in html
    assert len(ip.run_line_magic("odium", "nodes gpu-2")) == 1


def test_token_keys_accept_and_log(ip: InteractiveShell) -> None:
    with capture_output() as cap:
        ip.run_line_magic("odium", "token --ttl 60")
    assert re.search(r"ODIUM_TOKEN=odt1\.\S+ odium node", cap.stdout)
    assert "127.0.0.1 only" in cap.stdout
    keys = ip.run_line_magic("odium", "keys")
    assert any(k["role"] == "admin" for k in keys.data)
    with pytest.raises(UsageError, match="no key to accept"):
        ip.run_line_magic("odium", "accept nobody")
    ip.run_line_magic("odium", "local 1")
    cell(ip, "", "1")
    log = ip.run_line_magic("odium", "log -n 50")
    kinds = {ev["kind"] for ev in log.data}
    assert {"hub_start", "command"} <= kinds


def test_state_and_state_diff(ip: InteractiveShell) -> None:
    ip.run_line_magic("odium", "local 2")
    show = ip.run_line_magic("odium", "state")
    assert [d["node"] for d in show.data] == ["local-1", "local-2"]
    assert "same as hub" in show.text()
    diff = ip.run_line_magic("odium", "state diff --nodes local-1")
    assert [d["node"] for d in diff.data] == ["local-1"]


def test_help(ip: InteractiveShell) -> None:
    with capture_output() as cap:
        ip.run_line_magic("odium", "help")
        ip.run_line_magic("odium", "help local")
        ip.run_line_magic("odium", "help cell")
    assert "%odium local N" in cap.stdout and "--prefix" in cap.stdout
    assert "--require-state" in cap.stdout and "ODIUM_PORTS" in cap.stdout


def test_autorun_runs_cells_on_nodes_and_local_cells_here(ip: InteractiveShell) -> None:
    ip.run_line_magic("odium", "local 2")
    with capture_output() as cap:
        ip.run_cell("%odium autorun on --nodes local-1")
    assert "autorun on" in cap.stdout
    with capture_output():
        res = ip.run_cell("y = 5\ny * 2")
    assert isinstance(res.result, Result) and res.result.values() == [10]
    assert "y" not in ip.user_ns
    with capture_output():
        res = ip.run_cell("%%local\nz = 7\nz + 1")
    assert res.result == 8 and ip.user_ns["z"] == 7
    with capture_output():
        res = ip.run_cell("%odium autorun off")
        res = ip.run_cell("w = 3")
    assert ip.user_ns["w"] == 3


# --- rendering, without a hub -----------------------------------------------------------------


@dataclass(frozen=True)
class _WithOutputs(NodeResult):
    """A NodeResult carrying display outputs (as the core's will)."""

    outputs: list[dict[str, Any]] = field(default_factory=list)


PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJ"
       "RU5ErkJggg==")


def test_every_status_has_a_badge_and_differing_states_stand_out() -> None:
    hub_state = "a" * 40
    nodes = {}
    for i, st in enumerate(Status):
        nodes[f"n{i}"] = NodeResult(f"n{i}", st, state=hub_state if i % 2 else "b" * 40,
                                    started=1.0, finished=1.5,
                                    error=None if st is Status.OK else
                                    {"ename": "E", "evalue": str(st), "traceback": "tb line"})
    html = D.render_html(Result("c" * 32, nodes, hub_state))
    for st in Status:
        assert f'data-status="{st.value}"' in html
    assert html.count("odium-state-differs") == 4 and html.count("odium-state-same") == 3
    assert "500.0 ms" in html


def test_node_outputs_render_safely() -> None:
    nr = _WithOutputs("n", Status.OK, outputs=[
        {"data": {"image/png": PNG, "text/plain": "<Figure>"}},
        {"data": {"text/html": "<b>bold</b><script>alert(1)</script>"}},
        {"data": {"image/svg+xml": "<svg xmlns='http://www.w3.org/2000/svg'/>"}},
    ])
    html = D.render_html(Result("c", {"n": nr}, "s"))
    assert f"data:image/png;base64,{PNG}" in html
    assert '<iframe class="odium-html" sandbox=""' in html
    assert "<script>" not in html  # escaped inside srcdoc, and the sandbox forbids scripts
    assert "data:image/svg+xml;base64," in html
    assert "displayed image/png, text/plain" in D.render_text(Result("c", {"n": nr}, "s"))


def test_queue_runs_the_cell_once_on_one_node(ip: InteractiveShell) -> None:
    with capture_output():
        ip.run_line_magic("odium", "local 2")
    cell(ip, "", "marker = 'broadcast namespace'")
    with capture_output() as cap:
        value = ip.run_cell_magic("odium", "--queue -o job",
                                  "import os\nprint('ran')\n"
                                  "(os.environ['ODIUM_NODE'], 'marker' in dir())")
    node, seen = value
    assert node in ("local-1", "local-2") and seen is False  # a fresh namespace, one node
    assert cap.stdout == "ran\n" and f"done on {node}" in cap.stderr
    job = ip.user_ns["job"]
    assert job.status == "done" and job.result(5) == [node, False]
    with pytest.raises(UsageError, match="runs Python"):
        ip.run_cell_magic("odium", "--queue --shell", "echo hi")
    with pytest.raises(odium.RemoteError, match="ZeroDivisionError"):
        ip.run_cell_magic("odium", "--queue", "1 / 0")
