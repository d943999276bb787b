"""A compromised node's text reaches the admin validated and escaped: fields with a pattern are
checked against it at the hub (newline, CR, ESC refused), and every printer (the CLI, the
notebook's text and HTML forms, the log) shows control characters as visible escapes."""

from __future__ import annotations

import re
from typing import Any

import pytest

import odium
from odium.core import wire as P
from odium.core.results import NodeResult, Result, Status, format_text
from odium.core.term import clean, clean_lines
from odium.jupyter import display as D

from .conftest import odium_cli, wait_until
from .raw import Raw, events
from .test_security import register, trusted

# what must never reach a terminal from a node: C0/C1 controls, DEL, line separators, bidi
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
FAKE = "\n23:59:59 info    hub_start        hub says all is well\x1b[2K\r"
EVIL_STATE = "../" * 3400 + "\"'\x1b[31m"


def rejected_since(hub: odium.Hub, n: int, key: str) -> list[dict[str, Any]]:
    return [e for e in events(hub, "rejected")[n:] if e["key"] == key]


def node_of(hub: odium.Hub, name: str) -> dict[str, Any] | None:
    return next((n for n in hub.nodes() if n["name"] == name), None)


@pytest.fixture
def node(hub: odium.Hub, zctx) -> tuple[Raw, Raw, str]:
    """A registered raw node: its query and results sockets, and its key id."""
    ident = trusted(hub, "rogue")
    q = Raw(zctx, hub, "query", ident)
    register(q, "rogue")
    r = Raw(zctx, hub, "results", ident)
    assert r.handshake() == "ok"
    return q, r, ident.key_id


# --- validated at the boundary -----------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("host", "pc-1" + FAKE), ("host", "pc\x1b]0;owned\x07"), ("host", "pc-1\n"),
    ("app", "/srv/app" + FAKE), ("app", "/srv/\u202eppa"), ("name", "n1\n")])
def test_register_with_control_characters_is_rejected(hub: odium.Hub, zctx, field: str,
                                                      value: str) -> None:
    ident = trusted(hub, "")  # a key not bound to a name yet: it registers with one
    q = Raw(zctx, hub, "query", ident)
    fields: dict[str, Any] = {"name": "n1", "boot": P.new_id(), "host": "pc-1", "app": "/srv/a"}
    fields[field] = value
    body = P.Register(**fields)  # msgspec checks patterns on decoding only: sent as is
    reply = q.request(q.seal("register", body))
    assert reply.type == "error" and f"$.{field}" in reply.body.message  # type: ignore
    assert node_of(hub, "n1") is None
    # the same node, well-formed, is heard: one bad message drops nothing else
    register(q, "n1")
    assert node_of(hub, "n1") is not None
    assert not [e for e in events(hub) if "hub says all is well" in e["detail"]]


def test_event_detail_with_control_characters_is_rejected(hub: odium.Hub, node: Any) -> None:
    q, r, key = node
    before = len(events(hub, "rejected"))
    r.send(r.seal("event", P.NodeEvent("rejected", "bad frame" + FAKE)))
    r.send(r.seal("event", P.NodeEvent("rejected", "bad frame, said plainly")))
    wait_until(lambda: [e for e in events(hub) if e["detail"].endswith("said plainly")], 5,
               "the well-formed event")
    assert rejected_since(hub, before, key)
    assert not [e for e in events(hub) if "hub says all is well" in e["detail"]]


def good_info(hub: odium.Hub) -> dict[str, Any]:
    info = dict(hub.core.state_info.to_dict())
    info["state"] = "unversioned"
    return info


@pytest.mark.parametrize("spoil", ["state", "state newline", "dirty file", "unsatisfied",
                                   "package name", "package version", "fingerprint id",
                                   "declaration source"])
def test_state_report_is_validated(hub: odium.Hub, node: Any, spoil: str) -> None:
    q, r, key = node
    info = good_info(hub)
    fp = info["fingerprint"] = dict(info["fingerprint"])
    fp["detail"] = dict(fp["detail"])
    if spoil == "state":
        info["state"] = EVIL_STATE
    elif spoil == "state newline":
        info["state"] = "0" * 40 + "\n"
    elif spoil == "dirty file":
        info["dirty_files"] = ["ok.py", "x" + FAKE]
    elif spoil == "unsatisfied":
        info["unsatisfied"] = ["numpy" + FAKE]
    elif spoil == "package name":
        fp["detail"]["packages"] = {"numpy" + FAKE: "1.0"}
    elif spoil == "package version":
        fp["detail"]["packages"] = {"numpy": "1.0\x1b[2J"}
    elif spoil == "fingerprint id":
        fp["id"] = "../" * 100
    else:
        info["declaration"] = {**info["declaration"], "source": "pyproject.toml" + FAKE}
    before = len(events(hub, "rejected"))
    r.send(r.seal("state", P.StateReport(info)))
    r.send(r.seal("state", P.StateReport(good_info(hub))))  # the next one is taken
    wait_until(lambda: (node_of(hub, "rogue") or {}).get("state") == "unversioned", 5,
               "the good state report")
    assert rejected_since(hub, before, key), "the bad report was not logged as rejected"
    # and nothing of the bad one was kept: not as the state id, not in the store
    hub.core.store.flush()
    stored = [str(vars(n)) for n in hub.core.store.nodes()]
    assert stored and not any("../../" in n or "hub says" in n for n in stored)


