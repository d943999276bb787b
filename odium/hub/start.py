"""Starting a hub on a runtime: one hub per home, its store, its admin key, its hub.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..core import wire as P
from ..errors import ConfigError
from ..local.home import load_or_create
from .links import HubHost
from .server import HubCore
from .store import Store, default_url

_HUB_HOMES: set[Path] = set()  # homes of the hubs running in this process


def start_hub(rt: HubHost, *, interface: str = "127.0.0.1", ports: dict[str, int] | None = None,
              db: str | None = None, hb_interval: float = 1.0, max_message: int = P.MAX_MESSAGE,
              wheelhouse: str | None = None) -> HubCore:
    """Start the hub part of ``rt``'s process; it closes with the runtime."""
    _refuse_second_hub(rt.home)
    _HUB_HOMES.add(rt.home)
    store = Store(db or default_url(rt.home))
    admin = load_or_create(rt.home / "admin.key")
    try:
        hub = rt.call(lambda: HubCore(
            rt, store, interface=interface, ports=ports, hb_interval=hb_interval,
            max_message=max_message, admin=admin,
            wheelhouse=Path(wheelhouse) if wheelhouse else None))
    except BaseException:
        _HUB_HOMES.discard(rt.home)
        store.close()
        raise

    def close() -> None:
        try:
            hub.close()
        finally:
            _HUB_HOMES.discard(rt.home)
            (rt.home / "hub.json").unlink(missing_ok=True)
            store.close()

    rt.own("hub", close)
    hub.write_info(rt.home)
    return hub


def _refuse_second_hub(home: Path) -> None:
    """Two hubs on one home would share keys, store and hub.json: refuse the second."""
    try:
        pid = int(json.loads((home / "hub.json").read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    if pid == os.getpid():
        if home in _HUB_HOMES:
            raise ConfigError(f"a hub is already running with home {home} in this "
                              "process; give this one another home")
        return
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return  # left behind by a hub that died
    except PermissionError:
        pass
    raise ConfigError(f"another hub (pid {pid}) is running with home {home}; stop it, "
                      "or give this one another home (--home)")
