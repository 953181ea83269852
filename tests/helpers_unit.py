"""Building blocks for the core tests: a filesystem core over a local directory, driven by trio
without a kernel, and a store wrapper that records, delays or fails ranged reads."""

from __future__ import annotations

import builtins
import contextlib
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from cloudfs.cache import BlockCache
from cloudfs.catalog import ROOT, Catalog, Node
from cloudfs.config import CacheOptions, Config, DicomOptions, KiB, MiB, MountOptions
from cloudfs.errors import Unavailable
from cloudfs.fs import ArchiveFS
from cloudfs.store import FileSource, ObjectInfo, ObjectStore, Source
from cloudfs.store.local import LocalStore

T = TypeVar("T")

BS = 64 * KiB
"""Block size of every core test: small, so multi-block files stay small."""


def random_bytes(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def cache_options(directory: Path, **overrides: Any) -> CacheOptions:
    """Small, fast settings: 64 KiB blocks, chunks of four blocks, short read-ahead."""
    settings: dict[str, Any] = {
        "size_limit": 64 * MiB,
        "block_size": BS,
        "fetch_chunk": 4 * BS,
        "small_object": BS,
        "readahead_initial": 2 * BS,
        "readahead_max": 8 * BS,
        "readahead_budget": 16 * BS,
        "foreground_budget": 16 * BS,
        "memory_blocks": 32 * BS,
        "fetch_threads": 4,
        "disk_threads": 2,
        "io_timeout": 10.0,
    }
    settings.update(overrides)
    return CacheOptions(directory=directory, **settings)


class InstrumentedStore:
    """An ObjectStore around another one that records every ranged GET and can slow or fail
    them; everything else is passed through."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.calls: list[tuple[str, int, int]] = []
        self.delay = 0.0
        self.fail_keys: set[str] = set()
        self.fail_all = False
        self.failure: Callable[[str], Exception] = lambda key: Unavailable(f"{key}: store down")
        self.head_override: Callable[[str], ObjectInfo] | None = None
        self.hang = False
        """Make every ranged GET block until ``unhang()``, then fail."""
        self.active = 0
        self._released = threading.Event()
        self._lock = threading.Lock()

    def describe(self) -> str:
        return self.inner.describe()

    def check(self) -> None:
        self.inner.check()

    def list(self, after: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(after)

    def head(self, key: str) -> ObjectInfo:
        if self.head_override is not None:
            return self.head_override(key)
        return self.inner.head(key)

    def get_range(self, key: str, start: int, end: int, etag: str) -> bytes:
        with self._lock:
            self.calls.append((key, start, end))
            self.active += 1
        try:
            if self.hang:
                self._released.wait(30)
                raise Unavailable(f"{key}: no answer")
            if self.delay:
                time.sleep(self.delay)
            if self.fail_all or key in self.fail_keys:
                raise self.failure(key)
            return self.inner.get_range(key, start, end, etag)
        finally:
            with self._lock:
                self.active -= 1

    def stream_range(
        self, key: str, start: int, end: int, etag: str, piece: int
    ) -> Generator[bytes, None, None]:
        """The reader's GET: recorded, delayed or failed as ``get_range`` (which subclasses
        override to gate or count GETs), then handed out a piece at a time."""
        data = self.get_range(key, start, end, etag)
        for offset in range(0, len(data), piece):
            yield data[offset : offset + piece]

    def unhang(self, timeout: float = 5.0) -> bool:
        """Release hanging GETs; True once none is running any more."""
        self._released.set()
        deadline = time.monotonic() + timeout
        while self.active and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.active == 0

    def put_file(
        self, key: str, source: Source, metadata: Mapping[str, str], expect_etag: str | None
    ) -> ObjectInfo:
        return self.inner.put_file(key, source, metadata, expect_etag)

    def delete(self, key: str, etag: str | None = None) -> None:
        self.inner.delete(key, etag)

    def copy(
        self, source: str, target: str, etag: str, metadata: Mapping[str, str] | None = None
    ) -> ObjectInfo:
        return self.inner.copy(source, target, etag, metadata)

    def calls_for(self, key: str) -> builtins.list[tuple[int, int]]:
        with self._lock:
            return [(start, end) for k, start, end in self.calls if k == key]


@dataclass
class Rig:
    """Everything an ArchiveFS needs, over a source directory of test files."""

    source: Path
    config: Config
    store: InstrumentedStore
    catalog: Catalog
    cache: BlockCache
    files: dict[str, bytes] = field(default_factory=dict)
    key: bytes | None = None
    """The cache key the filesystem seals its staged files under (None: plain)."""

    def write(self, key: str, data: bytes) -> None:
        """Create or replace an object in the source directory (not yet in the catalog)."""
        path = self.source.joinpath(*key.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.files[key] = data

    def sync(self) -> None:
        self.catalog.sync(self.store.list())

    def close(self) -> None:
        self.cache.close()


def make_rig(
    tmp: Path,
    files: Mapping[str, bytes],
    dirs: tuple[str, ...] = (),
    mount: MountOptions | None = None,
    dicom: DicomOptions | None = None,
    **overrides: Any,
) -> Rig:
    """A source directory holding ``files`` (and empty ``dirs``), synced into a fresh catalog.
    DICOM indexing is off unless ``dicom`` is given: its header reads would show up in the
    store's request log that read-path tests count."""
    source = tmp / "source"
    source.mkdir(parents=True)
    options = cache_options(tmp / "cache", **overrides)
    options.directory.mkdir(parents=True)
    config = Config(
        source=f"file://{source}",
        mountpoint=tmp / "mnt",
        cache=options,
        mount=mount or MountOptions(),
        dicom=dicom or DicomOptions(index=False, view_dir=""),
    )
    store = InstrumentedStore(LocalStore(source))
    rig = Rig(
        source=source,
        config=config,
        store=store,
        catalog=Catalog(options.directory / "catalog.db"),
        cache=BlockCache(options.directory / "blocks", options.size_limit, options.block_size),
    )
    for key, data in files.items():
        rig.write(key, data)
    for name in dirs:
        (source / name).mkdir(parents=True)
    rig.sync()
    return rig


