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
is a new key. Such readers are a group, under an id of its own: only its first message (or its
announcement) carries the wrapped keys, the others name the group, and a reader keeps the key;
one that missed it asks its sender (odium.node.groups).

Pure: no sockets. See docs/protocol.md ("Sealed payloads").
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated

import msgspec
from nacl import bindings
from nacl.exceptions import CryptoError

from ..errors import AuthError, ProtocolError
from .encoding import unb64url
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
)

NONCE = bindings.crypto_secretbox_NONCEBYTES  # 24
KEY = bindings.crypto_secretbox_KEYBYTES  # 32
TAG_BYTES = 9  # a recipient's tag: 12 base64url characters
MAX_SHARED = 100_000  # shared keys remembered (one per peer)
GROUP_TTL = 60.0  # seconds one key serves the messages sealed to the same readers (reuse)
MAX_GROUPS = 256  # sets of readers whose key is remembered
MAX_KEPT = 4096  # senders' group keys a reader keeps

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
    every: bool = False  # for every reader: each reads it as addressed to itself, ``to`` empty


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


@dataclass
class Group:
    """A set of readers that share one key (``Keyring.seal(reuse=True)``), under an id of its
    own: once a reader keeps the key, a message to the group carries only the id."""

    key: bytes
    nonce: bytes
    records: str  # the key wrapped for each reader (base64url records)
    until: float  # monotonic: when it is made anew
    gid: str = field(default_factory=lambda: b64url(os.urandom(9)))
    readers: frozenset[str] = frozenset()
    shown: bool = False  # its records went out (in a message on PUB, or announced there)


class UnknownGroup(ProtocolError):
    """A message sealed to a group whose key this reader has not been given (yet)."""

    def __init__(self, gid: str) -> None:
        super().__init__(f"sealed to group {gid}, whose key this instance does not have")
        self.gid = gid


