"""Encryption at rest of the block cache: sealing, opaque names, tampering, keys."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cloudfs.cache import BlockCache, BlockId
from cloudfs.crypto import KEY_ENVIRONMENT, BlockCipher, Unsealable, load_key
from cloudfs.errors import ConfigError

KEY = bytes(range(32))


def test_seal_and_open_round_trip_with_fresh_nonces() -> None:
    cipher = BlockCipher(KEY)
    payload = os.urandom(70_000)
    first, second = cipher.seal(payload, b"id"), cipher.seal(payload, b"id")
    assert first != second and payload not in first
    assert cipher.open(first, b"id") == payload


@pytest.mark.parametrize("damage", ["flip", "truncate", "identity", "key"])
def test_anything_changed_fails_authentication(damage: str) -> None:
    cipher = BlockCipher(KEY)
    sealed = bytearray(cipher.seal(b"x" * 1000, b"block 1"))
    identity, opener = b"block 1", cipher
    if damage == "flip":
        sealed[500] ^= 1
    elif damage == "truncate":
        del sealed[-1]
    elif damage == "identity":
        identity = b"block 2"  # a block moved under another name
    else:
        opener = BlockCipher(bytes(32))
    with pytest.raises(Unsealable):
        opener.open(bytes(sealed), identity)


def test_encrypted_cache_round_trip_with_opaque_names(tmp_path: Path) -> None:
    cache = BlockCache(tmp_path / "blocks", 64 << 20, 1 << 20, BlockCipher(KEY))
    block = BlockId("patients/PAT-9/a.dcm", '"etag"', 0)
    payload = os.urandom(1 << 20)
    assert cache.put(block, payload)
    assert cache.contains(block)
    assert bytes(cache.get(block) or b"") == payload
    cache.close()
    for path in (tmp_path / "blocks").rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert b"PAT-9" not in content and payload[:64] not in content
    # Another key finds nothing under its names: never another key's plaintext.
    other = BlockCache(tmp_path / "blocks", 64 << 20, 1 << 20, BlockCipher(bytes(32)))
    assert other.get(block) is None
    other.close()


def test_keys_from_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENVIRONMENT, raising=False)
    assert load_key(None) is None
    raw = tmp_path / "raw.key"
    raw.write_bytes(KEY)
    raw.chmod(0o600)
    assert load_key(raw) == KEY
    text = tmp_path / "hex.key"
    text.write_text(KEY.hex() + "\n")
    text.chmod(0o400)
    assert load_key(text) == KEY
    monkeypatch.setenv(KEY_ENVIRONMENT, KEY.hex())
    assert load_key(None) == KEY
    text.chmod(0o644)
    with pytest.raises(ConfigError, match="open to others"):
        load_key(text)
    short = tmp_path / "short.key"
    short.write_text("abcd")
    short.chmod(0o600)
    with pytest.raises(ConfigError, match="32 bytes, or 64 hexadecimal digits") as caught:
        load_key(short)
    assert "abcd" not in str(caught.value)
    monkeypatch.setenv(KEY_ENVIRONMENT, "not hex")
    with pytest.raises(ConfigError, match=KEY_ENVIRONMENT):
        load_key(None)
