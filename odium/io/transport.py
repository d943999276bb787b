"""The only place that creates ZeroMQ sockets: CURVE servers and clients, the ZAP handler, the loop.

Server sockets (the hub's four) refuse to exist without a running ZAP handler on
their context, and set ZAP_ENFORCE_DOMAIN so that libzmq itself fails every
handshake if the handler ever goes away (a CURVE server without ZAP accepts
any client key).
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import zmq
import zmq.utils.z85

from ..core.keys import Identity, curve_public
from ..core.wire import MAX_MESSAGE
from ..errors import ConfigError, OdiumError

log = logging.getLogger(__name__)
T = TypeVar("T")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"odium"


@dataclass(frozen=True)
class ZapDecision:
    allowed: bool
    user_id: str = ""
    reason: str = ""


ZapPolicy = Callable[[str, bytes, str, str], ZapDecision]
"""(mechanism, client CURVE public key z85 (or b''), peer address, ZAP domain) -> decision.

Each hub socket has its own domain (``odium.pub``, ``odium.query``, ...), so a policy can
admit a key on one socket only."""


class ZapHandler:
    """A ZAP (RFC 27) handler thread whose every answer comes from a policy callback."""

    def __init__(self, ctx: zmq.Context[Any], policy: ZapPolicy) -> None:
        self.ctx = ctx
        self.policy = policy
        self._sock = ctx.socket(zmq.REP)
        self._sock.linger = 0
        try:
            self._sock.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as e:
            self._sock.close()
            raise ConfigError(f"this context already has a ZAP handler: {e}") from None
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="odium-zap", daemon=True)
        self.running = threading.Event()
        self._thread.start()
        self.running.wait(5)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._stop_r, zmq.POLLIN)
        self.running.set()
        try:
            while True:
                events = dict(poller.poll())
                if self._stop_r in events:
                    return
                if self._sock in events:
                    self._handle(self._sock.recv_multipart())
        finally:
            self.running.clear()
            self._sock.close(linger=0)

    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) < 6:
            log.warning("malformed ZAP request (%d frames)", len(frames))
            self._sock.send_multipart([b"1.0", b"", b"500", b"malformed", b"", b""])
            return
        version, request_id, domain, address, _identity, mechanism = frames[:6]
        creds = frames[6:]
        mech = mechanism.decode("ascii", "replace")
        client_key = zmq.utils.z85.encode(creds[0]) if mech == "CURVE" and creds else b""
        try:
            d = self.policy(mech, client_key, address.decode("utf-8", "replace"),
                            domain.decode("utf-8", "replace"))
        except Exception:  # the policy must never take the handler down; deny instead
            log.exception("ZAP policy failed; denying")
            d = ZapDecision(False, reason="internal error")
        if d.allowed:
            reply = [version, request_id, b"200", b"OK", d.user_id.encode(), b""]
        else:
            reply = [version, request_id, b"400", d.reason.encode()[:200], b"", b""]
        self._sock.send_multipart(reply)

    def close(self) -> None:
        if self._stop_r < 0:
            return
        if self._thread.is_alive():
            os.write(self._stop_w, b"x")
            self._thread.join(5)
        os.close(self._stop_r)
        os.close(self._stop_w)
        self._stop_r = self._stop_w = -1


def _common(sock: zmq.Socket[Any], max_message: int) -> None:
    sock.linger = 0
    sock.setsockopt(zmq.MAXMSGSIZE, max(max_message * 2, 1 << 20))
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    # a handshake may take long while a hub takes a join storm (thousands of handshakes, one
    # I/O thread, each key judged by ZAP): one dropped at 5 s was made again, and again
    sock.setsockopt(zmq.HANDSHAKE_IVL, 30_000)


def server_socket(
    ctx: zmq.Context[Any],
    kind: int,
    ident: Identity,
    zap: ZapHandler,
    interface: str,
    port: int,
    *,
    max_message: int = MAX_MESSAGE,
    hwm: int = 100_000,
    domain: bytes = ZAP_DOMAIN,
) -> tuple[zmq.Socket[Any], int]:
    """A CURVE server socket bound to interface:port (0 = OS-chosen); returns (socket, port)."""
    if zap.ctx is not ctx or not zap.running.is_set():
        raise ConfigError("refusing to bind a CURVE server without a running ZAP handler")
    sock = ctx.socket(kind)
    _common(sock, max_message)
    sock.curve_server = True
    sock.curve_secretkey = ident.curve_secret
    sock.curve_publickey = ident.curve_public
    sock.zap_domain = domain
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    sock.sndhwm = hwm
    sock.rcvhwm = hwm
    sock.setsockopt(zmq.BACKLOG, 4096)  # connections waiting to be accepted (libzmq: 100)
    try:
        if port == 0:
            port = sock.bind_to_random_port(f"tcp://{interface}")
        else:
            sock.bind(f"tcp://{interface}:{port}")
    except zmq.ZMQError as e:
        sock.close()
        if e.errno == zmq.EADDRINUSE:
            raise ConfigError(
                f"port {port} on {interface} is busy; choose others (e.g. --ports 0 for free ones)"
            ) from None
        raise ConfigError(f"cannot listen on {interface}:{port}: {e}") from None
    return sock, port


def node_topic(name: str) -> bytes:
    """The first frame of a message on PUB for one node alone (``[topic, message]``): the PUB
    socket sends it only to the connections that subscribed to it (``pub_topics``), not to
    every node. The NUL ends the name: ``@n-1`` is not a prefix of ``@n-10``'s topic."""
    return b"@" + name.encode() + b"\0"


def pub_topics(name: str) -> tuple[bytes, ...]:
    """What a node named ``name`` subscribes to: every message for all (one frame, a JSON
    object: it begins with ``{``) and those for it alone."""
    return (b"{", node_topic(name))


