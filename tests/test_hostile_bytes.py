"""Hostile bytes from a trusted key: frames nested thousands deep, floods of them, and handlers
that fail in ways nobody planned. Each message is handled on its own (one bad message never
drops another), every request is answered, and the logs stay within their rate limit.

The senders hold real trusted keys and speak over real CURVE connections (tests/raw.py), so
what is tested is the hub's (and a node's) own checking.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import odium
from odium.api.hub import BroadcastHandle
from odium.core import wire as P
from odium.core.guards import MAX_DEPTH, too_deep
from odium.core.keys import Identity
from odium.hub.asking import Asker

from .conftest import wait_until
from .raw import Raw, envelope, events, seal, sign_open

DEEP = 5000  # far deeper than MAX_DEPTH, and than Python's recursion limit
BUCKET, REFILL = 50, 10  # the hub's log budget: 50 at once, 10 more a second


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[odium.Hub]:
    """An in-process hub with a 1 s heartbeat: a raw node, which never beats, stays alive for
    5 s (LIVENESS_BEATS), long enough on a loaded machine."""
    with odium.Hub(tmp_path / "hub", ports=0, hb_interval=1.0, app=tmp_path) as h:
        yield h


def trusted(hub: odium.Hub, name: str, role: str = "node") -> Identity:
    ident = Identity.generate()
    hub.trust(ident.key_id, name, role=role)
    return ident


def deep_frame(ident: Identity, type_: str, body: dict[str, Any], field: str,
               depth: int = DEEP, **env: Any) -> bytes:
    """A validly signed message whose ``body[field]`` is ``depth`` arrays deep (made by hand:
    no encoder nests that deep)."""
    raw = P.encode_json(envelope(ident, type_, {**body, field: "@DEEP@"}, **env))
    raw = raw.replace(b'"@DEEP@"', b"[" * depth + b"]" * depth)
    return sign_open(ident, raw[:-1])


@contextmanager
def loop_held(hub: odium.Hub) -> Iterator[None]:
    """Keep the hub's loop thread busy while the block sends, so that what it sends is read
    together, in one batch, when the loop comes back."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        release.wait(10)

    hub.core.rt.loop.call_soon_threadsafe(hold)
    assert held.wait(5), "the hub's loop did not come round"
    try:
        yield
    finally:
        release.set()


def registered(hub: odium.Hub, zctx: Any, name: str) -> tuple[Identity, Raw, Raw, str, str]:
    """A raw node: trusted, registered, with its results link up."""
    me = trusted(hub, name)
    q = Raw(zctx, hub, "query", me)
    boot = P.new_id()
    reg = q.request(q.seal("register", P.Register(name, boot)))
    assert reg.type == "reply", reg
    push = Raw(zctx, hub, "results", me)
    assert push.handshake() == "ok"
    return me, q, push, boot, reg.body.data["hub_boot"]  # type: ignore[attr-defined]


def too_deep_events(hub: odium.Hub, key: str, where: str) -> list[dict[str, Any]]:
    return [e for e in events(hub, "rejected") if e["key"] == key
            and e["detail"].startswith(f"{where}:") and "nested deeper" in e["detail"]]


# --- the depth scan itself (pure) -----------------------------------------------------------


def _depth(o: Any) -> int:
    if isinstance(o, list):
        return 1 + max(map(_depth, o), default=0)
    if isinstance(o, dict):
        return 1 + max(map(_depth, o.values()), default=0)
    return 0


def _tree(rng: random.Random, n: int) -> Any:
    leaves = [1, None, "[[[", "]]}", '\\"[{', "\\\\", '"', "\\u005b", "x\\"]
    if n == 0 or rng.random() < 0.25:
        return rng.choice(leaves)
    if rng.random() < 0.5:
        return [_tree(rng, n - 1) for _ in range(rng.randint(0, 3))]
    return {f'{i}"[\\{rng.choice(leaves)}': _tree(rng, n - 1) for i in range(rng.randint(0, 3))}


def test_depth_scan_agrees_with_a_parser() -> None:
    """Brackets inside strings (with escaped quotes and backslashes) do not count; nesting
    does, exactly."""
    rng = random.Random(8)
    for _ in range(3000):
        tree = _tree(rng, rng.randint(0, 14))
        text = json.dumps(tree).encode()
        for limit in (0, 1, 2, 5, 9):
            assert too_deep(text, limit) == (_depth(tree) > limit), (text, limit)
    # malformed: openers that never close count (a decoder would recurse into them first)
    for bad in (b"[" * 100, b"[{" * 50, b"]]" + b"[" * 80, b"[[]" * 70):
        assert too_deep(bad, 64), bad
    assert not too_deep(b'{"a":"' + b"[" * 100, 64)  # inside an unterminated string


