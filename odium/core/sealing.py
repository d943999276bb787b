"""Sealed payloads: a message body readable only by the instances it is addressed to.

A hub publishes commands on PUB and pushes job batches on PUSH, where every
connected node receives them (PUB) or any node may (PUSH round-robin). The
body of such a message is sealed: a fresh random key per message encrypts it
(XSalsa20-Poly1305, ``crypto_secretbox``), and that key is wrapped once for
each recipient with the key the sender and that recipient share (X25519 of the
sender's CURVE secret and the recipient's CURVE public key, both derived from
their Ed25519 identities; ``crypto_box_beforenm``). Each wrap is filed under a
tag only its recipient can compute, so the message names neither its type nor
its targets to anyone else: a node outside the targets learns only that
something was sent. The sender's signature covers the sealed bytes, so a
target cannot alter what the others read. A hub sealing many messages to the same readers
(job batches any of 1,000 nodes may take) uses one key for them for up to a minute, wrapped
once, each box under a nonce of its own (``Keyring.seal(reuse=True)``): a reader fewer or more
is a new key.

Pure: no sockets. See docs/protocol.md ("Sealed payloads").
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Annotated

import msgspec
from nacl import bindings
from nacl.exceptions import CryptoError

from ..errors import AuthError, ProtocolError
from .keys import Identity, check_key_id
from .wire import (
    BODIES,
    Body,
    Envelope,
    Message,
    Sealed,
    b64url,
    decode_body,
    encode_json,
    unb64url,
)

NONCE = bindings.crypto_secretbox_NONCEBYTES  # 24
KEY = bindings.crypto_secretbox_KEYBYTES  # 32
TAG_BYTES = 9  # a recipient's tag: 12 base64url characters
MAX_SHARED = 100_000  # shared keys remembered (one per peer)
GROUP_TTL = 60.0  # seconds one key serves the messages sealed to the same readers (reuse)
MAX_GROUPS = 256  # sets of readers whose key is remembered

# What may travel sealed, and where (a sealed message names its inner type only inside).
SEALED_TYPES = {"pub": ("exec", "sync"), "jobs": ("job_batch",), "query": ("reply",),
                "fetch": ("exec", "sync")}


class Inner(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """What a sealed box holds: the real message type, its targets and its body."""

    type: Annotated[str, msgspec.Meta(pattern=r"^[a-z_]{1,32}$")]
    body: msgspec.Raw
    # the names it is for: only ever asked whether a receiver's own name is among them, so
    # that a broadcast to 1,000 nodes does not check 1,000 names' form on each of them
    to: list[str] = []


_inner_decoder = msgspec.json.Decoder(Inner)


def curve_secret_raw(ident: Identity) -> bytes:
    return bindings.crypto_sign_ed25519_sk_to_curve25519(
        bytes(ident.signing) + bytes(ident.signing.verify_key))


def curve_public_raw(key_id: str) -> bytes:
    try:
        return bindings.crypto_sign_ed25519_pk_to_curve25519(unb64url(check_key_id(key_id)))
    except Exception:  # nacl raises its own errors for a point that is not on the curve
        raise AuthError(f"key {key_id[:12]}… is not a valid public key") from None


WRAP_BYTES = KEY + bindings.crypto_secretbox_MACBYTES  # 48
RECORD = TAG_BYTES + WRAP_BYTES  # one recipient in ``Sealed.k``: tag, then wrapped key
RECORD_CHARS = RECORD * 4 // 3  # 76: a record in base64url (57 bytes: no padding, aligned)
assert RECORD % 3 == 0 and TAG_BYTES % 3 == 0


def _tag(shared: bytes, nonce: bytes) -> bytes:
    return hashlib.blake2b(nonce, key=shared, digest_size=TAG_BYTES).digest()


class Keyring:
    """One identity's shared keys with its peers (computed once per peer, then remembered)."""

    def __init__(self, ident: Identity) -> None:
        self.ident = ident
        self._sk = curve_secret_raw(ident)
        self._shared: dict[str, bytes] = {}
        # readers -> (key, nonce, wrapped keys, until when it is used): see seal(reuse=True)
        self._groups: OrderedDict[tuple[str, ...], tuple[bytes, bytes, str, float]] = \
            OrderedDict()

    def shared(self, key_id: str) -> bytes:
        k = self._shared.get(key_id)
        if k is None:
            if len(self._shared) >= MAX_SHARED:
                self._shared.clear()
            k = self._shared[key_id] = bindings.crypto_box_beforenm(curve_public_raw(key_id),
                                                                    self._sk)
        return k

    def seal(self, type_: str, body: Body, recipients: Iterable[str],
             to: list[str] | None = None, reuse: bool = False) -> Sealed:
        """Seal a message body of ``type_`` for the given key ids (``to``: the names the inner
        message is addressed to, as its receivers check them).

        ``reuse``: the same readers as a message sealed less than GROUP_TTL ago share its key
        (wrapped once for them all, not again for each message: a job batch that any of 1,000
        nodes may take costs 1,000 wraps otherwise); each box has a nonce of its own (``bn``).
        Other readers, a reader fewer or more, get a new key."""
        if type(body) is not BODIES.get(type_):
            raise ProtocolError(f"message type {type_!r} takes {BODIES.get(type_)}, "
                                f"not {type(body)}")
        inner: dict[str, object] = {"type": type_, "body": body}
        if to:
            inner["to"] = to
        readers = tuple(dict.fromkeys(recipients))
        if reuse:
            key, nonce, records = self._group(readers)
            box_nonce = os.urandom(NONCE)  # a new one for each box under the group's key
        else:
            key, nonce, records = self._wrap(readers)
            box_nonce = nonce
        box = bindings.crypto_secretbox(encode_json(inner), box_nonce, key)
        return Sealed(b64url(nonce), records, b64url(box),
                      b64url(box_nonce) if reuse else None)

    def _group(self, readers: tuple[str, ...]) -> tuple[bytes, bytes, str]:
        """The key, nonce and wrapped keys these readers share (made anew after GROUP_TTL)."""
        now = time.monotonic()
        group = self._groups.pop(readers, None)
        if group is None or now > group[3]:
            group = (*self._wrap(readers), now + GROUP_TTL)
        self._groups[readers] = group
        while len(self._groups) > MAX_GROUPS:
            self._groups.popitem(last=False)
        return group[:3]

    def _wrap(self, readers: tuple[str, ...]) -> tuple[bytes, bytes, str]:
        """A new key and nonce, and the key wrapped for each reader (base64url records)."""
        key = os.urandom(KEY)
        nonce = os.urandom(NONCE)
        records: list[bytes] = []
        secretbox, shared = bindings.crypto_secretbox, self.shared
        for kid in readers:
            s = shared(kid)
            # the same nonce under a different shared key each time: each (key, nonce) is new
            records.append(_tag(s, nonce) + secretbox(key, nonce, s))
        return key, nonce, b64url(b"".join(records))

    def open(self, sender: str, sealed: Sealed) -> bytes | None:
        """The inner bytes, or None when the message is not sealed to this identity.

        A record is 57 bytes, 76 base64 characters, its tag the first 12 of them: this
        recipient's record is found in the text itself (one search, in C), and only it is
        decoded, whatever the number of recipients."""
        nonce = unb64url(sealed.n)
        k = sealed.k
        if len(k) % RECORD_CHARS:
            raise ProtocolError(f"sealed keys of {len(k)} characters are not records of "
                                f"{RECORD_CHARS}")
        s = self.shared(sender)
        tag = b64url(_tag(s, nonce))
        at = k.find(tag)
        while at >= 0 and at % RECORD_CHARS:  # (found across two records: not a tag)
            at = k.find(tag, at + 1)
        if at < 0:
            return None
        wrap = unb64url(k[at:at + RECORD_CHARS])[TAG_BYTES:]
        box_nonce = unb64url(sealed.bn) if sealed.bn is not None else nonce
        try:
            key = bindings.crypto_secretbox_open(wrap, nonce, s)
            return bytes(bindings.crypto_secretbox_open(unb64url(sealed.box), box_nonce, key))
        except CryptoError:
            raise AuthError("a sealed message does not open with the key it names") from None


def open_inner(keyring: Keyring, msg: Message, where: str) -> Message | None:
    """Open a verified ``sealed`` message: the inner message (its envelope is the outer one with
    the inner type, targets and body), or None when it is not sealed to this identity.

    ``where``: the path it came on (a key of SEALED_TYPES), which bounds the inner types."""
    if msg.type != "sealed":
        raise ProtocolError(f"expected a sealed message, got {msg.type!r}")
    data = keyring.open(msg.env.from_, msg.body)  # type: ignore[arg-type]
    if data is None:
        return None
    try:
        inner = _inner_decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        raise ProtocolError(f"bad sealed content: {e}") from None
    if inner.type not in SEALED_TYPES[where]:
        raise ProtocolError(f"message type {inner.type!r} may not come sealed on {where}")
    env: Envelope = msgspec.structs.replace(msg.env, type=inner.type, to=inner.to,
                                            body=inner.body)
    return Message(env, decode_body(env))


__all__ = ["Keyring", "Sealed", "open_inner", "SEALED_TYPES"]
