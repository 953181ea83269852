"""The persistent block cache: fixed-size pieces of objects on local disk, under a hard size cap.

Keys carry the object's ETag, so a changed object gets new blocks and can never be served from old
ones.  A stored block is a header (magic, payload length, a digest of the block's identity), a
table of checks, one XXH3-64 for each piece of ``PIECE`` bytes of the payload, seeded with the
identity digest and the piece's number, then the payload itself.  A read of part of a block (a
random 64 KiB read in a 1 MiB block) reads and checks only the pieces it needs and their checks:
reading and checking the whole block cost a cold disk a MiB per such read.  The files of blocks
stored or read lately stay open with their checks in memory (``_BlockFiles``), so such a read is
then one ``pread`` of the pieces, and, when those are in the page cache, one the event loop may
make itself (``get_range_in_memory``).  A whole block is read with one ``pread`` and served from
that buffer without a copy.  A piece that fails its check drops the block, which is then reported as
missing, so the caller fetches it again instead of returning wrong bytes; a piece moved to
another place or another block fails too, because the seed differs.  XXH3 rather than CRC-32:
it checks a MiB in 20 us instead of 250 us.  Encrypted, each piece is sealed on its own
(AES-GCM, the identity and piece number as associated data).

Blocks of an earlier layout are not read: a cache directory written by an older version is
emptied when opened (``FORMAT`` names the layout), so an upgrade costs a refetch, never wrong
bytes.

The cap: diskcache culls the entries stored longest ago inside every insert once its volume reaches
its limit; the limit is set one block below the configured size, so the cache never exceeds the cap
even right after an insert.  There is no periodic sweep to fall behind.

Recency: diskcache's own LRU policy writes to SQLite on every read, which serialises parallel
readers on the database's write lock (measured: 42% of a cached sequential read spent waiting for
it).  Reads here are plain SELECTs instead; the names of blocks read are queued and
``record_recency`` moves their store time to now in batched transactions every few seconds, which
makes the store-time order an LRU order, a few seconds late.

Pinning: a tiering policy may pin blocks so that they outlive every unpinned block.  A pinned
block's store time is moved to ``_PINNED_EPOCH`` plus the time it was pinned, tens of thousands of
years ahead, so diskcache's cull, which takes the oldest store times first, reaches pinned blocks
only when no unpinned block is left, and then the oldest pin first.  The state lives in the rows
themselves, so pins survive a restart; the set of pinned object keys does not, the policy sets it
again at start.  ``record_recency`` leaves pinned rows alone and ``unpin`` moves a row's store time
back to now.  Two SQLite triggers, installed when the cache opens, keep pins across diskcache's own
writes: a block inserted with the pin tag (its key is in ``pin_keys``) is pinned in the insert's
own transaction, and re-storing a pinned block keeps its pin, where diskcache alone would reset its
store time.  Pinning after the insert from here instead would leave a window in which another
thread's cull or a crash silently unpins the block, and would cost a second write per block.
Pinned blocks still count towards the cap, which holds exactly as before: if pins fill the cache
(or leave fewer unpinned blocks than one cull takes), diskcache evicts pinned blocks too, oldest pin
first.  Callers therefore refuse pins bigger than a fraction of the cache.

Backups: blocks a backup program brings in are stored with the scan tag, whose insert trigger
moves their store time ``_SCAN_AGE`` into the past, so they are the first to go (oldest scan block
first) and a backup of the whole archive churns only the space it borrowed; blocks other readers
brought in stay, which plain LRU would lose to any scan larger than the cache.  Reads on a
backup's behalf do not record recency either; a block a backup stored that anyone else reads is
moved to now like any read block and is then kept as any other.

A full disk or any storage error on insert is logged and reported (the read still succeeds from the
fetched bytes); it never raises into the read path.  The pinning calls serve the tiering policy, not
reads, and let ``sqlite3.Error`` through: the policy retries on its next run.

Threads: every method but ``get_range_in_memory`` (which never waits for the disk) blocks, and all
are safe to call from many threads at once.  diskcache keeps one SQLite connection per thread, and
so does this class for its own updates; those run a bounded number of rows per transaction, so a
large pin neither holds the write lock for long nor grows the write-ahead log past its reserve.
Knows nothing of FUSE or of the store.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import resource
import sqlite3
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import diskcache
import xxhash

from .crypto import OVERHEAD, BlockCipher, Unsealable

log = logging.getLogger(__name__)

_MAGIC = b"CFB3"
_HEADER = struct.Struct("<4sI16s")  # magic, payload length, identity digest
_CHECK = struct.Struct("<Q")  # XXH3-64 of one stored piece, seeded by identity and piece number
PIECE = 64 * 1024
"""Payload bytes per checked piece: the smallest unit a read of part of a block reads from disk,
as large as the random reads a viewer or a database makes."""
FORMAT = "3"
"""The layout of stored blocks; a cache directory of another layout is emptied when opened."""
_FORMAT_FILE = "cloudfs-format"
_SEED_MASK = (1 << 64) - 1
_WAL_RESERVE = 8 * 1024 * 1024
_CULL_PER_INSERT = 16
"""Entries diskcache may evict per insert: more than a fetch chunk's worth of blocks is never
needed because every insert adds one block."""
_PINNED_EPOCH = 1e12
"""Store times at or above this mark pinned blocks: 1e12 s is some 30,000 years after 1970, so no
clock reaches it, and adding the pin time keeps pinned blocks in pin order among themselves."""
_PIN_TAG = 1
"""diskcache tag given to blocks inserted for a pinned key; the insert trigger pins them."""
_SCAN_TAG = 2
"""diskcache tag given to blocks a backup program brought in; the insert trigger ages them."""
_SCAN_AGE = 1e9
"""How far into the past a backup's blocks are stored: some 32 years, so that they sort before
every block stored or read by anyone else since, and stay in their own order among themselves."""
_WAL_PAGES_PER_ROW = 4
"""Pages one store-time update may add to the write-ahead log, which bounds the rows one transaction
updates within the log's reserve (measured on rows in random order: 3 pages for a lone row, its
table page, an index page and diskcache's size counter; under 2 a row from ten rows on)."""
_MAX_ROWS_PER_TRANSACTION = 1000
"""Rows per update transaction at most: keeps the write lock held for milliseconds even on a large
cache whose log reserve would allow more."""
_PAGE_SIZE = 4096
REMEMBERED_FILES = 8192
"""Block files remembered, and kept open once read, oldest dropped first: the last 8 GiB of
blocks stored or looked up, at the default block size, for some 5 MiB of memory and as many
descriptors (fewer where the open-file limit is low: see ``_held_files``)."""

