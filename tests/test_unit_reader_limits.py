"""The read path's global limits under trio, without a kernel: read-ahead never fetches more
unread bytes than the cache can keep, never holds up a foreground read, and all GETs together
stay within ``fetch_threads``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from helpers_unit import (
    BS,
    InstrumentedStore,
    make_rig,
    open_path,
    random_bytes,
    run_fs,
    wait_until,
)

from cloudfs.fs import ArchiveFS
from cloudfs.reader import UNREAD_AHEAD_SHARE

pytestmark = pytest.mark.timeout(60)


class GatedStore(InstrumentedStore):
    """GETs that ``gated(key, start)`` names wait until ``open_gate()``; every GET takes
    ``get_time``; the most GETs ever running at once is kept in ``peak``."""

    def __init__(
        self, inner: InstrumentedStore, gated: Callable[[str, int], bool], get_time: float
    ) -> None:
        super().__init__(inner.inner)
        self.gated = gated
        self.get_time = get_time
        self.running = 0
        self.peak = 0
        self._gate = threading.Event()

    def get_range(self, key: str, start: int, end: int, etag: str) -> bytes:
        with self._lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            if self.gated(key, start):
                self._gate.wait(30)
            time.sleep(self.get_time)
            return super().get_range(key, start, end, etag)
        finally:
            with self._lock:
                self.running -= 1

    def open_gate(self) -> None:
        self._gate.set()


async def settled(fs: ArchiveFS) -> None:
    """Wait until the reader's background work (read-ahead included) is done."""
    background = fs.reader._nursery
    assert background is not None
    assert await wait_until(lambda: not background.child_tasks)


