"""The persistent block cache: fixed-size pieces of objects on local disk, under a hard size cap.

Keys carry the object's ETag, so a changed object gets new blocks and can never be served from old
ones.  Each stored block starts with a header (magic, payload length, XXH3-64 of the payload and a
digest of the block's identity); a block that fails any check on read is deleted and reported as
missing, so the caller fetches it again instead of returning wrong bytes.  XXH3 rather than CRC-32:
it checks a 1 MiB block in 20 us instead of 250 us, and the check runs on every block read from
disk.

The cap: diskcache culls the entries stored longest ago inside every insert once its volume reaches
its limit; the limit is set one block below the configured size, so the cache never exceeds the cap
even right after an insert.  There is no periodic sweep to fall behind.

Recency: diskcache's own LRU policy writes to SQLite on every read, which serialises parallel
readers on the database's write lock (measured: 42% of a cached sequential read spent waiting for
it).  Reads here are plain SELECTs instead; the names of blocks read are queued and
``record_recency`` moves their store time to now in one transaction every few seconds, which makes
the store-time order an LRU order, a few seconds late.

A full disk or any storage error on insert is logged and reported (the read still succeeds from the
fetched bytes); it never raises into the read path.

Threads: every method blocks and is safe to call from many threads at once (diskcache keeps one
SQLite connection per thread).  Knows nothing of FUSE or of the store.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import struct
import time
from collections import deque
from contextlib import closing
from pathlib import Path
from typing import NamedTuple

import diskcache
import xxhash

log = logging.getLogger(__name__)

_MAGIC = b"CFB2"
_HEADER = struct.Struct("<4sIQ16s")  # magic, payload length, xxh3-64 of payload, identity digest
_WAL_RESERVE = 8 * 1024 * 1024
_CULL_PER_INSERT = 16
"""Entries diskcache may evict per insert: more than a fetch chunk's worth of blocks is never
needed because every insert adds one block."""


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


class BlockCache:
    def __init__(self, directory: Path, size_limit: int, block_size: int) -> None:
        self.block_size = block_size
        self.size_limit = size_limit
        # The cap covers everything under the directory: diskcache's own limit leaves room for
        # one block more, the SQLite write-ahead log (checkpointed at half its reserve) and the
        # directories diskcache spreads its files over (up to two 4 KiB entries per block).
        wal_reserve = min(_WAL_RESERVE, size_limit // 16)
        overhead = wal_reserve + (size_limit // block_size) * 2 * 4096
        self._store = diskcache.Cache(
            str(directory),
            size_limit=max(size_limit - block_size - _HEADER.size - overhead, block_size),
            sqlite_wal_autocheckpoint=max(wal_reserve // 2 // 4096, 16),
            eviction_policy="least-recently-stored",
            cull_limit=_CULL_PER_INSERT,
            statistics=False,
        )
        self._database = directory / diskcache.core.DBNAME
        self._recently_read: deque[str] = deque()
        self.corrupt_blocks = 0
        self.failed_inserts = 0
        self._last_failure_log = 0.0

    def _identity(self, block: BlockId) -> tuple[str, bytes]:
        name = block.cache_key(self.block_size)
        return name, hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    def get(self, block: BlockId) -> memoryview | None:
        """The verified payload of ``block``, or None if absent or found corrupt (then deleted)."""
        name, digest = self._identity(block)
        try:
            value = self._store.get(name, default=None)
        except (OSError, sqlite3.Error) as exc:
            log.warning("block cache read failed for %s: %s", block.key, exc)
            return None
        if value is None:
            return None
        if isinstance(value, bytes) and len(value) >= _HEADER.size:
            magic, length, checksum, identity = _HEADER.unpack_from(value)
            payload = memoryview(value)[_HEADER.size :]
            if (
                magic == _MAGIC
                and identity == digest
                and length == len(payload)
                and xxhash.xxh3_64_intdigest(payload) == checksum
            ):
                self._recently_read.append(name)
                return payload
        self.corrupt_blocks += 1
        log.warning("corrupt block %d of %s dropped; fetching it again", block.number, block.key)
        self._store.delete(name)
        return None

    def record_recency(self) -> None:
        """Mark the blocks read since the last call as just used (see the module docstring)."""
        names: set[str] = set()
        while self._recently_read:
            names.add(self._recently_read.popleft())
        if not names:
            return
        now = time.time()
        try:
            with closing(sqlite3.connect(self._database, timeout=30)) as db, db:
                db.executemany(
                    "UPDATE Cache SET store_time=? WHERE key=? AND raw=1",
                    [(now, name) for name in names],
                )
        except sqlite3.Error as exc:
            log.warning("cannot record block recency: %s", exc)

    def contains(self, block: BlockId) -> bool:
        return block.cache_key(self.block_size) in self._store

    def put(self, block: BlockId, payload: bytes | memoryview) -> bool:
        """Store a block; False (logged, rate-limited) if the disk refused it."""
        name, digest = self._identity(block)
        header = _HEADER.pack(_MAGIC, len(payload), xxhash.xxh3_64_intdigest(payload), digest)
        try:
            # A file object with read=True: given bytes, diskcache writes them line by line
            # (thousands of write calls per block, measured at 46% of the daemon's CPU).
            self._store.set(name, _Chunks(header, payload), read=True)
            return True
        except (OSError, sqlite3.Error) as exc:
            self.failed_inserts += 1
            now = time.monotonic()
            if now - self._last_failure_log > 60:
                self._last_failure_log = now
                log.error("block cache insert failed (%s); serving without caching", exc)
            return False

    def volume(self) -> int:
        """Bytes the cache occupies on disk (blocks and its index)."""
        return int(self._store.volume())

    def block_count(self) -> int:
        return len(self._store)

    def close(self) -> None:
        self._store.close()
