"""The persistent block cache: versioned keys, integrity checks, the hard cap and LRU eviction."""

from __future__ import annotations

import errno
import os
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudfs.cache import BlockCache, BlockId

BLOCK = 64 * 1024


def payload(seed: int, size: int = BLOCK) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[BlockCache]:
    opened = BlockCache(tmp_path / "blocks", 16 * 1024 * 1024, BLOCK)
    yield opened
    opened.close()


def value_files(directory: Path) -> list[Path]:
    """The files diskcache keeps large values in."""
    return sorted(directory.rglob("*.val"))


def test_put_get_roundtrip(cache: BlockCache) -> None:
    """A stored block comes back byte for byte, full-sized or short (the last block)."""
    full = BlockId("series/a.dcm", '"etag1"', 0)
    tail = BlockId("series/a.dcm", '"etag1"', 1)
    assert cache.get(full) is None
    assert not cache.contains(full)
    assert cache.put(full, payload(1))
    assert cache.put(tail, payload(2, 1234))
    got = cache.get(full)
    assert got is not None and bytes(got) == payload(1)
    got_tail = cache.get(tail)
    assert got_tail is not None and bytes(got_tail) == payload(2, 1234)
    assert cache.contains(full) and cache.contains(tail)
    assert cache.block_count() == 2
    assert cache.corrupt_blocks == 0


def test_empty_and_memoryview_payloads(cache: BlockCache) -> None:
    """Zero-length blocks and memoryview payloads are stored and verified like any other."""
    empty = BlockId("empty", '"e"', 0)
    assert cache.put(empty, b"")
    got = cache.get(empty)
    assert got is not None and bytes(got) == b""
    view = BlockId("view", '"e"', 3)
    assert cache.put(view, memoryview(payload(3)))
    got_view = cache.get(view)
    assert got_view is not None and bytes(got_view) == payload(3)


def test_other_etag_is_another_block(cache: BlockCache) -> None:
    """A changed object (new ETag) never reads the old version's block."""
    old = BlockId("a.dcm", '"v1"', 0)
    cache.put(old, payload(1))
    new = BlockId("a.dcm", '"v2"', 0)
    assert cache.get(new) is None
    assert not cache.contains(new)
    cache.put(new, payload(2))
    got_new, got_old = cache.get(new), cache.get(old)
    assert got_new is not None and bytes(got_new) == payload(2)
    assert got_old is not None and bytes(got_old) == payload(1)


def test_key_index_and_block_size_are_part_of_identity(tmp_path: Path) -> None:
    """Another key, index or block size never matches a stored block."""
    first = BlockCache(tmp_path / "blocks", 16 * 1024 * 1024, BLOCK)
    first.put(BlockId("a", '"e"', 0), payload(1))
    assert first.get(BlockId("b", '"e"', 0)) is None
    assert first.get(BlockId("a", '"e"', 1)) is None
    first.close()
    other_size = BlockCache(tmp_path / "blocks", 16 * 1024 * 1024, 2 * BLOCK)
    assert other_size.get(BlockId("a", '"e"', 0)) is None
    other_size.close()


def flip_byte(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    ["payload", "magic", "length", "checksum", "identity", "truncate", "extend"],
)
def test_corrupt_block_dropped(tmp_path: Path, damage: str) -> None:
    """A damaged value file is never returned: get() gives None, counts it and deletes it."""
    cache = BlockCache(tmp_path / "blocks", 16 * 1024 * 1024, BLOCK)
    block = BlockId("img.dcm", '"e"', 5)
    assert cache.put(block, payload(7))
    (path,) = value_files(tmp_path / "blocks")
    if damage == "payload":
        flip_byte(path, 40_000)
    elif damage == "magic":
        flip_byte(path, 0)
    elif damage == "length":
        flip_byte(path, 5)
    elif damage == "checksum":
        flip_byte(path, 10)
    elif damage == "identity":
        flip_byte(path, 20)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-100])
    else:
        path.write_bytes(path.read_bytes() + b"x")
    assert cache.get(block) is None
    assert cache.corrupt_blocks == 1
    assert not cache.contains(block)
    assert cache.get(block) is None
    assert cache.corrupt_blocks == 1  # gone, so not counted again
    # The slot is usable again.
    assert cache.put(block, payload(7))
    got = cache.get(block)
    assert got is not None and bytes(got) == payload(7)
    cache.close()


def test_block_stored_under_another_identity_is_rejected(tmp_path: Path) -> None:
    """A value moved to another block's file fails the identity check, checksum or not."""
    cache = BlockCache(tmp_path / "blocks", 16 * 1024 * 1024, BLOCK)
    a, b = BlockId("a", '"e"', 0), BlockId("b", '"e"', 0)
    cache.put(a, payload(1))
    (a_file,) = value_files(tmp_path / "blocks")
    cache.put(b, payload(2))
    (b_file,) = [path for path in value_files(tmp_path / "blocks") if path != a_file]
    b_file.write_bytes(a_file.read_bytes())
    assert cache.get(b) is None
    assert cache.corrupt_blocks == 1
    got = cache.get(a)
    assert got is not None and bytes(got) == payload(1)
    cache.close()


