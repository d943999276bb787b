"""The rules, without sockets: the wire's signing and opening, typed dispatch, who may send
what, the node status tables of both sides, the rate limit, and patterns over path names."""

from __future__ import annotations

from typing import Any

import pytest

from odium.core import wire as P
from odium.core.dispatch import Dispatch
from odium.core.guards import ReplayCache
from odium.core.keys import Identity, verify_key
from odium.core.ratelimit import TokenBucket
from odium.core.targeting import match_nodes, name_matches
from odium.errors import AuthError, ProtocolError
from odium.hub.inbox import QUERY_TYPES, RESULT_TYPES
from odium.hub.keytable import ALLOWED_ROLES
from odium.hub.nodes import AWAY, LIVE, TRANSITIONS, NodeStatus
from odium.node import status as node_status

ME = Identity.generate()


def signed(type_: str, body: P.Body, state: str = "unversioned", **kw: Any) -> bytes:
    return P.Signer(ME.signing, ME.key_id, lambda: state)(type_, body, **kw)


# --- the wire ------------------------------------------------------------------------------


def test_a_signed_message_opens_as_it_was_sent_and_carries_the_state_of_its_moment() -> None:
    states = iter(["unversioned", "a" * 40])
    sign = P.Signer(ME.signing, ME.key_id, lambda: next(states))
    first, second = sign("ping", P.Empty()), sign("ack", P.Ack("c" * 32))
    a = P.open_message(first, ME.signing.verify_key, ME.key_id)
    b = P.open_message(second, ME.signing.verify_key, ME.key_id)
    assert (a.type, a.env.state, a.env.from_) == ("ping", "unversioned", ME.key_id)
    assert (b.type, b.env.state, b.body) == ("ack", "a" * 40, P.Ack("c" * 32))


def test_one_changed_byte_and_another_sender_are_refused() -> None:
    raw = signed("ack", P.Ack("c" * 32))
    at = raw.index(b"c" * 32)
    bent = raw[:at] + b"d" + raw[at + 1:]
    with pytest.raises(AuthError, match="bad signature"):
        P.open_message(bent, ME.signing.verify_key, ME.key_id)
    other = Identity.generate()
    with pytest.raises(AuthError):
        P.open_message(raw, other.signing.verify_key, other.key_id)


def test_a_body_of_another_type_is_never_signed() -> None:
    with pytest.raises(ProtocolError, match="takes"):
        signed("ack", P.Empty())


def test_replays_and_stale_messages_are_refused() -> None:
    cache = ReplayCache(window=300.0)
    raw = signed("ping", P.Empty())
    msg = P.open_message(raw, ME.signing.verify_key, ME.key_id, replay=cache)
    with pytest.raises(AuthError, match="replayed"):
        P.open_message(raw, ME.signing.verify_key, ME.key_id, replay=cache)
    with pytest.raises(AuthError, match="off"):
        P.open_message(signed("ping", P.Empty()), ME.signing.verify_key, ME.key_id,
                       replay=cache, now=msg.env.ts + 301)


# --- typed dispatch ------------------------------------------------------------------------