_TRIGGERS = {
    "cloudfs_pin_on_insert": f"""
        AFTER INSERT ON Cache
        WHEN NEW.tag = {_PIN_TAG} AND NEW.store_time < {_PINNED_EPOCH}
        BEGIN
            UPDATE Cache SET store_time = NEW.store_time + {_PINNED_EPOCH} WHERE rowid = NEW.rowid;
        END""",
    "cloudfs_age_scan_on_insert": f"""
        AFTER INSERT ON Cache
        WHEN NEW.tag = {_SCAN_TAG} AND NEW.store_time < {_PINNED_EPOCH}
        BEGIN
            UPDATE Cache SET store_time = NEW.store_time - {_SCAN_AGE} WHERE rowid = NEW.rowid;
        END""",
    # Only diskcache's set() assigns filename: the updates made here never fire this one.
    "cloudfs_pin_on_restore": f"""
        AFTER UPDATE OF filename ON Cache
        WHEN NEW.store_time < {_PINNED_EPOCH}
            AND (OLD.store_time >= {_PINNED_EPOCH} OR NEW.tag = {_PIN_TAG})
        BEGIN
            UPDATE Cache SET store_time = CASE
                WHEN OLD.store_time >= {_PINNED_EPOCH} THEN OLD.store_time
                ELSE NEW.store_time + {_PINNED_EPOCH} END
            WHERE rowid = NEW.rowid;
        END""",
}


