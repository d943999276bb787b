"""What a new user hit (issue 9, items 1, 7, 8 and 10), on real hubs, real local node
processes and real sockets: quoted globs in magics, executor futures that keep
concurrent.futures' contract, large output that never makes the hub refuse a message, and
results that read right.

Jobs that must wait for the test block on a file the test creates; nothing here sleeps to
synchronise.
"""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

import odium
from odium.core.jobs import Repr
from odium.core.results import format_text
from odium.errors import RemoteError

from .conftest import HB, wait_until

# --- item 1: quoted globs in magics ------------------------------------------------------------

IPython = pytest.importorskip("IPython")
from IPython.core.error import UsageError  # noqa: E402
from IPython.core.interactiveshell import InteractiveShell  # noqa: E402
from IPython.utils.capture import capture_output  # noqa: E402

import odium.jupyter  # noqa: E402


@pytest.fixture
def ip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[InteractiveShell]:
    """A shell with ``%load_ext odium`` done: a hub on free ports, no nodes yet."""
    monkeypatch.setenv("ODIUM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ODIUM_PORTS", "0")
    monkeypatch.setenv("ODIUM_HEARTBEAT", str(HB))
    monkeypatch.delenv("ODIUM_APP", raising=False)
    monkeypatch.chdir(tmp_path)
    shell = InteractiveShell.instance()
    with capture_output():
        shell.run_line_magic("load_ext", "odium")
    try:
        yield shell
    finally:
        shell.run_line_magic("unload_ext", "odium")
        assert odium.jupyter.current() is None


def test_magics_take_quoted_globs_like_a_shell(ip: InteractiveShell) -> None:
    with capture_output():
        ip.run_line_magic("odium", "local 2")
    # the README's own example, and docs/notebook.md's
    r = ip.run_cell_magic("odium", "--nodes 'local-*' --timeout 60", "import os\nos.getpid()")
    assert sorted(r) == ["local-1", "local-2"] and r.ok, r
    r = ip.run_cell_magic("odium", '--nodes "local-1" --quiet', "1 + 1")
    assert list(r) == ["local-1"] and r["local-1"].value == 2
    r = ip.run_cell_magic("odium", "--nodes local-2", "3")  # unquoted, as before
    assert list(r) == ["local-2"]
    table = ip.run_line_magic("odium", "nodes 'local-*'")
    assert sorted(row["name"] for row in table.data) == ["local-1", "local-2"]
    # autorun quotes its glob, and its cells parse it back
    with capture_output():
        ip.run_line_magic("odium", "autorun on --nodes 'local-1'")
    magics = odium.jupyter.current()
    assert magics is not None and magics.autorun is not None
    line = magics.autorun.removeprefix("%%odium").strip()
    assert list(ip.run_cell_magic("odium", line, "4")) == ["local-1"]
    with capture_output():
        ip.run_line_magic("odium", "autorun off")
    # a bad option says where help is: %odium help cell, not "%odium helpm"
    with pytest.raises(UsageError) as bad:
        ip.run_cell_magic("odium", "--nodes 'local-*' --timeout -1", "1")
    assert "(see: %odium help cell)" in str(bad.value) and "helpm" not in str(bad.value)
    with pytest.raises(UsageError, match=r"see: %odium help nodes"):
        ip.run_line_magic("odium", "nodes 'a b'")
    with pytest.raises(UsageError, match="cannot split the arguments"):
        ip.run_line_magic("odium", "nodes 'local-*")


# --- item 7: executor futures keep concurrent.futures' contract ------------------------------


def add(x: int, y: int = 0) -> int:
    return x + y


def _blocker(flag: Path, started: Path) -> str:
    return (f"import pathlib, time\npathlib.Path({str(started)!r}).write_text('x')\n"
            f"while not pathlib.Path({str(flag)!r}).exists():\n    time.sleep(0.01)\n'freed'")


