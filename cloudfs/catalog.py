"""The namespace index: every object of the store as a node in a persistent SQLite tree.

``ls`` and ``stat`` are answered from here, never by a request per file, and a remount starts from
the catalog left by the last run.  A sync walks the store's listing and the catalog side by side,
both in UTF-8 key order, and writes only what differs, so relisting a million unchanged objects
writes nothing.

Inode numbers are row ids of an AUTOINCREMENT table: stable across remounts and never reused, so
the kernel can never confuse a deleted file with a new one.

Keys that cannot be paths are kept out of the tree and recorded in ``rejected`` with the reason:

* empty segments (``a//b``, a leading ``/``), ``.`` or ``..`` segments, NUL, names over 255
  bytes;
* a key that is also a prefix (``a`` and ``a/b``): the directory is shown, the file is not.

Encryption at rest: object keys, the write-back journal and the DICOM index all carry PHI, so
given the operator's cache key, SQLCipher encrypts every page of the file and of its write-ahead
log, under a key derived for the catalog alone.  A plaintext catalog found when a key is first
configured is converted in place, journal included; going back to plaintext is refused.  Without
a key the standard ``sqlite3`` module opens the file exactly as before.  The cost, measured with
100,000 entries in one directory: listing it takes 350 ms instead of 240 ms, a lookup 18 us
instead of 8 us.  SQLCipher's default page cache (8,000 KiB per connection) is kept: it holds
the pages of a 20,000-entry directory decrypted, and a 64 MiB one, which lists 100,000 entries in
280 ms when warm, would be paid once per worker thread.  SQLCipher's connections are typed as
``sqlite3.Connection`` (its binding is a copy of the standard module), but its exceptions are its
own classes: code catching SQLite errors from the catalog must catch ``sqlcipher3.dbapi2.Error``
as well.

Threads: every method blocks; each thread gets its own connection (WAL lets readers run during a
sync).  Only one sync runs at a time; the caller guarantees it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from sqlcipher3 import dbapi2 as sqlcipher

from .crypto import KEY_ENVIRONMENT, derive_key
from .errors import ConfigError, DiskFull
from .store import ObjectInfo

log = logging.getLogger(__name__)

ROOT = 1
NAME_MAX = 255
NOT_MOUNTED_MARKER = "NO_MOUNT"
"""dcm4chee-arc refuses a storage whose root shows this name: it must never appear on a mount."""
_BATCH = 1000
_LISTING_CHECKPOINT = "listing_checkpoint"
"""Meta entry: the last key cataloged by a first listing that has not finished yet."""
_MAX_STALE = 100_000
_PLAINTEXT_HEADER = b"SQLite format 3\0"
"""How every plaintext SQLite file starts; an encrypted one starts with its random salt."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    ino INTEGER PRIMARY KEY AUTOINCREMENT,
    parent INTEGER NOT NULL,
    name TEXT NOT NULL,
    is_dir INTEGER NOT NULL,
    key TEXT UNIQUE,
    size INTEGER NOT NULL DEFAULT 0,
    mtime_ns INTEGER NOT NULL DEFAULT 0,
    etag TEXT,
    storage_class TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS nodes_by_name ON nodes(parent, name);
