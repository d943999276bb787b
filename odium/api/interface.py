"""The one interface ``Hub`` and ``Admin`` share: method names, arguments, defaults, shapes.

``Hub`` (odium/api/hub.py) is a hub in this process; ``Admin`` (odium/api/admin.py) talks to a hub
running in another process, over its query socket. Whatever both can do, they do under the
same name with the same signature and the same return shape, so code written against one runs
against the other. This module imports neither: it is the contract, checked by mypy (each of
hub.py and admin.py ends with the check that its class is a ``HubAPI``) and by
tests/test_api_shape.py.

Sessions (``run(..., session=...)``): a session is a Python namespace on each node, kept
between commands.

* ``session="name"``: that namespace on every node it runs on, whoever asks: a ``Hub`` and an
  ``Admin`` of the same hub that name the same session share it.
* no session: the object's own session, ``obj.session``: ``"default"`` for a ``Hub`` (the
  notebook's namespace), ``"admin-<random>"`` for an ``Admin`` (kept between the calls of that
  one ``Admin``; another ``Admin``, such as the next ``odium run``, has another).
* ``end_session=True``: the namespace is closed on each node once this command ends (its
  worker stops), so the next command of that session starts fresh. ``odium run`` without
  ``--session`` runs this way: nothing stays behind on the nodes.

Shell commands (``shell=True``) run in a fresh shell each time, whatever the session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..core.results import Result
    from ..launch.common import Launcher
    from .jobs import Job

DEFAULT_SESSION = "default"  # Hub.run without a session


class KeyVerbs:
    """``accept``/``reject``/``revoke`` over a ``key_action`` (both ``Hub`` and ``Admin`` have
    one): the key ids acted on."""

    def key_action(self, action: str, pattern: str, role: str | None = None
                   ) -> list[dict[str, Any]]:
        raise NotImplementedError

    def accept(self, pattern: str, role: str | None = None) -> list[str]:
        return [k["key"] for k in self.key_action("accept", pattern, role)]

    def reject(self, pattern: str, role: str | None = None) -> list[str]:
        return [k["key"] for k in self.key_action("reject", pattern, role)]

    def revoke(self, pattern: str, role: str | None = None) -> list[str]:
        return [k["key"] for k in self.key_action("revoke", pattern, role)]


class JobVerbs:
    """``submit`` over a ``submit_many`` (both ``Hub`` and ``Admin`` have one)."""

    def submit_many(self, items: Iterable[tuple[Any, tuple[Any, ...], dict[str, Any],
                                                str | None]], *, nodes: str = "*",
                    retries: int = 0, timeout: float | None = None,
                    require_state: str | None = None) -> list[Job]:
        raise NotImplementedError

    def submit(self, code_or_function: str | Callable[..., Any], *args: Any, nodes: str = "*",
               retries: int = 0, timeout: float | None = None,
               require_state: str | None = None, job_id: str | None = None,
               **kwargs: Any) -> Job:
        """Queue one job; it runs once, on one matching node with a free worker.

        A string is run like a cell in a fresh namespace (the value of its last expression
        is the result; ``args``/``kwargs`` are bound when given, and each keyword argument
        is a name too: ``submit("a + b", a=2, b=3)``). A function is called with
        ``*args, **kwargs`` (functions of importable modules travel by reference, others by
        value, with cloudpickle). ``retries``: runs again after an error or a lost node, up
        to that many times. ``timeout``: seconds one run may take. ``require_state``: as for
        ``run``. ``job_id``: your own id; submitting an id again gives the existing job.
        Returns at once; the job is stored before it is dispatched.
        """
        return self.submit_many([(code_or_function, args, kwargs, job_id)], nodes=nodes,
                                retries=retries, timeout=timeout,
                                require_state=require_state)[0]


class LaunchVerbs:
    """``launch``/``launches``/``launch_stop`` over a ``launch_request`` (both ``Hub`` and
    ``Admin`` have one): nodes started over SSH or through Slurm (odium.launch)."""

    def launch_request(self, type_: str, body: Any) -> Any:
        raise NotImplementedError

    def launch_dir(self) -> Path:
        """Where launches keep their files on this machine (batch scripts, nodes' homes)."""
        raise NotImplementedError

    def launch(self, launcher: Launcher, *, name: str | None = None, ttl: float | None = None,
               dry_run: bool = False, wait: float = 120.0,
               progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Start the nodes ``launcher`` says (``odium.launch.SSH([...])``,
        ``odium.launch.Slurm(nodes=2)``) as one launch, named ``name`` (else made up), its
        nodes ``<launch>-1`` ...; wait up to ``wait`` seconds for them to be ready
        (``progress(view)`` at each change). Returns the launch as ``launches`` shows it.
        ``dry_run``: start nothing; the view's ``plan`` is exactly what would run. The
        credential admits these nodes only, by these names, until ``ttl`` or the stop."""
        from ..launch import launch

        return launch(self, launcher, workdir=self.launch_dir(), name=name, ttl=ttl,
                      dry_run=dry_run, wait=wait, progress=progress)

    def launches(self, pattern: str | None = None) -> list[dict[str, Any]]:
        """The launches: id, kind, where, status, each node's name and status (``pending``
        until it joins), and what the launcher's side says (a Slurm job's state)."""
        from ..launch.base import views

        return views(self, pattern)

    def launch_stop(self, launch_id: str) -> dict[str, Any]:
        """Stop a launch: its credential and its nodes' keys revoked, its processes or batch
        job cancelled. The launch, with ``done``: a line per thing done."""
        from ..launch import stop

        return stop(self, launch_id)


class HubAPI(Protocol):
    """What ``Hub`` and ``Admin`` both offer (see the module's docstring for sessions)."""

    session: str  # the session ``run`` uses when none is named

    @property
    def state(self) -> str:
        """The hub's state id."""
        ...

    def run(self, code: str, nodes: str = "*", *, shell: bool = False,
            timeout: float | None = None, session: str | None = None,
            require: str | None = None, end_session: bool = False) -> Result: ...

    def nodes(self, pattern: str | None = None) -> list[dict[str, Any]]: ...

    def keys(self) -> list[dict[str, Any]]: ...

    def key_action(self, action: str, pattern: str, role: str | None = None
                   ) -> list[dict[str, Any]]: ...

    def accept(self, pattern: str, role: str | None = None) -> list[str]: ...

    def reject(self, pattern: str, role: str | None = None) -> list[str]: ...

    def revoke(self, pattern: str, role: str | None = None) -> list[str]: ...

    def token(self, ttl: float = 3600.0) -> str: ...

    def join_command(self, ttl: float = 3600.0, name: str | None = None) -> str: ...

    def forget(self, pattern: str) -> list[str]: ...

    def log(self, limit: int = 50) -> list[dict[str, Any]]: ...

    def state_report(self, nodes: str | None = None) -> dict[str, Any]: ...

    def sync(self, nodes: str = "*", timeout: float = 300.0) -> Result: ...

    def submit(self, code_or_function: str | Callable[..., Any], *args: Any, nodes: str = "*",
               retries: int = 0, timeout: float | None = None,
               require_state: str | None = None, job_id: str | None = None,
               **kwargs: Any) -> Job: ...

    def submit_many(self, items: Iterable[tuple[Any, tuple[Any, ...], dict[str, Any],
                                                str | None]], *, nodes: str = "*",
                    retries: int = 0, timeout: float | None = None,
                    require_state: str | None = None) -> list[Job]: ...

    def map(self, func: Callable[..., Any] | str, iterable: Iterable[Any], *,
            nodes: str = "*", retries: int = 0, timeout: float | None = None,
            require_state: str | None = None, wait: float | None = None,
            progress: bool | None = None) -> list[Any]: ...

    def jobs(self, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]: ...

    def job(self, job_id: str, wait: float = 0.0) -> dict[str, Any]: ...

    def cancel_job(self, job_id: str) -> str: ...

    def cancel_jobs(self, ids: list[str]) -> dict[str, str]: ...

    def launch(self, launcher: Launcher, *, name: str | None = None, ttl: float | None = None,
               dry_run: bool = False, wait: float = 120.0,
               progress: Callable[[dict[str, Any]], None] | None = None
               ) -> dict[str, Any]: ...

    # functions and data on nodes (odium.api.data)
    def apply(self, fn: Callable[..., Any], *args: Any, nodes: str = "*",
              **kwargs: Any) -> Result: ...

    def remote(self, nodes: str = "*", *, timeout: float | None = None,
               session: str | None = None) -> Callable[[Callable[..., Any]], Any]: ...

    def parallel(self, nodes: str = "*", *, timeout: float | None = None,
                 session: str | None = None) -> Callable[[Callable[..., Any]], Any]: ...

    def push(self, values: Mapping[str, Any], nodes: str = "*", *,
             timeout: float | None = None, session: str | None = None) -> Result: ...

    def pull(self, name: str, nodes: str = "*", *, timeout: float | None = None,
             session: str | None = None) -> dict[str, Any]: ...

    def scatter(self, name: str, seq: Any, nodes: str = "*", *,
                timeout: float | None = None, session: str | None = None
                ) -> dict[str, tuple[int, int]]: ...

    def gather(self, name: str, nodes: str = "*", *, timeout: float | None = None,
               session: str | None = None) -> Any: ...

    def run_each(self, codes: Mapping[str, str], *, timeout: float | None = None,
                 session: str | None = None) -> Result: ...

    def launches(self, pattern: str | None = None) -> list[dict[str, Any]]: ...

    def launch_stop(self, launch_id: str) -> dict[str, Any]: ...

    def close(self) -> None: ...


# the names of HubAPI's methods, for tests and docs
SHARED = ("run", "nodes", "keys", "key_action", "accept", "reject", "revoke", "token",
          "join_command", "log", "state_report", "sync", "submit", "submit_many", "map", "jobs",
          "job", "cancel_job", "cancel_jobs", "close")

