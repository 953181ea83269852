"""The write path of the filesystem core, driven without a kernel, over a local-directory store."""

from __future__ import annotations

import dataclasses
import errno
import os
import threading
import time
from pathlib import Path

import pytest
import trio
from helpers_unit import Rig, ino_of, make_rig, read_all, run_fs, wait_until

from cloudfs.catalog import READY, ROOT
from cloudfs.config import WriteOptions
from cloudfs.errors import CloudfsError, FsError
from cloudfs.fs import ArchiveFS

UID, GID = os.getuid(), os.getgid()


def with_writes(rig: Rig, **options: object) -> Rig:
    rig.config = dataclasses.replace(rig.config, write=WriteOptions(**options))  # type: ignore[arg-type]
    return rig


async def create(fs: ArchiveFS, name: str, data: bytes, parent: int = ROOT) -> int:
    handle, _ = await fs.create(parent, name, 0o644, os.O_WRONLY | os.O_CREAT, UID, GID)
    assert await fs.write(handle, 0, data) == len(data)
    return handle


@pytest.mark.parametrize("sync_on_close", [False, True])
def test_close_journals_the_file_and_syncs_only_with_sync_on_close(
    tmp_path: Path, sync_on_close: bool
) -> None:
    """close (flush) journals the file as complete at once (its release may never come if the
    daemon stops first); with --sync-on-close it is also made durable, as by fsync."""
    rig = with_writes(make_rig(tmp_path, {}), sync_on_close=sync_on_close, upload_delay=3600)

    async def body(fs: ArchiveFS) -> tuple[int, int]:
        synced: list[int] = []
        durable = fs.staging.durable

        def counting(fd: int) -> None:
            synced.append(fd)
            durable(fd)

        fs.staging.durable = counting  # type: ignore[method-assign]
        handle = await create(fs, "a.dcm", b"x" * 1000)
        await fs.flush(handle)
        node = rig.catalog.lookup(ROOT, "a.dcm")
        assert node is not None
        await fs.release(handle)
        return node.dirty, len(synced)

    after_flush, syncs = run_fs(rig, body)
    assert after_flush == READY
    assert syncs == (1 if sync_on_close else 0)


@pytest.mark.parametrize("ask", ["lookup", "getattr", "readdir"])
def test_stat_during_the_last_close_shows_the_bytes_written(tmp_path: Path, ask: str) -> None:
    """A lookup, getattr or directory listing whose catalog read raced the last close of a file
    just written (the catalog still said 0 bytes, and the staged size left memory before the
    answer) never reports a size older than the bytes written: the kernel takes the size in
    any of these answers as the file's own."""
    rig = with_writes(make_rig(tmp_path, {}), upload_delay=3600)
    data = b"x" * 4096

    async def body(fs: ArchiveFS) -> int:
        handle = await create(fs, "a.dcm", data)
        ino = await ino_of(fs, "a.dcm")
        stale_read, go_on = threading.Event(), threading.Event()
        method = {"lookup": "lookup", "getattr": "get", "readdir": "children"}[ask]
        real = getattr(rig.catalog, method)

        def held_up(*args: object) -> object:
            found = real(*args)
            if not stale_read.is_set():
                stale_read.set()
                go_on.wait(10)
            return found

        setattr(rig.catalog, method, held_up)
        sizes: list[int] = []

        async def stat() -> None:
            if ask == "lookup":
                found = await fs.lookup(ROOT, "a.dcm")
                assert found is not None
                sizes.append(found.size)
            elif ask == "getattr":
                sizes.append((await fs.getattr(ino)).size)
            else:
                directory = await fs.opendir(ROOT)
                listed = dict(await fs.readdir(directory, 0))
                fs.releasedir(directory)
                sizes.append(listed["a.dcm"].size)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stat)
            await trio.to_thread.run_sync(stale_read.wait, 10)
            await fs.flush(handle)
            await fs.release(handle)
            go_on.set()
        return sizes[0]

    assert run_fs(rig, body) == len(data)


