"""``Hub`` and ``Admin``: one API. The same names, arguments and shapes, the same session
semantics, checked against one running hub (an in-process ``Hub`` and an ``Admin`` of it);
and the admin side imports no hub code.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import odium
from odium.api.hub import Hub
from odium.api.interface import SHARED

HUB_ONLY_KEYWORDS = {"run": {"on_output"}}  # Hub-only extras: keyword-only, defaulted


def test_same_methods_same_signatures() -> None:
    """Every shared method exists on both, with the same parameters (names, kinds,
    defaults) and the same return annotation."""
    Admin = odium.Admin
    for name in SHARED:
        hs = inspect.signature(getattr(Hub, name))
        as_ = inspect.signature(getattr(Admin, name))
        extra = HUB_ONLY_KEYWORDS.get(name, set())
        hp = [p for p in hs.parameters.values() if p.name not in extra]
        for p in hs.parameters.values():
            if p.name in extra:
                assert p.kind is p.KEYWORD_ONLY and p.default is not p.empty, (name, p)
        assert [(p.name, p.kind, p.default) for p in hp] == \
            [(p.name, p.kind, p.default) for p in as_.parameters.values()], name
        assert hs.return_annotation == as_.return_annotation, name
    assert Hub.session == "default"


@pytest.fixture
def both(hub: Hub) -> Iterator[tuple[Hub, odium.Admin]]:
    """The in-process hub with two local nodes, and an Admin of that same hub."""
    hub.start_local(2, prefix="s")
    with odium.Admin(hub.home) as admin:
        yield hub, admin


def _value(result: odium.Result) -> dict[str, object]:
    """Each node's value, or the name of the error it raised."""
    return {n: (r.value if r.ok else (r.error or {}).get("ename")) for n, r in result.items()}


def test_same_shapes_against_one_hub(both: tuple[Hub, odium.Admin]) -> None:
    hub, admin = both
    hn, an = hub.nodes(), admin.nodes()
    assert isinstance(hn, list) and isinstance(an, list)
    assert [n["name"] for n in hn] == [n["name"] for n in an] == ["s-1", "s-2"]
    assert [sorted(n) for n in hn] == [sorted(n) for n in an]
    assert [n["name"] for n in admin.nodes("s-2")] == [n["name"] for n in hub.nodes("s-2")]
    assert admin.state == hub.state
    assert admin.keys() == hub.keys()
    assert isinstance(admin.token(60), str) and isinstance(hub.token(60), str)
    assert "ODIUM_TOKEN=" in admin.join_command(60) and "ODIUM_TOKEN=" in hub.join_command(60)
    assert [sorted(e) for e in admin.log(5)] == [sorted(e) for e in hub.log(5)]
    for api in (hub, admin):
        with pytest.raises(odium.OdiumError, match="no key to accept matches"):
            api.accept("nobody-*")
    assert sorted(admin.state_report()) == sorted(hub.state_report())

    r1, r2 = hub.run("6 * 7", timeout=10), admin.run("6 * 7", timeout=10)
    assert type(r1) is type(r2) and _value(r1) == _value(r2) == {"s-1": 42, "s-2": 42}

    for api in (hub, admin):
        job = api.submit("1 + 1", job_id=f"shape-{type(api).__name__}")
        info = api.job(job.id, wait=20)
        assert info["status"] == "done" and info["value_repr"] == "2", info
        assert [j.result(20) for j in api.submit_many([("2 + 2", (), {}, None)])] == [4]
        assert api.map("args[0] * 3", [1, 2], wait=20) == [3, 6]
        assert api.cancel_job(job.id) == "already done"
        assert api.cancel_jobs(["no-such-job"]) == {"no-such-job": "unknown"}
    ids = {type(api).__name__: {j["id"] for j in api.jobs()} for api in (hub, admin)}
    assert ids["Hub"] == ids["Admin"] and {"shape-Hub", "shape-Admin"} <= ids["Hub"]
    assert sorted(hub.job("shape-Admin")) == sorted(admin.job("shape-Hub"))


