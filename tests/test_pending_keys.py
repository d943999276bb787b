"""Pending keys and refused nodes (issue 9, items 5 and 6): a pending key is accepted by any
form the CLI shows, every admission is logged, and a refused node keeps trying, says what the
hub answered, and comes back by itself when accepted. Real hubs, node processes, sockets."""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

import odium
from odium.core.keys import curve_public

from .conftest import HubProcess, NodeProcess, odium_cli, wait_until


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[NodeProcess]]:
    started: list[NodeProcess] = []
    yield started
    for np in started:
        np.stop()


def start_node(nodes: list[NodeProcess], tmp_path: Path, name: str, *args: str) -> NodeProcess:
    np = NodeProcess(tmp_path / f"node-{name}", ["--name", name, "--app", str(tmp_path),
                                                  *args]).start()
    nodes.append(np)
    return np


def status(hub: odium.Hub, name: str) -> str:
    return {n["name"]: n["status"] for n in hub.nodes()}.get(name, "")


def kinds(hub: odium.Hub) -> list[str]:
    return [e["kind"] for e in hub.log(500)]


@pytest.mark.parametrize("form", ["shown", "fingerprint", "z85"])
def test_a_pending_key_is_accepted_by_any_form_shown(hub: odium.Hub, tmp_path: Path,
                                                    nodes: list[NodeProcess], form: str) -> None:
    np = start_node(nodes, tmp_path, "p1", "--join", hub.address, "--hub-key", hub.key)
    printed = wait_until(lambda: re.search(r"key ([A-Za-z0-9_-]{43}) \(([0-9a-f:]{19})\)",
                                           np.output()), 15, "the node to print its key")
    key_id, fp = printed.group(1), printed.group(2)
    pend = wait_until(lambda: [k for k in hub.keys() if k["role"] == "pending"], 15,
                      "the key to wait as pending")[0]
    assert pend["fingerprint"] == fp
    assert re.fullmatch(r"curve:[0-9a-f]{64}", pend["key"]), "shown in a form a shell can paste"
    wait_until(lambda: "pending there" in np.output(), 10, "the node to say it is pending")
    assert f"odium keys accept {fp}" in np.output()
    z85 = curve_public(key_id).decode()
    pattern = {"shown": pend["key"], "fingerprint": fp, "z85": z85}[form]
    # a refusal changes nothing and logs nothing
    with pytest.raises(odium.OdiumError, match="no key to accept"):
        hub.key_action("accept", pattern, role="admin")
    assert [k["role"] for k in hub.keys() if k["fingerprint"] == fp] == ["pending"]
    assert "key_accept" not in kinds(hub)
    done = hub.key_action("accept", pattern)
    assert [(k["role"], k["fingerprint"]) for k in done] == [("pending", fp)]
    wait_until(lambda: status(hub, "p1") == "ready", 20, "p1 to come in by itself")
    assert hub.run("1 + 1", nodes="p1", timeout=10)["p1"].value == 2
    assert "key_accept" in kinds(hub)
    # the node's own signed request told the hub its key id: the key is that id now
    assert [(k["key"], k["role"], k["name"]) for k in hub.keys() if k["fingerprint"] == fp] \
        == [(key_id, "node", "p1")]
    assert "key_bound" in kinds(hub)
    wait_until(lambda: "ready" in np.output(), 10, "the node to say it is ready")


def test_cli_keys_list_shows_pasteable_ids_and_accept_logs(
        hub_process: HubProcess, nodes: list[NodeProcess], tmp_path: Path) -> None:
    h = str(hub_process.home)
    info = hub_process.info
    np = start_node(nodes, tmp_path, "p2", "--join",
                    f"tcp://127.0.0.1:{info['ports']['query']}", "--hub-key", info["key"])

    def pending() -> list[dict[str, str]]:
        p = odium_cli("keys", "list", "--home", h, "--json")
        return [k for k in json.loads(p.stdout) if k["role"] == "pending"]

    shown = wait_until(pending, 15, "a pending key")[0]["key"]
    table = odium_cli("keys", "list", "--home", h).stdout
    assert shown in table and not re.search(r"[$!&{}]", table.split("\n", 1)[1]), table
    ok = odium_cli("keys", "accept", shown, "--home", h)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("accepted 1 key(s): pending key")
    assert not re.search(r"[$!&{}]", ok.stdout), ok.stdout
    log = json.loads(odium_cli("log", "--home", h, "-n", "200", "--json").stdout)
    assert "key_accept" in [e["kind"] for e in log]
    wait_until(lambda: "; ready" in np.output(), 20, "the node to say it is ready")


def test_a_revoked_node_comes_back_when_accepted_again(hub: odium.Hub, tmp_path: Path,
                                                      nodes: list[NodeProcess]) -> None:
    tfile = tmp_path / "t.token"
    tfile.write_text(hub.token(60))
    tfile.chmod(0o600)
    np = start_node(nodes, tmp_path, "r1", "--token-file", str(tfile))
    wait_until(lambda: status(hub, "r1") == "ready", 20, "r1 ready")
    wait_until(lambda: np.output().count("; ready") == 1, 10, "the node to say it is ready")
    hub.revoke("r1")
    wait_until(lambda: "revoked" in np.output(), 15, "the node to say it was revoked")
    assert status(hub, "r1") == "revoked"
    hub.accept("r1")
    wait_until(lambda: status(hub, "r1") == "ready", 20, "r1 back without a restart")
    assert np.proc is not None and np.proc.poll() is None
    assert hub.run("2 * 21", nodes="r1", timeout=10)["r1"].value == 42
    wait_until(lambda: np.output().count("; ready") == 2, 10, "the node to say so again")
    assert kinds(hub).count("key_accept") == 1 and "key_revoke" in kinds(hub)


def test_a_node_says_when_its_hub_is_unreachable_and_back(
        hub_process: HubProcess, nodes: list[NodeProcess], tmp_path: Path) -> None:
    h = str(hub_process.home)
    line = odium_cli("token", "--home", h, "--name", "u1").stdout
    tok = re.match(r"ODIUM_TOKEN=(\S+) ", line)
    assert tok, line
    tfile = tmp_path / "u.token"
    tfile.write_text(tok.group(1))
    tfile.chmod(0o600)
    ports = hub_process.ports
    np = start_node(nodes, tmp_path, "u1", "--token-file", str(tfile))
    wait_until(lambda: "; ready" in np.output(), 20, "the node to say it is ready")
    hub_process.stop(signal.SIGKILL)
    wait_until(lambda: "unreachable" in np.output(), 20, "the node to say the hub is gone")
    again = HubProcess(hub_process.home, ports=ports, app=tmp_path).start()
    try:
        wait_until(lambda: "reachable again" in np.output(), 20, "the node to say it is back")
        wait_until(lambda: np.output().count("; ready") == 2, 20, "ready again")
    finally:
        again.stop()


def test_every_z85_key_is_a_curve_form_even_one_that_begins_with_a_parenthesis() -> None:
    """z85's alphabet has "(": a pending key shown that way must still be accepted (one key in
    85 begins with it; the random keys of the test above met it now and then)."""
    from odium.core.keys import curve_form

    z85 = "(U58U{om&.75h%!+7&$-6M3pp[]-Ksb*rE/r>$a["
    assert curve_form(z85) == z85
    assert curve_form(f"(CURVE {z85})") == z85
