"""Another user on the same machine gets nothing: homes and key files must be the running
user's and private, and join tokens never go on a command line (``ps`` shows it to everyone).

Tests run as root here; "another user" is uid 65534 (nobody), made with os.chown.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from odium.core.keys import Identity, Token

from .conftest import HubProcess, end_process, odium_cli, wait_until
from .test_cli import assert_one_line_error, cli_json, cli_ok, node_status, run_all

OTHER = 65534  # nobody


def planted_home(path: Path, owner: int = OTHER, mode: int = 0o700) -> tuple[Path, Identity]:
    """A home another user made, with their identity.key and admin.key in it (0600)."""
    path.mkdir(mode=0o700)
    planted = Identity.generate()
    for name in ("identity.key", "admin.key"):
        f = path / name
        f.write_text(planted.seed.hex() + "\n")
        f.chmod(0o600)
        os.chown(f, owner, owner)
    os.chown(path, owner, owner)
    path.chmod(mode)
    return path, planted


# --- 7. a home or key file owned by someone else, or writable by others -----------------------


def test_hub_refuses_a_home_another_user_owns(tmp_path: Path) -> None:
    home, planted = planted_home(tmp_path / "theirs")
    p = odium_cli("hub", "--home", str(home), "--ports", "0", timeout=30)
    assert_one_line_error(p, str(home), "owned by uid 65534", "chown")
    assert not (home / "hub.json").exists()  # it never ran with their keys
    assert planted.key_id not in p.stdout + p.stderr


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777, 0o720])
def test_hub_refuses_a_home_others_can_write(tmp_path: Path, mode: int) -> None:
    home = tmp_path / "open"
    home.mkdir()
    home.chmod(mode)
    p = odium_cli("hub", "--home", str(home), "--ports", "0", timeout=30)
    assert_one_line_error(p, str(home), "writable by group or others", f"chmod 700 {home}")
    assert not (home / "hub.json").exists() and not (home / "identity.key").exists()
    assert stat.S_IMODE(home.stat().st_mode) == mode  # refused, not silently "fixed"


@pytest.mark.parametrize("case", ["key owned by another user", "key writable by group",
                                  "key writable by others"])
def test_refuses_a_key_file_another_user_owns_or_can_write(tmp_path: Path, case: str) -> None:
    home = tmp_path / "mine"
    home.mkdir(mode=0o700)
    key = home / "admin.key"
    key.write_text(Identity.generate().seed.hex() + "\n")
    if case == "key owned by another user":
        key.chmod(0o600)
        os.chown(key, OTHER, OTHER)
        expect: tuple[str, ...] = ("owned by uid 65534", "chown")
    else:
        key.chmod(0o620 if "group" in case else 0o602)
        expect = ("writable by group or others", f"chmod 600 {key}")
    p = odium_cli("hub", "--home", str(home), "--ports", "0", timeout=30)
    assert_one_line_error(p, str(key), *expect)
    assert not (home / "hub.json").exists()


def test_cli_commands_refuse_a_planted_home(tmp_path: Path) -> None:
    """The admin commands too: a hub.json and admin.key planted by another user would send
    this user's code and commands to their hub."""
    home, planted = planted_home(tmp_path / "theirs")
    (home / "hub.json").write_text(json.dumps({
        "pid": os.getpid(), "interface": "127.0.0.1", "key": planted.key_id, "boot": "x",
        "ports": {"pub": 9, "query": 9, "jobs": 9, "results": 9}}))
    os.chown(home / "hub.json", OTHER, OTHER)
    h = str(home)
    out = run_all({"nodes": ["nodes", "--home", h], "run": ["run", "--home", h, "-c", "1"],
                   "keys show": ["keys", "show", "--home", h],
                   "node": ["node", "--home", h, "--join", "tcp://127.0.0.1:9", "--hub-key",
                            planted.key_id]})
    for name, p in out.items():
        assert_one_line_error(p, "owned by uid 65534")
        assert planted.key_id not in p.stdout, name


def test_own_private_home_still_works_and_a_readable_one_is_tightened(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o755)
    mine.chmod(0o755)
    key = cli_ok("keys", "show", "--home", str(mine)).stdout.strip()
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", key)
    assert stat.S_IMODE(mine.stat().st_mode) == 0o700
    assert stat.S_IMODE((mine / "identity.key").stat().st_mode) == 0o600


# --- 8. join tokens never on a command line ---------------------------------------------------


class EnvNode:
    """A node process with its own environment (for ODIUM_TOKEN)."""

    def __init__(self, home: Path, args: list[str], env: dict[str, str] | None = None) -> None:
        self.home = home
        self.logpath = home.parent / f"{home.name}.log"
        self.log = open(self.logpath, "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "odium", "node", "--home", str(home),
                                      *args], stdout=self.log, stderr=subprocess.STDOUT,
                                     text=True, env={**os.environ, **(env or {})})

    def output(self) -> str:
        return self.logpath.read_text()

    def stop(self) -> None:
        end_process(self.proc)
        self.log.close()


