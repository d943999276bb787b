"""The state layer: state ids, declarations, fingerprints, requirements, diffs and git sync.

Real git repositories and real virtual environments made in tmp dirs; no mocks. pip only
ever installs wheels built here, with --no-index.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import site
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

from odium.core.requirements import (
    STATE_RE,
    UNVERSIONED,
    commit_of,
    default_requirement,
    normalize_requirement,
    satisfies,
)
from odium.core.statediff import PARTS, Declaration, Fingerprint, StateInfo, diff, format_diff
from odium.errors import ConfigError, ProtocolError
from odium.local.appstate import (
    commit_relation,
    find_app,
    load_declaration,
    resolve_state,
    snapshot,
    state_id,
)
from odium.local.fingerprint import clear_cache, fingerprint, missing_system, unsatisfied
from odium.local.sync import StateError, apply_bundle, install_declared, make_bundle

from .conftest import git

ROOT = Path(__file__).resolve().parents[1]
HEX40 = re.compile(r"^[0-9a-f]{40}$")
DIRTY = re.compile(r"^[0-9a-f]{40}\+dirty\.[0-9a-f]{16}$")
C1 = "1" * 40
C2 = "2" * 40


def head(repo: Path) -> str:
    return git(repo, "rev-parse", "HEAD").strip()


def commit_file(repo: Path, name: str, text: str, msg: str = "change") -> str:
    (repo / name).parent.mkdir(parents=True, exist_ok=True)
    (repo / name).write_text(text)
    git(repo, "add", name)
    git(repo, "commit", "-q", "-m", msg)
    return head(repo)


def age(*paths: Path, seconds: float = 30.0) -> None:
    """Move mtimes into the past, so the fingerprint cache trusts them (not racy)."""
    t = time.time() - seconds
    for p in paths:
        if p.exists():
            os.utime(p, (t, t))


def age_repo(repo: Path) -> None:
    gd = repo / ".git"
    age(gd / "HEAD", gd / "index", gd / "packed-refs", *(gd / "refs" / "heads").iterdir(),
        *[p for p in repo.rglob("*") if ".git" not in p.parts])


# --------------------------------------------------------------------------- state ids


def test_clean_state_is_the_commit(app_repo: Path) -> None:
    s = state_id(app_repo)
    assert s == head(app_repo) and HEX40.match(s) and re.match(STATE_RE, s)
    info = snapshot(app_repo)
    assert info.state == s and info.commit == s and info.dirty_files == ()


def test_modified_staged_and_untracked_files_make_it_dirty(app_repo: Path) -> None:
    clean = state_id(app_repo)
    (app_repo / "app.py").write_text("VALUE = 42\n")
    modified = snapshot(app_repo)
    assert DIRTY.match(modified.state) and modified.state.startswith(clean + "+dirty.")
    assert re.match(STATE_RE, modified.state)
    assert modified.commit == clean and modified.dirty_files == ("app.py",)

    git(app_repo, "add", "app.py")  # staged only: still dirty, same tree, same id
    assert state_id(app_repo) == modified.state

    git(app_repo, "reset", "-q", "--hard")
    assert state_id(app_repo) == clean
    (app_repo / "notes" / "deep").mkdir(parents=True)
    (app_repo / "notes" / "deep" / "new.txt").write_text("untracked\n")
    untracked = snapshot(app_repo)
    assert DIRTY.match(untracked.state) and untracked.dirty_files == ("notes/deep/new.txt",)


def test_ignored_files_do_not_count(app_repo: Path) -> None:
    commit_file(app_repo, ".gitignore", "*.log\n")
    clean = state_id(app_repo)
    (app_repo / "run.log").write_text("noise\n")
    assert state_id(app_repo) == clean


def test_two_different_dirty_trees_differ_and_the_same_tree_is_deterministic(
        app_repo: Path) -> None:
    (app_repo / "extra.txt").write_text("one\n")
    a = state_id(app_repo)
    assert state_id(app_repo) == a
    clear_cache()
    assert state_id(app_repo) == a  # deterministic, cache or not
    (app_repo / "extra.txt").write_text("two\n")  # same name and size, other contents
    b = state_id(app_repo)
    (app_repo / "extra.txt").unlink()
    (app_repo / "app.py").write_text("VALUE = 1\n")
    c = state_id(app_repo)
    (app_repo / "app.py").write_text("VALUE = 2\n")
    d = state_id(app_repo)
    assert len({a, b, c, d}) == 4 and all(DIRTY.match(x) for x in (a, b, c, d))


def test_dirty_cache_sees_a_change_that_keeps_size_and_mtime(app_repo: Path) -> None:
    f = app_repo / "app.py"
    f.write_text("VALUE = 10\n")
    age(f)
    st = f.stat()
    first = state_id(app_repo)
    assert state_id(app_repo) == first
    f.write_text("VALUE = 20\n")  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime: only ctime tells
    assert state_id(app_repo) != first


def test_same_dirty_tree_in_two_clones_has_the_same_id(app_repo: Path, tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(app_repo), str(clone))
    git(clone, "config", "diff.noprefix", "true")  # user diff config must not matter
    for repo in (app_repo, clone):
        (repo / "app.py").write_text("VALUE = 7\n")
        (repo / "new.txt").write_text("x\n")
    assert state_id(app_repo) == state_id(clone)


def test_unversioned_outside_git_and_without_a_commit(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "a.py").write_text("x = 1\n")
    assert state_id(plain) == UNVERSIONED
    assert state_id(tmp_path / "does-not-exist") == UNVERSIONED
    empty = tmp_path / "empty"
    empty.mkdir()
    git(empty, "init", "-q")
    (empty / "a.py").write_text("x = 1\n")
    info = snapshot(empty)
    assert info.state == UNVERSIONED and info.commit is None


def test_find_app_finds_the_work_tree(app_repo: Path) -> None:
    sub = app_repo / "pkg" / "sub"
    sub.mkdir(parents=True)
    assert find_app(sub) == app_repo.resolve()


# --------------------------------------------------------------------------- declaration

PYPROJECT = """\
[project]
name = "demo"
version = "0.1"

