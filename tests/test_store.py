"""The store: any SQLAlchemy URL, everything a broadcast leaves behind, bad URLs."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import text

import odium
from odium.errors import ConfigError
from odium.hub.store import Store

from .conftest import HB


def test_db_url_holds_keys_nodes_commands_results_and_events(tmp_path: Path) -> None:
    db = tmp_path / "elsewhere" / "odium.sqlite"
    db.parent.mkdir()
    with odium.Hub(tmp_path / "hub", ports=0, hb_interval=HB, db=f"sqlite:///{db}") as hub:
        hub.start_local(2, prefix="s")
        r = hub.run("print('hi'); 40 + 2", timeout=10)
        assert r.ok
        hub.core.store.flush()
        assert not (hub.home / "odium.db").exists()  # the URL was used, not the default
        live = sqlite3.connect(db)
        try:
            assert sorted(n for (n,) in live.execute("SELECT name FROM nodes")) == ["s-1", "s-2"]
            roles = {role for (role,) in live.execute("SELECT role FROM keys")}
            assert {"admin", "node"} <= roles
        finally:
            live.close()
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        rows = con.execute("SELECT node, status, stdout, value FROM results "
                           "WHERE command_id = ? ORDER BY node", (r.command,)).fetchall()
        assert rows == [("s-1", "ok", "hi\n", 42), ("s-2", "ok", "hi\n", 42)]
        cmd = con.execute("SELECT kind, code, status, targets FROM commands WHERE id = ?",
                          (r.command,)).fetchone()
        assert cmd[:3] == ("python", "print('hi'); 40 + 2", "ok")
        # local nodes the hub stopped itself are forgotten, with their keys
        assert list(con.execute("SELECT name FROM nodes")) == []
        assert "node" not in {role for (role,) in con.execute("SELECT role FROM keys")}
        kinds = {k for (k,) in con.execute("SELECT kind FROM events")}
        assert {"hub_start", "register", "node_ready", "command"} <= kinds
    finally:
        con.close()


def test_bad_db_url_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot use database"):
        Store("nosuchdialect://x")
    with pytest.raises(ConfigError, match="cannot open database"):
        Store(f"sqlite:///{tmp_path}/missing/dir/odium.db")


def test_writes_survive_a_bad_one(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path}/s.db")
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


@pytest.mark.parametrize("on_conflict", [True, False], ids=["on-conflict", "through-orm"])
def test_keys_nodes_and_states_change_only_what_is_given(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_conflict: bool) -> None:
    """put_key, put_node and put_state are upserts (one executemany for a join storm's
    thousands): a row is made with what is given, and later only what is given changes;
    a state's declaration is kept as first seen. Without ON CONFLICT (a database other than
    SQLite and PostgreSQL) the same through the ORM."""
    if not on_conflict:
        monkeypatch.setattr("odium.hub.store.upsert_statement", lambda *_a: None)
    store = Store(f"sqlite:///{tmp_path}/s.db")
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
            assert list(s.execute(text("SELECT state, declaration FROM states"))) == [
                ("s1", '{"first": 1}')]
    finally:
        store.close()
