"""Odium: run Python on many machines from a notebook, encrypted, and know which version ran where.

The public API, imported lazily so that worker processes start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .version import __version__ as __version__

__all__ = [
    "Hub", "Admin", "HubAPI", "Result", "NodeResult", "Status", "Job", "JobStatus",
    "OdiumError", "ConfigError", "ProtocolError", "AuthError", "TimeoutError",
    "NotConnectedError", "RemoteError", "StateMismatchError", "StateError", "JobStateError",
    "JobCancelledError", "Ref", "ScatterError",
]

_WHERE = {
    "Hub": "api.hub", "Admin": "api.admin", "HubAPI": "api.interface",
    "Result": "core.results", "NodeResult": "core.results", "Status": "core.results",
    "Job": "api.jobs", "JobStatus": "core.jobs",
    "OdiumError": "errors", "ConfigError": "errors", "ProtocolError": "errors",
    "AuthError": "errors", "TimeoutError": "errors", "NotConnectedError": "errors",
    "RemoteError": "errors", "StateMismatchError": "errors", "StateError": "errors",
    "JobStateError": "errors", "JobCancelledError": "errors",
    "Ref": "core.arrays", "ScatterError": "api.data",
    # %load_ext odium (IPython imported only then)
    "load_ipython_extension": "jupyter", "unload_ipython_extension": "jupyter",
}

if TYPE_CHECKING:
    from .api.admin import Admin
    from .api.data import ScatterError
    from .api.hub import Hub
    from .api.interface import HubAPI
    from .api.jobs import Job
    from .core.arrays import Ref
    from .core.jobs import JobStatus
    from .core.results import NodeResult, Result, Status
    from .errors import (
        AuthError,
        ConfigError,
        JobCancelledError,
        JobStateError,
        NotConnectedError,
        OdiumError,
        ProtocolError,
        RemoteError,
        StateError,
        StateMismatchError,
        TimeoutError,
    )


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'odium' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value
