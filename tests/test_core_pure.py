"""odium.core is pure: it imports no zmq, SQLAlchemy, threading or logging, and what it owns
(Z85, requirements, state reports and their diff) works over in-memory values, no sockets."""

from __future__ import annotations

import json
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest
import zmq
import zmq.utils.z85

import odium.core
from odium.core import z85
from odium.core.keys import Identity, curve_fingerprint, curve_form, curve_public, curve_shown
from odium.core.requirements import (
    ASKED_RE,
    SENT_RE,
    STATE_RE,
    commit_of,
    is_clean,
    is_requirement,
    normalize_requirement,
    not_a_requirement,
    resolve_requirement,
    satisfies,
)
from odium.core.statediff import Declaration, Fingerprint, StateInfo, diff, format_diff
from odium.errors import ConfigError, ProtocolError, StateMismatchError

ROOT = Path(__file__).resolve().parents[1]
CORE = sorted(f"odium.core.{m.name}" for m in pkgutil.iter_modules(odium.core.__path__))
C1, C2 = "1" * 40, "2" * 40

CHECK = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in ("zmq", "sqlalchemy", "threading", "logging")
                        if m in sys.modules)))
"""


def test_core_imports_no_zmq_sqlalchemy_threading_or_logging() -> None:
    assert "odium.core.wire" in CORE and "odium.core.z85" in CORE
    r = subprocess.run([sys.executable, "-c", CHECK, *CORE], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []


# --------------------------------------------------------------------------- z85


def test_z85_is_byte_identical_with_pyzmq() -> None:
    for n in range(300):
        raw = os.urandom(32 if n % 2 else 4 * (n % 17))
        text = zmq.utils.z85.encode(raw)
        assert z85.encode(raw) == text
        assert z85.decode(text) == zmq.utils.z85.decode(text) == raw
        assert z85.decode(text.decode()) == raw
    assert z85.encode(b"\x86\x4f\xd2\x6f\xb5\x59\xf7\x5b") == b"HelloWorld"  # RFC 32's example


def test_z85_refuses_what_is_not_z85() -> None:
    for bad in (b"abc", b"Hello World", "Hellö", b"#####"):  # length, alphabet, over 32 bits
        with pytest.raises(ValueError):
            z85.decode(bad)
    with pytest.raises(ValueError):
        z85.encode(b"abc")


def test_curve_keys_are_the_ones_libzmq_derives() -> None:
    ident = Identity.generate()
    assert zmq.curve_public(ident.curve_secret) == curve_public(ident.key_id)
    shown = curve_shown(curve_public(ident.key_id).decode())
    assert curve_form(shown) == curve_public(ident.key_id).decode()
    assert re.fullmatch(r"([0-9a-f]{4}:){3}[0-9a-f]{4}", curve_fingerprint(ident.curve_public))
    assert curve_form("#" * 40) is None  # z85 characters, but not a 32-bit group


# --------------------------------------------------------------------------- requirements


@pytest.mark.parametrize("text", ["any", "match", "abcdef0", C1])
def test_requirement_forms_agree_with_the_wire_patterns(text: str) -> None:
    assert is_requirement(text) and normalize_requirement(text) == text
    assert re.match(ASKED_RE, text)
    assert bool(re.match(SENT_RE, text)) is (text != "match")


@pytest.mark.parametrize("text", ["", "latest", "abc", "ABCDEF0", " any", "g" * 40, C1 + "0"])
def test_not_requirements_as_written(text: str) -> None:
    assert not is_requirement(text) and not re.match(ASKED_RE, text)


def test_normalize_is_lenient_about_case_and_space() -> None:
    assert normalize_requirement(" Match ") == "match"
    assert normalize_requirement(C1.upper()) == C1
    with pytest.raises(ConfigError, match="expected 'any', 'match' or a commit id"):
        normalize_requirement("latest")


def test_state_ids() -> None:
    dirty = C1 + "+dirty.0123456789abcdef"
    assert commit_of(dirty) == C1 and commit_of("unversioned") is None
    assert is_clean(C1) and not is_clean(dirty)
    for s in (C1, dirty, "unversioned", "unknown"):
        assert re.match(STATE_RE, s)
    assert satisfies("any", dirty, dirty) and not satisfies(C1[:7], dirty, C1)
    assert satisfies("match", C1, C1) and not satisfies("match", C1, C2)


def test_resolve_requirement_sends_any_or_a_commit() -> None:
    asked: list[str] = []

    def resolve(rev: str) -> str:
        asked.append(rev)
        if rev == "abcdef0":
            return "abcdef0" + "1" * 33
        raise ConfigError("no such commit")

    assert resolve_requirement(None, C1, resolve) == (C1, None)
    assert resolve_requirement("default", "unversioned", resolve)[0] == "any"
    assert resolve_requirement("any", C1, resolve) == ("any", None)
    assert resolve_requirement("match", C1, resolve) == (C1, None)
    assert resolve_requirement("abcdef0", C1, resolve) == ("abcdef0" + "1" * 33, None)
    assert resolve_requirement("1234567", C1, resolve) == ("1234567", None)  # unknown here
    assert asked == ["abcdef0", "1234567"]
    with pytest.raises(StateMismatchError, match="not a clean commit"):
        resolve_requirement("match", C1 + "+dirty.0123456789abcdef", resolve)
    with pytest.raises(ConfigError) as e:
        resolve_requirement("latest", C1, resolve)
    assert str(e.value) == not_a_requirement("latest")


# --------------------------------------------------------------------------- statediff


def _info(state: str, packages: dict[str, str], env: dict[str, str | None]) -> StateInfo:
    parts = {"packages": json.dumps(packages), "env": json.dumps(env)}  # what diff compares
    fp = Fingerprint("", parts, {"packages": packages, "env": env})
    return StateInfo(state, commit_of(state), (), Declaration(pip=("tiny>=1",)), fp)


def test_diff_of_in_memory_reports() -> None:
    hub = _info(C1, {"tiny": "1.1", "gone": "2"}, {"LAB": "h1"})
    node = _info(C2, {"tiny": "1.0", "new": "3"}, {"LAB": "h2"})
    d = diff(hub, node, "behind")
    assert d == {"commit": {"hub": C1, "node": C2, "relation": "behind"},
                 "packages": {"added": {"new": "3"}, "removed": {"gone": "2"},
                              "changed": {"tiny": ["1.1", "1.0"]}},
                 "env": ["LAB"]}
    text = format_diff(d)
    assert "is behind the hub" in text and "package tiny: 1.1 on hub, 1.0 on node" in text
    assert "h1" not in text and "h2" not in text  # env values never shown
    assert diff(hub, hub) == {} and format_diff({}) == "same state and environment"


def test_state_info_round_trip_and_refusals() -> None:
    info = StateInfo(C1, C1, ("a.py",), Declaration(pip=("tiny>=1",), env=("LAB",)),
                     Fingerprint("", {}, {}), ("tiny>=1 (not installed)",))
    assert StateInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info
    for bad in ({"state": "latest"}, {"state": C1, "commit": "xyz"},
                {"state": C1, "commit": None, "dirty_files": ["a\nb"]},
                {"state": C1, "declaration": {"pip": ["not a requirement!"]}}):
        with pytest.raises(ProtocolError):
            StateInfo.from_dict(bad)


def test_the_clock_keeps_its_most_precise_reading_and_follows_a_real_step() -> None:
    import time as _time

    from odium.core.clock import Clock

    c = Clock()
    now = _time.monotonic()
    hub = _time.time() + 600.0  # the hub's time at ``now``: 600 s ahead of this machine's

    def off() -> float:  # how far the clock is from the hub's time, now
        return c() - (hub + _time.monotonic() - now)

    # a slow first answer (2.6 s round trip, stamped at its very end): 1.3 s off
    assert c.learn(hub, now - 2.6, now)
    assert 1.2 < off() < 1.4
    # a quick one (stamped in its middle): the same time, known better, is taken
    assert not c.learn(hub - 0.0005, now - 0.001, now)
    assert abs(off()) < 0.01 and c.moves == 0
    assert abs(c.skew() + 600.0) < 0.05
    # a slow one again (stamped at its start) agrees, less precise: nothing changes
    assert not c.learn(hub - 2.5, now - 2.5, now)
    assert abs(off()) < 0.01
    # the hub's clock is fixed, 600 s back: a reading that cannot agree moves the clock
    assert c.learn(hub - 600.0005, now - 0.001, now)
    assert c.moves == 1 and abs(c.skew()) < 0.05
