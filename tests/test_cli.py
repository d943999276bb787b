"""The ``odium`` command as a user runs it: child processes, a hub process, node processes.

Bad input gives one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from odium.core.keys import Identity

from .conftest import HubProcess, NodeProcess, odium_cli, wait_until


def one_line_error_problem(p: subprocess.CompletedProcess[str], *expect: str) -> str | None:
    """What is wrong with p as a failed command: it must exit non-zero with exactly one
    line on stderr that starts with 'odium:' (and holds each of expect), no traceback."""
    shown = f"exit {p.returncode}\n  stdout: {p.stdout!r}\n  stderr: {p.stderr!r}"
    err = p.stderr.strip()
    if p.returncode == 0:
        return f"exit status 0\n  {shown}"
    if "Traceback" in p.stderr or "Traceback" in p.stdout:
        return f"a traceback\n  {shown}"
    if not err or "\n" in err or not err.startswith("odium:"):
        return f"not one line starting with 'odium:'\n  {shown}"
    missing = [e for e in expect if e not in err]
    if missing:
        return f"expected {missing} in the error\n  {shown}"
    return None


def assert_one_line_error(p: subprocess.CompletedProcess[str], *expect: str) -> None:
    problem = one_line_error_problem(p, *expect)
    if problem:
        pytest.fail(problem, pytrace=False)


def cli_ok(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    p = odium_cli(*args, input=input, timeout=30)
    assert p.returncode == 0, f"odium {' '.join(args)} -> {p.returncode}\n{p.stdout}{p.stderr}"
    assert "Traceback" not in p.stderr
    return p


def cli_json(*args: str, input: str | None = None) -> Any:
    return json.loads(cli_ok(*args, "--json", input=input).stdout)


def node_status(home: Path) -> dict[str, str]:
    return {n["name"]: n["status"] for n in cli_json("nodes", "--home", str(home))["nodes"]}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- 6. bad arguments and unreachable hubs ---------------------------------------------------

KEY = Identity.generate().key_id  # a well-formed key nobody uses


def run_all(calls: dict[str, list[str]], timeout: float = 20.0
            ) -> dict[str, subprocess.CompletedProcess[str]]:
    """Run independent odium commands side by side (each is a fresh Python process)."""
    def one(args: list[str]) -> subprocess.CompletedProcess[str]:
        try:
            return odium_cli(*args, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            return subprocess.CompletedProcess(e.cmd, -9, str(e.stdout or ""),
                                               f"(test) no exit after {timeout} s")

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {k: pool.submit(one, args) for k, args in calls.items()}
        return {k: f.result() for k, f in futures.items()}


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_bad_arguments_and_unreachable_hubs_give_one_line_error(tmp_path: Path) -> None:
    h, n = str(tmp_path / "nohub"), str(tmp_path / "nodehome")  # no hub.json in either
    stale = tmp_path / "stale"  # a hub.json whose hub is dead
    stale.mkdir(mode=0o700)
    (stale / "hub.json").write_text(json.dumps({
        "pid": _dead_pid(), "interface": "127.0.0.1", "key": KEY, "boot": "x",
        "ports": {"pub": 9, "query": 9, "jobs": 9, "results": 9}}))
    damaged = tmp_path / "damaged"
    damaged.mkdir(mode=0o700)
    (damaged / "hub.json").write_text("{not json")
    afile = tmp_path / "afile"
    afile.write_text("x")
    openkey = tmp_path / "openkey"
    openkey.mkdir(mode=0o700)
    (openkey / "identity.key").write_text(Identity.generate().seed.hex() + "\n")
    (openkey / "identity.key").chmod(0o644)
    busy_sock = socket.socket()
    busy_sock.bind(("127.0.0.1", 0))
    busy_sock.listen()
    busy = busy_sock.getsockname()[1]
    s = str(stale)
    cases: dict[str, tuple[list[str], tuple[str, ...]]] = {
        "unknown subcommand": (["frobnicate"], ("invalid choice",)),
        "ports not numbers": (["hub", "--home", h, "--ports", "a,b,c,d"], ("ports",)),
        "three ports": (["hub", "--home", h, "--ports", "1,2,3"], ("four ports",)),
        "port out of range": (["hub", "--home", h, "--ports", "1,2,3,70000"], ("ports",)),
        "busy port": (["hub", "--home", str(tmp_path / "busy"), "--ports", f"0,{busy},0,0"],
                      (str(busy),)),
        "negative timeout": (["run", "--home", h, "--timeout", "-1", "-c", "1"], ("positive",)),
        "zero heartbeat": (["hub", "--home", h, "--heartbeat", "0"], ("positive",)),
        "log -n 0": (["log", "--home", h, "-n", "0"], ("at least 1",)),
        "run with no code": (["run", "--home", h], ("nothing to run",)),
        "run -c and FILE": (["run", "--home", h, "-c", "1", "x.py"], ("not both",)),
        "run missing FILE": (["run", "--home", h, str(tmp_path / "missing.py")],
                             ("cannot read",)),
        "keys accept, no pattern, no hub": (["keys", "accept", "--home", h], ("no hub",)),
        "keys accept KEY, no hub": (["keys", "accept", KEY, "--home", h], ("no hub",)),
        # options may come between the positionals, as with every other subcommand
        "keys accept --home H KEY": (["keys", "accept", "--home", h, KEY], ("no hub",)),
        "keys unknown action": (["keys", "frob", "--home", h], ("invalid choice",)),
        "token not a token": (["node", "--home", n, "--token", "garbage"], ("join token",)),
        "token damaged": (["node", "--home", n, "--token", "odt1.eyJhIjoxfQ"], ("token",)),
        "node never joined": (["node", "--home", n], ("has not joined",)),
        "join without key": (["node", "--home", n, "--join", "tcp://127.0.0.1:9"],
                             ("--token",)),
        "join bad address": (["node", "--home", n, "--join", "http://x", "--hub-key", KEY],
                             ("tcp://HOST:PORT",)),
        "join bad hub key": (["node", "--home", n, "--join", "tcp://127.0.0.1:9",
                              "--hub-key", "short"], ("public key",)),
        "bad node name": (["node", "--home", n, "--join", "tcp://127.0.0.1:9", "--hub-key", KEY,
                           "--name", "../etc"], ("node name",)),
        "home is a file": (["keys", "show", "--home", str(afile)], ("afile",)),
        "key file readable by others": (["keys", "show", "--home", str(openkey)],
                                        ("readable by others",)),
        "nodes, no hub": (["nodes", "--home", h], ("no hub is running",)),
        "run, no hub": (["run", "--home", h, "-c", "1"], ("no hub is running",)),
        "token, no hub": (["token", "--home", h], ("no hub is running",)),
        "log, no hub": (["log", "--home", h], ("no hub is running",)),
        "nodes, stale hub.json": (["nodes", "--home", s], ("not running",)),
        "run, stale hub.json": (["run", "--home", s, "-c", "1"], ("not running",)),
        "keys list, stale hub.json": (["keys", "list", "--home", s], ("not running",)),
        "token, stale hub.json": (["token", "--home", s], ("not running",)),
        "nodes, damaged hub.json": (["nodes", "--home", str(damaged)], ("damaged",)),
    }
    try:
        done = run_all({k: args for k, (args, _) in cases.items()})
    finally:
        busy_sock.close()
    failures = []
    for case, (args, expect) in cases.items():
        problem = one_line_error_problem(done[case], *expect)
        if problem:
            failures.append(f"--- {case}: odium {' '.join(args)}\n  {problem}")
    if failures:
        pytest.fail(f"{len(failures)} of {len(cases)} cases wrong:\n" + "\n".join(failures),
                    pytrace=False)
    assert not (tmp_path / "busy" / "hub.json").exists()


def test_help() -> None:
    p = cli_ok("--help")
    for sub in ("hub", "node", "run", "nodes", "keys", "token", "log", "demo"):
        assert sub in p.stdout


# --- 7. the commands against a running hub ---------------------------------------------------


@pytest.fixture
def joined(hub_process: HubProcess, node_processes: Callable[..., NodeProcess],
           tmp_path: Path) -> Iterator[tuple[HubProcess, dict[str, NodeProcess]]]:
    """The hub process with two nodes, c1 and c2, joined with tokens from the CLI."""
    home = hub_process.home
    nodes = {}
    for name in ("c1", "c2"):
        line = cli_ok("token", "--home", str(home)).stdout.strip()
        m = re.fullmatch(r"ODIUM_TOKEN=(odt1\.\S+) odium node", line)
        assert m, line
        nodes[name] = node_processes(name, "--token", m.group(1), "--app", str(tmp_path))
    wait_until(lambda: node_status(home) == {"c1": "ready", "c2": "ready"}, 20,
               "c1 and c2 ready")
    yield hub_process, nodes


def test_commands_against_a_running_hub(joined: Any, tmp_path: Path) -> None:
    """run (text, --json, FILE, -, --shell, exit status), nodes, keys, token, log."""
    hp, nodes = joined
    h = str(hp.home)
    code = tmp_path / "cell.py"
    code.write_text("import sys\nprint('from file', file=sys.stderr)\nsum(range(10))\n")
    run = ["run", "--home", h, "--timeout", "10"]
    calls = {
        "text": [*run, "-c", "print('hello there'); 6 * 7"],
        "grouped": [*run, "--group", "-c", "print('hello there'); 6 * 7"],
        "json": [*run, "--json", "--nodes", "c1", "-c", "'one'"],
        "file": [*run, "--json", str(code)],
        "shell": [*run, "--json", "--shell", "-c", "echo $((40 + 2))"],
        "error": [*run, "--nodes", "c2", "-c", "1 / 0"],
        "exit 3": [*run, "--shell", "-c", "exit 3"],
        "timeout": ["run", "--home", h, "--timeout", "0.3", "--nodes", "c1", "-c",
                    "import time; time.sleep(20)"],
        "no match": [*run, "--nodes", "gpu*", "-c", "1"],
        "nodes": ["nodes", "--home", h],
        "nodes json": ["nodes", "--home", h, "--json"],
        "hub key": ["keys", "show", "--home", h],
        "keys": ["keys", "list", "--home", h],
        "keys json": ["keys", "list", "--home", h, "--json"],
        "token": ["token", "--home", h],
        "log": ["log", "--home", h],
        "log json": ["log", "--home", h, "--json", "-n", "200"],
        "accept nothing": ["keys", "accept", "--home", h],
        "revoke unknown": ["keys", "revoke", "nosuchnode", "--home", h],
        **{f"key {n}": ["keys", "show", "--home", str(np.home)] for n, np in nodes.items()},
    }
    out = run_all(calls)
    stdin = cli_json(*run, "-", input="x = 2\nx ** 10\n")

    def ok(name: str) -> str:
        p = out[name]
        assert p.returncode == 0 and "Traceback" not in p.stderr, (name, p.stdout, p.stderr)
        return p.stdout

    text = ok("text")
    for name in ("c1", "c2"):
        assert re.search(rf"^\[{name}\] ok\b", text, re.M), text
    assert text.count("hello there") == 2 and text.count("42") >= 2
    grouped = ok("grouped").splitlines()  # both answered the same: one entry
    assert "[2 nodes] ok  42" in grouped and "  nodes: c1, c2" in grouped, grouped
    assert sum("hello there" in ln for ln in grouped) == 1
    res = json.loads(ok("json"))
    assert res["ok"] is True and list(res["nodes"]) == ["c1"]
    assert res["nodes"]["c1"]["value"] == "one" and res["nodes"]["c1"]["status"] == "ok"
    res = json.loads(ok("file"))
    assert [r["value"] for r in res["nodes"].values()] == [45, 45]
    assert all(r["stderr"] == "from file\n" for r in res["nodes"].values())
    assert [r["value"] for r in stdin["nodes"].values()] == [1024, 1024]
    res = json.loads(ok("shell"))
    assert [r["stdout"] for r in res["nodes"].values()] == ["42\n", "42\n"]

    # any targeted node not ok -> non-zero exit, and the failure is shown
    for name, shown in (("error", "ZeroDivisionError"), ("exit 3", "exit status 3"),
                        ("timeout", "timeout")):
        p = out[name]
        assert p.returncode != 0 and shown in p.stdout, (name, p.stdout, p.stderr)
        assert "Traceback" not in p.stderr
    assert_one_line_error(out["no match"], "no node matches")
    assert_one_line_error(out["accept nothing"], "needs a key")
    assert_one_line_error(out["revoke unknown"], "no key")

    table = ok("nodes")
    assert re.search(r"^c1\s+ready\b", table, re.M) and re.search(r"^c2\s+ready\b", table, re.M)
    data = json.loads(ok("nodes json"))
    assert {n["name"] for n in data["nodes"]} == {"c1", "c2"}
    assert {n["pid"] for n in data["nodes"]} == {np.proc.pid for np in nodes.values()}
    assert ok("hub key").strip() == hp.info["key"]
    keys = json.loads(ok("keys json"))
    assert {("c1", "node"), ("c2", "node")} <= {(k["name"], k["role"]) for k in keys}
    assert any(k["role"] == "admin" for k in keys)
    listing = ok("keys")
    for name, np in nodes.items():
        node_key = ok(f"key {name}").strip()
        assert node_key in listing and node_key in np.output(), name
    assert re.fullmatch(r"ODIUM_TOKEN=odt1\.\S+ odium node\n", ok("token"))
    log = ok("log")
    assert "join" in log and "c1" in log
    assert {"join", "node_ready", "command"} <= {e["kind"] for e in json.loads(ok("log json"))}

    # key files 0600, homes 0700
    for home in [hp.home] + [np.home for np in nodes.values()]:
        assert mode(home) == 0o700, home
        assert mode(home / "identity.key") == 0o600, home
    assert mode(hp.home / "admin.key") == 0o600
    assert mode(hp.home / "hub.json") == 0o600
    for np in nodes.values():
        assert mode(np.home / "joined.json") == 0o600

    # a stopped node: its entry says so, and the exit status is non-zero
    nodes["c2"].stop()
    wait_until(lambda: node_status(hp.home)["c2"] not in ("ready", "connecting"), 10,
               "c2 to be gone")
    p = odium_cli(*run, "--json", "-c", "1")
    assert p.returncode != 0, p.stdout + p.stderr
    res = json.loads(p.stdout)
    assert res["nodes"]["c1"]["status"] == "ok"
    assert res["nodes"]["c2"]["status"] == "not connected"


def test_demo_runs_in_under_ten_seconds() -> None:
    t0 = time.monotonic()
    p = odium_cli("demo", timeout=20)
    took = time.monotonic() - t0
    assert p.returncode == 0, p.stdout + p.stderr
    assert took < 10, f"demo took {took:.1f} s"
    for name in ("demo-1", "demo-2", "demo-3"):
        assert re.search(rf"^\[{name}\] ok\b", p.stdout, re.M), p.stdout
    assert "Traceback" not in p.stderr


# --- 8. joining: tokens and the pending-key flow ---------------------------------------------


def test_pending_key_accept_then_revoke(hub_process: HubProcess,
                                       node_processes: Callable[..., NodeProcess],
                                       tmp_path: Path) -> None:
    h = str(hub_process.home)
    query = hub_process.info["ports"]["query"]
    np = node_processes("p1", "--join", f"tcp://127.0.0.1:{query}", "--hub-key",
                        hub_process.info["key"], "--app", str(tmp_path))
    printed = wait_until(lambda: re.search(r"key ([A-Za-z0-9_-]{43}) \(([0-9a-f:]{19})\)",
                                           np.output()), 10, "the node to print its key")
    key_id, fp = printed.group(1), printed.group(2)
    shown = cli_json("keys", "show", "--home", str(np.home))
    assert shown == {"key": key_id, "fingerprint": fp}
    assert mode(np.home) == 0o700 and mode(np.home / "identity.key") == 0o600

    def pending() -> bool:
        return any(k["role"] == "pending" and k["fingerprint"] == fp
                   for k in cli_json("keys", "list", "--home", h))

    wait_until(pending, 10, "the node's key to wait as pending")
    assert "p1" not in node_status(hub_process.home)

    out = cli_ok("keys", "accept", key_id, "--home", h).stdout  # by its id, as the node printed it
    assert "accepted 1 key" in out
    wait_until(lambda: node_status(hub_process.home).get("p1") == "ready", 10, "p1 ready")
    res = cli_json("run", "--home", h, "--timeout", "10", "--nodes", "p1", "-c", "'hi'")
    assert res["nodes"]["p1"]["value"] == "hi"

    cli_ok("keys", "revoke", "p1", "--home", h)
    wait_until(lambda: node_status(hub_process.home).get("p1") not in ("ready", "connecting"),
               5, "p1 to stop being ready")
    assert ("p1", "revoked") in {(k["name"], k["role"]) for k in
                                 cli_json("keys", "list", "--home", h)}
    p = odium_cli("run", "--home", h, "--timeout", "10", "--json", "--nodes", "p1", "-c", "1")
    assert p.returncode != 0
    assert "no node matches" in p.stderr  # a revoked node is listed, never targeted
    # the revoked node keeps knocking, but stays out
    assert node_status(hub_process.home)["p1"] not in ("ready", "connecting")


def test_spent_token_is_refused_with_one_line_error(
        hub_process: HubProcess, node_processes: Callable[..., NodeProcess],
        tmp_path: Path) -> None:
    h = str(hub_process.home)
    tok = cli_ok("token", "--home", h).stdout.split()[0].split("=", 1)[1]
    node_processes("first", "--token", tok, "--app", str(tmp_path))
    wait_until(lambda: node_status(hub_process.home).get("first") == "ready", 15,
               "first ready")
    second = node_processes("second", "--token", tok, "--app", str(tmp_path))
    assert second.proc is not None
    try:
        second.proc.wait(6)
    except subprocess.TimeoutExpired:
        pytest.fail("a node given a spent token keeps waiting silently; expected a one-line "
                    f"error and a non-zero exit. Its output: {second.output()!r}")
    out = second.output()
    assert second.proc.returncode != 0, out
    assert "Traceback" not in out
    assert out.strip().splitlines()[-1].startswith("odium:"), out
    assert "second" not in node_status(hub_process.home)


def test_every_command_of_the_parser_has_its_function() -> None:
    from odium.cli.main import COMMANDS, command
    from odium.cli.parser import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(COMMANDS)
    assert all(callable(command(name)) for name in COMMANDS)
