"""The local directory store: S3 listing order, markers, versions and confinement to the root."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers_unit import source_files

from cloudfs.config import S3Options
from cloudfs.errors import CloudfsError, ConfigError, NotFound, StaleObject
from cloudfs.store import FileSource, ObjectInfo, open_store
from cloudfs.store.local import LocalStore


def write(root: Path, key: str, data: bytes) -> Path:
    path = root.joinpath(*key.split("/"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    directory = tmp_path / "root"
    directory.mkdir()
    return directory


@pytest.fixture
def store(root: Path) -> LocalStore:
    return LocalStore(root)


def keys(store: LocalStore) -> list[str]:
    return [info.key for info in store.list()]


def test_list_is_in_utf8_byte_order(root: Path, store: LocalStore) -> None:
    """Keys come out in UTF-8 byte order, as ListObjectsV2 returns them (not walk order)."""
    names = ["a-b", "a/b", "a0", "a/c/d", "Z", "z", "é.dcm", "中文/文件", "😀", "a b", "A"]
    for name in names:
        write(root, name, name.encode())
    listed = keys(store)
    assert listed == sorted(names, key=lambda key: key.encode("utf-8"))
    assert listed.index("a-b") < listed.index("a/b") < listed.index("a0")
    encoded = [key.encode("utf-8") for key in listed]
    assert encoded == sorted(encoded)


def test_empty_directory_markers_take_their_place_in_key_order(
    root: Path, store: LocalStore
) -> None:
    for name in ["e.x", "e-f", "e0", "e/sub/g"]:
        write(root, name, b"x")
    (root / "d").mkdir()
    (root / "e" / "empty").mkdir()
    assert keys(store) == ["d/", "e-f", "e.x", "e/empty/", "e/sub/g", "e0"]


def test_list_after_a_key_is_the_rest_of_the_listing(root: Path, store: LocalStore) -> None:
    """``list(after)`` gives exactly the keys sorting after ``after``, in order, whether it is
    a key, a directory's prefix, an empty directory's marker, or no key at all, as StartAfter
    does: an interrupted first listing goes on from there."""
    for name in ["a-b", "a/b", "a0", "a/c/d", "a/c/e", "Z", "é.dcm", "中文/文件", "e/sub/g"]:
        write(root, name, b"x")
    (root / "e" / "empty").mkdir()
    everything = keys(store)
    assert "e/empty/" in everything
    cuts = [*everything, "", "a", "a/", "a/c", "a/c/", "a/c/d0", "e/", "e/empty", "zz", "\uffff"]
    for cut in cuts:
        assert [info.key for info in store.list(cut)] == [k for k in everything if k > cut], cut


def test_list_streams_one_directory_at_a_time(
    root: Path, store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first key comes before the rest of the tree is read: a listing of a million files
    must not be held in memory whole."""
    for directory in range(20):
        write(root, f"d{directory:02d}/f", b"x")
    scanned: list[str] = []
    real_scandir = os.scandir

    def counting_scandir(path: str) -> Iterator[os.DirEntry[str]]:
        scanned.append(path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", counting_scandir)
    listing = store.list()
    assert next(listing).key == "d00/f"
    assert len(scanned) == 2  # the root and d00
    assert [info.key for info in listing] == [f"d{n:02d}/f" for n in range(1, 20)]
    assert len(scanned) == 21


def test_list_reports_sizes_and_distinct_etags(root: Path, store: LocalStore) -> None:
    """Each object carries its size, mtime and an ETag that differs between versions."""
    path = write(root, "f", b"12345")
    os.utime(path, ns=(1_000_000_000, 2_000_000_000))
    (info,) = list(store.list())
    assert (info.key, info.size, info.mtime_ns) == ("f", 5, 2_000_000_000)
    assert info.storage_class == "STANDARD" and not info.needs_restore
    assert store.head("f") == info
    os.utime(path, ns=(1_000_000_000, 3_000_000_000))
    assert store.head("f").etag != info.etag


def test_empty_directories_are_markers(root: Path, store: LocalStore) -> None:
    """Empty directories appear as 'dir/' markers; populated ones and the root do not."""
    (root / "empty").mkdir()
    (root / "outer" / "inner").mkdir(parents=True)
    write(root, "full/file", b"x")
    listed = keys(store)
    assert listed == ["empty/", "full/file", "outer/inner/"]
    markers = {info.key: info for info in store.list() if info.key.endswith("/")}
    assert all(info.size == 0 for info in markers.values())
    assert "" not in listed and "/" not in listed


def test_empty_root_lists_nothing(store: LocalStore) -> None:
    """An empty source directory is an empty bucket, not a marker."""
    assert keys(store) == []


def make_links(tmp_path: Path, root: Path) -> None:
    """A real file, links to it and out of the root, and a dangling link."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"secret")
    write(root, "real.txt", b"real")
    (root / "inner_link").symlink_to("real.txt")
    (root / "escape_file").symlink_to(outside / "secret.txt")
    (root / "escape_dir").symlink_to(outside)
    (root / "dangling").symlink_to(tmp_path / "nothing")


def test_symlinks_and_special_files_not_listed(
    tmp_path: Path, root: Path, store: LocalStore
) -> None:
    """Symlinks (inside or out of the root), FIFOs and sockets are not objects."""
    make_links(tmp_path, root)
    os.mkfifo(root / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(root / "sock"))
        assert keys(store) == ["real.txt"]
    finally:
        sock.close()


@pytest.mark.parametrize("key", ["inner_link", "escape_file", "dangling"])
def test_symlinks_cannot_be_read(tmp_path: Path, root: Path, store: LocalStore, key: str) -> None:
    """head() says NotFound and get_range() refuses a symlinked file."""
    make_links(tmp_path, root)
    with pytest.raises(NotFound):
        store.head(key)
    real_etag = store.head("real.txt").etag
    with pytest.raises(CloudfsError):
        store.get_range(key, 0, 4, real_etag)


def test_files_behind_a_directory_symlink_cannot_be_read(tmp_path: Path, root: Path) -> None:
    """A symlinked directory pointing outside the root does not expose the files behind it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_bytes(b"secret")
    (root / "escape_dir").symlink_to(outside)
    store = LocalStore(root)
    with pytest.raises(NotFound):
        store.head("escape_dir/secret.txt")
    st = secret.stat()
    etag = f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
    with pytest.raises(CloudfsError):
        store.get_range("escape_dir/secret.txt", 0, 6, etag)


def test_fifo_cannot_be_read_and_does_not_hang(root: Path, store: LocalStore) -> None:
    """Reading a FIFO fails at once instead of blocking until some writer appears."""
    os.mkfifo(root / "fifo")
    with pytest.raises(NotFound):
        store.head("fifo")
    outcome: list[BaseException | bytes] = []

    def attempt() -> None:
        try:
            outcome.append(store.get_range("fifo", 0, 1, '"0-0"'))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(2)
    hung = thread.is_alive()
    if hung:  # release the blocked open so the thread can finish
        writer = os.open(root / "fifo", os.O_WRONLY | os.O_NONBLOCK)
        os.close(writer)
        thread.join(5)
    assert not hung, "get_range blocked on a FIFO"
    assert len(outcome) == 1 and isinstance(outcome[0], CloudfsError)


def test_directory_cannot_be_read(root: Path, store: LocalStore) -> None:
    """A directory is not an object."""
    write(root, "d/f", b"x")
    with pytest.raises(NotFound):
        store.head("d")
    with pytest.raises(CloudfsError):
        store.get_range("d", 0, 1, '"x"')


def test_get_range_returns_exact_bytes(root: Path, store: LocalStore) -> None:
    """Ranges anywhere in the object, including empty and whole ones, return exactly those bytes."""
    data = os.urandom(300_000)
    write(root, "dir/blob.bin", data)
    etag = store.head("dir/blob.bin").etag
    for start, end in [(0, 300_000), (0, 1), (299_999, 300_000), (65_536, 131_072), (7, 7)]:
        assert store.get_range("dir/blob.bin", start, end, etag) == data[start:end]


def test_get_range_missing_key_is_not_found(store: LocalStore) -> None:
    """An absent key is NotFound (ENOENT), not an I/O error."""
    with pytest.raises(NotFound):
        store.get_range("nope", 0, 1, '"x"')
    with pytest.raises(NotFound):
        store.head("nope")


def test_file_rewritten_while_streamed_stops_before_the_new_bytes(
    root: Path, store: LocalStore
) -> None:
    """A file rewritten between two pieces of a stream raises StaleObject: the pieces handed
    out before are the old version's, no piece of the new one is handed out."""
    path = write(root, "f.dcm", b"A" * 100)
    old = store.head("f.dcm")
    pieces = store.stream_range("f.dcm", 0, 100, old.etag, 40)
    assert next(pieces) == b"A" * 40
    path.write_bytes(b"B" * 100)
    os.utime(path, ns=(old.mtime_ns + 1, old.mtime_ns + 1))
    with pytest.raises(StaleObject):
        next(pieces)


def test_rewritten_file_is_stale(root: Path, store: LocalStore) -> None:
    """Reading with the ETag of an earlier version raises StaleObject, never the new bytes."""
    path = write(root, "f.dcm", b"version one")
    old = store.head("f.dcm")
    path.write_bytes(b"version two, longer")
    with pytest.raises(StaleObject):
        store.get_range("f.dcm", 0, 5, old.etag)
    # Same size, new mtime: still another version.
    new = store.head("f.dcm")
    path.write_bytes(b"VERSION TWO, LONGER")
    os.utime(path, ns=(new.mtime_ns + 1, new.mtime_ns + 1))
    assert path.stat().st_size == new.size
    with pytest.raises(StaleObject):
        store.get_range("f.dcm", 0, 5, new.etag)
    latest = store.head("f.dcm")
    assert store.get_range("f.dcm", 0, 7, latest.etag) == b"VERSION"


@pytest.mark.parametrize(
    "key", ["..", "../x", "a/../b", "a/..", "./x", "a/./b", ".", "", "a//b", "/abs"]
)
def test_escaping_keys_are_not_found(
    tmp_path: Path, root: Path, store: LocalStore, key: str
) -> None:
    """Keys with '..', '.' or empty segments never name a file, wherever they would point."""
    write(root, "a/b", b"inside")
    write(root, "b", b"inside")
    write(root, "x", b"inside")
    (tmp_path / "x").write_bytes(b"outside")
    with pytest.raises(NotFound):
        store.head(key)
    with pytest.raises(NotFound):
        store.get_range(key, 0, 1, '"x"')


@pytest.fixture
def plain_source(tmp_path: Path) -> Iterator[Callable[[bytes], FileSource]]:
    """``plain_source(data)``: a Source over a new file holding ``data``."""
    with source_files(tmp_path / "sources") as make:
        yield make


def test_put_file_delete_copy(
    root: Path, store: LocalStore, plain_source: Callable[[bytes], FileSource]
) -> None:
    """Uploads create parent directories atomically; copies duplicate; deletes are idempotent."""
    data = os.urandom(5000)
    source = plain_source(data)
    info = store.put_file("new/deep/obj.bin", source, {"patient": "x"}, None)
    assert isinstance(info, ObjectInfo)
    assert (info.key, info.size) == ("new/deep/obj.bin", 5000)
    assert (root / "new" / "deep" / "obj.bin").read_bytes() == data
    assert not list((root / "new" / "deep").glob(".*cloudfs-upload"))
    assert "new/deep/obj.bin" in keys(store)

    copied = store.copy("new/deep/obj.bin", "other/copy.bin", info.etag)
    assert copied.size == 5000
    assert store.get_range("other/copy.bin", 0, 5000, copied.etag) == data

    replacement = plain_source(b"short")
    replaced = store.put_file("other/copy.bin", replacement, {}, copied.etag)
    assert replaced.size == 5 and replaced.etag != copied.etag

    store.delete("new/deep/obj.bin")
    with pytest.raises(NotFound):
        store.head("new/deep/obj.bin")
    store.delete("new/deep/obj.bin")  # deleting a missing key succeeds
    store.delete("never/was")
    assert "new/deep/obj.bin" not in keys(store)


def test_put_file_refuses_escaping_key(
    tmp_path: Path, store: LocalStore, plain_source: Callable[[bytes], FileSource]
) -> None:
    """An upload can never write outside the root."""
    source = plain_source(b"x")
    with pytest.raises(NotFound):
        store.put_file("../escaped.bin", source, {}, None)
    assert not (tmp_path / "escaped.bin").exists()


def test_check_and_describe(tmp_path: Path, root: Path) -> None:
    """check() accepts an existing directory and refuses a missing one with ConfigError."""
    LocalStore(root).check()
    assert LocalStore(root).describe() == f"file://{root}"
    with pytest.raises(ConfigError, match="does not exist"):
        LocalStore(tmp_path / "missing").check()


def test_open_store_file_urls(root: Path) -> None:
    """file:// sources open a LocalStore; other hosts and unknown schemes are refused."""
    store = open_store(f"file://{root}", S3Options())
    assert isinstance(store, LocalStore) and store.root == root
    with pytest.raises(ConfigError):
        open_store("file://otherhost/srv", S3Options())
    with pytest.raises(ConfigError):
        open_store("ftp://host/x", S3Options())
