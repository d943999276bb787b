"""The store: any SQLAlchemy URL (SQLite and a real PostgreSQL server), everything a broadcast
leaves behind, bad URLs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import Connection, create_engine, select, text

import odium
from odium.errors import ConfigError
from odium.hub.jobsql import JOB_COLS
from odium.hub.store import CommandRow, JobRow, ResultRow, Store
from odium.hub.storedb import NUL_STORED_AS

from .conftest import HB, both_stores


@both_stores
def test_db_url_holds_keys_nodes_commands_results_and_events(
        tmp_path: Path, store_db: str | None) -> None:
    """The URL given is the store (a file elsewhere, or a PostgreSQL database), read here by
    another connection while the hub runs and after it stopped."""
    db = tmp_path / "elsewhere" / "odium.sqlite"
    db.parent.mkdir()
    url = store_db or f"sqlite:///{db}"
    with odium.Hub(tmp_path / "hub", ports=0, hb_interval=HB, db=url) as hub:
        hub.start_local(2, prefix="s")
        r = hub.run("print('hi'); 40 + 2", timeout=10)
        assert r.ok
        hub.core.store.flush()
        assert not (hub.home / "odium.db").exists()  # the URL was used, not the default
        with reader(url) as live:
            assert sorted(n for (n,) in live.execute(text("SELECT name FROM nodes"))) == [
                "s-1", "s-2"]
            roles = {role for (role,) in live.execute(text("SELECT role FROM keys"))}
            assert {"admin", "node"} <= roles
    with reader(url) as con:
        if not store_db:
            assert con.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        rows = con.execute(text("SELECT node, status, stdout, value FROM results "
                                "WHERE command_id = :c ORDER BY node"), {"c": r.command}).all()
        assert [tuple(row) for row in rows] == [("s-1", "ok", "hi\n", 42),
                                                ("s-2", "ok", "hi\n", 42)]
        cmd = con.execute(text("SELECT kind, code, status, targets FROM commands WHERE id = :c"),
                          {"c": r.command}).one()
        assert tuple(cmd[:3]) == ("python", "print('hi'); 40 + 2", "ok")
        # local nodes the hub stopped itself are forgotten, with their keys
        assert list(con.execute(text("SELECT name FROM nodes"))) == []
        assert "node" not in {role for (role,) in con.execute(text("SELECT role FROM keys"))}
        kinds = {k for (k,) in con.execute(text("SELECT kind FROM events"))}
        assert {"hub_start", "register", "node_ready", "command"} <= kinds


@contextmanager
def reader(url: str) -> Iterator[Connection]:
    """Another connection to the store's database (not the store's own engine)."""
    engine = create_engine(url)
    try:
        with engine.connect() as c:
            yield c
    finally:
        engine.dispose()


def test_bad_db_url_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot use database"):
        Store("nosuchdialect://x")
    with pytest.raises(ConfigError, match="cannot open database"):
        Store(f"sqlite:///{tmp_path}/missing/dir/odium.db")


@both_stores
def test_writes_survive_a_bad_one(tmp_path: Path, store_db: str | None) -> None:
    store = Store(store_db or f"sqlite:///{tmp_path}/s.db")
    try:
        store.event("first", "kept")

        def broken(s: object) -> None:
            raise RuntimeError("not an SQLAlchemy error, but the writer must live on")

        store.write(lambda s: s.execute(text("INSERT INTO nope VALUES (1)")))
        store.write(broken)
        store.event("second", "kept too")
        store.flush()
        kinds = [e.kind for e in store.events(10)]
        assert kinds == ["first", "second"]
    finally:
        store.close()


@both_stores
@pytest.mark.parametrize("on_conflict", [True, False], ids=["on-conflict", "through-orm"])
def test_keys_nodes_and_states_change_only_what_is_given(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_conflict: bool,
        store_db: str | None) -> None:
    """put_key, put_node and put_state are upserts (one executemany for a join storm's
    thousands): a row is made with what is given, and later only what is given changes;
    a state's declaration is kept as first seen. Without ON CONFLICT (a database other than
    SQLite and PostgreSQL) the same through the ORM."""
    if not on_conflict:
        monkeypatch.setattr("odium.hub.store.upsert_statement", lambda *_a: None)
    store = Store(store_db or f"sqlite:///{tmp_path}/s.db")
    try:
        store.put_key("k" * 43, "token", name="t", note="for the lab", expires=5.0)
        store.put_node("n1", key_id="k" * 43, status="connecting", host="pc1", capacity=4)
        store.put_state("s1", {"first": 1})
        store.flush()
        for i in range(3):  # several of one shape in one batch, and the others between them
            store.put_node(f"m{i}", key_id="m" * 43, status="connecting")
            store.put_node("n1", status="ready")
        store.put_key("k" * 43, "used")
        store.put_state("s1", {"second": 2})
        store.put_node("n1", state="s1", info={"parts": [1]})
        store.flush()
        (key,) = [k for k in store.keys() if k.key_id == "k" * 43]
        assert (key.role, key.name, key.note, key.expires) == ("used", "t", "for the lab", None)
        nodes = {n.name: n for n in store.nodes()}
        assert sorted(nodes) == ["m0", "m1", "m2", "n1"]
        n1 = nodes["n1"]
        assert (n1.key_id, n1.status, n1.host, n1.capacity, n1.state, n1.info) == (
            "k" * 43, "ready", "pc1", 4, "s1", {"parts": [1]})
        assert n1.first_seen == n1.last_seen > 0
        with store.session() as s:
            (row,) = s.execute(text("SELECT state, declaration FROM states"))
            assert row[0] == "s1"  # (SQLite gives the JSON's text, PostgreSQL's driver its value)
            assert row[1] in ('{"first": 1}', {"first": 1})
    finally:
        store.close()


@both_stores
def test_long_strings_and_nul_are_stored(tmp_path: Path, store_db: str | None) -> None:
    """What SQLite stores, PostgreSQL stores too: strings longer than the models' sizes (a
    command to a long list of nodes, a long note), and output with NUL in it (PostgreSQL's
    text cannot hold one: it is stored as U+2400), on the ORM's path and the job queue's."""
    store = Store(store_db or f"sqlite:///{tmp_path}/s.db")
    nodes = ",".join(f"node-{i:05d}" for i in range(1000))
    nul = "" if store_db is None else NUL_STORED_AS  # what a NUL reads back as
    try:
        store.put_key("k" * 43, "token", note="n" * 1000)
        store.insert(CommandRow, dict(id="c1", seq=1, kind="python", code="1", session="s",
                                      nodes=nodes, targets=[], issuer="i", state="unknown",
                                      created=1.0))
        store.insert(ResultRow, dict(command_id="c1", node="a", status="ok", stdout="a\0b"))
        done, failed = [], []
        job = {c: None for c in JOB_COLS} | dict(
            id="j1", seq=1, kind="python", code="1", nodes=nodes, retries=0, require="any",
            issuer="", status="failed", node="a", attempts=1, created=1.0, updated=1.0,
            result={"error": {"evalue": "e\0f"}}, reason="ValueError: e\0f")
        store.write_jobs([tuple(job[c] for c in JOB_COLS)], [],
                         [(1, "j1", 1.0, "", "failed", "a", "why\0")], [],
                         lambda: done.append(1), lambda: failed.append(1))
        store.flush()
        assert (done, failed, store.health()["dropped"]) == ([1], [], 0)
        assert [k.note for k in store.keys()] == ["n" * 1000]
        with store.session() as s:
            assert s.get(CommandRow, "c1").nodes == nodes  # type: ignore[union-attr]
            assert s.scalar(select(ResultRow.stdout)) == f"a{nul or chr(0)}b"
            row = s.scalar(select(JobRow))
            assert row is not None and row.nodes == nodes
            assert row.reason == f"ValueError: e{nul or chr(0)}f"
            assert row.result == {"error": {"evalue": "e\0f"}}  # (JSON: escaped, kept as is)
        assert [e.detail for e in store.job_events("j1")] == [f"why{nul or chr(0)}"]
    finally:
        store.close()