[tool.odium]
pip = ["packaging>=20", "odium-tiny-pkg ; python_version >= '3'", "packaging>=20"]
system = ["bash", "libc6:amd64"]
env = ["OMP_NUM_THREADS"]
files = ["data/params.json", "./conf.ini"]
"""


def test_declaration_in_pyproject(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    d = load_declaration(tmp_path)
    assert d.source == "pyproject.toml [tool.odium]"
    assert d.pip == ("packaging>=20", "odium-tiny-pkg ; python_version >= '3'")  # no repeats
    assert d.system == ("bash", "libc6:amd64") and d.env == ("OMP_NUM_THREADS",)
    assert d.files == ("data/params.json", "conf.ini")
    assert Declaration.from_dict(json.loads(json.dumps(d.to_dict()))) == d


def test_declaration_in_odium_toml(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'demo'\n")  # no [tool.odium]
    (tmp_path / "odium.toml").write_text('pip = ["requests"]\nenv = ["HOME"]\n')
    d = load_declaration(tmp_path)
    assert d == Declaration(pip=("requests",), env=("HOME",), source="odium.toml")


def test_no_declaration_is_empty(tmp_path: Path) -> None:
    assert load_declaration(tmp_path) == Declaration() == Declaration(source="none")
    (tmp_path / "pyproject.toml").write_text("[tool.black]\nline-length = 90\n")
    assert load_declaration(tmp_path).source == "none"


def test_declared_twice_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.odium]\npip = []\n")
    (tmp_path / "odium.toml").write_text("pip = []\n")
    with pytest.raises(ConfigError, match="keep exactly one"):
        load_declaration(tmp_path)


@pytest.mark.parametrize("body, words", [
    ("pip = ['x']\nsytem = ['bash']\n", ["unknown key(s) sytem", "expected only pip"]),
    ("pip = 'numpy'\n", ["'pip' must be a list of strings", "got 'numpy'"]),
    ("env = [1, 2]\n", ["'env' must be a list of strings"]),
    ("pip = ['numpy>=>2']\n", ["not a PEP 508 requirement", "expected e.g."]),
    ("pip = ['--index-url=http://evil']\n", ["not a PEP 508 requirement"]),
    ("system = ['LibFoo']\n", ["not a Debian package name"]),
    ("system = ['-oops']\n", ["not a Debian package name"]),
    ("env = ['MY-VAR']\n", ["not a variable name"]),
    ("files = ['/etc/passwd']\n", ["relative to the application"]),
    ("files = ['data/../../secret']\n", ["relative to the application"]),
    ("files = ['~/x']\n", ["relative to the application"]),
    ("files = ['.']\n", ["application directory itself"]),
    ("pip = [\n", ["not valid TOML"]),
])
def test_bad_declarations_say_what_was_expected(tmp_path: Path, body: str,
                                                words: list[str]) -> None:
    (tmp_path / "odium.toml").write_text(body)
    with pytest.raises(ConfigError) as e:
        load_declaration(tmp_path)
    for w in words:
        assert w in str(e.value)
    assert "odium.toml" in str(e.value)


def test_bad_declaration_in_pyproject_names_its_table(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool]\nodium = 3\n")
    with pytest.raises(ConfigError, match=r"pyproject.toml \[tool.odium\]: expected a table"):
        load_declaration(tmp_path)


def test_declaration_from_dict_rejects_bad_input() -> None:
    with pytest.raises(ProtocolError):
        Declaration.from_dict({"pip": "numpy"})
    with pytest.raises(ProtocolError):
        Declaration.from_dict({"files": ["../x"], "source": "wire"})
    with pytest.raises(ProtocolError):
        Declaration.from_dict([])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_parts_and_canonical_id(app_repo: Path) -> None:
    fp = fingerprint(app_repo, Declaration(), use_cache=False)
    assert set(fp.parts) == set(PARTS) == set(fp.detail)
    canon = json.dumps(fp.parts, sort_keys=True, separators=(",", ":")).encode()
    assert fp.id == hashlib.sha256(canon).hexdigest()
    py = fp.detail["python"]
    assert py["implementation"] == sys.implementation.name
    assert py["version"].startswith(f"{sys.version_info[0]}.{sys.version_info[1]}.")
    assert py["abi"] and py["platform"]
    pk = fp.detail["packages"]
    assert pk["gitpython"] and pk["pyzmq"] and "GitPython" not in pk  # PEP 503 names
    assert fingerprint(app_repo, Declaration(), use_cache=False) == fp  # deterministic
    assert Fingerprint.from_dict(json.loads(json.dumps(fp.to_dict()))) == fp


def test_env_variables_are_hashed_never_sent_in_clear(app_repo: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    decl = Declaration(env=("ODIUM_T_SECRET", "ODIUM_T_UNSET"))
    monkeypatch.delenv("ODIUM_T_UNSET", raising=False)
    monkeypatch.setenv("ODIUM_T_SECRET", "hunter2-value")
    a = snapshot(app_repo, decl)
    text = json.dumps(a.to_dict())
    assert "hunter2-value" not in text
    assert hashlib.sha256(b"hunter2-value").hexdigest() not in text
    assert a.fingerprint.detail["env"]["ODIUM_T_UNSET"] is None
    assert re.match(r"^[0-9a-f]{64}$", a.fingerprint.detail["env"]["ODIUM_T_SECRET"])

    monkeypatch.setenv("ODIUM_T_SECRET", "other-value")
    b = snapshot(app_repo, decl)
    assert a.fingerprint.parts["env"] != b.fingerprint.parts["env"]
    assert a.fingerprint.parts["packages"] == b.fingerprint.parts["packages"]
    d = diff(a, b)
    assert d == {"env": ["ODIUM_T_SECRET"]}
    assert format_diff(d) == "environment variable differs: ODIUM_T_SECRET"
    assert "other-value" not in json.dumps(b.to_dict())


def test_declared_file_changes_the_files_part(app_repo: Path) -> None:
    (app_repo / "data").mkdir()
    params = app_repo / "data" / "params.json"
    params.write_text('{"k": 1}\n')
    decl = Declaration(files=("data/params.json", "data/absent.csv"))
    a = fingerprint(app_repo, decl)
    assert a.detail["files"]["data/params.json"] == hashlib.sha256(b'{"k": 1}\n').hexdigest()
    assert a.detail["files"]["data/absent.csv"] is None
    params.write_text('{"k": 2}\n')  # same size, within the same second: not cached on
    b = fingerprint(app_repo, decl)
    assert b.parts["files"] != a.parts["files"] and b.parts["python"] == a.parts["python"]
    ha, hb = StateInfo(C1, C1, (), decl, a), StateInfo(C1, C1, (), decl, b)
    assert diff(ha, hb) == {"files": ["data/params.json"]}


@pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="no dpkg-query here")
def test_declared_system_packages_installed_and_missing(app_repo: Path) -> None:
    decl = Declaration(system=("bash", "odium-no-such-package"))
    fp = fingerprint(app_repo, decl)
    assert fp.detail["system"]["bash"]  # a Debian version string
    assert fp.detail["system"]["odium-no-such-package"] is None
    assert missing_system(fp) == ["odium-no-such-package"]
    hub = StateInfo(C1, C1, (), decl, fingerprint(app_repo, Declaration(system=("bash",))))
    d = diff(hub, StateInfo(C1, C1, (), decl, fp))
    assert d == {"system": {"odium-no-such-package": [None, None]}}
    assert "system package odium-no-such-package: missing on hub, missing on node" in format_diff(d)


def test_fingerprint_cache_hits_and_recomputes_when_head_moves(app_repo: Path,
                                                               monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    # Declared files are left out: their ctime (which utime cannot age) would keep the
    # result racy, hence uncached, for a second after the repository was written.
    monkeypatch.setenv("ODIUM_T_VAR", "a")
    decl = Declaration(env=("ODIUM_T_VAR",))
    age_repo(app_repo)
    a = fingerprint(app_repo, decl)
    assert fingerprint(app_repo, decl) is a  # warm: the very same object
    assert fingerprint(app_repo, decl, use_cache=False) is not a
    assert fingerprint(app_repo, Declaration()) is not a  # the declaration is in the key

    commit_file(app_repo, "other.py", "x = 1\n")  # HEAD's branch moves
    age_repo(app_repo)
    b = fingerprint(app_repo, decl)
    assert b is not a and b == a  # recomputed; the environment itself did not change
    assert fingerprint(app_repo, decl) is b

    monkeypatch.setenv("ODIUM_T_VAR", "b")
    c = fingerprint(app_repo, decl)
    assert c.parts["env"] != b.parts["env"]

    clear_cache()
    assert fingerprint(app_repo, decl) is not c


def test_unsatisfied_reads_like_a_sentence() -> None:
    decl = Declaration(pip=("numpy>=2", "requests", "Odium_Tiny.Pkg==1.1", "six",
                            "winonly ; sys_platform == 'win32'", "odd>=1"))
    pk = {"numpy": "1.26.4", "odium-tiny-pkg": "1.1", "six": "1.16.0", "odd": "not-a-version"}
    assert unsatisfied(decl, pk) == ["numpy>=2 (installed 1.26.4)", "requests (not installed)",
                                     "odd>=1 (installed not-a-version, not a PEP 440 version)"]
    assert unsatisfied(Declaration(pip=("numpy>=2rc1",)), {"numpy": "2.0.0rc2"}) == []
    assert unsatisfied(Declaration(), {}) == []


# --------------------------------------------------------------------------- packages in a venv


def build_wheel(dest: Path, name: str, version: str) -> Path:
    """A tiny pure-Python wheel, written by hand (no build backend needed)."""
    mod = name.replace("-", "_")
    dist = f"{mod}-{version}.dist-info"
    files = {
        f"{mod}/__init__.py": f"VERSION = {version!r}\n".encode(),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n\n"
                            .encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: odium-tests\nRoot-Is-Purelib: true\n"
                         b"Tag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    dest.mkdir(parents=True, exist_ok=True)
    whl = dest / f"{mod}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    return whl


TINY = "odium-tiny-pkg"


def outer_site_dirs() -> list[str]:
    """The site directories of the interpreter running the tests: where odium, pip and the
    project's dependencies are (a virtual environment's own, when the tests run in one)."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        dirs.append(site.getusersitepackages())
    return dirs


