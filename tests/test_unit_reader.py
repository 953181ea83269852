"""The read path under trio, without a kernel: correct bytes, one request per missing block,
failures as EIO, stale versions as ESTALE, read-ahead only for sequential readers, bounded
memory and a disk cache that serves and heals."""

from __future__ import annotations

import errno
import os
import random
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Generator
from pathlib import Path

import pytest
import trio
import trio.testing
from helpers_unit import (
    BS,
    InstrumentedStore,
    corrupt_one_block,
    ino_of,
    make_rig,
    open_path,
    random_bytes,
    read_all,
    run_fs,
    value_files,
    wait_until,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudfs.cache import PIECE, BlockId, stored_length
from cloudfs.errors import CloudfsError, Interrupted, Unavailable
from cloudfs.fs import ArchiveFS
from cloudfs.prefetch import SCATTERED_READS
from cloudfs.reader import HEDGE_BEHIND, RESENDS, WARM_AHEAD, WARM_BATCH, ObjectVersion
from cloudfs.store import ObjectStore

pytestmark = pytest.mark.timeout(60)

MiB = 1024 * 1024

SAMPLES = {
    "empty.bin": b"",
    "one.bin": random_bytes(1, 1),
    "block.bin": random_bytes(BS, 2),
    "block_plus.bin": random_bytes(BS + 1, 3),
    "small.dcm": random_bytes(100_000, 4),
    "large.bin": random_bytes(700_003, 5),
    "dir/nested.bin": random_bytes(3 * BS - 1, 6),
}


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    reads=st.lists(
        st.tuples(
            st.sampled_from(sorted(SAMPLES)),
            st.integers(0, 2**20),
            st.integers(0, 300_000),
        ),
        min_size=1,
        max_size=25,
    )
)
def test_reads_at_random_offsets_match_source(reads: list[tuple[str, int, int]]) -> None:
    """Any (offset, length) read of any file returns exactly the source bytes (short at EOF)."""
    with tempfile.TemporaryDirectory() as tmp:
        rig = make_rig(Path(tmp), SAMPLES, small_object=128 * 1024)

        async def body(fs: ArchiveFS) -> None:
            handles: dict[str, int] = {}
            for name, raw_offset, length in reads:
                data = SAMPLES[name]
                offset = raw_offset % (len(data) + 100)
                if name not in handles:
                    handles[name] = await open_path(fs, name)
                got = await fs.read(handles[name], offset, length)
                assert bytes(got) == data[offset : offset + length], (name, offset, length)

        try:
            run_fs(rig, body)
        finally:
            rig.close()


def test_concurrent_random_reads_match_source(tmp_path: Path) -> None:
    """Hundreds of overlapping reads from many tasks, with a slow store, all return the right
    bytes, and no block is fetched twice."""
    data = random_bytes(3 * MiB + 17, 9)
    rig = make_rig(tmp_path, {"scan.bin": data})
    rig.store.delay = 0.01
    rng = random.Random(1234)
    cases = [(rng.randrange(len(data) + 10), rng.randrange(1, 3 * BS)) for _ in range(300)]

    async def body(fs: ArchiveFS) -> None:
        async def one(offset: int, length: int) -> None:
            handle = await open_path(fs, "scan.bin")
            got = await fs.read(handle, offset, length)
            assert bytes(got) == data[offset : offset + length], (offset, length)
            await fs.release(handle)

        for batch in range(0, len(cases), 30):
            async with trio.open_nursery() as nursery:
                for offset, length in cases[batch : batch + 30]:
                    nursery.start_soon(one, offset, length)

    run_fs(rig, body)
    fetched = [
        index
        for start, end in rig.store.calls_for("scan.bin")
        for index in range(start // BS, -(-end // BS))
    ]
    assert len(fetched) == len(set(fetched))
    rig.close()


def test_concurrent_reads_of_one_missing_block_issue_one_request(tmp_path: Path) -> None:
    """Eight readers of the same missing block share one ranged GET (single flight)."""
    data = random_bytes(2 * MiB, 1)
    rig = make_rig(tmp_path, {"big.bin": data})
    rig.store.delay = 0.3

    async def body(fs: ArchiveFS) -> dict[int, bytes]:
        results: dict[int, bytes] = {}

        async def reader(i: int) -> None:
            handle = await open_path(fs, "big.bin")
            offset = 10 * BS + 7 + i * 100
            results[i] = bytes(await fs.read(handle, offset, 100))

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(reader, i)
        # The readers have their bytes as soon as the block lands, before the GET is counted.
        assert await wait_until(lambda: fs.reader.stats.requests_in_flight == 0)
        assert fs.reader.stats.requests == 1
        assert fs.reader.stats.fetched_blocks == 1
        return results

    results = run_fs(rig, body)
    assert rig.store.calls == [("big.bin", 10 * BS, 11 * BS)]
    assert len(results) == 8
    for i, got in results.items():
        offset = 10 * BS + 7 + i * 100
        assert got == data[offset : offset + 100]
    rig.close()


def test_reads_spanning_blocks_share_in_flight_fetches(tmp_path: Path) -> None:
    """A read across two blocks waits on a block already being fetched instead of refetching."""
    data = random_bytes(2 * MiB, 2)
    rig = make_rig(tmp_path, {"big.bin": data})
    rig.store.delay = 0.3

    async def body(fs: ArchiveFS) -> None:
        async def read(offset: int, size: int) -> None:
            handle = await open_path(fs, "big.bin")
            assert bytes(await fs.read(handle, offset, size)) == data[offset : offset + size]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, 20 * BS + 5, 100)
            await trio.sleep(0.1)
            nursery.start_soon(read, 20 * BS - 50, 200)

    run_fs(rig, body)
    calls = rig.store.calls_for("big.bin")
    assert (20 * BS, 21 * BS) in calls
    assert sum(1 for start, end in calls if start <= 20 * BS < end) == 1
    rig.close()


