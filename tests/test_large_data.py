"""Large data (issue 12, row 5): a big value, much output, output that is small as text but
large as JSON, bytes that are not UTF-8, a large image, a shell command writing without
newlines, and ``odium run`` answering with more than one message can carry. Real hub, real
node processes: every result is whole or cut with a note giving the true sizes, the hub
refuses nothing a node sends, and it stays responsive while it handles the big ones."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import psutil
import pytest

import odium
from tests.conftest import odium_cli, wait_until

pytestmark = pytest.mark.timeout(90)

MIB = 1024 * 1024
CAPTURE = 4 * MIB  # characters of a stream a command keeps (odium.node.workers.session)


def refused(hub: odium.Hub) -> list[dict[str, Any]]:
    """What the hub refused from its nodes, or what they could not send it."""
    return [e for e in hub.log(500) if e.get("kind") in ("rejected", "too_large",
                                                          "handler_failed")]


def answers_promptly(hub: odium.Hub, node: str, within: float = 10.0) -> float:
    """Seconds another node's command takes while the hub handles a big one."""
    t = time.monotonic()
    r = hub.run("1 + 1", node, timeout=within, end_session=True)
    assert r[node].value == 2, r
    return time.monotonic() - t


def test_a_20_mb_value_comes_back_as_its_repr_with_a_note_at_once(hub: odium.Hub) -> None:
    """Too large for one message, the value gives way to its (cut) repr, the status stays
    ok (the cell did not fail), and the note says both true sizes; no timeout given, no wait
    for one (the hub refused the result before: no answer, ever). An error message as large
    is cut the same way (the node was lost reading it)."""
    hub.start_local(1, prefix="v")
    t = time.monotonic()
    e = hub.submit_broadcast("'y' * 20_000_000", end_session=True).wait(60)["v-1"]
    assert time.monotonic() - t < 30
    assert e.ok and e.value is None and e.value_json is False, e.stderr
    assert e.value_repr is not None and e.value_repr.startswith("'yyyy")
    assert len(e.value_repr) <= 100_001
    assert ("the value (20000002 bytes as JSON) was too large to send in one message; its "
            "repr is shown (its first 100000 of 20000002 characters)") in e.stderr
    # a value small as text but large as JSON (a NUL is 6 bytes of it): the same
    e = hub.run("'\\0' * 3_000_000", timeout=60, end_session=True)["v-1"]
    assert e.ok and e.value is None and "(18000002 bytes as JSON)" in e.stderr, e.stderr
    # an error whose message is that large: an error still, its message and traceback cut
    e = hub.run("raise ValueError('\\0' * 20_000_000)", timeout=60, end_session=True)["v-1"]
    assert e.status.value == "error" and e.error is not None, e.status
    assert e.error["ename"] == "ValueError" and e.error["evalue"].startswith("\0" * 1000)
    assert e.error["evalue"].endswith(" of 20000000 characters: the result must fit in one "
                                      "message]\n")
    assert "[odium: the error's traceback cut to " in e.error["traceback"]
    assert refused(hub) == []


def test_50_mb_of_stdout_is_cut_with_its_true_size_and_the_hub_stays_responsive(
        hub: odium.Hub) -> None:
    """50 lines of 1 MB, written faster than they stream: the node stays alive (it read them
    as one frame, quadratically, and missed its beats), another node answers meanwhile, live
    output and the result stop at the capture limit and say so, the hub's memory stays
    bounded."""
    hub.start_local(2, prefix="o")
    rss = psutil.Process().memory_info().rss
    live: list[str] = []
    handle = hub.submit_broadcast("for i in range(50):\n    print('y' * 1_000_000)", "o-1",
                                  timeout=60, end_session=True,
                                  on_output=lambda node, stream, text: live.append(text))
    wait_until(lambda: live, 30, "the first output")
    assert answers_promptly(hub, "o-2") < 10
    e = handle.wait(60)["o-1"]
    assert e.ok, (e.status, e.error)
    assert e.stdout.startswith("y" * 1_000_000 + "\n" + "y" * 1000)
    assert e.stdout.endswith(f"\n[odium: output cut at {CAPTURE} of 50000050 characters of "
                             "stdout: a command keeps no more]\n"), e.stdout[-200:]
    assert len(e.stdout) < CAPTURE + 200
    streamed = "".join(live)
    assert CAPTURE <= len(streamed) < CAPTURE + 400 and "not shown while it runs" in streamed
    assert psutil.Process().memory_info().rss - rss < 300 * MIB
    # one write of 50 MB: the same, never a message over the limit
    e = hub.run("import sys\nsys.stdout.write('z' * 50_000_000)\n0", "o-1", timeout=60,
                end_session=True)["o-1"]
    assert e.ok and e.stdout.startswith("z" * 1000) and e.value == 0
    assert f"output cut at {CAPTURE} of 50000000 characters of stdout" in e.stdout
    assert refused(hub) == []