class Venv:
    """A real virtual environment of its own (a package installed here is installed here
    only) that also sees the site directories of the Python running the tests (odium, pip,
    GitPython, zmq…), behind its own.

    Not ``--system-site-packages``: that is the site-packages of the *base* interpreter,
    which lacks the project's dependencies when the tests themselves run in a venv. A .pth
    file adds the outer site directories with ``site.addsitedir``, so their own .pth files
    (an editable install of odium) count too.
    """

    def __init__(self, root: Path, wheels: Path) -> None:
        self.root = root
        self.wheels = wheels
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True,
                       timeout=60)
        self.python = str(root / "bin" / "python")
        lines = "".join(f"import site; site.addsitedir({d!r})\n" for d in outer_site_dirs())
        (self.site_packages() / "zz_odium_tests_outer.pth").write_text(lines)

    def pip_install(self, version: str) -> None:
        r = subprocess.run([self.python, "-m", "pip", "install", "--no-index", "--no-deps",
                            "--disable-pip-version-check", "--quiet",
                            str(self.wheels / f"odium_tiny_pkg-{version}-py3-none-any.whl")],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr

    def run(self, code: str, **env: str) -> Any:
        """Run code in the venv's python; it prints one JSON value as its last line."""
        r = subprocess.run([self.python, "-c", code], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), **env})
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])

    def snapshot(self, app: Path) -> StateInfo:
        return StateInfo.from_dict(self.run(
            "import json, sys; from odium.local.appstate import snapshot; "
            f"print(json.dumps(snapshot({str(app)!r}).to_dict()))"))

    def site_packages(self) -> Path:
        return next((self.root / "lib").glob("python*/site-packages"))


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("wheels")
    for v in ("1.0", "1.1"):
        build_wheel(d, TINY, v)
    return d


