"""Data as it travels between a caller and its nodes: JSON, with NumPy arrays and bytes as
tagged objects carrying their raw buffer in base64 (no JSON of floats, no pickle).

``encode(value)`` makes a value JSON: arrays (``{"$odium": "ndarray", "dtype": "<f8",
"shape": [2, 3], "data": <base64 of the C-ordered buffer>}``), bytes (``{"$odium":
"bytes", "data": …}``), lists, tuples (as lists), dicts with string keys and JSON scalars;
anything else is refused (ValueError) and the caller says what. ``decode(doc)`` turns such a
document back into values; it builds arrays only of plain numeric and boolean dtypes,
checks that each buffer has exactly the bytes its dtype and shape say, and never unpickles:
what a node sends reaches the caller as data, never as code.

A value whose buffers are larger than ``CHUNK`` bytes travels in parts (``encode_parts``
and ``join``): each part a message of its own, so no message is over the frame limit.

Pure: NumPy is imported only when an array is met (a node or caller without NumPy handles
everything else).
"""

from __future__ import annotations

import base64
import functools
import math
import re
from collections.abc import Callable
from typing import Any

TAG = "$odium"
CHUNK = 4 * 1024 * 1024  # raw bytes of one part (5.6 MB of base64: well under a message)
_DTYPE_RE = re.compile(r"[<>|=]?[biufc][0-9]{1,2}\Z")  # bool, ints, floats, complex only
MAX_DIMS = 32


def _is_array(value: Any) -> bool:
    return type(value).__module__ == "numpy" and type(value).__name__ == "ndarray"


