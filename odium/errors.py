"""The one error tree of Odium: every error the package raises is an OdiumError.

Errors of the libraries underneath (PyNaCl's, pyzmq's, SQLAlchemy's, GitPython's) are caught
where they arise and raised again as one of these, with what it means for the user."""

from __future__ import annotations


class OdiumError(Exception):
    """Base of every error Odium raises."""


class ConfigError(OdiumError):
    """A bad argument, option, home directory or configuration value."""


class ProtocolError(OdiumError):
    """A message that is not a well-formed Odium message (size, JSON, envelope, body)."""


class AuthError(OdiumError):
    """A message or peer that fails authentication: key, signature, role, replay."""


class ClockError(AuthError):
    """A message stamped outside the replay window of the receiver's clock. Its answer carries
    the receiver's time (signed): a node learns its hub's time from it and asks again."""


class TimeoutError(OdiumError):  # noqa: A001 - deliberately shadows the builtin inside odium
    """A blocking call ran out of time."""


class NotConnectedError(OdiumError):
    """No hub to talk to, or no node that matches."""


class RemoteError(OdiumError):
    """An error raised on a node; carries the remote traceback text."""

    def __init__(self, node: str, ename: str, evalue: str, traceback: str = "") -> None:
        super().__init__(f"{node}: {ename}: {evalue}")
        self.node = node
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback

    def __str__(self) -> str:
        head = f"{self.node}: {self.ename}: {self.evalue}"
        return f"{head}\n{self.traceback}" if self.traceback else head


class StateMismatchError(OdiumError):
    """A node's state does not satisfy a command's required state."""


class StateError(OdiumError):
    """Sync or install could not bring this instance to the wanted state (nothing was lost)."""


class JobStateError(OdiumError):
    """A move the job state machine does not allow (a bug, or a stale report)."""


class JobCancelledError(OdiumError):
    """The job was cancelled before it produced a result."""
