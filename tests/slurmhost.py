"""A real one-machine Slurm cluster for tests of ``odium launch slurm``.

``SlurmCluster(tmp)`` starts, from files it writes under ``tmp`` only (nothing of the
system's /etc, /run or /var is read for configuration, nor changed):

- ``munged`` (foreground, as root with ``--force``) with its own key, socket, pid, log and
  seed files under ``tmp/munge``;
- ``slurmctld -D`` and ``slurmd -D``, configured by ``tmp/slurm.conf``: one node (this
  host, named by its short hostname, reached at 127.0.0.1, with the CPUs and memory
  ``slurmd -C`` sees), one default partition, ``SlurmUser=root``, free loopback-chosen
  ports, no cgroups (``proctrack/linuxproc``, ``task/none``), no accounting. Each daemon
  runs under a small reaper, a Python process that is a child subreaper
  (``PR_SET_CHILD_SUBREAPER``): ``slurmstepd`` and the job processes it starts stay its
  descendants instead of being re-parented to PID 1 (which, in a container, may never
  reap them).

``SlurmCluster(tmp, nodes=N)`` (N > 1) makes N Slurm nodes of this one host instead,
``n1`` ... ``nN`` (``nodes``; Debian's slurmd is built with ``--enable-multiple-slurmd``):
one ``slurmd -N nI`` each, on its own port, with its own spool (``tmp/spool/nI``), pid and
log (``tmp/log/slurmd-nI.log``), and each with all of this host's CPUs and memory.

``start()`` returns once ``sinfo`` shows every node ``idle`` (polled against a deadline).
Clients find the cluster through ``env`` (``SLURM_CONF`` and a marker, ``ODIUM_SLURM_
CLUSTER``, which jobs inherit with sbatch's default ``--export=ALL``); ``environ()`` is a
whole environment for a child process, without any ``SLURM_*`` variable inherited from a
Slurm the tests themselves might run under.

``stop()`` (also on leaving the ``with`` block, and when ``start()`` fails) cancels every job
and waits for them to end (SIGKILLing, after 1 s, the processes of a job that ignores
SIGTERM), stops slurmd, slurmctld and munged, then kills whatever of the
cluster is left: the reapers' descendants and any process whose environment or command
line names this cluster (its marker, its ``SLURM_CONF`` or its directory), and waits until
they are gone. It removes no file: logs (``tmp/log``), job output (``tmp/jobs``, the default
submit directory) and state are the test's to inspect.

Jobs run as the submitting user (root here) on this host. A job that runs Python should
name the interpreter (``sys.executable``): ``PATH`` is the submitter's, which need not hold
the venv's ``bin``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

MARK = "ODIUM_SLURM_CLUSTER"  # environment variable naming the cluster a process belongs to

DAEMONS = ("munged", "slurmctld", "slurmd", "slurmstepd")
CLIENTS = ("munge", "sbatch", "srun", "squeue", "sinfo", "scancel", "scontrol")

# states of a job that has ended (squeue %T); any other state (PENDING, RUNNING,
# COMPLETING, CONFIGURING, SUSPENDED, ...) is of a job not yet ended
ENDED = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
                   "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT", "REVOKED"})

# A child subreaper running one daemon: signals are passed on to it, every orphan below it
# is reaped, and it exits (with the daemon's status) once it has no child left.
_REAPER = r"""
import ctypes, os, signal, sys
child = 0
def forward(sig, _frame):
    if child:
        try:
            os.kill(child, sig)
        except ProcessLookupError:
            pass
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, forward)
if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    sys.exit("reaper: prctl(PR_SET_CHILD_SUBREAPER) failed")
child = os.fork()
if child == 0:
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)
    os.execvp(sys.argv[1], sys.argv[1:])
code = 1
while True:
    try:
        pid, status = os.waitpid(-1, 0)
    except ChildProcessError:
        break
    if pid == child:
        code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""

