"""The ``odium`` commands against a running hub (through ``odium.Admin``): nodes, run, keys,
state, token, log; and demo."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from ..core.term import clean, clean_lines
from ..errors import ConfigError


def connect(args: argparse.Namespace) -> Any:
    from ..api.admin import Admin  # no hub code: the commands against a hub start fast

    return Admin(args.home)


def ago(ts: float) -> str:
    if not ts:
        return "never"
    d = time.time() - ts
    return f"{d:.1f} s ago" if d < 120 else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


def cmd_nodes(args: argparse.Namespace) -> int:
    from ..core.results import short_state

    if args.forget is not None and args.pattern != "forget":
        raise ConfigError(f"odium nodes takes one pattern, not {args.pattern!r} and "
                          f"{args.forget!r} (to remove nodes: odium nodes forget NAME|GLOB)")
    if args.pattern == "forget":
        if not args.forget:
            raise ConfigError("nodes forget needs a node name or glob (see: odium nodes)")
        with connect(args) as admin:
            gone = admin.forget(args.forget)
        if args.json:
            print(json.dumps({"forgotten": gone}))
        else:
            print(f"forgot {len(gone)} node(s): {', '.join(gone)}")
        return 0
    with connect(args) as admin:
        nodes = admin.nodes(args.pattern)
        data = {"nodes": nodes, "hub_state": admin.state, "store": admin.store_health()}
    say_store(data["store"])
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    # a clock column only when some node's clock is off (it stamps with the hub's time)
    skewed = any(abs(n.get("clock_skew") or 0) >= 1 for n in data["nodes"])
    launched = any(n.get("launch") for n in data["nodes"])  # a column when some node has one
    rows = [("NAME", "STATUS", "STATE", "", "LAST SEEN", *(("CLOCK",) if skewed else ()),
             *(("LAUNCH",) if launched else ()))]
    for n in data["nodes"]:
        same = "same as hub" if n["state"] == data["hub_state"] else "differs"
        rows.append((n["name"], n["status"], short_state(n["state"]), same, ago(n["last_seen"]),
                     *((clock_text(n.get("clock_skew") or 0),) if skewed else ()),
                     *((n.get("launch") or "",) if launched else ())))
    print_table(rows)
    if len(rows) == 1 and args.pattern:
        print(f"no node matches {args.pattern!r}; see: odium nodes")
    elif len(rows) == 1:
        print("no nodes yet; add one with: odium token")
    return 0


def say_store(health: dict[str, Any]) -> None:
    """Say on stderr that the hub's store does not write, if so (what it holds meanwhile)."""
    if health.get("problem"):
        since = health.get("since") or 0
        ago_s = f"since {ago(since)}; " if since else ""
        print(f"odium: the hub cannot store: {health['problem']} ({ago_s}"
              f"{health.get('waiting', 0)} write(s) held)", file=sys.stderr)


def clock_text(skew: float) -> str:
    """How far a node's clock is off its hub's, as ``odium nodes`` shows it."""
    if abs(skew) < 1:
        return ""
    return f"{abs(skew):.0f} s {'ahead' if skew > 0 else 'behind'}"


def print_table(rows: Sequence[Sequence[str]]) -> None:
    rows = [[clean(c) for c in r] for r in rows]  # node text: control characters escaped
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip())


def read_code(args: argparse.Namespace, what: str) -> str:
    """The code of ``run`` or ``submit``: from -c, a FILE, or stdin (FILE ``-``)."""
    if args.code is not None and args.file is not None:
        raise ConfigError("give the code with -c or as a FILE, not both")
    if args.code is not None:
        return str(args.code)
    if args.file == "-":
        return sys.stdin.read()
    if args.file:
        try:
            return Path(args.file).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read {args.file}: {e.strerror}") from None
    raise ConfigError(f"nothing to {what}: give -c CODE, a FILE, or - to read stdin")


def cmd_run(args: argparse.Namespace) -> int:
    code = read_code(args, "run")
    with connect(args) as admin:
        # without --session: a namespace of its own, closed when it ends (nothing stays)
        result = admin.run(code, args.nodes, shell=args.shell, timeout=args.timeout,
                           session=args.session, require=args.require_state,
                           end_session=args.session is None)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        from ..core.results import format_text

        print(format_text(result, color=sys.stdout.isatty(), group=args.group))
    return 0 if result.ok else 1


