"""Encodings the wire uses that need none of its vocabulary: canonical JSON, base64url, key
points, and the id of a message that failed to open. Pure; re-exported by ``odium.core.wire``."""

import base64
import binascii
import hashlib
import re
import secrets
from typing import Any

import msgspec
from nacl import bindings as _sodium

from ..errors import ProtocolError
from .guards import too_deep

SIG_LEN = 86  # base64url of a 64-byte signature, no padding
SIG_HEAD = b',"sig":"'
SUFFIX_LEN = len(SIG_HEAD) + SIG_LEN + 2  # ... ,"sig":"<86>"}
_canonical = msgspec.json.Encoder(order="sorted")


def encode_json(obj: Any) -> bytes:
    """The canonical JSON of ``obj``: sorted keys, no spaces, ASCII (what is signed)."""
    return _canonical.encode(obj)


def digest(obj: Any) -> str:
    """A short digest of the canonical JSON of ``obj`` (e.g. the authorities over a hub)."""
    return hashlib.blake2b(_canonical.encode(obj), digest_size=16).hexdigest()


def to_builtins(obj: Any) -> Any:
    return msgspec.to_builtins(obj)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str | bytes) -> bytes:
    if isinstance(text, str):
        text = text.encode("ascii")
    try:
        return base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as e:
        raise ProtocolError(f"not base64url: {e}") from None


def is_key_point(key_id: str) -> bool:
    """Whether a key id (already of the right shape) is a real Ed25519 public key: a valid
    point of the prime-order group, which is what every honest key is (and what the CURVE key
    is derived from; anything else makes libsodium fail later, far from the input)."""
    try:
        raw = base64.urlsafe_b64decode(key_id + "=")
    except (binascii.Error, ValueError):
        return False
    return (len(raw) == 32 and b64url(raw) == key_id  # one spelling per key
            and bool(_sodium.crypto_core_ed25519_is_valid_point(raw)))


def peek_id(data: bytes) -> str | None:
    """Best-effort message id of a message that failed to open (to address an error reply)."""
    head = data[: -SUFFIX_LEN] + b"}" if data.endswith(b'"}') else data
    if too_deep(head):  # not parsed: the last "id" (keys are sorted: the envelope's comes
        ids = _ID_MEMBER.findall(head)  # after the body's, and nothing after it nests)
        return ids[-1].decode() if ids else None
    try:
        env = msgspec.json.decode(head)
        mid = env.get("id") if isinstance(env, dict) else None
        return mid if isinstance(mid, str) and len(mid) == 32 else None
    except Exception:
        return None


_ID_MEMBER = re.compile(rb'"id":"([0-9a-f]{32})"')
_FROM_HEAD, _ID_HEAD = b'"from":"', b'","id":"'


def peek_from(data: bytes) -> str | None:
    """Who a message says it is from, before it is verified (to choose the key that verifies
    it). The envelope's keys are sorted: ``from`` comes right before ``id``, after ``body``,
    and nothing after it holds an object, so the last ``","id":"`` is the envelope's."""
    i = data.rfind(_ID_HEAD)
    if i < 51 or data[i - 51:i - 43] != _FROM_HEAD:
        return None
    return data[i - 43:i].decode("ascii", "replace")


def peek_type(data: bytes) -> str | None:
    """A message's type before it is opened: the envelope's ``type`` is its last but one
    member (only ``v`` and the signature follow it)."""
    i = data.rfind(b'"type":"')
    j = data.find(b'"', i + 8) if i >= 0 else -1
    return data[i + 8:j].decode("ascii", "replace") if 0 <= j - i - 8 <= 32 else None


def split_signature(data: bytes, max_size: int) -> tuple[bytes, bytes]:
    """Check size and shape; return (signed bytes, signature). Parses nothing."""
    if len(data) > max_size:
        raise ProtocolError(f"message of {len(data)} bytes is over the limit of {max_size}")
    if len(data) < SUFFIX_LEN + 2 or not data.endswith(b'"}'):
        raise ProtocolError("not a signed Odium message (no trailing signature)")
    if data[-SUFFIX_LEN : -SUFFIX_LEN + len(SIG_HEAD)] != SIG_HEAD:
        raise ProtocolError("not a signed Odium message (signature is not the last member)")
    sig = unb64url(data[-SIG_LEN - 2 : -2])
    if len(sig) != 64:
        raise ProtocolError("signature is not 64 bytes")
    return data[:-SUFFIX_LEN] + b"}", sig


def new_id() -> str:
    """A message's (or command's, or token's) id: 32 random hex digits."""
    return secrets.token_hex(16)
