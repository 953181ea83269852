"""Encryption at rest: AES-256-GCM under a key the operator keeps, and under keys derived from
it for each other use (staged writes, the catalog).

For the block cache: each block is sealed with a fresh random 96-bit nonce and the block's
identity (object key, ETag, block number) as associated data, so a block moved to another name,
altered or truncated fails authentication and is fetched again instead of being returned.  Cache
entry names are an HMAC of the identity, so object keys (paths that often carry patient IDs) do
not appear in the cache's index either.

The key: 32 bytes, from a file only its owner may read (raw, or 64 hex digits) or from the
environment variable ``CLOUDFS_CACHE_KEY`` (64 hex digits), so it can come from a secret store
without touching the disk.  It never appears in logs, status output or error messages.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .configfile import check_private
from .errors import ConfigError

KEY_ENVIRONMENT = "CLOUDFS_CACHE_KEY"
_NONCE = 12
OVERHEAD = _NONCE + 16
"""Bytes a sealed block carries beyond its payload: the nonce and the GCM tag."""


class Unsealable(Exception):
    """A sealed block failed authentication: altered, truncated, or sealed under another key."""


def _parse_key(text: bytes, where: str) -> bytes:
    stripped = text.strip()
    if len(text) == 32:
        return text
    try:
        key = bytes.fromhex(stripped.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != 32:
        raise ConfigError(f"{where}: a cache key is 32 bytes, or 64 hexadecimal digits")
    return key


def load_key(path: Path | None) -> bytes | None:
    """The cache key from ``path`` or the environment; None when neither gives one."""
    if path is not None:
        check_private(path, "cache key file")
        try:
            return _parse_key(path.read_bytes(), str(path))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the cache key: {exc.strerror}") from None
    text = os.environ.get(KEY_ENVIRONMENT)
    if text:
        return _parse_key(text.encode(), f"${KEY_ENVIRONMENT}")
    return None


def derive_key(key: bytes, purpose: str, salt: bytes | None = None) -> bytes:
    """A 32-byte key for one use (``purpose``, optionally one ``salt``) derived from the
    operator's key with HKDF-SHA256, so the block cache, the staging area and the catalog never
    share a key, and a leak of one derived key reveals neither the others nor the original."""
    derivation = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=purpose.encode())
    return derivation.derive(key)


class BlockCipher:
    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._naming = hmac.new(key, b"cloudfs cache entry names", hashlib.sha256).digest()

    def name(self, identity: str) -> str:
        """The opaque cache entry name of a block identity."""
        encoded = identity.encode("utf-8", "surrogatepass")
        return hmac.new(self._naming, encoded, hashlib.sha256).hexdigest()

    def seal(self, payload: bytes | memoryview, identity: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, bytes(payload), identity)

    def open(self, sealed: bytes | memoryview, identity: bytes) -> bytes:
        if len(sealed) < OVERHEAD:
            raise Unsealable("too short")
        sealed = memoryview(sealed)
        try:
            return self._aead.decrypt(bytes(sealed[:_NONCE]), bytes(sealed[_NONCE:]), identity)
        except InvalidTag:
            raise Unsealable("authentication failed") from None
