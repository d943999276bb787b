"""Nodes started over SSH, with the system's OpenSSH client.

The system client, not a Python SSH library, as ipyparallel's SSH launcher does: it is the
one that honours everything of the user's own setup (``~/.ssh/config`` with its Host blocks,
ProxyJump and ControlMaster; the agent; known_hosts and their hashing; FIDO keys), which a
library re-implements only in part. Host keys are checked as the user's config says; Odium
never turns the check off. ``BatchMode=yes``: a launcher cannot answer a password prompt, so a
host that wants one fails at once, with ssh's own line.

On each host one ``ssh HOST sh -c SCRIPT`` starts that host's nodes: the script makes the
launch's directory (0700), takes the credential from its standard input into a 0600 file
there (never argv, never the environment of a process list), checks that the Python it was
told to use has Odium, and starts each node in a session of its own (``setsid``), printing
its pid. Stopping signals each node's process group (the node and its workers), waits for
it to end, kills what is left, and removes the credential.
"""

from __future__ import annotations

import shlex
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.launching import launch_names
from ..errors import ConfigError
from . import bootstrap
from .common import CREDENTIAL_SHOWN, LaunchError, Opened

CONNECT_TIMEOUT = 15  # seconds ssh may take to connect
START_TIMEOUT = 120.0  # seconds a host's start script may take
STOP_WAIT = 10  # seconds a node has to end after SIGTERM before it is killed
MISSING = 3  # the start script's exit status when the Python has no Odium


