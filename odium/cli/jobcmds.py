"""The ``odium`` commands of the job queue: submit, jobs (list, cancel), job."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from typing import Any

from ..core.term import clean_lines
from ..errors import ConfigError
from .commands import ago, connect, print_table, read_code


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
        info = admin.job(job.id, wait=args.wait)
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
    with connect(args) as admin:
        jobs = admin.jobs(args.status, args.n)
    if args.json:
        print(json.dumps(jobs, indent=2))
        return 0
    rows = [("ID", "STATUS", "NODE", "RUNS", "CREATED", "WHAT")]
    for j in jobs:
        rows.append((j["id"], j["status"], j["node"] or "-", str(j["attempts"]),
                     ago(j["created"]), j["what"]))
    print_table(rows)
    if len(rows) == 1:
        print("no jobs" + (f" with status {args.status}" if args.status else "")
              + "; queue one with: odium submit -c CODE")
    return 0


def cmd_job(args: argparse.Namespace) -> int:
    if not args.job_id:
        raise ConfigError("which job? give its id (see: odium jobs)")
    with connect(args) as admin:
        info = admin.job(args.job_id, wait=args.wait)
    _print_job(info, args.json)
    return 0 if info["status"] in ("done", "queued", "assigned", "running") else 1

