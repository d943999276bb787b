"""Store faults on real files: a full disk (a real 2 MiB tmpfs), a database locked by another
process (``BEGIN EXCLUSIVE`` held), the file deleted while the hub runs, a damaged file at
start. The hub keeps serving what it can, says what it cannot store (``Store.health``, the
log, the event log), and never acknowledges to a node a result it did not store: the node
keeps it and sends it again, and no job runs twice.

Hubs are real (in this process), nodes are real processes, acknowledgements are watched on
the hub's real PUB socket with a trusted key (tests/raw.py). docs/faults.md lists what
each test covers.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, make_url, select

import odium
from odium.core import wire as P
from odium.core.keys import Identity
from odium.errors import ConfigError, OdiumError
from odium.hub.store import CommandRow, ResultRow, Store

from .conftest import HB, NodeProcess, odium_cli, wait_until
from .pgserver import PgServer
from .raw import Raw

pytestmark = pytest.mark.timeout(90)

LEFT_FREE = 300 * 1024  # what the ballast leaves free on the tmpfs: a few hundred results
RESULT = 1500  # bytes in each job's result: the results outgrow LEFT_FREE


# --- the real faults ---------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB tmpfs mounted for the test (root only), always unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=True)


def map_on_a_full_disk(zctx: Any, hub: odium.Hub, tmpfs: Path, ran: Path, n: int
                       ) -> tuple[AckWatch, Path, Any]:
    """Watch the acknowledgements, fill the disk, map ``n`` jobs: their values come back
    (from memory) and the store says it is full. The watch, the ballast, the store."""
    acks = AckWatch(zctx, hub)
    ballast = fill(tmpfs)
    values = list(hub.map(job_fn(ran), range(n), timeout=60))
    assert [v[0] for v in values] == [2 * i for i in range(n)]
    store = hub.core.store
    wait_until(lambda: "disk is full" in store.problem, 10, "the store to say it is full")
    return acks, ballast, store


def fill(mnt: Path) -> Path:
    """A ballast file that leaves LEFT_FREE bytes on the filesystem; delete it to free space."""
    st = os.statvfs(mnt)
    ballast = mnt / "ballast"
    with open(ballast, "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - LEFT_FREE))
    return ballast


class Holder:
    """Another process (python's sqlite3) holding ``BEGIN EXCLUSIVE`` on a database until it
    is told to commit."""

    def __init__(self, db: Path) -> None:
        code = ("import sqlite3, sys\n"
                f"c = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
                "c.execute('BEGIN EXCLUSIVE')\n"
                "print('held', flush=True)\n"
                "sys.stdin.readline()\n"
                "c.execute('COMMIT')\n"
                "print('released', flush=True)\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "held"

    def release(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "released"
        assert self.proc.wait(10) == 0

    def end(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def holder() -> Iterator[Callable[[Path], Holder]]:
    made: list[Holder] = []

    def hold(db: Path) -> Holder:
        made.append(Holder(db))
        return made[-1]

    yield hold
    for h in made:
        h.end()


# --- what the test reads ---------------------------------------------------------------------


class AckWatch:
    """The job acknowledgements the hub publishes, as a trusted subscriber receives them."""

    def __init__(self, zctx: Any, hub: odium.Hub) -> None:
        self.ident = Identity.generate()
        hub.trust(self.ident.key_id, "ackwatch")
        self.sub = Raw(zctx, hub, "pub", self.ident)
        assert self.sub.handshake() == "ok"
        wait_until(lambda: self.sub.recv(1.0), 5, "a heartbeat on PUB")
        self.acked: set[str] = set()

    def take(self, listen: float = 0.0) -> set[str]:
        """The job ids acknowledged since the last call; ``listen``: go on listening that long
        (to see that something does not come)."""
        raws = self.sub.pending()
        deadline = time.monotonic() + listen
        while (left := deadline - time.monotonic()) > 0:
            got = self.sub.recv(left)
            if got is not None:
                raws.append(got)
        new: set[str] = set()
        for raw in raws:
            msg = P.open_message(raw, self.sub.vk, self.sub.hub_key)
            if msg.type == "job_ack":
                for ids in msg.body.acks.values():  # type: ignore[attr-defined]
                    new.update(ids)
        self.acked |= new
        return new

    def all_of(self, n: int) -> bool:
        self.take()
        return len(self.acked) == n


def stored(db: Path) -> dict[str, str]:
    """Job id -> status, as another connection reads them from the file now."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        return dict(c.execute("SELECT id, status FROM jobs").fetchall())


def runs(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def job_fn(runs_file: Path) -> Callable[[int], tuple[int, str]]:
    """A job that records each run of it (O_APPEND: whole lines from any process)."""
    where = str(runs_file)

    def job(x: int) -> tuple[int, str]:
        with open(where, "a") as f:
            f.write(f"{x}\n")
        return x * 2, "r" * RESULT

    return job


def store_events(hub: odium.Hub) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in hub.log(500):
        if e["kind"].startswith("store_"):
            out.setdefault(e["kind"], []).append(f"{e['level']}: {e['detail']}")
    return out


# --- a full disk -----------------------------------------------------------------------------


def test_full_disk_holds_results_unacked_until_space_is_freed(
        tmp_path: Path, tmpfs: Path, zctx: Any) -> None:
    """A big map fills the disk: the values still come back (from memory), the store says it
    is full, no result it has not stored is acknowledged (the nodes send them again); once
    space is freed every result is stored, acknowledged, and no job ran twice."""
    db, ran, n = tmpfs / "odium.db", tmp_path / "runs", 300
    with odium.Hub(tmp_path / "hub", ports=0, hb_interval=HB, app=tmp_path,
                   db=f"sqlite:///{db}") as hub:
        hub.start_local(2, prefix="f")
        acks, ballast, store = map_on_a_full_disk(zctx, hub, tmpfs, ran, n)
        health = store.health()
        assert not health["ok"] and health["waiting"] > 0 and health["since"], health
        # longer than a node waits before it sends an unacknowledged result again
        for _ in range(2):
            got = acks.take(listen=1.6)
            done = {j for j, s in stored(db).items() if s == "done"}
            assert got <= done, f"{len(got - done)} result(s) acknowledged but not stored"
        assert len(done) < n, "the disk never filled up: nothing was tested"

        ballast.unlink()
        wait_until(lambda: not store.problem, 15, "the store to write again")
        wait_until(lambda: set(stored(db).values()) == {"done"} and len(stored(db)) == n,
                   15, "every result in the file")
        wait_until(lambda: acks.all_of(n), 15, "every result acknowledged")
        assert store.health()["dropped"] == 0
        events = store_events(hub)
        assert [e.split(":")[0] for e in events["store_fault"]] == ["error"], events
        assert "disk is full" in events["store_fault"][0]
        assert "store_recovered" in events, events
    assert sorted(map(int, runs(ran))) == list(range(n)), "a job ran twice, or not at all"


def test_hub_stopped_on_a_full_disk_loses_no_result(
        tmp_path: Path, tmpfs: Path, node_processes: Callable[..., NodeProcess],
        zctx: Any) -> None:
    """The hub runs on a full disk for a while (nodes send their results again) and stops:
    what it could not store it gives up, loudly, and it had acknowledged none of it; started
    again with space, the nodes send those results again and each job ran once."""
    db, ran, n = tmpfs / "odium.db", tmp_path / "runs", 200
    home = tmp_path / "hub"
    with odium.Hub(home, ports=0, hb_interval=HB, app=tmp_path, db=f"sqlite:///{db}") as hub:
        for name in ("s1", "s2"):
            node_processes(name, "--token", hub.token(), "--app", str(tmp_path),
                           "--capacity", "2")
        hub.wait_for_nodes(["s1", "s2"], 30)
        ports = dict(hub.ports)
        acks, ballast, store = map_on_a_full_disk(zctx, hub, tmpfs, ran, n)
        got = acks.take(listen=2.5)  # longer than a node waits to send a result again
        done = {j for j, s in stored(db).items() if s == "done"}
        assert got <= done, f"{len(got - done)} result(s) acknowledged but not stored"
    assert store.health()["abandoned"] > 0, store.health()
    assert sum(s == "done" for s in stored(db).values()) < n, "nothing was tested"

    ballast.unlink()
    with odium.Hub(home, ports=ports, hb_interval=HB, app=tmp_path,
                   db=f"sqlite:///{db}") as hub:
        wait_until(lambda: list(stored(db).values()).count("done") == n, 30,
                   "the nodes' results stored after the restart")
        assert sorted(map(int, runs(ran))) == list(range(n)), "a job ran twice, or not at all"
        assert not hub.core.store.problem


# --- a locked database -----------------------------------------------------------------------


def test_locked_database_holds_writes_and_loses_none(
        tmp_path: Path, holder: Callable[[Path], Holder]) -> None:
    """Another process holds ``BEGIN EXCLUSIVE``: broadcasts still run, the store says it is
    locked and keeps trying; once the lock goes, the command, its results and the jobs are
    all in the file."""
    with odium.Hub(tmp_path / "hub", ports=0, hb_interval=HB, app=tmp_path) as hub:
        hub.start_local(2, prefix="l")
        db = hub.home / "odium.db"
        lock = holder(db)
        r = hub.run("6 * 7", timeout=10)
        assert r.ok and set(r.values()) == {42}
        jobs = [hub.submit(f"{i} * 2") for i in range(20)]
        store = hub.core.store
        wait_until(lambda: "locked" in store.problem, 10, "the store to say it is locked")
        assert store.health()["waiting"] > 0
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:  # readers still read
            assert c.execute("SELECT count(*) FROM commands WHERE id = ?",
                             (r.command,)).fetchone() == (0,)
        # it keeps at it while the lock is held (each try waits out SQLite's busy timeout)
        wait_until(lambda: store.health()["failed"] >= 2, 15, "a second try, locked again")
        assert "locked" in store.problem
        with odium.Admin(hub.home) as admin, pytest.raises(OdiumError, match="cannot store"):
            admin.submit("1 + 1")  # what it cannot store now, it says (the CLI prints it)
        listed = odium_cli("nodes", "--home", str(hub.home))  # and odium nodes says so
        assert listed.returncode == 0 and "the hub cannot store: the database is locked" in \
            listed.stderr, listed.stderr
        assert hub.store_health()["problem"] == store.problem
        lock.release()
        assert [j.result(30) for j in jobs] == [2 * i for i in range(20)]
        wait_until(lambda: not store.problem, 10, "the store to write again")

        def in_file() -> bool:
            with sqlite3.connect(db) as c:
                cmd = c.execute("SELECT status FROM commands WHERE id = ?",
                                (r.command,)).fetchall()
                res = c.execute("SELECT count(*) FROM results WHERE command_id = ?",
                                (r.command,)).fetchone()[0]
                done = c.execute("SELECT count(*) FROM jobs WHERE status = 'done'").fetchone()
            return cmd == [("ok",)] and res == 2 and done == (20,)

        wait_until(in_file, 10, "the command, its results and the jobs in the file")
        assert store.health()["dropped"] == 0
        events = store_events(hub)
        assert "locked" in events["store_fault"][0] and "store_recovered" in events, events


# --- the file deleted while the hub runs ---------------------------------------------------------


def test_deleted_database_is_noticed_and_saved(tmp_path: Path) -> None:
    """The file is deleted under a running hub: the store says so within a few seconds, holds
    its writes, saves a copy of what it still sees; that copy, put in place, starts the hub
    again with every key (instead of an empty store and every node key gone)."""
    home = tmp_path / "hub"
    watcher = Identity.generate()
    with odium.Hub(home, ports=0, hb_interval=HB, app=tmp_path) as hub:
        hub.start_local(1, prefix="d")
        hub.trust(watcher.key_id, "kept")
        before = hub.run("1 + 1", timeout=10)
        hub.core.store.flush()
        db = hub.home / "odium.db"
        db.unlink()
        store = hub.core.store
        wait_until(lambda: "deleted" in store.problem, 5, "the store to notice")
        assert hub.run("2 + 2", timeout=10).ok  # broadcasts still run
        assert [n["status"] for n in hub.nodes()] == ["ready"]
        copies = list(home.glob("odium.db.saved-*"))
        assert len(copies) == 1 and str(copies[0]) in store.problem, store.problem
    assert not db.exists()
    copies[0].rename(db)
    with odium.Hub(home, ports=0, hb_interval=HB, app=tmp_path) as hub:
        assert watcher.key_id in {k.key_id for k in hub.core.store.keys()}
        with sqlite3.connect(db) as c:
            assert c.execute("SELECT status FROM commands WHERE id = ?",
                             (before.command,)).fetchall() == [("ok",)]
        assert not hub.core.store.problem


# --- a damaged file at start ---------------------------------------------------------------------


def damage(db: Path, pages: int = 8) -> None:
    """Random bytes over the file's last pages (its header and schema intact: it opens)."""
    with open(db, "r+b") as f:
        size = os.path.getsize(db)
        for off in range(max(3 * 4096, size - pages * 4096), size, 4096):
            f.seek(off)
            f.write(os.urandom(4096))


def test_database_damaged_while_running_holds_writes_and_says_so(tmp_path: Path) -> None:
    """Pages of the file are damaged under a running hub: the store says so, holds what it
    cannot write (nothing is dropped), and the hub still answers."""
    with odium.Hub(tmp_path / "hub", ports=0, hb_interval=HB, app=tmp_path) as hub:
        store = hub.core.store
        for i in range(300):
            store.event("filler", f"{i} " + "x" * 500)
        store.flush()
        with store.engine.connect() as c:  # everything in the main file, none in the log
            assert c.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").scalar() == 0
        damage(hub.home / "odium.db", pages=1000)
        for i in range(50):
            store.event("more", f"{i} " + "y" * 500)
        wait_until(lambda: "damaged" in store.problem, 10, "the store to say it is damaged")
        health = store.health()
        assert health["waiting"] >= 50 and health["dropped"] == 0, health
        assert hub.nodes() == []  # the hub answers (what it has in memory)


def test_damaged_database_at_start_is_one_clear_line(tmp_path: Path) -> None:
    """A file whose pages are damaged (its header intact, so it opens): the hub does not
    start on it; the command says so in one line, with the path and what to do."""
    home = tmp_path / "hub"
    with odium.Hub(home, ports=0, hb_interval=HB, app=tmp_path) as hub:
        for i in range(200):
            hub.core.store.event("filler", f"{i} " + "x" * 500)
        hub.core.store.flush()
    db = home / "odium.db"
    damage(db)
    with pytest.raises(ConfigError, match="damaged"):
        Store(f"sqlite:///{db}")
    p = subprocess.run([sys.executable, "-m", "odium", "hub", "--home", str(home), "--ports",
                        "0", "--app", str(tmp_path)], capture_output=True, text=True,
                       timeout=30)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode != 0 and len(lines) == 1, p.stderr
    assert str(db) in lines[0] and "damaged" in lines[0] and "move it away" in lines[0]
    db.write_bytes(b"not a database at all\n" * 100)
    with pytest.raises(ConfigError, match="damaged"):
        Store(f"sqlite:///{db}")


# --- a database server stopped while the hub runs ------------------------------------------------


@pytest.mark.parametrize("store_db", ["postgresql"], indirect=True)
def test_database_server_stopped_holds_writes_and_loses_none(
        tmp_path: Path, zctx: Any, pg_server: PgServer, store_db: str) -> None:
    """The PostgreSQL server is stopped under a running hub (its connections cut) while jobs
    run: their values still come back, a broadcast still runs, the store says the server is
    gone, acknowledges no result and takes no new job from an admin; the server started
    again, everything is stored (nothing dropped), acknowledged, and no job ran twice."""
    flag, ran, n = tmp_path / "go", tmp_path / "runs", 6
    code = (f"import pathlib, time\nwith open({str(ran)!r}, 'a') as f: f.write(f'{{args[0]}}\\n')\n"
            f"while not pathlib.Path({str(flag)!r}).exists(): time.sleep(0.01)\nargs[0] * 2")
    try:
        with odium.Hub(tmp_path / "hub", ports=0, hb_interval=HB, app=tmp_path,
                       db=store_db) as hub:
            hub.start_local(2, prefix="p", capacity=3)
            acks = AckWatch(zctx, hub)
            jobs = [hub.submit(code, i) for i in range(n)]
            wait_until(lambda: len(runs(ran)) == n, 20, "every job running")
            store = hub.core.store
            store.flush()
            pg_server.stop()
            flag.touch()
            assert [j.result(30) for j in jobs] == [2 * i for i in range(n)]
            r = hub.run("6 * 7", timeout=10)
            assert r.ok and set(r.values()) == {42}
            wait_until(lambda: "database server" in store.problem, 10,
                       "the store to say the server is gone")
            assert not acks.take(listen=1.6), "a result acknowledged that was not stored"
            health = store.health()
            assert health["waiting"] > 0 and health["dropped"] == 0, health
            with odium.Admin(hub.home) as admin, pytest.raises(OdiumError, match="cannot store"):
                admin.submit("1 + 1")

            pg_server.start()
            wait_until(lambda: not store.problem, 15, "the store to write again")
            wait_until(lambda: acks.all_of(n), 15, "every result acknowledged")
            assert store.health()["dropped"] == 0
            other = Store(store_db)  # another engine: what the database holds
            try:
                statuses = {j.id: j.status for j in other.job_rows([j.id for j in jobs])}
                assert statuses == {j.id: "done" for j in jobs}
                with other.session() as s:
                    assert s.get(CommandRow, r.command).status == "ok"  # type: ignore[union-attr]
                    assert s.scalar(select(func.count()).select_from(ResultRow).where(
                        ResultRow.command_id == r.command)) == 2
            finally:
                other.close()
            events = store_events(hub)
            assert "database server" in events["store_fault"][0], events
            assert "store_recovered" in events, events
        assert sorted(map(int, runs(ran))) == list(range(n)), "a job ran twice, or not at all"
    finally:
        if not pg_server.running():
            pg_server.start()


@pytest.mark.parametrize("store_db", ["postgresql"], indirect=True)
def test_tables_locked_on_the_server_hold_writes_and_lose_none(
        tmp_path: Path, store_db: str) -> None:
    """Another session holds EXCLUSIVE locks on the store's tables (reads go on, writes
    wait): broadcasts still run, after the lock timeout the store says so and keeps trying
    (instead of waiting for ever, PostgreSQL's default); once the locks go, the command, its
    results and the jobs are all in."""
    import psycopg

    conninfo = make_url(store_db).set(drivername="postgresql").render_as_string(False)
    with odium.Hub(tmp_path / "hub", ports=0, hb_interval=HB, app=tmp_path,
                   db=store_db) as hub, psycopg.connect(conninfo) as other:
        hub.start_local(2, prefix="l")
        store = hub.core.store
        store.flush()
        other.execute("LOCK TABLE commands, results, jobs, job_events, events IN EXCLUSIVE MODE")
        r = hub.run("6 * 7", timeout=10)
        assert r.ok and set(r.values()) == {42}
        jobs = [hub.submit(f"{i} * 2") for i in range(20)]
        wait_until(lambda: "lock timeout" in store.problem, 10, "the store to say it waits")
        assert store.health()["waiting"] > 0
        wait_until(lambda: store.health()["failed"] >= 2, 15, "a second try, locked again")
        other.rollback()  # the locks go
        assert [j.result(30) for j in jobs] == [2 * i for i in range(20)]
        wait_until(lambda: not store.problem, 10, "the store to write again")
        other.autocommit = True

        def stored() -> bool:
            cmd = other.execute("SELECT status FROM commands WHERE id = %s",
                                (r.command,)).fetchall()
            res = other.execute("SELECT count(*) FROM results WHERE command_id = %s",
                                (r.command,)).fetchone()
            done = other.execute("SELECT count(*) FROM jobs WHERE status = 'done'").fetchone()
            return cmd == [("ok",)] and res == (2,) and done == (20,)

        wait_until(stored, 10, "the command, its results and the jobs stored")
        assert store.health()["dropped"] == 0
        events = store_events(hub)
        assert "lock timeout" in events["store_fault"][0] and "store_recovered" in events