class TrickleStore(InstrumentedStore):
    """Hands out the first block of every GET at once, then holds the rest until ``flow`` is
    set, and then fails it if ``broken``."""

    def __init__(self, inner: ObjectStore) -> None:
        super().__init__(inner)
        self.flow = threading.Event()
        self.broken = False

    def stream_range(
        self, key: str, start: int, end: int, etag: str, piece: int
    ) -> Generator[bytes, None, None]:
        for index, data in enumerate(super().stream_range(key, start, end, etag, piece)):
            if index:
                self.flow.wait(30)
                if self.broken:
                    raise Unavailable(f"{key}: connection reset")
            yield data


@pytest.mark.parametrize("broken", [False, True])
def test_blocks_of_a_long_get_are_served_as_they_arrive(tmp_path: Path, broken: bool) -> None:
    """A reader waiting for the first block of a multi-block GET gets it as soon as it has
    arrived, before the rest of the GET; a GET that fails part-way fails only the blocks that
    had not arrived, and what arrived is served and cached."""
    data = random_bytes(4 * BS, 31)
    rig = make_rig(tmp_path, {"a.bin": data}, small_object=MiB, fetch_chunk=4 * BS)
    store = rig.store = TrickleStore(rig.store.inner)
    store.broken = broken

    async def body(fs: ArchiveFS) -> None:
        handle = await open_path(fs, "a.bin")
        with trio.fail_after(10):
            assert bytes(await fs.read(handle, 0, 100)) == data[:100]
        assert not store.flow.is_set()
        if broken:

            async def read_the_failing_block() -> None:
                with pytest.raises(CloudfsError) as failure:
                    await fs.read(handle, 2 * BS, 100)
                assert failure.value.errno == errno.EIO

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read_the_failing_block)
                    await trio.testing.wait_all_tasks_blocked()
                    store.flow.set()
            assert bytes(await fs.read(handle, 10, 100)) == data[10:110]
        else:
            store.flow.set()
            assert bytes(await fs.read(handle, 2 * BS, BS)) == data[2 * BS : 3 * BS]
        assert store.calls == [("a.bin", 0, 4 * BS)]

    run_fs(rig, body)
    assert rig.cache.get(BlockId("a.bin", rig.catalog.by_key("a.bin").etag, 0)) is not None
    rig.close()


class CuttingStore(InstrumentedStore):
    """Cuts the next ``cuts`` replies after their second block, as a connection that drops in
    the middle of a body; records the range of every GET."""

    def __init__(self, inner: ObjectStore, cuts: int) -> None:
        super().__init__(inner)
        self.cuts = cuts
        self.ranges: list[tuple[int, int]] = []

    def stream_range(
        self, key: str, start: int, end: int, etag: str, piece: int
    ) -> Generator[bytes, None, None]:
        self.ranges.append((start, end))
        for index, data in enumerate(super().stream_range(key, start, end, etag, piece)):
            if index == 2 and self.cuts:
                self.cuts -= 1
                raise Interrupted(f"{key}: short read (the reply ended early)")
            yield data


@pytest.mark.parametrize("cuts", [RESENDS, RESENDS + 1])
def test_a_reply_cut_short_is_asked_again_for_the_rest(tmp_path: Path, cuts: int) -> None:
    """A GET whose reply is cut short (a connection dropped mid-body) is sent again from its
    first missing block, up to RESENDS times: the reader gets the right bytes and never sees
    the drop; past that, the read fails with EIO."""
    data = random_bytes(12 * BS, 33)
    rig = make_rig(tmp_path, {"a.bin": data}, small_object=MiB, fetch_chunk=12 * BS)
    store = rig.store = CuttingStore(rig.store.inner, cuts)

    async def body(fs: ArchiveFS) -> None:
        handle = await open_path(fs, "a.bin")
        if cuts > RESENDS:
            with pytest.raises(CloudfsError) as failure:
                await fs.read(handle, 11 * BS, 100)
            assert failure.value.errno == errno.EIO
            return
        assert bytes(await fs.read(handle, 11 * BS, BS)) == data[11 * BS :]
        assert await read_all(fs, "a.bin") == data

    run_fs(rig, body)
    # Each attempt asks for what the one before did not bring: two blocks came every time.
    assert store.ranges == [(start * BS, 12 * BS) for start in range(0, 2 * (RESENDS + 1), 2)]
    rig.close()


