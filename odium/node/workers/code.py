"""Running a cell of user code in a worker: cell sources for tracebacks, the cell's value, and
the errors of a run (interrupted, timed out, failed) as result dicts."""

from __future__ import annotations

import ast
import json
import linecache
import re
import traceback
from collections import deque
from typing import Any

MAX_REPR = 100_000
CELL_SOURCES = 1000  # cells of a worker whose source tracebacks can show (the latest ones)

_cells = 0
_cell_names: deque[str] = deque()


def cell_name(code: str) -> str:
    """A new ``<odium-cell-N>`` file name for a cell's code, with the source registered in
    ``linecache``, so that tracebacks (and ``inspect``) show the lines of the cell."""
    global _cells
    _cells += 1
    name = f"<odium-cell-{_cells}>"
    linecache.cache[name] = (len(code), None, code.splitlines(keepends=True), name)
    _cell_names.append(name)
    while len(_cell_names) > CELL_SOURCES:
        linecache.cache.pop(_cell_names.popleft(), None)
    return name


def forget_cell(name: str) -> None:
    """Drop a cell's source from ``linecache`` (a job's cell: nothing refers to it after)."""
    linecache.cache.pop(name, None)


def user_traceback(e: BaseException, internal: tuple[str, ...] = (__file__,)) -> str:
    """The traceback text of an error in the user's code, without our own frames: the
    leading frames of ``internal`` files, and, for a cell that does not compile, every frame
    (it is only where the compiler was called)."""
    if isinstance(e, SyntaxError) and e.filename and str(e.filename).startswith("<odium-cell"):
        return "".join(traceback.format_exception_only(type(e), e))
    tb = e.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename in internal:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(e), e, tb))


def error_info(e: BaseException, internal: tuple[str, ...] = (__file__,)) -> dict[str, str]:
    """The error of a run that raised ``e`` (a SystemExit says its code)."""
    evalue = str(e.code) if isinstance(e, SystemExit) else str(e)
    return {"ename": type(e).__name__, "evalue": evalue,
            "traceback": user_traceback(e, internal)}


def interrupted_error(e: BaseException | None = None) -> dict[str, str]:
    """The error of a command stopped by SIGINT, with where it was when interrupted."""
    return {"ename": "KeyboardInterrupt", "evalue": "interrupted",
            "traceback": user_traceback(e) if e is not None else ""}


def timeout_error(timeout: float | None, interrupted: dict[str, Any] | None = None,
                  what: str = "") -> dict[str, str]:
    """The error of a command stopped by its timeout: says so, with the seconds; keeps the
    traceback of where it was when the interrupt came, with its last line saying why."""
    secs = f"{timeout:g} s" if timeout else "its time limit"
    evalue = f"timed out after {secs}" + (f"; {what}" if what else "")
    tb = str((interrupted or {}).get("traceback") or "")
    if tb:
        lines = tb.rstrip("\n").split("\n")
        if lines and lines[-1].startswith("KeyboardInterrupt"):
            lines[-1] = f"TimeoutError: {evalue} (it was here)"
        tb = "\n".join(lines) + "\n"
    return {"ename": "TimeoutError", "evalue": evalue, "traceback": tb}


# a part of the data verbs' data (odium.api.data): megabytes of base64 in a string literal,
# which the parser would take a tenth of a second over; its one call is made without it
_TAKE_PART = re.compile(r"__import__\('odium\.node\.workers\.data', fromlist=\['_'\]\)"
                        r"\.take_part\(globals\(\), '([A-Za-z0-9_-]{1,64})', ([0-9]{1,9}), "
                        r"'([A-Za-z0-9+/=]*)'\)\Z")


def run_python(code: str, ns: dict[str, Any],
               name: str | None = None) -> tuple[str, Any, dict[str, str] | None]:
    """Run a cell like IPython does: the last expression's value is the result."""
    if code.startswith("__import__('odium.node.workers.data'") and (
            m := _TAKE_PART.match(code)) is not None:
        from .data import take_part

        try:
            take_part(ns, m[1], int(m[2]), m[3])
            return "ok", None, None
        except Exception as e:  # noqa: BLE001 - as any cell's error
            return "error", None, error_info(e)
    name = name or cell_name(code)
    try:
        tree = ast.parse(code, filename=name, mode="exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body[-1].value)
            tree.body.pop()
        body = compile(tree, name, "exec")
        tail = compile(last, name, "eval") if last is not None else None
        exec(body, ns)
        value = eval(tail, ns) if tail is not None else None
        return "ok", value, None
    except KeyboardInterrupt as e:
        return "interrupted", None, interrupted_error(e)
    except BaseException as e:  # noqa: BLE001 - every error of the user's code is a result
        return "error", None, error_info(e)


def jsonable(value: Any) -> tuple[Any, bool]:
    """``value`` and True if it goes as JSON, else None and False (its repr goes instead)."""
    try:
        json.dumps(value, allow_nan=False)
        return value, True
    except (TypeError, ValueError, RecursionError):
        return None, False


def safe_repr(value: Any) -> str:
    """``repr(value)``, at most MAX_REPR characters; a note if ``__repr__`` fails."""
    return _repr(value)[0]


def _repr(value: Any) -> tuple[str, int]:
    """``safe_repr(value)`` and the length of the whole repr."""
    try:
        r = repr(value)
    except Exception as e:  # a broken __repr__ must not lose the result
        r = f"<{type(value).__name__} object; repr() failed: {e!r}>"
    return (r if len(r) <= MAX_REPR else r[:MAX_REPR] + "…"), len(r)


def add_value(res: dict[str, Any], value: Any) -> None:
    """Put a run's value into its result: as JSON when it can go so, and its repr (with the
    whole repr's length, for the note of a result whose value must give way to it)."""
    if value is not None:
        res["value"], res["value_json"] = jsonable(value)
        res["value_repr"], size = _repr(value)
        res.setdefault("sizes", {})["value_repr"] = size


__all__ = ["add_value", "cell_name", "error_info", "forget_cell", "interrupted_error",
           "jsonable", "run_python", "safe_repr", "timeout_error", "user_traceback"]