@pytest.fixture
def venv(tmp_path: Path, wheels: Path) -> Venv:
    return Venv(tmp_path / "venv", wheels)


def test_package_at_two_versions_shows_in_the_diff(venv: Venv, app_repo: Path) -> None:
    (app_repo / "odium.toml").write_text(f'pip = ["{TINY}>=1.1"]\n')
    git(app_repo, "add", "odium.toml")
    git(app_repo, "commit", "-q", "-m", "declare")

    none = venv.snapshot(app_repo)
    assert TINY not in none.fingerprint.detail["packages"]
    assert none.unsatisfied == (f"{TINY}>=1.1 (not installed)",)
    venv.pip_install("1.0")
    old = venv.snapshot(app_repo)
    venv.pip_install("1.1")
    new = venv.snapshot(app_repo)

    assert old.fingerprint.detail["packages"][TINY] == "1.0"
    assert new.fingerprint.detail["packages"][TINY] == "1.1"
    assert old.state == new.state == head(app_repo)
    assert old.fingerprint.parts["packages"] != new.fingerprint.parts["packages"]
    assert old.fingerprint.parts["python"] == new.fingerprint.parts["python"]
    assert old.unsatisfied == (f"{TINY}>=1.1 (installed 1.0)",) and new.unsatisfied == ()

    d = diff(new, old)  # the hub has 1.1, the node 1.0
    assert d == {"packages": {"changed": {TINY: ["1.1", "1.0"]}},
                 "unsatisfied": [f"{TINY}>=1.1 (installed 1.0)"]}
    text = format_diff(d)
    assert f"package {TINY}: 1.1 on hub, 1.0 on node" in text
    assert f"not satisfied on node: {TINY}>=1.1 (installed 1.0)" in text
    assert diff(none, new) == {"packages": {"added": {TINY: "1.1"}}}
    assert diff(new, none) == {"packages": {"removed": {TINY: "1.1"}},
                               "unsatisfied": [f"{TINY}>=1.1 (not installed)"]}


