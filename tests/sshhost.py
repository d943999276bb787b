"""A real "remote host" for tests of ``odium launch ssh``: OpenSSH's sshd in a network namespace.

``SshHost(tmp)`` makes a network namespace (``odssh-<pid>-<n>``), joins it to this (the
test's) namespace by a veth pair on a free private /29 (``host_address``, the .1, on this
side; ``address``, the .2, in the namespace), loopback up there and IPv6 off on every
interface it made; generates an ed25519 host key and an ed25519 user key (no passphrase)
under ``tmp``; writes an sshd_config under ``tmp`` and runs ``/usr/sbin/sshd -D -e`` inside
the namespace (``ip netns exec``) on the namespace's address, port 22; and writes a
known_hosts file and an ssh client config (``Host <name>``, host-key checking on, BatchMode)
so that ``ssh -F host.config_path <name> CMD`` works. ``SendEnv`` is not in that config:
the launcher under test decides what travels; sshd accepts ``ODIUM_*``.

The namespace shares this machine's filesystem, users and PID space: a command run over ssh
runs as root (home /root, the real one: give remote Odium an explicit home under ``tmp``),
and can run /work/venv/bin/python ("Odium preinstalled"). A process left running in the
background over ssh outlives its session (its parent is then init, not the test) but not
``stop()``: that ends every process in the namespace (``ip netns pids``, SIGTERM then
SIGKILL), deletes the namespace and the veth pair, and fails loudly when any of it is left.
A hub in this namespace reaches the remote host at ``address``; the remote host reaches a
hub listening on ``host_address``. Nothing here sends a packet anywhere else.

Needs root, ``ip netns`` and Debian's openssh-server (``ssh_unavailable()`` says why not).
Typical fixture::

    @pytest.fixture
    def lab(tmp_path):
        if (why := ssh_unavailable()):
            pytest.skip(why)
        with SshHost(tmp_path / "ssh") as host:
            yield host
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import psutil

from tests.netns import ip as _ip
from tests.netns import no_ipv6 as _no_ipv6
from tests.netns import run as _run
from tests.netns import taken_networks

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = "/run/sshd"  # compiled into Debian's sshd; the (absent) service would make it
POOL = ipaddress.IPv4Network("10.232.0.0/16")  # the /29s are taken from here
SSHD_NAMES = {"sshd", "sshd-session", "sshd-auth"}  # 9.8 and later split sshd in three
_serial = itertools.count(1)


def _account_locked(user: str) -> bool:
    """sshd without PAM refuses every login to an account whose password starts with '!'."""
    try:
        for line in Path("/etc/shadow").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == user and len(fields) > 1:
                return fields[1].startswith("!")
    except OSError:
        pass
    return False


@functools.cache
def ssh_unavailable() -> str | None:
    """Why an ``SshHost`` cannot run here, in one line; None when it can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root: makes a network namespace and a veth pair, runs sshd"
    if shutil.which("ip") is None:
        return "needs the ip command (iproute2)"
    if not os.access(SSHD, os.X_OK):
        return f"needs {SSHD} (apt-get install openssh-server)"
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"needs {tool} (apt-get install openssh-client)"
    try:
        pwd.getpwnam("sshd")
    except KeyError:
        return "sshd's privilege separation user 'sshd' does not exist"
    user = pwd.getpwuid(os.geteuid()).pw_name
    if _account_locked(user):
        return f"the account {user} is locked ('!' in /etc/shadow): sshd (UsePAM no) refuses it"
    probe = f"odssh-{os.getpid()}-probe"
    p = _run("ip", "netns", "add", probe)
    if p.returncode != 0:
        return f"ip netns add is refused here ({p.stderr.strip()})"
    _run("ip", "netns", "del", probe)
    return None


def _free_subnet(prefixlen: int = 29) -> ipaddress.IPv4Network:
    """A /29 of POOL that no address or route of this machine overlaps, picked at random
    (two hosts made at once by two test processes rarely pick the same)."""
    taken = taken_networks()
    size = 2 ** (32 - prefixlen)
    count = POOL.num_addresses // size
    for _ in range(1000):
        net = ipaddress.IPv4Network((int(POOL.network_address) + random.randrange(count) * size,
                                     prefixlen))
        if not any(net.overlaps(t) for t in taken):
            return net
    raise RuntimeError(f"no free /{prefixlen} in {POOL} here")


