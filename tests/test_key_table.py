"""Key ids that have a key's shape (43 base64url characters) but are no Ed25519 public key: every
way one comes in (the API, the CLI, an admin request, a join, a token, the store) refuses it at
once with a clear error, and the hub's key table stays whole: it still issues tokens and starts
local nodes afterwards.
"""

from __future__ import annotations

import random
import re
import sqlite3
import time
from pathlib import Path

import pytest
from nacl import bindings

import odium
from odium.core import wire as P
from odium.core.keys import Identity, Token, check_key_id
from odium.hub import keytable as hub_module

from .conftest import HubProcess, odium_cli
from .raw import Raw, events

SAYS = "not a valid Ed25519 public key"


def not_a_point(seed: int = 9) -> str:
    """A key id of the right shape whose 32 bytes are no point on the curve (libsodium's
    Ed25519 -> X25519 conversion fails on it, as on most random bytes)."""
    rng = random.Random(seed)
    while True:
        raw = rng.randbytes(32)
        if bindings.crypto_core_ed25519_is_valid_point(raw):
            continue
        try:
            bindings.crypto_sign_ed25519_pk_to_curve25519(raw)
        except Exception:  # noqa: BLE001 - what the hub used to meet deep inside
            key = P.b64url(raw)
            assert re.fullmatch(P.KEY_RE, key)
            return key


BAD = not_a_point()


def still_whole(hub: odium.Hub) -> None:
    """The key table works: a token is issued, a local node is trusted, starts and runs."""
    assert hub.token().startswith("odt1.")
    hub.start_local(1, prefix="after")
    assert hub.run("6 * 7", nodes="after-1", timeout=15)["after-1"].value == 42


def test_check_key_id_wants_a_real_point() -> None:
    good = Identity.generate().key_id
    assert check_key_id(good) == good
    with pytest.raises(odium.ConfigError, match=SAYS):
        check_key_id(BAD)
    with pytest.raises(odium.ConfigError, match="43 base64url characters"):
        check_key_id(BAD[:-1])


def test_trust_refuses_a_non_point_at_once_and_the_table_stays_whole(hub: odium.Hub) -> None:
    with pytest.raises(odium.ConfigError, match=SAYS):
        hub.trust(BAD, "bad")
    assert BAD not in {k["key"] for k in hub.keys()}
    still_whole(hub)


def test_a_failing_key_change_leaves_the_table_as_it_was(hub: odium.Hub,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever fails while the key table is rebuilt (here the CURVE conversion of one key),
    nothing changes: the old table and its index stay in force together."""
    doomed = Identity.generate().key_id
    real = hub_module.curve_public

    def curve_public(key_id: str) -> bytes:
        if key_id == doomed:
            raise RuntimeError("conversion failed")
        return real(key_id)

    monkeypatch.setattr(hub_module, "curve_public", curve_public)
    before = dict(hub.core.keys)
    with pytest.raises(RuntimeError, match="conversion failed"):
        hub.trust(doomed, "doomed")
    assert hub.core.keys == before
    still_whole(hub)  # (with the failing conversion still in place)


def test_admin_request_with_a_non_point_is_answered_at_once(hub: odium.Hub, zctx) -> None:
    ident = Identity.generate()
    hub.trust(ident.key_id, "boss", role="admin")
    admin = Raw(zctx, hub, "query", ident)
    for action in ("accept", "reject", "revoke"):
        mid = P.new_id()
        t = time.monotonic()
        msg = admin.request(admin.seal("key", P.KeyAction(action, BAD),  # type: ignore[arg-type]
                                       msg_id=mid), timeout=5)
        assert time.monotonic() - t < 2
        assert (msg.type, msg.env.re) == ("error", mid), msg
        assert msg.body.kind == "ConfigError", msg.body  # type: ignore[attr-defined]
        assert SAYS in msg.body.message  # type: ignore[attr-defined]
    admin.ping()
    still_whole(hub)


def test_join_with_a_non_point_key_is_refused_at_decode(hub: odium.Hub, zctx) -> None:
    tok = Token.decode(hub.token())
    raw = Raw(zctx, hub, "query", tok.identity)
    proof = P.b64url(bytes(64))
    msg = raw.request(raw.seal("join", P.Join(tok.token_id, BAD, "sneaky", proof)))
    assert msg.type == "error", msg
    assert msg.body.kind == "ProtocolError", msg.body  # type: ignore[attr-defined]
    assert "not an Ed25519 public key" in msg.body.message  # type: ignore[attr-defined]
    assert BAD not in hub.core.keys
    still_whole(hub)


def test_token_with_a_non_point_hub_key_is_refused() -> None:
    tok = Token.new("tcp://127.0.0.1:1", Identity.generate().key_id, 60)
    spoiled = Token(tok.address, BAD, tok.token_id, tok.seed, tok.expires).encode()
    with pytest.raises(odium.ConfigError, match=SAYS):
        Token.decode(spoiled)


def test_stored_non_point_is_dropped_when_the_hub_starts(tmp_path: Path) -> None:
    """A key table written before this check (or by hand) with a bad key in it: the hub starts,
    says so, and works."""
    home = tmp_path / "hub"
    with odium.Hub(home, ports=0, app=tmp_path):
        pass
    with sqlite3.connect(home / "odium.db") as db:
        db.execute("INSERT INTO keys (key_id, role, name, address, created, updated, note) "
                   "VALUES (?, 'node', 'old', '', 0, 0, '')", (BAD,))
    with odium.Hub(home, ports=0, app=tmp_path) as hub:
        assert BAD not in hub.core.keys
        assert [e for e in events(hub, "key_dropped") if BAD in e["detail"]]
        still_whole(hub)


def test_cli_keys_accept_of_a_non_point_fails_at_once(hub_process: HubProcess) -> None:
    """``odium keys accept BAD``: a one-line error at once (not a 10 s wait for nothing), and
    the hub still issues tokens and lists its keys."""
    h = str(hub_process.home)
    t = time.monotonic()
    p = odium_cli("keys", "accept", BAD, "--home", h, timeout=20)
    took = time.monotonic() - t
    assert p.returncode != 0, p
    assert SAYS in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert took < 8, took  # the admin's own deadline is 10 s
    tok = odium_cli("token", "--home", h, timeout=20)
    assert tok.returncode == 0 and "odt1." in tok.stdout, tok
    keys = odium_cli("keys", "list", "--home", h, "--json", timeout=20)
    assert keys.returncode == 0, keys
    assert BAD not in keys.stdout