class Keyring:
    """One identity's shared keys with its peers (computed once per peer, then remembered),
    the groups it seals to, and the keys of its senders' groups it reads."""

    def __init__(self, ident: Identity) -> None:
        self.ident = ident
        self._sk = curve_secret_raw(ident)
        self._shared: dict[str, bytes] = {}
        # readers -> their group (see seal(reuse=True)); and the same groups by id
        self._groups: OrderedDict[tuple[str, ...], Group] = OrderedDict()
        self._by_id: dict[str, Group] = {}
        # (sender, group id) -> the group's key, or None: not one of its readers
        self._kept: OrderedDict[tuple[str, str], bytes | None] = OrderedDict()

    def shared(self, key_id: str) -> bytes:
        k = self._shared.get(key_id)
        if k is None:
            if len(self._shared) >= MAX_SHARED:
                self._shared.clear()
            k = self._shared[key_id] = bindings.crypto_box_beforenm(curve_public_raw(key_id),
                                                                    self._sk)
        return k

    def seal(self, type_: str, body: Body, recipients: Iterable[str],
             to: list[str] | None = None, reuse: bool = False,
             every_reader: bool = False) -> Sealed:
        """Seal a message body of ``type_`` for the given key ids (``to``: the names the inner
        message is addressed to, as its receivers check them; ``every_reader``: they are the
        recipients' names, one each, and are left out: each reader reads its own).

        ``reuse``: the same readers as a message sealed less than GROUP_TTL ago share its key
        (wrapped once for them all, not again for each message: a job batch that any of 1,000
        nodes may take costs 1,000 wraps otherwise); each box has a nonce of its own (``bn``).
        Other readers, a reader fewer or more, get a new key. Only the first message to a
        group (or its ``announcement``) carries the wrapped keys; the others name the group,
        and a reader that missed them asks for its key (``group_key``)."""
        if type(body) is not BODIES.get(type_):
            raise ProtocolError(f"message type {type_!r} takes {BODIES.get(type_)}, "
                                f"not {type(body)}")
        inner: dict[str, object] = {"type": type_, "body": body}
        if every_reader:
            inner["every"] = True
        elif to:
            inner["to"] = to
        if not reuse:
            key, nonce, records = self._wrap(tuple(dict.fromkeys(recipients)))
            box = bindings.crypto_secretbox(encode_json(inner), nonce, key)
            return Sealed(b64url(nonce), records, b64url(box))
        g = self._group(recipients)
        box_nonce = os.urandom(NONCE)  # a new one for each box under the group's key
        box = bindings.crypto_secretbox(encode_json(inner), box_nonce, g.key)
        records, g.shown = ("" if g.shown else g.records), True
        return Sealed(b64url(g.nonce), records, b64url(box), b64url(box_nonce), g.gid)

    def announcement(self, recipients: Iterable[str]) -> Sealed | None:
        """The wrapped keys of the group these readers make, to publish before messages that
        name it (job batches: each reaches one of them), or None if they went out already."""
        g = self._group(recipients)
        if g.shown:
            return None
        g.shown = True
        return Sealed(b64url(g.nonce), g.records, "", None, g.gid)

    def group_key(self, gid: str, reader: str) -> bytes | None:
        """The key of one of this sender's groups, for a reader of it that asks; else None."""
        g = self._by_id.get(gid)
        if g is None or reader not in g.readers or time.monotonic() > g.until:
            return None
        return g.key

    def _group(self, recipients: Iterable[str]) -> Group:
        """The group these readers make (made anew after GROUP_TTL)."""
        readers = tuple(dict.fromkeys(recipients))
        now = time.monotonic()
        g = self._groups.pop(readers, None)
        if g is None or now > g.until:
            if g is not None:
                self._by_id.pop(g.gid, None)
            key, nonce, records = self._wrap(readers)
            g = Group(key, nonce, records, now + GROUP_TTL, readers=frozenset(readers))
            self._by_id[g.gid] = g
        self._groups[readers] = g
        while len(self._groups) > MAX_GROUPS:
            self._by_id.pop(self._groups.popitem(last=False)[1].gid, None)
        return g

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

    # --- reading -----------------------------------------------------------------------------

    def keep(self, sender: str, gid: str, key: bytes | None) -> None:
        """Remember a sender's group key (None: this identity is not among its readers)."""
        kept = self._kept
        kept[(sender, gid)] = key
        kept.move_to_end((sender, gid))
        while len(kept) > MAX_KEPT:
            kept.popitem(last=False)

    def learn(self, sender: str, sealed: Sealed) -> bool:
        """Keep the key of a group its sender announced; whether this identity reads it."""
        if sealed.g is None:
            raise ProtocolError("a group's announcement names no group")
        return self._learn(sender, sealed.g, sealed) is not None

    def _learn(self, sender: str, gid: str, sealed: Sealed) -> bytes | None:
        key = self._unwrap(sender, sealed)
        self.keep(sender, gid, key)
        return key

    def open(self, sender: str, sealed: Sealed) -> bytes | None:
        """The inner bytes, or None when the message is not sealed to this identity.
        Raises UnknownGroup for a message that names a group and carries no wrapped keys,
        when this identity has not kept that group's key (nor heard it is not a reader)."""
        g = sealed.g
        if g is None:
            key = self._unwrap(sender, sealed)
        elif (sender, g) in self._kept:
            key = self._kept[(sender, g)]
        elif sealed.k:
            key = self._learn(sender, g, sealed)
        else:
            raise UnknownGroup(g)
        if key is None:
            return None
        nonce = unb64url(sealed.bn if sealed.bn is not None else sealed.n)
        try:
            return bytes(bindings.crypto_secretbox_open(unb64url(sealed.box), nonce, key))
        except CryptoError:
            raise AuthError("a sealed message does not open with the key it names") from None

    def _unwrap(self, sender: str, sealed: Sealed) -> bytes | None:
        """This identity's wrapped key among the records, unwrapped; None if none is its.

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
        try:
            return bytes(bindings.crypto_secretbox_open(wrap, nonce, s))
        except CryptoError:
            raise AuthError("a sealed message does not open with the key it names") from None


def open_inner(keyring: Keyring, msg: Message, where: str, me: str = "") -> Message | None:
    """Open a verified ``sealed`` message: the inner message (its envelope is the outer one with
    the inner type, targets and body), or None when it is not sealed to this identity.

    ``where``: the path it came on (a key of SEALED_TYPES), which bounds the inner types;
    ``me``: this reader's name, the target of a message for every reader (without it, such a
    message is addressed to nobody)."""
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
    to = ([me] if me else []) if inner.every else inner.to
    env: Envelope = msgspec.structs.replace(msg.env, type=inner.type, to=to, body=inner.body)
    return Message(env, decode_body(env))


__all__ = ["Keyring", "Sealed", "UnknownGroup", "open_inner", "SEALED_TYPES"]
