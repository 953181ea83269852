"""Study prefetch order, the background indexer, study prefetch through the read path, pins and
explicit prefetch: an ArchiveFS over a local store driven by trio, no kernel, no network.

Instances are real DICOM bytes from ``synthetic_study``, small (192x192 pixels, two 64 KiB blocks
each) so that every instance spans blocks and a test writes well under a megabyte per study."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from dicom_samples import study_uids, synthetic_study
from helpers_unit import (
    BS,
    InstrumentedStore,
    Rig,
    ino_of,
    make_rig,
    open_path,
    read_all,
    run_fs,
    wait_until,
)

from cloudfs import studies as studies_module
from cloudfs.cache import BlockId
from cloudfs.catalog import ROOT
from cloudfs.config import DicomOptions, MiB, WriteOptions, format_size
from cloudfs.dicom import HEADER_PROBE
from cloudfs.dicom_index import Instance
from cloudfs.errors import DiskFull
from cloudfs.fs import ArchiveFS
from cloudfs.store import ObjectStore
from cloudfs.studies import Studies, _around, _Job

pytestmark = pytest.mark.timeout(60)

PIXELS = 192
"""Rows and columns of the test images: 72 KiB of pixels, so an instance is two blocks."""


# -- prefetch order --------------------------------------------------------------------------------


def instance(series: str, number: int | None, key: str | None = None) -> Instance:
    return Instance(
        key=key or f"{series}/{number}",
        etag='"1"',
        size=1000,
        patient_id="PAT",
        study_uid="1.2.3",
        study_date="20240101",
        series_uid=series,
        series_number=1,
        modality="CT",
        instance_number=number,
    )


def numbers(queue: list[Instance]) -> list[int | None]:
    return [i.instance_number for i in queue]


def test_around_alternates_next_and_previous() -> None:
    series = [instance("A", n) for n in range(1, 8)]
    assert numbers(_around(series, 3)) == [5, 3, 6, 2, 7, 1]
    assert numbers(_around(series, 0)) == [2, 3, 4, 5, 6, 7]
    assert numbers(_around(series, 6)) == [6, 5, 4, 3, 2, 1]
    assert numbers(_around(series, 1)) == [3, 1, 4, 5, 6, 7]
    assert numbers(_around(series, 5)) == [7, 5, 4, 3, 2, 1]


@pytest.mark.parametrize("length", range(0, 9))
def test_around_covers_every_other_instance_once_nearest_first(length: int) -> None:
    """From any position: each other instance exactly once, by distance, the next one before
    the previous one at the same distance."""
    series = [instance("A", n) for n in range(length)]
    for position in range(length):
        order = _around(series, position)
        indices = [series.index(i) for i in order]
        assert sorted(indices) == [i for i in range(length) if i != position]
        assert indices == sorted(indices, key=lambda i: (abs(i - position), i < position))


def queued_job(opened: Instance | None, series_a: int = 9, series_b: int = 3) -> _Job:
    """A job whose queue holds series A (less ``opened``) followed by series B, in index order."""
    queue = [instance("A", n) for n in range(1, series_a + 1)]
    queue = [i for i in queue if opened is None or i.key != opened.key]
    queue += [instance("B", n) for n in range(1, series_b + 1)]
    return _Job("1.2.3", queue, len(queue), 0)


def test_recentre_puts_the_rest_of_the_series_around_the_opened_instance_first() -> None:
    """The first open: the opened instance is not queued; its series comes nearest first, the
    other series after, in their order."""
    opened = instance("A", 5)
    job = queued_job(opened)
    before = list(job.queue)
    job.recentre(opened)
    assert [(i.series_uid, i.instance_number) for i in job.queue] == [
        ("A", 6), ("A", 4), ("A", 7), ("A", 3), ("A", 8), ("A", 2), ("A", 9), ("A", 1),
        ("B", 1), ("B", 2), ("B", 3),
    ]  # fmt: skip
    assert sorted(job.queue, key=lambda i: i.key) == sorted(before, key=lambda i: i.key)


def test_recentre_follows_the_reader_and_orders_by_instance_number() -> None:
    """A later open elsewhere in the series re-centres what is left; the queue's own order does
    not matter, instance numbers do, and instances without a number come last."""
    job = queued_job(instance("A", 5))
    job.queue = job.queue[::-1] + [instance("A", None, key="A/unnumbered")]
    job.queue = [i for i in job.queue if i.instance_number not in (4, 6)]  # fetched meanwhile
    job.recentre(instance("A", 4))
    assert [(i.series_uid, i.instance_number) for i in job.queue] == [
        ("A", 7), ("A", 3), ("A", 8), ("A", 2), ("A", 9), ("A", 1), ("A", None),
        ("B", 3), ("B", 2), ("B", 1),
    ]  # fmt: skip


def test_recentre_keeps_the_queue_when_the_series_is_done() -> None:
    job = queued_job(None, series_a=0)
    before = list(job.queue)
    job.recentre(instance("A", 4))
    assert job.queue == before
    job.recentre(instance("C", 1))
    assert job.queue == before


def test_recentre_on_a_queued_instance_takes_it_out_and_queues_the_next_first() -> None:
    """Every open after the first is of an instance still queued (``Studies.opened`` looks the
    key up among the queued ones): the result must be the same as for an unqueued one."""
    opened = instance("A", 5)
    job = queued_job(None)
    job.recentre(opened)
    expected = queued_job(opened)
    expected.recentre(opened)
    assert [i.key for i in job.queue] == [i.key for i in expected.queue]


# -- with a filesystem -----------------------------------------------------------------------------


def study(patient: str, number: int, series: list[tuple[str, int]], date: str) -> dict[str, bytes]:
    return dict(
        synthetic_study(patient, number, series, study_date=date, rows=PIXELS, columns=PIXELS)
    )


def dicom_rig(tmp: Path, files: dict[str, bytes], size_limit: int = 64 * MiB, **dicom: Any) -> Rig:
    """A rig with the header index on: ``dicom`` overrides DicomOptions, ``size_limit`` is the
    block cache's."""
    options: dict[str, Any] = {"index": True, "view_dir": "@dicom", "prefetch_threads": 4}
    return make_rig(tmp, files, dicom=DicomOptions(**(options | dicom)), size_limit=size_limit)


