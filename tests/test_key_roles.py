"""Names that collide with the hub's own keys: no node may be called ``hub`` or ``admin``, a key
action says which role it acts on, and the hub never loses its last admin key."""

from __future__ import annotations

import pytest

import odium
from odium.core import wire as P
from odium.core.keys import Identity, Token, join_proof_bytes
from odium.hub.keytable import KeyInfo

from .conftest import HubProcess, odium_cli
from .raw import Raw, Target, events
from .test_cli import assert_one_line_error, cli_json, cli_ok, run_all


def join(zctx, hub: odium.Hub, name: str, token: Token | None = None) -> P.Message:
    """Join over a token's one-time key, as a node would; the hub's answer."""
    tok = token or Token.decode(hub.token(60))
    node = Identity.generate()
    raw = Raw(zctx, hub, "query", tok.identity)
    proof = node.sign(join_proof_bytes(tok.token_id, hub.key))
    return raw.request(raw.seal("join", P.Join(tok.token_id, node.key_id, name, proof)))


@pytest.mark.parametrize("name", ["admin", "hub", "Admin", "HUB"])
def test_token_join_with_a_reserved_name_is_refused(hub: odium.Hub, zctx, name: str) -> None:
    tok = Token.decode(hub.token(60))
    refused = join(zctx, hub, name, tok)
    assert refused.type == "error", refused
    assert "reserved" in refused.body.message  # type: ignore[attr-defined]
    assert all(k["name"] != name or k["role"] == "admin" for k in hub.keys())
    # the same token, with another name, still joins: it was the name that was refused
    ok = join(zctx, hub, "worker-1", tok)
    assert ok.type == "reply", ok
    assert ("worker-1", "node") in {(k["name"], k["role"]) for k in hub.keys()}


def test_register_with_a_reserved_name_is_refused(hub: odium.Hub, zctx) -> None:
    ident = Identity.generate()
    hub.core.rt.call(lambda: hub.core.keytable.put(KeyInfo(ident.key_id, "node", "", None, "")))
    raw = Raw(zctx, hub, "query", ident)
    msg = raw.request(raw.seal("register", P.Register("admin", P.new_id())))
    assert msg.type == "error" and "reserved" in msg.body.message  # type: ignore[attr-defined]
    assert "admin" not in {n["name"] for n in hub.nodes()}
    assert events(hub, "register") == []


def dash_key() -> str:
    """A real key id that begins with "-" (one in 64 does; argparse must not take it for an
    option)."""
    return next(k for k in (Identity.generate().key_id for _ in range(5000)) if k[0] == "-")


def test_a_node_refuses_a_reserved_name_itself(tmp_path) -> None:
    p = odium_cli("node", "--home", str(tmp_path / "n"), "--join", "tcp://127.0.0.1:9",
                  "--hub-key", dash_key(), "--name", "hub")
    assert_one_line_error(p, "reserved")
    with odium.Hub(tmp_path / "h", ports=0) as h, pytest.raises(odium.OdiumError,
                                                              match="reserved"):
        h.trust(Identity.generate().key_id, "admin")


def test_names_choose_node_keys_and_the_last_admin_key_stays(hub: odium.Hub) -> None:
    admin_key = next(k["key"] for k in hub.keys() if k["role"] == "admin" and k["name"] == "admin")
    # a node that took the name before names were reserved (an old store)
    squatter = Identity.generate()
    hub.core.rt.call(lambda: hub.core.keytable.put(KeyInfo(squatter.key_id, "node", "admin")))
    # "revoke admin" means that node: never the home's admin key
    changed = hub.key_action("revoke", "admin")
    assert [(k["key"], k["role"]) for k in changed] == [(squatter.key_id, "node")]
    roles = {k["key"]: k["role"] for k in hub.keys()}
    assert roles[admin_key] == "admin" and roles[squatter.key_id] == "revoked"
    assert "node key admin" in events(hub, "key_revoke")[-1]["detail"]
    # the last admin key cannot be revoked, by key id or by name with the admin role
    for pattern, role in ((admin_key, None), ("admin", "admin"), ("*", "admin")):
        with pytest.raises(odium.OdiumError, match="last admin key"):
            hub.key_action("revoke", pattern, role)
    assert {k["key"]: k["role"] for k in hub.keys()}[admin_key] == "admin"
    # with a second admin key, one of them may go
    second = Identity.generate()
    hub.trust(second.key_id, "ops", role="admin")
    assert [k["role"] for k in hub.key_action("revoke", "ops", "admin")] == ["admin"]
    with pytest.raises(odium.OdiumError, match="last admin key"):
        hub.key_action("revoke", admin_key)