@dataclass
class SSH:
    """Start ``per_host`` nodes on each of ``hosts`` (names as ssh knows them, ``user@host``
    too). ``python``: the remote Python that has Odium (default ``python3``); ``app``: the
    application directory on the host; ``ssh_config``: an ssh config file (``ssh -F``; default:
    the user's own); ``ssh_options``: more ``-o`` options; ``remote_dir``: where the launch
    keeps its nodes' homes and logs on each host; ``bootstrap``: install this machine's Odium
    and its dependencies from wheels sent over ssh (odium.launch.bootstrap) into a virtual
    environment of ``python`` on each host first; ``wheelhouse``: those wheels, made by you
    (default: gathered with pip wheel)."""

    hosts: list[str]
    per_host: int = 1
    python: str = "python3"
    app: str | None = None
    ssh_config: str | None = None
    ssh_options: list[str] = field(default_factory=list)
    remote_dir: str = "$HOME/.odium/launches"
    names: list[str] | None = None
    bootstrap: bool = False
    wheelhouse: str | None = None
    kind: str = "ssh"
    _wheels: list[Path] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not self.hosts:
            raise ConfigError("odium launch ssh needs at least one host")
        for h in self.hosts:
            if not h or h.startswith("-") or any(c.isspace() for c in h):
                raise ConfigError(f"not a host: {h!r}")
        if len(set(self.hosts)) != len(self.hosts):
            raise ConfigError("a host is given twice; use --per-host N for more nodes on one")
        if any(c in self.remote_dir for c in '"`\\\n'):
            raise ConfigError(f"--remote-dir may not hold quotes, backslashes or newlines: "
                              f"{self.remote_dir!r}")
        if not 1 <= self.per_host <= 256:
            raise ConfigError(f"--per-host is 1 to 256, not {self.per_host}")

    @property
    def count(self) -> int:
        return len(self.hosts) * self.per_host

    @property
    def place(self) -> str:
        return " ".join(self.hosts)

    def check(self) -> None:
        if self.ssh_config is not None and not Path(self.ssh_config).expanduser().is_file():
            raise LaunchError([f"no ssh config file {self.ssh_config}"])

    def ssh_command(self, host: str, script: str) -> list[str]:
        cfg = ["-F", str(Path(self.ssh_config).expanduser())] if self.ssh_config else []
        opts = [w for o in self.ssh_options for w in ("-o", o)]
        return ["ssh", *cfg, "-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT}",
                *opts, "--", host, f"sh -c {shlex.quote(script)}"]

    def _by_host(self, opened: Opened) -> dict[str, list[str]]:
        names = opened.names
        k = self.per_host
        return {h: names[i * k:(i + 1) * k] for i, h in enumerate(self.hosts)}

    def _remote_python(self) -> str:
        """The Python the nodes run, as the start script writes it."""
        if self.bootstrap and self._wheels:
            return f'"{bootstrap.env_dir(self.remote_dir, self._wheels)}/bin/python"'
        return shlex.quote(self.python)

    def start_script(self, lid: str, names: list[str]) -> str:
        d = f"{self.remote_dir}/{lid}"
        py = self._remote_python()
        app = f" --app {shlex.quote(self.app)}" if self.app else ""
        lines = ["set -e", "umask 077", f'D="{d}"', 'mkdir -p "$D"',
                 f"if ! {py} -c 'import odium' >/dev/null 2>&1; then",
                 f"  echo \"odium-launch: no Odium for {self.python} on $(hostname)\"",
                 f"  exit {MISSING}", "fi",
                 'cat > "$D/credential"']
        for n in names:
            lines += [f'mkdir -p "$D/{n}"',
                      f'setsid {py} -m odium node --home "$D/{n}" --token-file '
                      f'"$D/credential" --name {n}{app} </dev/null >"$D/{n}/node.log" 2>&1 &',
                      f'echo "odium-launch: started {n} $!"']
        return "\n".join(lines) + "\n"

    def gather(self, workdir: Path) -> None:
        """With ``bootstrap``: the wheels to send (gathered once, into ``workdir``'s parent's
        ``wheels``, the launches' own directory)."""
        if self.bootstrap and not self._wheels:
            given = Path(self.wheelhouse) if self.wheelhouse else None
            self._wheels = bootstrap.gather(workdir.parent / "wheels", given)

    def plan(self, opened: Opened, workdir: Path) -> str:
        self.gather(workdir)
        out = []
        if self.bootstrap:
            env = bootstrap.env_dir(self.remote_dir, self._wheels)
            out.append(f"# first, on each host: {len(self._wheels)} wheels "
                       f"({', '.join(w.name for w in self._wheels)}) as a tar stream on ssh's "
                       "standard input, installed unless there already:\n" + shlex.join(
                           self.ssh_command("HOST", bootstrap.install_script(
                               self.python, env, self._wheels))))
        for host, names in self._by_host(opened).items():
            cmd = self.ssh_command(host, self.start_script(opened.id, names))
            out.append(f"# {host}: {', '.join(names)}; the credential goes on ssh's standard "
                       f"input ({CREDENTIAL_SHOWN}), into a 0600 file on the host\n"
                       + shlex.join(cmd[:-1]) + " \\\n  " + shlex.quote(cmd[-1]))
        return "\n\n".join(out) + "\n"

    def start(self, opened: Opened, workdir: Path) -> dict[str, Any]:
        self.gather(workdir)
        by_host = self._by_host(opened)
        with ThreadPoolExecutor(max_workers=min(16, len(by_host))) as pool:
            done = dict(zip(by_host, pool.map(
                lambda h: self._start_host(h, opened, by_host[h]), by_host), strict=True))
        hosts = {h: r for h, r in done.items() if isinstance(r, dict)}
        detail = {"ssh": {"config": self.ssh_config, "options": self.ssh_options},
                  "dir": f"{self.remote_dir}/{opened.id}", "hosts": hosts,
                  "command": self.plan(opened, workdir)}
        failed = [r for r in done.values() if isinstance(r, str)]
        if failed:
            raise LaunchError(failed, detail)
        return detail

    def _start_host(self, host: str, opened: Opened, names: list[str]) -> dict[str, Any] | str:
        """A host's nodes started: {names, pids}; or the line that says why not."""
        if self.bootstrap:
            why = self._install(host)
            if why:
                return why
        cmd = self.ssh_command(host, self.start_script(opened.id, names))
        try:
            p = subprocess.run(cmd, input=opened.token + "\n", capture_output=True, text=True,
                               timeout=START_TIMEOUT)
        except FileNotFoundError:
            return f"{host}: no ssh client here (install OpenSSH's ssh)"
        except subprocess.TimeoutExpired:
            return f"{host}: no answer over ssh in {START_TIMEOUT:.0f} s"
        pids = {}
        for line in p.stdout.splitlines():
            w = line.split()
            if len(w) == 4 and w[:2] == ["odium-launch:", "started"] and w[3].isdigit():
                pids[w[2]] = int(w[3])
        if p.returncode == 0 and set(pids) == set(names):
            return {"names": names, "pids": pids}
        if p.returncode == MISSING:
            return (f"{host}: Odium is not installed for {self.python} there (give --python "
                    "PATH, or --bootstrap to install it from this machine's wheels)")
        if pids:  # (started some, then failed: stop those)
            return _partial(self, host, names, pids, p, f"{self.remote_dir}/{opened.id}")
        why = _last_line(p.stderr) or _last_line(p.stdout) or f"exit status {p.returncode}"
        return f"{host}: {why}"


    def _install(self, host: str) -> str:
        """Odium installed on the host from the wheels (or there already): "" or why not."""
        env = bootstrap.env_dir(self.remote_dir, self._wheels)
        cmd = self.ssh_command(host, bootstrap.install_script(self.python, env, self._wheels))
        try:
            p = subprocess.run(cmd, input=bootstrap.tar_of(self._wheels), capture_output=True,
                               timeout=bootstrap.INSTALL_TIMEOUT)
        except FileNotFoundError:
            return f"{host}: no ssh client here (install OpenSSH's ssh)"
        except subprocess.TimeoutExpired:
            return f"{host}: installing Odium took over {bootstrap.INSTALL_TIMEOUT:.0f} s"
        out, err = p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
        if p.returncode == 0 and "odium-bootstrap:" in out:
            return ""
        why = _last_line(out) or _last_line(err) or f"exit status {p.returncode}"
        if p.returncode == 4:  # (the host's Python could not take the wheels)
            return f"{host}: could not install Odium with {self.python}: {why} " \
                   + bootstrap.mismatch_hint()
        return f"{host}: {why}"