def test_cache_recomputes_after_pip_install_in_the_same_process(venv: Venv,
                                                                app_repo: Path) -> None:
    venv.pip_install("1.0")
    age(venv.site_packages(), venv.root / "lib")
    age_repo(app_repo)
    out = venv.run(f"""
import json, subprocess, sys
from odium.core.statediff import Declaration
from odium.local.fingerprint import fingerprint
app, decl = {str(app_repo)!r}, Declaration()
a = fingerprint(app, decl)
hit = fingerprint(app, decl) is a
subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet",
                {str(venv.wheels / "odium_tiny_pkg-1.1-py3-none-any.whl")!r}], check=True)
b = fingerprint(app, decl)
print(json.dumps([hit, a.detail["packages"]["{TINY}"], b.detail["packages"]["{TINY}"],
                  a.parts["packages"] != b.parts["packages"]]))
""")
    assert out == [True, "1.0", "1.1", True]


def test_install_declared_from_local_wheels(venv: Venv, app_repo: Path) -> None:
    decl = Declaration(pip=(f"{TINY}==1.1",))
    assert install_declared(decl, python=venv.python, find_links=str(venv.wheels)) == \
        [f"{TINY}-1.1"]
    assert install_declared(decl, python=venv.python, find_links=str(venv.wheels)) == []
    assert venv.snapshot(app_repo).fingerprint.detail["packages"][TINY] == "1.1"
    with pytest.raises(StateError, match=r"failed \(exit 1\).*9\.9"):
        install_declared(Declaration(pip=(f"{TINY}==9.9",)), python=venv.python,
                         find_links=str(venv.wheels))
    assert install_declared(Declaration(), python=venv.python) == []