CREATE INDEX IF NOT EXISTS nodes_by_parent ON nodes(parent, ino);
CREATE TABLE IF NOT EXISTS rejected (key TEXT PRIMARY KEY, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS deletes (
    key TEXT PRIMARY KEY,
    etag TEXT,
    queued_at REAL NOT NULL,
    done_at REAL
);
"""

_LOCAL_COLUMNS = {
    "mode": "INTEGER",
    "uid": "INTEGER",
    "gid": "INTEGER",
    "staged": "TEXT",
    "dirty": "INTEGER NOT NULL DEFAULT 0",
    "fetch_key": "TEXT",
    "base_etag": "TEXT",
    "local_at": "INTEGER NOT NULL DEFAULT 0",
}
"""Columns of local changes, added to catalogs created before the write path existed."""

_NODE_COLUMNS = (
    "ino, parent, name, is_dir, key, size, mtime_ns, etag, storage_class, "
    "mode, uid, gid, staged, dirty, fetch_key, base_etag, local_at"
)

_JOURNAL_INDEXES = """
CREATE INDEX IF NOT EXISTS nodes_dirty ON nodes(dirty, local_at);
CREATE INDEX IF NOT EXISTS nodes_moved ON nodes(fetch_key, local_at) WHERE fetch_key IS NOT NULL;
"""

CLEAN, WRITING, READY = 0, 1, 2
"""``Node.dirty``: the cloud has the bytes; being written, not yet durable (dropped by recovery
after a crash); durable and waiting for its upload."""


class Node(NamedTuple):
    """One file or directory.  A tuple, not a dataclass: listings build them by the hundred
    thousand, and a frozen dataclass costs several times more to create."""

    ino: int
    parent: int
    name: str
    is_dir: bool
    key: str | None
    size: int
    mtime_ns: int
    etag: str | None
    """The version of the cloud object holding this file's bytes (at ``fetch_key or key``)."""
    storage_class: str | None
    mode: int | None = None
    """Permission bits set through the mount; None: the default for the node's kind."""
    uid: int | None = None
    gid: int | None = None
    staged: str | None = None
    """Name of the staging file holding the authoritative bytes, while the cloud lags behind."""
    dirty: int = CLEAN
    fetch_key: str | None = None
    """The key the cloud bytes are still under after a rename, until the server-side copy to
    ``key`` is done (equal to ``key``: only the object metadata must be rewritten)."""
    base_etag: str | None = None
    """The version at ``key`` an upload may replace; None: the key must not exist (a conflict
    with another writer is detected instead of overwriting its object)."""
    local_at: int = 0
    """When the node last changed through the mount (ns); a relist that started earlier leaves
    it alone."""

    @property
    def cloud_key(self) -> str | None:
        return self.fetch_key or self.key


@dataclass
class SyncReport:
    added: int = 0
    changed: int = 0
    removed: int = 0
    rejected: int = 0
    seconds: float = 0.0
    stale_inodes: list[int] = field(default_factory=list)
    """Inodes whose attributes or bytes changed: the kernel's cached copies must go."""
    stale_names: list[tuple[int, str]] = field(default_factory=list)
    """(parent, name) entries added or removed: the kernel's cached lookups must go."""
    listed_up_to: str = ""
    """The last key of the batches applied so far."""

    def stale(self, ino: int | None = None, name: tuple[int, str] | None = None) -> None:
        # Beyond a bound, the kernel's attribute timeouts do the job instead.
        if ino is not None and len(self.stale_inodes) < _MAX_STALE:
            self.stale_inodes.append(ino)
        if name is not None and len(self.stale_names) < _MAX_STALE:
            self.stale_names.append(name)

    def summary(self) -> dict[str, float]:
        return {
            "added": self.added,
            "changed": self.changed,
            "removed": self.removed,
            "rejected": self.rejected,
            "seconds": self.seconds,
        }


class Listed(NamedTuple):
    """A directory entry with only what ``stat`` shows: a listing of 100,000 entries reads
    neither keys nor ETags, and builds nothing it does not send."""

    name: str
    ino: int
    is_dir: bool
    mode: int | None
    size: int
    mtime_ns: int
    uid: int | None
    gid: int | None


def _node(row: tuple) -> Node:
    return Node(row[0], row[1], row[2], bool(row[3]), *row[4:])


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot be a path under the mount, or None if it can."""
    if "\0" in key:
        return "contains NUL"
    parts = key[:-1].split("/") if key.endswith("/") else key.split("/")
    for part in parts:
        if part == "":
            return "has an empty path segment (leading '/' or '//')"
        if part in (".", ".."):
            return f"has a '{part}' path segment"
        if len(part.encode("utf-8")) > NAME_MAX:
            return f"has a name longer than {NAME_MAX} bytes"
    if parts == [NOT_MOUNTED_MARKER]:
        return f"is named {NOT_MOUNTED_MARKER}, which PACS read as 'storage not mounted'"
    return None


def _disk_full(error: BaseException) -> bool:
    """Whether SQLite (or SQLCipher, whose errors are of its own classes) refused a write for
    want of disk space."""
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF == sqlite3.SQLITE_FULL
    return isinstance(error, Exception) and "disk is full" in str(error)


@contextlib.contextmanager
def _writing(db: sqlite3.Connection, what: object) -> Iterator[None]:
    """One write transaction on ``db``, rolled back if anything in it fails, its commit
    included: a commit refused for a full disk leaves the transaction open, and every later
    BEGIN on this connection would then fail.  A full disk raises DiskFull (ENOSPC for a
    writer) instead of SQLite's error."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException as exc:
        if db.in_transaction:
            db.execute("ROLLBACK")
        if _disk_full(exc):
            raise DiskFull(f"{what}: not written, the disk is full") from exc
        raise


class Catalog:
    def __init__(self, path: Path, key: bytes | None = None) -> None:
        """Open (or create) the catalog at ``path``; ``key``, the operator's cache key, makes
        it encrypted, converting a plaintext one in place."""
        self.path = path
        self._key: str | None = None
        """SQLCipher's form of a raw key: used as is, without a passphrase derivation."""
        if key is not None:
            self._key = f"x'{derive_key(key, 'cloudfs catalog').hex()}'"
        self._local = threading.local()
        self.write_lock = threading.Lock()
        """Writers of this process queue here rather than in SQLite's busy handler, which
        sleeps milliseconds between retries: a PACS's creates and the uploader's commits would
        otherwise wait on each other's sleeps."""
        self.version = 0
        """Counts the write transactions that may have changed a node, each once it has ended:
        what was read from ``nodes`` while this number held is still what the table says."""
        self._reported: set[str] = set()
        plaintext = self._plaintext()
        if plaintext is False and self._key is None:
            raise ConfigError(
                f"{path}: the catalog is encrypted: give its cache key (--cache-key-file or "
                f"${KEY_ENVIRONMENT}); a cache directory cannot go back to plaintext"
            )
        if plaintext and self._key is not None:
            self._encrypt_in_place()
        with self.connection() as db:
            db.executescript(_SCHEMA)
            present = {row[1] for row in db.execute("PRAGMA table_info(nodes)")}
            for column, kind in _LOCAL_COLUMNS.items():
                if column not in present:
                    db.execute(f"ALTER TABLE nodes ADD COLUMN {column} {kind}")
            # The journal's queries must not scan a million-node table on every close.
            db.executescript(_JOURNAL_INDEXES)
            db.execute(
                "INSERT OR IGNORE INTO nodes(ino, parent, name, is_dir, mtime_ns) "
                "VALUES (?, 0, '', 1, ?)",
                (ROOT, time.time_ns()),
            )

    def _plaintext(self) -> bool | None:
        """Whether the file is plain SQLite; None when there is none yet (or it is empty)."""
        try:
            with open(self.path, "rb") as file:
                header = file.read(len(_PLAINTEXT_HEADER))
        except FileNotFoundError:
            return None
        return header == _PLAINTEXT_HEADER if header else None

    def _connect(self) -> sqlite3.Connection:
        """A new autocommit connection to the file, keyed first when the catalog is encrypted."""
        if self._key is None:
            return sqlite3.connect(self.path, isolation_level=None)
        # SQLCipher's class, with the interface of the standard one.
        db: sqlite3.Connection = sqlcipher.connect(self.path, isolation_level=None)
        db.execute(f'PRAGMA key = "{self._key}"')
        # Its default, WARN to stderr, would print lines of its own around the error below.
        db.execute("PRAGMA cipher_log_level = NONE")
        try:
            # A wrong key shows on the first read of the file, as "file is not a database".
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlcipher.DatabaseError:
            db.close()
            raise ConfigError(
                f"{self.path}: the catalog cannot be read with this cache key (it was encrypted "
                "under another one, or is damaged); give the key it was encrypted with"
            ) from None
        return db

    def _encrypt_in_place(self) -> None:
        """Replace the plaintext catalog by an encrypted copy, journal included.  Either file is
        complete at every moment, so a crash part way leaves the plaintext one to convert again;
        its disk blocks are freed, not overwritten."""
        encrypted = self.path.with_name(self.path.name + ".encrypting")
        for suffix in ("", "-journal"):
            Path(f"{encrypted}{suffix}").unlink(missing_ok=True)
        db: sqlite3.Connection = sqlcipher.connect(self.path, isolation_level=None)  # unkeyed
        try:
            busy = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            if busy:
                raise ConfigError(
                    f"{self.path}: the catalog is in use by another process; stop it first"
                )
            db.execute("ATTACH DATABASE ? AS encrypted KEY ?", (str(encrypted), self._key))
            db.execute("SELECT sqlcipher_export('encrypted')")
            db.execute("DETACH DATABASE encrypted")
        finally:
            db.close()
        os.chmod(encrypted, self.path.stat().st_mode & 0o777)
        _fsync(encrypted)
        # Checkpointed above: the log holds nothing the file does not, and must not be read
        # as the new file's log.
        for suffix in ("-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        os.replace(encrypted, self.path)
        _fsync(self.path.parent)
        log.info("catalog %s encrypted under the cache key (it was plaintext)", self.path)

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (WAL, autocommit)."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = self._connect()
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=10000")
            self._local.db = db
        return db

    @contextlib.contextmanager
    def transaction(
        self, durable: bool = False, nodes: bool = True
    ) -> Iterator[sqlite3.Connection]:
        """One write transaction on this thread's connection.  ``durable`` makes its commit
        survive a power cut (SQLite syncs the journal), which an fsync promise needs.
        ``nodes=False`` promises that it writes no node, so it leaves ``version`` alone."""
        db = self.connection()
        if durable:
            db.execute("PRAGMA synchronous=FULL")
        try:
            with self._locked_write(db, self.path, nodes):
                yield db
        finally:
            if durable:
                db.execute("PRAGMA synchronous=NORMAL")

    @contextlib.contextmanager
    def _locked_write(self, db: sqlite3.Connection, what: object, nodes: bool) -> Iterator[None]:
        """A ``_writing`` transaction under the write lock, counted in ``version`` if it may
        have changed a node (whether it commits or not: a count too many costs nothing)."""
        with self.write_lock:
            try:
                with _writing(db, what):
                    yield
            finally:
                if nodes:
                    self.version += 1

    def select(self, where: str, *args: object) -> list[Node]:
        sql = f"SELECT {_NODE_COLUMNS} FROM nodes WHERE {where}"
        return [_node(row) for row in self.connection().execute(sql, args).fetchall()]

    # -- meta ------------------------------------------------------------------------------

    def get_meta(self, name: str) -> str | None:
        row = self.connection().execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
        return row[0] if row else None

    def set_meta(self, name: str, value: str) -> None:
        self.connection().execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))

    def listing_checkpoint(self) -> str:
        """The last key an unfinished first listing cataloged ("" if none is unfinished)."""
        return self.get_meta(_LISTING_CHECKPOINT) or ""

    # -- reads -----------------------------------------------------------------------------

    def find(self, where: str, *args: object) -> Node | None:
        """The node matching an SQL condition, on this thread's connection (so inside a
        ``transaction`` it sees that transaction's changes)."""
        row = (
            self.connection()
            .execute(f"SELECT {_NODE_COLUMNS} FROM nodes WHERE {where}", args)
            .fetchone()
        )
        return _node(row) if row else None

    def get(self, ino: int) -> Node | None:
        return self.find("ino=?", ino)

    def lookup(self, parent: int, name: str) -> Node | None:
        return self.find("parent=? AND name=?", parent, name)

    def by_key(self, key: str) -> Node | None:
        return self.find("key=?", key)

    def path_of(self, ino: int) -> str:
        """The mount-relative path of a node, from its ancestors (for the audit trail)."""
        rows = (
            self.connection()
            .execute(
                "WITH RECURSIVE up(ino, parent, name, depth) AS ("
                "SELECT ino, parent, name, 0 FROM nodes WHERE ino=? UNION ALL "
                "SELECT n.ino, n.parent, n.name, up.depth + 1 FROM nodes n "
                "JOIN up ON n.ino = up.parent WHERE up.ino != ? AND up.depth < 4096) "
                "SELECT name FROM up ORDER BY depth DESC",
                (ino, ROOT),
            )
            .fetchall()
        )
        return "/".join(row[0] for row in rows if row[0])

    def children(self, parent: int, after: int, limit: int) -> list[Listed]:
        """Entries of a directory with inode above ``after``: readdir offsets survive changes."""
        rows = (
            self.connection()
            .execute(
                "SELECT name, ino, is_dir, mode, size, mtime_ns, uid, gid FROM nodes "
                "WHERE parent=? AND ino>? AND ino!=? ORDER BY ino LIMIT ?",
                (parent, after, ROOT, limit),
            )
            .fetchall()
        )
        return list(map(Listed._make, rows))

    def counts(self) -> dict[str, int]:
        db = self.connection()
        files, size = db.execute(
            "SELECT count(*), total(size) FROM nodes WHERE is_dir=0"
        ).fetchone()
        dirs = db.execute("SELECT count(*) FROM nodes WHERE is_dir=1").fetchone()[0]
        rejected = db.execute("SELECT count(*) FROM rejected").fetchone()[0]
        return {"files": files, "directories": dirs, "bytes": int(size), "rejected_keys": rejected}

    def rejected(self, limit: int = 20) -> list[tuple[str, str]]:
        rows = (
            self.connection()
            .execute("SELECT key, reason FROM rejected LIMIT ?", (limit,))
            .fetchall()
        )
        return [(key, reason) for key, reason in rows]

    # -- sync ------------------------------------------------------------------------------

    def _cataloged(self, after: str) -> Iterator[tuple[str, tuple[object, ...]]]:
        """The catalog's keys after ``after`` in order with what a listing can contradict, from
        a separate connection: one SELECT is one snapshot, so the rows the sync writes meanwhile
        never show up in this walk.  A node changed through the mount keeps its own mtime, so
        only the object's version, size and class are compared for it."""
        reader = self._connect()
        try:
            for key, etag, size, mtime_ns, storage_class, local_at in reader.execute(
                "SELECT key, etag, size, mtime_ns, storage_class, local_at FROM nodes "
                "WHERE key IS NOT NULL AND key > ? ORDER BY key",
                (after,),
            ):
                yield key, (etag, size, None if local_at else mtime_ns, storage_class)
        finally:
            reader.close()

    def sync(
        self,
        listing: Iterable[ObjectInfo],
        resume: str | None = None,
        progress: Callable[[SyncReport], None] | None = None,
    ) -> SyncReport:
        """Make the catalog match a complete listing; raises (leaving the catalog consistent,
        with the batches written so far) if the listing fails part way.

        With ``resume`` (a key, or "" from the start), the listing is the part after that key
        of a first listing, the keys up to it being cataloged already: every batch records how
        far it got (``listing_checkpoint``), so a first listing of millions of objects that is
        interrupted goes on from there instead of starting over.  ``progress`` is told the
        running totals after each batch.

        Local changes win over the listing: a node with work pending for the cloud, or changed
        through the mount after this sync started, is left alone, and keys deleted through the
        mount are not brought back while their delete is pending (or finished after the start)."""
        started = time.monotonic()
        report = SyncReport()
        writer = _Writer(self, report, self._reported)
        since = time.time()
        writer.tombstones = self._tombstones(since)
        after = resume or ""
        old = self._cataloged(after)
        current = next(old, None)
        first = True
        # Each page of the listing is fetched outside any transaction (it may take a WAN round
        # trip) and applied in one, so writers through the mount never wait for the network.
        for page in _pages(listing, _BATCH):
            with writer.batch():
                if first:
                    writer.db.execute("DELETE FROM rejected WHERE key > ?", (after,))
                    first = False
                if resume is not None:
                    self.set_meta(_LISTING_CHECKPOINT, page[-1].key)  # in the batch's transaction
                for info in page:
                    while current is not None and current[0] < info.key:
                        writer.remove(current[0])
                        current = next(old, None)
                    if current is not None and current[0] == info.key:
                        mtime = None if current[1][2] is None else info.mtime_ns
                        if current[1] != (info.etag, info.size, mtime, info.storage_class):
                            writer.update(info)
                        current = next(old, None)
                    else:
                        writer.add(info)
            report.listed_up_to = page[-1].key
            if progress is not None:
                progress(report)
        while True:
            with writer.batch():
                if first:
                    writer.db.execute("DELETE FROM rejected WHERE key > ?", (after,))
                    first = False
                for _ in range(_BATCH):
                    if current is None:
                        break
                    writer.remove(current[0])
                    current = next(old, None)
                if current is None:
                    writer.retry_shadowed()
                    writer.db.execute("DELETE FROM deletes WHERE done_at < ?", (since,))
                    writer.db.execute("DELETE FROM meta WHERE name=?", (_LISTING_CHECKPOINT,))
                    break
        self.set_meta("synced_at", str(time.time()))
        report.seconds = time.monotonic() - started
        return report

    def _tombstones(self, since: float) -> set[str]:
        rows = self.connection().execute(
            "SELECT key FROM deletes WHERE done_at IS NULL OR done_at >= ?", (since,)
        )
        return {row[0] for row in rows}

    def refresh_object(
        self, info: ObjectInfo | None, key: str, asked_ns: int | None = None
    ) -> SyncReport:
        """Record one object's new state (``None``: it is gone), as learned from a HEAD sent at
        ``asked_ns`` (wall clock, default now): a change made through the mount since then, such
        as an upload that finished while the HEAD was out, is newer and stays."""
        report = SyncReport()
        writer = _Writer(self, report, self._reported)
        if asked_ns is not None:
            writer.since_ns = asked_ns
        writer.tombstones = self._tombstones(writer.since_ns / 1e9)
        with writer.batch():
            existing = self.by_key(key)
            if info is None:
                if existing is not None:
                    writer.remove(key)
            elif existing is None:
                writer.add(info)
            else:
                writer.update(info)
        return report


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pages(items: Iterable[ObjectInfo], size: int) -> Iterator[list[ObjectInfo]]:
    iterator = iter(items)
    while page := list(itertools.islice(iterator, size)):
        yield page