def _held_files() -> int:
    """Block files to remember and keep open: a quarter of this process's open-file limit (the
    daemon raises it to the hard limit first), at most ``REMEMBERED_FILES``."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return REMEMBERED_FILES
    return max(min(REMEMBERED_FILES, soft // 4), 16)


def _pread_in_memory(fd: int, size: int, offset: int) -> bytes | bytearray:
    """``os.pread`` of bytes all in the page cache, else BlockingIOError at once: a short read
    means part of them is not, or the file is short, which a read in a thread then finds."""
    data = bytearray(size)
    if os.preadv(fd, [data], offset, os.RWF_NOWAIT) != size:
        raise BlockingIOError(errno.EAGAIN, "not all in memory")
    return data


def stored_length(payload_length: int, sealed: bool) -> int:
    """Bytes a block of ``payload_length`` takes on disk: header, and each piece's check (and
    nonce and tag when sealed)."""
    pieces = -(-payload_length // PIECE)
    return _HEADER.size + payload_length + pieces * (_CHECK.size + (OVERHEAD if sealed else 0))


class BlockId(NamedTuple):
    """One block of one version of one object (a tuple: the read path makes and hashes these
    several times per request)."""

    key: str
    etag: str
    number: int

    def cache_key(self, block_size: int) -> str:
        return f"{self.etag}|{block_size}|{self.number}|{self.key}"


class _Chunks:
    """A read-only file object over header and payload, so a block is written without first
    being copied into one buffer."""

    def __init__(self, *parts: bytes | memoryview) -> None:
        self._parts = [memoryview(part) for part in parts]

    def read(self, size: int = -1) -> memoryview | bytes:
        while self._parts and not len(self._parts[0]):
            self._parts.pop(0)
        if not self._parts:
            return b""
        part = self._parts[0]
        size = len(part) if size < 0 else size
        self._parts[0] = part[size:]
        return part[:size]


class _BlockFile:
    """A stored block's file, opened on first read and kept open, with its checks once read."""

    __slots__ = ("name", "path", "fd", "users", "dropped", "length", "checks")

    def __init__(self, name: str, path: str) -> None:
        self.name = name
        self.path = path
        self.fd: int | None = None
        self.users = 0
        self.dropped = False
        self.length = 0
        """The payload's length, valid once ``checks`` is set."""
        self.checks: bytes | None = None
        """The table of checks, read from the file and found sound once."""


