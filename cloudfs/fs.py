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
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from itertools import count
from typing import Any, NamedTuple, Protocol

import trio

from .cache import BlockCache
from .catalog import READY, ROOT, Catalog, Listed, Node, SyncReport
from .changes import Backlog, Changes
from .config import Config
from .dicom_index import BY_PATIENT, VIEW_BASE, VIEW_ROOT, DicomIndex, ViewEntry, is_view_inode
from .errors import CloudfsError, FsError, NeedsRestore, NotFound, Unavailable, contained
from .listing import FirstListing, run_first_listing
from .metrics import Metrics
from .prefetch import ReadAhead
from .reader import BlockReader, Cancelled, ObjectVersion
from .staging import StagingArea
from .store import ARCHIVE_CLASSES, ObjectStore
from .studies import Studies
from .uploader import Uploader

log = logging.getLogger(__name__)

_READDIR_BATCH = 1000
_KEPT_LISTING_ENTRIES = 100_000
"""Directory entries kept across listings, ready to send: some 650 bytes each, 64 MiB at most.
A second ``ls -l`` of a 100,000-entry directory then sends what the first one built."""
_FIGURES_PERIOD = 5.0
"""Seconds between refreshes of the metrics figures that cost a database query, at least."""
_FIGURES_SHARE = 0.05
"""At most this share of one core for those queries: they count every catalog and index row,
close to a second with a million objects, so a large archive is counted less often."""
_BUSY_FOR = 0.05
"""Seconds after a kernel request during which the mount counts as busy for background work."""
_STAGED_ATTEMPTS = 3
"""Opens of a node's staging file before giving up: each retry follows a finished upload."""
_REMEMBERED_VERSIONS = 100_000


class KernelCache(Protocol):
    """What the core may tell the kernel: drop what you cached of these inodes and names."""

    async def forget(self, inodes: list[int], names: list[tuple[int, str]]) -> None: ...


class NoKernelCache:
    """For a core driven without a kernel (tests, tools): nothing is cached anywhere."""

    async def forget(self, inodes: list[int], names: list[tuple[int, str]]) -> None:
        pass


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


def _with_staged(attributes: Attributes, staged: StagedFile | None) -> Attributes:
    """``attributes`` with the size and time of ``staged``, the file's staging copy, if any."""
    if staged is None:
        return attributes
    return attributes._replace(size=staged.size, mtime_ns=staged.mtime_ns)


Presenter = Callable[[str, Attributes], Any]
"""Turns a directory entry into what readdir hands out (the FUSE layer's reply entry)."""


def _as_listed(name: str, attributes: Attributes) -> tuple[str, Attributes]:
    return name, attributes


class _EntryBatch(NamedTuple):
    """One catalog batch of a directory's entries: ``(name, attributes, presented)`` each."""

    entries: list[tuple[str, Attributes, Any]]
    version: int | None
    """The catalog's version before the batch was read; None: not kept for other listings."""


def _kept_size(listed: _EntryBatch) -> int:
    """What a kept batch counts against the bound: its entries, and one for itself (the empty
    batch that ends every listing would otherwise be free to keep)."""
    return len(listed.entries) + 1


@dataclass
class _Batch:
    """Directory entries after one offset, being read from the catalog in the background."""

    after: int
    staged: dict[int, StagedFile]
    """The files being written when the read began (see ``ArchiveFS._as_of_now``)."""
    done: trio.Event = field(default_factory=trio.Event)
    entries: list[tuple[str, Attributes, Any]] = field(default_factory=list)
    error: Exception | None = None


@dataclass
class _Listing:
    """The catalog batch an open directory is being listed from, and the next one."""

    ino: int
    after: int = 0
    batch: list[tuple[str, Attributes, Any]] = field(default_factory=list)
    staged: dict[int, StagedFile] = field(default_factory=dict)
    """The files being written when ``batch`` was read."""
    ahead: _Batch | None = None


@dataclass
class StagedFile:
    """A file whose bytes live in the staging area, while any handle has it open."""

    ino: int
    name: str
    fd: int
    size: int
    mtime_ns: int
    handles: int = 0
    writers: int = 0
    writes: int = 0
    """Writes since the size was last recorded in the catalog."""
    ready: bool = False
    """The catalog holds these bytes as complete (READY): a close need not record them again."""
    in_cloud: bool = False
    """Uploaded while a writer kept it open (``--upload-mode=sync``) and unchanged since."""
    detached: bool = False
    """Uploaded (or unlinked) meanwhile: the catalog no longer names this staging file, so a
    new writer gets a fresh copy and the last close removes it."""
    lock: trio.Lock = field(default_factory=trio.Lock)
    """Held by writes and by an fsync that uploads (sync mode), so that upload sees no tear."""


@dataclass
class _Opening:
    """Opens of one staging file in progress, and whether it was let go meanwhile."""

    count: int = 0
    let_go: bool = False


@dataclass
class OpenFile:
    ino: int
    version: ObjectVersion | None
    """The cloud version read, or None for a file staged when opened."""
    read_ahead: ReadAhead
    staged: StagedFile | None = None
    """The staging file this handle opened; it outlives an unlink or a replacing rename."""
    writable: bool = False
    cancelled: Cancelled = field(default_factory=Cancelled)
    warmed_from: int = -1
    """The block warm-up last started from: the kernel sends several requests per block."""


