"""The filesystem core on inode numbers, driven under trio without a kernel: names, attributes,
directory listings, open flags, handles, status and on-demand refresh."""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers_unit import BS, Rig, ino_of, make_rig, open_path, random_bytes, read_all, run_fs

from cloudfs import fs as fs_module
from cloudfs.catalog import ROOT
from cloudfs.config import MountOptions
from cloudfs.errors import CloudfsError, FsError, Unavailable
from cloudfs.fs import ArchiveFS
from cloudfs.store import ObjectInfo

pytestmark = pytest.mark.timeout(60)

FILES = {
    "a.txt": b"hello world",
    "dir/b.bin": random_bytes(1000, 1),
    "dir/sub/c.dcm": random_bytes(3 * BS + 5, 2),
}


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    made = make_rig(tmp_path, FILES, dirs=("empty",))
    yield made
    made.close()


def test_lookup_and_getattr(rig: Rig) -> None:
    """Names resolve to attributes with the object's size and mtime and the mount's owner."""

    async def body(fs: ArchiveFS) -> None:
        a = await fs.lookup(ROOT, "a.txt")
        assert a is not None and not a.is_dir
        assert a.size == len(FILES["a.txt"])
        assert a.mtime_ns == (rig.source / "a.txt").stat().st_mtime_ns
        assert stat.S_ISREG(a.mode) and stat.S_IMODE(a.mode) == 0o644
        assert (a.uid, a.gid) == (os.getuid(), os.getgid())
        assert a.block_size == BS
        assert await fs.getattr(a.ino) == a

        d = await fs.lookup(ROOT, "dir")
        assert d is not None and d.is_dir and stat.S_IMODE(d.mode) == 0o755
        c = await fs.lookup(await ino_of(fs, "dir/sub"), "c.dcm")
        assert c is not None and c.size == 3 * BS + 5

        assert await fs.lookup(ROOT, "missing") is None
        assert await fs.lookup(d.ino, "a.txt") is None
        root = await fs.getattr(ROOT)
        assert root.is_dir and root.ino == ROOT
        with pytest.raises(CloudfsError) as caught:
            await fs.getattr(999_999)
        assert caught.value.errno == errno.ENOENT

    run_fs(rig, body)


def test_read_only_mount_modes(tmp_path: Path) -> None:
    """A read-only mount shows no write bits."""
    rig = make_rig(tmp_path, FILES, mount=MountOptions(read_only=True))

    async def body(fs: ArchiveFS) -> None:
        a = await fs.getattr(await ino_of(fs, "a.txt"))
        d = await fs.getattr(await ino_of(fs, "dir"))
        assert stat.S_IMODE(a.mode) == 0o444
        assert stat.S_IMODE(d.mode) == 0o555

    run_fs(rig, body)
    rig.close()


async def list_entries(fs: ArchiveFS, ino: int, take: int | None = None) -> list[Any]:
    """Every (name, attributes) of a directory through opendir/readdir/releasedir, following
    offsets as the kernel does; with ``take``, only that many entries are consumed per request."""
    handle = await fs.opendir(ino)
    listed: list[Any] = []
    offset = 0
    while entries := await fs.readdir(handle, offset):
        used = entries if take is None else entries[:take]
        listed.extend(used)
        offset = used[-1][1].ino
    fs.releasedir(handle)
    return listed


async def list_dir(fs: ArchiveFS, ino: int, take: int | None = None) -> list[str]:
    """Every name of a directory, as ``list_entries`` finds them."""
    return [name for name, _ in await list_entries(fs, ino, take)]


def test_readdir(rig: Rig) -> None:
    """readdir lists a directory's entries with attributes; an offset past the last is empty."""

    async def body(fs: ArchiveFS) -> None:
        handle = await fs.opendir(ROOT)
        entries = await fs.readdir(handle, 0)
        assert {name for name, _ in entries} == {"a.txt", "dir", "empty"}
        kinds = {name: attributes.is_dir for name, attributes in entries}
        assert kinds == {"a.txt": False, "dir": True, "empty": True}
        inos = [attributes.ino for _, attributes in entries]
        assert inos == sorted(inos)
        assert await fs.readdir(handle, inos[-1]) == []
        assert [name for name, _ in await fs.readdir(handle, inos[0])] == [
            name for name, _ in entries[1:]
        ]
        assert await fs.readdir(handle, 0) == entries  # rewinddir
        fs.releasedir(handle)
        assert await list_dir(fs, await ino_of(fs, "empty")) == []
        assert set(await list_dir(fs, await ino_of(fs, "dir"))) == {"b.bin", "sub"}

    run_fs(rig, body)


