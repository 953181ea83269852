"""The persistent block cache: versioned keys, integrity checks, the hard cap and LRU eviction."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import resource
import sqlite3
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers_unit import value_files

from cloudfs import cache as cache_module
from cloudfs.cache import BlockCache, BlockId
from cloudfs.crypto import BlockCipher
from cloudfs.mount import raise_open_file_limit

BLOCK = 64 * 1024


def payload(seed: int, size: int = BLOCK) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[BlockCache]:
    opened = BlockCache(tmp_path / "blocks", 16 * 1024 * 1024, BLOCK)
    yield opened
    opened.close()


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
    """A value file damaged at rest is never returned: get() after a restart gives None,
    counts it and deletes it.  (While running, the cache holds the checks of the blocks it
    stored or read, and a damaged payload fails them: see the next test.)"""
    cache = BlockCache(tmp_path / "blocks", 16 * 1024 * 1024, BLOCK)
    block = BlockId("img.dcm", '"e"', 5)
    assert cache.put(block, payload(7))
    cache.close()
    cache = BlockCache(tmp_path / "blocks", 16 * 1024 * 1024, BLOCK)
    (path,) = value_files(tmp_path / "blocks")
    if damage == "payload":
        flip_byte(path, 40_000)
    elif damage == "magic":
        flip_byte(path, 0)
    elif damage == "length":
        flip_byte(path, 5)
    elif damage == "checksum":
        flip_byte(path, cache_module._HEADER.size + 2)
    elif damage == "identity":
        flip_byte(path, 12)
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


PIECE = cache_module.PIECE


@pytest.mark.parametrize("sealed", [False, True])
def test_partial_reads_match_the_payload(tmp_path: Path, sealed: bool) -> None:
    """Any span of a multi-piece block, full-sized or short, reads back byte for byte, whole or
    in part, plain or encrypted."""
    cipher = BlockCipher(bytes(range(32))) if sealed else None
    cache = BlockCache(tmp_path / "blocks", 64 * 1024 * 1024, 8 * PIECE, cipher)
    rng = random.Random(5)
    for number, length in enumerate([8 * PIECE, 3 * PIECE + 17, PIECE, 1, 0]):
        block, data = BlockId("ct/1.dcm", '"e"', number), payload(number, length)
        assert cache.put(block, data)
        whole = cache.get(block)
        assert whole is not None and bytes(whole) == data
        spans = [(0, length), (0, 1), (length - 1, length)] + [
            sorted(rng.sample(range(length + 1), 2)) for _ in range(20) if length > 1
        ]
        for start, end in spans:
            if 0 <= start < end <= length:
                got = cache.get_range(block, start, end, length)
                assert got is not None and bytes(got) == data[start:end], (length, start, end)
    assert cache.corrupt_blocks == 0
    cache.close()


def test_partial_read_checks_only_its_pieces_and_drops_a_damaged_block(tmp_path: Path) -> None:
    """A damaged piece is caught by any read that covers it (the block is then dropped); reads of
    the other pieces alone still get the right bytes."""
    cache = BlockCache(tmp_path / "blocks", 64 * 1024 * 1024, 4 * PIECE)
    block, data = BlockId("a", '"e"', 0), payload(1, 4 * PIECE)
    cache.put(block, data)
    (path,) = value_files(tmp_path / "blocks")
    payload_at = cache_module._HEADER.size + 4 * cache_module._CHECK.size
    flip_byte(path, payload_at + 2 * PIECE + 100)  # inside piece 2
    got = cache.get_range(block, 10, PIECE + 10, len(data))
    assert got is not None and bytes(got) == data[10 : PIECE + 10]
    assert cache.get_range(block, PIECE, 3 * PIECE, len(data)) is None
    assert cache.corrupt_blocks == 1 and not cache.contains(block)
    cache.close()


def test_pieces_swapped_within_a_block_are_rejected(tmp_path: Path) -> None:
    """A piece stored at another piece's place fails its check (the seed names its place)."""
    cache = BlockCache(tmp_path / "blocks", 64 * 1024 * 1024, 2 * PIECE)
    block, data = BlockId("a", '"e"', 0), payload(1, 2 * PIECE)
    cache.put(block, data)
    (path,) = value_files(tmp_path / "blocks")
    stored = path.read_bytes()
    payload_at = cache_module._HEADER.size + 2 * cache_module._CHECK.size
    first, second = stored[payload_at : payload_at + PIECE], stored[payload_at + PIECE :]
    path.write_bytes(stored[:payload_at] + second + first)
    assert cache.get_range(block, 0, 100, len(data)) is None
    assert cache.corrupt_blocks == 1
    cache.close()


