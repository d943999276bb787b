"""Fixtures that own what they start: hubs, node processes, git repositories, raw sockets.

Every process and socket a fixture opens is closed at teardown, and teardown fails
loudly when a test leaked a process: a child, or an orphan (found by a tag in the
environment of every process the session starts), after each test and at the end of the
session. Nothing here sleeps to synchronise:
``wait_until`` polls a condition against a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq

import odium
from odium.api.hub import Hub

from .pgserver import PgServer, unavailable

HB = 0.2  # heartbeat interval used by tests: fast failure detection

# The hub's store, for the tests that run on both (``@both_stores``): SQLite in the hub's home
# (the default, and every other test's) and a fresh database on a real PostgreSQL server
STORES = ("sqlite", "postgresql")
both_stores = pytest.mark.parametrize("store_db", STORES, indirect=True)


def wait_until(pred: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
               interval: float = 0.01) -> Any:
    """Poll pred until it returns something truthy; fail with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# Every process started during this session carries this tag in its environment, so that a
# leak is found even once it is an orphan (its parent died; init, not pytest, is its parent).
SESSION_TAG = "ODIUM_TEST_SESSION"
_TAG = f"{os.getpid()}.{time.time_ns()}"
os.environ[SESSION_TAG] = _TAG


def _tagged() -> set[int]:
    """Live processes (not zombies) started during this session, wherever they are now."""
    needle = f"{SESSION_TAG}={_TAG}\0".encode()
    found = set()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
        except OSError:  # gone, or not ours to read
            continue
        if env.startswith(needle) or b"\0" + needle in env:
            found.add(int(entry))
    return found


def _children() -> set[int]:
    """This process's descendants, and the orphans it left (see SESSION_TAG)."""
    try:
        mine = {p.pid for p in psutil.Process().children(recursive=True)}
    except psutil.Error:
        mine = set()
    return mine | _tagged()


def _alive(pid: int) -> bool:
    """Running: not gone, and not a zombie (ended, its exit status not yet read)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _describe(pids: set[int]) -> str:
    out = []
    for pid in sorted(pids):
        try:
            p = psutil.Process(pid)
            out.append(f"{pid} (parent {p.ppid()}): {' '.join(p.cmdline())[:160]}")
        except psutil.Error:
            out.append(f"{pid}: gone")
    return "\n  ".join(out)


@pytest.fixture(scope="session", autouse=True)
def no_processes_left_behind() -> Iterator[None]:
    """When the session ends, every process it started has ended, orphans included; those
    still there after 10 s are killed and reported as an error."""
    yield
    deadline = time.monotonic() + 10
    left = _tagged()
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = _tagged()
    if not left:
        return
    described = _describe(left)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    raise AssertionError(f"the test session left {len(left)} process(es) behind (killed now):"
                         f"\n  {described}")


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    before = _children()
    yield
    deadline = time.monotonic() + 10
    leaked: set[int] = set()
    while time.monotonic() < deadline:
        leaked = {p for p in _children() - before if _alive(p)}
        if not leaked:
            return
        time.sleep(0.05)
    described = _describe(leaked)
    for pid in leaked:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    raise AssertionError(f"test leaked processes: {sorted(leaked)}\n  {described}")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A PostgreSQL server for the session (tests/pgserver.py), started when a test first
    needs it; skipped, with the reason, only where PostgreSQL or its driver is not installed."""
    why = unavailable()
    if why:
        pytest.skip(why)
    server = PgServer()
    try:
        server.init()
        server.start()
        yield server
    finally:
        try:
            if server.port and server.running():
                server.stop()
        finally:
            server.remove()


@pytest.fixture
def store_db(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """The URL of the test's store: None (SQLite in the hub's home) unless the test runs on
    PostgreSQL too (``@both_stores``): then a new database on the session's server, dropped
    after the test."""
    if getattr(request, "param", "sqlite") == "sqlite":
        yield None
        return
    server: PgServer = request.getfixturevalue("pg_server")
    with server.database() as url:
        yield url


@pytest.fixture
def zctx() -> Iterator[zmq.Context[Any]]:
    """A context for raw clients; every socket made on it is closed at teardown."""
    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def hub(tmp_path: Path, store_db: str | None) -> Iterator[Hub]:
    """An in-process hub on OS-chosen loopback ports with a fast heartbeat."""
    with odium.Hub(tmp_path / "hub", ports=0, hb_interval=HB, app=tmp_path, db=store_db) as h:
        yield h


@pytest.fixture
def hub4(hub: Hub) -> Hub:
    """The hub with four local node processes, all ready."""
    hub.start_local(4, prefix="n")
    return hub


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                          text=True, env={**os.environ, "GIT_AUTHOR_NAME": "t",
                                          "GIT_AUTHOR_EMAIL": "t@example.invalid",
                                          "GIT_COMMITTER_NAME": "t",
                                          "GIT_COMMITTER_EMAIL": "t@example.invalid"}).stdout


