"""The node's side of the data verbs (odium.api.data): functions the code a hub sends calls,
in the session's namespace (``ns``, the cell's globals), like any cell.

What goes back is a value ``odium.core.arrays`` encoded (JSON, arrays and bytes as raw
buffers in base64); one larger than a message is kept here in parts, and the caller takes
them one message each (``part``). Data coming in that is larger than a message arrives in
parts too (``take_part``), and is assembled when the last one is there. A scatter's part is
first *staged* (kept aside), then given its name on every node at once (``commit``) or
dropped (``drop``), so that a node lost during a scatter leaves no other node with a part.

Everything Odium keeps in the namespace is under one name, ``__odium_data__``.
"""

from __future__ import annotations

import base64
import json
import pickle
import secrets
from typing import Any

from ...core import arrays as A

SLOT = "__odium_data__"
IN_MESSAGE = 2 * A.CHUNK  # bytes of encoded value that may go back in the result itself


def _slots(ns: dict[str, Any]) -> dict[str, Any]:
    slots = ns.get(SLOT)
    if not isinstance(slots, dict):
        slots = ns[SLOT] = {"in": {}, "out": {}, "staged": {}, "index": {}}
    return slots


def reply(ns: dict[str, Any], value: Any) -> Any:
    """``value`` to send back: encoded (in parts kept here if larger than a message), or as
    it is when it is not data (a set, an object: its repr goes, as for a cell)."""
    try:
        skeleton, parts = A.encode_parts(value)
    except ValueError:
        return value
    if not parts and A.size(skeleton) <= IN_MESSAGE:
        return skeleton
    if not parts:  # (many small arrays: too much for one message all the same)
        return value
    token = secrets.token_hex(8)
    _slots(ns)["out"][token] = parts
    return {A.TAG: "parts", "id": token, "count": len(parts), "skeleton": skeleton}


def part(ns: dict[str, Any], token: str, i: int) -> str:
    """Part ``i`` of a value kept for sending; the last one taken forgets them all."""
    parts = _slots(ns)["out"].get(token)
    if parts is None:
        raise KeyError(f"no value in parts under {token!r} here (taken already?)")
    if i == len(parts) - 1:
        del _slots(ns)["out"][token]
    return str(parts[i]())


def call(ns: dict[str, Any], fn: str, args_json: str | None, args_pickle: str | None) -> Any:
    """Call the function (base64 of its cloudpickle) with its arguments (JSON, or base64 of a
    pickle); each ``Ref`` argument is that name's value here. Its value, as ``reply``."""
    f = pickle.loads(base64.b64decode(fn))
    if args_pickle:
        args, kwargs = pickle.loads(base64.b64decode(args_pickle))
    else:
        args, kwargs = json.loads(args_json or "[[], {}]")
    args = [_deref(ns, a) for a in args]
    kwargs = {k: _deref(ns, v) for k, v in kwargs.items()}
    return reply(ns, f(*args, **kwargs))


def _deref(ns: dict[str, Any], value: Any) -> Any:
    if isinstance(value, A.Ref):
        if value.name not in ns:
            raise NameError(f"name {value.name!r} is not defined on this node")
        return ns[value.name]
    return value


def take_part(ns: dict[str, Any], key: str, i: int, text: str) -> None:
    """Part ``i`` of data coming in under ``key`` (kept as its bytes)."""
    _slots(ns)["in"].setdefault(key, {})[i] = base64.b64decode(text, validate=True)


def push(ns: dict[str, Any], doc: str, *, key: str | None = None, stage: bool = False,
         index: tuple[int, int] | None = None) -> list[str]:
    """Give names their values: ``doc`` is the JSON of {name: encoded value}, or, with
    ``key``, of its skeleton, whose parts came by ``take_part``. ``stage``: keep them aside
    for ``commit``; ``index``: (this node's part, of how many), for a gather's order."""
    skeleton = json.loads(doc)
    if key is not None:
        got = _slots(ns)["in"].pop(key, {})
        skeleton = A.join(skeleton, [got[i] for i in sorted(got)])
    values = A.decode(skeleton)
    slots = _slots(ns)
    for name, value in values.items():
        if not name.isidentifier():
            raise NameError(f"{name!r} is not a variable name")
        if stage:
            slots["staged"][name] = (value, index)
        else:
            ns[name] = value
            slots["index"].pop(name, None)
    return sorted(values)


def commit(ns: dict[str, Any], names: list[str]) -> list[str]:
    """The staged parts of a scatter take their names."""
    slots = _slots(ns)
    done = []
    for name in names:
        if name in slots["staged"]:
            ns[name], index = slots["staged"].pop(name)
            slots["index"][name] = index
            done.append(name)
    return done


def drop(ns: dict[str, Any], names: list[str]) -> None:
    """Forget what a scatter staged, or what came in parts, under these names or keys."""
    slots = _slots(ns)
    for name in names:
        slots["staged"].pop(name, None)
        slots["in"].pop(name, None)


def pull(ns: dict[str, Any], name: str) -> Any:
    """A name's value here, as ``reply``; with a scatter's index: [index, total, value]."""
    if name not in ns:
        raise NameError(f"name {name!r} is not defined on this node")
    index = _slots(ns)["index"].get(name)
    return {"index": list(index) if index else None, "value": reply(ns, ns[name])}


__all__ = ["SLOT", "call", "commit", "drop", "part", "pull", "push", "reply", "take_part"]