def test_a_read_far_back_in_a_read_ahead_get_sends_its_own(tmp_path: Path) -> None:
    """A read whose block has HEDGE_BEHIND blocks or more still to come before it in a
    read-ahead GET fetches that block with a GET of its own instead of waiting for them (a
    reader jumping into a whole-object fetch over a slow link); nearer the head it waits, and
    the bytes are right either way."""
    data = random_bytes(32 * BS, 32)
    rig = make_rig(tmp_path, {"frames.bin": data}, fetch_chunk=8 * BS)
    store = rig.store = TrickleStore(rig.store.inner)
    picks = [20, 5, 28, 11]  # SCATTERED_READS random reads: the rest comes as read-ahead

    async def read(fs: ArchiveFS, handle: int, index: int) -> None:
        offset = index * BS + 10
        assert bytes(await fs.read(handle, offset, 100)) == data[offset : offset + 100]

    async def body(fs: ArchiveFS) -> None:
        handle = await open_path(fs, "frames.bin")
        with trio.fail_after(10):
            for index in picks[:SCATTERED_READS]:
                await read(fs, handle, index)
            # The whole-object fetch starts with blocks 0-4 (5 is cached): block 0 comes at
            # once, the rest of that GET is held.
            assert await wait_until(lambda: ("frames.bin", 0, 5 * BS) in store.calls)
            assert HEDGE_BEHIND == 3
            await read(fs, handle, 4)  # three blocks still to come before it: its own GET
            assert ("frames.bin", 4 * BS, 5 * BS) in store.calls
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read, fs, handle, 2)  # one block before it: it waits
                await trio.testing.wait_all_tasks_blocked()
                assert ("frames.bin", 2 * BS, 3 * BS) not in store.calls
                store.flow.set()
            for index in range(32):
                await read(fs, handle, index)

    try:
        run_fs(rig, body)
    finally:
        store.flow.set()
    rig.close()


def test_failing_store_read_is_eio_and_others_continue(tmp_path: Path) -> None:
    """A store that keeps failing makes that read EIO; concurrent and later reads of other
    objects still succeed and the reader keeps running."""
    good = random_bytes(2 * MiB, 3)
    rig = make_rig(tmp_path, {"bad.bin": random_bytes(2 * MiB, 4), "good.bin": good})
    rig.store.fail_keys = {"bad.bin"}
    rig.store.delay = 0.05

    async def body(fs: ArchiveFS) -> None:
        errors: list[CloudfsError] = []

        async def bad() -> None:
            handle = await open_path(fs, "bad.bin")
            with pytest.raises(CloudfsError) as caught:
                await fs.read(handle, 5 * BS, 100)
            errors.append(caught.value)

        async def fine(offset: int) -> None:
            handle = await open_path(fs, "good.bin")
            assert bytes(await fs.read(handle, offset, 1000)) == good[offset : offset + 1000]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(bad)
            nursery.start_soon(fine, 5 * BS)
            nursery.start_soon(fine, 9 * BS + 3)
        assert len(errors) == 1 and errors[0].errno == errno.EIO
        await fine(25 * BS)
        # The failure is not remembered as data: the next read asks again, and fails again.
        handle = await open_path(fs, "bad.bin")
        with pytest.raises(CloudfsError) as again:
            await fs.read(handle, 5 * BS, 100)
        assert again.value.errno == errno.EIO
        assert fs.reader.stats.errors >= 2
        assert "bad.bin" in fs.reader.stats.last_error
        assert fs.reader.stats.requests_in_flight == 0

    run_fs(rig, body)
    assert len(rig.store.calls_for("bad.bin")) == 2
    rig.close()


def test_unexpected_store_exception_is_eio(tmp_path: Path) -> None:
    """A store raising something outside the error taxonomy still fails only that read, as EIO."""
    rig = make_rig(tmp_path, {"f.bin": random_bytes(2 * MiB, 5)})
    rig.store.fail_keys = {"f.bin"}
    rig.store.failure = lambda key: RuntimeError(f"bug while reading {key}")

    async def body(fs: ArchiveFS) -> None:
        handle = await open_path(fs, "f.bin")
        with pytest.raises(CloudfsError) as caught:
            await fs.read(handle, 3 * BS, 10)
        assert caught.value.errno == errno.EIO
        rig.store.fail_keys = set()
        got = await fs.read(handle, 7 * BS, 10)
        assert bytes(got) == rig.files["f.bin"][7 * BS : 7 * BS + 10]

    run_fs(rig, body)
    rig.close()


