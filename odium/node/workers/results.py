"""A result as the node sends it: one that fits in one message the hub accepts."""

from __future__ import annotations

import json
from typing import Any

RESULT_BUDGET = 15 * 1024 * 1024  # bytes of JSON a result may take (a message is <= 16 MiB)

Event = dict[str, Any]


def _size(value: Any) -> int:
    """Bytes of ``value`` as JSON on the wire (UTF-8, as the node's encoder writes it)."""
    return len(json.dumps(value, ensure_ascii=False, default=str).encode())


def _cut(text: str, limit: int, what: str) -> str:
    """``text`` within about ``limit`` bytes, with a visible note when it was cut."""
    if _size(text) <= limit:
        return text
    keep = max(0, limit // 6 - 200)  # 6 bytes per character at worst (a JSON escape)
    return (text[:keep] + f"\n[odium: {what} cut to {keep} of {len(text)} characters: the "
            "result must fit in one message]\n")


def fit_result(res: Event, budget: int = RESULT_BUDGET) -> Event:
    """A result that fits in one message the hub accepts: a value, display outputs, streams
    or a traceback too large for it give way, each with a visible note; never a message the
    hub must refuse."""
    if _size(res) <= budget:
        return res
    res = dict(res)
    notes: list[str] = []
    for strict in (False, True):  # first only what is large; then whatever it takes
        if res.get("value") is not None and (strict or _size(res["value"]) > budget // 4):
            notes.append(f"[odium: the value ({_size(res['value'])} bytes of JSON) was too "
                         "large to send; its repr is shown]")
            res["value"], res["value_json"] = None, False
        if res.get("outputs") and (strict or _size(res["outputs"]) > budget // 4):
            notes.append(f"[odium: {len(res['outputs'])} display outputs "
                         f"({_size(res['outputs'])} bytes) were too large to send]")
            res["outputs"] = []
        if isinstance(res.get("error"), dict) and res["error"].get("traceback"):
            err = dict(res["error"])
            err["traceback"] = _cut(str(err["traceback"]), budget // 8, "the traceback")
            res["error"] = err
        for name in ("stdout", "stderr"):
            if res.get(name):
                res[name] = _cut(str(res[name]), budget // (4 if strict else 3), name)
        if _size(res) + 1000 <= budget:
            break
    if notes:
        res["stderr"] = (res.get("stderr") or "") + "\n".join(notes) + "\n"
    return res


__all__ = ["RESULT_BUDGET", "fit_result"]