def test_cache_of_an_older_layout_is_emptied(tmp_path: Path) -> None:
    """Opening a cache directory written in another block layout empties it once, so no block
    is ever read in the wrong layout; a cache of this layout is kept."""
    cache = BlockCache(tmp_path / "blocks", 16 * 1024 * 1024, BLOCK)
    cache.put(BlockId("a", '"e"', 0), payload(1))
    cache.close()
    kept = BlockCache(tmp_path / "blocks", 16 * 1024 * 1024, BLOCK)
    assert kept.block_count() == 1
    kept.close()
    (tmp_path / "blocks" / cache_module._FORMAT_FILE).unlink()  # as an older version left it
    emptied = BlockCache(tmp_path / "blocks", 16 * 1024 * 1024, BLOCK)
    assert emptied.block_count() == 0 and not value_files(tmp_path / "blocks")
    assert emptied.get(BlockId("a", '"e"', 0)) is None
    emptied.close()


def test_a_layout_marker_that_cannot_be_written_does_not_stop_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache disk too full to take the layout marker still opens (and works); the marker is
    written on a later open."""

    def full(self: Path, *args: object, **kwargs: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    cache = BlockCache(tmp_path / "blocks", 16 * 1024 * 1024, BLOCK)
    assert cache.put(BlockId("a", '"e"', 0), payload(1))
    cache.close()
    monkeypatch.undo()
    assert not (tmp_path / "blocks" / cache_module._FORMAT_FILE).exists()
    BlockCache(tmp_path / "blocks", 16 * 1024 * 1024, BLOCK).close()
    assert (tmp_path / "blocks" / cache_module._FORMAT_FILE).read_text().strip() == "3"


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


def test_block_files_churn_no_directories(tmp_path: Path) -> None:
    """Block files sit one directory level deep, in at most 256 directories that eviction
    leaves in place: a stream of inserts past the cap makes no directory per block."""
    directory = tmp_path / "blocks"
    cache = BlockCache(directory, 2 * 1024 * 1024, BLOCK)
    made: set[Path] = set()
    for index in range(600):
        assert cache.put(BlockId("big", '"e"', index), payload(index))
        made.update(path.parent for path in value_files(directory))
    shown = {path for path in directory.iterdir() if path.is_dir()}
    cache.close()
    assert all(folder.parent == directory for folder in made)
    assert made <= shown, "a directory went away when its last block was evicted"
    assert len(shown) <= 256


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


def test_failed_read_is_a_miss(
    cache: BlockCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A storage error while reading is reported as a missing block, not raised."""
    block = BlockId("a", '"e"', 0)
    cache.put(block, payload(1))

    def broken(*args: object, **kwargs: object) -> bytes:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(cache, "_indexed_path", broken)
    cache._files.forget_all()  # the read asks the index
    assert cache.get(block) is None
    assert cache.corrupt_blocks == 0
    cache.put(block, payload(1))
    name, _ = cache._identity(block)
    (path,) = value_files(tmp_path / "blocks")
    cache._files.forget_all()
    cache._files.remember(name, str(path))  # remembered, not open: the read opens the file
    with monkeypatch.context() as patch:
        patch.setattr(cache_module.os, "open", broken)
        assert cache.get(block) is None
    assert cache.corrupt_blocks == 0