def encode(value: Any, _depth: int = 0) -> Any:
    """``value`` as JSON (see the module's text); ValueError for what cannot go so."""
    if _depth > 64:
        raise ValueError("nested too deeply to travel")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not JSON (put it in a NumPy array)")
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {TAG: "bytes", "data": base64.b64encode(bytes(value)).decode("ascii")}
    if _is_array(value):
        return _encode_array(value)
    if type(value).__module__ == "numpy" and hasattr(value, "item"):  # a NumPy scalar
        return encode(value.item(), _depth + 1)
    if isinstance(value, (list, tuple)):
        return [encode(v, _depth + 1) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ValueError("a dict travels with string keys only")
        if TAG in value:
            raise ValueError(f"a dict with the key {TAG!r} cannot travel (it is the tag)")
        return {k: encode(v, _depth + 1) for k, v in value.items()}
    raise ValueError(f"a {type(value).__name__} does not travel as data (JSON, NumPy arrays "
                     "and bytes do); apply a function that returns one")


def _encode_array(a: Any) -> dict[str, Any]:
    dt = a.dtype.str
    if not _DTYPE_RE.match(dt):
        raise ValueError(f"an array of dtype {a.dtype} does not travel (numbers and booleans "
                         "do)")
    import numpy as np

    raw = np.ascontiguousarray(a).tobytes()
    return {TAG: "ndarray", "dtype": dt, "shape": list(a.shape),
            "data": base64.b64encode(raw).decode("ascii")}


def decode(doc: Any, _depth: int = 0) -> Any:
    """Values from a document ``encode`` made (ValueError for a malformed one)."""
    if _depth > 64:
        raise ValueError("nested too deeply")
    if isinstance(doc, list):
        return [decode(v, _depth + 1) for v in doc]
    if not isinstance(doc, dict):
        return doc
    kind = doc.get(TAG)
    if kind is None:
        return {k: decode(v, _depth + 1) for k, v in doc.items()}
    if kind == "bytes" and set(doc) == {TAG, "data"}:
        return bytes(_b64(doc["data"]))
    if kind == "ndarray" and set(doc) == {TAG, "dtype", "shape", "data"}:
        return _array(doc["dtype"], doc["shape"], _b64(doc["data"]))
    raise ValueError(f"not a value: a {TAG} object of kind {kind!r} with {sorted(doc)}")


def _b64(text: Any) -> bytes | bytearray:
    if isinstance(text, bytearray):  # (joined from parts: the bytes themselves)
        return text
    if not isinstance(text, str):
        raise ValueError("data is not base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise ValueError("data is not base64") from None


def _array(dtype: Any, shape: Any, raw: bytes | bytearray) -> Any:
    if not isinstance(dtype, str) or not _DTYPE_RE.match(dtype):
        raise ValueError(f"not an array dtype that travels: {dtype!r}")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(type(n) is int and n >= 0 for n in shape)):
        raise ValueError(f"not an array shape: {shape!r}")
    import numpy as np

    dt = np.dtype(dtype)
    if math.prod(shape) * dt.itemsize != len(raw):
        raise ValueError(f"{len(raw)} bytes are not an array of shape {shape} and dtype {dtype}")
    raw = raw if isinstance(raw, bytearray) else bytearray(raw)  # (writable, as arrays are)
    return np.frombuffer(raw, dtype=dt).reshape(shape)


class Ref:
    """A name in a node's namespace, as an argument: ``hub.apply(f, Ref("x"))`` calls ``f``
    with each node's own ``x`` (ipyparallel's ``Reference``)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"Ref needs a variable name, not {name!r}")
        self.name = name

    def __repr__(self) -> str:
        return f"Ref({self.name!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Ref, (self.name,))


# --- values too large for one message --------------------------------------------------------


def size(doc: Any) -> int:
    """About how many bytes ``doc`` (an encoded value) takes as JSON."""
    if isinstance(doc, str):
        return len(doc) + 2
    if isinstance(doc, list):
        return sum(size(v) + 1 for v in doc) + 2
    if isinstance(doc, dict):
        return sum(len(k) + 4 + size(v) for k, v in doc.items()) + 2
    return 8


Part = Callable[[], str]


def encode_parts(value: Any, chunk: int = CHUNK) -> tuple[Any, list[Part]]:
    """``encode(value)`` cut for travel: (its skeleton, its parts). Each array or bytes
    larger than ``chunk`` bytes is left out of the skeleton (its ``data`` is ``{"part":
    first, "parts": count}``), and each part is made when called: the base64 of ``chunk``
    bytes of its buffer, a view of it, so the whole is never copied nor encoded at once."""
    parts: list[Part] = []

    def cut(buf: memoryview) -> dict[str, int]:
        first = len(parts)
        for i in range(0, len(buf), chunk):
            parts.append(functools.partial(_b64_of, buf, i, chunk))
        return {"part": first, "parts": len(parts) - first}

    def walk(v: Any, depth: int = 0) -> Any:
        if depth > 64:
            raise ValueError("nested too deeply to travel")
        if _is_array(v) and v.nbytes > chunk:
            doc = _encode_array(v[:0])  # (dtype checked, no data)
            import numpy as np

            buf = memoryview(np.ascontiguousarray(v)).cast("B")  # type: ignore[arg-type]
            return {**doc, "shape": list(v.shape), "data": cut(buf)}
        if isinstance(v, (bytes, bytearray, memoryview)) and len(v) > chunk:
            return {TAG: "bytes", "data": cut(memoryview(v).cast("B"))}
        if isinstance(v, (list, tuple)):
            return [walk(x, depth + 1) for x in v]
        if isinstance(v, dict) and all(isinstance(k, str) for k in v) and TAG not in v:
            return {k: walk(x, depth + 1) for k, x in v.items()}
        return encode(v, depth)

    return walk(value), parts


def _b64_of(buf: memoryview, at: int, n: int) -> str:
    return base64.b64encode(buf[at:at + n]).decode("ascii")


def join(skeleton: Any, parts: list[bytes]) -> Any:
    """The skeleton ``encode_parts`` made, with its parts' bytes (decoded from base64, in
    order) in: a document ``decode`` takes. ValueError if they do not fit."""

    def walk(d: Any) -> Any:
        if isinstance(d, list):
            return [walk(v) for v in d]
        if not isinstance(d, dict):
            return d
        if TAG not in d:
            return {k: walk(v) for k, v in d.items()}
        ref = d.get("data")
        if not isinstance(ref, dict):
            return d  # (in the skeleton whole)
        if set(ref) != {"part", "parts"}:
            raise ValueError("a part reference is malformed")
        first, count = ref["part"], ref["parts"]
        if type(first) is not int or type(count) is not int or first < 0 or count < 0 \
                or first + count > len(parts):
            raise ValueError("a part reference points outside the parts")
        return {**d, "data": bytearray().join(parts[first:first + count])}

    return walk(skeleton)


__all__ = ["CHUNK", "TAG", "Part", "Ref", "decode", "encode", "encode_parts", "join", "size"]