def test_written_bytes_read_back_and_go_up_then_staging_is_emptied(tmp_path: Path) -> None:
    """Bytes written are read back at once with the right size; once uploaded, the store holds
    them, the staging area is empty and reads come from the block cache, not the store."""
    rig = with_writes(make_rig(tmp_path, {}), upload_delay=0)
    data = os.urandom(300_000)

    async def body(fs: ArchiveFS) -> None:
        directory = await fs.mkdir(ROOT, "study", 0o755, UID, GID)
        handle = await create(fs, "1.dcm", data, parent=directory.ino)
        assert (await fs.getattr(await ino_of(fs, "study/1.dcm"))).size == len(data)
        assert bytes(await fs.read(handle, 1000, 50)) == data[1000:1050]
        await fs.fsync(handle)
        await fs.release(handle)
        assert await wait_until(lambda: (rig.source / "study" / "1.dcm").exists(), 10)
        assert await wait_until(lambda: fs.staging.used == 0, 10)
        calls = len(rig.store.calls)
        assert await read_all(fs, "study/1.dcm") == data
        assert len(rig.store.calls) == calls  # served from the block cache

    run_fs(rig, body)
    assert (rig.source / "study" / "1.dcm").read_bytes() == data
    staged = [p for p in (rig.config.cache.directory / "staging").iterdir() if p.is_file()]
    assert not [p for p in staged if p.stat().st_size]  # only empty files made ahead remain


def test_exclusive_create_and_plain_create_of_an_existing_name(tmp_path: Path) -> None:
    """O_EXCL on an existing name is EEXIST; without O_EXCL the existing file is opened."""
    rig = with_writes(make_rig(tmp_path, {"old.dcm": b"old bytes"}), upload_delay=3600)

    async def body(fs: ArchiveFS) -> bytes:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        with pytest.raises(FsError) as caught:
            await fs.create(ROOT, "old.dcm", 0o644, flags, UID, GID)
        assert caught.value.errno == errno.EEXIST
        handle, attributes = await fs.create(ROOT, "old.dcm", 0o644, os.O_RDWR, UID, GID)
        assert attributes.size == len(b"old bytes")
        await fs.write(handle, 0, b"new")
        await fs.release(handle)
        return await read_all(fs, "old.dcm")

    assert run_fs(rig, body) == b"new bytes"


def test_staging_limit_gives_enospc_and_keeps_what_fitted(tmp_path: Path) -> None:
    """Past the staging limit a write fails with ENOSPC; the bytes written before it stay."""
    rig = with_writes(make_rig(tmp_path, {}), staging_limit=100_000, upload_delay=3600)

    async def body(fs: ArchiveFS) -> None:
        handle = await create(fs, "a", b"a" * 60_000)
        with pytest.raises(CloudfsError) as caught:
            await fs.write(handle, 60_000, b"b" * 60_000)
        assert caught.value.errno == errno.ENOSPC
        assert bytes(await fs.read(handle, 0, 100_000)) == b"a" * 60_000
        await fs.release(handle)
        assert fs.staging.used == 60_000

    run_fs(rig, body)


async def store_files(fs: ArchiveFS, names: list[str], data: bytes, every: float) -> None:
    """Files arriving as a PACS stores them: create, write, fsync, close; one per ``every``."""
    for name in names:
        handle = await create(fs, name, data)
        await fs.fsync(handle)
        await fs.release(handle)
        await trio.sleep(every)