def blocks(rig: Rig, keys: list[str] | dict[str, bytes]) -> list[BlockId]:
    """Every block of the current version of each object."""
    found: list[BlockId] = []
    for key in keys:
        node = rig.catalog.by_key(key)
        assert node is not None and node.etag is not None, key
        count = -(-node.size // rig.cache.block_size)
        found.extend(BlockId(key, node.etag, n) for n in range(count))
    return found


def all_cached(rig: Rig, keys: list[str] | dict[str, bytes]) -> Callable[[], bool]:
    wanted = blocks(rig, keys)
    return lambda: all(rig.cache.contains(block) for block in wanted)


def none_cached(rig: Rig, keys: list[str] | dict[str, bytes]) -> bool:
    return not any(rig.cache.contains(block) for block in blocks(rig, keys))


def studies_of(fs: ArchiveFS) -> Studies:
    assert fs.studies is not None, "the rig was made without DICOM indexing"
    return fs.studies


async def indexed(fs: ArchiveFS, timeout: float = 15.0) -> dict[str, Any]:
    """The index status once nothing is pending."""
    studies = studies_of(fs)
    status: dict[str, Any] = {}
    with trio.move_on_after(timeout):
        while True:
            status = await studies.status()
            if status["pending"] == 0:
                return status
            await trio.sleep(0.02)
    raise AssertionError(f"indexing did not finish: {status}")


async def idle(fs: ArchiveFS, timeout: float = 15.0) -> None:
    """Wait until no study is being prefetched."""
    studies = studies_of(fs)
    with trio.move_on_after(timeout):
        while (await studies.status())["studies_prefetching"]:
            await trio.sleep(0.02)
        return
    raise AssertionError("study prefetch did not finish")


def test_indexer_reads_every_header_and_marks_other_files(tmp_path: Path) -> None:
    """Every object is read once: instances are indexed and shown in the view, other files are
    recorded as not DICOM, and nothing is left pending."""
    ct = study("PAT-1", 1, [("CT", 3), ("CT", 2)], "20240105")
    mr = study("PAT-2", 2, [("MR", 2)], "20230101")
    rig = dicom_rig(tmp_path, {**ct, **mr, "notes/readme.txt": b"not an image\n" * 50})

    async def body(fs: ArchiveFS) -> dict[str, Any]:
        status = await indexed(fs)
        view = await fs.lookup(await ino_of(fs, "@dicom/by-patient"), "PAT-1")
        assert view is not None and view.is_dir
        return status

    status = run_fs(rig, body)
    rig.close()
    assert status["objects"] == 8
    assert (status["dicom"], status["not_dicom"], status["pending"]) == (7, 1, 0)
    assert (status["patients"], status["studies"], status["series"]) == (2, 2, 3)
    assert status["placed_in_view"] == 7
    assert status["headers_read"] == 8 and status["read_failures"] == 0
    # One ranged GET of the first 64 KiB per object, never the whole object.
    assert sorted(rig.store.calls) == sorted(
        (key, 0, min(len(data), HEADER_PROBE)) for key, data in rig.files.items()
    )


def test_an_index_round_that_cannot_be_recorded_is_retried_and_the_mount_lives_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk under the catalog is full when the indexer records a round: the round is
    logged and tried again later; the failure never escapes into the daemon (which would
    unmount it)."""
    monkeypatch.setattr(studies_module, "_FAILURE_PAUSE", 0.05)
    rig = dicom_rig(tmp_path, study("PAT-1", 1, [("CT", 2)], "20240105"))
    refusals = [DiskFull("catalog: not written, the disk is full")]

    async def body(fs: ArchiveFS) -> dict[str, Any]:
        index = studies_of(fs).index
        record = index.record

        def full_once(results: Any) -> Any:
            if refusals:
                raise refusals.pop()
            return record(results)

        monkeypatch.setattr(index, "record", full_once)
        status = await indexed(fs)
        assert await fs.lookup(ROOT, "PAT-1") is not None  # the filesystem still answers
        return status

    status = run_fs(rig, body)
    rig.close()
    assert not refusals
    assert (status["dicom"], status["pending"]) == (2, 0)
    assert "the disk is full" in status["last_error"]


def test_indexing_waits_for_a_quiet_moment_but_never_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the mount answers requests, header reads wait (a listing of a new bucket is not
    slowed by indexing it); under constant load each reading task reads one header every
    _MAX_YIELD seconds, never a whole batch at once."""
    monkeypatch.setattr(studies_module, "_MAX_YIELD", 0.5)
    rig = dicom_rig(tmp_path, study("PAT-1", 1, [("CT", 12)], "20240105"))
    tasks = rig.config.dicom.index_threads
    assert tasks < 12

    async def body(fs: ArchiveFS) -> tuple[int, int, float]:
        fs.active_at = time.monotonic() + 3600  # a request "now", for the whole test
        started = time.monotonic()
        await trio.sleep(0.25)
        before = studies_of(fs).headers_read
        await trio.sleep(0.5)
        first_round = studies_of(fs).headers_read
        status = await indexed(fs)
        return before, first_round, time.monotonic() - started if status["pending"] == 0 else -1

    before, first_round, seconds = run_fs(rig, body)
    rig.close()
    assert before == 0
    assert first_round <= tasks
    assert 0.5 * -(-12 // tasks) <= seconds < 15


def test_opening_an_instance_makes_its_study_local(tmp_path: Path) -> None:
    """Open one instance of a two-series study (as a viewer does, then read it): every block of
    every instance of the study ends up in the block cache; another patient's study does not."""
    ct = study("PAT-1", 1, [("CT", 6), ("CT", 4)], "20240105")
    other = study("PAT-2", 2, [("CT", 5)], "20240106")
    rig = dicom_rig(tmp_path, {**ct, **other})
    opened = sorted(ct)[3]

    async def body(fs: ArchiveFS) -> dict[str, Any]:
        await indexed(fs)
        assert none_cached(rig, list(ct) + list(other)), "indexing must not fill the cache"
        assert await read_all(fs, opened) == ct[opened]
        assert await wait_until(all_cached(rig, ct), timeout=15)
        await idle(fs)
        return await studies_of(fs).status()

    status = run_fs(rig, body)
    assert none_cached(rig, other)
    assert status["studies_prefetched"] == 1 and status["read_failures"] == 0
    rig.close()


def test_study_larger_than_max_study_size_is_read_on_demand(tmp_path: Path) -> None:
    ct = study("PAT-1", 1, [("CT", 16)], "20240105")
    rig = dicom_rig(tmp_path, ct, max_study_size=1 * MiB)
    assert sum(map(len, ct.values())) > MiB
    opened = sorted(ct)[0]

    async def body(fs: ArchiveFS) -> None:
        await indexed(fs)
        assert await read_all(fs, opened) == ct[opened]
        await idle(fs)

    run_fs(rig, body)
    assert all_cached(rig, [opened])()
    assert none_cached(rig, [key for key in ct if key != opened])
    rig.close()


def test_priors_larger_than_a_study_prefetch_takes_are_left_on_demand(tmp_path: Path) -> None:
    """A prior study over ``max_study_size`` is read on demand, like an opened study that size."""
    current = study("PAT-1", 1, [("CT", 3)], "20240105")
    prior = study("PAT-1", 2, [("CT", 16)], "20230105")
    rig = dicom_rig(tmp_path, {**current, **prior}, max_study_size=1 * MiB, priors=1)
    assert sum(map(len, current.values())) < MiB < sum(map(len, prior.values()))

    async def body(fs: ArchiveFS) -> None:
        await indexed(fs)
        handle, _ = await fs.open(await ino_of(fs, sorted(current)[0]), os.O_RDONLY)
        await fs.release(handle)
        assert await wait_until(all_cached(rig, sorted(current)[1:]), timeout=15)
        await idle(fs)

    run_fs(rig, body)
    assert none_cached(rig, prior)
    rig.close()


def test_pin_refuses_more_than_its_share_then_pins_and_unpins(tmp_path: Path) -> None:
    """With a 4 MiB cache and half of it for pins: a 300 KB study is pinned (fetched, every
    block pinned in the cache) and a 2 MB one that fits alone is refused on top of it, with
    the sizes in the message; unpinning leaves the blocks cached but evictable."""
    small = study("PAT-1", 1, [("CT", 4)], "20240105")
    big = study("PAT-2", 2, [("CT", 26)], "20240106")
    rig = dicom_rig(tmp_path, {**small, **big}, size_limit=4 * MiB, pin_fraction=0.5)
    small_uid, _ = study_uids("PAT-1", 1, 1)
    big_uid, _ = study_uids("PAT-2", 2, 1)
    limit = 2 * MiB
    small_size, big_size = sum(map(len, small.values())), sum(map(len, big.values()))
    assert big_size < limit < small_size + big_size

    async def body(fs: ArchiveFS) -> None:
        studies = studies_of(fs)
        await indexed(fs)
        with pytest.raises(ValueError, match="nothing matches"):
            await studies.pin({"patient": "NOBODY"})
        with pytest.raises(ValueError, match="would pin") as refused:
            await studies.pin({"from": "20240101"})
        assert format_size(small_size + big_size) in str(refused.value)
        assert (await studies.pins())["pins"] == []

        summary = await studies.pin({"study": small_uid})
        assert (summary["pinned_files"], summary["pinned_bytes"]) == (4, small_size)
        assert summary["limit"] == limit
        assert await wait_until(all_cached(rig, small), timeout=15)
        assert await wait_until(
            lambda: all(rig.cache.is_pinned(block) for block in blocks(rig, small)), timeout=5
        )

        with pytest.raises(ValueError) as refused:
            await studies.pin({"study": big_uid})
        message = str(refused.value)
        for size in (small_size + big_size, limit, 4 * MiB):
            assert format_size(size) in message, message
        assert (await studies.pins())["pins"] == [{"study": small_uid}]

        await studies.unpin({"study": small_uid})
        assert not any(rig.cache.is_pinned(block) for block in blocks(rig, small))
        assert all_cached(rig, small)()
        assert (await studies.pins())["pinned_files"] == 0
        with pytest.raises(ValueError, match="no pin"):
            await studies.unpin({"study": small_uid})

        # Alone, the big study fits.
        summary = await studies.pin({"study": big_uid})
        assert summary["pinned_bytes"] == big_size
        assert await wait_until(all_cached(rig, big), timeout=15)
        assert await wait_until(
            lambda: all(rig.cache.is_pinned(block) for block in blocks(rig, big)), timeout=5
        )

    run_fs(rig, body)
    assert not any(rig.cache.is_pinned(block) for block in blocks(rig, small))
    rig.close()


async def prefetched(studies: Studies, selector: dict[str, str]) -> dict[str, Any]:
    """Start an explicit prefetch and poll its progress until it is finished."""
    progress = await studies.prefetch(selector)
    with trio.move_on_after(15):
        while not progress["finished"]:
            await trio.sleep(0.02)
            progress = studies.prefetch_progress(progress["id"])
    assert progress["finished"], progress
    return progress


def test_explicit_prefetch_fetches_the_selection_and_reports_progress(tmp_path: Path) -> None:
    ct = study("PAT-1", 1, [("CT", 5), ("CT", 3)], "20240105")
    other = study("PAT-2", 2, [("CT", 3)], "20240106")
    rig = dicom_rig(tmp_path, {**ct, **other})

    async def body(fs: ArchiveFS) -> tuple[dict[str, Any], dict[str, Any]]:
        studies = studies_of(fs)
        await indexed(fs)
        with pytest.raises(ValueError, match="nothing matches"):
            await studies.prefetch({"modality": "MR"})
        with pytest.raises(ValueError, match="no prefetch"):
            studies.prefetch_progress(999)
        first = await prefetched(studies, {"patient": "PAT-1"})
        again = await prefetched(studies, {"patient": "PAT-1"})
        return first, again

    first, again = run_fs(rig, body)
    assert first["files_done"] == first["files"] == len(ct) and first["seconds"] >= 0
    assert first["bytes_done"] == first["bytes"] == sum(map(len, ct.values()))
    assert (first["failed"], first["last_error"]) == (0, "")
    assert all_cached(rig, ct)()
    assert none_cached(rig, other)
    # Everything was local the second time: nothing fetched.
    assert (again["files_done"], again["fetched_bytes"]) == (len(ct), 0)
    rig.close()


def test_explicit_prefetch_counts_every_byte_fetched(tmp_path: Path) -> None:
    """With several fetches at once, fetched_bytes still adds up to what was fetched."""
    ct = study("PAT-1", 1, [("CT", 8)], "20240105")
    rig = dicom_rig(tmp_path, ct, prefetch_threads=4)

    async def body(fs: ArchiveFS) -> dict[str, Any]:
        await indexed(fs)
        return await prefetched(studies_of(fs), {"patient": "PAT-1"})

    progress = run_fs(rig, body)
    rig.close()
    assert progress["fetched_bytes"] == progress["bytes"] == sum(map(len, ct.values()))


# -- priors, tiering, foreground reads and the index under a gated store ---------------------------


def today() -> str:
    """Today as StudyDate, in the UTC calendar the tiering window is computed in."""
    return time.strftime("%Y%m%d", time.gmtime())


async def open_and_release(fs: ArchiveFS, key: str) -> None:
    """Open an instance as a viewer does, without reading it."""
    await fs.release(await open_path(fs, key))


def test_opening_a_study_prefetches_its_most_recent_prior_not_a_newer_study(
    tmp_path: Path,
) -> None:
    """With one prior wanted: the patient's latest study dated before the opened one is made
    local; a newer study of the patient and an older prior stay in the cloud."""
    current = study("PAT-1", 1, [("CT", 3)], "20240105")
    prior = study("PAT-1", 2, [("CT", 3)], "20230105")
    older = study("PAT-1", 3, [("CT", 2)], "20200105")
    newer = study("PAT-1", 4, [("CT", 3)], "20250105")
    rig = dicom_rig(tmp_path, {**current, **prior, **older, **newer}, priors=1)
    opened, *rest = sorted(current)

    async def body(fs: ArchiveFS) -> None:
        await indexed(fs)
        await open_and_release(fs, opened)
        assert await wait_until(all_cached(rig, [*rest, *prior]), timeout=15)
        await idle(fs)

    run_fs(rig, body)
    assert none_cached(rig, newer), "a later study is no prior"
    assert none_cached(rig, older), "only the most recent prior was asked for"
    rig.close()


@pytest.mark.parametrize("study_prefetch", [True, False])
def test_a_study_written_through_the_mount_prefetches_its_prior(
    tmp_path: Path, study_prefetch: bool
) -> None:
    """A new study arriving through the write path has its prior made local, without anyone
    opening anything; with study prefetch off, it does not."""
    prior = study("PAT-1", 1, [("CT", 3)], "20230105")
    written = study("PAT-1", 2, [("CT", 2)], "20240105")
    rig = dicom_rig(tmp_path, prior, priors=1, study_prefetch=study_prefetch)
    rig.config = dataclasses.replace(rig.config, write=WriteOptions(upload_delay=0))

    async def body(fs: ArchiveFS) -> dict[str, Any]:
        await indexed(fs)
        assert none_cached(rig, prior)
        incoming = await fs.mkdir(ROOT, "incoming", 0o755, os.getuid(), os.getgid())
        for number, data in enumerate(written.values()):
            flags = os.O_WRONLY | os.O_CREAT
            handle, _ = await fs.create(
                incoming.ino, f"{number}.dcm", 0o644, flags, os.getuid(), os.getgid()
            )
            assert await fs.write(handle, 0, data) == len(data)
            await fs.release(handle)
        status = await indexed(fs)
        assert status["dicom"] == len(prior) + len(written), status
        if study_prefetch:
            assert await wait_until(all_cached(rig, prior), timeout=15)
        await idle(fs)
        return await studies_of(fs).status()

    status = run_fs(rig, body)
    # The new study's headers came from the bytes written, never from a GET.
    assert status["headers_read"] == len(prior) + len(written)
    assert [key for key, _, _ in rig.store.calls if key.startswith("incoming/")] == []
    if study_prefetch:
        assert all_cached(rig, prior)()
    else:
        assert none_cached(rig, prior)
        assert status["studies_prefetched"] == 0
    rig.close()


def test_tiering_pins_and_fetches_recent_studies_only(tmp_path: Path) -> None:
    """keep_recent_days=30: a study dated today is fetched ahead and pinned without being
    opened; a study from years ago is neither."""
    recent = study("PAT-1", 1, [("CT", 3)], today())
    old = study("PAT-1", 2, [("CT", 3)], "20200105")
    rig = dicom_rig(tmp_path, {**recent, **old}, keep_recent_days=30)

    async def body(fs: ArchiveFS) -> dict[str, Any]:
        await indexed(fs)
        assert await wait_until(all_cached(rig, recent), timeout=15)
        assert await wait_until(
            lambda: all(rig.cache.is_pinned(block) for block in blocks(rig, recent)), timeout=5
        )
        return await studies_of(fs).pins()

    pins = run_fs(rig, body)
    assert (pins["pins"], pins["pinned_files"]) == ([], len(recent))
    assert pins["pinned_bytes"] == sum(map(len, recent.values()))
    assert none_cached(rig, old)
    assert not any(rig.cache.is_pinned(block) for block in blocks(rig, old))
    rig.close()


class GatedStore(InstrumentedStore):
    """An InstrumentedStore whose ranged GETs of the keys in ``held`` wait until ``release()``,
    counting how many wait and the most GETs ever in flight at once."""

    def __init__(self, inner: ObjectStore) -> None:
        super().__init__(inner)
        self.held: set[str] = set()
        self.waiting = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self._gate = threading.Event()
        self._counts = threading.Lock()

    def get_range(self, key: str, start: int, end: int, etag: str) -> bytes:
        with self._counts:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            held = key in self.held and not self._gate.is_set()
            self.waiting += held
        try:
            if held:
                self._gate.wait(30)
                with self._counts:
                    self.waiting -= 1
            return super().get_range(key, start, end, etag)
        finally:
            with self._counts:
                self.in_flight -= 1

    def release(self) -> None:
        self._gate.set()


def gated_rig(
    tmp: Path, files: dict[str, bytes], small_object: int = BS, **dicom: Any
) -> tuple[Rig, GatedStore]:
    """A ``dicom_rig`` over a GatedStore; objects up to ``small_object`` are read whole."""
    options: dict[str, Any] = {"index": True, "view_dir": "@dicom", "prefetch_threads": 4}
    rig = make_rig(tmp, files, dicom=DicomOptions(**(options | dicom)), small_object=small_object)
    store = GatedStore(rig.store.inner)
    rig.store = store
    return rig, store


def test_foreground_reads_are_served_while_the_study_prefetch_is_held(tmp_path: Path) -> None:
    """The prefetch's GETs are held at the store, with more instances wanted at once than the
    rig has fetch threads: a foreground read of an instance it has not reached still completes
    at once, while the prefetch stays where it was."""
    ct = study("PAT-1", 1, [("CT", 8), ("CT", 4)], "20240105")
    # Instances are read whole with one GET, as the 8 MiB default does for real ones; eight at
    # once is twice the rig's fetch threads.
    rig, store = gated_rig(tmp_path, ct, small_object=4 * BS, prefetch_threads=8, priors=0)
    keys = list(ct)  # series 1 in instance order, then series 2
    opened, foreground = keys[3], keys[-1]  # the prefetch reaches the last instance last
    study_uid, _ = study_uids("PAT-1", 1, 2)

    async def body(fs: ArchiveFS) -> None:
        studies = studies_of(fs)
        await indexed(fs)
        store.held = set(ct) - {opened, foreground}
        try:
            assert await read_all(fs, opened) == ct[opened]
            assert await wait_until(lambda: store.waiting >= 2, timeout=5), store.waiting
            await trio.sleep(0.3)  # room for the prefetch to take every thread it may
            held = store.waiting
            expected = [{"study": study_uid, "done": 0, "total": len(ct) - 1}]
            assert (await studies.status())["studies_prefetching"] == expected
            assert none_cached(rig, [foreground])
            with trio.fail_after(5):
                assert await read_all(fs, foreground) == ct[foreground]
            assert store.waiting == held
            assert (await studies.status())["studies_prefetching"] == expected
        finally:
            store.release()
        assert await wait_until(all_cached(rig, ct), timeout=15)
        await idle(fs)

    run_fs(rig, body)
    rig.close()


def test_with_study_prefetch_off_opening_an_instance_fetches_only_it(tmp_path: Path) -> None:
    ct = study("PAT-1", 1, [("CT", 6), ("CT", 3)], "20240105")
    rig = dicom_rig(tmp_path, ct, study_prefetch=False)
    opened = sorted(ct)[2]

    async def body(fs: ArchiveFS) -> tuple[list[str], dict[str, Any]]:
        await indexed(fs)
        indexing = len(rig.store.calls)
        assert await read_all(fs, opened) == ct[opened]
        await idle(fs)
        return [key for key, _, _ in rig.store.calls[indexing:]], await studies_of(fs).status()

    fetched, status = run_fs(rig, body)  # returns once no fetch is left in flight
    assert set(fetched) == {opened}
    assert all_cached(rig, [opened])()
    assert none_cached(rig, [key for key in ct if key != opened])
    assert (status["studies_prefetched"], status["studies_prefetching"]) == (0, [])
    rig.close()


def test_at_most_index_threads_header_reads_run_at_once(tmp_path: Path) -> None:
    """Header GETs held at the store pile up to index_threads and no further; released, every
    object is indexed with one GET each."""
    ct = study("PAT-1", 1, [("CT", 8)], "20240105")
    rig, store = gated_rig(tmp_path, ct, index_threads=2)
    store.held = set(ct)

    async def body(fs: ArchiveFS) -> dict[str, Any]:
        try:
            assert await wait_until(lambda: store.waiting == 2, timeout=5), store.waiting
            await trio.sleep(0.2)  # room for any further read to start, were it allowed to
            assert (store.waiting, store.most_in_flight) == (2, 2)
        finally:
            store.release()
        return await indexed(fs)

    status = run_fs(rig, body)
    assert store.most_in_flight == 2
    assert (status["dicom"], status["headers_read"]) == (len(ct), len(ct))
    assert sorted(key for key, _, _ in store.calls) == sorted(ct)
    rig.close()
