"""What runs a node's commands and jobs: by default worker processes (``ProcessWorkers``: the
session executor, the job pool and the zygote that forks both). A node is given its
workers when it starts; the swarm of the scale benchmark (``bench/swarm.py``) gives many
nodes of one process one shared worker instead. The node's own code only sees these
Protocols."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ...io.transport import Loop

log = logging.getLogger(__name__)

Event = dict[str, Any]


class CommandRunner(Protocol):
    """Runs a node's broadcast commands (``odium.node.workers.sessions.Executor``)."""

    runs: dict[str, Any]  # the commands it runs or holds, by id

    def submit(self, cmd: str, kind: str, code: str, session: str = "default",
               timeout: float | None = None, ephemeral: bool = False,
               deadline: float | None = None) -> None: ...

    def running(self) -> list[str]: ...

    def interrupt(self, cmd: str, reason: str = "interrupted") -> bool: ...

    def warm(self) -> None: ...

    def close(self) -> None: ...


class JobRunner(Protocol):
    """Runs a node's jobs (``odium.node.workers.pool.JobPool``); ``on_done(job_id, result)``."""

    def start(self, job_id: str, job: dict[str, Any], timeout: float | None,
              fn_data: str | None = None) -> None: ...

    def cancel(self, job_id: str, reason: str = "cancelled") -> bool: ...

    def close(self) -> None: ...


class Workers(Protocol):
    """What makes a node's runners; ``start`` when the node starts, ``stop`` when it closes."""

    def start(self) -> None: ...

    def commands(self, loop: Loop, app: str,
                 on_event: Callable[[Event], None]) -> CommandRunner: ...

    def jobs(self, loop: Loop, app: str, capacity: int,
             on_done: Callable[[str, Event], None]) -> JobRunner: ...

    def stop(self) -> None: ...


class ProcessWorkers:
    """Worker processes forked by the process's zygote (``odium.node.workers.zygote``: the one
    ``odium node`` forked as it started, or a new interpreter started now, which imports in
    the background while the node joins); new interpreters when there is none."""

    def __init__(self) -> None:
        self._zygote = False

    def start(self) -> None:
        from .start import warm_zygote

        warm_zygote()
        self._zygote = True

    def commands(self, loop: Loop, app: str,
                 on_event: Callable[[Event], None]) -> CommandRunner:
        from .sessions import Executor

        # a spare session worker is forked from the zygote while the node joins (it takes
        # a millisecond), so the first command finds it ready
        return Executor(loop, app, on_event, prestart=True)

    def jobs(self, loop: Loop, app: str, capacity: int,
             on_done: Callable[[str, Event], None]) -> JobRunner:
        from .pool import JobPool

        return JobPool(loop, app, capacity, on_done)

    def stop(self) -> None:
        if self._zygote:
            from .start import release_zygote

            self._zygote = False
            release_zygote()


__all__ = ["CommandRunner", "JobRunner", "ProcessWorkers", "Workers"]