@pytest.mark.parametrize(
    ("max_delay", "staging_limit", "held"),
    [(60.0, 10_000_000, True), (0.6, 10_000_000, False), (60.0, 100_000, False)],
    ids=["until-the-pause", "max-delay-passed", "staging-half-full"],
)
def test_uploads_wait_for_a_pause_in_arriving_files(
    tmp_path: Path, max_delay: float, staging_limit: int, held: bool
) -> None:
    """While files keep arriving (one every 0.1 s for 2 s, each closed long before the 0.5 s
    delay), none goes up and the status says why; all go up in the pause after them.  Files
    that never pause for ``upload_max_delay``, or that fill half the staging area, go up while
    the writes go on."""
    rig = with_writes(
        make_rig(tmp_path, {}),
        upload_delay=0.5,
        upload_max_delay=max_delay,
        staging_limit=staging_limit,
    )
    names = [f"{index}.dcm" for index in range(20)]
    data = os.urandom(4_000)

    def in_store() -> int:
        return sum((rig.source / name).exists() for name in names)

    async def body(fs: ArchiveFS) -> tuple[int, bool, bool, bool]:
        await store_files(fs, names, data, 0.1)
        during, waiting = in_store(), fs.uploader.waiting_for_pause
        all_up = await wait_until(lambda: in_store() == len(names), 10)
        return during, waiting, all_up, fs.uploader.waiting_for_pause

    during, waiting, all_up, still_waiting = run_fs(rig, body)
    assert all_up and not still_waiting
    assert (during == 0) if held else (during > 0), during
    if staging_limit > len(names) * len(data) * 2:
        # What `cloudfs status` says (with half the staging area taken, holding comes and goes
        # as uploads free it).
        assert waiting == held
    assert all((rig.source / name).read_bytes() == data for name in names)


def test_sync_mode_write_after_fsync_is_not_lost(tmp_path: Path) -> None:
    """--upload-mode=sync: fsync uploads while the writer keeps the file open; bytes written
    after it still go up at close, and the staging area empties afterwards."""
    rig = with_writes(make_rig(tmp_path, {}), upload_mode="sync", upload_delay=0)

    async def body(fs: ArchiveFS) -> None:
        handle = await create(fs, "a.dcm", b"first part ")
        await fs.fsync(handle)
        assert (rig.source / "a.dcm").read_bytes() == b"first part "
        await fs.write(handle, 11, b"second part")
        await fs.fsync(handle)
        assert (rig.source / "a.dcm").read_bytes() == b"first part second part"
        await fs.release(handle)
        assert await wait_until(lambda: fs.staging.used == 0, 10)
        assert await read_all(fs, "a.dcm") == b"first part second part"
        handle = await create(fs, "b.dcm", b"synced")
        await fs.fsync(handle)
        await fs.write(handle, 6, b" then more")
        await fs.release(handle)
        assert await wait_until(
            lambda: (rig.source / "b.dcm").read_bytes() == b"synced then more", 10
        )

    run_fs(rig, body)


def test_unlinked_open_file_stays_usable_and_never_goes_up(tmp_path: Path) -> None:
    """An open file that is unlinked can still be written and read through its handle; it is
    never uploaded and its staging file goes at the last close."""
    rig = with_writes(make_rig(tmp_path, {}), upload_delay=0)

    async def body(fs: ArchiveFS) -> None:
        handle = await create(fs, "scratch", b"abc")
        await fs.unlink(ROOT, "scratch")
        assert await fs.write(handle, 3, b"def") == 3
        assert bytes(await fs.read(handle, 0, 10)) == b"abcdef"
        await fs.release(handle)
        assert await wait_until(lambda: fs.staging.used == 0, 10)
        assert await fs.lookup(ROOT, "scratch") is None

    run_fs(rig, body)
    assert not (rig.source / "scratch").exists()


@pytest.mark.parametrize("removed_first", [True, False], ids=["removed-first", "opened-first"])
def test_open_racing_the_end_of_its_upload(tmp_path: Path, removed_first: bool) -> None:
    """A file opened just as its upload ends: the uploader removes the staging file either before
    the open reaches it or just after.  The open neither fails (ENOENT) nor holds on to the
    removed file: the bytes read right, and a later write goes up."""
    rig = with_writes(make_rig(tmp_path, {}), upload_delay=0.3)
    data = os.urandom(100_000)

    async def body(fs: ArchiveFS) -> None:
        await fs.release(await create(fs, "a.dcm", data))
        node = rig.catalog.lookup(ROOT, "a.dcm")
        assert node is not None and node.staged is not None
        staged_path = fs.staging.path(node.staged)
        plain_open = fs.staging.open

        def removed() -> None:
            deadline = time.monotonic() + 10
            while staged_path.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not staged_path.exists()

        def racing_open(name: str) -> int:
            if removed_first:
                removed()
                return plain_open(name)
            fd = plain_open(name)
            removed()
            return fd

        fs.staging.open = racing_open  # type: ignore[method-assign]
        reader, _ = await fs.open(node.ino, os.O_RDONLY)
        fs.staging.open = plain_open  # type: ignore[method-assign]
        assert bytes(await fs.read(reader, 0, len(data))) == data
        writer, _ = await fs.open(node.ino, os.O_WRONLY)
        assert await fs.write(writer, 0, b"new") == 3
        await fs.release(writer)
        await fs.release(reader)
        target = rig.source / "a.dcm"
        expected = b"new" + data[3:]
        assert await wait_until(lambda: target.read_bytes() == expected, 10)

    run_fs(rig, body)


