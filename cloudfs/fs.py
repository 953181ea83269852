"""The filesystem core on inode numbers: plain values in, plain values out, no pyfuse3.

It joins the catalog (names and attributes), the block reader (bytes) and read-ahead (what to
fetch next), and keeps per-open-file state.  Tests drive it directly, without a kernel.

Open files are pinned to the object version (ETag) they were opened on; a changed object is seen by
the next open, never mixed into an open file.  The kernel may keep its page cache across opens
(``keep_cache``) only while the version is unchanged.

Concurrency: every catalog and store call runs in a worker thread under a named limiter; tables of
handles are changed on the trio thread only.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from itertools import count
from typing import Any, NamedTuple, Protocol

import trio

from .cache import BlockCache
from .catalog import Catalog, Node, SyncReport
from .config import Config
from .errors import CloudfsError, NeedsRestore, NotFound, Unavailable
from .prefetch import ReadAhead
from .reader import BlockReader, Cancelled, ObjectVersion
from .store import ARCHIVE_CLASSES, ObjectStore

log = logging.getLogger(__name__)

_READDIR_BATCH = 1000
_REMEMBERED_VERSIONS = 100_000


class KernelCache(Protocol):
    """What the core may tell the kernel: drop what you cached of these inodes and names."""

    async def forget(self, inodes: list[int], names: list[tuple[int, str]]) -> None: ...


class NoKernelCache:
    """For a core driven without a kernel (tests, tools): nothing is cached anywhere."""

    async def forget(self, inodes: list[int], names: list[tuple[int, str]]) -> None:
        pass


class FsError(CloudfsError):
    """A POSIX-level refusal with an explicit errno (EISDIR, EROFS, ...)."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or os.strerror(code))
        self.errno = code


class Attributes(NamedTuple):
    """What stat shows of a node (a tuple for the same reason as ``catalog.Node``)."""

    ino: int
    mode: int
    size: int
    mtime_ns: int
    uid: int
    gid: int
    block_size: int

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


@dataclass
class _Batch:
    """Directory entries after one offset, being read from the catalog in the background."""

    after: int
    done: trio.Event = field(default_factory=trio.Event)
    entries: list[tuple[str, Attributes]] = field(default_factory=list)
    error: Exception | None = None


@dataclass
class _Listing:
    """The catalog batch an open directory is being listed from, and the next one."""

    ino: int
    after: int = 0
    batch: list[tuple[str, Attributes]] = field(default_factory=list)
    ahead: _Batch | None = None


@dataclass
class OpenFile:
    version: ObjectVersion
    read_ahead: ReadAhead
    cancelled: Cancelled = field(default_factory=Cancelled)
    warmed_from: int = -1
    """The block warm-up last started from: the kernel sends several requests per block."""


