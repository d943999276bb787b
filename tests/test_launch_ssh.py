"""``odium launch ssh`` against real OpenSSH servers, each a "remote host" in a network
namespace of its own (tests/sshhost.py): a host key and a user key made by the test, host
keys checked, the credential over ssh's standard input into a 0600 file there. Odium is
"preinstalled" on the host: the namespace shares this machine's files, so the host runs this
venv's Python. The hub listens on the veth's address on this side; the nodes reach it from
inside their namespace. After each test nothing is left running on any host."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import odium
from odium.launch import SSH, LaunchError
from tests.conftest import HB, HubProcess, odium_cli, odium_shell
from tests.sshhost import SshHost, ssh_unavailable

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[SshHost]:
    if why := ssh_unavailable():
        pytest.skip(why)
    with SshHost(tmp_path / "ssh1", name="lab1") as host:
        yield host


def _ns_inode(ns: str) -> str:
    return f"net:[{os.stat(f'/run/netns/{ns}').st_ino}]"


def _cmdlines(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            out.append(" ".join(psutil.Process(pid).cmdline()))
        except psutil.Error:
            pass
    return out


def test_launch_two_nodes_on_a_host_broadcast_and_stop(lab: SshHost, tmp_path: Path) -> None:
    """Through the CLI, as a user would: launch, list, a broadcast, stop; nothing left."""
    home = tmp_path / "hubhome"
    home.mkdir(mode=0o700)
    hub = HubProcess(home, app=tmp_path, interface=lab.host_address).start()
    remote = tmp_path / "remote"
    try:
        p = odium_cli("launch", "ssh", lab.name, "--per-host", "2", "--name", "lab",
                      "--ssh-config", str(lab.config_path), "--python", sys.executable,
                      "--app", str(tmp_path), "--remote-dir", str(remote), "--wait", "60",
                      "--home", str(home), timeout=90)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "launch lab: 2 nodes ready: lab-1, lab-2" in p.stdout
        cred = remote / "lab" / "credential"
        assert cred.stat().st_mode & 0o777 == 0o600
        listed = json.loads(odium_cli("launch", "list", "--json", "--home", str(home)).stdout)
        assert [(v["id"], v["kind"], v["ready"], v["place"]) for v in listed] == [
            ("lab", "ssh", 2, "lab1")]
        pids = listed[0]["detail"]["hosts"]["lab1"]["pids"]  # each node's, as the host said
        on_host = lab.not_sshd()
        assert sorted(pids) == ["lab-1", "lab-2"] and set(pids.values()) <= set(on_host)
        assert not any("odt1." in c for c in _cmdlines(on_host))  # on no command line
        run = odium_cli("run", "--nodes", "lab-*", "--json", "--home", str(home), "-c",
                        "import os; os.readlink('/proc/self/ns/net')")
        assert run.returncode == 0, run.stderr
        values = {n: r["value"] for n, r in json.loads(run.stdout)["nodes"].items()}
        assert values == dict.fromkeys(["lab-1", "lab-2"], _ns_inode(lab.ns))  # ran there
        stop = odium_cli("launch", "stop", "lab", "--home", str(home), timeout=60)
        assert stop.returncode == 0, stop.stderr
        assert "lab1: stopped 2 node(s)" in stop.stdout
        assert lab.not_sshd() == []  # stop waited for the nodes (and their workers) to end
        assert not cred.exists()
        nodes = json.loads(odium_cli("nodes", "--json", "--home", str(home)).stdout)["nodes"]
        assert {n["name"]: n["status"] for n in nodes} == {"lab-1": "revoked",
                                                          "lab-2": "revoked"}
    finally:
        hub.stop()


def _hub(tmp_path: Path, lab: SshHost) -> odium.Hub:
    return odium.Hub(tmp_path / "hub", ports=0, hb_interval=HB, app=tmp_path,
                     interface=lab.host_address)


def _ssh(lab: SshHost, tmp_path: Path, config: Path | None = None, **kw: object) -> SSH:
    return SSH([lab.name], python=str(kw.pop("python", sys.executable)), app=str(tmp_path),
               ssh_config=str(config or lab.config_path), remote_dir=str(tmp_path / "remote"),
               **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad, says", [
    ("unknown_host_config", "lab1: Host key verification failed."),
    ("wrong_key_config", "lab1: root@"),  # "root@10.232.x.2: Permission denied (publickey)."
    ("unresolvable_config", "lab1: ssh: Could not resolve hostname"),
])
def test_a_host_ssh_refuses_is_one_line_and_the_launch_is_stopped(
        lab: SshHost, tmp_path: Path, bad: str, says: str) -> None:
    with _hub(tmp_path, lab) as hub:
        with pytest.raises(LaunchError) as e:
            hub.launch(_ssh(lab, tmp_path, getattr(lab, bad)()), name="bad", wait=30)
        assert len(e.value.lines) == 1 and e.value.lines[0].startswith(says), e.value.lines
        if bad == "wrong_key_config":
            assert "Permission denied (publickey)" in e.value.lines[0]
        (v,) = hub.launches()
        assert v["status"] == "stopped" and v["detail"]["failed"] is True
        assert {k["name"]: k["role"] for k in hub.keys()}["bad"] == "revoked"
    assert lab.not_sshd() == []


def test_a_host_without_odium_says_so_and_a_good_host_is_not_left_half_started(
        lab: SshHost, tmp_path: Path) -> None:
    with SshHost(tmp_path / "ssh2", name="lab2") as other:
        both = tmp_path / "both.config"
        both.write_text(lab.config_path.read_text() + other.config_path.read_text())
        with _hub(tmp_path, lab) as hub:
            launcher = SSH([lab.name, other.name], per_host=2, python="/usr/bin/python3",
                           ssh_config=str(both), remote_dir=str(tmp_path / "remote"))
            with pytest.raises(LaunchError) as e:
                hub.launch(launcher, name="half", wait=30)
            assert sorted(e.value.lines) == [
                f"{h}: Odium is not installed for /usr/bin/python3 there (give --python PATH, "
                "or --bootstrap to install it from this machine's wheels)"
                for h in ("lab1", "lab2")]
            mixed = tmp_path / "mixed.config"
            mixed.write_text(lab.config_path.read_text() + other.config_path.read_text())
            # lab1 has Odium (this venv's Python); lab2 is told a Python it lacks
            script = tmp_path / "py-on-lab2"
            script.write_text(f"#!/bin/sh\nip -o addr | grep -q ' {other.address}/' && "
                              f"exec /usr/bin/python3 \"$@\"\nexec {sys.executable} \"$@\"\n")
            script.chmod(0o755)
            launcher = SSH([lab.name, other.name], per_host=2, python=str(script),
                           app=str(tmp_path), ssh_config=str(mixed),
                           remote_dir=str(tmp_path / "remote2"))
            with pytest.raises(LaunchError) as e:
                hub.launch(launcher, name="mixed", wait=30)
            assert e.value.lines == [
                f"lab2: Odium is not installed for {script} there (give --python PATH, "
                "or --bootstrap to install it from this machine's wheels)"], e.value.lines
            # lab1's two nodes had started: stopped with the launch, nothing left on it
            assert sorted(e.value.detail["hosts"]["lab1"]["pids"]) == ["mixed-1", "mixed-2"]
            assert lab.not_sshd() == [] and other.not_sshd() == []
            (v,) = [v for v in hub.launches() if v["id"] == "mixed"]
            assert v["status"] == "stopped"


def test_bootstrap_installs_this_odium_from_wheels_on_a_host_without_it(
        lab: SshHost, tmp_path: Path) -> None:
    """The host's Python (/usr/bin/python3) has no Odium; --bootstrap sends this checkout's
    wheel and its dependencies' over ssh and installs them there, with no index."""
    remote = tmp_path / "remote"
    with _hub(tmp_path, lab) as hub:
        launcher = SSH([lab.name], per_host=2, python="/usr/bin/python3", app=str(tmp_path),
                       ssh_config=str(lab.config_path), remote_dir=str(remote), bootstrap=True)
        v = hub.launch(launcher, name="boot", wait=60)
        assert v["ready"] == 2, v
        r = hub.run("import sys, odium; sys.prefix, odium.__file__", nodes="boot-*")
        (env,) = remote.glob("env-*")
        for n in ("boot-1", "boot-2"):
            prefix, where = r[n].value
            assert prefix == str(env) and where.startswith(str(env) + "/lib/"), (prefix, where)
        assert (env / ".complete").exists() and list((env / "wheels").glob("odium-*.whl"))
        hub.launch_stop("boot")
        assert lab.not_sshd() == []
        # a second launch with the same wheels finds the environment there: installs nothing
        mark = (env / ".complete").stat().st_mtime_ns
        v = hub.launch(launcher, name="again", wait=60)
        assert v["ready"] == 2 and (env / ".complete").stat().st_mtime_ns == mark
        hub.launch_stop("again")
    assert lab.not_sshd() == []


