"""Progress where work is long: the text pieces, where it is shown (a terminal, not a pipe),
and the CLI's ``odium submit --wait`` and ``odium jobs --follow`` in a pseudo-terminal and in a
pipe. (The notebook's bars: tests/test_notebooks.py; a broadcast's live view:
tests/test_magics.py.)

Jobs that must wait for the test block on a file the test creates; nothing sleeps.
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

import odium
from odium.api.progress import JobBar, where
from odium.core.progress import Pacer, bar, counts_line, still_running, summary
from odium.errors import ConfigError

from .conftest import wait_until


def test_text_pieces() -> None:
    assert bar(0, 4, 8) == "[--------]" and bar(2, 4, 8) == "[####----]"
    assert bar(4, 4, 8) == "[########]" and bar(0, 0, 4) == "[####]"
    assert summary(3, 10) == "3 of 10 jobs done"
    assert summary(3, 10, "nodes", 1.25) == "3 of 10 nodes done · 1.2 s"
    assert still_running(["a", "b"]) == "a, b"
    assert still_running([f"n{i}" for i in range(12)], 3) == "n0, n1, n2, … (9 more)"
    assert counts_line({"done": 2, "running": 1, "queued": 0}, ["queued", "running", "done"],
                       2, 3) == "2 of 3 finished: 1 running, 2 done"
    p = Pacer(rate=10)
    assert p.due(100.0) and not p.due(100.05) and p.due(100.2)


def test_shown_on_a_terminal_only_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert where(False) is None
    monkeypatch.setattr(sys, "stderr", open(os.devnull, "w"))  # noqa: SIM115 - closed below
    try:
        assert where(None) is None  # not a terminal: nothing
        assert where(True) == "terminal"  # asked for
    finally:
        sys.stderr.close()
    with pytest.raises(ConfigError, match="True, False or None"):
        where("yes")  # type: ignore[arg-type]


def test_the_bar_refreshes_at_most_ten_times_a_second(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    b = JobBar("terminal", 10_000)
    values = list(b.follow(iter(range(10_000))))
    assert values == list(range(10_000))
    err = capsys.readouterr().err
    last = err.rsplit("\r", 1)[1]
    assert last.startswith(f"{bar(1, 1)} 10000 of 10000 jobs done · ") and last.endswith("\n")
    assert 2 <= err.count("\r") <= 12  # the first, a few while it ran, the last


# --- the CLI in a pseudo-terminal and in a pipe -----------------------------------------------


def blocked(flag: Path, value: int) -> str:
    return (f"import pathlib, time\nwhile not pathlib.Path({str(flag)!r}).exists():\n"
            f"    time.sleep(0.01)\n{value}")


class Pty:
    """The odium command with stdout and stderr on a pseudo-terminal; read as it writes."""

    def __init__(self, *args: str) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "-m", "odium", *args], stdin=slave,
                                     stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        self.out = b""

    def read(self) -> str:
        while select.select([self.master], [], [], 0)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # the other end closed (EIO)
                break
            if not chunk:
                break
            self.out += chunk
        return self.out.decode(errors="replace")

    def finish(self, timeout: float = 20.0) -> tuple[int, str]:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.read()
            select.select([self.master], [], [], 0.05)  # a wait for output, not a sleep
        rc = self.proc.wait(max(0.1, deadline - time.monotonic()))
        text = self.read()
        os.close(self.master)
        return rc, text

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def hub2(hub: odium.Hub) -> odium.Hub:
    hub.start_local(2, prefix="w", capacity=2)
    return hub


def test_submit_wait_shows_the_jobs_status_on_a_terminal_only(hub2: odium.Hub,
                                                              tmp_path: Path) -> None:
    flag = tmp_path / "go"
    code = blocked(flag, 42)
    term = Pty("submit", "--home", str(hub2.home), "--wait", "30", "-c", code)
    pipe = subprocess.Popen([sys.executable, "-m", "odium", "submit", "--home", str(hub2.home),
                             "--wait", "30", "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: " running on w" in term.read(), 20, "the status line")
        flag.touch()
        rc, text = term.finish()
        out, err = pipe.communicate(timeout=20)
    finally:
        term.kill()
        pipe.kill()
        pipe.wait()
    assert rc == 0 and "\r\x1b[K" in text and "=> 42" in text  # the line went, the result came
    assert pipe.returncode == 0 and "=> 42" in out
    assert err == "" and "\r" not in out and "running on" not in out


def test_jobs_follow_in_place_on_a_terminal_a_line_per_change_in_a_pipe(
        hub2: odium.Hub, tmp_path: Path) -> None:
    flag = tmp_path / "go"
    jobs = [hub2.submit(blocked(flag, i)) for i in range(3)]
    wait_until(lambda: sum(j.status == "running" for j in jobs) == 3, 20, "three running")
    args = ("jobs", "--home", str(hub2.home), "-n", "3", "--follow")
    term = Pty(*args)
    pipe = subprocess.Popen([sys.executable, "-m", "odium", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: "0 of 3 finished: 3 running" in term.read(), 20, "the counts")
        assert pipe.stdout is not None
        first = [pipe.stdout.readline() for _ in range(5)]  # the table, then the counts
        assert first[-1] == "0 of 3 finished: 3 running\n", first
        flag.touch()
        rc, text = term.finish()
        out, err = pipe.communicate(timeout=20)
    finally:
        term.kill()
        pipe.kill()
        pipe.wait()
    assert rc == 0 and "\r[########################] 3 of 3 finished: 3 done" in text
    assert pipe.returncode == 0 and err == ""
    assert "\r" not in out and "\x1b" not in out and "[#" not in out
    assert out.rstrip("\n").split("\n")[-1] == "3 of 3 finished: 3 done"


def test_jobs_follow_refuses_json(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "odium", "jobs", "--home", str(tmp_path),
                        "--follow", "--json"], capture_output=True, text=True, timeout=20)
    assert p.returncode == 1 and "--follow prints for people" in p.stderr