def test_reopening_a_complete_file_during_its_upload_keeps_the_fsync_promise(
    tmp_path: Path,
) -> None:
    """A complete file reopened for writing while it goes up is copied (the upload keeps its
    bytes); the copy is then all the journal has of a file not yet in the cloud, so it and the
    record naming it are made durable before the open returns."""
    rig = with_writes(make_rig(tmp_path, {}), upload_delay=0)
    data = os.urandom(200_000)
    release_upload = threading.Event()
    plain_put = rig.store.put_file

    def held_put(*args: object, **kwargs: object) -> object:
        release_upload.wait(10)
        return plain_put(*args, **kwargs)  # type: ignore[arg-type]

    rig.store.put_file = held_put  # type: ignore[method-assign]

    async def body(fs: ArchiveFS) -> None:
        handle = await create(fs, "a.dcm", data)
        await fs.fsync(handle)
        await fs.release(handle)
        node = rig.catalog.lookup(ROOT, "a.dcm")
        assert node is not None and node.staged is not None
        first = node.staged
        assert await wait_until(lambda: fs.uploader.is_uploading(first), 10)
        synced: list[int] = []
        durable_commits: list[bool] = []
        plain_durable, plain_transaction = fs.staging.durable, rig.catalog.transaction

        def counting(fd: int) -> None:
            synced.append(fd)
            plain_durable(fd)

        def noting(durable: bool = False) -> object:
            durable_commits.append(durable)
            return plain_transaction(durable)

        fs.staging.durable = counting  # type: ignore[method-assign]
        rig.catalog.transaction = noting  # type: ignore[assignment,method-assign]
        writer, _ = await fs.open(node.ino, os.O_WRONLY)
        fs.staging.durable, rig.catalog.transaction = plain_durable, plain_transaction  # type: ignore[method-assign]
        copy = rig.catalog.lookup(ROOT, "a.dcm")
        assert copy is not None and copy.staged not in (None, first)
        assert len(synced) == 1 and durable_commits.count(True) == 1
        assert await fs.write(writer, 0, b"new") == 3
        await fs.release(writer)
        release_upload.set()
        target = rig.source / "a.dcm"
        expected = b"new" + data[3:]
        assert await wait_until(lambda: target.exists() and target.read_bytes() == expected, 10)

    run_fs(rig, body)


def test_a_staging_file_missing_from_disk_is_an_error_not_a_hang(tmp_path: Path) -> None:
    """The journal names a staging file the disk does not hold (removed behind the mount's back):
    opening the file fails with EIO and a log line, for reading and for writing alike."""
    rig = with_writes(make_rig(tmp_path, {}), upload_delay=3600)

    async def body(fs: ArchiveFS) -> None:
        await fs.release(await create(fs, "a.dcm", b"written"))
        node = rig.catalog.lookup(ROOT, "a.dcm")
        assert node is not None and node.staged is not None
        fs.staging.path(node.staged).unlink()
        for flags in (os.O_RDONLY, os.O_WRONLY):
            with trio.fail_after(5), pytest.raises(FsError) as caught:
                await fs.open(node.ino, flags)
            assert caught.value.errno == errno.EIO

    run_fs(rig, body)
