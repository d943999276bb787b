"""The ``odium`` commands of the job queue: submit, jobs (list, cancel), job."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ..api.progress import wait_job
from ..core.jobs import TERMINAL, JobStatus
from ..core.progress import bar, counts_line
from ..core.term import clean_lines
from ..errors import ConfigError
from ..errors import TimeoutError as OdiumTimeout
from .commands import ago, connect, print_table, read_code

if TYPE_CHECKING:
    from ..api.admin import Admin

FINAL = {s.value for s in TERMINAL} | {"unknown"}


def cmd_submit(args: argparse.Namespace) -> int:
    code = read_code(args, "submit")
    if not code.strip():
        raise ConfigError("the job's code is empty")
    with connect(args) as admin:
        job = admin.submit(code, nodes=args.nodes, retries=args.retries, timeout=args.timeout,
                           require_state=args.require_state, job_id=args.job_id)
        if args.wait is None:
            print(json.dumps({"id": job.id}) if args.json else job.id)
            return 0
        try:  # its status on stderr meanwhile, if that is a terminal
            wait_job(job, args.wait)
        except OdiumTimeout:
            pass  # shown as it is now
        info = admin.job(job.id)
    return _print_job(info, args.json, brief=True)


def _print_job(info: dict[str, Any], as_json: bool, brief: bool = False) -> int:
    if as_json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(format_job(info, brief=brief))
    return 0 if info.get("status") == "done" else 1


def format_job(info: dict[str, Any], brief: bool = False) -> str:
    """One job for people: status line, then output, value or error, then its moves."""
    lines = [f"{info['id']}  {info['status']}"
             + (f" on {info['node']}" if info.get("node") else "")
             + (f"  (runs {info.get('attempts', 0)}, retries {info.get('retries', 0)})"
                if not brief else "")]
    if info.get("reason"):
        lines.append(f"  {info['reason']}")
    if info.get("waiting"):
        lines.append(f"  waiting: {info['waiting']}")
    for stream in ("stdout", "stderr"):
        if info.get(stream):
            lines.extend("  " + ln for ln in str(info[stream]).rstrip("\n").split("\n"))
    if info.get("status") == "done" and info.get("value_repr") is not None:
        note = "" if info.get("value_json", True) else "   (not JSON: shown as repr)"
        lines.append(f"  => {info['value_repr']}{note}")
    err = info.get("error")
    if err and info.get("status") != "done":
        tb = err.get("traceback") or ""
        lines.extend("  " + ln for ln in (tb.rstrip("\n").split("\n") if tb else
                                          [f"{err.get('ename', '')}: {err.get('evalue', '')}"]))
    if not brief:
        for e in info.get("events") or []:
            t = datetime.fromtimestamp(e["ts"]).strftime("%H:%M:%S.%f")[:-3]
            where = f" [{e['node']}]" if e.get("node") else ""
            lines.append(f"  {t} {e['prev'] or '-':>9} -> {e['status']:<9}{where} "
                         f"{e.get('detail', '')}".rstrip())
    # a node's text: each line one line, control characters shown as escapes
    return "\n".join(clean_lines(ln).replace("\n", "\\n") for ln in lines)


def cmd_jobs(args: argparse.Namespace) -> int:
    action = args.action or "list"
    if action == "cancel":
        if not args.job_ids:
            raise ConfigError("jobs cancel needs the id of the job (see: odium jobs)")
        with connect(args) as admin:
            status = admin.cancel_jobs(args.job_ids)
        bad = 0
        for j in args.job_ids:
            st = status.get(j, "unknown")
            if st == "cancelled":
                print(f"{j} cancelled")
            elif st == "unknown":
                bad += 1
                print(f"odium: no job {j}", file=sys.stderr)
            else:
                bad += 1
                print(f"odium: job {j} is not cancelled: it is {st}", file=sys.stderr)
        return 0 if not bad else 1
    if args.job_ids:
        raise ConfigError("odium jobs lists jobs; to see one: odium job ID")
    if args.follow and args.json:
        raise ConfigError("odium jobs --follow prints for people; for a program, "
                          "odium jobs --json (again) or odium job ID --wait S --json")
    with connect(args) as admin:
        jobs = admin.jobs(args.status, args.n)
        if args.follow:
            _print_jobs(jobs, args.status)
            return follow(admin, [j["id"] for j in jobs])
    if args.json:
        print(json.dumps(jobs, indent=2))
        return 0
    _print_jobs(jobs, args.status)
    return 0


def _print_jobs(jobs: list[dict[str, Any]], status: str | None) -> None:
    rows = [("ID", "STATUS", "NODE", "RUNS", "CREATED", "WHAT")]
    for j in jobs:
        rows.append((j["id"], j["status"], j["node"] or "-", str(j["attempts"]),
                     ago(j["created"]), j["what"]))
    print_table(rows)
    if len(rows) == 1:
        print("no jobs" + (f" with status {status}" if status else "")
              + "; queue one with: odium submit -c CODE")


FOLLOW_EVERY = 0.5  # seconds between two looks at the jobs followed
ORDER = [s.value for s in JobStatus]


def follow(admin: Admin, ids: list[str]) -> int:
    """``odium jobs --follow``: how many of these jobs have finished, by status, until all
    have (or Ctrl-C). On a terminal one line rewritten in place, with a bar; otherwise (a pipe,
    a log) a plain line each time the counts change. 0 when every one ended done, 1 when one
    did not, 130 after Ctrl-C (the jobs go on)."""
    tty = sys.stdout.isatty()
    status: dict[str, str] = {}
    left, shown = list(ids), ""
    started = time.monotonic()
    try:
        while True:
            for info in admin.wait_jobs(left, FOLLOW_EVERY) if left else []:
                status[info["id"]] = str(info.get("status"))
            left = [j for j in ids if status.get(j) not in FINAL]
            line = counts_line(Counter(status.values()), ORDER, len(ids) - len(left), len(ids))
            if tty:
                sys.stdout.write(f"\r{bar(len(ids) - len(left), len(ids))} {line} · "
                                 f"{time.monotonic() - started:.0f} s\x1b[K")
                sys.stdout.flush()
            elif line != shown:
                print(line, flush=True)
            shown = line
            if not left:
                break
    except KeyboardInterrupt:
        if tty:
            print()
        print("odium: stopped following; the jobs go on (see: odium jobs)", file=sys.stderr)
        return 130
    if tty:
        print()
    return 0 if all(status.get(j) == "done" for j in ids) else 1


def cmd_job(args: argparse.Namespace) -> int:
    if not args.job_id:
        raise ConfigError("which job? give its id (see: odium jobs)")
    with connect(args) as admin:
        info = admin.job(args.job_id, wait=args.wait)
    _print_job(info, args.json)
    return 0 if info["status"] in ("done", "queued", "assigned", "running") else 1