def test_open_message_limits_depth_at_max_depth() -> None:
    """A message exactly MAX_DEPTH deep opens; one level more is refused before decoding,
    with an error that names the limit; 5,000 deep is refused the same way (no
    RecursionError)."""
    me = Identity.generate()
    vk = me.signing.verify_key
    cmd = P.new_id()
    base = {"cmd": cmd, "status": "ok", "started": 1.0, "finished": 2.0}
    # the envelope is level 1, the body 2: a value of MAX_DEPTH - 2 arrays makes MAX_DEPTH
    ok = deep_frame(me, "result", base, "value", MAX_DEPTH - 2)
    msg = P.open_message(ok, vk, me.key_id)
    assert _depth(msg.body.value) == MAX_DEPTH - 2  # type: ignore[attr-defined]
    for depth in (MAX_DEPTH - 1, DEEP):
        with pytest.raises(odium.ProtocolError, match=f"limit of {MAX_DEPTH} levels"):
            P.open_message(deep_frame(me, "result", base, "value", depth), vk, me.key_id)
    # and the request can still be named in an error reply, without parsing it
    mid = P.new_id()
    assert P.peek_id(deep_frame(me, "result", base, "value", id=mid)) == mid


# --- the hub: results socket ----------------------------------------------------------------


def test_deep_result_drops_nothing_read_with_it(hub: odium.Hub, zctx) -> None:
    """A validly signed result 5,000 deep from a real trusted node key, then honest results,
    all read in one batch: the deep ones are rejected (logged, naming the limit) and every
    honest one is recorded."""
    me, _q, push, _boot, _hub_boot = registered(hub, zctx, "evil")
    handles = [hub.submit_broadcast("1", "evil", timeout=5) for _ in range(8)]
    now = time.time()
    with loop_held(hub):
        for i, h in enumerate(handles):
            base = {"cmd": h.cmd, "status": "ok", "started": now, "finished": now}
            assert push.send(deep_frame(me, "result", base, "value"))
            assert push.send(seal(me, "result", P.ResultBody(h.cmd, "ok", now, now, value=i)))
    for i, h in enumerate(handles):
        r = h.wait()
        assert r["evil"].status is odium.Status.OK and r["evil"].value == i, r["evil"]
    got = wait_until(lambda: too_deep_events(hub, me.key_id, "results"), 5,
                     "the deep results logged as rejected")
    assert f"limit of {MAX_DEPTH}" in got[0]["detail"]


