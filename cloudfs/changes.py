"""Changes made through the mount, and the journal of cloud work they leave behind.

The catalog shows a change at once; what the cloud still has to do is recorded in the same SQLite
transaction, so a crash can never leave the tree and the journal disagreeing:

* a file whose bytes wait in the staging area: ``Node.dirty`` (READY: upload it);
* a file renamed, or given new metadata, after its bytes reached the cloud: ``Node.fetch_key``
  (copy it server-side to ``Node.key``);
* a key that must disappear from the bucket: a row of ``deletes``.  It waits while a node still
  reads its bytes from that key, and is dropped if a node holds the key again (that node's upload
  replaces the object).  A finished delete stays as a tombstone until a relist that started
  later has run, so a listing taken before it cannot bring the key back.

Every method blocks (SQLite); callers run them in worker threads.
"""

from __future__ import annotations

import errno
import socket
import sqlite3
import time
from collections.abc import Collection
from dataclasses import dataclass

from .catalog import (
    CLEAN,
    NAME_MAX,
    NOT_MOUNTED_MARKER,
    READY,
    ROOT,
    WRITING,
    Catalog,
    Node,
)
from .errors import FsError
from .store import ObjectInfo

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


@dataclass(frozen=True)
class Backlog:
    files: int
    bytes: int
    oldest: float | None
    """Wall-clock time the oldest pending change was made, or None."""
    copies: int
    deletes: int


@dataclass(frozen=True)
class Work:
    """A batch of cloud work, oldest first."""

    uploads: list[Node]
    copies: list[Node]
    deletes: list[tuple[str, str | None]]


