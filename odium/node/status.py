"""A node's own status towards its hub, and the transitions between statuses (one table)."""

from __future__ import annotations

import enum


class NodeStatus(enum.Enum):
    """Where a node is in joining and registering with its hub."""

    JOINING = "joining"  # with a join token, waiting for the hub to admit its key
    REGISTERING = "registering"  # asking the hub to register it (again)
    REGISTERED = "registered"  # registered; not yet heard the hub on PUB since
    READY = "ready"  # registered, and the hub's PUB reaches it: said so once


class Event(enum.Enum):
    JOINED = "joined"  # the hub admitted the key
    REGISTERED = "registered"  # the hub answered a register
    HEARD = "heard"  # the hub that registered the node is heard on PUB
    LOST = "lost"  # the hub restarted, or refuses the node's key now: register again


S, E = NodeStatus, Event
TRANSITIONS: dict[tuple[NodeStatus, Event], NodeStatus] = {
    (S.JOINING, E.JOINED): S.REGISTERING,
    (S.REGISTERING, E.REGISTERED): S.REGISTERED,
    (S.REGISTERED, E.REGISTERED): S.REGISTERED,
    (S.READY, E.REGISTERED): S.READY,
    (S.REGISTERED, E.HEARD): S.READY,
    (S.REGISTERING, E.LOST): S.REGISTERING,
    (S.REGISTERED, E.LOST): S.REGISTERING,
    (S.READY, E.LOST): S.REGISTERING,
}
del S, E


def next_status(status: NodeStatus, event: Event) -> NodeStatus:
    """The status after ``event``; a RuntimeError for an event that cannot come now (a bug)."""
    try:
        return TRANSITIONS[status, event]
    except KeyError:
        raise RuntimeError(f"a node {status.value} cannot be {event.value}") from None


__all__ = ["Event", "NodeStatus", "TRANSITIONS", "next_status"]
