"""What a node hears of its link to the hub beyond messages: refused handshakes (the socket
monitors), silence, and what it tells whoever runs it about them (notices)."""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import Any

import zmq

from ..core.keys import fingerprint
from ..io.transport import Loop, recv_frames

log = logging.getLogger(__name__)


class Link:
    """The handshake monitors of a node's sockets, and its notices.

    ``on_refused(what)``: the hub refused the handshake of the query or join socket;
    ``on_cut_off(what)``: it refused a data socket's (it no longer trusts this key)."""

    def __init__(self, loop: Loop, address: str, key_id: str, admitted: bool,
                 on_refused: Callable[[str], None], on_cut_off: Callable[[str], None]) -> None:
        self.loop = loop
        self.address = address
        self.key_id = key_id
        # a node admitted once (joined.json) that is refused now was revoked or rejected; one
        # never admitted waits as pending (a refused CURVE handshake carries no reason)
        self.admitted = admitted
        self.on_refused = on_refused
        self.on_cut_off = on_cut_off
        # the query or join socket's connection made (True: its handshake done) or broken
        self.on_link: Callable[[zmq.Socket[Any], bool], None] = lambda _s, _up: None
        # a data socket's handshake done ("pub", "results", "jobs"): what waited for it may go
        self.on_data_up: Callable[[str], None] = lambda _what: None
        self.monitors: dict[str, zmq.Socket[Any]] = {}
        self.monitored: dict[str, zmq.Socket[Any]] = {}  # the socket each monitor watches
        # what this node says to whoever runs it (odium node prints it; else the log)
        self.on_notice: Callable[[str], None] | None = None
        self.refusal = ""  # what the hub's last refused handshake meant, once said
        self.unreachable = False
        self.auth_failed: set[str] = set()  # sockets whose last handshake the hub refused

    # --- handshakes ------------------------------------------------------------------------

    def watch(self, sock: zmq.Socket[Any], what: str) -> None:
        """Hear refused handshakes at once (a spent token, a key the hub does not trust)."""
        mon = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                      | zmq.EVENT_HANDSHAKE_SUCCEEDED
                                      | zmq.EVENT_DISCONNECTED)
        self.monitors[what] = mon
        self.monitored[what] = sock
        self.auth_failed.discard(what)

        def on_event() -> None:
            for frames in recv_frames(mon):
                # a monitor event: u16 event, u32 value, then the endpoint (zmq_socket_monitor)
                event = struct.unpack("=H", frames[0].bytes[:2])[0]
                asks = what in ("query", "join")  # (the sockets requests go on)
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self.auth_failed.discard(what)
                    if asks:
                        self.on_link(sock, True)
                    else:
                        self.on_data_up(what)
                elif event == zmq.EVENT_DISCONNECTED:
                    if asks:
                        self.on_link(sock, False)
                elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    self.auth_failed.add(what)
                    if what in ("query", "join"):
                        self.on_refused(what)
                    else:
                        self.on_cut_off(what)

        self.loop.add(mon, on_event)

    def unwatch(self, what: str) -> None:
        """Stop watching a socket's handshakes: the monitor is switched off on the watched
        socket *before* its end is closed (closed first, libzmq's I/O thread can block for
        ever sending an event to it, and the node hears nothing more on any socket)."""
        sock = self.monitored.pop(what, None)
        if sock is not None and not sock.closed:
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
        mon = self.monitors.pop(what, None)
        if mon is not None:
            self.loop.remove(mon)
            mon.close(linger=0)

    def close(self) -> None:
        for what in list(self.monitors):
            self.unwatch(what)

    # --- notices ---------------------------------------------------------------------------

    def notice(self, text: str) -> None:
        """Tell whoever runs this node what is going on (odium node prints it)."""
        if self.on_notice is not None:
            log.info("%s", text)
            self.on_notice(text)
        else:
            log.warning("%s", text)

    def refused(self) -> None:
        """The hub refused this node's key: say what that means, once while it lasts."""
        fp = fingerprint(self.key_id)
        if self.admitted:
            why = "revoked"
            text = (f"the hub at {self.address} refuses this node's key (revoked or rejected "
                    f"there); still trying: back as soon as it is accepted again (odium keys "
                    f"accept {fp})")
        else:
            why = "pending"
            text = (f"the hub at {self.address} does not trust this node's key yet (pending "
                    f"there); still trying: accept it there with: odium keys accept {fp}")
        if why != self.refusal:
            self.refusal = why
            self.notice(text)

    def ready(self, name: str) -> None:
        """Joined and heard: say so (and forget any refusal)."""
        self.refusal = ""
        self.notice(f"joined the hub at {self.address} as {name}; ready")

    def heard(self) -> None:
        if self.unreachable:
            self.unreachable = False
            self.notice(f"the hub at {self.address} is reachable again")

    def silent(self, seconds: float, interval: float, joining: bool) -> None:
        """Nothing heard from the hub for ``seconds``: say it is unreachable, once."""
        if (seconds > max(5 * interval, 3.0) and not self.unreachable
                and not self.refusal and not joining):
            self.unreachable = True
            self.notice(f"the hub at {self.address} is unreachable: nothing heard for "
                        f"{seconds:.0f} s; still trying")


__all__ = ["Link"]