def test_flood_of_deep_frames_logs_within_the_rate_limit(hub: odium.Hub, zctx,
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    """300 deep frames at once: each is rejected, but the event log and the process log get
    no more than the token bucket allows (no traceback per frame), and the hub serves the
    heartbeat behind them."""
    me, _q, push, boot, hub_boot = registered(hub, zctx, "flood")
    n = 300
    cmd = P.new_id()
    frame = {"cmd": cmd, "status": "ok", "started": 1.0, "finished": 1.0}
    caplog.set_level(logging.WARNING, logger="odium")
    caplog.clear()
    t0 = time.monotonic()
    with loop_held(hub):
        for _ in range(n):
            push.send(deep_frame(me, "result", frame, "value"))
        push.send(seal(me, "node_hb", P.NodeBeat(boot, hub_boot)))
    hub.wait_for_nodes(["flood"], 10)  # the beat behind the flood was served
    elapsed = time.monotonic() - t0
    allowed = BUCKET + REFILL * elapsed + 1
    logged = too_deep_events(hub, me.key_id, "results")
    assert 1 <= len(logged) <= allowed, (len(logged), allowed)
    records = [r for r in caplog.records if r.name.startswith("odium")
               and r.levelno >= logging.WARNING]
    assert 1 <= len(records) <= allowed, (len(records), allowed)
    assert not [r for r in records if r.exc_info], "a traceback was logged for bad input"


# --- the hub: query socket ------------------------------------------------------------------


def test_deep_request_is_answered_with_an_error_naming_the_limit(hub: odium.Hub, zctx) -> None:
    """A deep request, then pings, in one burst: the deep one gets an error reply that names
    the limit and the request, every ping its answer, in order."""
    me, q, _push, boot, _ = registered(hub, zctx, "deepq")
    mid = P.new_id()
    ids = [P.new_id() for _ in range(5)]
    with loop_held(hub):
        q.send(deep_frame(me, "register", {"name": "deepq", "boot": boot}, "info", id=mid))
        for m in ids:
            q.send(q.seal("ping", P.Empty(), msg_id=m))
    answers = [q.reply() for _ in range(6)]
    err = answers[0]
    assert (err.type, err.env.re) == ("error", mid), err
    assert err.body.kind == "ProtocolError"  # type: ignore[attr-defined]
    assert f"limit of {MAX_DEPTH} levels" in err.body.message  # type: ignore[attr-defined]
    assert [(a.type, a.env.re) for a in answers[1:]] == [("reply", m) for m in ids]
    wait_until(lambda: too_deep_events(hub, me.key_id, "query"), 5, "the rejected event")


def test_handler_that_raises_still_answers(hub: odium.Hub, zctx,
                                           request: pytest.FixtureRequest) -> None:
    """A query handler and a results handler that raise what nobody expected (a bug): the
    request gets an error reply at once, a handler_failed event is logged, and the requests
    and reports read with it are served."""
    admin = Raw(zctx, hub, "query", trusted(hub, "boss", role="admin"))

    def broken(*_a: Any) -> None:
        raise RuntimeError("boom")

    real_nodes = hub.core.query_dispatch.replace("nodes", broken)
    request.addfinalizer(lambda: hub.core.query_dispatch.replace("nodes", real_nodes))
    mid, after = P.new_id(), P.new_id()
    with loop_held(hub):
        admin.send(admin.seal("nodes", P.Query(), msg_id=mid))
        admin.send(admin.seal("ping", P.Empty(), msg_id=after))
    err = admin.reply(5)
    assert (err.type, err.env.re) == ("error", mid), err
    assert err.body.kind == "OdiumError"  # type: ignore[attr-defined]
    assert "RuntimeError: boom" in err.body.message  # type: ignore[attr-defined]
    ok = admin.reply(5)
    assert (ok.type, ok.env.re) == ("reply", after)
    wait_until(lambda: [e for e in events(hub, "handler_failed") if "boom" in e["detail"]],
               5, "the handler_failed event")
    # the same on the results socket: the report behind the failing one is handled
    me, _q, push, boot, hub_boot = registered(hub, zctx, "buggy")
    real_state = hub.core.result_dispatch.replace("state", broken)
    request.addfinalizer(lambda: hub.core.result_dispatch.replace("state", real_state))
    with loop_held(hub):
        push.send(seal(me, "state", P.StateReport({})))
        push.send(seal(me, "node_hb", P.NodeBeat(boot, hub_boot)))
    hub.wait_for_nodes(["buggy"], 5)
    wait_until(lambda: [e for e in events(hub, "handler_failed")
                        if e["detail"].startswith("results:")], 5, "the results event")


# --- a node: the same wrapper, the same limits -------------------------------------------


def test_node_rejects_deep_frames_from_its_hub_within_its_rate_limit(hub: odium.Hub) -> None:
    """Frames 5,000 deep, validly signed by the hub itself, on a real node's SUB socket: the
    node rejects each (no RecursionError), reports no more than its token bucket allows (20,
    then 2 a second), and goes on running commands."""
    hub.start_local(1, prefix="n")
    core = hub.core
    n = 100
    frame = deep_frame(core.rt.ident, "hb", {"boot": core.boot, "interval": 1.0}, "x")
    t0 = time.monotonic()
    for _ in range(n):
        hub._call(lambda: core.sockets["pub"].send(frame))
    assert hub.run("40 + 2", nodes="n-1", timeout=15)["n-1"].value == 42

    def reported() -> list[dict[str, Any]]:
        return [e for e in events(hub, "rejected") if e["node"] == "n-1"
                and "on PUB" in e["detail"] and f"limit of {MAX_DEPTH}" in e["detail"]]

    # the command came after the frames on the same link, and the node's reports went before
    # its result on its own: every report is in by now
    got = reported()
    assert 1 <= len(got) <= 20 + 2 * (time.monotonic() - t0) + 1, len(got)


def test_node_handler_that_raises_does_not_drop_the_rest(hub: odium.Hub,
                                                         request: pytest.FixtureRequest) -> None:
    """A reply that makes a node's handler raise what nobody expected (here a command that is
    not a string in a fetch reply): the node reports a handler_failed event and still runs
    the command that came in the same reply."""
    hub.start_local(1, prefix="n")
    core = hub.core
    def spoiled(msg: P.Message, body: P.Fetch, ask: Asker) -> None:
        def spoil(data: Any = None, error: Exception | None = None, **kw: Any) -> None:
            if error is not None:
                ask.reply(error=error)
            else:
                ask.reply({**data, "commands": [123, *data["commands"]]}, **kw)
        real(msg, body, Asker(ask.key, spoil))

    real = core.query_dispatch.replace("fetch", spoiled)
    request.addfinalizer(lambda: core.query_dispatch.replace("fetch", real))
    handle = BroadcastHandle(hub, 15.0)

    def unheard() -> None:
        """A broadcast the node can only get by fetching it (PUB is away for a moment)."""
        pub = core.sockets.pop("pub")
        try:
            b = core.broadcast("40 + 2", "n-1", timeout=15.0, on_done=handle._done)
            handle.cmd = b.cmd
        finally:
            core.sockets["pub"] = pub

    hub._call(unheard)  # the next heartbeat tells the node it missed one: it fetches
    assert handle.wait()["n-1"].value == 42
    got = wait_until(lambda: [e for e in events(hub, "handler_failed") if e["node"] == "n-1"],
                     10, "the node's handler_failed report")
    assert got[0]["detail"].startswith("reported by n-1: on fetch: AttributeError"), got[0]