def test_readdir_unknown_handle_is_ebadf(rig: Rig) -> None:
    """A released or never opened directory handle is EBADF."""

    async def body(fs: ArchiveFS) -> None:
        handle = await fs.opendir(ROOT)
        fs.releasedir(handle)
        fs.releasedir(handle)  # releasing twice is harmless
        for bad in (handle, 987_654):
            with pytest.raises(FsError) as caught:
                await fs.readdir(bad, 0)
            assert caught.value.errno == errno.EBADF

    run_fs(rig, body)


@pytest.mark.parametrize("take", [None, 1, 30, 999, 1000, 1001])
def test_readdir_pages_through_large_directory(tmp_path: Path, take: int | None) -> None:
    """Following readdir offsets through 2,500 entries yields each exactly once, whether the
    caller consumes whole batches or a few entries per request."""
    names = {f"img{i:05d}.dcm" for i in range(2500)}
    rig = make_rig(tmp_path, {f"series/{name}": b"x" for name in names})

    async def body(fs: ArchiveFS) -> list[str]:
        return await list_dir(fs, await ino_of(fs, "series"), take)

    seen = run_fs(rig, body)
    assert len(seen) == 2500 and set(seen) == names
    rig.close()


def test_interleaved_listings_keep_separate_batches(tmp_path: Path) -> None:
    """Two handles listing different directories at once do not disturb each other's batches."""
    rig = make_rig(
        tmp_path,
        {
            **{f"a/f{i:04d}": b"a" for i in range(1500)},
            **{f"b/g{i:04d}": b"b" for i in range(1500)},
        },
    )

    async def body(fs: ArchiveFS) -> tuple[list[str], list[str]]:
        a, b = await fs.opendir(await ino_of(fs, "a")), await fs.opendir(await ino_of(fs, "b"))
        seen: dict[int, list[str]] = {a: [], b: []}
        offsets = {a: 0, b: 0}
        while True:
            progressed = False
            for handle in (a, b):
                entries = (await fs.readdir(handle, offsets[handle]))[:40]
                if entries:
                    progressed = True
                    seen[handle].extend(name for name, _ in entries)
                    offsets[handle] = entries[-1][1].ino
            if not progressed:
                return seen[a], seen[b]

    in_a, in_b = run_fs(rig, body)
    assert sorted(in_a) == [f"f{i:04d}" for i in range(1500)]
    assert sorted(in_b) == [f"g{i:04d}" for i in range(1500)]
    rig.close()


def test_readdir_sees_entries_added_between_batches(tmp_path: Path) -> None:
    """An entry synced while a listing is under way shows up when a later batch is fetched;
    nothing already listed repeats."""
    rig = make_rig(tmp_path, {f"d/f{i:04d}": b"x" for i in range(1200)})

    async def body(fs: ArchiveFS) -> list[str]:
        handle = await fs.opendir(await ino_of(fs, "d"))
        first = await fs.readdir(handle, 0)
        names = [name for name, _ in first]
        rig.write("d/zz-late", b"y")
        await fs.sync()
        offset = first[-1][1].ino
        while entries := await fs.readdir(handle, offset):
            names.extend(name for name, _ in entries)
            offset = entries[-1][1].ino
        return names

    names = run_fs(rig, body)
    assert len(names) == len(set(names)) == 1201
    assert "zz-late" in names
    rig.close()


def test_opendir(rig: Rig) -> None:
    """Directories open as directories; files are ENOTDIR and unknown inodes ENOENT."""

    async def body(fs: ArchiveFS) -> None:
        first = await fs.opendir(ROOT)
        second = await fs.opendir(await ino_of(fs, "dir"))
        assert first != second
        with pytest.raises(FsError) as caught:
            await fs.opendir(await ino_of(fs, "a.txt"))
        assert caught.value.errno == errno.ENOTDIR
        with pytest.raises(CloudfsError) as missing:
            await fs.opendir(424_242)
        assert missing.value.errno == errno.ENOENT

    run_fs(rig, body)


