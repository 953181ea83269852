"""Write-back: carries the journal of local changes (see ``changes.py``) to the cloud.

Uploads, server-side copies and deletes run in the background, oldest first, a bounded number at
a time, and one at a time per key, so a delete and a new upload of the same name can never race.
While files keep arriving they wait for a pause (``upload_delay`` without a file completed, at
most ``upload_max_delay``), so a PACS storing a study is not slowed by the study's own uploads.
A failed step is retried with a growing delay (1 s doubling to 60 s) and the backlog simply waits
through an outage: nothing leaves the staging area until the store confirmed the object (the
store checks the ETag against the bytes sent).  After an upload, the bytes are copied into the
block cache, so a PACS reading back what it just wrote never waits for the cloud.
"""

from __future__ import annotations

import logging
import math
import stat
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from .cache import BlockCache, BlockId
from .catalog import Node
from .changes import Changes, Work
from .config import WriteOptions
from .errors import CloudfsError, Conflict, Unavailable
from .staging import StagingArea, Tampered
from .store import UPLOAD_TOKEN, ObjectInfo, ObjectStore, Source

log = logging.getLogger(__name__)

_BATCH = 200
_MAX_BACKOFF = 60.0
_COALESCE = 0.01
"""Seconds to wait after a wake-up before reading the journal, so a burst of closes costs one
read, not one each."""
_IDLE_POLL = 30.0
"""Seconds between journal scans when nothing wakes the uploader (a safety net only)."""


class StagingOwner(Protocol):
    """What the filesystem tells the uploader about files it has open."""

    def being_written(self, ino: int) -> bool:
        """A writer has the file open: uploading now could send a torn copy."""
        ...

    def uploaded(self, ino: int, staged: str, kept: bool) -> bool:
        """The staging file went up and the node is clean; True if the file is open here (its
        owner then removes it at the last close, or keeps using it if ``kept``)."""
        ...

    async def diverted(self, before: Node, after: Node) -> None:
        """A conflict renamed a local file next to the other writer's object."""
        ...

    def settled(self) -> None:
        """An upload is done and its bytes are in the block cache."""
        ...


@dataclass
class UploadStats:
    files: int = 0
    bytes: int = 0
    copies: int = 0
    deletes: int = 0
    conflicts: int = 0
    damaged: set[str] = field(default_factory=set)
    """Staging files that failed authentication (a chunk torn by a crash during a rewrite that
    was never fsync'd, or altered on disk): not retried until the file is written anew."""
    errors: int = 0
    last_error: str = ""
    last_error_at: float = 0.0
    errors_by_kind: Counter[str] = field(default_factory=Counter)
    """Failed operations by error class, for the metrics."""


@dataclass
class _Retry:
    attempts: int = 0
    due: float = 0.0


@dataclass
class _Waiter:
    """An fsync waiting for the cloud: only an upload that starts after it can satisfy it."""

    since: int
    done: trio.Event = field(default_factory=trio.Event)
    error: CloudfsError | None = None

    def settle(self, error: CloudfsError | None) -> None:
        self.error = error
        self.done.set()


