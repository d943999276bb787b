"""The ``odium`` command: hub, node, run, nodes, keys, token, log, demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from ..core.term import clean, clean_lines

if TYPE_CHECKING:
    from ..runtime import Runtime
from ..core.wire import DEFAULT_PORTS
from ..errors import ConfigError, OdiumError
from ..jupyter.kernel import add_kernel_parser, cmd_kernel

PORT_NAMES = list(DEFAULT_PORTS)  # pub, query, jobs, results


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # "--node" is an error, never "--nodes"
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"odium: error: {message} (see: {self.prog} --help)\n")


def _parse_ports(text: str) -> dict[str, int]:
    parts = [p.strip() for p in text.split(",")]
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"ports are numbers: PUB,QUERY,JOBS,RESULTS (e.g. 18202,18203,18220,18221) or 0, "
            f"not {text!r}") from None
    if len(nums) == 1 and nums[0] == 0:
        return {k: 0 for k in PORT_NAMES}
    if len(nums) != 4 or any(not 0 <= n <= 65535 for n in nums):
        raise argparse.ArgumentTypeError(
            f"give four ports PUB,QUERY,JOBS,RESULTS (0 = any free) or 0, not {text!r}")
    return dict(zip(PORT_NAMES, nums, strict=False))


def _node_name(text: str) -> str:
    from ..core.wire import NAME_RE

    if not __import__("re").match(NAME_RE, text):
        raise argparse.ArgumentTypeError(f"a node name is letters, digits, '.', '_', '-' "
                                         f"(max 64), not {text!r}")
    return text


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return v


def _requirement(text: str) -> str:
    import re

    if text in ("any", "match") or re.fullmatch(r"[0-9a-f]{7,40}", text):
        return text
    raise argparse.ArgumentTypeError(
        f"a required state is 'any', 'match' or a commit id (7 to 40 hex digits), not {text!r}")


def _count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    p = _Parser(prog="odium", description="Run Python on many machines; know what ran where.")
    p.add_argument("--version", action="version", version=f"odium {__version__}")
    p.add_argument("--log-level", default=os.environ.get("ODIUM_LOG", "warning"),
                   choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def home(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--home", default=None,
                        help="instance home directory (default $ODIUM_HOME or ~/.odium)")

    sp = sub.add_parser("hub", help="run a hub in the foreground")
    home(sp)
    sp.add_argument("--interface", default="127.0.0.1", help="address to listen on")
    sp.add_argument("--ports", type=_parse_ports, default=None,
                    help="PUB,QUERY,JOBS,RESULTS ports (default 18202,18203,18220,18221; 0 = any)")
    sp.add_argument("--db", default=None, help="SQLAlchemy URL (default: SQLite in the home)")
    sp.add_argument("--app", default=None, help="application directory (default: cwd)")
    sp.add_argument("--heartbeat", type=_positive, default=1.0, help="seconds between beats")
    sp.add_argument("--wheelhouse", default=None,
                    help="directory of wheels sent to nodes that sync (no index needed)")

    sp = sub.add_parser("node", help="run a node in the foreground, joined to a hub")
    home(sp)
    sp.add_argument("--join", metavar="tcp://HOST:PORT", help="the hub's query address")
    sp.add_argument("--token", help="join token from: odium token (visible to every local "
                    "user in ps while the node runs: prefer --token-file or $ODIUM_TOKEN)")
    sp.add_argument("--token-file", metavar="PATH",
                    help="read the join token from this file (yours, mode 0600; left in place)")
    sp.add_argument("--hub-key", help="the hub's public key (join as pending, without a token)")
    sp.add_argument("--name", help="node name (default: this host's name)")
    sp.add_argument("--app", default=None, help="application directory (default: cwd)")
    sp.add_argument("--capacity", type=_count, default=None, help="worker processes")
    sp.add_argument("--find-links", default=None,
                    help="where a sync installs declared packages from (a directory of wheels)")
    sp.add_argument("--index-url", default=None, help="package index a sync installs from")

    sp = sub.add_parser("nodes", help="list the hub's nodes; nodes forget NAME|GLOB: remove "
                        "ones that are not connected")
    home(sp)
    sp.add_argument("pattern", nargs="?", default=None,
                    help="the nodes to list (glob or comma list), or: forget")
    sp.add_argument("forget", nargs="?", default=None, metavar="NAME|GLOB",
                    help="after forget: the nodes to forget, with their keys")
    sp.set_defaults(_late_positionals=("pattern", "forget"))
    sp.add_argument("--json", action="store_true")

    sp = sub.add_parser("run", help="run code on nodes and print each node's result")
    home(sp)
    sp.add_argument("--nodes", default="*", help="glob or comma list of node names")
    sp.add_argument("--shell", action="store_true", help="run as a shell command")
    sp.add_argument("--timeout", type=_positive, default=None, help="seconds")
    sp.add_argument("--session", default=None, help="keep a namespace across runs by name")
    sp.add_argument("--require-state", default=None, metavar="any|match|ID",
                    type=_requirement, help="the state nodes must be in (default: match when "
                    "the hub's application is a clean commit, else any)")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("-c", dest="code", default=None, help="the code")
    sp.add_argument("file", nargs="?", default=None, help="a file with the code, or - for stdin")
    sp.set_defaults(_late_positionals=("file",))

    sp = sub.add_parser("state", help="state ids, fingerprints, diffs and sync")
    home(sp)
    sp.add_argument("action", nargs="?", default="show", choices=["show", "diff", "sync"],
                    help="show: this instance's state; diff: every node against the hub; "
                    "sync: bring nodes to the hub's commit")
    sp.add_argument("--nodes", default=None, help="glob or comma list of node names")
    sp.add_argument("--app", default=None, help="application directory (show; default: cwd)")
    sp.add_argument("--timeout", type=_positive, default=300.0, help="seconds (sync)")
    sp.add_argument("--json", action="store_true")

    sp = sub.add_parser("keys", help="this instance's key; the hub's trusted keys")
    home(sp)
    sp.add_argument("action", choices=["show", "list", "accept", "reject", "revoke"])
    sp.add_argument("pattern", nargs="?",
                    help="key id or fingerprint (any role), or node name or glob (node keys)")
    sp.set_defaults(_late_positionals=("pattern",))
    sp.add_argument("--role", choices=["node", "admin"], default=None,
                    help="the role of the keys a name or glob chooses (default: node)")
    sp.add_argument("--json", action="store_true")

    sp = sub.add_parser("token", help="issue a single-use join token")
    home(sp)
    sp.add_argument("--ttl", type=_positive, default=3600.0, help="seconds it stays valid")
    sp.add_argument("--file", metavar="PATH", default=None,
                    help="write the token to this new 0600 file instead of printing it")
    sp.add_argument("--name", type=_node_name, default=None,
                    help="the name the node takes (in the command printed; default: its host "
                    "name)")

    sp = sub.add_parser("log", help="recent events of the hub")
    home(sp)
    sp.add_argument("-n", type=_count, default=30, help="how many")
    sp.add_argument("--json", action="store_true")

    add_job_parsers(sub, home)

    sp = sub.add_parser("demo", help="hub + 3 local nodes, a Python and a shell broadcast")
    sp.add_argument("--nodes", type=_count, default=3)
    add_kernel_parser(sub)
    return p


def _key_words(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split off the words argparse would take for options though they are values: all after
    a "--", and a whole key id that begins with "-" (base64url has "-"; ``-h…`` would even ask
    for help). Only for a ``keys`` command; anything else is parsed as given."""
    words = list(argv)
    try:
        at = words.index("keys")
    except ValueError:
        return words, []
    head, tail = words[: at + 1], []
    rest = words[at + 1 :]
    if "--" in rest:
        cut = rest.index("--")
        rest, tail = rest[:cut], rest[cut + 1 :]
    import re

    from ..core.wire import KEY_RE

    for w in rest:
        (tail if w.startswith("-") and re.match(KEY_RE, w) else head).append(w)
    return head, tail


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    words, values = _key_words(argv)
    args, extra = parser.parse_known_args(words)
    if values and args.command != "keys":  # "keys" was some other word: parse as given
        args, extra = parser.parse_known_args(argv)
        values = []
    # argparse fills optional positionals before it sees options ("keys accept --home H KEY"):
    # give words it left over to the positionals that are still empty, in order
    extra = [w for w in extra if not w.startswith("-")] + values + \
        [w for w in extra if w.startswith("-")]
    for dest in getattr(args, "_late_positionals", ()):
        if extra and (not extra[0].startswith("-") or extra[0] in values) \
                and getattr(args, dest) is None:
            setattr(args, dest, extra.pop(0))
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(COMMANDS[args.command](args) or 0)
    except OdiumError as e:
        first = str(e).split("\n")[0] if str(e) else type(e).__name__
        print(f"odium: {clean(first)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("odium: interrupted", file=sys.stderr)
        return 130


# --- commands --------------------------------------------------------------------------------


def _stop_on_signals(loop_stop: Any) -> None:
    def handler(signum: int, frame: Any) -> None:
        loop_stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def cmd_hub(args: argparse.Namespace) -> int:
    from ..hub.start import start_hub
    from ..runtime import Runtime

    rt = Runtime(args.home, args.app)
    try:
        hub = start_hub(rt, interface=args.interface, ports=args.ports, db=args.db,
                             hb_interval=args.heartbeat, wheelhouse=args.wheelhouse)
        from ..core.keys import fingerprint

        print(f"odium hub {fingerprint(rt.ident.key_id)} on {args.interface} ports "
              f"pub={hub.ports['pub']} query={hub.ports['query']} jobs={hub.ports['jobs']} "
              f"results={hub.ports['results']}; state {rt.state}", flush=True)
        print(f"add nodes with: odium token --home {rt.home} (or: odium node --join "
              f"{hub.public_address()} --hub-key {rt.ident.key_id})", flush=True)
        _stop_on_signals(rt.loop.stop)
        rt.run()
    finally:
        rt.close()
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    from ..core.keys import Token
    from ..node.agent import load_joined, start_node
    from ..runtime import Runtime

    text = _token_text(args)
    rt = Runtime(args.home, args.app)
    try:
        token = Token.decode(text) if text else None
        if args.token:
            print("odium: warning: a token given with --token is visible to every local user "
                  "(ps) while the node runs; use --token-file PATH or $ODIUM_TOKEN instead",
                  file=sys.stderr, flush=True)
        text = args.token = None  # decoded: keep only what joining needs, until joined
        joined = load_joined(rt.home)
        name = args.name or (joined or {}).get("name") or socket.gethostname().split(".")[0]
        if token is not None:
            address, hub_key = args.join or token.address, token.hub_key
        elif args.join and args.hub_key:
            address, hub_key = args.join, args.hub_key
        elif joined is not None and args.join in (None, joined["address"]):
            address, hub_key = joined["address"], joined["hub_key"]
        elif joined is not None:
            raise ConfigError(f"this home ({rt.home}) already belongs to the hub at "
                              f"{joined['address']}; use another --home to join {args.join}")
        elif args.join:
            raise ConfigError("--join needs a join token (--token-file PATH or $ODIUM_TOKEN, "
                              "from: odium token) or --hub-key KEY")
        else:
            raise ConfigError("this node has not joined a hub: give a join token (from: odium "
                              "token on the hub) in $ODIUM_TOKEN or --token-file PATH, or "
                              "--join tcp://HOST:PORT --hub-key KEY")
        from ..core.keys import check_key_id

        check_key_id(hub_key)
        node = start_node(rt, address, hub_key, name, token=token, capacity=args.capacity,
                               find_links=args.find_links, index_url=args.index_url)
        from ..core.keys import fingerprint

        print(f"odium node {name} key {rt.ident.key_id} ({fingerprint(rt.ident.key_id)}) "
              f"joining {address}; state {rt.state}",
              flush=True)
        if token is None and joined is None:
            print(f"if the hub does not know this key yet, accept it there with: odium keys "
                  f"accept {fingerprint(rt.ident.key_id)}", flush=True)
        node.on_notice = lambda text: print(f"odium node: {clean(text)}", flush=True)
        _stop_on_signals(rt.loop.stop)
        _stop_with_parent(rt)
        rt.run()
        if node.error is not None:
            raise node.error
    finally:
        rt.close()
    if node.restart:  # a sync checked out a new commit: run this same command again, in place
        sys.stdout.flush()
        argv = list(getattr(sys, "orig_argv", [sys.executable, "-m", "odium", *sys.argv[1:]]))
        args_no_token = _drop_option(_drop_option(argv, "--token"), "--token-file")
        os.execv(sys.executable, [sys.executable, *args_no_token[1:]])
    return 0


def _token_text(args: argparse.Namespace) -> str | None:
    """The join token from --token-file, $ODIUM_TOKEN or --token. ODIUM_TOKEN leaves this
    process's environment at once, so that no command the node runs inherits it."""
    from ..core.keys import TOKEN_ENV
    from ..local.home import read_token_file

    env = os.environ.pop(TOKEN_ENV, None)
    if args.token and args.token_file:
        raise ConfigError("give the join token with --token-file or --token, not both")
    if args.token_file:
        return read_token_file(Path(args.token_file).expanduser())
    if args.token:
        return str(args.token)
    return env.strip() if env and env.strip() else None


def _stop_with_parent(rt: Runtime) -> None:
    """A local node (started by a hub process, in a session of its own) stops when that
    process is gone, even if it was killed with SIGKILL."""
    parent = os.environ.get("ODIUM_DIE_WITH_PARENT", "")
    if not parent.isdigit():
        return
    pid = int(parent)

    def check() -> None:
        try:
            os.kill(pid, 0)
            alive = os.getppid() == pid
        except ProcessLookupError:
            alive = False
        if not alive:
            logging.getLogger("odium").warning("the hub that started this node is gone; stopping")
            rt.loop.stop()

    rt.loop.every(1.0, check)


def _drop_option(argv: list[str], opt: str) -> list[str]:
    """The command line without a used-up option (a join token is single-use)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == opt:
            skip = True
            continue
        if a.startswith(opt + "="):
            continue
        out.append(a)
    return out


def _admin(args: argparse.Namespace) -> Any:
    from ..api.admin import Admin  # no hub code: the commands against a hub start fast

    return Admin(args.home)


def _ago(ts: float) -> str:
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
        with _admin(args) as admin:
            gone = admin.forget(args.forget)
        if args.json:
            print(json.dumps({"forgotten": gone}))
        else:
            print(f"forgot {len(gone)} node(s): {', '.join(gone)}")
        return 0
    with _admin(args) as admin:
        nodes = admin.nodes(args.pattern)
        data = {"nodes": nodes, "hub_state": admin.state}
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    rows = [("NAME", "STATUS", "STATE", "", "LAST SEEN")]
    for n in data["nodes"]:
        same = "same as hub" if n["state"] == data["hub_state"] else "differs"
        rows.append((n["name"], n["status"], short_state(n["state"]), same, _ago(n["last_seen"])))
    _table(rows)
    if len(rows) == 1 and args.pattern:
        print(f"no node matches {args.pattern!r}; see: odium nodes")
    elif len(rows) == 1:
        print("no nodes yet; add one with: odium token")
    return 0


def _table(rows: Sequence[Sequence[str]]) -> None:
    rows = [[clean(c) for c in r] for r in rows]  # node text: control characters escaped
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip())


def cmd_run(args: argparse.Namespace) -> int:
    if args.code is not None and args.file is not None:
        raise ConfigError("give the code with -c or as a FILE, not both")
    if args.code is not None:
        code = args.code
    elif args.file == "-":
        code = sys.stdin.read()
    elif args.file:
        try:
            code = Path(args.file).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read {args.file}: {e.strerror}") from None
    else:
        raise ConfigError("nothing to run: give -c CODE, a FILE, or - to read stdin")
    with _admin(args) as admin:
        # without --session: a namespace of its own, closed when it ends (nothing stays)
        result = admin.run(code, args.nodes, shell=args.shell, timeout=args.timeout,
                           session=args.session, require=args.require_state,
                           end_session=args.session is None)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        from ..core.results import format_text

        print(format_text(result, color=sys.stdout.isatty()))
    return 0 if result.ok else 1


def cmd_keys(args: argparse.Namespace) -> int:
    if args.action == "show":
        from ..api.interface import default_home
        from ..core.keys import fingerprint
        from ..local.home import ensure_home, load_or_create

        home = ensure_home(args.home or default_home())
        ident = load_or_create(home / "identity.key")
        print(ident.key_id if not args.json else json.dumps(
            {"key": ident.key_id, "fingerprint": fingerprint(ident.key_id)}))
        return 0
    with _admin(args) as admin:
        if args.action == "list":
            keys = admin.keys()
            if args.json:
                print(json.dumps(keys, indent=2))
                return 0
            rows = [("ROLE", "NAME", "FINGERPRINT", "KEY", "NOTE")]
            rows += [(k["role"], k["name"] or "-", k["fingerprint"], k["key"], k["note"])
                     for k in keys]
            _table(rows)
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
    with _admin(args) as admin:
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

    with _admin(args) as admin:
        tok = admin.token(args.ttl)
    if args.file:
        path = Path(args.file).expanduser()
        write_token_file(path, tok)
        print(join_command(tok, path, args.name))
    else:
        print(join_command(tok, name=args.name))
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
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


COMMANDS = {"hub": cmd_hub, "node": cmd_node, "nodes": cmd_nodes, "run": cmd_run,
            "keys": cmd_keys, "token": cmd_token, "state": cmd_state, "log": cmd_log,
            "demo": cmd_demo, "kernel": cmd_kernel}


# --- the job queue ---------------------------------------------------------------------------

JOB_STATUSES = ["queued", "assigned", "running", "done", "failed", "timeout", "cancelled"]


def _job_id(text: str) -> str:
    from ..core.jobs import JOB_ID_RE

    if not __import__("re").fullmatch(JOB_ID_RE, text):
        raise argparse.ArgumentTypeError(
            f"a job id is 1 to 64 letters, digits, '.', '_' or '-', not {text!r}")
    return text


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {text}")
    return v


def _retries(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 0 <= v <= 1000:
        raise argparse.ArgumentTypeError(f"must be 0 to 1000, not {text}")
    return v


def add_job_parsers(sub: Any, home: Any) -> None:
    """``odium submit``, ``odium jobs [--status S]``, ``odium jobs cancel ID``, ``odium job ID``."""
    sp = sub.add_parser("submit", help="queue a job: it runs once, on one node with a free slot")
    home(sp)
    sp.add_argument("--nodes", default="*", help="glob or comma list of node names it may run on")
    sp.add_argument("--retries", type=_retries, default=0,
                    help="run again after an error or a lost node, up to N times")
    sp.add_argument("--timeout", type=_positive, default=None, help="seconds one run may take")
    sp.add_argument("--require-state", default=None, metavar="any|match|ID", type=_requirement,
                    help="the state its node must be in (default as for run)")
    sp.add_argument("--id", dest="job_id", type=_job_id, default=None,
                    help="your own job id (submitting it again gives the same job)")
    sp.add_argument("--wait", type=_seconds, default=None, metavar="SECONDS",
                    help="wait for the job and print its result")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("-c", dest="code", default=None, help="the code")
    sp.add_argument("file", nargs="?", default=None, help="a file with the code, or - for stdin")
    sp.set_defaults(_late_positionals=("file",))

    sp = sub.add_parser("jobs", help="list queued and recent jobs; jobs cancel ID")
    home(sp)
    sp.add_argument("action", nargs="?", default=None, choices=["list", "cancel"])
    sp.add_argument("job_ids", nargs="*", type=_job_id, default=[], metavar="ID")
    sp.add_argument("--status", choices=JOB_STATUSES, default=None)
    sp.add_argument("-n", type=_count, default=30, help="how many")
    sp.add_argument("--json", action="store_true")

    sp = sub.add_parser("job", help="one job: status, result, every move it made")
    home(sp)
    sp.add_argument("job_id", nargs="?", default=None, type=_job_id, metavar="ID")
    sp.set_defaults(_late_positionals=("job_id",))
    sp.add_argument("--wait", type=_seconds, default=0.0, metavar="SECONDS",
                    help="wait for it to finish first")
    sp.add_argument("--json", action="store_true")


def _read_code(args: argparse.Namespace) -> str:
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
    raise ConfigError("nothing to submit: give -c CODE, a FILE, or - to read stdin")


def cmd_submit(args: argparse.Namespace) -> int:
    code = _read_code(args)
    if not code.strip():
        raise ConfigError("the job's code is empty")
    with _admin(args) as admin:
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
        with _admin(args) as admin:
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
    with _admin(args) as admin:
        jobs = admin.jobs(args.status, args.n)
    if args.json:
        print(json.dumps(jobs, indent=2))
        return 0
    rows = [("ID", "STATUS", "NODE", "RUNS", "CREATED", "WHAT")]
    for j in jobs:
        rows.append((j["id"], j["status"], j["node"] or "-", str(j["attempts"]),
                     _ago(j["created"]), j["what"]))
    _table(rows)
    if len(rows) == 1:
        print("no jobs" + (f" with status {args.status}" if args.status else "")
              + "; queue one with: odium submit -c CODE")
    return 0


def cmd_job(args: argparse.Namespace) -> int:
    if not args.job_id:
        raise ConfigError("which job? give its id (see: odium jobs)")
    with _admin(args) as admin:
        info = admin.job(args.job_id, wait=args.wait)
    _print_job(info, args.json)
    return 0 if info["status"] in ("done", "queued", "assigned", "running") else 1


COMMANDS.update({"submit": cmd_submit, "jobs": cmd_jobs, "job": cmd_job})