def _keygen(path: Path, comment: str) -> str:
    """An ed25519 key pair at ``path`` (and .pub), no passphrase; the public key's line."""
    p = _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path))
    if p.returncode != 0:
        raise RuntimeError(f"ssh-keygen -f {path} -> {p.returncode}: {p.stderr.strip()}")
    return path.with_name(path.name + ".pub").read_text().strip()


_SSHD_KNOWS: dict[str, bool] = {}


def _sshd_knows(option: str, config: Path) -> bool:
    """Whether this sshd takes ``option`` (e.g. PerSourcePenalties, new in 9.8) on top of the
    valid ``config``: asked once a process (``sshd -t``)."""
    if option not in _SSHD_KNOWS:
        p = _run(SSHD, "-t", "-f", str(config), "-o", option)
        _SSHD_KNOWS[option] = p.returncode == 0
    return _SSHD_KNOWS[option]


def _describe(pids: Sequence[int]) -> str:
    out = []
    for pid in pids:
        try:
            out.append(f"{pid} {' '.join(psutil.Process(pid).cmdline())!r}")
        except psutil.Error:
            out.append(f"{pid} (gone)")
    return ", ".join(out) or "none"


class SshHost:
    """sshd in a network namespace of its own, reachable as ``name`` with ``config_path``."""

    def __init__(self, tmp: Path, name: str = "lab1") -> None:
        self.tmp = Path(tmp)
        self.name = name
        n = next(_serial)
        self.ns = f"odssh-{os.getpid()}-{n}"
        self.host_if = f"odh{os.getpid()}x{n}"  # <= 15 characters, as link names must be
        self.ns_if = f"odn{os.getpid()}x{n}"
        self.port = 22  # the namespace's own port space: always free there
        self.user = pwd.getpwuid(os.geteuid()).pw_name
        self.subnet: ipaddress.IPv4Network | None = None
        self.address = ""  # the namespace's end, where sshd listens
        self.host_address = ""  # this namespace's end: a hub here listens on it
        self.spare_address = ""  # in the subnet, nobody's: connecting to it times out
        self.host_key = self.tmp / "ssh_host_ed25519_key"
        self.user_key = self.tmp / "id_ed25519"
        self.authorized_keys = self.tmp / "authorized_keys"
        self.sshd_config = self.tmp / "sshd_config"
        self.known_hosts = self.tmp / "known_hosts"
        self.config_path = self.tmp / "ssh_config"
        self.log_path = self.tmp / "sshd.log"
        self.sshd: subprocess.Popen[bytes] | None = None
        self._made_ns = self._made_link = False
        self._host_pub = ""

    def __enter__(self) -> SshHost:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # --- start ------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> SshHost:
        """Network, keys, configs, sshd; returns once sshd answers. Undoes it all on failure."""
        why = ssh_unavailable()
        if why:
            raise RuntimeError(f"SshHost cannot run here: {why}")
        if self._made_ns:
            raise RuntimeError(f"SshHost {self.name} is running already: stop() it first")
        self.tmp.mkdir(parents=True, exist_ok=True)
        try:
            self._network()
            self._host_pub = _keygen(self.host_key, f"odium-test-host-{self.name}")
            self.authorized_keys.write_text(_keygen(self.user_key, "odium-test-user") + "\n")
            os.makedirs(PRIVSEP_DIR, mode=0o755, exist_ok=True)
            self._write_sshd_config()
            self._start_sshd(timeout)
            self.known_hosts.write_text(f"{self._host_entry(self.address)} {self._host_pub}\n")
            self.write_config(self.config_path.name)
        except BaseException:
            self.stop()
            raise
        return self

    def _network(self) -> None:
        self.subnet = _free_subnet()
        hosts = list(self.subnet.hosts())
        self.host_address, self.address, self.spare_address = map(str, hosts[:3])
        _ip("netns", "add", self.ns)
        self._made_ns = True
        _no_ipv6(self.ns, "all")
        _no_ipv6(self.ns, "default")
        _ip("-n", self.ns, "link", "set", "lo", "up")
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if,
            "netns", self.ns)
        self._made_link = True
        _no_ipv6(None, self.host_if)
        plen = self.subnet.prefixlen
        _ip("addr", "add", f"{self.host_address}/{plen}", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        _ip("-n", self.ns, "addr", "add", f"{self.address}/{plen}", "dev", self.ns_if)
        _ip("-n", self.ns, "link", "set", self.ns_if, "up")

    def _write_sshd_config(self) -> None:
        lines = [
            f"ListenAddress {self.address}:{self.port}",
            f'HostKey "{self.host_key}"',
            f'PidFile "{self.tmp / "sshd.pid"}"',
            f'AuthorizedKeysFile "{self.authorized_keys}"',
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "StrictModes no",  # tmp is under /tmp, group/world-writable: strict modes refuse
            "UsePAM no",  # PAM's session modules (pam_loginuid) fail in containers
            "AcceptEnv ODIUM_*",
            "PrintMotd no",
            "PrintLastLog no",
            "X11Forwarding no",
            "UseDNS no",
            "MaxStartups 100",  # many launches at once: not dropped before authentication
            "MaxSessions 100",
            "LogLevel VERBOSE",  # the key that was accepted or refused, in sshd.log
        ]
        sftp = "/usr/lib/openssh/sftp-server"
        if os.path.exists(sftp):
            lines.append(f"Subsystem sftp {sftp}")  # scp uses sftp since OpenSSH 9.0
        self.sshd_config.write_text("\n".join(lines) + "\n")
        # 9.8+ penalises a source for refused keys and probes: lock out host_address, no
        if _sshd_knows("PerSourcePenalties=no", self.sshd_config):
            with open(self.sshd_config, "a") as f:
                f.write("PerSourcePenalties no\n")

    def _start_sshd(self, timeout: float) -> None:
        with open(self.log_path, "ab") as log:
            self.sshd = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, SSHD, "-D", "-e", "-f", str(self.sshd_config)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.sshd.poll() is not None:
                raise RuntimeError(f"sshd ended ({self.sshd.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd not answering after {timeout} s:\n{self.log()}")
            time.sleep(0.01)

    def _answers(self) -> bool:
        """Whether sshd accepts a connection and says its banner (a probe: no auth)."""
        try:
            with socket.create_connection((self.address, self.port), timeout=1.0) as s:
                return s.recv(64).startswith(b"SSH-")
        except OSError:
            return False

    def _host_entry(self, address: str, port: int | None = None) -> str:
        port = self.port if port is None else port
        return address if port == 22 else f"[{address}]:{port}"

    # --- client configs ---------------------------------------------------------------------

    def write_config(self, filename: str, *, hostname: str | None = None,
                     port: int | None = None, identity: Path | None = None,
                     known_hosts: Path | None = None, extra: Sequence[str] = ()) -> Path:
        """An ssh config ``tmp/filename`` with one ``Host <name>`` entry: by default the
        working one (``config_path``); any of its settings replaced, and the ``extra`` lines
        ("Keyword value") first in it, so that they win (ssh takes the first value it reads
        of each keyword). Returns its path."""
        path = self.tmp / filename
        lines = [
            f"Host {self.name}",
            *(f"    {line}" for line in extra),
            f"    HostName {hostname or self.address}",
            f"    Port {port or self.port}",
            f"    User {self.user}",
            f'    IdentityFile "{identity or self.user_key}"',
            "    IdentitiesOnly yes",  # no key of an agent's, nor ~/.ssh's
            f'    UserKnownHostsFile "{known_hosts or self.known_hosts}"',
            "    GlobalKnownHostsFile /dev/null",
            "    StrictHostKeyChecking yes",
            "    UpdateHostKeys no",
            "    BatchMode yes",
            "    ConnectTimeout 5",
        ]
        path.write_text("\n".join(lines) + "\n")
        return path

    def wrong_key_config(self) -> Path:
        """A config whose IdentityFile is another key, not authorized: ``Permission denied
        (publickey)``, exit status 255."""
        other = self.tmp / "id_ed25519_wrong"
        if not other.exists():
            _keygen(other, "odium-test-unauthorized")
        return self.write_config("ssh_config_wrong_key", identity=other)

    def unknown_host_config(self) -> Path:
        """A config whose known_hosts is empty: ``Host key verification failed.``, 255."""
        empty = self.tmp / "known_hosts_empty"
        empty.write_text("")
        return self.write_config("ssh_config_unknown_host", known_hosts=empty)

    def unresolvable_config(self) -> Path:
        """A config whose HostName does not resolve: ``Could not resolve hostname``, 255.
        (An empty label: glibc fails it without sending a DNS query; a plain unknown name
        would go to this machine's DNS server.)"""
        return self.write_config("ssh_config_unresolvable", hostname="odium-nosuch..invalid")

    def refused_config(self) -> Path:
        """A config with a port nobody listens on, in the namespace: ``Connection refused``."""
        return self.write_config("ssh_config_refused", port=2222)

    def unreachable_config(self, connect_timeout: int = 1) -> Path:
        """A config whose address, in the subnet, is nobody's: ARP goes unanswered; the
        connection times out after ``connect_timeout`` s (``Connection timed out``)."""
        return self.write_config("ssh_config_unreachable", hostname=self.spare_address,
                                 extra=[f"ConnectTimeout {connect_timeout}"])

    # --- using it ---------------------------------------------------------------------------

    def ssh_command(self, cmd: str, *, options: Sequence[str] = (),
                    config: Path | None = None) -> list[str]:
        """``ssh -F CONFIG OPTIONS NAME CMD``."""
        return ["ssh", "-F", str(config or self.config_path), *options, self.name, cmd]

    def run(self, cmd: str, *, options: Sequence[str] = (), config: Path | None = None,
            env: Mapping[str, str] | None = None,
            timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """``cmd`` on the remote host, over ssh (``env``: added to ssh's environment)."""
        return subprocess.run(self.ssh_command(cmd, options=options, config=config),
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})

    def log(self, lines: int = 40) -> str:
        """The end of sshd's log."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def pids(self, *, listener: bool = False) -> list[int]:
        """Every (live, not zombie) process in the namespace: sshd's per-connection processes
        and whatever was started over ssh; sshd's listener too only if ``listener``."""
        if not self._made_ns:
            return []
        p = _run("ip", "netns", "pids", self.ns)
        found = sorted(int(w) for w in p.stdout.split() if w.isdigit())
        if not listener and self.sshd is not None:
            found = [pid for pid in found if pid != self.sshd.pid]
        return found

    def not_sshd(self) -> list[int]:
        """The processes in the namespace that are not sshd's: what ssh started, still alive."""
        out = []
        for pid in self.pids():
            try:
                proc = psutil.Process(pid)
                exe = os.path.basename(proc.exe()) or proc.name()
            except psutil.Error:
                continue  # ended meanwhile
            if exe not in SSHD_NAMES:
                out.append(pid)
        return out

    def wait_no_processes_but_sshd(self, timeout: float = 10.0, *,
                                   sessions: bool = True) -> None:
        """Wait until nothing but sshd runs in the namespace; with ``sessions=False``, until
        nothing but its listener does (every ssh connection over, too). Fails with what is
        left after ``timeout`` s."""
        left = self.not_sshd if sessions else self.pids
        deadline = time.monotonic() + timeout
        while True:
            pids = left()
            if not pids:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"still running in {self.ns} after {timeout} s: "
                                     f"{_describe(pids)}")
            time.sleep(0.02)

    # --- stop -------------------------------------------------------------------------------

    def _end_all(self, grace: float) -> None:
        """SIGTERM to every process in the namespace, SIGKILL to what is left after ``grace``
        s; again while any is there (one may have started another meanwhile)."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0), (signal.SIGKILL, 5.0)):
            pids = self.pids(listener=True)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while self.pids(listener=True) and time.monotonic() < deadline:
                time.sleep(0.01)
        if self.sshd is not None:
            try:
                self.sshd.wait(5)  # our child: reaped here (init reaps the orphans, or not)
            except subprocess.TimeoutExpired:
                pass

    def leftovers(self) -> list[str]:
        """What of ours is still there: the namespace, the veth pair, processes in it."""
        pids = self.pids(listener=True)
        left = [f"processes {_describe(pids)}"] if pids else []
        if self.ns in _ip("netns", "list").split():
            left.append(f"namespace {self.ns}")
        for line in _ip("-o", "link", "show").splitlines():
            name = line.split(":")[1].strip().split("@")[0]
            if name in (self.host_if, self.ns_if):
                left.append(f"link {name}")
        return left

    def stop(self, grace: float = 5.0) -> None:
        """Every process in the namespace ended, the namespace and the veth pair deleted;
        fails (RuntimeError) when any of it is left. Idempotent."""
        if self._made_ns:
            self._end_all(grace)
            _run("ip", "netns", "del", self.ns)  # its end of the veth pair goes with it
        if self._made_link and _run("ip", "link", "show", self.host_if).returncode == 0:
            _run("ip", "link", "del", self.host_if)
        left = self.leftovers() if (self._made_ns or self._made_link) else []
        self._made_ns = self._made_link = False
        if left:
            raise RuntimeError(f"SshHost {self.name}: could not remove {left}")