def fetched_blocks(store: InstrumentedStore, key: str) -> list[int]:
    return [
        index for start, end in store.calls_for(key) for index in range(start // BS, -(-end // BS))
    ]


def test_read_ahead_in_many_files_never_evicts_what_it_will_serve(tmp_path: Path) -> None:
    """Fourteen files open a read-ahead window each at once over a cache that holds fewer blocks
    than the windows together: unread read-ahead stays within its share of the cache, so every
    prefetched block is still cached when its reader gets there, and no block is fetched twice."""
    files = {f"f{i:02d}.bin": random_bytes(16 * BS, 40 + i) for i in range(14)}
    # After its own overhead the cache keeps 84 to 100 blocks (it evicts 16 at a time); the
    # windows together are 112.
    size_limit = 128 * BS
    rig = make_rig(
        tmp_path,
        files,
        size_limit=size_limit,
        readahead_initial=8 * BS,
        readahead_budget=64 * BS,
        memory_blocks=2 * BS,  # a block evicted from disk is not still found in memory
    )

    async def body(fs: ArchiveFS) -> None:
        reader = fs.reader
        handles = {key: await open_path(fs, key) for key in files}
        peak_unread = 0

        async def read_block(key: str, index: int) -> None:
            nonlocal peak_unread
            got = await fs.read(handles[key], index * BS, BS)
            assert bytes(got) == files[key][index * BS : (index + 1) * BS], (key, index)
            await settled(fs)
            peak_unread = max(peak_unread, reader.ledger.unread_bytes)

        # Each first read opens an 8-block window; then every file is read to its end, the one
        # read ahead longest ago first.
        for key in files:
            await read_block(key, 0)
        for key in files:
            for index in range(1, 16):
                await read_block(key, index)
        assert reader.stats.prefetched_blocks >= 64
        assert 0 < peak_unread <= size_limit * UNREAD_AHEAD_SHARE
        assert reader.ledger.wasted_bytes == 0
        assert reader.ledger.used_bytes == reader.stats.prefetched_bytes

    run_fs(rig, body)
    for key in files:
        blocks = fetched_blocks(rig.store, key)
        assert sorted(blocks) == list(range(16)), (key, blocks)  # each exactly once
    rig.close()


def test_files_closed_unread_do_not_hold_read_ahead_back(tmp_path: Path) -> None:
    """Files whose first block alone was read, then closed, leave read-ahead's share of the
    cache full of blocks nobody will ask for; a file read next still gets read-ahead."""
    files = {f"f{i:02d}.bin": random_bytes(16 * BS, 70 + i) for i in range(9)}
    rig = make_rig(
        tmp_path,
        files,
        size_limit=128 * BS,
        readahead_initial=8 * BS,
        readahead_budget=64 * BS,
    )

    async def body(fs: ArchiveFS) -> None:
        reader = fs.reader
        for key in sorted(files)[:8]:  # 8 windows of 8 blocks: the whole share
            handle = await open_path(fs, key)
            await fs.read(handle, 0, BS)
            await settled(fs)
            await fs.release(handle)
        assert reader.ledger.awaited_bytes == 128 * BS * UNREAD_AHEAD_SHARE
        prefetched = reader.stats.prefetched_blocks

        handle = await open_path(fs, "f08.bin")
        await fs.read(handle, 0, BS)
        await settled(fs)
        assert reader.stats.prefetched_blocks == prefetched + 8
        assert reader.ledger.awaited_bytes == 8 * BS  # the open file's window alone
        assert reader.ledger.unread_bytes == 72 * BS  # the others are still unread, not awaited

    run_fs(rig, body)
    rig.close()


def test_foreground_read_is_not_held_up_by_saturated_read_ahead(tmp_path: Path) -> None:
    """With read-ahead's memory budget taken by GETs that do not answer and more read-ahead
    waiting for it, a read of another file's missing block takes about one GET."""
    get_time = 0.2
    rig = make_rig(
        tmp_path,
        {"movie.bin": random_bytes(64 * BS, 50), "scan.bin": random_bytes(8 * BS, 51)},
        readahead_budget=6 * BS,  # either stuck read-ahead GET (3 or 4 blocks) takes it all
    )
    store = rig.store = GatedStore(
        rig.store, lambda key, start: key == "movie.bin" and start >= 3 * BS, get_time
    )

    async def body(fs: ArchiveFS) -> float:
        budget = fs.reader._ahead_budget
        movie = await open_path(fs, "movie.bin")
        for index in range(3):  # blocks 0-2 answer; read-ahead of blocks 3 on is stuck
            got = await fs.read(movie, index * BS, BS)
            assert bytes(got) == rig.files["movie.bin"][index * BS : (index + 1) * BS]
        # One read-ahead GET is stuck with the whole budget and the next one waits for it.
        assert await wait_until(lambda: store.running == 1 and len(budget._lot) > 0)
        assert budget.used >= budget.limit
        scan = await open_path(fs, "scan.bin")
        started = time.monotonic()
        got = await fs.read(scan, 5 * BS, 100)
        elapsed = time.monotonic() - started
        assert bytes(got) == rig.files["scan.bin"][5 * BS : 5 * BS + 100]
        assert store.running == 1 and len(budget._lot) > 0  # still stuck meanwhile
        store.open_gate()
        return elapsed

    try:
        elapsed = run_fs(rig, body)
    finally:
        store.open_gate()
    assert elapsed < get_time + 0.4, f"foreground read took {elapsed:.2f}s"
    rig.close()


def test_parallel_gets_never_exceed_fetch_threads(tmp_path: Path) -> None:
    """Sequential readers (read-ahead) and many random readers at once never have more than
    ``fetch_threads`` GETs running together, and they do use all of them."""
    fetch_threads = 4
    files = {f"f{i}.bin": random_bytes(32 * BS, 60 + i) for i in range(4)}
    rig = make_rig(
        tmp_path,
        files,
        fetch_threads=fetch_threads,
        readahead_budget=64 * BS,
        foreground_budget=64 * BS,
    )
    store = rig.store = GatedStore(rig.store, lambda key, start: False, 0.05)

    async def body(fs: ArchiveFS) -> None:
        async def sequential(key: str) -> None:
            handle = await open_path(fs, key)
            for index in range(32):
                got = await fs.read(handle, index * BS, BS)
                assert bytes(got) == files[key][index * BS : (index + 1) * BS]

        async def random_reads(key: str) -> None:
            handle = await open_path(fs, key)
            for index in (30, 20, 10, 25, 15, 5):
                got = await fs.read(handle, index * BS + 1, 10)
                assert bytes(got) == files[key][index * BS + 1 : index * BS + 11]

        async with trio.open_nursery() as nursery:
            for key in sorted(files)[:2]:
                nursery.start_soon(sequential, key)
            for key in sorted(files)[2:]:
                for _ in range(4):
                    nursery.start_soon(random_reads, key)
        assert fs.reader.stats.prefetched_blocks > 0

    run_fs(rig, body)
    assert store.peak == fetch_threads
    rig.close()
