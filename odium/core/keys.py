"""Identities and keys: Ed25519 signing keys, their CURVE keys, join tokens (pure).

One key pair is one identity. Its public half, base64url without padding (43
characters), is the *key id* that appears in every message's ``from``; the CURVE
key pair used to encrypt the ZeroMQ links is derived from it (Ed25519 ->
X25519), so a node publishes one public key and nothing else. Key and token *files* (the home
directory) are odium.local.home's.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import time
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

from nacl import bindings
from nacl.signing import SigningKey, VerifyKey

from ..errors import AuthError, ConfigError
from .encoding import unb64url
from .wire import KEY_RE, b64url, is_key_point, new_id
from .z85 import CHARS as _Z85_CHARS
from .z85 import decode as z85_decode
from .z85 import encode as z85_encode

_KEY_RE = re.compile(KEY_RE)
TOKEN_PREFIX = "odt1."
# the names of the hub's own keys (its identity and the admin key in its home): no node may
# take them, so that a name always says whose key it is ("keys revoke admin" means no node)
RESERVED_NAMES = frozenset({"hub", "admin"})


def is_reserved_name(name: str) -> bool:
    return name.lower() in RESERVED_NAMES


@dataclass(frozen=True)
class Identity:
    """A signing key, its key id and the CURVE key pair derived from it."""

    signing: SigningKey

    @cached_property
    def key_id(self) -> str:
        return b64url(bytes(self.signing.verify_key))

    @property
    def curve_public(self) -> bytes:
        return curve_public(self.key_id)

    @cached_property
    def curve_secret(self) -> bytes:
        sk = bindings.crypto_sign_ed25519_sk_to_curve25519(
            bytes(self.signing) + bytes(self.signing.verify_key)
        )
        return z85_encode(sk)

    @property
    def seed(self) -> bytes:
        return bytes(self.signing)

    @classmethod
    def generate(cls) -> Identity:
        return cls(SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        if len(seed) != 32:
            raise ConfigError("a key seed is 32 bytes")
        return cls(SigningKey(seed))

    def sign(self, data: bytes) -> str:
        return b64url(self.signing.sign(data).signature)


def check_key_id(key_id: str) -> str:
    """The key id itself, if it is one: 43 base64url characters that spell a real Ed25519
    public key (a point on the curve). Every place a key id comes in from outside checks it
    here, so that nothing downstream (CURVE keys, the hub's key table) meets a bad one."""
    if not isinstance(key_id, str) or not _KEY_RE.match(key_id):
        raise ConfigError(f"not an Odium public key (43 base64url characters): {key_id!r}")
    if not is_key_point(key_id):
        raise ConfigError(f"not an Odium public key: {key_id!r} has the shape of one but is "
                          "not a valid Ed25519 public key (a character is wrong?); copy the key "
                          "id the node printed again (on the node: odium keys show)")
    return key_id


@lru_cache(maxsize=4096)
def verify_key(key_id: str) -> VerifyKey:
    return VerifyKey(unb64url(check_key_id(key_id)))


@lru_cache(maxsize=4096)
def curve_public(key_id: str) -> bytes:
    """The z85 CURVE public key that belongs to an Ed25519 key id."""
    pk = bindings.crypto_sign_ed25519_pk_to_curve25519(unb64url(check_key_id(key_id)))
    return z85_encode(pk)


def fingerprint(key_id: str) -> str:
    """Short, readable form of a key for humans: 4 groups of 4 hex digits.

    Taken over the CURVE public key, the only form a hub sees of a key that tries to
    connect before it is trusted, so a pending key and the node's own print agree."""
    return curve_fingerprint(curve_public(key_id))


def curve_fingerprint(curve_z85: bytes) -> str:
    h = hashlib.sha256(z85_decode(curve_z85)).hexdigest()[:16]
    return ":".join(h[i : i + 4] for i in range(0, 16, 4))


def curve_form(text: str) -> str | None:
    """The z85 CURVE key a pending key is shown by, from any form the CLI shows or a user
    pastes: ``curve:<64 hex>`` (shell-safe, what odium keys list shows), 64 hex digits, the
    40-character z85 itself, or ``(CURVE <z85>)``. None if the text is none of these."""
    t = text.strip()
    if t.startswith("(CURVE ") and t.endswith(")"):
        t = t[7:-1].strip()
    if t.startswith("curve:"):
        t = t[6:]
    if re.fullmatch(r"[0-9a-fA-F]{64}", t):
        return z85_encode(bytes.fromhex(t)).decode()
    if len(t) == 40 and all(c in _Z85 for c in t):  # (a z85 key may begin with "(" too)
        try:
            z85_decode(t.encode())
        except ValueError:
            return None
        return t
    return None


_Z85 = frozenset(_Z85_CHARS.decode())


def curve_shown(z85: str) -> str:
    """How a key known only by its CURVE key is shown: shell-safe, pasteable."""
    return "curve:" + z85_decode(z85.encode()).hex()


def join_proof_bytes(token_id: str, hub_key: str) -> bytes:
    """What a joining node signs with its own key to prove it holds it."""
    return f"odium-join\0{token_id}\0{hub_key}".encode()


def verify_proof(key_id: str, data: bytes, proof: str) -> None:
    try:
        verify_key(key_id).verify(data, unb64url(proof))
    except Exception:
        raise AuthError("proof of key possession does not verify") from None


# --- join tokens -----------------------------------------------------------------------------

TOKEN_ENV = "ODIUM_TOKEN"


def join_command(token: str, token_file: str | os.PathLike[str] | None = None,
                 name: str | None = None) -> str:
    """The command that joins a machine with a token, in a form that keeps the token off the
    node's command line (``ps`` shows every process's arguments to every local user): the
    token in ``ODIUM_TOKEN`` (readable only by the node's user), or in a 0600 file. With
    ``name`` the node takes that name; without, its host's name."""
    tail = f" --name {shlex.quote(name)}" if name else ""
    if token_file is not None:
        return f"odium node --token-file {shlex.quote(str(token_file))}{tail}"
    return f"{TOKEN_ENV}={token} odium node{tail}"


@dataclass(frozen=True)
class Token:
    """An expiring invitation: the hub's address and key, and a one-time identity. A single
    join, or, with ``launch``, up to as many as that launch starts (``odium.hub.launches``)."""

    address: str
    hub_key: str
    token_id: str
    seed: bytes
    expires: float
    launch: str = ""

    @property
    def identity(self) -> Identity:
        return Identity.from_seed(self.seed)

    def encode(self) -> str:
        doc: dict[str, Any] = {"a": self.address, "h": self.hub_key, "t": self.token_id,
                               "s": b64url(self.seed), "e": int(self.expires)}
        if self.launch:
            doc["l"] = self.launch
        return TOKEN_PREFIX + b64url(json.dumps(doc, separators=(",", ":")).encode())

    @classmethod
    def new(cls, address: str, hub_key: str, ttl: float, launch: str = "") -> Token:
        return cls(address, hub_key, new_id(), os.urandom(32), time.time() + ttl, launch)

    @classmethod
    def decode(cls, text: str) -> Token:
        text = text.strip()
        if not text.startswith(TOKEN_PREFIX):
            raise ConfigError("not an Odium join token (it starts with 'odt1.'); ask the hub for "
                              "one with: odium token")
        try:
            doc = json.loads(unb64url(text[len(TOKEN_PREFIX):]))
            tok = cls(str(doc["a"]), check_key_id(doc["h"]), str(doc["t"]),
                      unb64url(doc["s"]), float(doc["e"]), str(doc.get("l", "")))
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                f"damaged join token ({e}); copy it again from: odium token") from None
        if len(tok.seed) != 32 or not re.fullmatch(r"[0-9a-f]{32}", tok.token_id):
            raise ConfigError("damaged join token; copy it again from: odium token")
        return tok