@pytest.mark.parametrize(
    "flags",
    [
        os.O_WRONLY,
        os.O_RDWR,
        os.O_RDONLY | os.O_TRUNC,
        os.O_WRONLY | os.O_APPEND,
        os.O_RDWR | os.O_CREAT,
    ],
)
def test_open_for_writing_is_erofs_on_a_read_only_mount(tmp_path: Path, flags: int) -> None:
    """On a read-only mount any write intent on open is refused with EROFS."""
    read_only = make_rig(tmp_path, FILES, mount=MountOptions(read_only=True))

    async def body(fs: ArchiveFS) -> None:
        with pytest.raises(FsError) as caught:
            await fs.open(await ino_of(fs, "a.txt"), flags)
        assert caught.value.errno == errno.EROFS

    run_fs(read_only, body)


def test_open_directory_is_eisdir(rig: Rig) -> None:
    """Opening a directory as a file is EISDIR; an unknown inode is ENOENT."""

    async def body(fs: ArchiveFS) -> None:
        for ino in (ROOT, await ino_of(fs, "dir"), await ino_of(fs, "empty")):
            with pytest.raises(FsError) as caught:
                await fs.open(ino, os.O_RDONLY)
            assert caught.value.errno == errno.EISDIR
        with pytest.raises(CloudfsError) as missing:
            await fs.open(10**6, os.O_RDONLY)
        assert missing.value.errno == errno.ENOENT

    run_fs(rig, body)


def test_open_read_release(rig: Rig) -> None:
    """Handles are distinct, reads return file bytes, and a released handle is EBADF."""

    async def body(fs: ArchiveFS) -> None:
        ino = await ino_of(fs, "dir/sub/c.dcm")
        first, _ = await fs.open(ino, os.O_RDONLY)
        second, _ = await fs.open(ino, os.O_RDONLY | os.O_NOFOLLOW)
        assert first != second
        data = FILES["dir/sub/c.dcm"]
        assert bytes(await fs.read(first, BS - 2, 10)) == data[BS - 2 : BS + 8]
        assert bytes(await fs.read(second, len(data) - 3, 100)) == data[-3:]
        await fs.release(first)
        with pytest.raises(FsError) as caught:
            await fs.read(first, 0, 10)
        assert caught.value.errno == errno.EBADF
        assert bytes(await fs.read(second, 0, 5)) == data[:5]
        await fs.release(second)
        await fs.release(second)  # releasing twice is harmless
        with pytest.raises(FsError):
            await fs.read(12345, 0, 1)

    run_fs(rig, body)


def test_keep_cache_only_for_unchanged_version(rig: Rig) -> None:
    """The kernel may keep cached pages on a re-open only while the ETag is unchanged."""

    async def body(fs: ArchiveFS) -> None:
        ino = await ino_of(fs, "a.txt")
        _, first = await fs.open(ino, os.O_RDONLY)
        _, second = await fs.open(ino, os.O_RDONLY)
        assert (first, second) == (False, True)
        rig.write("a.txt", b"new contents")
        await fs.sync()
        _, after_change = await fs.open(ino, os.O_RDONLY)
        _, again = await fs.open(ino, os.O_RDONLY)
        assert (after_change, again) == (False, True)

    run_fs(rig, body)


def test_archived_object_open_is_eacces(rig: Rig) -> None:
    """An object in GLACIER that is not restored fails at open with EACCES; once restored, it
    opens."""
    info = rig.store.head("a.txt")
    rig.catalog.refresh_object(
        ObjectInfo(info.key, info.size, info.mtime_ns, info.etag, "GLACIER"), info.key
    )
    restored = {"value": False}

    def head(key: str) -> ObjectInfo:
        base = rig.store.inner.head(key)
        return ObjectInfo(
            key, base.size, base.mtime_ns, base.etag, "GLACIER", restored=restored["value"]
        )

    rig.store.head_override = head

    async def body(fs: ArchiveFS) -> None:
        ino = await ino_of(fs, "a.txt")
        with pytest.raises(CloudfsError) as caught:
            await fs.open(ino, os.O_RDONLY)
        assert caught.value.errno == errno.EACCES
        restored["value"] = True
        handle, _ = await fs.open(ino, os.O_RDONLY)
        assert bytes(await fs.read(handle, 0, 5)) == b"hello"

    run_fs(rig, body)