@pytest.fixture
def env_nodes(tmp_path: Path) -> Iterator[Callable[..., EnvNode]]:
    started: list[EnvNode] = []

    def start(name: str, *args: str, env: dict[str, str] | None = None) -> EnvNode:
        n = EnvNode(tmp_path / f"node-{name}", ["--name", name, "--app", str(tmp_path), *args],
                    env)
        started.append(n)
        return n

    yield start
    for n in started:
        n.stop()


def token_from(line: str) -> str:
    m = re.fullmatch(r"ODIUM_TOKEN=(odt1\.\S+) odium node\n", line)
    assert m, f"odium token should print the ODIUM_TOKEN form, not {line!r}"
    return m.group(1)


def test_token_file_and_env_keep_the_token_off_the_command_line(
        hub_process: HubProcess, env_nodes: Callable[..., EnvNode], tmp_path: Path) -> None:
    h = str(hub_process.home)
    # odium token --file: a new 0600 file, and the command that reads it
    tfile = tmp_path / "join.token"
    line = cli_ok("token", "--home", h, "--file", str(tfile)).stdout
    assert line == f"odium node --token-file {tfile}\n"
    assert stat.S_IMODE(tfile.stat().st_mode) == 0o600
    file_token = tfile.read_text().strip()
    Token.decode(file_token)
    assert file_token not in line
    # odium token: the token in the environment, not in the node's arguments
    env_token = token_from(cli_ok("token", "--home", h).stdout)

    by_file = env_nodes("byfile", "--token-file", str(tfile))
    by_env = env_nodes("byenv", env={"ODIUM_TOKEN": env_token})
    wait_until(lambda: node_status(hub_process.home) == {"byfile": "ready", "byenv": "ready"},
               20, "both nodes ready")
    for node, tok in ((by_file, file_token), (by_env, env_token)):
        cmdline = Path(f"/proc/{node.proc.pid}/cmdline").read_bytes()
        assert b"odium" in cmdline and tok.encode() not in cmdline
        assert tok not in node.output()
        assert "warning" not in node.output()  # the safe forms are not warned about
    # the file is the user's: read, left in place, unchanged
    assert tfile.read_text().strip() == file_token
    assert stat.S_IMODE(tfile.stat().st_mode) == 0o600

    # the node forgets the token: no command it runs (thread or worker process) inherits it
    res = cli_json("run", "--home", h, "--timeout", "20", "--nodes", "byenv", "-c",
                   "import os, subprocess\n"
                   "(os.environ.get('ODIUM_TOKEN'),"
                   " subprocess.run(['sh', '-c', 'echo ${ODIUM_TOKEN:-none}'],"
                   " capture_output=True, text=True).stdout.strip())")
    assert res["nodes"]["byenv"]["status"] == "ok", res
    assert res["nodes"]["byenv"]["value"] == [None, "none"]
    res = cli_json("run", "--home", h, "--timeout", "20", "--shell", "--nodes", "byenv",
                   "-c", "echo ${ODIUM_TOKEN:-none}")
    assert res["nodes"]["byenv"]["stdout"] == "none\n", res


def test_token_on_the_command_line_is_warned_about(
        hub_process: HubProcess, env_nodes: Callable[..., EnvNode]) -> None:
    tok = token_from(cli_ok("token", "--home", str(hub_process.home)).stdout)
    n = env_nodes("argv", "--token", tok)
    wait_until(lambda: node_status(hub_process.home).get("argv") == "ready", 20, "argv ready")
    assert "visible to every local user" in n.output() and "--token-file" in n.output()


@pytest.mark.parametrize("case", ["readable by others", "owned by another user", "missing",
                                  "both --token and --token-file"])
def test_bad_token_files_are_refused(tmp_path: Path, case: str) -> None:
    tfile = tmp_path / "tok"
    tfile.write_text("odt1.x\n")
    tfile.chmod(0o600)
    args = ["node", "--home", str(tmp_path / "n"), "--token-file", str(tfile)]
    if case == "readable by others":
        tfile.chmod(0o644)
        expect: tuple[str, ...] = ("readable by others", f"chmod 600 {tfile}")
    elif case == "owned by another user":
        os.chown(tfile, OTHER, OTHER)
        expect = ("owned by uid 65534",)
    elif case == "missing":
        tfile.unlink()
        expect = ("no token file", "odium token --file")
    else:
        args += ["--token", "odt1.x"]
        expect = ("not both",)
    p = odium_cli(*args, timeout=30)
    assert_one_line_error(p, *expect)


def test_restart_after_a_sync_runs_again_without_the_spent_token() -> None:
    from odium.cli.serve import _drop_option

    argv = ["python", "-m", "odium", "node", "--token-file", "/t", "--token=x", "--name", "n"]
    assert _drop_option(_drop_option(argv, "--token"), "--token-file") == [
        "python", "-m", "odium", "node", "--name", "n"]