def client_socket(
    ctx: zmq.Context[Any],
    kind: int,
    ident: Identity,
    server_key: str,
    endpoint: str,
    *,
    max_message: int = MAX_MESSAGE,
    routing_id: bytes | None = None,
    hwm: int = 100_000,
    immediate: bool = False,
    topics: tuple[bytes, ...] = (b"",),
    watch: Callable[[zmq.Socket[Any]], None] | None = None,
) -> zmq.Socket[Any]:
    """A CURVE client socket that pins the server's key and connects to endpoint
    (``watch``: called before it connects, to monitor it: what its first handshake says is
    heard too; a monitor started after the connect can miss it)."""
    sock = ctx.socket(kind)
    _common(sock, max_message)
    sock.curve_secretkey = ident.curve_secret
    sock.curve_publickey = ident.curve_public
    sock.curve_serverkey = curve_public(server_key)
    sock.sndhwm = hwm
    sock.rcvhwm = hwm
    if routing_id is not None:
        sock.routing_id = routing_id
    if immediate:
        sock.setsockopt(zmq.IMMEDIATE, 1)
    if kind == zmq.SUB:
        for topic in topics:
            sock.setsockopt(zmq.SUBSCRIBE, topic)
    if watch is not None:
        watch(sock)
    try:
        sock.connect(endpoint)
    except zmq.ZMQError as e:
        sock.close()
        raise ConfigError(f"bad address {endpoint!r}: {e}") from None
    return sock


def peer_user_id(frame: zmq.Frame) -> str:
    """The identity the ZAP handler gave the connection this frame came on."""
    try:
        uid = frame.get("User-Id")
    except zmq.ZMQError:
        return ""
    return uid if isinstance(uid, str) else ""


class Loop:
    """A single-threaded reactor: sockets and file descriptors, timers, calls from other threads."""

    def __init__(self, name: str = "odium-loop") -> None:
        self.name = name
        self._poller = zmq.Poller()
        self._handlers: dict[Any, Callable[[], None]] = {}
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._counter = itertools.count()
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poller.register(self._wake_r, zmq.POLLIN)
        self._stopped = False
        self.thread: threading.Thread | None = None

    def add(self, sock: Any, handler: Callable[[], None]) -> None:
        self._handlers[sock] = handler
        self._poller.register(sock, zmq.POLLIN)

    def remove(self, sock: Any) -> None:
        if self._handlers.pop(sock, None) is not None:
            self._poller.unregister(sock)

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        self._at(time.monotonic() + delay, fn)

    def every(self, interval: float | Callable[[], float], fn: Callable[[], None]) -> None:
        """Call fn every ``interval`` seconds (or as often as ``interval()`` says each time),
        on the multiples of it (of the monotonic clock): what beats at the same pace runs in
        the same turn of the loop, one wake-up for all of it (a process with many nodes, or a
        hub and a node, polls once, not once each)."""
        every = interval if callable(interval) else lambda: interval

        def at(after: float, step: float) -> float:
            return math.ceil(after / step) * step

        def tick() -> None:
            try:
                fn()
            finally:
                if not self._stopped:
                    nxt = at(time.monotonic() + 1e-6, every())
                    self._at(nxt, tick)

        step = every()
        self._at(at(time.monotonic() + step / 2, step), tick)

    def _at(self, when: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (when, next(self._counter), fn))

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        self._calls.put(fn)
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # pipe full (already awake) or closed (stopping)

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self.thread

    def stop(self) -> None:
        self._stopped = True
        self.call_soon_threadsafe(lambda: None)

    def run(self) -> None:
        self.thread = threading.current_thread()
        poll = self._poller.poll
        handlers = self._handlers
        while not self._stopped:
            timeout: int | None = None
            if self._timers:
                timeout = max(0, int((self._timers[0][0] - time.monotonic()) * 1000) + 1)
            try:
                events = poll(timeout)
            except zmq.ZMQError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            for sock, _ev in events:
                if sock == self._wake_r:
                    self._drain_calls()
                    continue
                handler = handlers.get(sock)
                if handler is not None:
                    self._safely(handler)
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now and not self._stopped:
                _, _, fn = heapq.heappop(self._timers)
                self._safely(fn)
        self._drain_calls()

    def _drain_calls(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        while True:
            try:
                fn = self._calls.get_nowait()
            except queue.Empty:
                return
            self._safely(fn)

    def _safely(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except OdiumError as e:
            log.warning("%s: %s", self.name, e)
        except Exception:
            log.exception("%s: handler failed", self.name)

    def close(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass


def recv_frames(sock: zmq.Socket[Any], limit: int = 1000) -> list[list[zmq.Frame]]:
    """Everything waiting on a socket, without blocking (bounded, to stay fair)."""
    out = []
    for _ in range(limit):
        if not int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            break
        try:
            out.append(sock.recv_multipart(zmq.NOBLOCK, copy=False))
        except zmq.Again:
            break
    return out



def each_message(items: Iterable[T], handle: Callable[[T], None],
                 failed: Callable[[T, Exception], None]) -> None:
    """Handle each received message on its own: any exception ``handle`` raises for one, not
    only the protocol's, goes to ``failed`` for that one (which logs it, rate-limited, and
    answers it where someone waits), and the next is handled all the same. The one dispatch
    wrapper of every hub and node handler."""
    for item in items:
        try:
            handle(item)
        except Exception as e:  # noqa: BLE001 - one message's failure is its own
            try:
                failed(item, e)
            except Exception:  # noqa: BLE001 - never lose the rest of a batch to it
                log.exception("reporting a failed message failed")
