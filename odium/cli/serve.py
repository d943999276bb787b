"""``odium hub`` and ``odium node``: a hub or a node in the foreground, until a signal stops it
(a node started by a hub process also stops when that process is gone)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.term import clean
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..core.keys import Token
    from ..hub.server import HubCore
    from ..node.agent import NodeCore
    from ..runtime import Runtime


def _stop_on_signals(loop_stop: Any) -> None:
    def handler(signum: int, frame: Any) -> None:
        loop_stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def cmd_hub(args: argparse.Namespace) -> int:
    from ..runtime import Runtime

    rt = Runtime(args.home, args.app)
    try:
        _serve(rt, args)
        _stop_on_signals(rt.loop.stop)
        rt.run()
    finally:
        rt.close()
    return 0


def _serve(rt: Runtime, args: argparse.Namespace) -> HubCore:
    """Start the hub part of this process (``odium hub``, ``odium node --serve``), and say
    where it listens and how nodes join it."""
    from ..core.keys import fingerprint
    from ..hub.start import start_hub

    hub = start_hub(rt, interface=args.interface, ports=args.ports, db=args.db,
                    hb_interval=args.heartbeat, wheelhouse=args.wheelhouse)
    print(f"odium hub {fingerprint(rt.ident.key_id)} on {args.interface} ports "
          f"pub={hub.ports['pub']} query={hub.ports['query']} jobs={hub.ports['jobs']} "
          f"results={hub.ports['results']}; state {rt.state}", flush=True)
    print(f"add nodes with: odium token --home {rt.home} (or: odium node --join "
          f"{hub.public_address()} --hub-key {rt.ident.key_id})", flush=True)
    return hub


def cmd_node(args: argparse.Namespace) -> int:
    from ..core.keys import Token, check_key_id, fingerprint
    from ..node.agent import load_joined, start_node
    from ..node.workers.zygote import prefork
    from ..runtime import Runtime

    _check_serve_options(args)
    # the workers' zygote: a copy of this process as it is now, imported, with no thread,
    # no ZeroMQ context, no key and no token read yet (each worker gets the node's
    # environment as it is when it starts: without ODIUM_TOKEN)
    prefork()
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
        address, hub_key = _hub_to_join(args, token, joined, rt.home)
        check_key_id(hub_key)
        hub = _serve(rt, args) if args.serve else None  # a hub to nodes of its own too
        then = None
        if hub is not None:  # both parts on the same runtime and loop: a relay
            from ..relay import start_relay

            def then(node: NodeCore) -> object:
                return start_relay(rt, hub, node)
        node = start_node(rt, address, hub_key, name, token=token, capacity=args.capacity,
                          find_links=args.find_links, index_url=args.index_url, then=then)
        print(f"odium node {name} key {rt.ident.key_id} ({fingerprint(rt.ident.key_id)}) "
              f"joining {address}; state {rt.state}", flush=True)
        if token is None and joined is None:
            print(f"if the hub does not know this key yet, accept it there with: odium keys "
                  f"accept {fingerprint(rt.ident.key_id)}", flush=True)
        node.link.on_notice = lambda text: print(f"odium node: {clean(text)}", flush=True)
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
        if hub is not None:  # a relay serves again where its nodes know to find it
            args_no_token = [*_drop_option(args_no_token, "--ports"), "--ports",
                             ",".join(str(hub.ports[k]) for k in ("pub", "query", "jobs",
                                                                  "results"))]
        os.execv(sys.executable, [sys.executable, *args_no_token[1:]])
    return 0


def _check_serve_options(args: argparse.Namespace) -> None:
    """A hub's options on a node that is no hub would be silently ignored: refuse them."""
    given = [f"--{o}" for o, default in (("interface", "127.0.0.1"), ("ports", None),
                                           ("db", None), ("heartbeat", 1.0), ("wheelhouse", None))
             if getattr(args, o) != default]
    if given and not args.serve:
        raise ConfigError(f"{', '.join(given)} only with --serve (a node that is a hub too)")


def _hub_to_join(args: argparse.Namespace, token: Token | None,
                 joined: dict[str, str] | None, home: Path) -> tuple[str, str]:
    """The address and key of the hub this node joins: from its token, from --join and
    --hub-key, or the hub its home already belongs to."""
    if token is not None:
        return args.join or token.address, token.hub_key
    if args.join and args.hub_key:
        return args.join, args.hub_key
    if joined is not None and args.join in (None, joined["address"]):
        return joined["address"], joined["hub_key"]
    if joined is not None:
        raise ConfigError(f"this home ({home}) already belongs to the hub at "
                          f"{joined['address']}; use another --home to join {args.join}")
    if args.join:
        raise ConfigError("--join needs a join token (--token-file PATH or $ODIUM_TOKEN, "
                          "from: odium token) or --hub-key KEY")
    raise ConfigError("this node has not joined a hub: give a join token (from: odium "
                      "token on the hub) in $ODIUM_TOKEN or --token-file PATH, or "
                      "--join tcp://HOST:PORT --hub-key KEY")


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

