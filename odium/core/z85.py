"""Z85 (ZeroMQ RFC 32): the text form of CURVE keys, without importing zmq.

Byte for byte what ``zmq.utils.z85`` gives (tests/test_core_pure.py checks it), so a key
encoded here is the key libzmq reads. Each 4 bytes, read as one big-endian number, become
5 characters of an 85-symbol alphabet, most significant first.
"""

from __future__ import annotations

CHARS = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
_VALUE = {c: i for i, c in enumerate(CHARS)}
_POWERS = (85**4, 85**3, 85**2, 85, 1)


def encode(raw: bytes | bytearray | memoryview) -> bytes:
    """The Z85 text of ``raw``, whose length must be a multiple of 4 (ValueError if not)."""
    data = bytes(raw)
    if len(data) % 4:
        raise ValueError(f"length must be multiple of 4, not {len(data)}")
    out = bytearray()
    for i in range(0, len(data), 4):
        v = int.from_bytes(data[i : i + 4], "big")
        out += bytes(CHARS[(v // p) % 85] for p in _POWERS)
    return bytes(out)


def decode(text: str | bytes | bytearray | memoryview) -> bytes:
    """The bytes a Z85 text stands for; ValueError for a length that is not a multiple of 5,
    a character outside the alphabet, or a group over 32 bits."""
    if isinstance(text, str):
        try:
            data = text.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError("string argument should contain only ASCII characters") from None
    else:
        data = bytes(text)
    if len(data) % 5:
        raise ValueError(f"Z85 length must be multiple of 5, not {len(data)}")
    out = bytearray()
    for i in range(0, len(data), 5):
        v = 0
        for c, p in zip(data[i : i + 5], _POWERS, strict=True):
            d = _VALUE.get(c)
            if d is None:
                raise ValueError(f"not a Z85 character: {chr(c)!r}")
            v += d * p
        if v > 0xFFFFFFFF:
            raise ValueError(f"Z85 group {data[i : i + 5]!r} is over 32 bits")
        out += v.to_bytes(4, "big")
    return bytes(out)