class _BlockFiles(diskcache.Disk):
    """diskcache's file storage, with block files spread over one level of at most 256
    directories that stay once made, and the files of recent blocks kept open.

    diskcache itself spreads files over 65,536 directories two levels deep and removes a
    directory with its last file: with one file per block, nearly every insert made a directory
    and every eviction removed one, twice the inodes allocated and freed per block.  Entries
    stored under the deeper layout are still found (the index holds each file's path).

    The blocks stored or looked up lately (``held``, oldest dropped first) are remembered with
    their files, so a read of them opens the file without asking SQLite first (a query that,
    once the page cache is dropped, costs a disk read of its own).  A file stored or read once
    stays open with its checks in memory: a read then costs one ``pread``, where opening the
    file again costs, on a cold page cache, a read of its directory and of its inode too, and
    reading the checks another (a random 64 KiB read from the cache: 0.5 ms, three disk reads,
    against one).  A block file is written once under a fresh random name and never rewritten,
    so a remembered file holds that block or nothing.  Every removal of a block file passes
    through ``remove``, which closes a kept descriptor (once its last reader is done with it),
    so an evicted block's space is given back at once and the cache's cap holds."""

    def __init__(self, directory: str, **settings: object) -> None:
        super().__init__(directory, **settings)
        self.held = _held_files()
        self._files: OrderedDict[str, _BlockFile] = OrderedDict()
        self._by_path: dict[str, _BlockFile] = {}
        self._lock = threading.Lock()

    def remember(self, name: str, path: str) -> None:
        with self._lock:
            known = self._files.get(name)
            if known is not None and known.path == path:
                self._files.move_to_end(name)
                return
            if known is not None:
                self._drop(known)
            self._files[name] = self._by_path[path] = _BlockFile(name, path)
            while len(self._files) > self.held:
                self._drop(next(iter(self._files.values())))

    def forget(self, name: str) -> None:
        with self._lock:
            known = self._files.get(name)
            if known is not None:
                self._drop(known)

    def acquire(self, name: str, open_file: bool = True) -> _BlockFile | None:
        """The remembered file of ``name``, open, until ``release``; None if not remembered or
        gone (then forgotten), or, unless ``open_file``, not open already."""
        with self._lock:
            entry = self._files.get(name)
            if entry is None or (entry.fd is None and not open_file):
                return None
            self._files.move_to_end(name)
            entry.users += 1
            if entry.fd is not None:
                return entry
        try:  # outside the lock: on a cold page cache, an open reads the disk
            fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.release(entry)
            self.forget(name)
            raise
        with self._lock:
            if entry.fd is None:
                entry.fd = fd
                fd = -1
        if fd >= 0:
            os.close(fd)  # another reader opened it meanwhile
        return entry

    def keep_open(self, name: str, length: int, checks: bytes) -> None:
        """Open the file just stored for ``name``, its ``checks`` known: the first read of the
        block is then one ``pread``, and a random read of its bytes, still in the page cache,
        is served on the event loop (``get_range_in_memory``)."""
        try:
            entry = self.acquire(name)
        except OSError:
            return  # evicted already
        if entry is not None:
            entry.length, entry.checks = length, checks
            self.release(entry)

    def release(self, entry: _BlockFile) -> None:
        with self._lock:
            entry.users -= 1
            self._close_if_done(entry)

    def _drop(self, entry: _BlockFile) -> None:
        """Forget ``entry``, its descriptor closed once no reader uses it; lock held."""
        if self._files.get(entry.name) is entry:
            del self._files[entry.name]
        if self._by_path.get(entry.path) is entry:
            del self._by_path[entry.path]
        entry.dropped = True
        self._close_if_done(entry)

    @staticmethod
    def _close_if_done(entry: _BlockFile) -> None:
        if entry.dropped and not entry.users and entry.fd is not None:
            os.close(entry.fd)
            entry.fd = None

    def path(self, filename: str) -> str:
        """The full path of a block file the index names."""
        return os.path.join(self._directory, filename)

    def filename(self, key: object = None, value: object = None) -> tuple[str, str]:
        name = os.urandom(16).hex()
        filename = os.path.join(name[:2], name[2:] + ".val")
        return filename, self.path(filename)

    def store(self, value: object, read: bool, key: object = diskcache.core.UNKNOWN) -> tuple:
        stored = super().store(value, read, key=key)
        if isinstance(key, str) and stored[2] is not None:
            self.remember(key, self.path(stored[2]))
        return stored

    def remove(self, file_path: str) -> None:
        path = self.path(file_path)
        with self._lock:
            known = self._by_path.get(path)
            if known is not None:
                self._drop(known)
        with contextlib.suppress(OSError):
            os.remove(path)

    def forget_all(self) -> None:
        with self._lock:
            for entry in list(self._files.values()):
                self._drop(entry)