def run_fs(rig: Rig, body: Callable[[ArchiveFS], Awaitable[T]], drain: bool = True) -> T:
    """Build an ArchiveFS on ``rig`` inside trio, run its background work (reader, refresher
    with its first relist an hour away, directory read-ahead), await ``body(fs)``, then stop.
    With ``drain``, background fetches finish first, so no worker thread writes to the cache
    after this returns.  Exceptions of ``body`` propagate as themselves."""

    async def main() -> T:
        fs = ArchiveFS(rig.config, rig.store, rig.catalog, rig.cache, rig.key)
        outcome: list[T] = []
        error: list[Exception] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fs.run, 3600.0)
            while fs.reader._nursery is None or fs._nursery is None:
                await trio.sleep(0)
            try:
                outcome.append(await body(fs))
                if drain:
                    background = fs.reader._nursery
                    assert background is not None
                    assert await wait_until(lambda: not background.child_tasks, timeout=10)
            except Exception as exc:
                error.append(exc)
            finally:
                nursery.cancel_scope.cancel()
        if error:
            raise error[0]
        return outcome[0]

    return trio.run(main)


async def ino_of(fs: ArchiveFS, path: str) -> int:
    """The inode of ``path`` found by lookups from the root."""
    ino = ROOT
    for name in path.split("/"):
        attributes = await fs.lookup(ino, name)
        assert attributes is not None, path
        ino = attributes.ino
    return ino


async def open_path(fs: ArchiveFS, path: str) -> int:
    handle, _ = await fs.open(await ino_of(fs, path), os.O_RDONLY)
    return handle


async def read_all(fs: ArchiveFS, path: str, chunk: int = BS) -> bytes:
    """Read a whole file sequentially in ``chunk``-sized requests, as cat would."""
    handle = await open_path(fs, path)
    parts = []
    offset = 0
    while True:
        data = await fs.read(handle, offset, chunk)
        if not data:
            break
        parts.append(bytes(data))
        offset += len(data)
    await fs.release(handle)
    return b"".join(parts)


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``condition`` on the trio thread until it holds or ``timeout`` passes."""
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.01)
    return condition()


def value_files(directory: Path) -> list[Path]:
    """The files diskcache keeps large values in."""
    return sorted(directory.rglob("*.val"))


def corrupt_one_block(directory: Path) -> Path:
    """Flip a byte in the payload of one cached block on disk."""
    path = value_files(directory)[0]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


# -- catalog listings ----------------------------------------------------------------------------


def obj(key: str, size: int = 10, etag: str = '"e1"', mtime_ns: int = 1_000) -> ObjectInfo:
    return ObjectInfo(key, size, mtime_ns, etag)


def listing(objects: Iterable[ObjectInfo]) -> list[ObjectInfo]:
    """Objects in the order a store lists them: ascending UTF-8 bytes of the key."""
    return sorted(objects, key=lambda info: info.key.encode("utf-8"))


def node_at(catalog: Catalog, path: str) -> Node | None:
    """Walk ``a/b/c`` from the root by lookups, as the kernel would."""
    node = catalog.get(ROOT)
    for name in path.split("/"):
        assert node is not None
        node = catalog.lookup(node.ino, name)
        if node is None:
            return None
    return node


@contextlib.contextmanager
def source_files(directory: Path) -> Iterator[Callable[[bytes], FileSource]]:
    """``make(data)``: a Source over a new file in ``directory`` holding ``data``, as the
    staging area hands one to an upload; the descriptors are closed on the way out."""
    directory.mkdir(parents=True, exist_ok=True)
    opened: list[int] = []

    def make(data: bytes) -> FileSource:
        path = directory / f"file{len(opened)}"
        path.write_bytes(data)
        opened.append(os.open(path, os.O_RDONLY))
        return FileSource.of(opened[-1])

    try:
        yield make
    finally:
        for fd in opened:
            os.close(fd)