def test_dispatch_gives_each_handler_its_own_body_type() -> None:
    got: list[tuple[str, Any, str]] = []
    d: Dispatch[str] = Dispatch("test")
    d.on("ack", P.Ack, lambda msg, body, ctx: got.append((msg.type, body.cmd, ctx)))
    with pytest.raises(TypeError, match="carries"):
        d.on("ping", P.Ack, lambda msg, body, ctx: None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already"):
        d.on("ack", P.Ack, lambda msg, body, ctx: None)
    d.handle(P.open_message(signed("ack", P.Ack("c" * 32)), ME.signing.verify_key,
                            ME.key_id), "who")
    assert got == [("ack", "c" * 32, "who")]
    with pytest.raises(ProtocolError, match="no 'ping' messages on test"):
        d.handle(P.open_message(signed("ping", P.Empty()), ME.signing.verify_key, ME.key_id),
                 "who")
    old = d.replace("ack", lambda msg, body, ctx: got.append(("replaced", None, ctx)))
    d.handle(P.open_message(signed("ack", P.Ack("c" * 32)), ME.signing.verify_key,
                            ME.key_id), "x")
    assert got[-1] == ("replaced", None, "x") and old is not None


# --- who may send what ---------------------------------------------------------------------


def test_the_role_tables_name_real_types_and_roles_and_keep_nodes_from_commanding() -> None:
    for table in (QUERY_TYPES, RESULT_TYPES):
        assert set(table) <= set(P.BODIES)
        # ("used": a spent token key, which may only repeat the join that spent it)
        assert all(set(roles) <= {*ALLOWED_ROLES, "used"} for roles in table.values())
    assert not set(QUERY_TYPES) & set(RESULT_TYPES)  # each type on one socket only
    node_may = {t for t, roles in QUERY_TYPES.items() if "node" in roles}
    # nothing that commands ("group_key": the keys of groups it reads, odium.node.groups)
    assert node_may == {"register", "fetch", "ping", "bundle", "group_key"}
    assert all(roles == ("node",) for roles in RESULT_TYPES.values())
    assert QUERY_TYPES["join"] == ("token", "used")  # a token key may only join
    assert [t for t, roles in QUERY_TYPES.items() if "used" in roles] == ["join"]


# --- a node's status, on both sides --------------------------------------------------------


def _reachable(start: NodeStatus) -> set[NodeStatus]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_hubs_table_of_node_statuses_lets_every_node_come_back_and_be_lost() -> None:
    assert set(TRANSITIONS) == set(NodeStatus)
    for status in NodeStatus:
        assert {NodeStatus.READY, NodeStatus.LOST} <= _reachable(status), status
    assert NodeStatus.READY not in TRANSITIONS[NodeStatus.OFFLINE]  # registered first
    assert LIVE == {NodeStatus.READY, NodeStatus.CONNECTING} and not LIVE & AWAY


def test_the_nodes_own_status_moves_only_along_its_table() -> None:
    S, E, step = node_status.NodeStatus, node_status.Event, node_status.next_status
    s = step(S.JOINING, E.JOINED)
    s = step(s, E.REGISTERED)
    assert step(s, E.HEARD) is S.READY
    assert step(S.READY, E.LOST) is S.REGISTERING  # the hub restarted: register again
    with pytest.raises(RuntimeError, match="cannot be"):
        step(S.JOINING, E.HEARD)
    # every status can get back to ready
    for start in S:
        seen, todo = {start}, [start]
        while todo:
            cur = todo.pop()
            for (frm, _ev), to in node_status.TRANSITIONS.items():
                if frm is cur and to not in seen:
                    seen.add(to)
                    todo.append(to)
        assert S.READY in seen, start


# --- the rate limit ------------------------------------------------------------------------


def test_the_token_bucket_allows_a_burst_then_its_rate() -> None:
    now = [100.0]
    bucket = TokenBucket(5, 2, clock=lambda: now[0])
    assert [bucket.take() for _ in range(7)] == [True] * 5 + [False] * 2
    now[0] += 1.0  # two more a second
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    now[0] += 100.0  # never more than the burst
    assert sum(bucket.take() for _ in range(10)) == 5


# --- patterns over names that are paths ----------------------------------------------------


def test_on_flat_names_a_glob_means_what_fnmatch_says() -> None:
    """Any glob over names without "/" matches exactly what fnmatch matches (20,000 random
    globs and names over the characters that make globs hard)."""
    import fnmatch
    import random

    rnd = random.Random(7)
    globs_of, names_of = "ab-*?[]!^\\.", "ab-!^\\.]["
    for _ in range(20_000):
        glob = "".join(rnd.choice(globs_of) for _ in range(rnd.randint(1, 6)))
        name = "".join(rnd.choice(names_of) for _ in range(rnd.randint(0, 5)))
        assert name_matches(glob, name) == fnmatch.fnmatchcase(name, glob), (glob, name)


@pytest.mark.parametrize(("pattern", "names"), [
    ("*", ["lab1", "lab10", "x"]),
    ("**", ["lab1", "lab1/pc-1", "lab1/pc-2", "lab10", "lab2/pc-1", "lab1/sub/pc-3", "x"]),
    ("lab1/*", ["lab1/pc-1", "lab1/pc-2"]),
    ("lab1/**", ["lab1", "lab1/pc-1", "lab1/pc-2", "lab1/sub/pc-3"]),
    ("lab*/pc-*", ["lab1/pc-1", "lab1/pc-2", "lab2/pc-1"]),
    ("**/pc-*", ["lab1/pc-1", "lab1/pc-2", "lab2/pc-1", "lab1/sub/pc-3"]),
    ("lab1/**/pc-3", ["lab1/sub/pc-3"]),
    ("lab?/pc-[12]", ["lab1/pc-1", "lab1/pc-2", "lab2/pc-1"]),
    ("lab[!/]*", ["lab1", "lab10"]),
    ("x, lab2/*", ["lab2/pc-1", "x"]),
])
def test_star_stays_in_a_segment_and_two_stars_cross_them(pattern: str,
                                                           names: list[str]) -> None:
    tree = ["lab1", "lab1/pc-1", "lab1/pc-2", "lab10", "lab2/pc-1", "lab1/sub/pc-3", "x"]
    assert match_nodes(pattern, tree) == [n for n in tree if n in names]


# --- sealing to many: each receiver finds its own record, and only its own ------------------


def test_sealed_to_many_each_opens_only_its_own() -> None:
    from odium.core.sealing import RECORD_CHARS, Keyring

    hub = Identity.generate()
    nodes = [Identity.generate() for _ in range(300)]
    body = P.Exec(P.new_id(), "python", "x = 1")
    sealed = Keyring(hub).seal("exec", body, [n.key_id for n in nodes[:299]],
                               to=[f"n{i}" for i in range(299)])
    assert len(sealed.k) == 299 * RECORD_CHARS
    for n in (nodes[0], nodes[150], nodes[298]):
        assert Keyring(n).open(hub.key_id, sealed) is not None
    assert Keyring(nodes[299]).open(hub.key_id, sealed) is None  # not a recipient


def test_sealed_tag_across_two_records_is_not_a_record() -> None:
    """A receiver's tag that appears in the keys text off a record's start (here: planted
    across the boundary of two records) is not taken for its record."""
    from odium.core.encoding import b64url, unb64url
    from odium.core.sealing import RECORD_CHARS, Keyring, _tag

    hub, node, other = Identity.generate(), Identity.generate(), Identity.generate()
    sealed = Keyring(hub).seal("exec", P.Exec(P.new_id(), "python", "1"),
                               [other.key_id, Identity.generate().key_id], to=["o"])
    tag = b64url(_tag(Keyring(node).shared(hub.key_id), unb64url(sealed.n)))
    k = sealed.k[:RECORD_CHARS - 6] + tag + sealed.k[RECORD_CHARS + 6:]
    assert len(k) == len(sealed.k)
    forged = P.Sealed(sealed.n, k, sealed.box)
    assert Keyring(node).open(hub.key_id, forged) is None
    with pytest.raises(ProtocolError):
        Keyring(node).open(hub.key_id, P.Sealed(sealed.n, sealed.k + "x", sealed.box))


def test_sealed_reuse_shares_a_key_only_among_the_same_readers() -> None:
    from odium.core.sealing import Keyring

    hub, a, b, c = (Identity.generate() for _ in range(4))
    ring = Keyring(hub)
    body = P.Exec(P.new_id(), "python", "1")
    one = ring.seal("exec", body, [a.key_id, b.key_id], to=["a", "b"], reuse=True)
    two = ring.seal("exec", body, [a.key_id, b.key_id], to=["a", "b"], reuse=True)
    assert (one.n, one.g) == (two.n, two.g) and one.k and two.k == ""  # wrapped once
    assert one.bn != two.bn and one.box != two.box  # each box its own nonce
    ring_a, ring_b, ring_c = Keyring(a), Keyring(b), Keyring(c)
    for sealed in (one, two):  # (the second opens with the key kept from the first)
        assert ring_a.open(hub.key_id, sealed) == ring_b.open(hub.key_id, sealed)
        assert ring_c.open(hub.key_id, sealed) is None
    fewer = ring.seal("exec", body, [a.key_id], to=["a"], reuse=True)
    assert fewer.n != one.n and Keyring(b).open(hub.key_id, fewer) is None
    # a box moved under another message's nonce does not open
    with pytest.raises(AuthError):
        Keyring(a).open(hub.key_id, P.Sealed(one.n, one.k, two.box, one.bn))


def test_a_group_key_is_kept_announced_or_asked_for_and_only_its_readers_get_it() -> None:
    from odium.core.sealing import GROUP_TTL, Keyring, UnknownGroup

    hub, a, b, c = (Identity.generate() for _ in range(4))
    ring = Keyring(hub)
    body = P.Exec(P.new_id(), "python", "1")
    readers = [a.key_id, b.key_id]
    announced = ring.announcement(readers)
    assert announced is not None and announced.box == "" and announced.k
    assert ring.announcement(readers) is None  # once per group
    batch = ring.seal("exec", body, readers, to=["a"], reuse=True)
    assert batch.g == announced.g and batch.k == ""
    ring_a, ring_c = Keyring(a), Keyring(c)
    assert ring_a.learn(hub.key_id, announced) and not ring_c.learn(hub.key_id, announced)
    assert ring_a.open(hub.key_id, batch) is not None
    assert ring_c.open(hub.key_id, batch) is None  # it heard it is not a reader
    ring_b = Keyring(b)  # missed the announcement: it cannot tell, so it must ask
    with pytest.raises(UnknownGroup) as e:
        ring_b.open(hub.key_id, batch)
    assert e.value.gid == batch.g
    key = ring.group_key(batch.g, b.key_id)
    assert key is not None and ring.group_key(batch.g, c.key_id) is None
    assert ring.group_key("A" * 12, b.key_id) is None
    ring_b.keep(hub.key_id, batch.g, key)
    assert ring_b.open(hub.key_id, batch) == ring_a.open(hub.key_id, batch)
    # a key kept under another sender's name opens nothing of this one's
    with pytest.raises(UnknownGroup):
        Keyring(b).open(c.key_id, batch)
    # after GROUP_TTL the readers get a new group, and the old one's key is no longer given
    group = ring._groups[tuple(readers)]
    group.until -= GROUP_TTL + 1
    assert ring.group_key(batch.g, a.key_id) is None
    fresh = ring.seal("exec", body, readers, to=["a"], reuse=True)
    assert fresh.g != batch.g and fresh.k


def test_a_message_for_every_reader_names_none_and_each_reads_itself_as_its_target() -> None:
    from odium.core.sealing import Keyring, open_inner

    hub, a, b = (Identity.generate() for _ in range(3))
    sealed = Keyring(hub).seal("exec", P.Exec(P.new_id(), "python", "1"), [a.key_id, b.key_id],
                               to=["node-a", "node-b"], reuse=True, every_reader=True)
    raw = P.seal(hub.signing, hub.key_id, "unknown", "sealed", sealed)
    assert b"node-" not in raw
    msg = P.open_message(raw, verify_key(hub.key_id), hub.key_id)
    opened = open_inner(Keyring(a), msg, "pub", "node-a")
    assert opened is not None and opened.env.to == ["node-a"]
    nameless = open_inner(Keyring(b), msg, "pub")  # no name given: addressed to nobody
    assert nameless is not None and nameless.env.to == []


def test_only_the_newest_attempt_of_a_repeated_request_in_one_batch_is_handled() -> None:
    """A join, register or fetch asked again (same connection, type and body) and read in the
    same batch as its earlier attempts is handled once, the newest; anything else each time."""
    import zmq

    from odium.hub.inbox import newest_attempts

    node, other = Identity.generate(), Identity.generate()

    def req(ident: Identity, type_: str, body: P.Body, rid: bytes) -> list[zmq.Frame]:
        return [zmq.Frame(rid), zmq.Frame(P.seal(ident.signing, ident.key_id, "unknown",
                                                 type_, body))]

    a1 = req(node, "fetch", P.Fetch(3), b"r1")
    a2 = req(node, "fetch", P.Fetch(3), b"r1")
    other_conn = req(other, "fetch", P.Fetch(3), b"r2")  # the same request, another node
    newer = req(node, "fetch", P.Fetch(4), b"r1")  # another request
    ping1, ping2 = req(node, "ping", P.Empty(), b"r1"), req(node, "ping", P.Empty(), b"r1")
    junk = [zmq.Frame(b"r1"), zmq.Frame(b"not json")]
    batch = [a1, ping1, other_conn, a2, newer, ping2, junk]
    assert newest_attempts(batch) == [ping1, other_conn, a2, newer, ping2, junk]
    assert newest_attempts([a1]) == [a1]


def test_a_pub_command_that_cannot_wait_for_its_groups_key_is_fetched_again() -> None:
    """Past MAX_WAITING groups (or MAX_HELD messages) a node gives up holding a command whose
    group key it lacks; the command is not lost: the next fetch starts before it."""
    from odium.core.sealing import Keyring
    from odium.node.groups import MAX_WAITING, MissedKeys

    hub, node = Identity.generate(), Identity.generate()
    ring = Keyring(hub)
    asked: list[list[str]] = []
    later: list[object] = []
    fetches: list[int] = []
    missed = MissedKeys(Keyring(node), hub.key_id, "n", lambda _t, b, _r: asked.append(b.g),
                        lambda _t: bool(asked), lambda _w, e: None,
                        lambda _s, fn: later.append(fn), lambda: fetches.append(1))
    opened: list[int] = []

    def command(seq: int) -> P.Message:
        """The second message to a group of this node and another: it names only the group."""
        readers = [node.key_id, Identity.generate().key_id]
        body = P.Exec(P.new_id(), "python", str(seq))
        ring.seal("exec", body, readers, to=["n", "x"], reuse=True)
        compact = ring.seal("exec", body, readers, to=["n", "x"], reuse=True)
        raw = P.seal(hub.signing, hub.key_id, "unknown", "sealed", compact, seq=seq)
        return P.open_message(raw, verify_key(hub.key_id), hub.key_id)

    for seq in range(10, 10 + MAX_WAITING + 3):
        missed.open(command(seq), "pub", lambda _m, s=seq: opened.append(s), lambda: None)
    assert opened == [] and len(fetches) == 3  # the three oldest groups given up, each said
    assert missed.lost == 10
    assert missed.since(10 + MAX_WAITING + 2) == 9 and missed.lost is None
    assert missed.since(99) == 99  # (once: the fetch that starts there takes them)
    # a job batch given up is not fetched: the hub sends it again when no report comes
    missed.give_up(command(500), "jobs")
    assert missed.lost is None and len(fetches) == 3
