"""A result as the node sends it: one that fits in one message the hub accepts, and that says
what was cut from it, with the true sizes.

A result dict may carry, beside its fields, ``sizes`` (characters each stream had in all, and
the length of the whole repr of the value) and, once fitted, ``shown`` (characters of each
stream before its note), ``fitted`` (the streams cut to fit) and ``notes`` (what gave way).
They stay on the node (``odium.node.commands`` sends only the fields), and make fitting again
give the same notes with the same true totals.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from .code import MAX_REPR

RESULT_BUDGET = 15 * 1024 * 1024  # bytes of JSON a result may take (a message is <= 16 MiB)
STREAMS = ("stdout", "stderr")
SLACK = 4000  # bytes kept free for the notes

Event = dict[str, Any]
_encode = msgspec.json.Encoder(enc_hook=str).encode


def _size(value: Any) -> int:
    """Bytes of ``value`` as JSON on the wire (UTF-8, escapes included): measured with the
    wire's own encoder (twenty times as fast as ``json`` on a large value)."""
    try:
        return len(_encode(value))
    except (TypeError, ValueError, OverflowError):  # e.g. keys msgspec does not take
        return len(json.dumps(value, ensure_ascii=False, default=str).encode())


def within(text: str, limit: int) -> int:
    """How many leading characters of ``text`` take at most ``limit`` bytes as JSON: a guess
    from its bytes per character, made smaller until it fits (a NUL is 6 bytes, an 'é' 2)."""
    n, size = len(text), _size(text)
    while size > limit and n > 0:
        n = min(n - 1, int(n * limit / size * 0.98))
        size = _size(text[:n])
    return max(n, 0)


def fit_result(res: Event, budget: int = RESULT_BUDGET) -> Event:
    """A result that fits in one message the hub accepts: a value, display outputs, streams
    or a traceback too large for it give way, each with a visible note giving the true sizes
    (a stream cut at the capture limit says so too); never a message the hub must refuse."""
    sizes = dict(res.get("sizes") or {})
    shown = res.get("shown") or {}
    texts = {n: str(res.get(n) or "") for n in STREAMS}
    texts = {n: t[:shown[n]] if n in shown else t for n, t in texts.items()}
    for n in STREAMS:
        sizes[n] = max(int(sizes.get(n, 0)), len(texts[n]))
    cut = any(sizes[n] > len(texts[n]) for n in STREAMS)
    if ("shown" in res or not cut) and _size(res) <= budget:
        return res
    res = {**res, **texts}
    notes: list[str] = list(res.get("notes") or [])
    fitted = set(res.get("fitted") or ())
    if _size(res) + SLACK > budget:
        _give_way(res, texts, sizes, budget, notes, fitted)
    for n in STREAMS:
        if len(texts[n]) < sizes[n]:
            res[n] = texts[n] + _cut_note(n, len(texts[n]), sizes[n], n in fitted)
    if notes:
        res["stderr"] += "".join(notes)
    res.update(sizes=sizes, shown={n: len(texts[n]) for n in STREAMS}, fitted=sorted(fitted),
               notes=notes)
    return res


def _cut_note(name: str, shown: int, total: int, fitted: bool) -> str:
    """The note at the end of a cut stream: how much of how much (the true total), and why."""
    if fitted:
        return (f"\n[odium: {name} cut to {shown} of {total} characters: the result must fit "
                "in one message]\n")
    return (f"\n[odium: output cut at {shown} of {total} characters of {name}: a command "
            "keeps no more]\n")


def _give_way(res: Event, texts: dict[str, str], sizes: dict[str, int], budget: int,
              notes: list[str], fitted: set[str]) -> None:
    """Make ``res`` fit: first what is large gives way (a value, displays, a traceback), the
    streams sharing the room that is left; then whatever it takes."""
    for strict in (False, True):
        _drop_large(res, sizes, budget, strict, notes)
        room = budget - SLACK - _size({**res, "stdout": "", "stderr": ""})
        for n, k in _share(texts, max(room, 0)).items():
            if k < len(texts[n]):
                texts[n] = texts[n][:k]
                fitted.add(n)
        res.update(texts)
        if _size(res) + SLACK <= budget:
            return


def _drop_large(res: Event, sizes: dict[str, int], budget: int, strict: bool,
                notes: list[str]) -> None:
    """The value, the display outputs and the traceback give way if they are large (or, when
    ``strict``, whatever their size), each with a note."""
    if res.get("value") is not None and (strict or _size(res["value"]) > budget // 4):
        whole = int(sizes.get("value_repr", 0))
        part = f" (its first {MAX_REPR} of {whole} characters)" if whole > MAX_REPR else ""
        notes.append(f"[odium: the value ({_size(res['value'])} bytes as JSON) was too large "
                     f"to send in one message; its repr is shown{part}]\n")
        res["value"], res["value_json"] = None, False
    if res.get("outputs") and (strict or _size(res["outputs"]) > budget // 4):
        notes.append(f"[odium: {len(res['outputs'])} display outputs ({_size(res['outputs'])} "
                     "bytes as JSON) were too large to send with this result]\n")
        res["outputs"] = []
    err = res.get("error")
    if isinstance(err, dict):
        err = dict(err)
        for key, what in (("evalue", "message"), ("traceback", "traceback")):
            text = str(err.get(key) or "")
            k = within(text, budget // 16 if strict else budget // 8)
            if k < len(text):
                err[key] = text[:k] + (f"\n[odium: the error's {what} cut to {k} of "
                                       f"{len(text)} characters: the result must fit in one "
                                       "message]\n")
        res["error"] = err


def _share(texts: dict[str, str], room: int) -> dict[str, int]:
    """Characters of each stream to keep so that both take at most ``room`` bytes of JSON: a
    small one keeps all it has, the other the rest; two large ones half each."""
    size = {n: _size(t) for n, t in texts.items()}
    if sum(size.values()) <= room:
        return {n: len(t) for n, t in texts.items()}
    small = min(size, key=lambda n: size[n])
    if size[small] <= room // 2:
        return {n: len(t) if n == small else within(t, room - size[small])
                for n, t in texts.items()}
    return {n: within(t, room // 2) for n, t in texts.items()}


__all__ = ["RESULT_BUDGET", "fit_result", "within"]