@pytest.fixture
def app_repo(tmp_path: Path) -> Path:
    """A real git repository with one commit: the application."""
    repo = tmp_path / "app"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "app.py").write_text("VALUE = 41\n")
    git(repo, "add", "app.py")
    git(repo, "commit", "-q", "-m", "first")
    return repo


def odium_cli(*args: str, timeout: float = 30.0, input: str | None = None,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the odium command as a user would, in a child process."""
    return subprocess.run([sys.executable, "-m", "odium", *args], capture_output=True,
                          text=True, timeout=timeout, input=input,
                          env={**os.environ, **(env or {})})


def end_process(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> None:
    """Signal a process and wait for it; SIGKILL it if it is still there after 10 s."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class HubProcess:
    """A hub run by ``odium hub`` in its own process (for CLI and restart tests)."""

    def __init__(self, home: Path, ports: str = "0", app: Path | None = None,
                 interface: str | None = None, db: str | None = None) -> None:
        self.home = home
        self.ports_arg = ports
        self.app = app
        self.interface = interface
        self.db = db
        self.proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 15.0) -> HubProcess:
        info = self.home / "hub.json"
        if info.exists():
            info.unlink()
        cmd = [sys.executable, "-m", "odium", "hub", "--home", str(self.home), "--ports",
               self.ports_arg, "--heartbeat", str(HB)]
        if self.app:
            cmd += ["--app", str(self.app)]
        if self.interface:
            cmd += ["--interface", self.interface]
        if self.db:
            cmd += ["--db", self.db]
        self.log = open(self.home.parent / f"{self.home.name}.log", "a")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        wait_until(lambda: info.exists() or self.proc.poll() is not None, timeout, "hub.json")
        assert self.proc.poll() is None, (self.home.parent / f"{self.home.name}.log").read_text()
        return self

    @property
    def info(self) -> dict[str, Any]:
        return json.loads((self.home / "hub.json").read_text())

    @property
    def ports(self) -> str:
        p = self.info["ports"]
        return ",".join(str(p[k]) for k in ("pub", "query", "jobs", "results"))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            end_process(self.proc, sig)
            self.log.close()
        self.proc = None


@pytest.fixture
def hub_process(tmp_path: Path, store_db: str | None) -> Iterator[HubProcess]:
    home = tmp_path / "hubhome"
    home.mkdir(mode=0o700)
    # the application is the test's own (unversioned) directory, like its nodes': the default
    # requirement is then "any", whatever the checkout the tests run from
    hp = HubProcess(home, app=tmp_path, db=store_db).start()
    yield hp
    hp.stop()


class NodeProcess:
    """A node run by ``odium node`` in its own process."""

    def __init__(self, home: Path, args: list[str]) -> None:
        self.home = home
        self.args = args
        self.logpath = home.parent / f"{home.name}.log"
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> NodeProcess:
        self.log = open(self.logpath, "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "odium", "node", "--home", str(self.home), *self.args],
            stdout=self.log, stderr=subprocess.STDOUT, text=True)
        return self

    def output(self) -> str:
        return self.logpath.read_text()

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        end_process(self.proc, sig)
        self.log.close()
        return self.proc.returncode


@pytest.fixture
def node_processes(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    started: list[NodeProcess] = []

    def start(name: str, *args: str) -> NodeProcess:
        home = tmp_path / f"node-{name}"
        np = NodeProcess(home, ["--name", name, *args]).start()
        started.append(np)
        return np

    yield start
    for np in started:
        np.stop()


@contextmanager
def odium_shell(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **env: str) -> Iterator[Any]:
    """A real IPython shell with ``%load_ext odium`` done: its hub on free ports, its home
    under ``tmp_path``, the ``ODIUM_*`` variables in ``env`` besides; unloaded (the hub and
    its local nodes stopped) at the end, whatever happened."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    import odium.jupyter

    for k, v in {"ODIUM_HOME": str(tmp_path / "home"), "ODIUM_PORTS": "0",
                 "ODIUM_HEARTBEAT": str(HB), **env}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("ODIUM_APP", raising=False)
    monkeypatch.chdir(tmp_path)
    ip = InteractiveShell.instance()
    with capture_output():
        ip.run_line_magic("load_ext", "odium")
    try:
        yield ip
    finally:
        ip.run_line_magic("unload_ext", "odium")
        assert odium.jupyter.current() is None

