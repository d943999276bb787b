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