_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def _which(name: str) -> str | None:
    """The path of a program, looked for in PATH and then in the sbin directories (root's
    PATH may lack them)."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN))


def slurm_unavailable() -> str | None:
    """Why a SlurmCluster cannot run here (one line), or None when it can."""
    if not sys.platform.startswith("linux"):
        return f"Slurm tests need Linux, not {sys.platform}"
    if os.geteuid() != 0:
        return "Slurm tests need root (slurmd runs jobs as their user; SlurmUser=root)"
    missing = [name for name in DAEMONS + CLIENTS if _which(name) is None]
    if missing:
        return f"Slurm or munge not installed (missing {', '.join(missing)})"
    return None


def _free_port() -> int:
    """A TCP port free on this machine now (chosen by the kernel)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _node_hardware() -> str:
    """What slurmd will report of this machine, as NodeName line parameters (CPUs=...)."""
    out = subprocess.run([_which("slurmd") or "slurmd", "-C"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    line = out.splitlines()[0].split()
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore",
            "RealMemory")
    return " ".join(w for w in line if w.split("=", 1)[0] in keep)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # gone, or not ours to read
        return b""


def _processes() -> dict[int, tuple[int, bytes, bytes]]:
    """Every live process (not zombies): pid -> (parent pid, environ, cmdline)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _read(f"/proc/{entry}/stat")
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) < 2 or fields[0] in (b"Z", b"X"):
            continue
        table[int(entry)] = (int(fields[1]), _read(f"/proc/{entry}/environ"),
                             _read(f"/proc/{entry}/cmdline"))
    return table


def _ancestors() -> set[int]:
    """This process and its ancestors: never the cluster's, whatever their environment."""
    found, pid = set(), os.getpid()
    while pid > 1 and pid not in found:
        found.add(pid)
        stat = _read(f"/proc/{pid}/stat")
        fields = stat[stat.rfind(b")") + 2:].split()
        pid = int(fields[1]) if len(fields) > 1 else 0
    return found


def _poll(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll pred until it returns something truthy; TimeoutError after timeout s."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def _kill(pids: Iterable[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class SlurmCluster:
    """One-machine Slurm (munged, slurmctld, slurmd) living in ``tmp``; see the module text.

    ``with SlurmCluster(tmp) as cluster:`` starts it and stops it, as ``start()`` and
    ``stop()`` do. Job ids are strings, as sbatch prints them.
    """

    def __init__(self, tmp: Path, *, partition: str = "debug", start_timeout: float = 30.0,
                 extra_conf: str = "", nodes: int = 1) -> None:
        if nodes < 1:
            raise ValueError(f"nodes must be >= 1, not {nodes}")
        self.tmp = Path(tmp)
        self.partition = partition
        self.start_timeout = start_timeout
        self.extra_conf = extra_conf
        self.conf = self.tmp / "slurm.conf"
        self.munge_dir = self.tmp / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.log_dir = self.tmp / "log"
        self.jobs_dir = self.tmp / "jobs"
        self.host = socket.gethostname().split(".")[0]
        # one node: this host's name; more: n1, n2, ... (one slurmd each, all on this host)
        self.nodes = [self.host] if nodes == 1 else [f"n{i}" for i in range(1, nodes + 1)]
        self.node = self.nodes[0]
        self.name = f"odium{secrets.token_hex(4)}"
        self.env: dict[str, str] = {"SLURM_CONF": str(self.conf), MARK: self.name}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[Any] = []
        self.start_seconds: float | None = None
        self.stop_seconds: float | None = None

    # --- life ---------------------------------------------------------------------------

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> SlurmCluster:
        """Write the configuration, start the daemons, return once the node is idle."""
        reason = slurm_unavailable()
        if reason:
            raise RuntimeError(reason)
        t0 = time.monotonic()
        try:
            for d in ("state", "spool", "run", "log", "jobs"):
                (self.tmp / d).mkdir(parents=True, exist_ok=True)
            self._start_munged()
            self.conf.write_text(self._slurm_conf())
            self._spawn("slurmctld", [_which("slurmctld") or "slurmctld", "-D",
                                      "-f", str(self.conf)], reaped=True)
            for node in self.nodes:
                self._spawn(self._slurmd(node), [_which("slurmd") or "slurmd", "-D", "-f",
                                                 str(self.conf), "-N", node], reaped=True)
            _poll(self._node_idle, self.start_timeout,
                  f"node{'s' if len(self.nodes) > 1 else ''} {','.join(self.nodes)} idle in sinfo")
        except BaseException as e:
            logs = self.log_tail()
            self.stop()
            if isinstance(e, Exception):
                raise RuntimeError(f"Slurm did not start: {e}\n{logs}") from e
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def _start_munged(self) -> None:
        """A munged of our own: its key, socket, pid, log and seed under tmp/munge."""
        self.munge_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chmod(self.munge_dir, 0o755)  # clients of any user reach the socket
        key = self.munge_dir / "munge.key"
        if not key.exists():
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(1024))
        d = self.munge_dir
        self._spawn("munged", [_which("munged") or "munged", "--foreground", "--force",
                               f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={d / 'munged.pid'}",
                               f"--log-file={d / 'munged.log'}",
                               f"--seed-file={d / 'munged.seed'}"], reaped=False)
        _poll(lambda: self._alive_or_fail("munged") and self.munge_socket.exists(),
              self.start_timeout, "munged's socket")

    def _slurmd(self, node: str) -> str:
        """The name (in _procs, and of its tmp/log/<name>.out) of the slurmd of a node."""
        return "slurmd" if len(self.nodes) == 1 else f"slurmd-{node}"

    def _node_lines(self) -> str:
        """The NodeName lines: one node, or (nodes > 1, a slurmd each on this host, each on
        its own port) several, each with all of this host's CPUs and memory."""
        hardware = _node_hardware()
        if len(self.nodes) == 1:
            return (f"NodeName={self.node} NodeAddr=127.0.0.1 NodeHostname={self.host} "
                    f"{hardware} State=UNKNOWN")
        return "\n".join(f"NodeName={node} NodeAddr=127.0.0.1 NodeHostname={self.host} "
                         f"Port={_free_port()} {hardware} State=UNKNOWN" for node in self.nodes)

    def _slurm_conf(self) -> str:
        t = self.tmp
        # several slurmd on one host: each its own spool, pid and log (%n: its node's name)
        n = "" if len(self.nodes) == 1 else "-%n"
        for node in self.nodes if n else ():
            (t / "spool" / node).mkdir(parents=True, exist_ok=True)
        return f"""\
# written by tests/slurmhost.py: a one-machine cluster living in {t}
ClusterName={self.name}
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
StateSaveLocation={t / "state"}
SlurmdSpoolDir={t / "spool" / "%n" if n else t / "spool"}
SlurmctldPidFile={t / "run" / "slurmctld.pid"}
SlurmdPidFile={t / "run" / f"slurmd{n}.pid"}
SlurmctldLogFile={self.log_dir / "slurmctld.log"}
SlurmdLogFile={self.log_dir / f"slurmd{n}.log"}
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={t / "plugstack.conf"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmdParameters=config_overrides
MailProg=/bin/true
KillWait=2
InactiveLimit=0
MinJobAge=300
{self.extra_conf}
{self._node_lines()}
PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

    def _spawn(self, name: str, cmd: list[str], *, reaped: bool) -> None:
        """Start a daemon in the foreground, its output in tmp/log/<name>.out."""
        if reaped:
            cmd = [sys.executable, "-c", _REAPER, *cmd]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = open(self.log_dir / f"{name}.out", "ab")
        self._logs.append(out)
        self._procs[name] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                             stderr=subprocess.STDOUT, cwd=self.tmp,
                                             env=self.environ(), start_new_session=True)

    def _alive_or_fail(self, name: str) -> bool:
        proc = self._procs[name]
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with status {proc.returncode}")
        return True

    def _node_idle(self) -> bool:
        for name in self._procs:
            self._alive_or_fail(name)
        r = self._run("sinfo", "-h", "-N", "-n", ",".join(self.nodes), "-o", "%N %T",
                      check=False, timeout=15)
        states = dict(line.split() for line in r.stdout.splitlines() if len(line.split()) == 2)
        return r.returncode == 0 and states == {node: "idle" for node in self.nodes}

    def stop(self) -> None:
        """Cancel every job, stop the daemons, kill what is left of the cluster."""
        t0 = time.monotonic()
        try:
            if self._procs.get("slurmctld") and self._procs["slurmctld"].poll() is None:
                self._cancel_all()
        finally:
            for name in (*map(self._slurmd, self.nodes), "slurmctld", "munged"):
                self._end(name)
            self._kill_leftovers()
            for f in self._logs:
                f.close()
            self._logs.clear()
        self.stop_seconds = time.monotonic() - t0

    def _cancel_all(self, timeout: float = 20.0) -> None:
        """scancel every job not ended and wait until Slurm has ended them all. A job given
        1 s that still runs (it ignores SIGTERM: Slurm would SIGKILL it KillWait s later,
        and then poll for its end for seconds more) has its processes SIGKILLed now.
        What is left of a job once it has ended escaped Slurm and is killed by _end."""
        try:
            jobs = [job for job, _ in self.squeue()]
            if not jobs:
                return
            self._run("scancel", *jobs, check=False)
            try:
                _poll(lambda: not self.squeue(), 1.0, "jobs to end")
            except TimeoutError:
                _kill(self.job_pids(steps=False))
                _poll(lambda: not self.squeue(), timeout, "jobs to end")
        except (TimeoutError, RuntimeError, subprocess.SubprocessError):
            pass  # what is left is killed by _end and _kill_leftovers

    def _end(self, name: str, timeout: float = 10.0) -> None:
        """SIGTERM a daemon (its reaper passes it on) and wait for it. Once the daemon has
        gone, what its reaper still holds (job processes that outlived their job) is
        SIGKILLed, so that the reaper ends too; all of it is SIGKILLed after timeout s."""
        proc = self._procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        program = name.split("-")[0]  # slurmd-n1: a slurmd
        exe = (_which(program) or program).encode()
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            table = _processes()
            below = self._descendants({proc.pid}, table) - {proc.pid}
            if not any(table[pid][2].startswith(exe + b"\0") for pid in below):
                _kill(below)
            time.sleep(0.02)
        if proc.poll() is None:
            _kill(self._descendants({proc.pid}) - {proc.pid})
            proc.kill()
        proc.wait()

    def _kill_leftovers(self, timeout: float = 10.0) -> None:
        """SIGKILL every process of this cluster still there; wait until they are gone."""
        left = self.cluster_pids()
        deadline = time.monotonic() + timeout
        while left and time.monotonic() < deadline:
            _kill(left)
            time.sleep(0.05)
            left = self.cluster_pids()
        if left:
            raise RuntimeError(f"Slurm processes survive SIGKILL: {sorted(left)}")

    # --- processes ----------------------------------------------------------------------

    def _descendants(self, roots: set[int],
                     table: dict[int, tuple[int, bytes, bytes]] | None = None) -> set[int]:
        table = _processes() if table is None else table
        found = set(roots) & set(table)
        grew = True
        while grew:
            more = {pid for pid, (ppid, _, _) in table.items() if ppid in found} - found
            found |= more
            grew = bool(more)
        return found

    def _belongs(self, environ: bytes, cmdline: bytes) -> bool:
        env_marks = (f"{MARK}={self.name}\0".encode(), f"SLURM_CONF={self.conf}\0".encode())
        environ = b"\0" + environ
        return (any(b"\0" + m in environ for m in env_marks)
                or str(self.tmp).encode() + b"/" in cmdline)

    def cluster_pids(self) -> set[int]:
        """Live processes of this cluster: daemons, reapers, slurmstepd, job processes (and
        any process whose environment names this cluster), never this process."""
        table = _processes()
        roots = {p.pid for p in self._procs.values() if p.poll() is None}
        roots |= {pid for pid, (_, env, cmd) in table.items() if self._belongs(env, cmd)}
        return self._descendants(roots, table) - _ancestors()

    def job_pids(self, jobid: str | None = None, *, steps: bool = True) -> set[int]:
        """Live processes of a job of this cluster (of any job when jobid is None): every
        process carrying its SLURM_JOB_ID and, unless steps is False, its slurmstepds."""
        table = _processes()
        env_mark = b"\0SLURM_JOB_ID=" + (f"{jobid}\0".encode() if jobid else b"")
        step_mark = b"slurmstepd: [" + (f"{jobid}.".encode() if jobid else b"")
        pids = set()
        for pid in self.cluster_pids():
            _, env, cmd = table.get(pid, (0, b"", b""))
            if env_mark in b"\0" + env or (steps and cmd.startswith(step_mark)):
                pids.add(pid)
        return pids

    # --- clients ------------------------------------------------------------------------

    def environ(self) -> dict[str, str]:
        """A whole environment for a Slurm client: this one's, less any inherited Slurm
        variable, plus ``env``."""
        prefixes = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SINFO_", "SCANCEL_")
        base = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
        return {**base, **self.env}

    def _run(self, *cmd: str, check: bool = True, timeout: float = 30.0,
             input: str | None = None, cwd: Path | None = None
             ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                           input=input, env=self.environ(), cwd=cwd or self.jobs_dir)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def sbatch(self, script_text: str | None, *args: str, cwd: Path | None = None) -> str:
        """Submit a batch script (its text; None or "" with ``--wrap`` in args): the job id.
        Output goes to ``cwd`` (tmp/jobs by default) unless args say otherwise."""
        r = self._run("sbatch", "--parsable", *args, input=script_text or None, cwd=cwd)
        return r.stdout.strip().split(";")[0]

    def squeue(self) -> list[tuple[str, str]]:
        """Jobs not ended (pending, running, completing...): [(job id, state)]."""
        r = self._run("squeue", "-h", "-o", "%i %T")
        return [(w[0], w[1]) for w in (line.split() for line in r.stdout.splitlines()) if w]

    def job_state(self, jobid: str) -> str | None:
        """A job's state as squeue shows it (RUNNING, COMPLETED, CANCELLED...), or None when
        slurmctld no longer knows it."""
        r = self._run("squeue", "-h", "-t", "all", "-j", str(jobid), "-o", "%T", check=False)
        state = r.stdout.strip()
        return state if r.returncode == 0 and state else None

    def scancel(self, jobid: str, *args: str) -> None:
        self._run("scancel", *args, str(jobid))

    def wait_job_gone(self, jobid: str, timeout: float = 30.0) -> str | None:
        """Wait until a job has ended and none of its processes is left; its last state."""
        def ended() -> bool:
            state = self.job_state(jobid)
            return (state is None or state in ENDED) and not self.job_pids(jobid)

        _poll(ended, timeout, f"job {jobid} to end")
        return self.job_state(jobid)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of every daemon log, for a failure's message."""
        out = []
        for path in sorted(self.log_dir.glob("*")) + [self.munge_dir / "munged.log"]:
            if path.is_file():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)
