"""State ids and required states: their patterns and what a requirement means (pure).

The one requirement parser: the CLI's ``--require-state``, the hub's resolution of what a
command requires, the wire's message fields and the node's check all read them here.

Vocabulary
    state id      ``<40-hex commit>``, ``<commit>+dirty.<16 hex>``, ``unversioned`` (no git
                  commit to name it) or ``unknown`` (not reported).
    requirement   ``any``, ``match`` (the issuer's own clean commit) or an explicit commit
                  (40 hex digits, or a prefix of at least 7). A user may also ask for
                  ``default``: ``match`` when the issuer is at a clean commit, else ``any``.
                  What a node is sent is always ``any`` or a commit (``resolve_requirement``).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ..errors import ConfigError, StateMismatchError

UNVERSIONED = "unversioned"
UNKNOWN = "unknown"
ANY = "any"
MATCH = "match"
DEFAULT = "default"

STATE_RE = r"^(unversioned|unknown|[0-9a-f]{40}(\+dirty\.[0-9a-f]{12,64})?)\Z"
COMMIT_RE = r"^[0-9a-f]{40}\Z"
PREFIX_RE = r"^[0-9a-f]{7,40}\Z"
SENT_RE = r"^(any|[0-9a-f]{7,40})\Z"  # what a node is sent (and checks)
ASKED_RE = r"^(default|any|match|[0-9a-f]{7,40})\Z"  # what a user or admin may ask a hub
FORMS = "'any', 'match' or a commit id (7 to 40 hex digits)"

_HEX40 = re.compile(COMMIT_RE)
_PREFIX = re.compile(PREFIX_RE)


def is_commit_id(text: str) -> bool:
    """True for a full commit id: exactly 40 lower-case hex digits."""
    return bool(_HEX40.match(text))


def commit_of(state: str) -> str | None:
    """The commit part of a state id, or None for ``unversioned``/``unknown``/garbage."""
    head = state.split("+", 1)[0]
    return head if _HEX40.match(head) else None


def is_clean(state: str) -> bool:
    """True for a state id that is exactly a commit (not dirty, not unversioned)."""
    return bool(_HEX40.match(state))


def is_requirement(text: str) -> bool:
    """Whether ``text`` is a requirement as written: ``any``, ``match`` or 7 to 40 lower-case
    hex digits (the form the CLI accepts; ``normalize_requirement`` is lenient)."""
    return text in (ANY, MATCH) or bool(_PREFIX.match(text))


def not_a_requirement(text: object) -> str:
    """What the CLI and the hub say about a requirement that is not one."""
    return f"a required state is {FORMS}, not {text!r}"


def normalize_requirement(required: str) -> str:
    """``any``, ``match`` or a lower-case hex commit (7 to 40 digits); else ConfigError."""
    r = required.strip().lower() if isinstance(required, str) else ""
    if r in (ANY, MATCH) or _PREFIX.match(r):
        return r
    raise ConfigError(f"required state {required!r}: expected 'any', 'match' or a commit id "
                      "(40 hex digits, or a prefix of at least 7)")


def satisfies(required: str, state: str, own_state: str) -> bool:
    """Whether a node in ``state`` may run a command that requires ``required``.

    ``own_state`` is the issuer's state, used by ``match``.

    * ``any``: always.
    * ``match``: the issuer's state is a clean commit and ``state`` is exactly it.
    * a commit id: ``state`` is a clean commit equal to it, or starting with it when it is
      a prefix (7 to 39 hex digits). Issuers should send full ids (``resolve_requirement``):
      a prefix is compared, never resolved, on the node.

    A dirty, unversioned or unknown ``state`` satisfies nothing but ``any``; a malformed
    ``required`` is never satisfied (``normalize_requirement`` reports it to the user).
    """
    r = required.strip().lower() if isinstance(required, str) else ""
    if r == ANY:
        return True
    if not is_clean(state):
        return False
    if r == MATCH:
        return is_clean(own_state) and state == own_state
    return bool(_PREFIX.match(r)) and state.startswith(r)


def default_requirement(own_state: str) -> tuple[str, str | None]:
    """(requirement, hint): ``match`` for a clean commit, else ``any`` and how to version it."""
    if is_clean(own_state):
        return MATCH, None
    if commit_of(own_state):
        return ANY, ("the application has uncommitted changes, so commands run on any state: "
                     "commit them (git add -A && git commit -m '...') so nodes can require "
                     "this exact state")
    return ANY, ("the application is not a git repository with a commit, so commands run on "
                 "any state: version it (git init && git add -A && git commit -m '...') so "
                 "nodes can require this exact state")


def resolve_requirement(require: str | None, own_state: str,
                        resolve: Callable[[str], str]) -> tuple[str, str | None]:
    """(what a node is sent, hint) for what an issuer in ``own_state`` asked.

    ``None``/``default`` is ``default_requirement``; ``match`` becomes the issuer's commit
    (StateMismatchError when it is not a clean one); a commit id goes through ``resolve``
    (a short id the issuer's repository knows becomes the full commit; when ``resolve``
    raises ConfigError the id is sent as it was). Anything else raises ConfigError.
    """
    if require in (None, DEFAULT):
        kind, hint = default_requirement(own_state)
        return (own_state if kind == MATCH else ANY), hint
    if require == ANY:
        return ANY, None
    if require == MATCH:
        if not is_clean(own_state):
            raise StateMismatchError(
                f"cannot require this hub's state: it is {own_state!r}, not a clean commit; "
                "commit your changes, or use --require-state any")
        return own_state, None
    if not _PREFIX.match(require or ""):
        raise ConfigError(not_a_requirement(require))
    try:
        return resolve(str(require)), None
    except ConfigError:
        return str(require), None