def test_status(rig: Rig) -> None:
    """The status is a JSON document with cache, reads and catalog sections that reflect what
    happened."""

    async def body(fs: ArchiveFS) -> dict[str, object]:
        assert await read_all(fs, "dir/b.bin") == FILES["dir/b.bin"]
        handle = await open_path(fs, "a.txt")
        facts = await fs.status()
        await fs.release(handle)
        return json.loads(json.dumps(facts))

    status = run_fs(rig, body)
    assert {"cache", "reads", "catalog"} <= set(status)
    cache, reads, catalog = status["cache"], status["reads"], status["catalog"]
    assert isinstance(cache, dict) and isinstance(reads, dict) and isinstance(catalog, dict)
    assert cache["limit"] == rig.config.cache.size_limit
    assert cache["block_size"] == BS
    assert cache["blocks"] >= 1 and cache["bytes"] > 0
    assert reads["requests"] >= 1 and reads["bytes_fetched"] >= 1000
    assert reads["fetch_errors"] == 0
    assert catalog["files"] == len(FILES)
    assert catalog["rejected_keys"] == 0
    assert status["open_files"] == 1
    assert status["source"] == rig.store.describe()
    assert status["pid"] == os.getpid()


def test_status_reports_rejected_keys_and_errors(rig: Rig) -> None:
    """Unmappable keys and fetch failures show in the status with examples."""
    listing = sorted(
        [*rig.store.list(), ObjectInfo("a//b", 1, 1, '"e"')], key=lambda i: i.key.encode()
    )
    rig.catalog.sync(listing)
    rig.store.fail_all = True

    async def body(fs: ArchiveFS) -> dict[str, object]:
        handle = await open_path(fs, "dir/sub/c.dcm")
        with pytest.raises(CloudfsError):
            await fs.read(handle, BS + 1, 10)
        return json.loads(json.dumps(await fs.status()))

    status = run_fs(rig, body)
    catalog, reads = status["catalog"], status["reads"]
    assert isinstance(catalog, dict) and isinstance(reads, dict)
    assert catalog["rejected_keys"] == 1
    assert catalog["rejected_examples"] == [
        {"key": "a//b", "reason": "has an empty path segment (leading '/' or '//')"}
    ]
    assert reads["fetch_errors"] == 1
    assert "c.dcm" in str(reads["last_error"])


def test_refresh_relists_on_demand(rig: Rig) -> None:
    """refresh() asks the refresher for a relist and returns its report once the catalog
    matches the store."""

    async def body(fs: ArchiveFS) -> None:
        rig.write("new/late.dcm", b"late arrival")
        (rig.source / "a.txt").unlink()
        assert await fs.lookup(ROOT, "new") is None
        report = await fs.refresh()
        assert (report["added"], report["removed"], report["changed"]) == (1, 1, 0)
        assert await fs.lookup(ROOT, "a.txt") is None
        assert await read_all(fs, "new/late.dcm") == b"late arrival"

    run_fs(rig, body)


def test_refresh_reports_store_failure(rig: Rig) -> None:
    """A relist that fails is raised to the caller of refresh() as Unavailable (EIO)."""

    def broken_list() -> Iterator[ObjectInfo]:
        raise Unavailable("listing failed")

    rig.store.list = broken_list  # type: ignore[method-assign]

    async def body(fs: ArchiveFS) -> None:
        with pytest.raises(CloudfsError) as caught:
            await fs.refresh()
        assert caught.value.errno == errno.EIO
        assert "listing failed" in str(caught.value)
        assert (await fs.status())["catalog"]["last_refresh_error"] == "listing failed"

    run_fs(rig, body)