def test_the_notebook_magic_launches_shows_k_of_n_and_stops(
        lab: SshHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``%odium launch`` in a real IPython shell: the command's options, progress lines as the
    nodes come up, the launches as a table, the stop; bad arguments are one-line errors."""
    pytest.importorskip("IPython")
    from IPython.core.error import UsageError
    from IPython.utils.capture import capture_output

    from odium.jupyter.launching import LaunchProgress

    with odium_shell(monkeypatch, tmp_path, ODIUM_INTERFACE=lab.host_address) as ip:
        line = (f"launch ssh {lab.name} --per-host 2 --name nb --ssh-config {lab.config_path} "
                f"--python {sys.executable} --app {tmp_path} --remote-dir {tmp_path / 'r'}")
        with capture_output() as cap:
            ip.run_line_magic("odium", line)
        lines = cap.stdout.splitlines()
        assert lines[0].startswith("launch nb: 0 of 2 nodes up; nb-1 pending, nb-2 pending")
        assert lines[-1] == "launch nb: 2 of 2 nodes up", lines
        table = ip.run_line_magic("odium", "launch list")
        assert [(v["id"], v["ready"]) for v in table.data] == [("nb", 2)]
        assert 'data-status="full"' in table._repr_html_()
        html = LaunchProgress(rich=True).html(table.data[0])
        assert 'data-ready="2" data-count="2"' in html and 'data-status="ready"' in html
        with capture_output() as cap:
            ip.run_line_magic("odium", "launch stop nb")
        assert "lab1: stopped 2 node(s)" in cap.stdout
        assert lab.not_sshd() == []
        with capture_output() as cap:
            ip.run_line_magic("odium", "help launch")
        assert "usage: %odium launch ssh" in cap.stdout and "--bootstrap" in cap.stdout
        assert "usage: %odium launch slurm" in cap.stdout and "manual" in cap.stdout
        for bad, says in (("launch", "needs an action"),
                          ("launch ssh", "the following arguments are required: HOST"),
                          ("launch ssh h --per-host 0", "argument --per-host"),
                          ("launch stop nope", "no launch 'nope'")):
            with pytest.raises(UsageError, match=says):
                ip.run_line_magic("odium", bad)