def test_hanging_store_read_fails_within_io_timeout(tmp_path: Path) -> None:
    """A store that does not answer turns into EIO after about io_timeout, not a hang."""
    rig = make_rig(tmp_path, {"slow.bin": random_bytes(2 * MiB, 6)}, io_timeout=1.0)
    rig.store.hang = True

    async def body(fs: ArchiveFS) -> float:
        handle = await open_path(fs, "slow.bin")
        started = time.monotonic()
        with pytest.raises(CloudfsError) as caught:
            await fs.read(handle, 4 * BS, 100)
        elapsed = time.monotonic() - started
        assert caught.value.errno == errno.EIO
        return elapsed

    started = time.monotonic()
    elapsed = run_fs(rig, body, drain=False)
    assert 0.9 <= elapsed <= 2.5
    assert time.monotonic() - started < 3.5  # shutting down does not wait for the stuck GET
    assert rig.store.unhang()
    rig.close()


def test_object_changed_after_open_is_estale(tmp_path: Path) -> None:
    """A rewrite after open makes the next uncached read ESTALE (never new bytes in an old file);
    the catalog then holds the new version and a new open reads it."""
    old = random_bytes(2 * MiB, 7)
    new = random_bytes(2 * MiB + 10, 8)
    rig = make_rig(tmp_path, {"scan.bin": old})
    old_etag = rig.store.head("scan.bin").etag

    async def body(fs: ArchiveFS) -> None:
        ino = await ino_of(fs, "scan.bin")
        handle, _ = await fs.open(ino, 0)
        assert bytes(await fs.read(handle, 2 * BS, 100)) == old[2 * BS : 2 * BS + 100]
        rig.write("scan.bin", new)
        with pytest.raises(CloudfsError) as caught:
            await fs.read(handle, 7 * BS, 100)
        assert caught.value.errno == errno.ESTALE == 116
        node = rig.catalog.by_key("scan.bin")
        assert node is not None
        assert node.etag == rig.store.head("scan.bin").etag != old_etag
        assert node.size == len(new) and node.ino == ino
        attributes = await fs.getattr(ino)
        assert attributes.size == len(new)
        fresh, keep_cache = await fs.open(ino, 0)
        assert keep_cache is False
        assert bytes(await fs.read(fresh, 7 * BS, 100)) == new[7 * BS : 7 * BS + 100]
        assert bytes(await fs.read(fresh, 2 * BS, 100)) == new[2 * BS : 2 * BS + 100]

    run_fs(rig, body)
    rig.close()


def test_object_deleted_after_open(tmp_path: Path) -> None:
    """A deleted object fails the open file's next fetch and disappears from the catalog."""
    rig = make_rig(tmp_path, {"gone.bin": random_bytes(2 * MiB, 9), "stay.bin": b"x"})

    async def body(fs: ArchiveFS) -> None:
        handle = await open_path(fs, "gone.bin")
        (rig.source / "gone.bin").unlink()
        with pytest.raises(CloudfsError) as caught:
            await fs.read(handle, 5 * BS, 10)
        assert caught.value.errno in (errno.ENOENT, errno.ESTALE)

    run_fs(rig, body)
    rig.close()


def test_sequential_reads_trigger_read_ahead(tmp_path: Path) -> None:
    """Reading a file front to back prefetches blocks and coalesces them into fewer GETs."""
    data = random_bytes(2 * MiB, 10)
    rig = make_rig(tmp_path, {"movie.bin": data})

    async def body(fs: ArchiveFS) -> None:
        assert await read_all(fs, "movie.bin", BS) == data
        assert await wait_until(lambda: fs.reader.stats.prefetched_blocks > 0)
        assert await wait_until(lambda: fs.reader.stats.requests_in_flight == 0)

    run_fs(rig, body)
    blocks = 2 * MiB // BS
    calls = rig.store.calls_for("movie.bin")
    assert len(calls) < blocks
    assert max(end - start for start, end in calls) > BS
    assert all(end - start <= 4 * BS for start, end in calls)  # at most one fetch chunk
    assert rig.cache.block_count() == blocks
    rig.close()


def test_random_reads_do_not_read_ahead(tmp_path: Path) -> None:
    """A few scattered reads fetch exactly the blocks they touch and nothing else."""
    data = random_bytes(2 * MiB, 11)
    rig = make_rig(tmp_path, {"scan.bin": data})
    picks = [20, 5, 28, 11, 2, 16][: SCATTERED_READS - 1]

    async def body(fs: ArchiveFS) -> None:
        handle = await open_path(fs, "scan.bin")
        for index in picks:
            offset = index * BS + 100
            assert bytes(await fs.read(handle, offset, 1000)) == data[offset : offset + 1000]
        await trio.sleep(0.2)
        assert fs.reader.stats.prefetched_blocks == 0
        assert fs.reader.stats.fetched_blocks == len(picks)

    run_fs(rig, body)
    assert sorted(rig.store.calls_for("scan.bin")) == sorted((i * BS, (i + 1) * BS) for i in picks)
    rig.close()


