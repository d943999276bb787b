"""The runtime of one Odium process: its home and identity, the application and its state id,
the ZeroMQ context and the loop. What the parts of a process share, and nothing more.

A part (a hub, ``odium.hub.server.start_hub``; a node, ``odium.node.agent.start_node``) is
given the runtime and never its siblings or its owner; the owner (an ``odium`` command, an
``odium.Hub``) starts the parts it wants, each registering how it closes. One process can run
both parts on one runtime and one loop: a node to its hub and a hub to its own nodes.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import zmq

from .core import wire as P
from .core.clock import Clock
from .core.keys import Identity
from .errors import OdiumError
from .errors import TimeoutError as OdiumTimeout
from .io.transport import Loop
from .local.appstate import find_app, state_id
from .local.home import default_home, ensure_home, load_or_create
from .local.watch import StateWatch

log = logging.getLogger(__name__)
T = TypeVar("T")


class Runtime:
    def __init__(self, home: str | os.PathLike[str] | None = None,
                 app: str | os.PathLike[str] | None = None) -> None:
        self.home = ensure_home(home or default_home())
        self.ident: Identity = load_or_create(self.home / "identity.key")
        self.app = find_app(app)
        self.state = state_id(self.app)
        # the time its messages carry and are checked by: its hub's, once its node part
        # learnt it (odium.core.clock); every message this process sends is signed here, with
        # the state id of the moment
        self.clock = Clock()
        self.sign = P.Signer(self.ident.signing, self.ident.key_id, lambda: self.state,
                             self.clock)
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.loop = Loop()
        # one view of the application's state for the whole process (its hub and node parts)
        self.watch = StateWatch(self.app, self.loop.call_soon_threadsafe, self._set_state)
        self._closers: list[tuple[str, Callable[[], None]]] = []
        self._cond = threading.Condition()
        self._notified = False
        self._thread: threading.Thread | None = None
        self.closed = False

    def _set_state(self, state: str) -> None:
        self.state = state

    def own(self, what: str, close: Callable[[], None]) -> None:
        """Close ``what`` with the runtime, in the loop thread, the last started first."""
        self._closers.append((what, close))

    # --- the loop --------------------------------------------------------------------------

    def start_thread(self) -> None:
        """Run the loop in a background thread (the in-process Hub API)."""
        self._thread = threading.Thread(target=self.loop.run, name="odium-loop", daemon=True)
        self._thread.start()
        while self.loop.thread is None:
            time.sleep(0.0005)

    def run(self) -> None:
        """Run the loop in this thread until stopped (the node and hub commands)."""
        self.loop.run()

    def call(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        """Run fn in the loop thread and return its value (or raise its error)."""
        if self.loop.thread is None or self.loop.in_loop_thread():
            return fn()
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def go() -> None:
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)

        self.loop.call_soon_threadsafe(go)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            raise OdiumTimeout(f"the instance did not answer within {timeout} s") from None

    def notify(self) -> None:
        """Something a waiter may be waiting for changed (see ``wait_for``)."""
        with self._cond:
            self._notified = True
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait until ``pred`` is true. It runs in the loop thread (so it may read what the
        loop owns), again whenever a part notifies and at least every 50 ms."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                self._notified = False
            if self.call(pred, timeout=max(deadline - time.monotonic(), 1.0)):
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise OdiumTimeout(f"timed out after {timeout} s waiting for {what}")
            with self._cond:
                if not self._notified:  # (a notice that came while pred ran is not lost)
                    self._cond.wait(min(left, 0.05))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True

        def shutdown() -> None:
            for what, close in reversed(self._closers):
                try:
                    close()
                except Exception:  # noqa: BLE001 - the other parts still close
                    log.exception("closing the %s failed", what)
            self._closers.clear()

        try:
            if self._thread is not None and self._thread.is_alive():
                self.call(shutdown, timeout=15)
            else:
                shutdown()
        except OdiumError:
            log.exception("shutdown did not finish cleanly")
        self.loop.stop()
        if self._thread is not None:
            self._thread.join(10)
        self.loop.close()
        self.ctx.term()