# --------------------------------------------------------------------------- requirements


@pytest.mark.parametrize("required, state, own, ok", [
    ("any", C1, C2, True),
    ("any", UNVERSIONED, C2, True),
    ("any", C1 + "+dirty.0123456789abcdef", C1, True),
    ("match", C1, C1, True),
    ("match", C1, C2, False),
    ("match", C1 + "+dirty.0123456789abcdef", C1 + "+dirty.0123456789abcdef", False),
    ("match", C1, C1 + "+dirty.0123456789abcdef", False),
    ("match", UNVERSIONED, UNVERSIONED, False),
    ("match", "unknown", C1, False),
    (C1, C1, C2, True),
    (C1.upper(), C1, C2, True),
    (C1[:7], C1, C2, True),
    (C1[:6], C1, C2, False),  # too short to be an id
    (C2, C1, C2, False),
    (C1, C1 + "+dirty.0123456789abcdef", C2, False),
    (C1 + "+dirty.0123456789abcdef", C1 + "+dirty.0123456789abcdef", C2, False),
    ("main", C1, C1, False),
    ("", C1, C1, False),
])
def test_satisfies(required: str, state: str, own: str, ok: bool) -> None:
    assert satisfies(required, state, own) is ok


def test_default_requirement_and_hints() -> None:
    assert default_requirement(C1) == ("match", None)
    req, hint = default_requirement(C1 + "+dirty.0123456789abcdef")
    assert req == "any" and hint and "git commit" in hint and "\n" not in hint
    req, hint = default_requirement(UNVERSIONED)
    assert req == "any" and hint and "git init" in hint and "\n" not in hint


def test_normalize_and_resolve_requirements(app_repo: Path) -> None:
    assert normalize_requirement(" Match ") == "match"
    assert normalize_requirement(C1.upper()) == C1
    with pytest.raises(ConfigError, match="expected 'any', 'match' or a commit id"):
        normalize_requirement("latest")
    first = head(app_repo)
    second = commit_file(app_repo, "b.py", "b = 1\n")
    assert resolve_state(app_repo, "HEAD~1") == first
    assert resolve_state(app_repo, "main") == second
    assert resolve_state(app_repo, second[:8]) == second
    with pytest.raises(ConfigError, match="no such commit"):
        resolve_state(app_repo, "f" * 40)
    with pytest.raises(ConfigError):
        resolve_state(app_repo, "--output=/tmp/x")


# --------------------------------------------------------------------------- commit relation


@pytest.fixture
def history(app_repo: Path) -> dict[str, str]:
    """main: c0 - c1 - c2, and side: c0 - s1 (the hub's repository)."""
    c0 = head(app_repo)
    c1 = commit_file(app_repo, "a.py", "a = 1\n")
    c2 = commit_file(app_repo, "a.py", "a = 2\n")
    git(app_repo, "checkout", "-q", "-b", "side", c0)
    s1 = commit_file(app_repo, "s.py", "s = 1\n")
    git(app_repo, "checkout", "-q", "main")
    return {"c0": c0, "c1": c1, "c2": c2, "s1": s1}


def test_commit_relation(app_repo: Path, history: dict[str, str]) -> None:
    h = history
    assert commit_relation(app_repo, h["c2"], h["c2"]) == "same"
    assert commit_relation(app_repo, h["c2"], h["c0"]) == "behind"
    assert commit_relation(app_repo, h["c1"], h["c2"]) == "ahead"
    assert commit_relation(app_repo, h["c2"], h["s1"]) == "diverged"
    assert commit_relation(app_repo, h["c2"], "e" * 40) == "unknown"
    assert commit_relation(app_repo, h["c2"], h["c0"] + "+dirty.0123456789abcdef") == "behind"
    assert commit_relation(app_repo, h["c2"], UNVERSIONED) == "unknown"
    assert commit_relation(app_repo.parent, h["c2"], h["c0"]) == "unknown"  # not a repo


# --------------------------------------------------------------------------- diff