def test_same_session_semantics(both: tuple[Hub, odium.Admin]) -> None:
    """A named session is one namespace on each node, whoever names it; without one, Hub
    uses "default" and each Admin its own; end_session closes the namespace."""
    hub, admin = both
    t = 10.0
    ok = {"s-1": 1, "s-2": 1}
    missing = {"s-1": "NameError", "s-2": "NameError"}

    hub.run("a = 1", timeout=t)
    assert _value(hub.run("a", timeout=t)) == ok               # Hub: its default session
    assert _value(hub.run("a", session="default", timeout=t)) == ok
    assert _value(admin.run("a", timeout=t)) == missing        # an Admin: not the hub's

    admin.run("b = 1", timeout=t)
    assert _value(admin.run("b", timeout=t)) == ok             # the Admin's own, kept
    assert _value(admin.run("b", session=admin.session, timeout=t)) == ok
    assert _value(hub.run("b", timeout=t)) == missing
    with odium.Admin(hub.home) as other:
        assert other.session != admin.session
        assert _value(other.run("b", timeout=t)) == missing    # another Admin: another one

    hub.run("c = 1", session="shared", timeout=t)               # named: shared by both
    assert _value(admin.run("c", session="shared", timeout=t)) == ok

    for api in (hub, admin):                                    # end_session: gone after
        assert _value(api.run("d = 1; d", session="once", end_session=True, timeout=t)) == ok
        assert _value(api.run("d", session="once", timeout=t)) == missing
        api.run("pass", session="once", end_session=True, timeout=t)

    own = admin.session
    admin.close()                                               # closes its own session
    assert _value(hub.run("b", session=own, timeout=t)) == missing


CHECK_IMPORTS = """
import json, sys
import odium
odium.Admin
from odium.cli.main import main
rc = main(["nodes", "--home", sys.argv[1], "--json"])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("sqlalchemy", "IPython")
               or m.split(".")[:2] in (["odium", "hub"], ["odium", "node"])
               or m in ("odium.runtime", "odium.api.hub", "odium.local.appstate",
                        "odium.local.fingerprint", "odium.local.sync", "git"))
print(json.dumps({"rc": rc, "heavy": heavy}))
"""


def test_admin_side_imports_no_hub_code(hub: Hub, tmp_path: Path) -> None:
    """``import odium; odium.Admin`` and ``odium nodes`` against a running hub, in a fresh
    process: no SQLAlchemy, no hub, no store."""
    hub.start_local(1, prefix="i")
    p = subprocess.run([sys.executable, "-c", CHECK_IMPORTS, str(hub.home)],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().split("\n")
    nodes = json.loads("\n".join(lines[:-1]))
    assert [n["name"] for n in nodes["nodes"]] == ["i-1"] and nodes["hub_state"] == hub.state
    out = json.loads(lines[-1])
    assert out == {"rc": 0, "heavy": []}


def test_the_data_verbs_give_the_same_through_an_admin(both: tuple[Hub, odium.Admin]) -> None:
    """apply, push, pull, scatter, gather and parallel on the same nodes, from both sides
    (an Admin runs its own session: what it pushes is its own)."""
    np = pytest.importorskip("numpy")
    for side in both:
        r = side.apply(lambda a: a[::-1], np.arange(4))
        assert {n: r[n].value.tolist() for n in r} == {"s-1": [3, 2, 1, 0], "s-2": [3, 2, 1, 0]}
        side.push({"w": {"k": [1, 2]}})
        assert side.pull("w") == {"s-1": {"k": [1, 2]}, "s-2": {"k": [1, 2]}}
        assert side.scatter("part", list(range(5))) == {"s-1": (0, 3), "s-2": (3, 5)}
        assert side.gather("part") == [0, 1, 2, 3, 4]
        assert side.parallel()(lambda p: [x + 1 for x in p])(list(range(5))) == [1, 2, 3, 4, 5]