class ArchiveFS:
    def __init__(
        self, config: Config, store: ObjectStore, catalog: Catalog, cache: BlockCache
    ) -> None:
        self.config = config
        self.store = store
        self.catalog = catalog
        self.cache = cache
        self.reader = BlockReader(store, cache, config.cache)
        self.kernel: KernelCache = NoKernelCache()
        self.uid, self.gid = os.getuid(), os.getgid()
        self._handles: dict[int, OpenFile] = {}
        self._listings: dict[int, _Listing] = {}
        self._nursery: trio.Nursery | None = None
        self._next_handle = count(1)
        self._opened_versions: dict[int, str] = {}
        self._catalog_threads = trio.CapacityLimiter(4)
        self._store_threads = trio.CapacityLimiter(4)
        self._refresh_wanted = trio.Event()
        self._refresh_done = trio.Event()
        self._last_sync: SyncReport | None = None
        self._last_sync_error = ""
        self._warned_archived: set[str] = set()
        self._started = time.time()

    async def run(self, first_refresh: float) -> None:
        """The filesystem's background work: the read path's fetches, catalog refreshes and
        directory batches read ahead of the kernel."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self.reader.run)
            nursery.start_soon(self.refresher, first_refresh)

    async def _catalog(self, function: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(function, *args, limiter=self._catalog_threads)

    # -- attributes ------------------------------------------------------------------------

    def attributes(self, node: Node) -> Attributes:
        writable = 0 if self.config.mount.read_only else 0o200
        kind = stat.S_IFDIR | 0o555 if node.is_dir else stat.S_IFREG | 0o444
        mode = kind | writable
        return Attributes(
            node.ino, mode, node.size, node.mtime_ns, self.uid, self.gid, self.cache.block_size
        )

    async def _node(self, ino: int) -> Node:
        node: Node | None = await self._catalog(self.catalog.get, ino)
        if node is None:
            raise NotFound(f"inode {ino}")
        return node

    async def lookup(self, parent: int, name: str) -> Attributes | None:
        """Attributes of ``name`` in ``parent``, or None when it does not exist."""
        node = await self._catalog(self.catalog.lookup, parent, name)
        return None if node is None else self.attributes(node)

    async def getattr(self, ino: int) -> Attributes:
        return self.attributes(await self._node(ino))

    async def opendir(self, ino: int) -> int:
        """Open a directory for listing; returns the handle readdir takes."""
        if not (await self._node(ino)).is_dir:
            raise FsError(errno.ENOTDIR)
        handle = next(self._next_handle)
        self._listings[handle] = _Listing(ino)
        return handle

    async def readdir(self, handle: int, after: int) -> list[tuple[str, Attributes]]:
        """Entries with inode numbers above ``after`` (the readdir offset), in inode order.

        One catalog query fetches a batch of a thousand entries; the kernel's requests are
        answered from it, and while the kernel consumes one batch the next is read in the
        background, so a large listing never waits for SQLite between batches."""
        listing = self._listings.get(handle)
        if listing is None:
            raise FsError(errno.EBADF)
        batch = listing.batch
        if not (batch and listing.after <= after < batch[-1][1].ino):
            ahead, listing.ahead = listing.ahead, None
            if ahead is not None and ahead.after == after:
                await ahead.done.wait()
                if ahead.error is not None:
                    raise ahead.error
                batch = ahead.entries
            else:
                batch = await self._catalog(self._entries, listing.ino, after)
            listing.after, listing.batch = after, batch
            if len(batch) == _READDIR_BATCH and self._nursery is not None:
                listing.ahead = _Batch(batch[-1][1].ino)
                self._nursery.start_soon(self._read_batch, listing.ino, listing.ahead)
        start = bisect.bisect_right(batch, after, key=lambda entry: entry[1].ino)
        return batch[start:]

    def _entries(self, ino: int, after: int) -> list[tuple[str, Attributes]]:
        """Worker thread: one batch of a directory's entries with their attributes."""
        nodes = self.catalog.children(ino, after, _READDIR_BATCH)
        return [(node.name, self.attributes(node)) for node in nodes]

    async def _read_batch(self, ino: int, batch: _Batch) -> None:
        try:
            batch.entries = await self._catalog(self._entries, ino, batch.after)
        except Exception as exc:  # handed to the readdir that wants this batch
            batch.error = exc
        finally:
            batch.done.set()

    def releasedir(self, handle: int) -> None:
        self._listings.pop(handle, None)

    # -- files -----------------------------------------------------------------------------

    async def open(self, ino: int, flags: int) -> tuple[int, bool]:
        """Open for reading; returns the handle and whether the kernel may keep cached pages."""
        node = await self._node(ino)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise FsError(errno.EROFS, "this mount serves the archive read-only")
        assert node.key is not None and node.etag is not None
        if node.storage_class in ARCHIVE_CLASSES:
            await self._check_restored(node.key)
        version = ObjectVersion(node.key, node.etag, node.size)
        keep_cache = self._opened_versions.get(ino) == node.etag
        if len(self._opened_versions) >= _REMEMBERED_VERSIONS:
            self._opened_versions.clear()
        self._opened_versions[ino] = node.etag
        handle = next(self._next_handle)
        options = self.config.cache
        self._handles[handle] = OpenFile(
            version,
            ReadAhead(self.cache.block_size, options.readahead_initial, options.readahead_max),
        )
        return handle, keep_cache

    async def _check_restored(self, key: str) -> None:
        """Archived objects need a restore before a GET: fail at open with one log line, and
        ask for the restore if the mount is configured to."""
        info = await trio.to_thread.run_sync(self.store.head, key, limiter=self._store_threads)
        if not info.needs_restore:
            return
        if key not in self._warned_archived:
            self._warned_archived.add(key)
            days = self.config.mount.restore_days
            if days:
                try:
                    await trio.to_thread.run_sync(
                        self.store.request_restore, key, days, limiter=self._store_threads
                    )
                    log.warning(
                        "%s is in storage class %s: restore requested for %d days; it becomes "
                        "readable when S3 finishes (hours)",
                        key,
                        info.storage_class,
                        days,
                    )
                except CloudfsError as exc:
                    self._warned_archived.discard(key)
                    log.warning("%s: restore request failed: %s", key, exc)
            else:
                log.warning(
                    "%s is in storage class %s and not restored; restore it before reading",
                    key,
                    info.storage_class,
                )
        raise NeedsRestore(f"{key}: in {info.storage_class}, needs a restore")

    async def read(self, handle: int, offset: int, size: int) -> bytes | memoryview:
        open_file = self._handles.get(handle)
        if open_file is None:
            raise FsError(errno.EBADF)
        version = open_file.version
        read_ahead = open_file.read_ahead
        # Small objects are fetched whole by the first read: read-ahead would only split that GET.
        if version.size > self.config.cache.small_object:
            plan = read_ahead.on_read(offset, size, version.size)
            if plan is not None:
                self.reader.prefetch(version, plan[0], plan[1], open_file.cancelled)
            next_block = (offset + size) // self.cache.block_size
            if read_ahead.window and next_block != open_file.warmed_from:
                open_file.warmed_from = next_block
                self.reader.warm(version, next_block)
        try:
            return await self.reader.read(version, offset, size)
        except CloudfsError as exc:
            if exc.errno == errno.ESTALE:
                log.info("%s changed in the store; refreshing its entry", version.key)
                await self.refresh_key(version.key)
            raise

    def release(self, handle: int) -> None:
        open_file = self._handles.pop(handle, None)
        if open_file is not None:
            open_file.cancelled.is_set = True

    # -- catalog refresh -------------------------------------------------------------------

    async def refresh_key(self, key: str) -> None:
        """Re-read one object's state from the store (after its ETag stopped matching)."""
        try:
            info = await trio.to_thread.run_sync(self.store.head, key, limiter=self._store_threads)
        except NotFound:
            info = None
        except CloudfsError as exc:
            log.warning("cannot refresh %s: %s", key, exc)
            return
        report = await self._catalog(self.catalog.refresh_object, info, key)
        await self.kernel.forget(report.stale_inodes, report.stale_names)

    async def sync(self) -> SyncReport:
        """Relist the store into the catalog (the listing and the diff run in a worker thread)."""

        def relist() -> SyncReport:
            return self.catalog.sync(self.store.list())

        try:
            report: SyncReport = await trio.to_thread.run_sync(relist, abandon_on_cancel=True)
        except CloudfsError as exc:
            self._last_sync_error = str(exc)
            raise
        self._last_sync, self._last_sync_error = report, ""
        # Sizes and names the kernel cached for attr_timeout would hide the changes until then.
        await self.kernel.forget(report.stale_inodes, report.stale_names)
        log.info(
            "catalog refreshed in %.1fs: %d added, %d changed, %d removed, %d keys not mappable",
            report.seconds,
            report.added,
            report.changed,
            report.removed,
            report.rejected,
        )
        return report

    async def refresh(self) -> dict[str, Any]:
        """Ask the refresher for a relist and wait for the one that starts after this call."""
        done = self._refresh_done
        self._refresh_wanted.set()
        await done.wait()
        if self._last_sync_error:
            raise Unavailable(self._last_sync_error)
        return self._last_sync.summary() if self._last_sync else {}

    async def refresher(self, first_delay: float) -> None:
        """Relist every ``refresh_interval`` seconds, or at once when asked."""
        delay = first_delay
        while True:
            with trio.move_on_after(delay):
                await self._refresh_wanted.wait()
            self._refresh_wanted = trio.Event()
            done, self._refresh_done = self._refresh_done, trio.Event()
            try:
                await self.sync()
            except CloudfsError as exc:
                log.warning("catalog refresh failed: %s", exc)
            except Exception:
                self._last_sync_error = "internal error"
                log.exception("catalog refresh failed")
            done.set()
            delay = self.config.mount.refresh_interval

    # -- status ----------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        def gather() -> dict[str, Any]:
            return {
                "catalog": self.catalog.counts(),
                "rejected_keys": self.catalog.rejected(),
                "synced_at": float(self.catalog.get_meta("synced_at") or 0),
                "cache_bytes": self.cache.volume(),
                "cache_blocks": self.cache.block_count(),
            }

        facts = await trio.to_thread.run_sync(gather, limiter=self._catalog_threads)
        stats = self.reader.stats
        lookups = stats.memory_hits + stats.disk_hits + stats.fetched_blocks
        return {
            "source": self.store.describe(),
            "mountpoint": str(self.config.mountpoint),
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self._started, 1),
            "cache": {
                "directory": str(self.config.cache.directory),
                "bytes": facts["cache_bytes"],
                "limit": self.cache.size_limit,
                "blocks": facts["cache_blocks"],
                "block_size": self.cache.block_size,
                "corrupt_blocks_dropped": self.cache.corrupt_blocks,
                "failed_inserts": self.cache.failed_inserts,
            },
            "reads": {
                "memory_hits": stats.memory_hits,
                "disk_hits": stats.disk_hits,
                "blocks_fetched_on_demand": stats.fetched_blocks,
                "blocks_read_ahead": stats.prefetched_blocks,
                "hit_ratio": round((stats.memory_hits + stats.disk_hits) / lookups, 4)
                if lookups
                else None,
                "bytes_fetched": stats.fetched_bytes,
                "requests": stats.requests,
                "requests_in_flight": stats.requests_in_flight,
                "fetch_errors": stats.errors,
                "last_error": stats.last_error,
            },
            "catalog": facts["catalog"]
            | {
                "synced_at": facts["synced_at"],
                "last_refresh_error": self._last_sync_error,
                "rejected_examples": [
                    {"key": key, "reason": reason} for key, reason in facts["rejected_keys"]
                ],
            },
            "open_files": len(self._handles),
        }

    def statfs(self) -> dict[str, int]:
        block = self.cache.block_size
        free = self.config.mount.free_space // block
        return {
            "block_size": block,
            "blocks": free * 2,
            "free_blocks": free,
            "files": 1 << 32,
            "free_files": 1 << 31,
            "name_max": 255,
        }