def test_executor_futures_cancel_like_concurrent_futures(hub: odium.Hub, tmp_path: Path) -> None:
    hub.start_local(1, prefix="f", capacity=1)
    flag, started = tmp_path / "flag", tmp_path / "started"
    busy = hub.submit(_blocker(flag, started))
    ex = hub.executor()
    try:
        wait_until(started.exists, 30, "the blocking job to start")
        fut = ex.submit(add, 1, 2)
        other = ex.submit(add, 3, 4)
        assert fut.job.status == "queued"  # type: ignore[attr-defined]
        assert fut.cancel() is True
        assert fut.cancelled() and fut.done()
        with pytest.raises(concurrent.futures.CancelledError):
            fut.exception(0)
        with pytest.raises(concurrent.futures.CancelledError):
            fut.result(0)
        assert fut.cancel() is True  # cancelled already: True again, as a Future says
        done, _ = concurrent.futures.wait([fut], timeout=5)
        assert done == {fut}
        # a job cancelled elsewhere makes its future cancelled too
        assert hub.cancel_job(other.job.id) == "cancelled"  # type: ignore[attr-defined]
        wait_until(other.done, 10, "the other future to settle")
        assert other.cancelled()
        assert list(concurrent.futures.as_completed([other], timeout=5)) == [other]
        flag.write_text("go")
        assert busy.result(30) == "freed"
        ok = ex.submit(add, 5, y=6)
        assert ok.result(30) == 11 and ok.cancel() is False and not ok.cancelled()
    finally:
        flag.write_text("go")
        ex.shutdown(wait=False, cancel_futures=True)


# --- item 8: large output is cut with a note, never a message the hub refuses ----------------


def test_large_output_is_cut_visibly_and_the_hub_refuses_nothing(hub: odium.Hub) -> None:
    hub.start_local(1, prefix="big")
    streamed: list[str] = []
    r = hub.run('print("y" * 10_000_000)\nprint("z" * 10, flush=True)', timeout=60,
                on_output=lambda node, stream, text: streamed.append(text))
    e = r["big-1"]
    assert e.ok, e
    assert e.stdout.startswith("y" * 1000) and "[odium: output cut at" in e.stdout
    live = "".join(streamed)
    assert live.startswith("y" * 1000) and "the rest is not shown while it runs" in live
    assert len(live) < 5 * 1024 * 1024
    # shell output that large: the same
    r = hub.run("head -c 9000000 /dev/zero | tr '\\0' y; echo", shell=True, timeout=60)
    assert r["big-1"].ok and len(r["big-1"].stdout) <= 4 * 1024 * 1024 + 200
    # the node still answers, and the hub rejected nothing it sent
    assert hub.run("1 + 1", timeout=30)["big-1"].value == 2
    rejected = [ev for ev in hub.log(200) if ev.get("kind") == "rejected"]
    assert rejected == [], rejected


def test_a_job_too_large_for_one_message_still_ends_and_its_reports_fit(hub: odium.Hub) -> None:
    """A job's result goes the way a broadcast's does: too large for one message, its value
    gives way to its repr (with a note) and the job is done; many results at once go in
    reports of a size the hub accepts. The hub rejects nothing."""
    hub.start_local(1, prefix="jb")
    big = hub.submit("'y' * 20_000_000")
    assert repr(big.result(60)).startswith("'yyyy")
    info = hub.job(big.id)
    assert info["status"] == "done" and "was too large to send" in info["stderr"], info
    # results that are small as text but large on the wire (a NUL is 6 bytes of JSON: 12 MB
    # each), finished together: reports are cut by their size as sent, not by characters
    jobs = [hub.submit("print('\\0' * 2_000_000)") for _ in range(6)]
    assert all(j.result(60) is None for j in jobs)
    assert all(hub.job(j.id)["status"] == "done" for j in jobs)
    rejected = [ev for ev in hub.log(200) if ev.get("kind") == "rejected"]
    assert rejected == [], rejected


def test_a_result_too_large_for_one_message_gives_way_with_notes() -> None:
    from odium.node.workers.results import fit_result

    huge = {"status": "ok", "started": 0.0, "finished": 1.0, "stdout": "\x00" * 4_000_000,
            "stderr": "é" * 4_000_000, "value": list(range(3_000_000)), "value_json": True,
            "value_repr": "[0, 1, ...]",
            "outputs": [{"data": {"image/png": "A" * 8_000_000}, "metadata": {}}]}
    fit = fit_result(huge, budget=15 * 1024 * 1024)
    assert len(json.dumps(fit, ensure_ascii=False).encode()) <= 15 * 1024 * 1024
    assert fit["value"] is None and fit["value_json"] is False and fit["value_repr"]
    assert "the value" in fit["stderr"] and "display outputs" in fit["stderr"]
    assert "cut to" in fit["stdout"]
    small = {"status": "ok", "stdout": "hi\n", "value": 1}
    assert fit_result(small) is small


