"""One Odium process: identity, application state, the loop, and its hub and node parts.

An instance is always able to be a hub (``start_hub``) and a node (``start_node``),
both at once in the middle of a tree; both parts share one loop thread.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import zmq

from .api.interface import default_home
from .core.keys import Identity, Token, ensure_home, load_or_create
from .core.wire import MAX_MESSAGE
from .errors import ConfigError, OdiumError
from .errors import TimeoutError as OdiumTimeout
from .io.transport import Loop
from .local.state import find_app, state_id
from .node.agent import NodeCore

if TYPE_CHECKING:  # the hub part (and SQLAlchemy) is imported only by instances that are hubs
    from .hub.server import HubCore
    from .hub.store import Store

log = logging.getLogger("odium")
T = TypeVar("T")


_HUB_HOMES: set[Path] = set()  # homes of the hubs running in this process


class Instance:
    def __init__(self, home: str | os.PathLike[str] | None = None,
                 app: str | os.PathLike[str] | None = None) -> None:
        self.home = ensure_home(home or default_home())
        self.ident: Identity = load_or_create(self.home / "identity.key")
        self.app = find_app(app)
        self.state = state_id(self.app)
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.loop = Loop()
        self.hub: HubCore | None = None
        self.node: NodeCore | None = None
        self.store: Store | None = None
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self.closed = False

    # --- parts -----------------------------------------------------------------------------

    def start_hub(self, *, interface: str = "127.0.0.1", ports: dict[str, int] | None = None,
                  db: str | None = None, hb_interval: float = 1.0,
                  max_message: int = MAX_MESSAGE, wheelhouse: str | None = None) -> HubCore:
        from .hub.server import HubCore
        from .hub.store import Store, default_url

        self._refuse_second_hub()
        _HUB_HOMES.add(self.home)
        self.store = Store(db or default_url(self.home))
        admin = load_or_create(self.home / "admin.key")
        try:
            self.hub = self.call(lambda: HubCore(
                self, self.store, interface=interface, ports=ports,  # type: ignore[arg-type]
                hb_interval=hb_interval, max_message=max_message, admin=admin,
                wheelhouse=Path(wheelhouse) if wheelhouse else None))
        except BaseException:
            _HUB_HOMES.discard(self.home)
            self.store.close()
            self.store = None
            raise
        self.hub.write_info(self.home)
        return self.hub

    def _refuse_second_hub(self) -> None:
        """Two hubs on one home would share keys, store and hub.json: refuse the second."""
        info = self.home / "hub.json"
        try:
            pid = int(json.loads(info.read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        if pid == os.getpid():
            if self.home in _HUB_HOMES:
                raise ConfigError(f"a hub is already running with home {self.home} in this "
                                  "process; give this one another home")
            return
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return  # left behind by a hub that died
        except PermissionError:
            pass
        raise ConfigError(f"another hub (pid {pid}) is running with home {self.home}; stop it, "
                          "or give this one another home (--home)")

    def start_node(self, address: str, hub_key: str, name: str, *, token: Token | None = None,
                   capacity: int | None = None, find_links: str | None = None,
                   index_url: str | None = None) -> NodeCore:
        self.node = self.call(lambda: NodeCore(self, address, hub_key, name, token=token,
                                               capacity=capacity, find_links=find_links,
                                               index_url=index_url))
        return self.node

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
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OdiumTimeout(f"timed out after {timeout} s waiting for {what}")
                self._cond.wait(min(left, 0.05))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True

        def shutdown() -> None:
            if self.node is not None:
                self.node.close()
            if self.hub is not None:
                self.hub.close()
                _HUB_HOMES.discard(self.home)
                try:
                    (self.home / "hub.json").unlink()
                except FileNotFoundError:
                    pass

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
        if self.store is not None:
            self.store.close()
        self.loop.close()
        self.ctx.term()