class ArchiveFS:
    def __init__(
        self,
        config: Config,
        store: ObjectStore,
        catalog: Catalog,
        cache: BlockCache,
        key: bytes | None = None,
    ) -> None:
        """``key``: the operator's cache key, under which staged files are sealed too."""
        self.config = config
        self.store = store
        self.catalog = catalog
        self.cache = cache
        self.reader = BlockReader(store, cache, config.cache)
        self.changes = Changes(catalog)
        self.staging = StagingArea(
            config.cache.directory / "staging", config.write.staging_limit, key
        )
        self.uploader = Uploader(store, self.changes, self.staging, cache, config.write, self)
        self.kernel: KernelCache = NoKernelCache()
        self.active_at = 0.0
        """When the kernel last brought a request (monotonic clock); set by the FUSE layer."""
        mount_options = config.mount
        self.uid = os.getuid() if mount_options.owner_uid is None else mount_options.owner_uid
        self.gid = os.getgid() if mount_options.owner_gid is None else mount_options.owner_gid
        self._permissions_mask = ~0o222 if mount_options.read_only else ~0
        self._default_modes = {
            is_dir: kind | (default & ~mount_options.umask & self._permissions_mask)
            for is_dir, kind, default in ((False, stat.S_IFREG, 0o644), (True, stat.S_IFDIR, 0o755))
        }
        """Mode of a file (False) or directory (True) without permissions set through the mount."""
        self._handles: dict[int, OpenFile] = {}
        self._staged: dict[int, StagedFile] = {}
        self._unstaged = 0
        """Staged files that have left ``_staged`` so far (see ``_attributes_of``)."""
        self._opening: dict[str, _Opening] = {}
        self._recovered_keys: list[str] = []
        self._listings: dict[int, _Listing] = {}
        self.audit_state: Callable[[], dict[str, Any]] | None = None
        """What the audit trail reports of itself (records written, held, dropped), for status
        and metrics; set by the mount when it keeps one."""
        self.present: Presenter = _as_listed
        """What readdir returns for each entry; the FUSE layer sets its reply entry here, so
        that it is built in a worker thread and kept with the batch."""
        self._kept_listings: OrderedDict[tuple[int, int], _EntryBatch] = OrderedDict()
        """Batches by (directory, offset), least recently listed first; see ``_listed_batch``."""
        self._kept_entries = 0
        self._nursery: trio.Nursery | None = None
        self._next_handle = count(1)
        self._opened_versions: dict[int, str] = {}
        self._catalog_threads = trio.CapacityLimiter(4)
        self._disk_threads = trio.CapacityLimiter(config.cache.disk_threads)
        self._fsync_threads = trio.CapacityLimiter(4)
        self._making_ahead = False
        self._store_threads = trio.CapacityLimiter(4)
        self._refresh_wanted = trio.Event()
        self._refresh_done = trio.Event()
        self._last_sync: SyncReport | None = None
        self._last_sync_error = ""
        self._warned_archived: set[str] = set()
        self._started = time.time()
        self.metrics: Metrics | None = None
        """The Prometheus endpoint's figures, when it is on (set before ``run``)."""
        self._figures: dict[str, Any] = {}
        self._cache_served_bytes = 0
        self._reported_errors: dict[str, int] = {}
        checkpoint = catalog.listing_checkpoint()
        self.listing = FirstListing(
            not catalog.get_meta("synced_at"),
            checkpoint,
            catalog.counts()["files"] if checkpoint else 0,
            moved=self._listing_moved,
        )
        """The first listing of the store, while it fills the catalog (see ``listing``)."""
        self.studies: Studies | None = None
        self.view_name = ""
        if config.dicom.index:
            index = DicomIndex(catalog, config.dicom.patient_folder == "name")
            self.studies = Studies(config.dicom, index, store, cache, self.reader, self.busy)
            self.view_name = config.dicom.view_dir

    def busy(self) -> bool:
        """Whether the mount is answering requests now, or listing the store for the first time:
        background indexing waits for a gap.  The first listing decides what every waiting
        lookup, create and listing may answer, so header reads must not compete with it for the
        store and the interpreter (they made a first listing of 100,000 objects take 179 s
        instead of 112 s)."""
        return self.listing.running or time.monotonic() - self.active_at < _BUSY_FOR

    async def run(self, first_refresh: float) -> None:
        """The filesystem's background work: the read path's fetches, catalog refreshes and
        directory batches read ahead of the kernel."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self.reader.run)
            nursery.start_soon(self.uploader.run)
            if self.listing.running:
                nursery.start_soon(self._list_first)
            else:
                nursery.start_soon(self.refresher, first_refresh)
            if self.studies is not None:
                nursery.start_soon(self.studies.run)
            if self.metrics is not None:
                nursery.start_soon(self._refresh_figures)
            for key in self._recovered_keys:
                nursery.start_soon(self.refresh_key, key)

    async def _list_first(self) -> None:
        """The first listing of the store, then relists every ``refresh_interval`` from its
        end."""
        await run_first_listing(self.store, self.catalog, self.listing)
        await self.refresher(self.config.mount.refresh_interval)

    def _listing_moved(self) -> None:
        """The first listing cataloged another batch, or ended: new objects for the DICOM index,
        and at the end its full pace."""
        if self.studies is not None:
            self.studies.wake()

    async def _listed(
        self,
        parent: int,
        name: str | None,
        what: str,
        cataloged: Callable[[], Awaitable[Attributes | None]] | None = None,
        seen: int | None = None,
    ) -> Attributes | None:
        """Wait until the first listing has cataloged every key under ``name`` in directory
        ``parent`` (under ``parent`` itself when ``name`` is None), or until ``cataloged``,
        asked again whenever batches beyond the ``seen`` first ones have landed, finds the entry
        (then its answer); FsError EAGAIN if neither comes in time.  At once when the catalog
        is complete."""
        if not self.listing.running:
            return None
        seen = self.listing.batches if seen is None else seen
        path = await self._catalog(self.catalog.path_of, parent)
        entry = path if name is None else f"{path}/{name}" if path else name
        with trio.move_on_after(self.listing.wait):
            while not self.listing.listed(f"{entry}/" if entry else ""):
                if self.listing.batches == seen:
                    await self.listing.moved()
                    continue
                seen = self.listing.batches
                if cataloged is not None and (found := await cataloged()) is not None:
                    return found
            return None
        self.listing.refused(f"{what} of /{entry}")
        raise FsError(errno.EAGAIN, f"/{entry}: not listed yet")

    def recover(self) -> None:
        """Before serving: settle what a crash left in the staging area (blocking)."""
        reverted, removed = self.changes.recover()
        unsynced = {node.staged for node in reverted + removed if node.staged}
        self.staging.scan(self.changes.staged_names(), unsynced)
        self._recovered_keys = [node.key for node in reverted if node.key]
        backlog = self.changes.backlog()
        if backlog.files or backlog.copies or backlog.deletes:
            log.info(
                "resuming the write-back journal: %d files (%d bytes), %d renames, %d deletes",
                backlog.files,
                backlog.bytes,
                backlog.copies,
                backlog.deletes,
            )

    async def drain(self) -> None:
        """After unmount: let pending uploads finish, for at most ``drain_timeout``."""
        await self.uploader.drain(self.config.write.drain_timeout)

    async def _catalog(self, function: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(function, *args, limiter=self._catalog_threads)

    # -- attributes ------------------------------------------------------------------------

    def attributes(self, node: Node) -> Attributes:
        """What stat shows: sizes of files open for writing come from their staging file."""
        return _with_staged(self._catalog_attributes(node), self._staged.get(node.ino))

    def _catalog_attributes(self, node: Node | Listed) -> Attributes:
        """What the catalog says of ``node`` (safe in a worker thread: reads no table).  Called
        for every entry of a listing, hence the modes worked out once in ``__init__``."""
        if node.mode is None:
            mode = self._default_modes[node.is_dir]
        else:
            mode = (stat.S_IFDIR if node.is_dir else stat.S_IFREG) | (
                node.mode & self._permissions_mask
            )
        return Attributes(
            node.ino,
            mode,
            node.size,
            node.mtime_ns,
            self.uid if node.uid is None else node.uid,
            self.gid if node.gid is None else node.gid,
            self.cache.block_size,
        )

    async def _node(self, ino: int) -> Node:
        node: Node | None = await self._catalog(self.catalog.get, ino)
        if node is None:
            raise NotFound(f"inode {ino}")
        return node

    async def lookup(self, parent: int, name: str) -> Attributes | None:
        """Attributes of ``name`` in ``parent``, or None when it does not exist."""
        if is_view_inode(parent) or (parent == ROOT and name == self.view_name):
            return await self._catalog(self._view_lookup, parent, name)
        seen = self.listing.batches
        found = await self._attributes_of(self.catalog.lookup, parent, name)
        if found is None and self.listing.running:
            # Not cataloged yet is not "does not exist" (see ``listing``): a name may appear
            # with any batch, long before the listing has passed everything under it.
            def cataloged() -> Awaitable[Attributes | None]:
                return self._attributes_of(self.catalog.lookup, parent, name)

            found = await self._listed(parent, name, "lookup", cataloged, seen) or await cataloged()
        return found

    async def getattr(self, ino: int) -> Attributes:
        if is_view_inode(ino):
            return await self._catalog(self._view_attributes, ino)
        attributes = await self._attributes_of(self.catalog.get, ino)
        if attributes is None:
            raise NotFound(f"inode {ino}")
        return attributes

    async def _attributes_of(
        self, find: Callable[..., Node | None], *args: object
    ) -> Attributes | None:
        """Attributes of the node ``find`` reads from the catalog (None: no such node).  A file
        whose last handle closes while the catalog is read leaves ``_staged`` with its final
        size already in the catalog, but perhaps after the read: the node is then read again, so
        stat never shows a size older than the bytes written (a concurrent lookup once gave a
        just-written file size 0, and the kernel then read it as empty)."""
        while True:
            unstaged = self._unstaged
            node = await self._catalog(find, *args)
            if node is None:
                return None
            if self._unstaged == unstaged:
                return self.attributes(node)

    async def opendir(self, ino: int) -> int:
        """Open a directory for listing; returns the handle readdir takes."""
        if not (await self.getattr(ino)).is_dir:
            raise FsError(errno.ENOTDIR)
        if not is_view_inode(ino):
            await self._listed(ino, None, "listing")
        handle = next(self._next_handle)
        self._listings[handle] = _Listing(ino)
        return handle

    async def readdir(self, handle: int, after: int) -> list[Any]:
        """Entries with inode numbers above ``after`` (the readdir offset), in inode order, as
        ``present`` makes them (by default ``(name, attributes)``).

        One catalog query fetches a batch of a thousand entries; the kernel's requests are
        answered from it, and while the kernel consumes one batch the next is read in the
        background, so a large listing never waits for SQLite between batches.  Batches are
        kept for the next listing of the directory while the catalog has not changed."""
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
                batch, staged = ahead.entries, ahead.staged
            else:
                staged = dict(self._staged)
                batch = await self._listed_batch(listing.ino, after)
            listing.after, listing.batch, listing.staged = after, batch, staged
            if len(batch) == _READDIR_BATCH and self._nursery is not None:
                listing.ahead = _Batch(batch[-1][1].ino, dict(self._staged))
                self._nursery.start_soon(self._read_batch, listing.ino, listing.ahead)
        start = bisect.bisect_right(batch, after, key=lambda entry: entry[1].ino)
        return self._as_of_now(batch[start:], listing.staged)

    async def _listed_batch(self, ino: int, after: int) -> list[tuple[str, Attributes, Any]]:
        """A batch of entries: kept from an earlier listing if the catalog has not changed
        since it was read (a new listing of 100,000 entries then costs no query and builds
        no reply entry), otherwise read and kept."""
        key = (ino, after)
        kept = self._kept_listings.get(key)
        if kept is not None and kept.version == self.catalog.version:
            self._kept_listings.move_to_end(key)
            return kept.entries
        listed = await self._catalog(self._entries, ino, after)
        if key in self._kept_listings:  # stale, or read meanwhile by another listing
            self._forget_listing(key)
        if listed.version is not None:
            self._kept_listings[key] = listed
            self._kept_entries += _kept_size(listed)
            while self._kept_entries > _KEPT_LISTING_ENTRIES:
                self._forget_listing(next(iter(self._kept_listings)))
        return listed.entries

    def _forget_listing(self, key: tuple[int, int]) -> None:
        self._kept_entries -= _kept_size(self._kept_listings.pop(key))

    def _as_of_now(
        self, entries: list[tuple[str, Attributes, Any]], staged_then: dict[int, StagedFile]
    ) -> list[Any]:
        """Listed entries with the sizes stat shows now.  A file being written shows its
        staging file's size, and so does a file that was being written when its batch was
        read: its last writer may have closed meanwhile, and the catalog row read before its
        final size landed (the kernel would take that stale size from the listing, as it once
        took a size of 0 from a racing lookup; see ``_attributes_of``)."""
        staged_now = self._staged
        if not staged_now and not staged_then:
            return [presented for _, _, presented in entries]
        listed = []
        for name, attributes, presented in entries:
            staged = staged_now.get(attributes.ino) or staged_then.get(attributes.ino)
            listed.append(
                presented
                if staged is None
                else self.present(name, _with_staged(attributes, staged))
            )
        return listed

    def _entries(self, ino: int, after: int) -> _EntryBatch:
        """Worker thread: one batch of a directory's entries with their attributes."""
        if is_view_inode(ino):
            return _EntryBatch(self._presented(self._view_entries(ino, after)), None)
        version: int | None = self.catalog.version
        listed = self.catalog.children(ino, after, _READDIR_BATCH)
        entries = [(entry.name, self._catalog_attributes(entry)) for entry in listed]
        # The view's root comes last in the root directory: its inode is above all others.
        # Whether it shows is not the catalog's to say, so that batch is not kept.
        if ino == ROOT and len(entries) < _READDIR_BATCH:
            version = None
            if self._view_shown():
                entries.append((self.view_name, self._view_directory(VIEW_ROOT)))
        return _EntryBatch(self._presented(entries), version)

    def _presented(
        self, entries: list[tuple[str, Attributes]]
    ) -> list[tuple[str, Attributes, Any]]:
        present = self.present
        return [(name, attributes, present(name, attributes)) for name, attributes in entries]

    # -- the audit trail's descriptions ----------------------------------------------------

    async def describe(self, ino: int, name: str | None = None) -> tuple[str, str, str]:
        """Path (of ``name`` in ``ino`` if given), PatientID and StudyInstanceUID of a node, for
        the audit trail; empty strings where unknown."""

        def find() -> tuple[str, str, str]:
            view = is_view_inode(ino) and self.studies is not None
            if view:
                assert self.studies is not None
                index = self.studies.index
                path = f"{self.view_name}/{index.view_path(ino - VIEW_BASE)}".rstrip("/")
            else:
                path = self.catalog.path_of(ino)
            if name is not None:  # an entry of directory ``ino``: its path is all there is
                return (f"{path}/{name}" if path else name), "", ""
            if view:
                entry = index.view_entry(ino - VIEW_BASE)
                key = entry.target if entry is not None else None
            else:
                node = self.catalog.get(ino)
                key = node.key if node is not None and not node.is_dir else None
            if key is not None and self.studies is not None:
                instance = self.studies.index.instance(key)
                if instance is not None:
                    return path, instance.patient_id, instance.study_uid
            return path, "", ""

        try:
            described: tuple[str, str, str] = await self._catalog(find)
        except Exception as exc:  # an audit record with less detail beats a failed request
            log.warning("cannot describe inode %d for the audit trail: %s", ino, exc)
            return f"inode {ino}", "", ""
        return described

    # -- the DICOM browse view (worker threads) -------------------------------------------

    def _view_directory(self, entry_id: int) -> Attributes:
        return Attributes(
            VIEW_BASE + entry_id,
            stat.S_IFDIR | 0o555,
            0,
            int(self._started * 1e9),
            self.uid,
            self.gid,
            self.cache.block_size,
        )

    def _view_file(self, entry: ViewEntry, node: Node) -> Attributes:
        attributes = self.attributes(node)
        return attributes._replace(ino=entry.ino, mode=attributes.mode & ~0o222)

    def _view_attributes(self, ino: int) -> Attributes:
        assert self.studies is not None
        entry = self.studies.index.view_entry(ino - VIEW_BASE)
        if entry is None:
            raise NotFound(f"view entry {ino}")
        if entry.target is None:
            return self._view_directory(entry.id)
        node = self.catalog.by_key(entry.target)
        if node is None:  # the object left the catalog; the indexer drops the entry soon
            raise NotFound(entry.target)
        return self._view_file(entry, node)

    def _view_shown(self) -> bool:
        """The view appears at the root once it holds an instance: an archive without DICOM
        shows only its own tree."""
        if self.studies is None or not self.view_name:
            return False
        return bool(self.studies.index.view_children(BY_PATIENT, 0, 1))

    def _view_lookup(self, parent: int, name: str) -> Attributes | None:
        assert self.studies is not None
        if parent == ROOT:
            return self._view_directory(VIEW_ROOT) if self._view_shown() else None
        entry = self.studies.index.view_lookup(parent - VIEW_BASE, name)
        if entry is None:
            return None
        if entry.target is None:
            return self._view_directory(entry.id)
        node = self.catalog.by_key(entry.target)
        return None if node is None else self._view_file(entry, node)

    def _view_entries(self, ino: int, after: int) -> list[tuple[str, Attributes]]:
        assert self.studies is not None
        index = self.studies.index
        after_id = max(after - VIEW_BASE, 0)
        entries = index.view_children(ino - VIEW_BASE, after_id, _READDIR_BATCH)
        nodes = index.target_nodes([e.target for e in entries if e.target is not None])
        listed = []
        for entry in entries:
            if entry.target is None:
                listed.append((entry.name, self._view_directory(entry.id)))
            elif entry.target in nodes:
                listed.append((entry.name, self._view_file(entry, nodes[entry.target])))
        return listed

    async def _read_batch(self, ino: int, batch: _Batch) -> None:
        try:
            batch.entries = await self._listed_batch(ino, batch.after)
        except Exception as exc:  # handed to the readdir that wants this batch
            batch.error = exc
        finally:
            batch.done.set()

    def releasedir(self, handle: int) -> None:
        self._listings.pop(handle, None)

    # -- files -----------------------------------------------------------------------------

    async def open(self, ino: int, flags: int, backup: bool = False) -> tuple[int, bool]:
        """Open a file; returns the handle and whether the kernel may keep cached pages.
        ``backup``: the caller is a backup program, whose reads must not displace the cache.

        Reading a file whose bytes are in the cloud pins the version it had at open.  Writing
        moves the file into the staging area first (the whole file: objects cannot be patched),
        unless it is truncated at open, which is how a PACS or a copy overwrites a file."""
        if is_view_inode(ino):
            node = await self._catalog(self._view_open, ino, flags)
            ino = node.ino
        else:
            node = await self._node(ino)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        writable = bool(flags & (os.O_WRONLY | os.O_RDWR))
        if writable or flags & os.O_TRUNC:
            if self.config.mount.read_only:
                raise FsError(errno.EROFS, "this mount is read-only")
            staged = await self._stage(node, truncate=bool(flags & os.O_TRUNC))
            return self._new_handle(ino, None, staged, writable), False
        node, opened = await self._current_staged(node)
        if opened is not None:
            return self._new_handle(ino, None, opened, False), False
        assert node.cloud_key is not None and node.etag is not None
        if node.storage_class in ARCHIVE_CLASSES:
            await self._check_restored(node.cloud_key)
        version = ObjectVersion(node.cloud_key, node.etag, node.size, backup)
        if self.studies is not None and not backup:
            self.studies.opened(node.cloud_key)
        keep_cache = self._opened_versions.get(ino) == node.etag
        if len(self._opened_versions) >= _REMEMBERED_VERSIONS:
            self._opened_versions.clear()
        self._opened_versions[ino] = node.etag
        return self._new_handle(ino, version, None, False), keep_cache

    def _view_open(self, ino: int, flags: int) -> Node:
        """Worker thread: the catalog node a view file shows; the view is read-only."""
        assert self.studies is not None
        entry = self.studies.index.view_entry(ino - VIEW_BASE)
        if entry is None or entry.target is None:
            raise NotFound(f"view entry {ino}") if entry is None else FsError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            raise FsError(errno.EROFS, "the DICOM view is read-only")
        node = self.catalog.by_key(entry.target)
        if node is None:
            raise NotFound(entry.target)
        return node

    def _new_handle(
        self, ino: int, version: ObjectVersion | None, staged: StagedFile | None, writable: bool
    ) -> int:
        if staged is not None:
            staged.handles += 1
            staged.writers += writable
        handle = next(self._next_handle)
        options = self.config.cache
        # A backup reads everything once: it never gets a whole object fetched on its behalf.
        whole_limit = 0 if version is None or version.backup else self.cache.size_limit // 4
        self._handles[handle] = OpenFile(
            ino,
            version,
            ReadAhead(
                self.cache.block_size,
                options.readahead_initial,
                options.readahead_max,
                whole_limit,
            ),
            staged,
            writable,
        )
        return handle

    async def _current_staged(self, node: Node) -> tuple[Node, StagedFile | None]:
        """The node as it is now and its open staging file, or None if its bytes are only in
        the cloud.  A staging file let go while it was being opened (its upload finished) means
        reading the node again; one the journal names but the disk does not hold is an error
        (EIO), never a loop."""
        for _ in range(_STAGED_ATTEMPTS):
            if node.staged is None:
                return node, None
            staged = await self._open_staged(node)
            if staged is not None:
                return node, staged
            node = await self._node(node.ino)
        log.error("%s: its staging file %s is missing", node.key, node.staged)
        raise FsError(errno.EIO, f"{node.key}: staging file missing")

    async def _open_staged(self, node: Node) -> StagedFile | None:
        """The open staging file of a node whose bytes are staged, or None if that file was let
        go while it was being opened (its upload finished, or the node changed): the caller
        reads the node again.  Opening takes a disk thread, and the file must not be taken
        into ``_staged`` once its remover has looked there and found nothing."""
        staged = self._staged.get(node.ino)
        if staged is not None:
            return staged
        name = node.staged
        assert name is not None
        opening = self._opening.setdefault(name, _Opening())
        opening.count += 1
        try:
            fd = await self._disk(self.staging.open, name)
        except FileNotFoundError:
            return None
        finally:
            opening.count -= 1
            if not opening.count:
                del self._opening[name]
        staged = self._staged.get(node.ino)  # another open may have won meanwhile
        if staged is not None or opening.let_go:
            os.close(fd)
            return staged
        staged = StagedFile(node.ino, name, fd, node.size, node.mtime_ns)
        self._staged[node.ino] = staged
        return staged

    def _let_go(self, name: str) -> None:
        """Staging file ``name`` is about to be removed: opens of it in progress start over."""
        opening = self._opening.get(name)
        if opening is not None:
            opening.let_go = True

    async def _stage(self, node: Node, truncate: bool) -> StagedFile:
        """Make a file writable: its bytes in a staging file no upload is reading."""
        staged = self._staged.get(node.ino)
        if staged is None:
            node, staged = await self._current_staged(node)
        if staged is not None and (staged.detached or self.uploader.is_uploading(staged.name)):
            # Copy on write: the upload in progress keeps reading the bytes it started with.
            size = 0 if truncate else staged.size
            # Once named, the copy is all the journal has of a complete file not yet in the
            # cloud: it and its naming must be durable, as the fsync that made it complete was.
            durable = not (truncate or staged.detached) and (staged.ready or node.dirty == READY)
            name, fd = await self._disk(self.staging.copy, staged.fd, size, durable)
            await self._catalog(self.changes.stage, node.ino, name, durable)
            replacement = StagedFile(node.ino, name, fd, size, time.time_ns())
            self._retire(staged)
            self._staged[node.ino] = staged = replacement
        if staged is None:
            staged = await self._stage_from_cloud(node, truncate)
        if truncate and staged.size:
            await self._truncate(staged, 0)
        return staged

    async def _stage_from_cloud(self, node: Node, truncate: bool) -> StagedFile:
        name, fd = await self._disk(self.staging.take)
        size = 0
        try:
            if not truncate and node.size:
                assert node.cloud_key is not None and node.etag is not None
                if node.storage_class in ARCHIVE_CLASSES:
                    await self._check_restored(node.cloud_key)
                version = ObjectVersion(node.cloud_key, node.etag, node.size)
                chunk = self.config.cache.fetch_chunk
                for offset in range(0, node.size, chunk):
                    data = await self.reader.read(version, offset, min(chunk, node.size - offset))
                    # Reserved as written: removing a part-filled file gives back exactly this.
                    self.staging.reserve(len(data))
                    await self._disk(self.staging.write, fd, data, offset)
                    size += len(data)
            await self._catalog(self.changes.stage, node.ino, name)
        except BaseException:
            os.close(fd)
            with trio.CancelScope(shield=True):
                await self._disk(self.staging.remove, name)
            raise
        staged = self._staged.get(node.ino)
        if staged is not None:  # a concurrent open staged it first: use that one
            os.close(fd)
            await self._disk(self.staging.remove, name)
            return staged
        staged = StagedFile(node.ino, name, fd, size, node.mtime_ns)
        self._staged[node.ino] = staged
        return staged

    def _retire(self, staged: StagedFile) -> None:
        """A staging file the catalog no longer names: removed when its last handle closes."""
        staged.detached = True
        if self._staged.get(staged.ino) is staged:
            del self._staged[staged.ino]
            self._unstaged += 1
        if staged.handles == 0 and staged.fd >= 0:
            os.close(staged.fd)
            staged.fd = -1
            if not self.uploader.is_uploading(staged.name):  # else the uploader removes it
                self._let_go(staged.name)
                self._nursery_or_fail().start_soon(
                    contained,
                    "removing a staging file",
                    self._disk,
                    self.staging.remove,
                    staged.name,
                )

    def _nursery_or_fail(self) -> trio.Nursery:
        if self._nursery is None:
            raise Unavailable("the filesystem is not running")
        return self._nursery

    async def _disk(self, function: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(function, *args, limiter=self._disk_threads)

    async def _check_restored(self, key: str) -> None:
        """Archived objects need a restore before a GET: fail at open with one log line, and
        ask for the restore if the mount is configured to.  The store is given io_timeout, as
        a read is: with the cloud down, botocore's retries would hold the open for over a
        minute; the open fails with EIO instead."""
        timeout = self.config.cache.io_timeout
        with trio.move_on_after(timeout):
            info = await trio.to_thread.run_sync(
                self.store.head, key, limiter=self._store_threads, abandon_on_cancel=True
            )
            if not info.needs_restore:
                return
            if key not in self._warned_archived:
                self._warned_archived.add(key)
                await self._ask_restore(key, info.storage_class)
            raise NeedsRestore(f"{key}: in {info.storage_class}, needs a restore")
        raise Unavailable(f"{key}: no answer from the store in {timeout:g}s")

    async def _ask_restore(self, key: str, storage_class: str) -> None:
        """The one log line for an archived object, and its restore request if configured;
        a request that fails or times out is asked again by the next open."""
        days = self.config.mount.restore_days
        if not days:
            log.warning(
                "%s is in storage class %s and not restored; restore it before reading",
                key,
                storage_class,
            )
            return
        try:
            await trio.to_thread.run_sync(
                self.store.request_restore,
                key,
                days,
                limiter=self._store_threads,
                abandon_on_cancel=True,
            )
        except CloudfsError as exc:
            self._warned_archived.discard(key)
            log.warning("%s: restore request failed: %s", key, exc)
            return
        except trio.Cancelled:
            self._warned_archived.discard(key)  # timed out: the next open asks
            raise
        log.warning(
            "%s is in storage class %s: restore requested for %d days; it becomes readable "
            "when S3 finishes (hours)",
            key,
            storage_class,
            days,
        )

    async def read(self, handle: int, offset: int, size: int) -> bytes | memoryview:
        open_file = self._handles.get(handle)
        if open_file is None:
            raise FsError(errno.EBADF)
        # The newest bytes of the file, even if another writer made a fresh staging copy.
        staged = self._staged.get(open_file.ino) or open_file.staged
        if staged is not None:
            data: bytes = await self._disk(self.staging.read, staged.fd, size, offset)
            return data
        if open_file.version is None:
            raise FsError(errno.EBADF)
        version = open_file.version
        read_ahead = open_file.read_ahead
        random_access = False
        # Small objects are fetched whole by the first read: read-ahead would only split that GET.
        if version.size > self.config.cache.small_object:
            plan = read_ahead.on_read(offset, size, version.size)
            if plan is not None:
                self.reader.prefetch(version, plan[0], plan[1], open_file.cancelled)
            next_block = (offset + size) // self.cache.block_size
            random_access = not read_ahead.window
            if not random_access and next_block != open_file.warmed_from:
                open_file.warmed_from = next_block
                self.reader.warm(version, next_block)
        try:
            if self.metrics is None:
                return await self.reader.read(version, offset, size, random_access)
            return await self._measured_read(version, offset, size, random_access)
        except CloudfsError as exc:
            if exc.errno == errno.ESTALE:
                log.info("%s changed in the store; refreshing its entry", version.key)
                await self.refresh_key(version.key)
            raise

    async def _measured_read(
        self, version: ObjectVersion, offset: int, size: int, random_access: bool
    ) -> bytes | memoryview:
        """A read timed for the latency histogram.  Its source is told from the counters it
        moved: a concurrent read's fetch may be taken for this one's, a small error for a
        histogram, against a per-read flag threaded through the whole read path."""
        assert self.metrics is not None
        stats = self.reader.stats
        started = time.perf_counter()
        fetched = stats.fetched_blocks + stats.prefetched_blocks
        disk = stats.disk_hits
        data = await self.reader.read(version, offset, size, random_access)
        if stats.fetched_blocks + stats.prefetched_blocks != fetched:
            source = "cloud"
        else:
            source = "disk" if stats.disk_hits != disk else "memory"
            self._cache_served_bytes += len(data)
        self.metrics.observe_read(time.perf_counter() - started, source)
        return data

    def metrics_snapshot(self) -> dict[str, Any]:
        """The metrics endpoint's figures (called from its HTTP thread: plain reads of counters
        and of the figures ``_refresh_figures`` replaces whole)."""
        reads, uploads = self.reader.stats, self.uploader.stats
        studies = self.studies
        return self._figures | {
            "memory_hits": reads.memory_hits,
            "disk_hits": reads.disk_hits,
            "blocks_fetched": reads.fetched_blocks,
            "cache_served_bytes": self._cache_served_bytes,
            "cloud_fetched_bytes": reads.fetched_bytes,
            "cloud_fetches": reads.requests,
            "cloud_fetches_in_flight": reads.requests_in_flight,
            "fetch_errors": reads.errors,
            "cache_limit_bytes": self.cache.size_limit,
            "corrupt_blocks": self.cache.corrupt_blocks,
            "failed_inserts": self.cache.failed_inserts,
            "prefetched_blocks": reads.prefetched_blocks,
            "prefetched_bytes": reads.prefetched_bytes,
            "prefetch_used_bytes": self.reader.ledger.used_bytes,
            "prefetch_wasted_bytes": self.reader.ledger.wasted_bytes,
            "prefetch_unread_bytes": self.reader.ledger.unread_bytes,
            "studies_prefetched": studies.prefetched_studies if studies else None,
            "dicom_headers_read": studies.headers_read if studies else None,
            "dicom_read_failures": studies.read_failures if studies else None,
            "uploaded_files": uploads.files,
            "uploaded_bytes": uploads.bytes,
            "upload_conflicts": uploads.conflicts,
            "upload_errors": uploads.errors,
            "staging_bytes": self.staging.used,
            "staging_limit_bytes": self.staging.limit,
            "open_files": len(self._handles),
            "started_at": self._started,
        }

    async def _refresh_figures(self) -> None:
        """Every few seconds: the figures that cost a database query, and the cloud errors by
        kind since the last round."""
        assert self.metrics is not None

        def gather() -> dict[str, Any]:
            counts = self.catalog.counts()
            backlog = self.changes.backlog()
            figures = {
                "cache_bytes": self.cache.volume(),
                "cache_blocks": self.cache.block_count(),
                "cache_pinned_bytes": self.cache.pinned_volume(),
                "catalog_files": counts["files"],
                "catalog_directories": counts["directories"],
                "catalog_bytes": counts["bytes"],
                "catalog_rejected_keys": counts["rejected_keys"],
                "catalog_synced_at": float(self.catalog.get_meta("synced_at") or 0),
                "upload_pending_files": backlog.files,
                "upload_pending_bytes": backlog.bytes,
                "upload_oldest_pending_at": backlog.oldest,
            }
            if self.studies is not None:
                progress = self.studies.index.progress()
                figures |= {
                    "dicom_objects": progress["objects"],
                    "dicom_indexed": progress["indexed"],
                    "dicom_pending": progress["pending"],
                    "dicom_instances": progress["dicom"],
                    "dicom_studies": progress["studies"],
                }
            if self.audit_state is not None:
                audit = self.audit_state()
                figures |= {
                    "audit_records_written": audit["written"],
                    "audit_records_held": audit["held"],
                    "audit_records_dropped": audit["dropped"],
                    "audit_held_since": audit["held_since"] or 0.0,
                    "audit_refusing": int(audit["refusing"]),
                }
            return figures

        while True:
            started = time.monotonic()
            try:
                self._figures = await self._catalog(gather)
            except Exception as exc:  # the figures go stale; reads and writes must not care
                log.warning("metrics figures not refreshed: %s", exc)
            spent = time.monotonic() - started
            errors = self.reader.stats.errors_by_kind + self.uploader.stats.errors_by_kind
            for kind, total in errors.items():
                new = total - self._reported_errors.get(kind, 0)
                if new > 0:
                    self.metrics.cloud_errors.labels(kind=kind).inc(new)
                    self._reported_errors[kind] = total
            await trio.sleep(max(_FIGURES_PERIOD, spent / _FIGURES_SHARE))

    def _writable(self, handle: int) -> StagedFile:
        open_file = self._handles.get(handle)
        if open_file is None or not open_file.writable or open_file.staged is None:
            raise FsError(errno.EBADF)
        return open_file.staged

    async def write(self, handle: int, offset: int, data: bytes) -> int:
        staged = self._writable(handle)
        async with staged.lock:
            end = offset + len(data)
            growth = max(0, end - staged.size)
            self.staging.reserve(growth)
            try:
                written: int = await self._disk(self.staging.write, staged.fd, data, offset)
            except BaseException:
                self.staging.release(growth)
                raise
            staged.size = max(staged.size, offset + written)
            self._changed(staged)
        return written

    @staticmethod
    def _changed(staged: StagedFile) -> None:
        staged.mtime_ns = time.time_ns()
        staged.writes += 1
        staged.ready = staged.in_cloud = False

    async def _truncate(self, staged: StagedFile, size: int) -> None:
        async with staged.lock:
            growth = size - staged.size
            self.staging.reserve(growth)
            await self._disk(self.staging.truncate, staged.fd, size)
            if growth < 0:
                self.staging.release(-growth)
            staged.size = size
            self._changed(staged)

    async def flush(self, handle: int) -> None:
        """close(2), which waits for this (release comes later, and never if the daemon stops
        first): the bytes are journaled as complete, and as durable as by fsync when the mount
        asks for it (``--sync-on-close``)."""
        open_file = self._handles.get(handle)
        if open_file is None or not open_file.writable:
            return
        if self.config.write.sync_on_close:
            await self.fsync(handle)
            return
        staged = open_file.staged
        if staged is not None and not staged.detached:
            await self._journal_complete(staged)

    async def fsync(self, handle: int) -> None:
        """Durable on local disk and journaled before returning; with ``--upload-mode=sync``
        also in the cloud."""
        open_file = self._handles.get(handle)
        if open_file is None:
            raise FsError(errno.EBADF)
        staged = open_file.staged
        if staged is None or staged.detached:
            return  # nothing staged, or bytes nobody will read again (unlinked)
        async with staged.lock:
            await self._record(staged, durable=True)
            if self.config.write.upload_mode == "sync":
                await self.uploader.upload_now(staged.ino)

    async def _journal_complete(self, staged: StagedFile) -> bool:
        """Journal the file as complete unless it already is; returns whether it did."""
        if staged.ready and not staged.writes:
            return False
        async with staged.lock:
            await self._record(staged)
        return True

    async def _record(self, staged: StagedFile, durable: bool = False) -> None:
        """Journal the staged file's size as complete (READY); with ``durable``, first make its
        bytes durable, in the same worker-thread call (the fsync path)."""
        writes = staged.writes

        def record() -> None:
            if durable:
                self.staging.durable(staged.fd)
            self.changes.record_write(staged.ino, staged.size, staged.mtime_ns, True, durable)

        # fsyncs take milliseconds: on threads of their own, so lookups never queue behind them.
        limiter = self._fsync_threads if durable else self._catalog_threads
        await trio.to_thread.run_sync(record, limiter=limiter)
        staged.writes -= writes
        staged.ready = staged.writes == 0
        self.uploader.written(staged.name)

    async def release(self, handle: int) -> None:
        open_file = self._handles.pop(handle, None)
        if open_file is None:
            return
        open_file.cancelled.is_set = True
        staged = open_file.staged
        if staged is None:
            return
        staged.handles -= 1
        staged.writers -= open_file.writable
        if open_file.writable and staged.writers == 0 and not staged.detached:
            # The last writer closed: the file is complete and may go up.
            if staged.in_cloud and not staged.writes:
                if await self._catalog(self.changes.unstage, staged.ino, staged.name):
                    self._retire(staged)
            elif not await self._journal_complete(staged):
                self.uploader.notify()  # it was waiting for this writer to go
        if staged.handles == 0:
            if staged.detached:
                self._retire(staged)  # closes and removes it
            else:
                del self._staged[staged.ino]
                self._unstaged += 1
                os.close(staged.fd)

    # -- what the uploader asks (StagingOwner) ---------------------------------------------

    def being_written(self, ino: int) -> bool:
        staged = self._staged.get(ino)
        return staged is not None and staged.writers > 0

    def uploaded(self, ino: int, staged_name: str, kept: bool) -> bool:
        staged = self._staged.get(ino)
        if staged is None or staged.name != staged_name:
            self._let_go(staged_name)
            return False
        if kept:
            staged.in_cloud = not staged.writes
        else:
            staged.detached = True
        return True

    def settled(self) -> None:
        if self.studies is not None:
            self.studies.wake()  # its header is read from the cache, without a GET

    async def diverted(self, before: Node, after: Node) -> None:
        await self.kernel.forget([], [(before.parent, before.name), (after.parent, after.name)])
        if before.key is not None:
            await self.refresh_key(before.key)

    # -- changing the tree -------------------------------------------------------------------

    def _refuse_if_read_only(self, *changed: tuple[int, str]) -> None:
        """Refuse a change on a read-only mount, inside the DICOM view, or of the view's own
        name at the root (which a real entry may not take)."""
        if self.config.mount.read_only:
            raise FsError(errno.EROFS, "this mount is read-only")
        for parent, name in changed:
            if is_view_inode(parent):
                raise FsError(errno.EROFS, "the DICOM view is read-only")
            if parent == ROOT and name == self.view_name and name:
                raise FsError(errno.EEXIST, f"{name} is the DICOM view")

    async def create(
        self, parent: int, name: str, mode: int, flags: int, uid: int, gid: int
    ) -> tuple[int, Attributes]:
        """Create and open a file (O_CREAT); an existing name is opened unless O_EXCL."""
        self._refuse_if_read_only((parent, name))
        await self._listed(parent, name, "create")

        def create_both() -> tuple[str, int, Node]:
            """One worker-thread call for both: a PACS creates thousands of files a minute."""
            staging_name, fd = self.staging.take()
            try:
                node = self.changes.create_file(parent, name, mode & 0o7777, uid, gid, staging_name)
            except BaseException:
                os.close(fd)
                self.staging.remove(staging_name)
                raise
            return staging_name, fd, node

        if self.staging.running_low and not self._making_ahead and self._nursery is not None:
            self._making_ahead = True
            self._nursery.start_soon(self._make_ahead)
        try:
            staging_name, fd, node = await self._catalog(create_both)
        except FsError as exc:
            if exc.errno != errno.EEXIST or flags & os.O_EXCL:
                raise
            existing = await self._catalog(self.catalog.lookup, parent, name)
            if existing is None:
                raise
            handle, _ = await self.open(existing.ino, flags)
            return handle, self.attributes(existing)
        staged = StagedFile(node.ino, staging_name, fd, 0, node.mtime_ns)
        self._staged[node.ino] = staged
        handle = self._new_handle(node.ino, None, staged, True)
        return handle, self.attributes(node)

    async def _make_ahead(self) -> None:
        """Prepare staging files for the next creates; on a full disk the creates make their
        own and report ENOSPC."""
        try:
            await self._disk(self.staging.make_ahead)
        except OSError as exc:
            log.warning("cannot prepare staging files ahead: %s", exc)
        finally:
            self._making_ahead = False

    async def mkdir(self, parent: int, name: str, mode: int, uid: int, gid: int) -> Attributes:
        self._refuse_if_read_only((parent, name))
        await self._listed(parent, name, "mkdir")
        node = await self._catalog(
            self.changes.make_directory, parent, name, mode & 0o7777, uid, gid
        )
        return self.attributes(node)

    async def unlink(self, parent: int, name: str) -> None:
        self._refuse_if_read_only((parent, name))
        await self._listed(parent, name, "unlink")
        node = await self._catalog(self.changes.unlink, parent, name)
        await self._drop_staged(node)
        self.uploader.notify()

    async def _drop_staged(self, node: Node) -> None:
        staged = self._staged.get(node.ino)
        if staged is not None:
            self._retire(staged)
        elif node.staged is not None and not self.uploader.is_uploading(node.staged):
            self._let_go(node.staged)
            await self._disk(self.staging.remove, node.staged)

    async def rmdir(self, parent: int, name: str) -> None:
        self._refuse_if_read_only((parent, name))
        await self._listed(parent, name, "rmdir")
        await self._catalog(self.changes.remove_directory, parent, name)
        self.uploader.notify()

    async def rename(
        self, parent: int, name: str, new_parent: int, new_name: str, flags: int
    ) -> None:
        self._refuse_if_read_only((parent, name), (new_parent, new_name))
        await self._listed(parent, name, "rename")
        await self._listed(new_parent, new_name, "rename")
        _, replaced = await self._catalog(
            self.changes.rename, parent, name, new_parent, new_name, flags
        )
        if replaced is not None:
            await self._drop_staged(replaced)
        self.uploader.notify()

    async def setattr(
        self,
        ino: int,
        handle: int | None,
        size: int | None = None,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        mtime_ns: int | None = None,
    ) -> Attributes:
        """truncate, chmod, chown, utime.  A truncate of a closed file stages it like an open
        for writing would, and it goes up as soon as it is done."""
        self._refuse_if_read_only()
        if is_view_inode(ino):
            raise FsError(errno.EROFS, "the DICOM view is read-only")
        if size is not None:
            staged = self._staged.get(ino)
            if handle is not None and handle in self._handles and staged is not None:
                await self._truncate(staged, size)
            else:
                opened = await self.open(ino, os.O_WRONLY | (os.O_TRUNC if size == 0 else 0))
                try:
                    staged = self._writable(opened[0])
                    await self._truncate(staged, size)
                finally:
                    await self.release(opened[0])
        if mode is not None or uid is not None or gid is not None or mtime_ns is not None:
            if mode is not None:
                mode &= 0o7777
            await self._catalog(self.changes.set_attributes, ino, mode, uid, gid, mtime_ns)
            staged = self._staged.get(ino)
            if staged is not None and mtime_ns is not None:
                staged.mtime_ns = mtime_ns
            self.uploader.notify()
        return await self.getattr(ino)

    # -- catalog refresh -------------------------------------------------------------------

    async def refresh_key(self, key: str) -> None:
        """Re-read one object's state from the store (after its ETag stopped matching)."""
        asked_ns = time.time_ns()
        try:
            try:
                info = await trio.to_thread.run_sync(
                    self.store.head, key, limiter=self._store_threads
                )
            except NotFound:
                info = None
            report = await self._catalog(self.catalog.refresh_object, info, key, asked_ns)
        except CloudfsError as exc:  # the store is down, or the catalog's disk is full
            log.warning("cannot refresh %s: %s", key, exc)
            return
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
        if self.studies is not None:
            self.studies.wake()
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
        if self.listing.running:
            raise Unavailable(
                f"the first listing is still running ({self.listing.objects} objects so far);"
                " the catalog is relisted from its end on"
            )
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
                "backlog": self.changes.backlog(),
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
                "prefetch_used_bytes": self.reader.ledger.used_bytes,
                "prefetch_wasted_bytes": self.reader.ledger.wasted_bytes,
                "prefetch_unread_bytes": self.reader.ledger.unread_bytes,
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
                "first_listing": {"objects": self.listing.objects, "at": self.listing.cursor}
                if self.listing.running
                else None,
                "last_refresh_error": self._last_sync_error,
                "rejected_examples": [
                    {"key": key, "reason": reason} for key, reason in facts["rejected_keys"]
                ],
            },
            "uploads": self._upload_status(facts["backlog"]),
            "open_files": len(self._handles),
            "dicom": None if self.studies is None else await self.studies.status(),
            "audit": None if self.audit_state is None else self.audit_state(),
        }

    def control_handlers(self) -> dict[str, Any]:
        """What ``cloudfs`` commands may ask this mount (see ``control``)."""

        def dicom() -> Studies:
            if self.studies is None:
                raise ValueError("DICOM indexing is off on this mount (--no-dicom-index)")
            return self.studies

        async def studies(arguments: dict[str, Any]) -> dict[str, Any]:
            selector, limit = arguments.get("selector", {}), int(arguments.get("limit", 1000))
            index = dicom().index
            rows = await self._catalog(index.studies, selector, limit)
            return {"studies": rows}

        async def progress(arguments: dict[str, Any]) -> dict[str, Any]:
            return dicom().prefetch_progress(int(arguments["id"]))

        return {
            "status": lambda arguments: self.status(),
            "refresh": lambda arguments: self.refresh(),
            "index": lambda arguments: dicom().status(),
            "studies": studies,
            "pins": lambda arguments: dicom().pins(),
            "pin": lambda arguments: dicom().pin(arguments["selector"]),
            "unpin": lambda arguments: dicom().unpin(arguments["selector"]),
            "prefetch": lambda arguments: dicom().prefetch(arguments["selector"]),
            "prefetch-progress": progress,
        }

    def _upload_status(self, backlog: Backlog) -> dict[str, Any]:
        stats = self.uploader.stats
        return {
            "pending_files": backlog.files,
            "pending_bytes": backlog.bytes,
            "pending_renames": backlog.copies,
            "pending_deletes": backlog.deletes,
            "oldest_pending_age": round(time.time() - backlog.oldest, 1)
            if backlog.oldest
            else None,
            "staging_bytes": self.staging.used,
            "staging_limit": self.staging.limit,
            "uploaded_files": stats.files,
            "uploaded_bytes": stats.bytes,
            "copies": stats.copies,
            "deletes": stats.deletes,
            "conflicts": stats.conflicts,
            "damaged_files": len(stats.damaged),
            "errors": stats.errors,
            "last_error": stats.last_error,
            "last_error_at": stats.last_error_at or None,
            "mode": self.config.write.upload_mode,
            "waiting_for_pause": self.uploader.waiting_for_pause,
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