class BlockCache:
    def __init__(
        self,
        directory: Path,
        size_limit: int,
        block_size: int,
        cipher: BlockCipher | None = None,
    ) -> None:
        self.block_size = block_size
        self.cipher = cipher
        """Seals every block (and names entries opaquely) when the cache is encrypted."""
        self.size_limit = size_limit
        # The cap covers everything under the directory: diskcache's own limit leaves room for
        # one block more, the SQLite write-ahead log (checkpointed at half its reserve) and the
        # directories the block files are spread over (a generous two 4 KiB pages per block).
        wal_reserve = min(_WAL_RESERVE, size_limit // 16)
        overhead = wal_reserve + (size_limit // block_size) * 2 * 4096
        self._store = diskcache.Cache(
            str(directory),
            size_limit=max(
                size_limit - stored_length(block_size, sealed=True) - overhead, block_size
            ),
            sqlite_wal_autocheckpoint=max(wal_reserve // 2 // 4096, 16),
            eviction_policy="least-recently-stored",
            cull_limit=_CULL_PER_INSERT,
            statistics=False,
            disk=_BlockFiles,
        )
        self._files: _BlockFiles = self._store.disk
        self._database = directory / diskcache.core.DBNAME
        self._checkpoint_pages = max(wal_reserve // 2 // _PAGE_SIZE, 16)
        self._rows_per_transaction = min(
            max(wal_reserve // 2 // (_WAL_PAGES_PER_ROW * _PAGE_SIZE), 1), _MAX_ROWS_PER_TRANSACTION
        )
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._pinned_keys: frozenset[str] = frozenset()
        self._install_triggers()
        self._recently_read: deque[str] = deque()
        self.corrupt_blocks = 0
        self.failed_inserts = 0
        self._last_failure_log = 0.0
        self._sealed_overhead = OVERHEAD if cipher is not None else 0
        self._nowait_reads = True
        """False once the file system refused an ``RWF_NOWAIT`` read: all reads take a thread."""
        self._require_format(directory / _FORMAT_FILE)

    def _require_format(self, marker: Path) -> None:
        """Empty a cache directory written in another block layout, then mark it as this one's."""
        try:
            found = marker.read_text().strip()
        except FileNotFoundError:
            found = None
        if found == FORMAT:
            return
        count = len(self._store)
        if count:
            log.warning(
                "block cache %s holds %d blocks in an older layout; emptying it",
                marker.parent,
                count,
            )
            self._store.clear()
        try:
            marker.write_text(FORMAT + "\n")
        except OSError as exc:  # a full disk must not stop the mount: emptied again next time
            log.warning("cannot mark the block cache's layout in %s: %s", marker, exc)

    def _db(self) -> sqlite3.Connection:
        """This thread's connection for the updates diskcache has no call for."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            # Shared with close() only, which runs once the worker threads are done.
            db = sqlite3.connect(
                self._database, timeout=30, isolation_level="IMMEDIATE", check_same_thread=False
            )
            # The durability and log size diskcache's own connections use: committing here must
            # not fsync where an insert would not, nor let the log outgrow its reserve.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA wal_autocheckpoint={self._checkpoint_pages}")
            with self._connections_lock:
                self._connections.append(db)
            self._local.db = db
        return db

    def _install_triggers(self) -> None:
        # Replaced on every open, so a cache directory always runs this version's definitions.
        with self._db() as db:
            # Explicit: the module only opens transactions by itself for DML, not for DDL.
            db.execute("BEGIN IMMEDIATE")
            for name, body in _TRIGGERS.items():
                db.execute(f"DROP TRIGGER IF EXISTS {name}")
                db.execute(f"CREATE TRIGGER {name} {body}")

    def _update(self, statement: str, rows: list[tuple[float, str]]) -> int:
        """Run ``statement`` once per row, a bounded chunk per transaction; rows changed."""
        db = self._db()
        changed = 0
        for start in range(0, len(rows), self._rows_per_transaction):
            with db:
                cursor = db.executemany(statement, rows[start : start + self._rows_per_transaction])
                changed += cursor.rowcount
        return changed

    def _names(self, blocks: Iterable[BlockId]) -> list[str]:
        return list(dict.fromkeys(self._name(block) for block in blocks))

    def _name(self, block: BlockId) -> str:
        identity = block.cache_key(self.block_size)
        return identity if self.cipher is None else self.cipher.name(identity)

    def _identity(self, block: BlockId) -> tuple[str, bytes]:
        identity = block.cache_key(self.block_size)
        digest = hashlib.blake2b(identity.encode("utf-8", "surrogatepass"), digest_size=16)
        return self._name(block), digest.digest()

    def get(self, block: BlockId, backup: bool = False) -> memoryview | None:
        """The verified payload of ``block``, or None if absent or found damaged (then deleted);
        ``backup``: read for a backup program, which does not make the block recent."""
        return self._read(block, None, backup)

    def get_range(
        self, block: BlockId, start: int, end: int, length: int, backup: bool = False
    ) -> memoryview | None:
        """Bytes ``[start, end)`` of ``block``, whose payload is ``length`` bytes, reading and
        checking only the pieces they lie in; None as for ``get``."""
        return self._read(block, (start, end, length), backup)

    def get_range_in_memory(
        self, block: BlockId, start: int, end: int, length: int, backup: bool = False
    ) -> memoryview | None:
        """As ``get_range``, but only if the block's file is open already and the bytes are in
        the page cache: read with ``RWF_NOWAIT``, this never waits for the disk, so the event
        loop may call it and spare a thread hop (half of a random read's time when the data is
        in memory).  None otherwise, damage included: the caller then calls ``get_range`` in a
        thread, which deals with it."""
        if not self._nowait_reads:
            return None
        name, digest = self._identity(block)
        entry = self._files.acquire(name, open_file=False)
        if entry is None:
            return None
        try:
            data = self._read_span(entry, digest, start, end, length, nowait=True)
        except BlockingIOError:
            return None  # not all in the page cache
        except OSError as exc:
            if exc.errno == errno.EOPNOTSUPP:
                self._nowait_reads = False  # this file system cannot: always read in a thread
            return None
        finally:
            self._files.release(entry)
        if data is not None and not backup:
            self._recently_read.append(name)
        return data

    def _read(
        self, block: BlockId, span: tuple[int, int, int] | None, backup: bool
    ) -> memoryview | None:
        name, digest = self._identity(block)
        try:
            entry = self._open(name)
            if entry is None:
                return None
            try:
                if span is None:
                    data = self._read_whole(entry, digest)
                else:
                    data = self._read_span(entry, digest, *span)
            finally:
                self._files.release(entry)
        except (OSError, sqlite3.Error) as exc:
            log.warning("block cache read failed for %s: %s", block.key, exc)
            return None
        if data is None:
            self.corrupt_blocks += 1
            log.warning(
                "corrupt block %d of %s dropped; fetching it again", block.number, block.key
            )
            self._files.forget(name)
            self._store.delete(name)
            return None
        if not backup:
            self._recently_read.append(name)
        return data

    def _open(self, name: str) -> _BlockFile | None:
        """The open block file of ``name``, from the remembered files or else from the index;
        the caller releases it."""
        try:
            entry = self._files.acquire(name)
        except FileNotFoundError:
            entry = None  # evicted: the index says whether it was stored again
        if entry is not None:
            return entry
        if self._indexed_path(name) is None:
            return None
        try:
            return self._files.acquire(name)
        except FileNotFoundError:  # evicted between the query and the open
            return None

    def _indexed_path(self, name: str) -> str | None:
        """The block file the index holds for ``name``, remembered from now on; None if the
        index has none."""
        row = (
            self._db()
            .execute("SELECT filename FROM Cache WHERE key=? AND raw=1", (name,))
            .fetchone()
        )
        if row is None or row[0] is None:
            return None
        path = self._files.path(row[0])
        self._files.remember(name, path)
        return path

    def _body_length(self, payload_length: int) -> int:
        """Bytes one stored piece of ``payload_length`` takes after the checks table."""
        return payload_length + self._sealed_overhead

    def _read_whole(self, entry: _BlockFile, digest: bytes) -> memoryview | None:
        """The payload of the block file ``entry``, every piece checked; None if damaged."""
        assert entry.fd is not None
        sealed = self.cipher is not None
        if entry.checks is not None:
            data = memoryview(os.pread(entry.fd, stored_length(entry.length, sealed), 0))
            if len(data) != stored_length(entry.length, sealed):
                return None
            length, checks = entry.length, entry.checks
        else:
            data = memoryview(os.pread(entry.fd, os.fstat(entry.fd).st_size, 0))
            if len(data) < _HEADER.size:
                return None
            magic, length, identity = _HEADER.unpack_from(data)
            if magic != _MAGIC or identity != digest or len(data) != stored_length(length, sealed):
                return None
            checks = bytes(data[_HEADER.size : _HEADER.size + -(-length // PIECE) * _CHECK.size])
        body = data[_HEADER.size + len(checks) :]
        opened = self._check_pieces(digest, checks, 0, len(checks) // _CHECK.size, body, length)
        if opened is None:
            return None
        entry.length, entry.checks = length, checks
        if self.cipher is None:
            return body  # the plain payload, contiguous: no copy
        return memoryview(b"".join(opened))

    def _read_span(
        self,
        entry: _BlockFile,
        digest: bytes,
        start: int,
        end: int,
        length: int,
        nowait: bool = False,
    ) -> memoryview | None:
        """Bytes ``[start, end)`` of the block file ``entry``, their pieces checked; None if
        damaged.  ``nowait``: raise BlockingIOError rather than wait for the disk."""
        assert entry.fd is not None
        pread = _pread_in_memory if nowait else os.pread
        pieces = -(-length // PIECE)
        checks = entry.checks
        if checks is None:
            head = pread(entry.fd, _HEADER.size + pieces * _CHECK.size, 0)
            if len(head) != _HEADER.size + pieces * _CHECK.size:
                return None
            if _HEADER.unpack_from(head) != (_MAGIC, length, digest):
                return None
            checks = bytes(head[_HEADER.size :])
        elif entry.length != length:
            return None
        first, last = start // PIECE, (end - 1) // PIECE
        bodies_at = _HEADER.size + pieces * _CHECK.size
        wanted = sum(
            self._body_length(min(PIECE, length - i * PIECE)) for i in range(first, last + 1)
        )
        body = memoryview(pread(entry.fd, wanted, bodies_at + first * self._body_length(PIECE)))
        if len(body) != wanted:
            return None
        opened = self._check_pieces(digest, checks, first, last - first + 1, body, length)
        if opened is None:
            return None
        entry.length, entry.checks = length, checks
        offset = start - first * PIECE
        joined = opened[0] if len(opened) == 1 else b"".join(opened)
        return memoryview(joined)[offset : offset + end - start]

    def _check_pieces(
        self,
        digest: bytes,
        table: bytes,
        first: int,
        count: int,
        bodies: memoryview,
        length: int,
    ) -> list[bytes | memoryview] | None:
        """The payloads of the ``count`` stored pieces from ``first`` laid end to end in
        ``bodies``, ``table`` holding every piece's check: each check verified (each piece
        opened when sealed); None if any fails."""
        checks = struct.unpack_from(f"<{count}Q", table, first * _CHECK.size)
        seed = int.from_bytes(digest[:8], "little")
        opened: list[bytes | memoryview] = []
        at = 0
        for index, expected in enumerate(checks, first):
            stop = at + self._body_length(min(PIECE, length - index * PIECE))
            body = bodies[at:stop]
            at = stop
            if xxhash.xxh3_64_intdigest(body, seed=(seed + index) & _SEED_MASK) != expected:
                return None
            if self.cipher is None:
                opened.append(body)
                continue
            try:
                opened.append(self.cipher.open(body, digest + index.to_bytes(4, "little")))
            except Unsealable:
                return None  # tampered with, or sealed under another key: fetched again
        return opened

    def record_recency(self) -> None:
        """Mark the blocks read since the last call as just used (see the module docstring)."""
        names: set[str] = set()
        while self._recently_read:
            names.add(self._recently_read.popleft())
        if not names:
            return
        now = time.time()
        try:
            self._update(
                f"UPDATE Cache SET store_time=? WHERE key=? AND raw=1"
                f" AND store_time < {_PINNED_EPOCH}",
                [(now, name) for name in names],
            )
        except sqlite3.Error as exc:
            log.warning("cannot record block recency: %s", exc)

    def pin_keys(self, keys: set[str]) -> None:
        """Object keys whose blocks are pinned: blocks stored from now on for these keys are pinned
        at insert; this replaces the previous set (it is the whole policy's current answer)."""
        # Rebinding is atomic: put() sees the old set or the new one, never a half-built one.
        self._pinned_keys = frozenset(keys)

    def pin(self, blocks: Iterable[BlockId]) -> int:
        """Pin blocks already in the cache; returns how many were found (absent ones are
        ignored)."""
        # Pinned blocks keep their pin time, so that the oldest pin stays the first to go.
        pinned_at = _PINNED_EPOCH + time.time()
        return self._update(
            f"UPDATE Cache SET store_time = CASE WHEN store_time < {_PINNED_EPOCH} THEN ?"
            f" ELSE store_time END WHERE key=? AND raw=1",
            [(pinned_at, name) for name in self._names(blocks)],
        )

    def unpin(self, blocks: Iterable[BlockId]) -> int:
        """Make blocks evictable again (as if just stored); returns how many were found."""
        now = time.time()
        return self._update(
            "UPDATE Cache SET store_time=? WHERE key=? AND raw=1",
            [(now, name) for name in self._names(blocks)],
        )

    def pinned_volume(self) -> int:
        """Bytes held by pinned blocks (payload sizes as diskcache records them)."""
        (total,) = (
            self._db()
            .execute(f"SELECT total(size) FROM Cache WHERE store_time >= {_PINNED_EPOCH}")
            .fetchone()
        )
        return int(total)

    def is_pinned(self, block: BlockId) -> bool:
        row = (
            self._db()
            .execute(
                "SELECT store_time FROM Cache WHERE key=? AND raw=1",
                (self._name(block),),
            )
            .fetchone()
        )
        return row is not None and row[0] >= _PINNED_EPOCH

    def contains(self, block: BlockId) -> bool:
        """Whether ``block`` is stored; its file is remembered, so the read that usually
        follows opens it without asking the index again."""
        return self._indexed_path(self._name(block)) is not None

    def put(self, block: BlockId, payload: bytes | memoryview, backup: bool = False) -> bool:
        """Store a block; False (logged, rate-limited) if the disk refused it.  ``backup``: a
        backup program brought it in, so it goes before blocks anyone else brought in."""
        name, digest = self._identity(block)
        view = memoryview(payload)
        seed = int.from_bytes(digest[:8], "little")
        bodies: list[bytes | memoryview] = []
        checks = []
        for index, offset in enumerate(range(0, len(view), PIECE)):
            body: bytes | memoryview = view[offset : offset + PIECE]
            if self.cipher is not None:
                body = self.cipher.seal(body, digest + index.to_bytes(4, "little"))
            checks.append(xxhash.xxh3_64_intdigest(body, seed=(seed + index) & _SEED_MASK))
            bodies.append(body)
        head = _HEADER.pack(_MAGIC, len(view), digest) + struct.pack(f"<{len(checks)}Q", *checks)
        # Plain, the payload is written as it is: one buffer, never copied.
        parts = [head, view] if self.cipher is None else [head, *bodies]
        try:
            # A file object with read=True: given bytes, diskcache writes them line by line
            # (thousands of write calls per block, measured at 46% of the daemon's CPU).
            # The tag makes the insert pin or age the block (see the module docstring).
            tag = _PIN_TAG if block.key in self._pinned_keys else _SCAN_TAG if backup else None
            self._store.set(name, _Chunks(*parts), read=True, tag=tag)
        except (OSError, sqlite3.Error) as exc:
            self.failed_inserts += 1
            now = time.monotonic()
            if now - self._last_failure_log > 60:
                self._last_failure_log = now
                log.error("block cache insert failed (%s); serving without caching", exc)
            return False
        self._files.keep_open(name, len(view), head[_HEADER.size :])
        return True

    def volume(self) -> int:
        """Bytes the cache occupies on disk (blocks and its index)."""
        return int(self._store.volume())

    def block_count(self) -> int:
        return len(self._store)

    def close(self) -> None:
        self._files.forget_all()
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for db in connections:
            db.close()
        self._local = threading.local()
        self._store.close()