def test_register_info_is_validated_too(hub: odium.Hub, zctx) -> None:
    ident = trusted(hub, "n2")
    q = Raw(zctx, hub, "query", ident)
    info = good_info(hub)
    info["state"] = EVIL_STATE
    reply = q.request(q.seal("register", P.Register("n2", P.new_id(), info=info)))
    assert reply.type == "error" and "not a state id" in reply.body.message  # type: ignore
    assert node_of(hub, "n2") is None


# --- escaped wherever node text is printed -----------------------------------------------------


def test_the_escape_helper() -> None:
    assert clean("a\nb\r\x1b[2J\x07\u202e\x85\t") == "a\\nb\\r\\x1b[2J\\x07\\u202e\\x85\\t"
    assert clean_lines("one\ntwo\r\x1b[1A\tx") == "one\ntwo\\r\\x1b[1A\tx"
    assert clean("plain ü ✓ \\x1b") == "plain ü ✓ \\x1b"


def evil_result() -> Result:
    r = NodeResult("rogue", Status.ERROR, stdout="out" + FAKE + "[other] ok\n",
                   stderr="\x1b]52;c;cm0gLXJmIH4=\x07err\n", value_repr="'v'\r\x1b[1A",
                   error={"ename": "E\x1b[2J", "evalue": "v" + FAKE, "traceback": ""},
                   state=EVIL_STATE, mismatch={"required": "x\x1b", "state": "y\r",
                                               "text": "commit\x1b[1A"})
    return Result("c" * 32, {"rogue": r}, "unversioned")


def test_results_text_and_html_escape_node_text() -> None:
    result = evil_result()
    for text in (format_text(result), D.render_text(result),
                 D.render_node_text(result["rogue"])):
        assert not RAW_CONTROL.search(text), text
        assert "\\x1b" in text
        # every line a node wrote stays under its own header, indented
        assert [ln for ln in text.split("\n") if ln.startswith("[")][0].startswith("[rogue]")
        assert not any(ln.startswith(("[other]", "23:59:59")) for ln in text.split("\n"))
    page = D.render_html(result)
    assert "\x1b" not in page or "&" in page  # HTML: escaped by html.escape
    assert "<script" not in D.render_html(Result("c" * 32, {"rogue": NodeResult(
        "rogue", Status.OK, stdout="<script>alert(1)</script>")}, "x"))


def test_notebook_tables_escape_node_text() -> None:
    ev = [{"ts": 0, "level": "warning", "kind": "node_event", "node": "rogue",
           "detail": "reported by rogue: x" + FAKE}]
    keys = [{"name": "rogue\x1b[2J", "role": "node", "fingerprint": "f", "key": "k" * 43,
             "note": "joined" + FAKE}]
    nodes = [{"name": "rogue", "status": "ready", "state": EVIL_STATE[-20:], "last_seen": 0}]
    for table in (D.log_table(ev), D.keys_table(keys), D.nodes_table(nodes, "unversioned")):
        text = table.text()
        assert not RAW_CONTROL.search(text), text
        assert "\\x1b" in text
        assert not any(ln.startswith("23:59:59") for ln in text.split("\n"))
        assert "\x1b" not in table._repr_html_()


def test_cli_log_keys_and_run_escape_node_text(hub: odium.Hub) -> None:
    """Whatever reached the store by any path prints escaped: ``odium log``, ``odium keys``,
    and a node's output in ``odium run``."""
    from odium.core.keys import Identity
    from odium.hub.keytable import KeyInfo

    core = hub.core
    hub.core.rt.call(lambda: core.store.event("node_event", "reported by rogue: x" + FAKE,
                                                level="warning", node="rogue"))
    k = Identity.generate().key_id
    hub.core.rt.call(lambda: core.keytable.put(KeyInfo(k, "node", "rogue", None,
                                                     "note" + FAKE)))
    hub.start_local(1, prefix="t")
    h = str(hub.home)
    out = {name: odium_cli(*args, "--home", h) for name, args in {
        "log": ["log", "-n", "200"], "keys": ["keys", "list"],
        "run": ["run", "--timeout", "20", "-c",
                f"import sys; print('out' + {FAKE!r}); print('\\x1b]0;t\\x07e', "
                "file=sys.stderr)"]}.items()}
    for name, p in out.items():
        assert p.returncode == 0, (name, p.stdout, p.stderr)
        assert not RAW_CONTROL.search(p.stdout), (name, p.stdout)
        assert "\\x1b" in p.stdout, (name, p.stdout)
        assert not any(ln.startswith("23:59:59") for ln in p.stdout.split("\n")), (name, p.stdout)