def count_index_reads(cache: BlockCache, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names the cache looks up in its index from now on."""
    names: list[str] = []
    real_lookup = cache._indexed_path

    def counted(name: str) -> str | None:
        names.append(name)
        return real_lookup(name)

    monkeypatch.setattr(cache, "_indexed_path", counted)
    return names


def test_block_files_are_opened_without_the_index_while_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks stored or read lately are opened from their remembered paths, without a query of
    the index; an evicted block's path finds nothing and the read asks the index, which has
    nothing either (never old bytes); after a reopen, the index is asked once per block, by the
    read or by ``contains`` before it."""
    limit = 2 * 1024 * 1024
    directory = tmp_path / "blocks"
    cache = BlockCache(directory, limit, BLOCK)
    index_reads = count_index_reads(cache, monkeypatch)
    first = BlockId("a", '"e"', 0)
    assert cache.put(first, payload(1))
    for _ in range(2):
        got = cache.get(first)
        assert got is not None and bytes(got) == payload(1)
    assert cache.get_range(first, 10, 20, BLOCK) is not None
    assert index_reads == []
    for index in range(1, 100):  # past the cap: the first block is evicted
        assert cache.put(BlockId("a", '"e"', index), payload(index + 1))
    assert cache.get(first) is None
    assert len(index_reads) == 1
    assert not cache.contains(first)
    # Stored again, under a new file: the new one is read, without asking the index.
    assert cache.put(first, payload(2))
    got = cache.get(first)
    assert got is not None and bytes(got) == payload(2)
    assert len(index_reads) == 2  # the read above and contains, nothing since
    cache.close()

    reopened = BlockCache(directory, limit, BLOCK)
    index_reads = count_index_reads(reopened, monkeypatch)
    last = BlockId("a", '"e"', 99)
    for _ in range(3):
        got = reopened.get(last)
        assert got is not None and bytes(got) == payload(100)
    assert len(index_reads) == 1
    # Read-ahead's question, whether a block is stored, finds its file too: the read that
    # follows it does not ask the index again.
    assert reopened.contains(first)
    got = reopened.get(first)
    assert got is not None and bytes(got) == payload(2)
    assert len(index_reads) == 2  # asked by contains, not again by the read
    assert not reopened.contains(BlockId("a", '"e"', 1))  # evicted long ago
    reopened.close()


def block_files_open(directory: Path) -> list[str]:
    """The block files under ``directory`` this process holds open (deleted ones end in
    " (deleted)")."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(directory)) and ".val" in target:
                held.append(target)
    return held


def deleted_files_held_open(directory: Path) -> list[str]:
    return [path for path in block_files_open(directory) if path.endswith(" (deleted)")]


def test_block_files_read_stay_open_until_evicted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A block file read once stays open with its checks in memory, so a later read of part of
    it is a single ``pread``: no open, no read of the checks.  Evicted, its descriptor is
    closed, so the space goes back to the disk at once and the cap holds."""
    directory = tmp_path / "blocks"
    cache = BlockCache(directory, 16 * 1024 * 1024, 4 * PIECE)
    block, data = BlockId("a", '"e"', 0), payload(1, 4 * PIECE)
    assert cache.put(block, data)
    whole = cache.get(block)
    assert whole is not None and bytes(whole) == data
    calls: list[str] = []
    real_open, real_pread = os.open, os.pread
    with monkeypatch.context() as patch:
        patch.setattr(
            cache_module.os, "open", lambda *a, **k: calls.append("open") or real_open(*a, **k)
        )
        patch.setattr(cache_module.os, "pread", lambda *a: calls.append("pread") or real_pread(*a))
        part = cache.get_range(block, PIECE + 5, 2 * PIECE + 5, len(data))
    assert part is not None and bytes(part) == data[PIECE + 5 : 2 * PIECE + 5]
    assert calls == ["pread"]
    assert block_files_open(directory) and not deleted_files_held_open(directory)
    for index in range(1, 80):  # past the cap: the first block is evicted
        stored, data = BlockId("a", '"e"', index), payload(index + 1, 4 * PIECE)
        assert cache.put(stored, data)
        part = cache.get_range(stored, 0, 10, len(data))  # each one held open
        assert part is not None and bytes(part) == data[:10]
        assert cache.volume() <= cache.size_limit
        assert not deleted_files_held_open(directory), index
    assert cache.get(block) is None
    cache.close()


@pytest.fixture
def disk_directory() -> Iterator[Path]:
    """A directory on a disk file system (not tmpfs, whose pages cannot leave memory)."""
    with tempfile.TemporaryDirectory(dir="/var/tmp") as made:
        yield Path(made)


def evict_from_page_cache(directory: Path) -> None:
    for path in directory.rglob("*.val"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def test_in_memory_reads_never_wait_for_the_disk(disk_directory: Path) -> None:
    """``get_range_in_memory``, called on the event loop, serves a block file already open
    (stored or read by this process) whose bytes are in the page cache, and answers None at
    once (never waiting for the disk) when the file is not open yet or its bytes have left
    memory; ``get_range`` in a thread serves the block in every case."""
    directory = disk_directory / "blocks"
    cache = BlockCache(directory, 16 * 1024 * 1024, 4 * PIECE)
    block, data = BlockId("a", '"e"', 0), payload(1, 4 * PIECE)
    wanted = data[PIECE + 5 : 2 * PIECE + 5]
    assert cache.put(block, data)
    part = cache.get_range_in_memory(block, PIECE + 5, 2 * PIECE + 5, len(data))
    assert part is not None and bytes(part) == wanted
    cache.close()
    cache = BlockCache(directory, 16 * 1024 * 1024, 4 * PIECE)  # a restart: nothing open
    assert cache.get_range_in_memory(block, PIECE + 5, 2 * PIECE + 5, len(data)) is None
    part = cache.get_range(block, PIECE + 5, 2 * PIECE + 5, len(data))  # opens the file
    assert part is not None and bytes(part) == wanted
    part = cache.get_range_in_memory(block, PIECE + 5, 2 * PIECE + 5, len(data))
    assert part is not None and bytes(part) == wanted
    evict_from_page_cache(directory)
    assert cache.get_range_in_memory(block, PIECE + 5, 2 * PIECE + 5, len(data)) is None
    part = cache.get_range(block, PIECE + 5, 2 * PIECE + 5, len(data))  # reads the disk
    assert part is not None and bytes(part) == wanted
    part = cache.get_range_in_memory(block, PIECE + 5, 2 * PIECE + 5, len(data))
    assert part is not None and bytes(part) == wanted
    assert cache.corrupt_blocks == 0
    cache.close()


def test_in_memory_read_of_a_damaged_block_leaves_it_to_the_thread(
    cache: BlockCache, tmp_path: Path
) -> None:
    """Damage found by an in-memory read is not dealt with on the event loop (dropping a block
    writes to SQLite): the read answers None, and the read in a thread that follows drops the
    block; wrong bytes are never returned."""
    block, data = BlockId("a", '"e"', 0), payload(1)
    assert cache.put(block, data)
    assert cache.get_range(block, 0, 10, len(data)) is not None  # open, checks in memory
    (path,) = value_files(tmp_path / "blocks")
    with open(path, "r+b") as stored:
        stored.seek(-100, os.SEEK_END)
        stored.write(b"\0" * 10)
    assert cache.get_range_in_memory(block, len(data) - 200, len(data), len(data)) is None
    assert cache.contains(block) and cache.corrupt_blocks == 0
    assert cache.get_range(block, len(data) - 200, len(data), len(data)) is None
    assert not cache.contains(block) and cache.corrupt_blocks == 1


def test_in_memory_reads_stop_where_the_file_system_refuses_them(
    cache: BlockCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system without ``RWF_NOWAIT`` reads refuses the first one; from then on every
    read goes to a thread without trying again."""
    block, data = BlockId("a", '"e"', 0), payload(1)
    assert cache.put(block, data)
    assert cache.get_range(block, 0, 10, len(data)) is not None
    calls: list[int] = []

    def refuse(*args: object) -> int:
        calls.append(1)
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(cache_module.os, "preadv", refuse)
    assert cache.get_range_in_memory(block, 0, 10, len(data)) is None
    assert cache.get_range_in_memory(block, 0, 10, len(data)) is None
    assert calls == [1]
    part = cache.get_range(block, 0, 10, len(data))
    assert part is not None and bytes(part) == data[:10]


def test_files_held_open_follow_the_open_file_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache keeps at most a quarter of the open-file limit open, however many blocks are
    read, and reads every block right beyond that."""
    monkeypatch.setattr(cache_module.resource, "getrlimit", lambda _: (128, 128))
    cache = BlockCache(tmp_path / "blocks", 64 * 1024 * 1024, BLOCK)
    blocks = [BlockId("a", '"e"', index) for index in range(100)]
    for index, block in enumerate(blocks):
        assert cache.put(block, payload(index))
        assert cache.get(block) is not None
    assert 0 < len(block_files_open(tmp_path / "blocks")) <= 32
    for index, block in enumerate(blocks):
        got = cache.get(block)
        assert got is not None and bytes(got) == payload(index)
    cache.close()
    assert not block_files_open(tmp_path / "blocks")


def test_daemon_raises_its_open_file_limit() -> None:
    """The daemon lifts its soft open-file limit to the hard one before the cache opens, so the
    cache may keep up to ``REMEMBERED_FILES`` block files open, not the 256 of a limit of
    1,024, and grows its descriptor table for them at once."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
        assert cache_module._held_files() == min(256, hard // 4)
        raise_open_file_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
        assert cache_module._held_files() == min(cache_module.REMEMBERED_FILES, hard // 4)
        # The descriptor table is grown once now, not a doubling at a time during reads.
        status = Path("/proc/self/status").read_text()
        (table,) = [
            int(line.split()[1]) for line in status.splitlines() if line.startswith("FDSize:")
        ]
        assert table >= min(2 * cache_module.REMEMBERED_FILES, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# Pinning: pinned blocks outlive unpinned ones, across re-puts, recency updates and reopening.

PIN_LIMIT = 2 * 1024 * 1024


def stream(cache: BlockCache, count: int, first_seed: int = 10_000) -> None:
    """Insert ``count`` unpinned blocks, checking the cap after each one."""
    for index in range(count):
        assert cache.put(BlockId("stream", '"e"', first_seed + index), payload(first_seed + index))
        assert cache.volume() <= cache.size_limit, index


def pressure(cache: BlockCache) -> None:
    """Three times the cache's size in new, unpinned blocks."""
    stream(cache, 3 * cache.size_limit // BLOCK)


def blocks_of(key: str, count: int) -> list[BlockId]:
    return [BlockId(key, '"e"', index) for index in range(count)]


def intact(cache: BlockCache, block: BlockId, seed: int) -> bool:
    got = cache.get(block)
    return got is not None and bytes(got) == payload(seed)


@pytest.fixture
def small(tmp_path: Path) -> Iterator[BlockCache]:
    opened = BlockCache(tmp_path / "blocks", PIN_LIMIT, BLOCK)
    yield opened
    opened.close()


def test_pinned_blocks_survive_pressure(small: BlockCache) -> None:
    """Pinned blocks outlive three cache sizes of inserts; unpinned blocks stored with them go."""
    pinned, old = blocks_of("keep", 4), blocks_of("old", 4)
    for index, block in enumerate(pinned + old):
        assert small.put(block, payload(index))
    assert small.pin(pinned) == 4
    assert all(small.is_pinned(block) for block in pinned)
    assert not any(small.is_pinned(block) for block in old)
    pressure(small)
    assert all(intact(small, block, index) for index, block in enumerate(pinned))
    assert not any(small.contains(block) for block in old)


def test_block_stored_for_pinned_key_is_pinned_at_insert(small: BlockCache) -> None:
    """After pin_keys, a block stored for one of the keys is pinned by the insert itself."""
    small.pin_keys({"keep"})
    kept, other = BlockId("keep", '"e"', 0), BlockId("other", '"e"', 0)
    assert small.put(kept, payload(1))
    assert small.put(other, payload(2))
    assert small.is_pinned(kept)
    assert not small.is_pinned(other)
    pressure(small)
    assert intact(small, kept, 1)
    assert not small.contains(other)
    # A new set replaces the old one: later blocks of the key are not pinned, earlier ones stay.
    small.pin_keys(set())
    later = BlockId("keep", '"e"', 1)
    assert small.put(later, payload(3))
    assert not small.is_pinned(later)
    assert small.is_pinned(kept)


def test_re_put_keeps_pin(small: BlockCache) -> None:
    """Storing a pinned block again (diskcache resets its store time) leaves it pinned."""
    explicit, by_key = BlockId("a", '"e"', 0), BlockId("b", '"e"', 0)
    assert small.put(explicit, payload(1))
    assert small.pin([explicit]) == 1
    assert small.put(explicit, payload(1))
    assert small.is_pinned(explicit)
    # An unpinned block stored again once its key is pinned becomes pinned.
    assert small.put(by_key, payload(2))
    assert not small.is_pinned(by_key)
    small.pin_keys({"b"})
    assert small.put(by_key, payload(2))
    assert small.is_pinned(by_key)
    assert small.put(by_key, payload(2))
    assert small.is_pinned(by_key)
    pressure(small)
    assert intact(small, explicit, 1) and intact(small, by_key, 2)
    assert small.block_count() < small.size_limit // BLOCK


def test_record_recency_leaves_pins(small: BlockCache) -> None:
    """Reading pinned blocks and recording their recency does not unpin them."""
    pinned = blocks_of("keep", 3)
    for index, block in enumerate(pinned):
        small.put(block, payload(index))
    assert small.pin(pinned) == 3
    for block in pinned:
        assert small.get(block) is not None
    small.record_recency()
    assert all(small.is_pinned(block) for block in pinned)
    pressure(small)
    assert all(intact(small, block, index) for index, block in enumerate(pinned))


def test_unpin_makes_blocks_evictable(small: BlockCache) -> None:
    """Unpinned blocks are ordinary again: they go under pressure."""
    pinned = blocks_of("keep", 4)
    for index, block in enumerate(pinned):
        small.put(block, payload(index))
    small.pin_keys({"keep"})  # the key set only governs inserts, not unpin
    assert small.pin(pinned) == 4
    assert small.unpin(pinned[:3]) == 3
    assert not any(small.is_pinned(block) for block in pinned[:3])
    assert small.is_pinned(pinned[3])
    pressure(small)
    assert not any(small.contains(block) for block in pinned[:3])
    assert intact(small, pinned[3], 3)


def test_pins_survive_reopen(tmp_path: Path) -> None:
    """Pins are stored with the blocks: a reopened cache still keeps them under pressure."""
    first = BlockCache(tmp_path / "blocks", PIN_LIMIT, BLOCK)
    pinned = blocks_of("keep", 3)
    for index, block in enumerate(pinned):
        first.put(block, payload(index))
    first.put(BlockId("other", '"e"', 0), payload(9))
    first.pin(pinned)
    volume = first.pinned_volume()
    first.close()
    again = BlockCache(tmp_path / "blocks", PIN_LIMIT, BLOCK)
    assert all(again.is_pinned(block) for block in pinned)
    assert again.pinned_volume() == volume
    # The insert pinning works in the reopened cache too.
    again.pin_keys({"new"})
    fresh = BlockId("new", '"e"', 0)
    again.put(fresh, payload(5))
    pressure(again)
    assert all(intact(again, block, index) for index, block in enumerate(pinned))
    assert intact(again, fresh, 5)
    assert not again.contains(BlockId("other", '"e"', 0))
    again.close()


def test_pinned_volume(small: BlockCache) -> None:
    """pinned_volume counts the stored size (header included) of pinned blocks only."""
    assert small.pinned_volume() == 0
    sizes = [BLOCK, 1234, 0]
    pinned = blocks_of("keep", len(sizes))
    for index, (block, size) in enumerate(zip(pinned, sizes, strict=True)):
        small.put(block, payload(index, size))
    small.put(BlockId("other", '"e"', 0), payload(7))
    small.pin(pinned)
    stored = [cache_module.stored_length(size, sealed=False) for size in sizes]
    assert small.pinned_volume() == sum(stored)
    small.unpin(pinned[:1])
    assert small.pinned_volume() == sum(stored[1:])


def test_cap_holds_with_pins(small: BlockCache) -> None:
    """Pins never break the cap, even when pinned blocks alone would overfill the cache: then
    the oldest pins go first."""
    small.pin_keys({"keep"})
    for index in range(8):
        assert small.put(BlockId("keep", '"e"', index), payload(index))
    stream(small, 3 * small.size_limit // BLOCK)
    assert small.pinned_volume() == 8 * cache_module.stored_length(BLOCK, sealed=False)
    # Everything pinned: the cache still evicts, the earliest pins first.
    small.pin_keys({"all"})
    everything = blocks_of("all", 3 * small.size_limit // BLOCK)
    for index, block in enumerate(everything):
        assert small.put(block, payload(index))
        assert small.volume() <= small.size_limit, index
    assert not small.contains(everything[0])
    assert intact(small, everything[-1], len(everything) - 1)
    assert small.pinned_volume() <= small.size_limit


def test_pin_and_unpin_count_only_present_blocks(small: BlockCache) -> None:
    """Absent blocks are ignored, duplicates counted once, already pinned blocks still found."""
    present, absent = BlockId("a", '"e"', 0), BlockId("a", '"e"', 1)
    small.put(present, payload(1))
    assert small.pin([]) == 0
    assert small.pin([absent]) == 0
    assert small.pin([present, absent, present]) == 1
    assert small.pin(iter([present])) == 1
    assert small.is_pinned(present)
    assert not small.is_pinned(absent)
    assert not small.contains(absent)
    assert small.unpin([absent]) == 0
    assert small.unpin([present, absent]) == 1
    assert not small.is_pinned(present)
    assert small.unpin([present]) == 1


def test_large_pin_is_split_into_transactions(
    small: BlockCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pin of more rows than one transaction takes pins them all."""
    blocks = [BlockId(f"k{index}", '"e"', 0) for index in range(20)]
    for index, block in enumerate(blocks):
        small.put(block, payload(index, 100))
    monkeypatch.setattr(small, "_rows_per_transaction", 3)
    assert small.pin(blocks + [BlockId("absent", '"e"', 0)]) == 20
    assert all(small.is_pinned(block) for block in blocks)
    assert small.unpin(blocks) == 20
    assert small.pinned_volume() == 0


def test_pinning_from_many_threads(small: BlockCache) -> None:
    """Pins, unpins, inserts and recency updates from parallel threads keep the cap and the pins."""
    small.pin_keys({"keep"})
    kept = blocks_of("keep", 4)

    def insert(worker: int) -> None:
        for index in range(40):
            seed = 1000 * (worker + 1) + index
            small.put(BlockId(f"w{worker}", '"e"', index), payload(seed))
            if index % 8 == 0:
                small.record_recency()

    def toggle() -> None:
        mine = BlockId("toggled", '"e"', 0)
        small.put(mine, payload(99))
        for _ in range(20):
            small.unpin([mine])
            small.pin([mine])

    for index, block in enumerate(kept):
        small.put(block, payload(index))
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(insert, worker) for worker in range(3)] + [pool.submit(toggle)]
        for future in futures:
            future.result()
    assert small.volume() <= small.size_limit
    assert all(intact(small, block, index) for index, block in enumerate(kept))
    # Between an unpin and the next pin the block may be evicted by the other threads' inserts
    # (then the pin finds nothing); if it is still there, the last pin holds.
    toggled = BlockId("toggled", '"e"', 0)
    assert small.is_pinned(toggled) or not small.contains(toggled)


# -- backups ------------------------------------------------------------------------------------


def backup_stream(
    cache: BlockCache, count: int, first_seed: int = 20_000, key: str = "backup"
) -> list[BlockId]:
    """A backup reading ``count`` new blocks through the cache, checking the cap each time."""
    blocks = blocks_of(key, count)
    for index, block in enumerate(blocks):
        assert cache.put(block, payload(first_seed + index), backup=True)
        assert cache.volume() <= cache.size_limit, index
    return blocks


def test_backup_larger_than_the_cache_leaves_other_blocks_alone(small: BlockCache) -> None:
    """A study read once, then a backup of three cache sizes: plain LRU would lose the study;
    the backup's blocks go first, oldest first, and its latest ones stay."""
    study = blocks_of("study", 8)
    for index, block in enumerate(study):
        assert small.put(block, payload(index))
    backup = backup_stream(small, 3 * small.size_limit // BLOCK)
    assert all(intact(small, block, index) for index, block in enumerate(study))
    assert not small.contains(backup[0])
    assert small.contains(backup[-1])


def test_backup_reads_do_not_make_a_block_recent(small: BlockCache) -> None:
    """A block only a backup reads ages like an unread one; a block someone else reads is kept."""
    read_by_backup, read_by_viewer = BlockId("a", '"e"', 0), BlockId("b", '"e"', 0)
    assert small.put(read_by_backup, payload(1))
    assert small.put(read_by_viewer, payload(2))
    # More than diskcache culls at once, stored after both and read by no one.
    for index in range(20):
        assert small.put(BlockId("unread", '"e"', index), payload(50_000 + index))
    assert small.get(read_by_backup, backup=True) is not None
    assert small.get(read_by_viewer) is not None
    small.record_recency()
    inserted = 0
    while small.contains(read_by_backup):
        assert small.put(BlockId("new", '"e"', inserted), payload(40_000 + inserted))
        inserted += 1
        assert inserted < 200, "nothing was ever evicted"
    assert intact(small, read_by_viewer, 2)


def test_backup_block_read_by_anyone_else_is_kept_like_any_other(small: BlockCache) -> None:
    """The first block a backup brought in, later read by a viewer, outlives the rest of the
    backup's blocks under more backup pressure."""
    first, *_ = backup_stream(small, 4)
    assert small.get(first) is not None
    small.record_recency()
    later = backup_stream(small, 2 * small.size_limit // BLOCK, 30_000, key="more")
    assert intact(small, first, 20_000)
    assert not small.contains(later[0])


def test_pinned_key_wins_over_backup(small: BlockCache) -> None:
    small.pin_keys({"keep"})
    block = BlockId("keep", '"e"', 0)
    assert small.put(block, payload(5), backup=True)
    assert small.is_pinned(block)
