"""When a node asks its hub again (odium.node.requests): only after 10 s, whether its
connection is being made (libzmq keeps what waits for it) or stands (TCP loses nothing): the
hub is only slow, as in a join storm, where every retry is more work for it; at once when its
connection breaks and is made again; soon, every few seconds, after a refused handshake.
Real sockets (inproc DEALER to ROUTER); the socket events are what the node's handshake
monitors report (odium.node.link)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from odium.core import wire as P
from odium.core.keys import Identity
from odium.node.requests import REFUSED_RETRY_MAX, REQUEST_RETRY, RETRY_MAX, STEADY_RETRY, Requests

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket[Any], zmq.Socket[Any]]]:
    ctx = zmq.Context()
    hub = ctx.socket(zmq.ROUTER)
    hub.bind("inproc://hub")
    node = ctx.socket(zmq.DEALER)
    node.connect("inproc://hub")
    try:
        yield node, hub
    finally:
        node.close(0)
        hub.close(0)
        ctx.term()


def received(hub: zmq.Socket[Any]) -> list[str]:
    """The ids of the attempts the hub has been sent so far."""
    ids = []
    while hub.poll(50):
        ids.append(P.peek_id(hub.recv_multipart()[-1]) or "")
    return ids


def asking(node: zmq.Socket[Any]) -> tuple[Requests, Any]:
    ident = Identity.generate()
    sign = P.Signer(ident.signing, ident.key_id, lambda: "unknown")
    requests = Requests(lambda _s: sign, lambda _r, _e: None)
    requests.ask(node, "fetch", P.Fetch(0), lambda _d: None)
    (req,) = requests._requests()
    return requests, req


def test_before_the_connection_is_made_asked_again_only_after_ten_seconds(pair: Any) -> None:
    """What waits for its connection goes when it is made: a join storm's slow handshakes
    are no reason to send it again (each copy would reach the hub)."""
    node, hub = pair
    requests, req = asking(node)
    assert len(received(hub)) == 1
    assert req.due() - req.sent == pytest.approx(STEADY_RETRY)
    assert requests.overdue(req.sent + REQUEST_RETRY + 0.1) == []


def test_asked_again_later_and_later_but_soon_while_refused(pair: Any) -> None:
    """A key pending at the hub is refused at every handshake until someone accepts it there:
    the node keeps trying every few seconds (it comes in soon after), not every half minute."""
    node, hub = pair
    requests, req = asking(node)
    for _ in range(6):
        requests.again(req)
    assert req.due() - req.sent == pytest.approx(RETRY_MAX)
    requests.again(req)
    requests.refused(node)  # its handshake refused
    assert req.due() - req.sent == pytest.approx(REFUSED_RETRY_MAX)
    assert requests.overdue(req.sent + REFUSED_RETRY_MAX + 0.1) == [req]
    requests.again(req)  # (a handshake that was not refused: later and later again)
    assert req.due() - req.sent == pytest.approx(RETRY_MAX)
    requests.refused(node)  # the hub refused the handshake: soon, whatever was sent when
    assert req.due() - req.sent == pytest.approx(REFUSED_RETRY_MAX)
    requests.again(req)
    requests.refused(node)
    requests.connected(node, True)  # and once its connection stands, as on any that stands
    assert req.due() - req.sent == pytest.approx(RETRY_MAX)
    assert len(received(hub)) == 10


def test_on_a_connection_that_stands_asked_again_only_after_ten_seconds(pair: Any) -> None:
    node, hub = pair
    requests, req = asking(node)
    requests.connected(node, True)  # its first connection: what waits goes on it
    assert req.due() - req.sent == pytest.approx(STEADY_RETRY)
    assert requests.overdue(req.sent + REQUEST_RETRY + 0.1) == []
    assert requests.overdue(req.sent + STEADY_RETRY + 0.1) == [req]
    assert len(received(hub)) == 1  # nothing sent again for the connection being made


def test_a_connection_made_again_sends_what_waits_at_once(pair: Any) -> None:
    node, hub = pair
    requests, req = asking(node)
    requests.connected(node, True)
    first = received(hub)
    requests.connected(node, False)  # broken: its attempts, or their answers, may be lost
    assert received(hub) == []
    requests.connected(node, True)  # made again
    again = received(hub)
    assert len(again) == 1 and again != first and req.tries == 2
    assert req.steady and set(first + again) <= set(req.attempts)  # either answer counts