# --- item 10: results that read right ------------------------------------------------------


def test_a_timeout_says_timed_out_after_n_seconds(hub: odium.Hub) -> None:
    hub.start_local(1, prefix="r")
    r = hub.run("import time\nx = 1\ntime.sleep(60)", timeout=1)
    e = r["r-1"]
    assert e.status.value == "timeout"
    assert e.error is not None and e.error["ename"] == "TimeoutError"
    assert e.error["evalue"] == "timed out after 1 s"
    with pytest.raises(RemoteError) as err:
        r.raise_for_error()
    text = str(err.value)
    assert "timed out after 1 s" in text and "KeyboardInterrupt: interrupted" not in text
    assert "time.sleep(60)" in text  # the line it was on
    # a shell command's timeout says so too
    r = hub.run("sleep 60", shell=True, timeout=1)
    assert r["r-1"].error["evalue"].startswith("timed out after 1 s")  # type: ignore[index]
    # and a job's
    job = hub.submit("import time\ntime.sleep(60)", timeout=1)
    with pytest.raises(RemoteError, match=r"timed out after 1 s"):
        job.result(30)


def test_tracebacks_show_the_lines_and_no_internal_frames(hub: odium.Hub) -> None:
    hub.start_local(1, prefix="r")
    # the lines of this cell and of the earlier one that defined the function
    hub.run("def f(v):\n    return 1 / v\n", session="tb")
    r = hub.run("y = 2\nf(0)", session="tb")
    tb = r["r-1"].error["traceback"]  # type: ignore[index]
    assert "    f(0)" in tb and "    return 1 / v" in tb and "ZeroDivisionError" in tb, tb
    # a SyntaxError shows the user's line, not the compiler's frames
    r = hub.run("x = 1\ndef broken(:\n    pass")
    tb = r["r-1"].error["traceback"]  # type: ignore[index]
    assert r["r-1"].error["ename"] == "SyntaxError"  # type: ignore[index]
    assert "ast.py" not in tb and "node/workers/" not in tb and "def broken(:" in tb, tb
    # a job's traceback shows its line
    with pytest.raises(RemoteError) as err:
        hub.submit("x = 0\n1 / x").result(30)
    assert "    1 / x" in str(err.value)


def test_a_shell_error_says_its_exit_status_once(hub: odium.Hub) -> None:
    hub.start_local(1, prefix="r")
    r = hub.run("echo oops >&2; exit 3", shell=True)
    assert r["r-1"].exit == 3
    assert format_text(r).count("exit status 3") == 1, format_text(r)
    from odium.jupyter import display as D

    assert D.render_html(r).count("exit status 3") == 1


def test_jobs_bind_keyword_arguments_as_names(hub: odium.Hub) -> None:
    hub.start_local(1, prefix="j")
    assert hub.submit("a + b", a=2, b=3).result(30) == 5
    assert hub.submit("sum(args) + kwargs['k'] + k", 1, 2, k=3).result(30) == 9


def test_a_value_that_is_not_json_does_not_pretend_to_be_a_str(hub: odium.Hub) -> None:
    hub.start_local(1, prefix="j")
    v = hub.submit("{1, 2}").result(30)
    assert isinstance(v, Repr) and not isinstance(v, str)
    assert repr(v) == str(v) == v.text == "{1, 2}"
    with pytest.raises(TypeError):
        len(v)  # type: ignore[arg-type]
    assert v == Repr("{1, 2}") and v != "{1, 2}"


def test_the_state_hint_is_given_once_per_session(hub: odium.Hub, tmp_path: Path) -> None:
    hub.start_local(1, prefix="h")
    first = hub.run("1")
    assert first.extra.get("hint"), first.extra  # the fixture's app is not a git repository
    assert "ran without a state requirement" in format_text(first)
    for _ in range(2):
        again = hub.run("2")
        assert "hint" not in again.extra and again.extra.get("hinted") is True
        assert "ran without a state requirement" not in format_text(again)
    from odium.jupyter import display as D

    assert "ran without a state requirement" not in D.render_html(again)
    assert "ran without a state requirement" in D.render_html(first)
