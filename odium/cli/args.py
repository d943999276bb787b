"""Argument types of the ``odium`` command and of the ``%odium`` magics, written once.

Each type turns one word of a command line into a value, or raises ``ArgumentTypeError``
saying what was expected (argparse and IPython's ``magic_arguments`` show that message).
This module imports nothing of the CLI or of the notebook side: both import it.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

from ..core.wire import DEFAULT_PORTS, KEY_RE, NAME_RE

PORT_NAMES = tuple(DEFAULT_PORTS)  # pub, query, jobs, results
_SHORT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,40}\Z")
_GLOB = re.compile(r"[A-Za-z0-9._*?\[\]!,/-]+")  # "/": names in a tree are paths


def number(kind: type[int] | type[float], *, low: float | None = None,
           high: float | None = None, positive: bool = False,
           expected: str | None = None) -> Callable[[str], float]:
    """A type for a number of ``kind`` (int or float): positive (``> 0``, NaN refused), or
    from ``low`` (to ``high``). ``expected``: the words for a word that is no number at all
    (``"expected a whole number, not 'x'"``); without it, ``"not a number: 'x'"``."""
    noun = "a whole number" if kind is int else "a number"

    def parse(text: str) -> float:
        try:
            v = kind(text)
        except ValueError:
            msg = f"expected {expected}, not {text!r}" if expected else f"not {noun}: {text!r}"
            raise argparse.ArgumentTypeError(msg) from None
        if positive and not v > 0:
            raise argparse.ArgumentTypeError(f"must be positive, not {text}")
        if low is not None and high is not None and not low <= v <= high:
            raise argparse.ArgumentTypeError(f"must be {low} to {high}, not {text}")
        if low is not None and high is None and not v >= low:
            raise argparse.ArgumentTypeError(f"must not be negative, not {text}" if low == 0
                                             else f"must be at least {low}, not {text}")
        return v

    parse.__name__ = kind.__name__
    return parse


# the odium command's numbers
positive = number(float, positive=True)  # seconds: --timeout, --ttl, --heartbeat
non_negative = number(float, low=0)  # seconds one may also not wait: --wait
count = number(int, low=1)  # -n, --capacity, demo --nodes
retries = number(int, low=0, high=1000)  # submit --retries
# the magics' numbers (their words, and local nodes are 1 to 256 as for Hub.start_local)
seconds = number(float, positive=True, expected="a number of seconds")
how_many = number(int, low=1, high=256, expected="a whole number")


def ports(text: str) -> dict[str, int]:
    """``0`` (every port chosen by the OS) or four ports ``PUB,QUERY,JOBS,RESULTS``."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"ports are numbers: PUB,QUERY,JOBS,RESULTS (e.g. 18202,18203,18220,18221) or 0, "
            f"not {text!r}") from None
    if len(nums) == 1 and nums[0] == 0:
        return {k: 0 for k in PORT_NAMES}
    if len(nums) != 4 or any(not 0 <= n <= 65535 for n in nums):
        raise argparse.ArgumentTypeError(
            f"give four ports PUB,QUERY,JOBS,RESULTS (0 = any free) or 0, not {text!r}")
    return dict(zip(PORT_NAMES, nums, strict=True))


def node_name(text: str) -> str:
    """A node's name, as the wire allows it."""
    if not re.match(NAME_RE, text):
        raise argparse.ArgumentTypeError(f"a node name is letters, digits, '.', '_', '-' "
                                         f"(max 64), not {text!r}")
    return text


def short_name(text: str) -> str:
    """A session name or a prefix of local node names (room left for ``-N``)."""
    if not _SHORT_NAME.match(text):
        raise argparse.ArgumentTypeError(
            f"expected letters, digits, '.', '_' or '-' (at most 41), not {text!r}")
    return text


def identifier(text: str) -> str:
    """A Python variable name (``%%odium -o NAME``)."""
    if not text.isidentifier():
        raise argparse.ArgumentTypeError(f"expected a Python variable name, not {text!r}")
    return text


def glob(text: str) -> str:
    """A glob or comma list of node names."""
    if not text.strip() or not _GLOB.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"expected a glob or comma list of node names (e.g. 'gpu*' or 'a,b'), not {text!r}")
    return text


def job_id(text: str) -> str:
    from ..core.jobs import JOB_ID_RE

    if not re.fullmatch(JOB_ID_RE, text):
        raise argparse.ArgumentTypeError(
            f"a job id is 1 to 64 letters, digits, '.', '_' or '-', not {text!r}")
    return text


def is_key_id(word: str) -> bool:
    """Whether a word is a whole key id (base64url: it may begin with ``-``)."""
    return bool(re.match(KEY_RE, word))


def requirement(text: str) -> str:
    """``--require-state``: any, match or a commit id (odium/core/requirements.py)."""
    from ..core.requirements import is_requirement, not_a_requirement

    if is_requirement(text):
        return text
    raise argparse.ArgumentTypeError(not_a_requirement(text))