def _partial(ssh: SSH, host: str, names: list[str], pids: dict[str, int],
             p: subprocess.CompletedProcess[str], d: str) -> str:
    """A host that started some of its nodes, then failed: those stopped, the credential
    removed (the launch's undo stops only the hosts that started)."""
    stop_host(ssh, host, list(pids.values()), d)
    return f"{host}: started {len(pids)} of {len(names)} nodes, then: " + (
        _last_line(p.stderr) or f"exit status {p.returncode}")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def stop_script(pids: list[int], d: str) -> str:
    """Signal each node's process group, wait up to STOP_WAIT s (looking every 0.1 s) until
    the nodes and every process they started (their workers, in sessions of their own) have
    ended, kill what is left, remove the credential. A zombie counts as ended."""
    ps = " ".join(str(p) for p in pids)
    rm = f'rm -f "{d}/credential"' if d else ":"
    return "\n".join([
        f"P='{ps}'",
        'ALL=$P; K=$P',  # the nodes' descendants, to any depth, before they are signalled
        'while [ -n "$K" ]; do N=""; for p in $K; do '
        'N="$N $(ps -o pid= --ppid "$p" 2>/dev/null)"; done; K=$(echo $N); ALL="$ALL $K"; done',
        'alive() { s=$(sed "s/.*) //" "/proc/$1/stat" 2>/dev/null | cut -c1); '
        '[ -n "$s" ] && [ "$s" != Z ]; }',
        'for p in $P; do kill -TERM -- "-$p" 2>/dev/null || kill -TERM "$p" 2>/dev/null || :; '
        "done",
        "i=0",
        f"while [ $i -lt {STOP_WAIT * 10} ]; do",
        '  left=0; for p in $ALL; do alive "$p" && left=1; done',
        '  [ "$left" = 0 ] && break',
        "  sleep 0.1; i=$((i + 1))",
        "done",
        'for p in $ALL; do alive "$p" && kill -KILL "$p" 2>/dev/null; done; :',
        rm, ""])


def stop_host(ssh: SSH, host: str, pids: list[int], d: str) -> str:
    cmd = ssh.ssh_command(host, stop_script(pids, d))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True,
                           timeout=STOP_WAIT + CONNECT_TIMEOUT + 10)
    except (FileNotFoundError, subprocess.TimeoutExpired) as e:
        return f"{host}: could not stop its nodes ({e})"
    if p.returncode != 0:
        return f"{host}: could not stop its nodes: {_last_line(p.stderr) or p.returncode}"
    return f"{host}: stopped {len(pids)} node(s)"


def stop_ssh(detail: dict[str, Any]) -> list[str]:
    """Stop what an SSH launch started, from its recorded detail."""
    conf = detail.get("ssh") or {}
    hosts = detail.get("hosts") or {}
    if not hosts:
        return []
    d = str(detail.get("dir", ""))
    ssh = SSH(list(hosts), ssh_config=conf.get("config"), ssh_options=list(
        conf.get("options") or []), remote_dir=d or "$HOME")  # (checks hosts and dir)
    with ThreadPoolExecutor(max_workers=min(16, len(hosts))) as pool:
        return list(pool.map(lambda h: stop_host(ssh, h, [int(p) for p in hosts[h]["pids"]
                                                             .values()], d),
                             hosts))


__all__ = ["SSH", "launch_names", "stop_ssh"]