def _info(state: str, packages: dict[str, str], python: str = "3.11.7",
          dirty: tuple[str, ...] = (), unsat: tuple[str, ...] = ()) -> StateInfo:
    detail: dict[str, Any] = {
        "python": {"implementation": "cpython", "version": python, "abi": "cpython-311",
                   "platform": "linux-x86_64"},
        "packages": packages, "system": {}, "env": {}, "files": {}}
    parts = {k: hashlib.sha256(json.dumps(detail[k], sort_keys=True).encode()).hexdigest()
             for k in PARTS}
    fp = Fingerprint(hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest(),
                     parts, detail)
    return StateInfo(state, commit_of(state), dirty, Declaration(), fp, unsat)


def test_diff_part_by_part() -> None:
    hub = _info(C1, {"a": "1", "b": "2", "c": "3"})
    assert diff(hub, hub) == {} and format_diff({}) == "same state and environment"
    node = _info(C2 + "+dirty.0123456789abcdef", {"b": "2", "c": "4", "d": "5"}, "3.10.2",
                 dirty=("app.py", "new.txt"), unsat=("x>=2 (installed 1)",))
    d = diff(hub, node, "behind")
    assert d == {
        "commit": {"hub": C1, "node": C2, "relation": "behind"},
        "dirty": ["app.py", "new.txt"],
        "packages": {"added": {"d": "5"}, "removed": {"a": "1"}, "changed": {"c": ["3", "4"]}},
        "python": {"version": ["3.11.7", "3.10.2"]},
        "unsatisfied": ["x>=2 (installed 1)"],
    }
    assert json.loads(json.dumps(d)) == d
    text = format_diff(d).splitlines()
    assert text == [
        f"commit: node {C2[:12]} is behind the hub (hub {C1[:12]})",
        "uncommitted on node: app.py",
        "uncommitted on node: new.txt",
        "package only on node: d 5",
        "package missing on node: a 1 (on hub)",
        "package c: 3 on hub, 4 on node",
        "python version: 3.11.7 on hub, 3.10.2 on node",
        "not satisfied on node: x>=2 (installed 1)",
    ]
    assert diff(hub, node)["commit"]["relation"] == "unknown"


def test_diff_when_only_the_hub_is_dirty() -> None:
    hub = _info(C1 + "+dirty.0123456789abcdef", {}, dirty=("wip.py",))
    d = diff(hub, _info(C1, {}))
    assert d == {"hub_dirty": ["wip.py"]}
    assert format_diff(d) == "uncommitted on hub: wip.py"


def test_state_info_round_trips_through_json(app_repo: Path) -> None:
    (app_repo / "odium.toml").write_text('pip = ["packaging"]\nenv = ["HOME"]\n')
    info = snapshot(app_repo)
    assert info.dirty_files == ("odium.toml",) and info.declaration.source == "odium.toml"
    back = StateInfo.from_dict(json.loads(json.dumps(info.to_dict())))
    assert back == info
    with pytest.raises(ProtocolError):
        StateInfo.from_dict({**info.to_dict(), "commit": "nope"})
    with pytest.raises(ProtocolError):
        StateInfo.from_dict({**info.to_dict(), "dirty_files": "app.py"})
    with pytest.raises(ProtocolError):
        StateInfo.from_dict({**info.to_dict(), "fingerprint": {"id": 3}})


# --------------------------------------------------------------------------- sync


@pytest.fixture
def clone(app_repo: Path, tmp_path: Path) -> Path:
    c = tmp_path / "node-app"
    git(tmp_path, "clone", "-q", str(app_repo), str(c))
    return c


def bundle_heads(repo: Path, data: bytes, tmp: Path) -> str:
    f = tmp / "check.bundle"
    f.write_bytes(data)
    return git(repo, "bundle", "list-heads", str(f))


def test_sync_a_node_one_commit_behind(app_repo: Path, clone: Path, tmp_path: Path) -> None:
    old = head(clone)
    target = commit_file(app_repo, "app.py", "VALUE = 42\n", "advance")
    full = make_bundle(app_repo, target, [])
    t0 = time.perf_counter()
    data = make_bundle(app_repo, target, [old, "0" * 40, "not-a-commit"])
    assert f"{target} refs/odium/sync" in bundle_heads(app_repo, data, tmp_path)
    assert len(data) < len(full)  # only what the node lacks
    assert not satisfies("match", state_id(clone), state_id(app_repo))
    apply_bundle(clone, data, target)
    elapsed = time.perf_counter() - t0
    assert head(clone) == target and state_id(clone) == target
    assert git(clone, "symbolic-ref", "--short", "HEAD").strip() == "main"  # fast-forwarded
    assert (clone / "app.py").read_text() == "VALUE = 42\n"
    assert satisfies("match", state_id(clone), state_id(app_repo))
    assert elapsed < 2.0, f"sync of one commit took {elapsed:.2f} s"


