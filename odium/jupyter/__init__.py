"""The notebook side of Odium: ``%load_ext odium`` makes the running kernel a hub.

``load_ipython_extension`` registers ``%odium``, ``%%odium`` and ``%%local``, teaches IPython
to render results, and starts the hub in the background (its own loop thread: the kernel
stays responsive). ``unload_ipython_extension`` stops everything it started.
"""

from __future__ import annotations

import sys
from typing import Any

_MAGICS: Any = None  # the OdiumMagics of this process's shell, while the extension is loaded


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext odium``: register the magics and start the hub; print one line about it."""
    global _MAGICS
    if _MAGICS is not None:
        print("odium is already loaded: %odium nodes shows the hub's nodes")
        return
    from IPython.core.error import UsageError

    from .cell import OdiumMagics

    magics = OdiumMagics(ipython)
    ipython.register_magics(magics)
    _MAGICS = magics
    try:
        magics.start_hub()
    except UsageError as e:  # the magics stay: %odium start can try again
        print(f"odium: the hub did not start: {e}", file=sys.stderr)
        return
    print(magics.hello())


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext odium``: stop the hub and its local nodes, remove the magics."""
    global _MAGICS
    magics, _MAGICS = _MAGICS, None
    if magics is not None:
        magics.close()


def current() -> Any:
    """The loaded extension's magics (``None`` when not loaded): its ``hub`` is the Hub."""
    return _MAGICS


def hub() -> Any:
    """The notebook's Hub (``%load_ext odium`` started it): ``hub().apply(f)``,
    ``hub().scatter("x", xs)``, ``hub().map(f, xs)``."""
    magics = _MAGICS
    if magics is None or magics.hub is None:
        from ..errors import NotConnectedError

        raise NotConnectedError("no hub in this notebook: run %load_ext odium (or %odium start)")
    return magics.hub


__all__ = ["current", "hub", "load_ipython_extension", "unload_ipython_extension"]
