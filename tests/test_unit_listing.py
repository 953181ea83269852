"""The first listing runs while the mount answers: what is cataloged is served at once, and
nothing is said not to exist (nor created, nor listed whole) before the listing gets there."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from helpers_unit import InstrumentedStore, Rig, make_rig, run_fs, wait_until

from cloudfs.catalog import ROOT, Catalog
from cloudfs.config import DicomOptions
from cloudfs.errors import FsError, Unavailable
from cloudfs.fs import ArchiveFS
from cloudfs.listing import FirstListing, passed
from cloudfs.store import ObjectInfo

FILES = {key: key.encode() * 10 for key in ("a1", "a2", "b1", "b2", "c1", "d/e1", "d/e2")}


class PausedListing(InstrumentedStore):
    """A store whose listing stops before each key of ``pause_at`` until ``resume()`` (one
    call per pause), and fails at the first instead while ``fail`` is set (each failure clears
    it)."""

    def __init__(self, inner: InstrumentedStore, *pause_at: str) -> None:
        super().__init__(inner.inner)
        self.pauses = {key: threading.Event() for key in pause_at}
        self.fail = False
        self.listed_after: list[str] = []

    def resume(self) -> None:
        next(pause for pause in self.pauses.values() if not pause.is_set()).set()

    def list(self, after: str = "") -> Iterator[ObjectInfo]:
        self.listed_after.append(after)
        for info in self.inner.list(after):
            if info.key in self.pauses:
                if self.fail:
                    self.fail = False
                    raise Unavailable("store down")
                self.pauses[info.key].wait(30)
            yield info


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches of two keys, so a handful of keys makes several."""
    monkeypatch.setattr("cloudfs.catalog._BATCH", 2)


def first_mount(
    tmp_path: Path, *pause_at: str, dicom: DicomOptions | None = None
) -> tuple[PausedListing, Rig]:
    """A rig over FILES whose catalog has never been listed, and its pausing store."""
    rig = make_rig(tmp_path, FILES, dicom=dicom)
    store = PausedListing(rig.store, *pause_at)
    rig.store = store
    fresh = tmp_path / "fresh-catalog.db"
    rig.catalog = Catalog(fresh)
    return store, rig


def test_a_prefix_is_passed_once_the_cursor_is_beyond_all_its_keys() -> None:
    assert passed("b", "a/")
    assert passed("a0", "a/")  # "0" sorts after "/": every "a/..." key came before
    assert not passed("a/x", "a/")
    assert not passed("a.", "a/")  # "." sorts before "/": "a/..." keys are still to come
    assert not passed("zzz", "")  # only the end of the listing completes the root


@pytest.mark.usefixtures("small_batches")
def test_first_mount_serves_what_is_listed_and_waits_for_the_rest(tmp_path: Path) -> None:
    store, rig = first_mount(tmp_path, "b2")  # batches: a1 a2 | b1 (b2 waits)

    async def body(fs: ArchiveFS) -> None:
        fs.listing.wait = 0.2
        assert fs.listing.running
        assert await wait_until(lambda: fs.listing.cursor == "a2")
        found = await fs.lookup(ROOT, "a1")
        assert found is not None and found.size == len(FILES["a1"])
        assert await fs.lookup(ROOT, "a0") is None  # sorts before the cursor: known absent
        for attempt in (fs.lookup(ROOT, "c1"), fs.opendir(ROOT)):
            with pytest.raises(FsError) as refused:
                await attempt
            assert refused.value.errno == errno.EAGAIN
        # Creating a name the store may hold would overwrite that object at upload.
        with pytest.raises(FsError) as refused:
            await fs.create(ROOT, "c1", 0o644, os.O_WRONLY, 0, 0)
        assert refused.value.errno == errno.EAGAIN
        with pytest.raises(Unavailable):
            await fs.refresh()
        assert (await fs.status())["catalog"]["first_listing"] == {"objects": 2, "at": "a2"}

        fs.listing.wait = 10
        store.resume()
        found = await fs.lookup(ROOT, "c1")  # wakes as the listing passes it
        assert found is not None and found.size == len(FILES["c1"])
        assert await wait_until(lambda: not fs.listing.running)
        handle = await fs.opendir(ROOT)
        names = [name for name, _ in await fs.readdir(handle, 0)]
        assert sorted(names) == ["a1", "a2", "b1", "b2", "c1", "d"]
        assert (await fs.status())["catalog"]["first_listing"] is None

    run_fs(rig, body)
    assert rig.catalog.get_meta("synced_at")
    rig.close()