class Uploader:
    def __init__(
        self,
        store: ObjectStore,
        changes: Changes,
        staging: StagingArea,
        cache: BlockCache,
        options: WriteOptions,
        owner: StagingOwner,
    ) -> None:
        self.store = store
        self.changes = changes
        self.staging = staging
        self.cache = cache
        self.options = options
        self.owner = owner
        self.stats = UploadStats()
        self._threads = trio.CapacityLimiter(options.upload_threads)
        self._catalog_threads = trio.CapacityLimiter(2)
        self._wake = trio.Event()
        self._busy_keys: set[str] = set()
        self._busy_items: set[tuple[str, object]] = set()
        self._finished: dict[tuple[str, object], int] = {}
        """Items that finished during a journal read: that read may still list them."""
        self._retries: dict[tuple[str, object], _Retry] = {}
        self._uploading: set[str] = set()
        self._urgent: dict[int, list[_Waiter]] = {}
        self._rounds = 0
        """Counts journal reads: an fsync waiting for the cloud is settled only by a read (and
        the upload it starts) that began after the fsync asked."""
        self._draining = False
        self._last_written = -math.inf
        """When a file was last journaled as complete (monotonic seconds)."""
        self._holding_since: float | None = None
        """When files began arriving without a pause; None after a pause."""

    # -- what the filesystem asks ------------------------------------------------------------

    def notify(self) -> None:
        """Something was queued: look at the journal now."""
        self._wake.set()

    def written(self, staged: str) -> None:
        """A staging file was journaled anew (closed or fsync'd): worth an upload again even if
        it failed authentication before."""
        self.stats.damaged.discard(staged)
        self._last_written = time.monotonic()
        self.notify()

    @property
    def waiting_for_pause(self) -> bool:
        """Uploads are held back because files are still arriving (see ``_held_for``)."""
        return time.monotonic() < self._hold_end()

    def is_uploading(self, staged: str) -> bool:
        """A writer must not change this staging file: it is being read for an upload."""
        return staged in self._uploading

    async def upload_now(self, ino: int) -> None:
        """Upload a file at once, even while open, and wait for the cloud to confirm it
        (``--upload-mode=sync``); raises the cloud's error if it did not."""
        waiter = _Waiter(self._rounds)
        self._urgent.setdefault(ino, []).append(waiter)
        self._retries.pop(("upload", ino), None)
        self.notify()
        await waiter.done.wait()
        if waiter.error is not None:
            raise waiter.error

    async def drain(self, timeout: float) -> None:
        """After the FUSE session ended: push what is pending for up to ``timeout`` seconds,
        without the usual delay after close, including files whose release the kernel never
        got to send; say what is left."""
        self._draining = True
        self._retries.clear()
        self.notify()
        with trio.move_on_after(timeout):
            while True:
                backlog = await self._catalog(self.changes.backlog)
                if not (backlog.files or backlog.copies or backlog.deletes or self._busy_items):
                    return
                await trio.sleep(0.2)
        backlog = await self._catalog(self.changes.backlog)
        log.warning(
            "unmounting with %d files (%d bytes), %d renames and %d deletes not yet in the cloud: "
            "they stay journaled and go up after the next mount",
            backlog.files,
            backlog.bytes,
            backlog.copies,
            backlog.deletes,
        )

    async def _catalog(self, function: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(function, *args, limiter=self._catalog_threads)

    # -- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                self._wake = trio.Event()
                held = self._held_for()
                if held > 0:
                    with trio.move_on_after(held):
                        await self._wake.wait()
                    continue
                self._rounds += 1
                current = self._rounds
                try:
                    work: Work = await self._catalog(self.changes.work, _BATCH, list(self._urgent))
                except Exception:
                    log.exception("cannot read the upload journal")
                    work = Work([], [], [])
                next_due = self._dispatch(work, nursery, current)
                delay = min(_IDLE_POLL, max(0.05, next_due - time.monotonic()))
                with trio.move_on_after(delay):
                    await self._wake.wait()
                    # A PACS closes files by the hundred a second: one journal read for a burst.
                    await trio.sleep(_COALESCE)

    def _held_for(self) -> float:
        """Seconds the journal is left alone because files are still arriving.

        A modality sends a study as a burst of files, and every upload during the burst takes
        CPU from the writes the PACS is waiting for (on two cores, writes ran three times slower).
        Uploads therefore wait until no file has been completed for ``upload_delay`` seconds;
        the study goes up in the pause after it.  Holding stops after ``upload_max_delay``
        seconds of files that never pause (until they do), once half the staging area is
        taken, for an fsync waiting for the cloud, and while draining."""
        now = time.monotonic()
        if now >= self._last_written + self.options.upload_delay:
            self._holding_since = None
        elif self._holding_since is None:
            self._holding_since = now
        return max(0.0, self._hold_end() - now)

    def _hold_end(self) -> float:
        """When the hold of ``_held_for`` ends if files keep arriving as they do (-inf: none)."""
        if (
            self._holding_since is None
            or self._draining
            or self._urgent
            or self.staging.used * 2 > self.staging.limit
        ):
            return -math.inf
        return min(
            self._last_written + self.options.upload_delay,
            self._holding_since + self.options.upload_max_delay,
        )

    def _dispatch(self, work: Work, nursery: trio.Nursery, current: int) -> float:
        """Start every item that may start now; returns when the next one waiting becomes due."""
        now = time.monotonic()
        next_due = math.inf
        wall = time.time()
        self._finished = {
            item: finished for item, finished in self._finished.items() if finished >= current
        }
        listed = {node.ino for node in work.uploads}
        for ino in [ino for ino in self._urgent if ino not in listed]:
            # Not pending in a journal read begun after the fsync asked: gone, or already up.
            self._settle(ino, current, None)
        for node in work.uploads:
            assert node.key is not None and node.staged is not None
            item: tuple[str, object] = ("upload", node.ino)
            urgent = node.ino in self._urgent
            if not (urgent or self._draining) and self.owner.being_written(node.ino):
                continue  # its last close wakes us; after unmount no writer is left
            if node.staged in self.stats.damaged:
                self._settle(node.ino, current, self._damage(node))
                continue
            due = self._due(item)
            if not (urgent or self._draining):
                quiet_until = node.local_at / 1e9 + self.options.upload_delay
                due = max(due, now + quiet_until - wall)
            if due > now:
                next_due = min(next_due, due)
            elif self._claim(item, current, node.key):
                self._uploading.add(node.staged)
                nursery.start_soon(self._upload, item, node, current)
        for node in work.copies:
            assert node.key is not None and node.fetch_key is not None
            item = ("copy", node.ino)
            due = self._due(item)
            if due > now:
                next_due = min(next_due, due)
            elif self._claim(item, current, node.key, node.fetch_key):
                nursery.start_soon(self._copy, item, node)
        for key, etag in work.deletes:
            item = ("delete", key)
            due = self._due(item)
            if due > now:
                next_due = min(next_due, due)
            elif self._claim(item, current, key):
                nursery.start_soon(self._delete, item, key, etag)
        return next_due

    def _due(self, item: tuple[str, object]) -> float:
        retry = self._retries.get(item)
        return retry.due if retry else 0.0

    def _claim(self, item: tuple[str, object], current: int, *keys: str) -> bool:
        if item in self._busy_items or any(key in self._busy_keys for key in keys):
            return False
        if self._finished.get(item, 0) >= current:
            return False  # this journal read began before it finished: stale
        self._busy_items.add(item)
        self._busy_keys.update(keys)
        return True

    async def _attempt(
        self, item: tuple[str, object], keys: tuple[str, ...], step: Callable[[], Awaitable[None]]
    ) -> CloudfsError | None:
        """Run one journal step; a failure schedules a retry and is returned."""
        error: CloudfsError | None = None
        try:
            await step()
            self._retries.pop(item, None)
        except CloudfsError as exc:
            error = exc
        except Exception as exc:
            log.exception("%s of %s failed unexpectedly", *item)
            error = Unavailable(f"internal error: {exc}")
        finally:
            self._busy_items.discard(item)
            self._busy_keys.difference_update(keys)
            self._finished[item] = self._rounds
            self.notify()
        if error is None:
            return None
        self.stats.errors += 1
        self.stats.errors_by_kind[type(error).__name__] += 1
        self.stats.last_error = str(error)
        self.stats.last_error_at = time.time()
        if isinstance(error, Tampered):
            log.error(
                "%s of %s failed: %s; not retried until the file is written again (read "
                "it, rewrite it or remove it through the mount; `cloudfs export-staged` reads "
                "the intact part)",
                *item,
                error,
            )
            return error
        retry = self._retries.setdefault(item, _Retry())
        retry.attempts += 1
        delay = min(_MAX_BACKOFF, 2.0 ** (retry.attempts - 1))
        retry.due = time.monotonic() + delay
        log.warning("%s of %s failed (retry in %.0fs): %s", item[0], item[1], delay, error)
        return error

    # -- the steps -----------------------------------------------------------------------------

    @staticmethod
    def _damage(node: Node) -> Tampered:
        return Tampered(f"{node.key}: its staged bytes failed authentication")

    def _settle(self, ino: int, current: int, error: CloudfsError | None) -> None:
        """Answer the fsyncs of ``ino`` that asked before journal read ``current`` began."""
        waiters = self._urgent.pop(ino, [])
        later = [waiter for waiter in waiters if waiter.since >= current]
        if later:
            self._urgent[ino] = later
        for waiter in waiters:
            if waiter.since < current:
                waiter.settle(error)

    async def _upload(self, item: tuple[str, object], node: Node, current: int) -> None:
        assert node.key is not None and node.staged is not None
        key, staged = node.key, node.staged

        async def step() -> None:
            def upload() -> ObjectInfo:
                """One worker-thread call: send the file, then put its bytes in the block
                cache (under the new ETag) before the catalog says the file is in the cloud,
                so whoever reads it next, the DICOM indexer included, finds them there."""
                # The journal's version of the file names the upload: a retry, even after a
                # restart, recognises an object an earlier attempt of it left.
                metadata = {**object_metadata(node), UPLOAD_TOKEN: f"{staged}-{node.local_at}"}
                with self.staging.source(staged) as source:
                    info = self.store.put_file(key, source, metadata, node.base_etag)
                    self._keep_in_cache(source, info)
                return info

            try:
                info = await trio.to_thread.run_sync(
                    upload,
                    limiter=self._threads,
                    # Unmount must not wait for a stalled upload; a retry after the next mount
                    # recognises its own bytes if this one lands after all.
                    abandon_on_cancel=True,
                )
            except Tampered:
                self.stats.damaged.add(staged)
                raise
            except Conflict:
                self.stats.conflicts += 1
                diverted = await self._catalog(self.changes.divert, node.ino)
                log.warning(
                    "%s was changed in the cloud by another writer since this host last saw "
                    "it: the local version is kept as %s",
                    node.key,
                    diverted.key,
                )
                await self.owner.diverted(node, diverted)
                self._retries.pop(item, None)
                return
            kept = self.owner.being_written(node.ino)
            clean, free = await self._catalog(self.changes.finish_upload, node, info, kept)
            self.stats.files += 1
            self.stats.bytes += info.size
            held = clean and self.owner.uploaded(node.ino, staged, kept)

            if free and not held:
                await trio.to_thread.run_sync(self.staging.remove, staged, limiter=self._threads)
            self.owner.settled()

        try:
            error = await self._attempt(item, (key,), step)
        finally:
            self._uploading.discard(staged)
        self._settle(node.ino, current, error)

    def _keep_in_cache(self, source: Source, info: ObjectInfo) -> None:
        """Copy what went up into the block cache (skipped for files that would crowd it)."""
        if info.size > self.cache.size_limit // 4:
            return
        block_size = self.cache.block_size
        try:
            for index in range((info.size + block_size - 1) // block_size or 1):
                offset = index * block_size
                data = source.read(offset, min(block_size, info.size - offset))
                if not self.cache.put(BlockId(info.key, info.etag, index), data):
                    return
        except (OSError, CloudfsError) as exc:  # the cloud serves it instead
            log.warning("%s: not copied into the block cache: %s", info.key, exc)

    async def _copy(self, item: tuple[str, object], node: Node) -> None:
        assert node.key is not None and node.fetch_key is not None and node.etag is not None
        source, target, etag = node.fetch_key, node.key, node.etag

        async def step() -> None:
            metadata = object_metadata(node)
            info = await trio.to_thread.run_sync(
                self.store.copy, source, target, etag, metadata, limiter=self._threads
            )
            await self._catalog(self.changes.finish_copy, node, info)
            self.stats.copies += 1

        await self._attempt(item, (target, source), step)

    async def _delete(self, item: tuple[str, object], key: str, etag: str | None) -> None:
        """Delete the version ``etag`` this host last saw.  If another writer has replaced it
        since, its object is kept and the delete is settled, not retried: sending it again
        could never succeed, and forcing it would destroy the other site's data."""

        async def step() -> None:
            if not await self._catalog(self.changes.claim_delete, key, etag):
                return
            try:
                await trio.to_thread.run_sync(self.store.delete, key, etag, limiter=self._threads)
            except Conflict:
                self.stats.conflicts += 1
                log.warning(
                    "%s was changed in the cloud by another writer since this host last saw "
                    "it: not deleted, the other writer's object is kept",
                    key,
                )
            else:
                self.stats.deletes += 1
            await self._catalog(self.changes.finish_delete, key, etag)

        await self._attempt(item, (key,), step)


def object_metadata(node: Node) -> dict[str, str]:
    """The file's attributes as S3 user metadata, as s3fs-fuse writes them (decimal st_mode,
    whole seconds), so either tool shows the same attributes."""
    metadata = {"mtime": str(node.mtime_ns // 1_000_000_000)}
    if node.mode is not None:
        metadata["mode"] = str(stat.S_IFREG | node.mode)
    if node.uid is not None:
        metadata["uid"] = str(node.uid)
    if node.gid is not None:
        metadata["gid"] = str(node.gid)
    return metadata