def test_random_reads_of_cached_bytes_in_memory_take_no_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random reads of cached blocks whose bytes are in the page cache are served on the event
    loop without a thread hop, and are the right bytes: at once for blocks this process
    stored, and after a restart once a read in a worker thread has opened the block's file."""
    data = random_bytes(2 * MiB, 14)
    rig = make_rig(tmp_path, {"scan.bin": data})
    picks = [20, 5, 28, 11][: SCATTERED_READS - 1]

    async def scattered_reads(fs: ArchiveFS) -> None:
        handle = await open_path(fs, "scan.bin")
        for index in picks:
            offset = index * BS + 100
            assert bytes(await fs.read(handle, offset, 1000)) == data[offset : offset + 1000]

    run_fs(rig, scattered_reads)  # fetched and cached
    threaded: list[int] = []
    in_thread = rig.cache.get_range

    def recorded(block: BlockId, *args: object) -> object:
        assert threading.current_thread() is not threading.main_thread()
        threaded.append(block.number)
        return in_thread(block, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(rig.cache, "get_range", recorded)

    async def same_process(fs: ArchiveFS) -> None:
        await scattered_reads(fs)
        assert threaded == []
        assert fs.reader.stats.disk_hits == len(picks)

    run_fs(rig, same_process)
    rig.cache._files.forget_all()  # as after a restart: no block file open

    async def after_restart(fs: ArchiveFS) -> None:
        await scattered_reads(fs)
        assert sorted(threaded) == sorted(picks)
        hits = fs.reader.stats.disk_hits
        await scattered_reads(fs)
        assert sorted(threaded) == sorted(picks)
        assert fs.reader.stats.disk_hits == hits + len(picks)

    run_fs(rig, after_restart)
    assert len(rig.store.calls_for("scan.bin")) == len(picks)
    rig.close()


@pytest.mark.parametrize("backup", [False, True])
def test_scattered_reader_gets_the_whole_object_in_the_background(
    tmp_path: Path, backup: bool
) -> None:
    """Once a reader has jumped around an object SCATTERED_READS times, the rest of it is fetched
    in the background (read-ahead GETs), so its later reads need no GET; never for a backup
    program, and never for an object larger than a quarter of the cache."""
    data, big = random_bytes(2 * MiB, 12), random_bytes(5 * MiB, 13)
    rig = make_rig(tmp_path, {"frames.bin": data, "big.bin": big}, size_limit=16 * MiB)
    picks = [20, 5, 28, 11, 2, 16, 30, 9]

    async def body(fs: ArchiveFS) -> None:
        handle, _ = await fs.open(await ino_of(fs, "frames.bin"), os.O_RDONLY, backup)
        stats = fs.reader.stats
        for index in picks[:SCATTERED_READS]:
            offset = index * BS + 100
            assert bytes(await fs.read(handle, offset, 1000)) == data[offset : offset + 1000]
        # The background fetch starts after a look at the disk cache: until then nothing is in
        # flight, so wait for every block (or, for a backup, for the reads' own blocks).
        wanted = SCATTERED_READS if backup else len(data) // BS
        assert await wait_until(
            lambda: (
                stats.fetched_blocks + stats.prefetched_blocks == wanted
                and stats.requests_in_flight == 0
            )
        )
        fetched = len(rig.store.calls)
        for index in picks[SCATTERED_READS:]:
            offset = index * BS + 100
            assert bytes(await fs.read(handle, offset, 1000)) == data[offset : offset + 1000]
        assert await wait_until(lambda: fs.reader.stats.requests_in_flight == 0)
        if backup:
            assert stats.prefetched_blocks == 0
            assert len(rig.store.calls) == fetched + len(picks) - SCATTERED_READS
        else:
            # The last scattered read may find its block already in the background fetch.
            assert SCATTERED_READS - 1 <= stats.fetched_blocks <= SCATTERED_READS
            assert stats.fetched_blocks + stats.prefetched_blocks == len(data) // BS
            assert len(rig.store.calls) == fetched
        large = await open_path(fs, "big.bin")
        for index in picks:
            await fs.read(large, index * BS, 10)
        assert await wait_until(lambda: fs.reader.stats.requests_in_flight == 0)
        assert rig.store.calls_for("big.bin") == [(i * BS, (i + 1) * BS) for i in picks]

    run_fs(rig, body)
    rig.close()


@pytest.mark.parametrize("how", ["scattered reader", "fetch_object"])
def test_fetching_a_whole_object_holds_a_budget_not_the_object(tmp_path: Path, how: str) -> None:
    """Fetching a whole object (for a scattered reader, or a study) keeps in memory what the
    read-ahead budget and the memory tier allow, not every block until the last one lands."""
    data = random_bytes(320 * BS, 32)  # 20 MiB
    rig = make_rig(
        tmp_path,
        {"frames.bin": data},
        size_limit=256 * MiB,
        readahead_budget=8 * BS,
        memory_blocks=8 * BS,
    )

    async def body(fs: ArchiveFS) -> int:
        tracemalloc.start()
        try:
            if how == "fetch_object":
                node = rig.catalog.by_key("frames.bin")
                assert node is not None and node.etag is not None
                version = ObjectVersion("frames.bin", node.etag, len(data))
                assert await fs.reader.fetch_object(version) == len(data)
            else:
                handle = await open_path(fs, "frames.bin")
                for index in (300, 7, 150, 42):
                    await fs.read(handle, index * BS, 100)
                stats = fs.reader.stats
                assert await wait_until(
                    lambda: (
                        stats.fetched_blocks + stats.prefetched_blocks == 320
                        and not stats.requests_in_flight
                    ),
                    30,
                )
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak = run_fs(rig, body)
    assert len(rig.store.calls) > 40  # the whole object came, in many GETs
    assert peak < 6 * MiB, peak
    rig.close()


def test_small_object_fetched_whole_by_one_request(tmp_path: Path) -> None:
    """An object up to small_object is fetched with one GET on first read; the rest is local."""
    data = random_bytes(500_003, 12)
    rig = make_rig(tmp_path, {"img.dcm": data}, small_object=MiB, fetch_chunk=MiB)

    async def body(fs: ArchiveFS) -> None:
        handle = await open_path(fs, "img.dcm")
        assert bytes(await fs.read(handle, 300_000, 100)) == data[300_000:300_100]
        assert rig.store.calls == [("img.dcm", 0, len(data))]
        assert await read_all(fs, "img.dcm", 10_000) == data
        assert await wait_until(lambda: fs.reader.stats.requests_in_flight == 0)
        assert fs.reader.stats.requests == 1

    run_fs(rig, body)
    assert rig.store.calls == [("img.dcm", 0, len(data))]
    assert rig.cache.block_count() == -(-len(data) // BS)
    rig.close()


def test_small_object_read_from_start_is_one_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading a small object from offset 0 (how viewers read a DICOM file) fetches it with one
    GET, also when read-ahead gets to its blocks before the foreground read does: here the disk
    answers the first block's lookup slowly."""
    data = random_bytes(4 * BS, 17)
    rig = make_rig(tmp_path, {"img.dcm": data}, small_object=MiB, fetch_chunk=MiB)
    lookup = rig.cache.get

    def slow_first_block(block: BlockId, *flags: bool) -> memoryview | None:
        if block.number == 0:
            time.sleep(0.2)
        return lookup(block, *flags)

    monkeypatch.setattr(rig.cache, "get", slow_first_block)

    async def body(fs: ArchiveFS) -> None:
        assert await read_all(fs, "img.dcm") == data
        assert await wait_until(lambda: fs.reader.stats.requests_in_flight == 0)

    run_fs(rig, body)
    assert rig.store.calls == [("img.dcm", 0, len(data))]
    rig.close()


def test_memory_stays_within_memory_blocks(tmp_path: Path) -> None:
    """After reading many files (twice), resident blocks never exceed memory_blocks."""
    files = {f"s/f{i:02d}.dcm": random_bytes(150_000, 100 + i) for i in range(12)}
    limit = 4 * BS
    rig = make_rig(tmp_path, files, memory_blocks=limit, small_object=256 * 1024)

    async def body(fs: ArchiveFS) -> None:
        reader = fs.reader
        for round in range(2):
            for key, data in files.items():
                assert await read_all(fs, key, 32 * 1024) == data
                assert reader._memory_bytes <= limit
                assert reader._memory_bytes == sum(len(v) for v in reader._memory.values())
            assert await wait_until(lambda: reader.stats.requests_in_flight == 0)
            if round == 0:
                fetched = len(rig.store.calls)
        assert len(rig.store.calls) == fetched  # the second pass came from the disk cache
        assert reader.stats.disk_hits > 0
        assert reader._memory_bytes <= limit

    run_fs(rig, body)
    rig.close()


def test_read_ahead_far_ahead_of_its_reader_leaves_its_next_blocks_in_memory(
    tmp_path: Path,
) -> None:
    """Read-ahead that runs far ahead of a slow reader (a fast link) does not push the blocks
    the reader needs next out of memory: those landing once memory is full of unread blocks
    stay on disk only.  When landing blocks evicted the nearest ones, the reader read almost
    every block a second time, back from disk."""
    blocks = 128
    data = random_bytes(blocks * BS, 22)
    limit = 2 * WARM_AHEAD * BS
    rig = make_rig(
        tmp_path,
        {"a.bin": data},
        memory_blocks=limit,
        readahead_initial=16 * BS,
        readahead_max=128 * BS,
        readahead_budget=256 * BS,
    )

    async def body(fs: ArchiveFS) -> list[int]:
        loaded: list[int] = []
        load = fs.reader._load_blocks

        def counted(wanted: list[BlockId], backup: bool) -> list[memoryview | None]:
            found = load(wanted, backup)
            pairs = zip(wanted, found, strict=True)
            loaded.extend(block.number for block, data in pairs if data is not None)
            return found

        fs.reader._load_blocks = counted  # type: ignore[method-assign]
        handle = await open_path(fs, "a.bin")
        for index in range(blocks):
            got = await fs.read(handle, index * BS, BS)
            assert bytes(got) == data[index * BS : (index + 1) * BS]
            assert fs.reader._memory_bytes <= limit
            await trio.sleep(0.01)  # slower than the store: read-ahead runs far ahead
        await fs.release(handle)
        return loaded

    reloaded = run_fs(rig, body)
    assert len({start for _, start, _ in rig.store.calls}) < blocks  # read ahead, coalesced
    # Only blocks that landed while memory was full come back from disk, each once.
    assert len(reloaded) == len(set(reloaded)) <= blocks - limit // BS
    rig.close()


def test_disk_cache_serves_after_restart_without_store(tmp_path: Path) -> None:
    """Blocks cached by one mount serve the next one even when the store is down."""
    data = random_bytes(700_000, 13)
    rig = make_rig(tmp_path, {"a.bin": data})

    async def warm(fs: ArchiveFS) -> None:
        assert await read_all(fs, "a.bin") == data
        assert await wait_until(lambda: fs.reader.stats.requests_in_flight == 0)

    run_fs(rig, warm)
    before = len(rig.store.calls)
    rig.store.fail_all = True

    async def cold(fs: ArchiveFS) -> None:
        assert await read_all(fs, "a.bin") == data
        handle = await open_path(fs, "a.bin")
        assert bytes(await fs.read(handle, 333_333, 5000)) == data[333_333:338_333]
        assert fs.reader.stats.disk_hits > 0
        assert fs.reader.stats.errors == 0

    run_fs(rig, cold)
    assert len(rig.store.calls) == before
    rig.close()


async def read_without_read_ahead(fs: ArchiveFS, path: str) -> bytes:
    """The whole file in two non-sequential requests, so read-ahead stays out of the way."""
    handle = await open_path(fs, path)
    tail = bytes(await fs.read(handle, 1, 1 << 30))
    head = bytes(await fs.read(handle, 0, 1))
    await fs.release(handle)
    return head + tail


def test_sequential_reader_of_cached_file_is_warmed_into_memory(tmp_path: Path) -> None:
    """On a second mount, a sequential reader of a cached file finds the blocks ahead of it
    already loaded from disk into memory, and nothing is fetched."""
    data = random_bytes(16 * BS, 18)
    rig = make_rig(tmp_path, {"a.bin": data})

    async def warm_up(fs: ArchiveFS) -> None:
        assert await read_all(fs, "a.bin") == data

    run_fs(rig, warm_up)
    fetched = len(rig.store.calls)

    async def reread(fs: ArchiveFS) -> None:
        handle = await open_path(fs, "a.bin")
        for index in range(16):
            got = await fs.read(handle, index * BS, BS)
            assert bytes(got) == data[index * BS : (index + 1) * BS]
            await trio.sleep(0.05)  # a reader that processes what it read
        stats = fs.reader.stats
        assert stats.memory_hits >= 14
        assert stats.fetched_blocks == stats.prefetched_blocks == 0

    run_fs(rig, reread)
    assert len(rig.store.calls) == fetched
    rig.close()


def test_warm_up_loads_whole_batches_not_a_block_per_read(tmp_path: Path) -> None:
    """A reader advancing a block at a time: the warm-up waits until a whole batch is missing,
    so loading 64 cached blocks costs about 64 / WARM_BATCH worker-thread calls, not 64 (each
    call is a thread hop with its wake-ups, which cost the mount more than the reads)."""
    data = random_bytes(64 * BS, 19)
    rig = make_rig(tmp_path, {"a.bin": data})

    async def warm_up(fs: ArchiveFS) -> None:
        assert await read_all(fs, "a.bin") == data

    run_fs(rig, warm_up)

    async def reread(fs: ArchiveFS) -> int:
        calls = []
        load = fs.reader._load_blocks

        def counted(blocks: list[BlockId], backup: bool) -> list[memoryview | None]:
            calls.append(len(blocks))
            return load(blocks, backup)

        fs.reader._load_blocks = counted  # type: ignore[method-assign]
        handle = await open_path(fs, "a.bin")
        for index in range(64):
            got = await fs.read(handle, index * BS, BS)
            assert bytes(got) == data[index * BS : (index + 1) * BS]
            await trio.sleep(0.002)
        await fs.release(handle)
        assert fs.reader.stats.memory_hits >= 56
        return len(calls)

    assert run_fs(rig, reread) <= 64 // WARM_BATCH + 4
    rig.close()


def test_corrupt_cached_block_is_refetched(tmp_path: Path) -> None:
    """A damaged block on disk is dropped and fetched again: the reader still gets right bytes."""
    data = random_bytes(4 * BS, 14)
    rig = make_rig(tmp_path, {"a.bin": data}, small_object=MiB, fetch_chunk=MiB)

    async def read(fs: ArchiveFS) -> None:
        assert await read_without_read_ahead(fs, "a.bin") == data
        assert fs.reader.stats.prefetched_blocks == 0

    run_fs(rig, read)
    assert rig.store.calls == [("a.bin", 0, len(data))]
    corrupt_one_block(rig.config.cache.directory / "blocks")
    run_fs(rig, read)
    assert rig.cache.corrupt_blocks == 1
    assert len(rig.store.calls) == 2
    start, end = rig.store.calls[1][1:]
    assert end - start == BS  # only the damaged block
    run_fs(rig, read)
    assert len(rig.store.calls) == 2  # healed: served from disk again
    rig.close()


def test_random_reads_of_cached_blocks_read_only_their_pieces(tmp_path: Path) -> None:
    """On a later mount, a random reader of a cached file gets each small read from the disk
    cache's pieces (the whole block neither loaded nor kept in memory), a sequential reader
    still loads whole blocks, and a damaged piece is fetched again, never served."""
    block = 8 * PIECE
    data = random_bytes(12 * block + 999, 21)
    rig = make_rig(tmp_path, {"a.bin": data}, block_size=block, fetch_chunk=4 * block)

    async def fill(fs: ArchiveFS) -> None:
        assert await read_all(fs, "a.bin") == data
        assert await wait_until(lambda: fs.reader.stats.requests_in_flight == 0)

    run_fs(rig, fill)
    fetched = len(rig.store.calls)
    spans = [(5 * block + 3 * PIECE, PIECE), (block + 17, 5000), (12 * block + 10, 989)]

    async def scattered(fs: ArchiveFS) -> None:
        loaded = []
        load = fs.reader._load_blocks

        def counted(blocks: list[BlockId], backup: bool) -> list[memoryview | None]:
            loaded.extend(blocks)
            return load(blocks, backup)

        fs.reader._load_blocks = counted  # type: ignore[method-assign]
        handle = await open_path(fs, "a.bin")
        for offset, size in spans:
            got = await fs.read(handle, offset, size)
            assert bytes(got) == data[offset : offset + size]
        assert fs.reader.stats.disk_hits == len(spans)
        assert not loaded and not fs.reader._memory

    run_fs(rig, scattered)
    assert len(rig.store.calls) == fetched
    path = next(
        path
        for path in value_files(rig.config.cache.directory / "blocks")
        if path.stat().st_size == stored_length(block, sealed=False)
    )
    flip = bytearray(path.read_bytes())
    flip[-PIECE // 2] ^= 0xFF  # inside the block's last piece
    path.write_bytes(bytes(flip))

    async def every_last_piece(fs: ArchiveFS) -> None:
        handle = await open_path(fs, "a.bin")
        for index in (3, 7, 1, 9, 0, 5, 11, 2, 10, 4, 8, 6):
            offset = index * block + block - 100
            got = await fs.read(handle, offset, 100)
            assert bytes(got) == data[offset : offset + 100], index

    run_fs(rig, every_last_piece)
    assert rig.cache.corrupt_blocks == 1
    assert len(rig.store.calls) == fetched + 1
    rig.close()


def test_failed_cache_inserts_do_not_fail_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the disk cache refusing every insert, reads still return the fetched bytes."""
    data = random_bytes(300_000, 15)
    rig = make_rig(tmp_path, {"a.bin": data})

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rig.cache._store, "set", full)

    async def body(fs: ArchiveFS) -> None:
        assert await read_all(fs, "a.bin") == data

    run_fs(rig, body)
    assert rig.cache.failed_inserts > 0
    assert rig.cache.block_count() == 0
    rig.close()


def test_reader_read_edges(tmp_path: Path) -> None:
    """Reads at or past the end, and of zero bytes, return nothing without a request."""
    data = random_bytes(BS + 10, 16)
    rig = make_rig(tmp_path, {"a.bin": data, "empty.bin": b""})

    async def body(fs: ArchiveFS) -> None:
        version = ObjectVersion("a.bin", rig.store.head("a.bin").etag, len(data))
        assert bytes(await fs.reader.read(version, len(data), 10)) == b""
        assert bytes(await fs.reader.read(version, len(data) + 5000, 10)) == b""
        assert bytes(await fs.reader.read(version, 5, 0)) == b""
        assert rig.store.calls == []
        assert bytes(await fs.reader.read(version, BS - 3, 100)) == data[BS - 3 :]
        empty = await open_path(fs, "empty.bin")
        assert bytes(await fs.read(empty, 0, 4096)) == b""

    run_fs(rig, body)
    assert rig.store.calls_for("empty.bin") == []
    rig.close()