def test_volume_never_exceeds_cap(tmp_path: Path) -> None:
    """Inserting 12x the cap in blocks keeps the on-disk volume under the cap after every insert."""
    limit = 2 * 1024 * 1024
    cache = BlockCache(tmp_path / "blocks", limit, BLOCK)
    for index in range(400):
        assert cache.put(BlockId("big", '"e"', index), payload(index))
        assert cache.volume() <= limit, index
    assert 0 < cache.block_count() < limit // BLOCK
    # The newest block is always there.
    got = cache.get(BlockId("big", '"e"', 399))
    assert got is not None and bytes(got) == payload(399)
    cache.close()


def test_cap_holds_for_short_and_mixed_blocks(tmp_path: Path) -> None:
    """The cap holds for a mix of full and short blocks (last blocks of small objects)."""
    limit = 1024 * 1024
    cache = BlockCache(tmp_path / "blocks", limit, BLOCK)
    rng = random.Random(5)
    for index in range(300):
        size = rng.choice([BLOCK, rng.randrange(1, BLOCK), 100])
        cache.put(BlockId(f"k{index}", '"e"', 0), payload(index, size))
        assert cache.volume() <= limit, index
    cache.close()


def test_recently_read_block_survives_eviction(tmp_path: Path) -> None:
    """LRU: a block read (and its recency recorded) outlives blocks stored with it but unread."""
    limit = 4 * 1024 * 1024
    cache = BlockCache(tmp_path / "blocks", limit, BLOCK)
    fill = limit // BLOCK // 2  # well below the cap (it also holds the index): nothing evicted yet
    for index in range(fill):
        cache.put(BlockId("old", '"e"', index), payload(index))
    assert all(cache.contains(BlockId("old", '"e"', index)) for index in range(fill))
    touched = BlockId("old", '"e"', 0)
    assert cache.get(touched) is not None
    cache.record_recency()
    unread = BlockId("old", '"e"', 1)
    new = 0
    while cache.contains(unread):
        cache.put(BlockId("new", '"e"', new), payload(1000 + new))
        new += 1
        assert new < 200, "nothing was ever evicted"
    assert cache.contains(touched)
    got = cache.get(touched)
    assert got is not None and bytes(got) == payload(0)
    cache.close()


def test_record_recency_edge_cases(cache: BlockCache) -> None:
    """Recording with nothing read, or for a block deleted since it was read, is harmless."""
    cache.record_recency()
    block = BlockId("a", '"e"', 0)
    cache.put(block, payload(1))
    assert cache.get(block) is not None
    cache._store.delete(block.cache_key(BLOCK))
    cache.record_recency()
    assert not cache.contains(block)
    assert cache.put(block, payload(2))
    got = cache.get(block)
    assert got is not None and bytes(got) == payload(2)


def test_hot_block_survives_a_stream_of_inserts(tmp_path: Path) -> None:
    """Blocks read repeatedly stay cached while newer, unread blocks push older ones out."""
    limit = 2 * 1024 * 1024
    cache = BlockCache(tmp_path / "blocks", limit, BLOCK)
    hot = BlockId("hot", '"e"', 0)
    cache.put(hot, payload(0))
    for index in range(200):
        cache.put(BlockId("stream", '"e"', index), payload(index + 1))
        if index % 4 == 0:
            assert cache.get(hot) is not None, index
            cache.record_recency()
    assert cache.contains(hot)
    assert not cache.contains(BlockId("stream", '"e"', 0))
    cache.close()


def test_cache_persists_across_reopen(tmp_path: Path) -> None:
    """Blocks survive close and reopen of the directory (a remount or restart)."""
    first = BlockCache(tmp_path / "blocks", 16 * 1024 * 1024, BLOCK)
    blocks = [BlockId("a", '"e"', index) for index in range(5)]
    for index, block in enumerate(blocks):
        first.put(block, payload(index))
    first.close()
    again = BlockCache(tmp_path / "blocks", 16 * 1024 * 1024, BLOCK)
    assert again.block_count() == 5
    for index, block in enumerate(blocks):
        got = again.get(block)
        assert got is not None and bytes(got) == payload(index)
    again.close()


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
        sqlite3.OperationalError("database or disk is full"),
    ],
)
def test_failed_insert_is_reported_not_raised(
    cache: BlockCache, monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    """A full disk makes put() return False and count the failure; the caller never sees it."""

    def refuse(*args: object, **kwargs: object) -> bool:
        raise failure

    monkeypatch.setattr(cache._store, "set", refuse)
    block = BlockId("a", '"e"', 0)
    assert cache.put(block, payload(1)) is False
    assert cache.put(BlockId("a", '"e"', 1), payload(2)) is False
    assert cache.failed_inserts == 2
    assert cache.get(block) is None
    monkeypatch.undo()
    assert cache.put(block, payload(1)) is True
    assert cache.failed_inserts == 2


def test_failed_read_is_a_miss(cache: BlockCache, monkeypatch: pytest.MonkeyPatch) -> None:
    """A storage error while reading is reported as a missing block, not raised."""
    block = BlockId("a", '"e"', 0)
    cache.put(block, payload(1))

    def broken(*args: object, **kwargs: object) -> bytes:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(cache._store, "get", broken)
    assert cache.get(block) is None
    assert cache.corrupt_blocks == 0