def test_sync_refused_on_a_dirty_node(app_repo: Path, clone: Path) -> None:
    old = head(clone)
    target = commit_file(app_repo, "app.py", "VALUE = 42\n", "advance")
    data = make_bundle(app_repo, target, [old])
    (clone / "app.py").write_text("VALUE = 'my work'\n")
    with pytest.raises(StateError, match=r"refusing to sync .*uncommitted.*app\.py"):
        apply_bundle(clone, data, target)
    assert (clone / "app.py").read_text() == "VALUE = 'my work'\n"
    assert head(clone) == old

    git(clone, "checkout", "-q", "--", "app.py")
    (clone / "scratch.txt").write_text("untracked work\n")
    with pytest.raises(StateError, match=r"scratch\.txt"):
        apply_bundle(clone, data, target)
    assert (clone / "scratch.txt").read_text() == "untracked work\n" and head(clone) == old


def test_sync_ignores_ignored_files(app_repo: Path, clone: Path) -> None:
    (clone / ".git" / "info" / "exclude").write_text("*.log\n")
    (clone / "run.log").write_text("keep me\n")
    target = commit_file(app_repo, "app.py", "VALUE = 43\n")
    apply_bundle(clone, make_bundle(app_repo, target, [head(clone)]), target)
    assert head(clone) == target and (clone / "run.log").read_text() == "keep me\n"


def test_sync_a_diverged_node_detaches_and_keeps_its_commit(app_repo: Path,
                                                            clone: Path) -> None:
    mine = commit_file(clone, "mine.py", "m = 1\n", "node-only work")
    target = commit_file(app_repo, "app.py", "VALUE = 44\n")
    data = make_bundle(app_repo, target, [mine, head(app_repo)])  # mine is unknown to the hub
    apply_bundle(clone, data, target)
    assert head(clone) == target
    assert git(clone, "rev-parse", "main").strip() == mine  # the node's branch is untouched
    assert subprocess.run(["git", "symbolic-ref", "-q", "HEAD"], cwd=clone).returncode == 1


def test_sync_when_the_node_has_the_target_or_nothing(app_repo: Path, clone: Path,
                                                      tmp_path: Path) -> None:
    target = head(app_repo)
    apply_bundle(clone, make_bundle(app_repo, target, [target]), target)  # already there
    assert head(clone) == target

    empty = tmp_path / "fresh"
    empty.mkdir()
    git(empty, "init", "-q")
    apply_bundle(empty, make_bundle(app_repo, target, []), target)
    assert head(empty) == target and (empty / "app.py").read_text() == "VALUE = 41\n"


def test_sync_rejects_bad_bundles(app_repo: Path, clone: Path, tmp_path: Path) -> None:
    old = head(clone)
    target = commit_file(app_repo, "app.py", "VALUE = 45\n")
    data = make_bundle(app_repo, target, [old])
    with pytest.raises(StateError, match="not the expected"):
        apply_bundle(clone, data, old)
    with pytest.raises(StateError, match="fetch from the bundle failed: fatal: early EOF"):
        apply_bundle(clone, data[: len(data) // 2], target)  # the pack is cut short
    with pytest.raises(StateError, match="does not verify"):
        apply_bundle(clone, b"garbage", target)
    with pytest.raises(StateError, match="40-hex"):
        apply_bundle(clone, data, target[:10])
    other = tmp_path / "other"  # an unrelated repository lacks the bundle's prerequisite
    other.mkdir()
    git(other, "init", "-q", "-b", "main")
    commit_file(other, "z.py", "z = 1\n")
    with pytest.raises(StateError, match="does not verify"):
        apply_bundle(other, data, target)
    with pytest.raises(StateError, match="not a commit"):
        make_bundle(app_repo, "f" * 40, [])
    with pytest.raises(StateError, match="not a git repository"):
        apply_bundle(tmp_path, data, target)
    assert head(clone) == old