_UNTOUCHED = "dirty=0 AND fetch_key IS NULL AND local_at<?"
"""SQL: a node the listing may change (nothing pending for the cloud, no newer local change)."""


class _Writer:
    """Applies listing differences inside batched transactions, keeping the tree well formed."""

    def __init__(self, catalog: Catalog, report: SyncReport, reported: set[str]) -> None:
        self.catalog = catalog
        self.db = catalog.connection()
        self.report = report
        self.reported = reported
        self.dirs: dict[tuple[int, str], int] = {}
        self.shadowed: list[ObjectInfo] = []
        """Files hidden by a directory of the same name during this sync."""
        self.tombstones: set[str] = set()
        """Keys deleted through the mount: the listing may still show them."""
        self.since_ns = time.time_ns()
        """Nodes changed through the mount after this are newer than the listing."""

    def retry_shadowed(self) -> None:
        """Add again the files whose shadowing directory went away later in the same sync."""
        shadowed, self.shadowed = self.shadowed, []
        for info in shadowed:
            self.db.execute("DELETE FROM rejected WHERE key=?", (info.key,))
            self.report.rejected -= 1
            self.add(info)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """One write transaction; rolled back (and the lock freed) if anything fails."""
        with self.catalog._locked_write(self.db, "the catalog", nodes=True):
            yield

    def reject(self, key: str, reason: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO rejected VALUES (?, ?)", (key, reason))
        self.report.rejected += 1
        if key not in self.reported:  # once per key and process, not on every relist
            self.reported.add(key)
            log.warning("object key %r not shown in the mount: it %s", key, reason)

    def _directory(self, parent: int, name: str) -> int:
        """The inode of directory ``name`` in ``parent``, created if missing.  A file of the same
        name gives way: a key that is also a prefix shows as the directory."""
        cached = self.dirs.get((parent, name))
        if cached is not None:
            return cached
        row = self.db.execute(
            "SELECT ino, is_dir, key FROM nodes WHERE parent=? AND name=?", (parent, name)
        ).fetchone()
        if row is not None and not row[1]:
            self.db.execute("DELETE FROM nodes WHERE ino=?", (row[0],))
            self.reject(row[2], "is also a directory prefix; the directory is shown")
            self.report.stale(ino=row[0])
            row = None
        if row is None:
            now = time.time_ns()
            ino = self.db.execute(
                "INSERT INTO nodes(parent, name, is_dir, mtime_ns) VALUES (?, ?, 1, ?)",
                (parent, name, now),
            ).lastrowid
            assert ino is not None
            self.report.stale(name=(parent, name))
        else:
            ino = row[0]
        if len(self.dirs) > 100_000:
            self.dirs.clear()
        self.dirs[(parent, name)] = ino
        return ino

    def add(self, info: ObjectInfo) -> None:
        if info.key in self.tombstones:
            return
        if self.db.execute("SELECT 1 FROM nodes WHERE key=?", (info.key,)).fetchone():
            return  # created through the mount since the catalog snapshot was taken
        problem = key_problem(info.key)
        if problem:
            self.reject(info.key, problem)
            return
        marker = info.key.endswith("/")
        parts = info.key.rstrip("/").split("/")
        parent = ROOT
        for name in parts[:-1]:
            parent = self._directory(parent, name)
        if marker:
            ino = self._directory(parent, parts[-1])
            self.db.execute(
                "UPDATE nodes SET key=?, size=?, mtime_ns=?, etag=?, base_etag=?, storage_class=? "
                "WHERE ino=?",
                (info.key, info.size, info.mtime_ns, info.etag, info.etag, info.storage_class, ino),
            )
            self.report.added += 1
            return
        clash = self.db.execute(
            "SELECT is_dir FROM nodes WHERE parent=? AND name=?", (parent, parts[-1])
        ).fetchone()
        if clash is not None:
            self.reject(info.key, "is also a directory prefix; the directory is shown")
            self.shadowed.append(info)
            return
        self.db.execute(
            "INSERT INTO nodes(parent, name, is_dir, key, size, mtime_ns, etag, base_etag, "
            "storage_class) VALUES (?, ?, 0, ?, ?, ?, ?, ?, ?)",
            (
                parent,
                parts[-1],
                info.key,
                info.size,
                info.mtime_ns,
                info.etag,
                info.etag,
                info.storage_class,
            ),
        )
        self.report.added += 1
        self.report.stale(name=(parent, parts[-1]))

    def update(self, info: ObjectInfo) -> None:
        row = self.db.execute(
            "UPDATE nodes SET size=?, mtime_ns=CASE WHEN local_at=0 OR etag IS NOT ? "
            "THEN ? ELSE mtime_ns END, etag=?, base_etag=?, storage_class=? "
            f"WHERE key=? AND {_UNTOUCHED} RETURNING ino",
            (
                info.size,
                info.etag,
                info.mtime_ns,
                info.etag,
                info.etag,
                info.storage_class,
                info.key,
                self.since_ns,
            ),
        ).fetchone()
        if row is not None:
            self.report.changed += 1
            self.report.stale(ino=row[0])

    def remove(self, key: str) -> None:
        row = self.db.execute(
            f"SELECT ino, parent, name, is_dir FROM nodes WHERE key=? AND {_UNTOUCHED}",
            (key, self.since_ns),
        ).fetchone()
        if row is None:
            return
        ino, parent, name, is_dir = row
        self.report.removed += 1
        if is_dir:
            # A directory marker went away; the directory stays while it has children.
            self.db.execute("UPDATE nodes SET key=NULL WHERE ino=?", (ino,))
            parent = ino
        else:
            self.db.execute("DELETE FROM nodes WHERE ino=?", (ino,))
            self.report.stale(ino=ino, name=(parent, name))
        self._prune(parent)

    def _prune(self, ino: int) -> None:
        """Remove implicit directories left empty, walking up towards the root."""
        while ino != ROOT:
            row = self.db.execute(
                "SELECT parent, name, key, local_at FROM nodes WHERE ino=?", (ino,)
            ).fetchone()
            if row is None or row[2] is not None or row[3]:
                return  # a marker object or a directory made through the mount stays
            if self.db.execute("SELECT 1 FROM nodes WHERE parent=? LIMIT 1", (ino,)).fetchone():
                return
            self.db.execute("DELETE FROM nodes WHERE ino=?", (ino,))
            self.dirs.pop((row[0], row[1]), None)
            self.report.stale(ino=ino, name=(row[0], row[1]))
            ino = row[0]