def test_cli_key_actions_say_the_role_and_keep_the_owner_in(hub_process: HubProcess,
                                                            zctx) -> None:
    h = str(hub_process.home)
    admin_key = next(k["key"] for k in cli_json("keys", "list", "--home", h)
                     if k["role"] == "admin" and k["name"] == "admin")
    out = run_all({"by name": ["keys", "revoke", "admin", "--home", h],
                   "by key": ["keys", "revoke", admin_key, "--home", h],
                   "by role": ["keys", "revoke", "admin", "--role", "admin", "--home", h],
                   "reject": ["keys", "reject", admin_key, "--home", h]})
    assert_one_line_error(out["by name"], "no key to revoke matches 'admin'", "--role admin")
    assert_one_line_error(out["by key"], "last admin key", "locked out")
    assert_one_line_error(out["by role"], "last admin key")
    assert out["reject"].returncode != 0
    # the owner is still in
    assert cli_json("nodes", "--home", h)["nodes"] == []
    assert (admin_key, "admin") in {(k["key"], k["role"])
                                    for k in cli_json("keys", "list", "--home", h)}
    # a node joined with a token; revoking it by name says it was a node key
    tok = Token.decode(cli_ok("token", "--home", h).stdout.split()[0].split("=", 1)[1])
    target = Target(hub_process.info["key"], hub_process.info["ports"])
    node = Identity.generate()
    raw = Raw(zctx, target, "query", tok.identity)
    proof = node.sign(join_proof_bytes(tok.token_id, target.key))
    assert raw.request(raw.seal("join", P.Join(tok.token_id, node.key_id, "c9", proof))
                       ).type == "reply"
    line = cli_ok("keys", "revoke", "c9", "--home", h).stdout
    assert line.startswith("revoked 1 key(s): node key c9 ") and node.key_id in line, line


def _key_beginning(prefix: str) -> Identity:
    while True:  # 1 key in 64 begins with "-", 1 in 4096 with "-h"
        ident = Identity.generate()
        if ident.key_id.startswith(prefix):
            return ident


def test_cli_takes_a_key_id_that_begins_with_a_dash(hub_process: HubProcess, zctx) -> None:
    """base64url has "-": a key id as the CLI printed it is taken as the key, wherever it
    stands and even as ``-h…``, which argparse would read as --help; after "--" too."""
    h = str(hub_process.home)
    target = Target(hub_process.info["key"], hub_process.info["ports"])
    nodes = {"d1": _key_beginning("-"), "d2": _key_beginning("-h"), "d3": _key_beginning("-")}
    for name, node in nodes.items():
        tok = Token.decode(cli_ok("token", "--home", h).stdout.split()[0].split("=", 1)[1])
        raw = Raw(zctx, target, "query", tok.identity)
        proof = node.sign(join_proof_bytes(tok.token_id, target.key))
        assert raw.request(raw.seal("join", P.Join(tok.token_id, node.key_id, name, proof))
                           ).type == "reply"
    out = run_all({"d1": ["keys", "revoke", nodes["d1"].key_id, "--home", h],
                   "d2": ["keys", "revoke", "--home", h, nodes["d2"].key_id],
                   "d3": ["keys", "revoke", "--home", h, "--", nodes["d3"].key_id]})
    for name, p in out.items():
        assert p.returncode == 0, (name, p.stdout, p.stderr)
        assert p.stdout.startswith(f"revoked 1 key(s): node key {name} "), p.stdout
    roles = {k["name"]: k["role"] for k in cli_json("keys", "list", "--home", h)}
    assert all(roles[name] == "revoked" for name in nodes), roles
    # a word that only looks like an option is still refused as one
    assert_one_line_error(odium_cli("keys", "list", "--home", h, "--nope"), "--nope")