@pytest.mark.usefixtures("small_batches")
def test_a_directory_is_listed_once_the_listing_has_passed_it(tmp_path: Path) -> None:
    store, rig = first_mount(tmp_path, "d/e2")  # a1 a2 | b1 b2 | c1 d/e1 | d/e2

    async def body(fs: ArchiveFS) -> None:
        fs.listing.wait = 0.2
        assert await wait_until(lambda: fs.listing.cursor == "d/e1")
        d = await fs.lookup(ROOT, "d")
        assert d is not None
        with pytest.raises(FsError):
            await fs.opendir(d.ino)  # d/e2 may come yet
        store.resume()
        assert await wait_until(lambda: not fs.listing.running)
        handle = await fs.opendir(d.ino)
        assert sorted(name for name, _ in await fs.readdir(handle, 0)) == ["e1", "e2"]

    run_fs(rig, body)
    rig.close()


@pytest.mark.usefixtures("small_batches")
def test_a_first_listing_that_fails_goes_on_from_its_last_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store going down part way does not take the mount down: the listing tries again
    after a pause, from the last batch it cataloged, and ends complete."""
    monkeypatch.setattr("cloudfs.listing.RETRY_PAUSE", 0.05)
    store, rig = first_mount(tmp_path, "c1")
    store.fail = True
    store.resume()

    async def body(fs: ArchiveFS) -> None:
        assert await wait_until(lambda: not fs.listing.running)
        assert await fs.lookup(ROOT, "c1") is not None
        assert fs.listing.objects == len(FILES)  # both attempts' objects: progress never drops

    run_fs(rig, body)
    assert store.listed_after == ["", "b2"]
    rig.close()


@pytest.mark.usefixtures("small_batches")
def test_a_listing_that_goes_on_knows_what_the_last_attempt_cataloged(tmp_path: Path) -> None:
    """After a restart part way, names before the last batch cataloged are known at once,
    present or absent, before the listing that goes on has cataloged anything."""
    store, rig = first_mount(tmp_path, "c1")
    with pytest.raises(Unavailable):
        store.fail = True
        rig.catalog.sync(store.list(), resume="")
    assert rig.catalog.listing_checkpoint() == "b2"
    store.pauses = {"c1": threading.Event()}  # the listing that goes on waits before c1

    async def body(fs: ArchiveFS) -> None:
        fs.listing.wait = 0.2
        assert fs.listing.running and fs.listing.batches == 0
        # the progress shown goes on from the objects the last attempt cataloged
        assert (await fs.status())["catalog"]["first_listing"] == {"objects": 4, "at": "b2"}
        assert await fs.lookup(ROOT, "a0") is None  # absent, known without waiting
        assert await fs.lookup(ROOT, "b1") is not None
        store.resume()
        assert await wait_until(lambda: not fs.listing.running)
        assert fs.listing.objects == len(FILES)

    run_fs(rig, body)
    rig.close()


def test_a_complete_catalog_knows_every_prefix() -> None:
    listing = FirstListing(running=False, wait=0)
    assert listing.listed("")
    assert listing.listed("anything/")


@pytest.mark.usefixtures("small_batches")
def test_a_name_is_found_as_soon_as_a_batch_holds_it(tmp_path: Path) -> None:
    """A lookup waiting for the listing answers with the batch that catalogs the name, not
    once the listing has passed everything under it (a directory of 25,000 objects kept a
    stat of the directory waiting until all of them were listed)."""
    store, rig = first_mount(tmp_path, "d/e1", "d/e2")  # a1 a2 | b1 b2 | c1 d/e1 | d/e2

    async def body(fs: ArchiveFS) -> None:
        fs.listing.wait = 10
        assert await wait_until(lambda: fs.listing.cursor == "b2")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, store.resume)  # d/e1 comes, d/e2 waits
            with trio.fail_after(5):
                found = await fs.lookup(ROOT, "d")
        assert found is not None and found.is_dir
        assert fs.listing.cursor == "d/e1" and not fs.listing.listed("d/")
        store.resume()

    run_fs(rig, body)
    rig.close()


@pytest.mark.usefixtures("small_batches")
def test_header_reads_give_way_to_the_first_listing_and_run_once_it_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DICOM index reads no header at full pace while the first listing runs: its GETs
    competed with the listing's and made it half as slow again."""
    monkeypatch.setattr("cloudfs.studies._MAX_YIELD", 60.0)
    store, rig = first_mount(tmp_path, "b2", dicom=DicomOptions(view_dir=""))

    async def body(fs: ArchiveFS) -> None:
        assert fs.studies is not None
        assert await wait_until(lambda: fs.listing.cursor == "a2")
        await trio.sleep(0.5)  # the indexer has been woken by the batches so far
        assert fs.busy() and fs.studies.headers_read == 0
        store.resume()
        assert await wait_until(lambda: not fs.listing.running)
        assert await wait_until(lambda: fs.studies.headers_read == len(FILES), timeout=10)
        assert not fs.busy()

    run_fs(rig, body)
    rig.close()