def cmd_keys(args: argparse.Namespace) -> int:
    if args.action == "show":
        from ..core.keys import fingerprint
        from ..local.home import default_home, ensure_home, load_or_create

        home = ensure_home(args.home or default_home())
        ident = load_or_create(home / "identity.key")
        print(ident.key_id if not args.json else json.dumps(
            {"key": ident.key_id, "fingerprint": fingerprint(ident.key_id)}))
        return 0
    with connect(args) as admin:
        if args.action == "list":
            keys = admin.keys()
            if args.json:
                print(json.dumps(keys, indent=2))
                return 0
            rows = [("ROLE", "NAME", "FINGERPRINT", "KEY", "NOTE")]
            rows += [(k["role"], k["name"] or "-", k["fingerprint"], k["key"], k["note"])
                     for k in keys]
            print_table(rows)
            return 0
        if not args.pattern:
            raise ConfigError(f"keys {args.action} needs a key id, node name or glob")
        changed = admin.key_action(args.action, args.pattern, args.role)
    past = {"accept": "accepted", "reject": "rejected", "revoke": "revoked"}[args.action]
    print(f"{past} {len(changed)} key(s): " + ", ".join(
        f"{k['role']} key {k['name'] or '-'} {k['fingerprint']} {k['key']}" for k in changed))
    return 0


def cmd_state(args: argparse.Namespace) -> int:
    from ..core.results import format_text, short_state
    from ..local.appstate import find_app, snapshot

    if args.action == "show":
        info = snapshot(find_app(args.app))
        print(json.dumps(info.to_dict(), indent=2) if args.json else format_state(info))
        return 0
    with connect(args) as admin:
        if args.action == "sync":
            result = admin.sync(args.nodes or "*", args.timeout)
            print(json.dumps(result.to_dict(), indent=2, default=str) if args.json
                  else format_text(result, color=sys.stdout.isatty()))
            return 0 if result.ok else 1
        report = admin.state_report(args.nodes)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    hub = report["hub"]
    print(f"hub: {clean(hub['state'])}")
    differ = 0
    for name, n in report["nodes"].items():
        same = not n["diff"]
        differ += not same
        print(clean(f"[{name}] {n['status']}  {short_state(n['state'])}  "
                    f"{'same as hub' if same else 'differs'}"))
        for line in str(n.get("text") or "").split("\n"):
            if line:
                print("  " + clean_lines(line))
    if not report["nodes"]:
        print("no nodes match")
    return 0 if differ == 0 else 1


def format_state(info: Any) -> str:
    """This instance's state for people: id, declaration, fingerprint parts."""
    d = info.to_dict()
    fp = d["fingerprint"]
    decl = d["declaration"]
    lines = [f"state        {d['state']}"]
    if d.get("dirty_files"):
        lines.append(f"dirty files  {', '.join(d['dirty_files'][:20])}")
    lines.append(f"fingerprint  {fp['id'][:16]}")
    for part, h in sorted(fp["parts"].items()):
        lines.append(f"  {part:<10} {h[:16]}")
    py = fp["detail"].get("python", {})
    lines.append(f"python       {py.get('implementation', '')} {py.get('version', '')} "
                 f"{py.get('platform', '')}")
    lines.append(f"packages     {len(fp['detail'].get('packages', {}))} installed")
    lines.append(f"declared in  {decl.get('source', 'none')}")
    for key in ("pip", "system", "env", "files"):
        if decl.get(key):
            lines.append(f"  {key:<10} {', '.join(decl[key])}")
    for item in d.get("unsatisfied") or []:
        lines.append(f"NOT SATISFIED {item}")
    return "\n".join(lines)


def cmd_token(args: argparse.Namespace) -> int:
    from ..core.keys import join_command
    from ..local.home import write_token_file

    with connect(args) as admin:
        tok = admin.token(args.ttl)
    if args.file:
        path = Path(args.file).expanduser()
        write_token_file(path, tok)
        print(join_command(tok, path, args.name))
    else:
        print(join_command(tok, name=args.name))
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    with connect(args) as admin:
        events = admin.log(args.n)
    if args.json:
        print(json.dumps(events, indent=2))
        return 0
    for e in events:
        t = datetime.fromtimestamp(e["ts"]).strftime("%H:%M:%S")
        who = f" [{clean(e['node'])}]" if e["node"] else ""
        print(f"{t} {clean(e['level']):<7} {clean(e['kind']):<16}{who} {clean(e['detail'])}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.nodes)

