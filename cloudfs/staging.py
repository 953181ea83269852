"""The staging area: written files wait here, on the cache disk, until the cloud has them.

Staged bytes are never evicted (they may be the only copy).  Their total is bounded by
``staging_limit``: past it a write fails with ENOSPC, loudly, rather than dropping anything.
Files are named by the catalog (``Node.staged``); anything here that no node names is left over
from a crash and removed at start, and files whose writer never made them durable are moved to
``unsynced/`` for an operator to inspect instead of being uploaded as if complete.

Every method blocks except ``reserve``/``release``; the byte count is guarded by a lock because
worker threads remove files while the trio thread reserves space.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
import time
from pathlib import Path

from .errors import CloudfsError

log = logging.getLogger(__name__)

_AHEAD = 64
"""Empty staging files made at once, with one directory sync for all of them."""


class NoSpace(CloudfsError):
    errno = errno.ENOSPC


class StagingArea:
    def __init__(self, directory: Path, limit: int) -> None:
        self.directory = directory
        self.limit = limit
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._ready_lock = threading.Lock()
        self._ready: list[str] = []
        self._used = 0
        self._names = itertools.count()
        self._prefix = f"{time.time_ns():x}"
        self._warned = False

    @property
    def used(self) -> int:
        return self._used

    def path(self, name: str) -> Path:
        return self.directory / name

    def take(self) -> tuple[str, int]:
        """A new, empty staging file, open for reading and writing, whose directory entry is
        already durable: files are made ahead in batches with one directory sync per batch
        (``make_ahead``), so an fsync costs a sync of the file alone."""
        with self._ready_lock:
            name = self._ready.pop() if self._ready else None
        if name is None:
            made = self._make(_AHEAD)
            name = made.pop()
            self._add_ready(made)
        return name, self.open(name)

    @property
    def running_low(self) -> bool:
        return len(self._ready) < _AHEAD // 2

    def make_ahead(self) -> None:
        """Top the batch of ready files up, off the path of a create (no lock is held while the
        files are made, so creates go on meanwhile)."""
        if self.running_low:
            self._add_ready(self._make(_AHEAD - len(self._ready)))

    def _add_ready(self, names: list[str]) -> None:
        with self._ready_lock:
            self._ready[:0] = names

    def _make(self, count: int) -> list[str]:
        made = []
        for _ in range(count):
            name = f"{self._prefix}-{next(self._names)}"
            os.close(os.open(self.path(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            made.append(name)
        self._sync_directory()
        return made

    def scan(self, referenced: set[str], unsynced: set[str]) -> None:
        """At start: count what is staged, set aside ``unsynced`` files, remove leftovers."""
        aside = self.directory / "unsynced"
        for entry in os.scandir(self.directory):
            if not entry.is_file(follow_symlinks=False):
                continue
            if entry.name in unsynced:
                aside.mkdir(exist_ok=True)
                os.replace(entry.path, aside / entry.name)
                log.warning(
                    "staged file %s was being written when cloudfs stopped and was never "
                    "fsync'd or closed: not uploaded, kept in %s",
                    entry.name,
                    aside,
                )
            elif entry.name in referenced:
                self._used += entry.stat(follow_symlinks=False).st_size
            else:
                os.unlink(entry.path)

    def reserve(self, amount: int) -> None:
        """Account for ``amount`` more staged bytes, or fail with ENOSPC."""
        if amount <= 0:
            return
        with self._lock:
            if self._used + amount > self.limit:
                if not self._warned:
                    self._warned = True
                    log.error(
                        "staging area full (%d of %d bytes not yet in the cloud): writes fail "
                        "with ENOSPC until uploads drain",
                        self._used,
                        self.limit,
                    )
                raise NoSpace("staging area full: data not yet uploaded fills it")
            self._used += amount
            self._warned = False

    def release(self, amount: int) -> None:
        with self._lock:
            self._used = max(0, self._used - amount)

    def open(self, name: str) -> int:
        return os.open(self.path(name), os.O_RDWR | os.O_CLOEXEC)

    def copy(self, source_fd: int, size: int) -> tuple[str, int]:
        """A new staging file holding the first ``size`` bytes of ``source_fd``."""
        self.reserve(size)
        name, fd = self.take()
        offset = 0
        try:
            while offset < size:
                sent = os.copy_file_range(source_fd, fd, size - offset, offset, offset)
                if sent == 0:
                    break
                offset += sent
        except BaseException:
            os.close(fd)
            self.remove(name)  # gives back the bytes copied so far
            self.release(size - offset)
            raise
        return name, fd

    def durable(self, fd: int) -> None:
        """The promise fsync() makes: the file's bytes and size on disk (its directory entry
        was made durable by ``take``)."""
        os.fdatasync(fd)

    def _sync_directory(self) -> None:
        directory = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def remove(self, name: str) -> None:
        path = self.path(name)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return
        self.release(size)