def test_sync_reports(rig: Rig) -> None:
    """fs.sync relists the store into the catalog and reports what changed."""

    async def body(fs: ArchiveFS) -> None:
        rig.write("z.bin", b"z")
        rig.write("a.txt", b"changed!")
        (rig.source / "dir" / "b.bin").unlink()
        report = await fs.sync()
        assert (report.added, report.changed, report.removed) == (1, 1, 1)
        a = await fs.lookup(ROOT, "a.txt")
        assert a is not None and a.size == len(b"changed!")
        assert await read_all(fs, "a.txt") == b"changed!"

    run_fs(rig, body)


def test_statfs(rig: Rig) -> None:
    """statfs reports the block size, a large stable free space and NAME_MAX."""

    async def body(fs: ArchiveFS) -> dict[str, int]:
        return fs.statfs()

    info = run_fs(rig, body)
    assert info["block_size"] == BS
    assert info["free_blocks"] * BS == rig.config.mount.free_space
    assert info["blocks"] >= info["free_blocks"] > 0
    assert info["name_max"] == 255


def count_children_reads(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, ...]]:
    """Every catalog read of a directory batch, from now on."""
    reads: list[tuple[object, ...]] = []
    real = rig.catalog.children

    def counted(*args: Any) -> Any:
        reads.append(args)
        return real(*args)

    monkeypatch.setattr(rig.catalog, "children", counted)
    return reads


async def listed_sizes(fs: ArchiveFS, ino: int) -> dict[str, int]:
    """Name and size of every entry of a directory, as a whole listing shows them."""
    return {name: attributes.size for name, attributes in await list_entries(fs, ino)}


def test_a_directory_listed_again_is_sent_from_kept_batches_until_anything_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second listing of a large directory reads nothing from the catalog (the batches of the
    first, their reply entries built, were kept), yet never shows an old state: an object
    brought by a sync, a file created through the mount, the bytes being written to it, and a
    removal each show in the very next listing."""
    rig = make_rig(tmp_path, {f"d/f{i:04d}": b"x" for i in range(2500)})
    reads = count_children_reads(rig, monkeypatch)

    async def body(fs: ArchiveFS) -> None:
        d = await ino_of(fs, "d")
        first = await listed_sizes(fs, d)
        assert len(first) == 2500 and len(reads) >= 3
        before = len(reads)
        assert await listed_sizes(fs, d) == first
        assert len(reads) == before

        rig.write("d/zz-synced", b"yy")
        await fs.sync()
        assert (await listed_sizes(fs, d))["zz-synced"] == 2

        handle, _ = await fs.create(d, "zz-written", 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
        assert (await listed_sizes(fs, d))["zz-written"] == 0
        assert await fs.write(handle, 0, b"z" * 5000) == 5000
        before = len(reads)
        assert (await listed_sizes(fs, d))["zz-written"] == 5000  # kept, with the staged size
        assert len(reads) == before
        await fs.release(handle)
        await fs.unlink(d, "f0000")
        after = await listed_sizes(fs, d)
        assert "f0000" not in after and after["zz-written"] == 5000 and len(after) == 2501

    run_fs(rig, body)
    rig.close()


def test_kept_listings_stay_within_their_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batches kept across listings never hold more entries than their bound; the
    directory listed longest ago is read again, the latest is not."""
    monkeypatch.setattr(fs_module, "_KEPT_LISTING_ENTRIES", 3000)
    rig = make_rig(tmp_path, {f"{d}/f{i:04d}": b"x" for d in "abc" for i in range(1500)})
    reads = count_children_reads(rig, monkeypatch)

    async def body(fs: ArchiveFS) -> None:
        inos = {name: await ino_of(fs, name) for name in "abc"}
        for name in "abc":
            assert len(await listed_sizes(fs, inos[name])) == 1500
        kept = fs._kept_listings.values()
        assert fs._kept_entries == sum(len(listed.entries) + 1 for listed in kept) <= 3000
        before = len(reads)
        assert len(await listed_sizes(fs, inos["c"])) == 1500
        assert len(reads) == before
        assert len(await listed_sizes(fs, inos["a"])) == 1500
        assert len(reads) > before
        assert fs._kept_entries <= 3000

    run_fs(rig, body)
    rig.close()