def test_nul_bytes_small_as_text_large_as_json_are_cut_to_fit_with_the_true_total(
        hub: odium.Hub) -> None:
    """print('\\0' * 3_000_000): under the capture limit, 18 MB once JSON-escaped. Live, every
    character arrives (in messages within the limit); the result keeps as many as fit in one
    message and says how many of how many."""
    hub.start_local(1, prefix="z")
    live: list[str] = []
    r = hub.run("print('\\0' * 3_000_000)", timeout=60, end_session=True,
                on_output=lambda node, stream, text: live.append(text))
    e = r["z-1"]
    assert e.ok, (e.status, e.error)
    assert "".join(live) == "\0" * 3_000_000 + "\n"
    kept = len(e.stdout) - len(e.stdout.lstrip("\0"))
    assert 2_000_000 < kept < 3_000_000
    assert e.stdout == "\0" * kept + (f"\n[odium: stdout cut to {kept} of 3000001 characters: "
                                      "the result must fit in one message]\n")
    assert refused(hub) == []


def test_bytes_on_sys_stdout_buffer_are_captured_and_bad_utf8_is_replaced(
        hub: odium.Hub) -> None:
    hub.start_local(1, prefix="b")
    code = ("import sys\n"
            "print('text', flush=True)\n"
            "sys.stdout.buffer.write(b'caf\\xc3\\xa9 \\xff\\xfe end\\n')\n"
            "sys.stdout.buffer.write(b'\\xe2\\x82')\n"  # a character cut between two writes
            "n = sys.stdout.buffer.write(bytearray(b'\\xac\\n'))\n"
            "sys.stdout.buffer.flush()\n"
            "sys.stderr.buffer.write(b'err \\x80\\n')\n"
            "sys.stdout.buffer.write(b'\\xe2')\n"  # never finished
            "(n, sys.stdout.encoding)")
    e = hub.run(code, timeout=30, end_session=True)["b-1"]
    assert e.ok, e.error
    assert e.stdout == "text\ncafé \ufffd\ufffd end\n€\n\ufffd"
    assert e.stderr == "err \ufffd\n"
    assert e.value == [2, "utf-8"]


PNG = b"\x89PNG\r\n\x1a\n"


def test_png_displays_come_back_and_one_too_large_says_so(hub: odium.Hub) -> None:
    """IPython's display() in a cell: a PNG comes back as image/png (it came back as the text
    '<IPython.core.display.Image object>'); a 10 MB one is left out with a note giving its
    size, its text kept."""
    hub.start_local(1, prefix="p")
    small = PNG + bytes(range(256)) * 4
    code = ("import os\nfrom IPython.display import Image, display\n"
            f"display(Image(data={small!r}))\n"
            "display(Image(data=b'\\x89PNG\\r\\n\\x1a\\n' + os.urandom(10_000_000)))\n")
    e = hub.run(code, timeout=60, end_session=True)["p-1"]
    assert e.ok, e.error
    assert e.stdout == ""
    first, big = e.outputs
    assert base64.b64decode(first["data"]["image/png"]) == small
    assert "image/png" not in big["data"]
    size = len(base64.b64encode(PNG + bytes(10_000_000)).decode()) + 2  # as JSON: its quotes
    assert (f"[odium: its image/png ({size} characters) was not sent: a command's display "
            "outputs may take 8388608]") in big["data"]["text/plain"]
    assert refused(hub) == []


def test_a_shell_command_writing_without_newlines_streams_and_is_cut_with_a_note(
        hub: odium.Hub) -> None:
    """About 6 s of output with no newline, 9 MB in all: it streams while it runs (not all at
    the end), the hub answers another node meanwhile, and the result says it was cut."""
    hub.start_local(2, prefix="s")
    live: list[tuple[float, str]] = []
    code = "for i in $(seq 1 30); do head -c 300000 /dev/zero | tr '\\0' x; sleep 0.2; done"
    handle = hub.submit_broadcast(code, "s-1", shell=True, timeout=60, end_session=True,
                                  on_output=lambda n, s, text: live.append((time.monotonic(),
                                                                            text)))
    wait_until(lambda: live, 30, "the first output")
    assert answers_promptly(hub, "s-2") < 10
    e = handle.wait(60)["s-1"]
    done = time.monotonic()
    assert e.ok, (e.status, e.error)
    assert done - live[0][0] > 3  # streamed while it ran
    assert e.stdout == "x" * CAPTURE + (f"\n[odium: output cut at {CAPTURE} of 9000000 "
                                        "characters of stdout: a command keeps no more]\n")
    streamed = "".join(t for _, t in live)
    assert streamed.startswith("x" * CAPTURE) and "not shown while it runs" in streamed
    assert refused(hub) == []


def test_odium_run_on_5_nodes_printing_4_mb_each_answers_in_parts(hub: odium.Hub) -> None:
    """The whole result (20 MB) is over one message: the hub answers in parts and the
    command puts them together (it waited 50 s for an answer its socket had refused)."""
    hub.start_local(5, prefix="c")
    t = time.monotonic()
    p = odium_cli("run", "--home", str(hub.home), "--timeout", "20", "--json", "-c",
                  "print('y' * 4_000_000)", timeout=45)
    assert p.returncode == 0, p.stderr
    assert time.monotonic() - t < 30
    nodes = json.loads(p.stdout)["nodes"]
    assert sorted(nodes) == [f"c-{i}" for i in range(1, 6)]
    assert all(n["status"] == "ok" and n["stdout"] == "y" * 4_000_000 + "\n"
               for n in nodes.values())
    # as text too
    p = odium_cli("run", "--home", str(hub.home), "--timeout", "20", "-c",
                  "print('y' * 4_000_000)", timeout=45)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("y" * 4_000_000) == 5 and p.stdout.count("] ok ") == 5
    assert refused(hub) == []