class Changes:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    # -- helpers (inside a transaction) ----------------------------------------------------

    def _existing(self, parent: int, name: str) -> Node:
        node = self.catalog.find("parent=? AND name=?", parent, name)
        if node is None:
            raise FsError(errno.ENOENT)
        return node

    def _directory(self, ino: int) -> Node:
        node = self.catalog.find("ino=?", ino)
        if node is None:
            raise FsError(errno.ENOENT)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        return node

    def _path(self, db: sqlite3.Connection, ino: int) -> str:
        """The key prefix of a directory ('' for the root), walking up the tree."""
        names: list[str] = []
        while ino != ROOT:
            row = db.execute("SELECT parent, name FROM nodes WHERE ino=?", (ino,)).fetchone()
            if row is None:
                raise FsError(errno.ENOENT)
            ino = row[0]
            names.append(row[1])
        return "/".join(reversed(names))

    def _key(self, db: sqlite3.Connection, parent: int, name: str) -> str:
        prefix = self._path(db, parent)
        return f"{prefix}/{name}" if prefix else name

    def _check_new_name(self, parent: int, name: str) -> None:
        self._directory(parent)
        if parent == ROOT and name == NOT_MOUNTED_MARKER:
            raise FsError(
                errno.EACCES, f"{NOT_MOUNTED_MARKER} would tell a PACS nothing is mounted"
            )
        if self.catalog.find("parent=? AND name=?", parent, name) is not None:
            raise FsError(errno.EEXIST)

    @staticmethod
    def _pending_delete(db: sqlite3.Connection, key: str) -> str | None:
        """The version a pending delete of ``key`` removes: what a new object there replaces."""
        row = db.execute(
            "SELECT etag FROM deletes WHERE key=? AND done_at IS NULL", (key,)
        ).fetchone()
        return row[0] if row else None

    @staticmethod
    def _queue_delete(db: sqlite3.Connection, key: str, etag: str) -> None:
        db.execute(
            "INSERT OR REPLACE INTO deletes(key, etag, queued_at, done_at) VALUES (?, ?, ?, NULL)",
            (key, etag, time.time()),
        )

    def _forget(self, db: sqlite3.Connection, node: Node) -> None:
        """Remove a node; the object its key names goes from the bucket too."""
        if node.key is not None and node.base_etag is not None:
            self._queue_delete(db, node.key, node.base_etag)
        db.execute("DELETE FROM nodes WHERE ino=?", (node.ino,))

    def _move(self, db: sqlite3.Connection, node: Node, key: str, now: int) -> None:
        """Give a node a new key.  Its cloud bytes stay where they are until copied; the
        object under the old key is deleted once nothing reads from it."""
        assert node.key is not None
        fetch_key = node.fetch_key
        if fetch_key is None and node.etag is not None:
            fetch_key = node.key
        if node.base_etag is not None:
            self._queue_delete(db, node.key, node.base_etag)
        db.execute(
            "UPDATE nodes SET key=?, fetch_key=?, base_etag=?, local_at=? WHERE ino=?",
            (key, fetch_key, self._pending_delete(db, key), now, node.ino),
        )

    # -- namespace changes -----------------------------------------------------------------

    def make_directory(self, parent: int, name: str, mode: int, uid: int, gid: int) -> Node:
        """A directory made through the mount lives in the catalog only (no marker object): a
        PACS makes thousands of shard directories and the bucket needs none of them."""
        with self.catalog.transaction() as db:
            self._check_new_name(parent, name)
            now = time.time_ns()
            ino = db.execute(
                "INSERT INTO nodes(parent, name, is_dir, mtime_ns, mode, uid, gid, local_at) "
                "VALUES (?, ?, 1, ?, ?, ?, ?, ?)",
                (parent, name, now, mode, uid, gid, now),
            ).lastrowid
            node = self.catalog.find("ino=?", ino)
        assert node is not None
        return node

    def create_file(
        self, parent: int, name: str, mode: int, uid: int, gid: int, staged: str
    ) -> Node:
        """A new empty file whose bytes live in staging file ``staged``; EEXIST if the name is
        taken (the caller decides whether that is an error: O_EXCL)."""
        with self.catalog.transaction() as db:
            self._check_new_name(parent, name)
            key = self._key(db, parent, name)
            now = time.time_ns()
            ino = db.execute(
                "INSERT INTO nodes(parent, name, is_dir, key, size, mtime_ns, mode, uid, gid, "
                "staged, dirty, base_etag, local_at) "
                "VALUES (?, ?, 0, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    parent,
                    name,
                    key,
                    now,
                    mode,
                    uid,
                    gid,
                    staged,
                    WRITING,
                    self._pending_delete(db, key),
                    now,
                ),
            ).lastrowid
            node = self.catalog.find("ino=?", ino)
        assert node is not None
        return node

    def stage(self, ino: int, staged: str, durable: bool = False) -> None:
        """The file's bytes now live in a staging file (opened for writing); ``durable``: the
        record must survive a power cut (the file was complete and is not yet in the cloud)."""
        with self.catalog.transaction(durable) as db:
            # A file already durable stays so: its new staging file starts as a copy of it.
            db.execute(
                "UPDATE nodes SET staged=?, dirty=CASE WHEN dirty=? THEN ? ELSE ? END, local_at=? "
                "WHERE ino=?",
                (staged, READY, READY, WRITING, time.time_ns(), ino),
            )

    def record_write(self, ino: int, size: int, mtime_ns: int, ready: bool, durable: bool) -> None:
        """Record the staged file's new size; ``ready``: its bytes are complete enough to upload
        (closed or fsync'd); ``durable``: the record must survive a power cut (fsync)."""
        with self.catalog.transaction(durable) as db:
            db.execute(
                "UPDATE nodes SET size=?, mtime_ns=?, local_at=?, "
                "dirty=CASE WHEN ? THEN ? ELSE dirty END WHERE ino=? AND staged IS NOT NULL",
                (size, mtime_ns, time.time_ns(), ready, READY, ino),
            )

    def set_attributes(
        self,
        ino: int,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        mtime_ns: int | None = None,
    ) -> Node:
        """chmod, chown, utime: kept in the catalog and sent as object metadata (an uploaded file
        gets it through a server-side copy onto itself)."""
        with self.catalog.transaction() as db:
            node = self.catalog.find("ino=?", ino)
            if node is None:
                raise FsError(errno.ENOENT)
            db.execute(
                "UPDATE nodes SET mode=coalesce(?, mode), uid=coalesce(?, uid), "
                "gid=coalesce(?, gid), mtime_ns=coalesce(?, mtime_ns), local_at=?, "
                f"fetch_key=CASE WHEN is_dir=0 AND etag IS NOT NULL AND dirty={CLEAN} "
                "THEN coalesce(fetch_key, key) ELSE fetch_key END WHERE ino=?",
                (mode, uid, gid, mtime_ns, time.time_ns(), ino),
            )
            node = self.catalog.find("ino=?", ino)
        assert node is not None
        return node

    def unlink(self, parent: int, name: str) -> Node:
        """Remove a file; returns it (its staging file is the caller's to remove)."""
        with self.catalog.transaction() as db:
            node = self._existing(parent, name)
            if node.is_dir:
                raise FsError(errno.EISDIR)
            self._forget(db, node)
        return node

    def remove_directory(self, parent: int, name: str) -> Node:
        with self.catalog.transaction() as db:
            node = self._existing(parent, name)
            if not node.is_dir:
                raise FsError(errno.ENOTDIR)
            if db.execute("SELECT 1 FROM nodes WHERE parent=? LIMIT 1", (node.ino,)).fetchone():
                raise FsError(errno.ENOTEMPTY)
            self._forget(db, node)
        return node

    def rename(
        self, parent: int, name: str, new_parent: int, new_name: str, flags: int = 0
    ) -> tuple[Node, Node | None]:
        """POSIX rename within the mount: returns the moved node and the one it replaced.

        A directory is renamed in one transaction however large: every key under it changes in
        the catalog at once, and the server-side copies run in the background."""
        if flags & RENAME_EXCHANGE:
            raise FsError(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        with self.catalog.transaction() as db:
            node = self._existing(parent, name)
            self._directory(new_parent)
            if new_parent == ROOT and new_name == NOT_MOUNTED_MARKER:
                raise FsError(errno.EACCES)
            target = self.catalog.find("parent=? AND name=?", new_parent, new_name)
            if target is not None and target.ino == node.ino:
                return node, None
            if target is not None:
                if flags & RENAME_NOREPLACE:
                    raise FsError(errno.EEXIST)
                if node.is_dir and not target.is_dir:
                    raise FsError(errno.ENOTDIR)
                if target.is_dir and not node.is_dir:
                    raise FsError(errno.EISDIR)
                if (
                    target.is_dir
                    and db.execute(
                        "SELECT 1 FROM nodes WHERE parent=? LIMIT 1", (target.ino,)
                    ).fetchone()
                ):
                    raise FsError(errno.ENOTEMPTY)
                self._forget(db, target)
            old_prefix = self._key(db, parent, name)
            new_prefix = self._key(db, new_parent, new_name)
            if node.is_dir and (new_prefix + "/").startswith(old_prefix + "/"):
                raise FsError(errno.EINVAL, "cannot move a directory into itself")
            now = time.time_ns()
            db.execute(
                "UPDATE nodes SET parent=?, name=?, local_at=? WHERE ino=?",
                (new_parent, new_name, now, node.ino),
            )
            if node.is_dir:
                self._move_tree(db, old_prefix, new_prefix, now)
            else:
                self._move(db, node, new_prefix, now)
            moved = self.catalog.find("ino=?", node.ino)
        assert moved is not None
        return moved, target

    def _move_tree(self, db: sqlite3.Connection, old: str, new: str, now: int) -> None:
        """Re-key everything under a renamed directory (its marker object included)."""
        # '0' is the character after '/': the range holds exactly the keys under old + '/'.
        for node in self.catalog.select(
            "key >= ? AND key < ? ORDER BY key DESC", old + "/", old + "0"
        ):
            assert node.key is not None
            self._move(db, node, new + node.key[len(old) :], now)

    # -- the journal -------------------------------------------------------------------------

    def work(self, limit: int, wanted: Collection[int] = ()) -> Work:
        """Pending cloud work, oldest first, plus the uploads of the ``wanted`` inodes."""
        catalog = self.catalog
        uploads = catalog.select(f"dirty={READY} ORDER BY local_at LIMIT ?", limit)
        listed = {node.ino for node in uploads}
        for ino in wanted:
            if ino not in listed:
                uploads += catalog.select(f"dirty={READY} AND ino=?", ino)
        copies = catalog.select(
            f"dirty={CLEAN} AND fetch_key IS NOT NULL ORDER BY local_at LIMIT ?", limit
        )
        rows = catalog.connection().execute(
            "SELECT key, etag FROM deletes WHERE done_at IS NULL AND NOT EXISTS "
            "(SELECT 1 FROM nodes WHERE fetch_key=deletes.key) ORDER BY queued_at LIMIT ?",
            (limit,),
        )
        return Work(uploads, copies, [(key, etag) for key, etag in rows])

    def backlog(self) -> Backlog:
        db = self.catalog.connection()
        files, size, oldest = db.execute(
            f"SELECT count(*), total(size), min(local_at) FROM nodes WHERE dirty={READY}"
        ).fetchone()
        copies = db.execute(
            f"SELECT count(*), min(local_at) FROM nodes WHERE dirty={CLEAN} "
            "AND fetch_key IS NOT NULL"
        ).fetchone()
        deletes = db.execute(
            "SELECT count(*), min(queued_at) FROM deletes WHERE done_at IS NULL"
        ).fetchone()
        times = [t / 1e9 for t in (oldest, copies[1]) if t] + ([deletes[1]] if deletes[1] else [])
        return Backlog(files, int(size), min(times) if times else None, copies[0], deletes[0])

    def _orphan_object(self, db: sqlite3.Connection, key: str, etag: str) -> None:
        """An object was written at ``key`` for a node that has moved on: a node now holding the
        key replaces it, otherwise it is deleted."""
        holder = self.catalog.find("key=?", key)
        if holder is not None:
            db.execute("UPDATE nodes SET base_etag=? WHERE ino=?", (etag, holder.ino))
        else:
            self._queue_delete(db, key, etag)

    def finish_upload(
        self, uploaded: Node, info: ObjectInfo, keep_staged: bool
    ) -> tuple[bool, bool]:
        """Record an upload of ``uploaded`` (the node as it was when the upload started).
        ``keep_staged``: a writer still has the file open, so its staging file stays the copy
        it reads and writes.  Returns (the cloud now has the node's bytes, the staging file that
        went up is no longer named by the node)."""
        with self.catalog.transaction() as db:
            node = self.catalog.find("ino=?", uploaded.ino)
            if node is None or node.key != uploaded.key:
                self._orphan_object(db, info.key, info.etag)
                return False, node is None or node.staged != uploaded.staged
            if node.staged == uploaded.staged and node.local_at == uploaded.local_at:
                # local_at moves on: a relist whose listing predates the upload leaves it alone.
                db.execute(
                    "UPDATE nodes SET dirty=?, staged=?, etag=?, base_etag=?, fetch_key=NULL, "
                    "storage_class='STANDARD', size=?, local_at=? WHERE ino=?",
                    (
                        CLEAN,
                        node.staged if keep_staged else None,
                        info.etag,
                        info.etag,
                        info.size,
                        time.time_ns(),
                        node.ino,
                    ),
                )
                return True, not keep_staged
            # Changed while it went up: the cloud has an older copy, the next upload replaces it.
            db.execute("UPDATE nodes SET base_etag=? WHERE ino=?", (info.etag, node.ino))
            return False, node.staged != uploaded.staged

    def unstage(self, ino: int, staged: str) -> bool:
        """The cloud has the bytes of a staging file kept while it was open: read them from the
        cloud (and the block cache) from now on.  False if the node changed meanwhile."""
        with self.catalog.transaction() as db:
            changed = db.execute(
                "UPDATE nodes SET staged=NULL WHERE ino=? AND staged=? AND dirty=?",
                (ino, staged, CLEAN),
            ).rowcount
        return changed == 1

    def finish_copy(self, copied: Node, info: ObjectInfo) -> None:
        with self.catalog.transaction() as db:
            node = self.catalog.find("ino=?", copied.ino)
            if node is None or node.key != copied.key:
                self._orphan_object(db, info.key, info.etag)
                return
            if node.fetch_key == copied.fetch_key and node.etag == copied.etag:
                # Metadata changed during the copy: one more copy, onto itself, carries it.
                again = node.key if node.local_at != copied.local_at else None
                db.execute(
                    "UPDATE nodes SET fetch_key=?, etag=?, base_etag=?, local_at=? WHERE ino=?",
                    (again, info.etag, info.etag, time.time_ns(), node.ino),
                )
            else:
                db.execute("UPDATE nodes SET base_etag=? WHERE ino=?", (info.etag, node.ino))

    def claim_delete(self, key: str, etag: str | None) -> bool:
        """Whether a pending delete must really be sent: not when a node holds the key again
        (its own upload or copy replaces the object), in which case it is settled here."""
        with self.catalog.transaction() as db:
            if self.catalog.find("key=?", key) is None:
                return True
            db.execute(
                "UPDATE deletes SET done_at=? WHERE key=? AND etag IS ?", (time.time(), key, etag)
            )
            return False

    def finish_delete(self, key: str, etag: str | None) -> None:
        with self.catalog.transaction() as db:
            db.execute(
                "UPDATE deletes SET done_at=? WHERE key=? AND etag IS ? AND done_at IS NULL",
                (time.time(), key, etag),
            )
            # A file created there meanwhile no longer replaces anything.
            db.execute(
                "UPDATE nodes SET base_etag=NULL WHERE key=? AND base_etag IS ?", (key, etag)
            )

    def divert(self, ino: int) -> Node:
        """Another writer changed the key this node was to replace: keep both, by giving the
        local version a name of its own next to it."""
        with self.catalog.transaction() as db:
            node = self.catalog.find("ino=?", ino)
            if node is None:
                raise FsError(errno.ENOENT)
            name = self._conflict_name(node)
            key = self._key(db, node.parent, name)
            db.execute(
                "UPDATE nodes SET name=?, key=?, base_etag=NULL, local_at=? WHERE ino=?",
                (name, key, time.time_ns(), ino),
            )
            diverted = self.catalog.find("ino=?", ino)
        assert diverted is not None
        return diverted

    def _conflict_name(self, node: Node) -> str:
        """``<name>.conflict-<UTC>-<host>``, shortened to fit NAME_MAX and made unique."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        suffix = f".conflict-{stamp}-{socket.gethostname()[:32]}"
        room = NAME_MAX - len(suffix.encode()) - 4  # 4: room for "-999"
        base = node.name.encode()[:room].decode(errors="ignore")
        for attempt in range(1000):
            name = base + suffix + (f"-{attempt}" if attempt else "")
            if self.catalog.find("parent=? AND name=?", node.parent, name) is None:
                return name
        raise FsError(errno.EEXIST, "no free conflict name")

    def recover(self) -> tuple[list[Node], list[Node]]:
        """After a crash: files being written whose bytes were never made durable (no fsync, no
        close) are not uploaded as if complete.  Returns (reverted to their cloud version,
        removed as never stored); their staging files are the caller's to set aside."""
        with self.catalog.transaction() as db:
            reverted, removed = [], []
            for node in self.catalog.select("dirty=?", WRITING):
                if node.etag is not None:
                    db.execute(
                        "UPDATE nodes SET dirty=?, staged=NULL WHERE ino=?", (CLEAN, node.ino)
                    )
                    reverted.append(node)
                else:
                    self._forget(db, node)
                    removed.append(node)
        return reverted, removed

    def staged_names(self) -> set[str]:
        rows = self.catalog.connection().execute(
            "SELECT staged FROM nodes WHERE staged IS NOT NULL"
        )
        return {row[0] for row in rows}
