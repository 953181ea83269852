"""Changes made through the mount and their journal of cloud work; how a relist respects them."""

from __future__ import annotations

import errno
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_unit import listing, node_at, obj

from cloudfs.catalog import CLEAN, NAME_MAX, READY, ROOT, WRITING, Catalog, Node, key_problem
from cloudfs.changes import RENAME_EXCHANGE, RENAME_NOREPLACE, Changes
from cloudfs.errors import FsError
from cloudfs.store import ObjectInfo

MODE, UID, GID = 0o644, 1000, 1000


def at(catalog: Catalog, path: str) -> Node:
    node = node_at(catalog, path)
    assert node is not None, path
    return node


def fresh(catalog: Catalog, node: Node) -> Node:
    """The node as the catalog has it now."""
    now = catalog.get(node.ino)
    assert now is not None
    return now


def pending(catalog: Catalog) -> dict[str, str | None]:
    """Deletes not yet done: key -> the version they remove."""
    rows = catalog.connection().execute("SELECT key, etag FROM deletes WHERE done_at IS NULL")
    return dict(rows.fetchall())


def tombstones(catalog: Catalog) -> list[tuple[str, float | None]]:
    rows = catalog.connection().execute("SELECT key, done_at FROM deletes ORDER BY key")
    return rows.fetchall()


def write_file(
    changes: Changes, parent: int, name: str, size: int = 100, ready: bool = True
) -> Node:
    """A file created through the mount and written (closed when ``ready``)."""
    node = changes.create_file(parent, name, MODE, UID, GID, f"stage-{name}")
    changes.record_write(node.ino, size, 5_000, ready, False)
    return fresh(changes.catalog, node)


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return Catalog(tmp_path / "catalog.db")


@pytest.fixture
def changes(catalog: Catalog) -> Changes:
    return Changes(catalog)


def check_errno(code: int, function: object, *args: object) -> None:
    with pytest.raises(FsError) as caught:
        function(*args)  # type: ignore[operator]
    assert caught.value.errno == code, errno.errorcode.get(caught.value.errno)


# -- namespace changes -------------------------------------------------------------------------


def test_create_file_is_writing_at_its_path(catalog: Catalog, changes: Changes) -> None:
    """A new file is WRITING, keyed by its path, with nothing in the cloud to replace."""
    d = changes.make_directory(ROOT, "d", 0o755, UID, GID)
    node = changes.create_file(d.ino, "f.dcm", MODE, UID, GID, "s1")
    assert node.key == "d/f.dcm"
    assert (node.dirty, node.staged, node.base_etag, node.etag) == (WRITING, "s1", None, None)
    assert (node.size, node.mode, node.uid, node.gid) == (0, MODE, UID, GID)
    assert node.fetch_key is None and node.local_at > 0
    assert at(catalog, "d/f.dcm") == node
    top = changes.create_file(ROOT, "top", MODE, UID, GID, "s2")
    assert top.key == "top"
    assert changes.staged_names() == {"s1", "s2"}


def test_create_existing_name_is_eexist(catalog: Catalog, changes: Changes) -> None:
    """Creating a file where a file or directory of that name exists fails with EEXIST."""
    catalog.sync([obj("a"), obj("d/x")])
    check_errno(errno.EEXIST, changes.create_file, ROOT, "a", MODE, UID, GID, "s")
    check_errno(errno.EEXIST, changes.create_file, ROOT, "d", MODE, UID, GID, "s")
    assert at(catalog, "a").etag == '"e1"' and changes.staged_names() == set()


def test_create_in_missing_or_file_parent(catalog: Catalog, changes: Changes) -> None:
    """A parent that does not exist is ENOENT; a parent that is a file is ENOTDIR."""
    catalog.sync([obj("a")])
    check_errno(errno.ENOENT, changes.create_file, 10**6, "x", MODE, UID, GID, "s")
    check_errno(errno.ENOTDIR, changes.create_file, at(catalog, "a").ino, "x", MODE, UID, GID, "s")


def test_no_mount_marker_refused_at_root(catalog: Catalog, changes: Changes) -> None:
    """NO_MOUNT can never appear at the root (EACCES), by create, mkdir or rename."""
    check_errno(errno.EACCES, changes.create_file, ROOT, "NO_MOUNT", MODE, UID, GID, "s")
    check_errno(errno.EACCES, changes.make_directory, ROOT, "NO_MOUNT", 0o755, UID, GID)
    write_file(changes, ROOT, "f")
    check_errno(errno.EACCES, changes.rename, ROOT, "f", ROOT, "NO_MOUNT")
    assert node_at(catalog, "NO_MOUNT") is None
    # Deeper down it is an ordinary name.
    d = changes.make_directory(ROOT, "d", 0o755, UID, GID)
    assert changes.create_file(d.ino, "NO_MOUNT", MODE, UID, GID, "s").key == "d/NO_MOUNT"


def test_make_directory_is_local_and_eexist(catalog: Catalog, changes: Changes) -> None:
    """mkdir makes a catalog-only directory (no key, no work); a second mkdir is EEXIST."""
    d = changes.make_directory(ROOT, "d", 0o750, UID, GID)
    assert d.is_dir and d.key is None and d.mode == 0o750 and d.local_at > 0
    check_errno(errno.EEXIST, changes.make_directory, ROOT, "d", 0o755, UID, GID)
    work = changes.work(100)
    assert (work.uploads, work.copies, work.deletes) == ([], [], [])


def test_rmdir_non_empty_is_enotempty(catalog: Catalog, changes: Changes) -> None:
    """rmdir of a directory with an entry fails with ENOTEMPTY and removes nothing."""
    d = changes.make_directory(ROOT, "d", 0o755, UID, GID)
    write_file(changes, d.ino, "f")
    check_errno(errno.ENOTEMPTY, changes.remove_directory, ROOT, "d")
    assert at(catalog, "d/f").dirty == READY
    changes.unlink(d.ino, "f")
    assert changes.remove_directory(ROOT, "d").ino == d.ino
    assert node_at(catalog, "d") is None


def test_unlink_of_directory_is_eisdir(catalog: Catalog, changes: Changes) -> None:
    """unlink refuses a directory with EISDIR."""
    changes.make_directory(ROOT, "d", 0o755, UID, GID)
    check_errno(errno.EISDIR, changes.unlink, ROOT, "d")
    assert node_at(catalog, "d") is not None


def test_rmdir_of_file_is_enotdir(catalog: Catalog, changes: Changes) -> None:
    """rmdir refuses a file with ENOTDIR."""
    catalog.sync([obj("f")])
    check_errno(errno.ENOTDIR, changes.remove_directory, ROOT, "f")
    assert node_at(catalog, "f") is not None and pending(catalog) == {}


def test_unlink_missing_is_enoent(changes: Changes) -> None:
    """Removing a name that does not exist is ENOENT."""
    check_errno(errno.ENOENT, changes.unlink, ROOT, "nothing")
    check_errno(errno.ENOENT, changes.remove_directory, ROOT, "nothing")


def test_rmdir_of_listed_marker_queues_its_delete(catalog: Catalog, changes: Changes) -> None:
    """Removing an empty directory that has a marker object queues the marker's delete."""
    catalog.sync([obj("m/", size=0, etag='"m"')])
    changes.remove_directory(ROOT, "m")
    assert pending(catalog) == {"m/": '"m"'}


# -- the upload journal ------------------------------------------------------------------------


def test_record_write_ready_queues_upload_oldest_first(catalog: Catalog, changes: Changes) -> None:
    """A closed file is READY and offered for upload, the least recently changed first."""
    a = write_file(changes, ROOT, "a", size=10)
    b = write_file(changes, ROOT, "b", size=20)
    assert a.dirty == READY and b.dirty == READY
    assert [node.ino for node in changes.work(10).uploads] == [a.ino, b.ino]
    changes.record_write(a.ino, 11, 6_000, True, True)  # a written again: now the newest
    uploads = changes.work(10).uploads
    assert [node.ino for node in uploads] == [b.ino, a.ino]
    assert (uploads[1].size, uploads[1].mtime_ns) == (11, 6_000)
    assert [node.ino for node in changes.work(1).uploads] == [b.ino]


def test_record_write_not_ready_is_not_uploaded(catalog: Catalog, changes: Changes) -> None:
    """A file still being written (no close, no fsync) stays WRITING and is not offered."""
    node = write_file(changes, ROOT, "a", size=10, ready=False)
    assert node.dirty == WRITING and node.size == 10
    assert changes.work(10).uploads == []
    assert changes.backlog().files == 0


def test_record_write_ignores_unstaged_node(catalog: Catalog, changes: Changes) -> None:
    """A write record for a node without a staging file changes nothing."""
    catalog.sync([obj("a", size=10)])
    a = at(catalog, "a")
    changes.record_write(a.ino, 99, 7, True, False)
    assert fresh(catalog, a) == a


def test_backlog_counts_files_bytes_copies_deletes(catalog: Catalog, changes: Changes) -> None:
    """backlog() counts READY files and their bytes, pending copies and pending deletes."""
    empty = changes.backlog()
    assert (empty.files, empty.bytes, empty.copies, empty.deletes, empty.oldest) == (
        0,
        0,
        0,
        0,
        None,
    )
    before = time.time()
    write_file(changes, ROOT, "a", size=1000)
    write_file(changes, ROOT, "b", size=234)
    write_file(changes, ROOT, "w", size=5000, ready=False)  # not counted: still being written
    catalog.sync([obj("x"), obj("y")])
    changes.rename(ROOT, "x", ROOT, "x2")  # a copy (and a delete waiting for it)
    changes.unlink(ROOT, "y")  # a delete
    backlog = changes.backlog()
    assert (backlog.files, backlog.bytes, backlog.copies, backlog.deletes) == (2, 1234, 1, 2)
    assert backlog.oldest is not None and before - 1 <= backlog.oldest <= time.time() + 1


# -- deletes -----------------------------------------------------------------------------------


def test_unlink_of_listed_object_queues_delete(catalog: Catalog, changes: Changes) -> None:
    """Removing a file the listing showed queues the delete of that exact version."""
    catalog.sync([obj("d/a", etag='"v1"')])
    removed = changes.unlink(at(catalog, "d").ino, "a")
    assert removed.key == "d/a"
    assert node_at(catalog, "d/a") is None
    assert changes.work(10).deletes == [("d/a", '"v1"')]
    assert changes.backlog().deletes == 1


def test_unlink_of_local_file_queues_nothing(catalog: Catalog, changes: Changes) -> None:
    """Removing a file that never reached the cloud leaves no cloud work at all."""
    write_file(changes, ROOT, "a")
    node = changes.unlink(ROOT, "a")
    assert node.staged == "stage-a"  # returned so the caller removes the staging file
    work = changes.work(10)
    assert (work.uploads, work.copies, work.deletes) == ([], [], [])
    assert tombstones(catalog) == []


def test_recreate_after_delete_replaces_deleted_version(catalog: Catalog, changes: Changes) -> None:
    """A file created where a delete is pending replaces that version, and claims the delete."""
    catalog.sync([obj("a", etag='"old"')])
    changes.unlink(ROOT, "a")
    again = write_file(changes, ROOT, "a")
    assert again.base_etag == '"old"'
    # Offered, but not to be sent: the new node's upload replaces the object.
    assert changes.work(10).deletes == [("a", '"old"')]
    assert changes.claim_delete("a", '"old"') is False
    assert changes.work(10).deletes == []
    assert fresh(catalog, again).base_etag == '"old"'


def test_claim_delete_true_when_nobody_holds_the_key(catalog: Catalog, changes: Changes) -> None:
    """A pending delete of a key no node holds must really be sent."""
    catalog.sync([obj("a", etag='"old"')])
    changes.unlink(ROOT, "a")
    assert changes.claim_delete("a", '"old"') is True
    assert pending(catalog) == {"a": '"old"'}  # still pending until finished


def test_finish_delete_clears_base_of_node_created_meanwhile(
    catalog: Catalog, changes: Changes
) -> None:
    """When the delete went out before a new file took the key, that file replaces nothing."""
    catalog.sync([obj("a", etag='"old"')])
    changes.unlink(ROOT, "a")
    assert changes.claim_delete("a", '"old"') is True  # the delete is sent ...
    again = write_file(changes, ROOT, "a")  # ... while a new file is created there
    assert again.base_etag == '"old"'
    changes.finish_delete("a", '"old"')
    assert fresh(catalog, again).base_etag is None
    assert pending(catalog) == {}
    ((key, done_at),) = tombstones(catalog)
    assert key == "a" and done_at is not None


def test_finish_delete_leaves_other_versions(catalog: Catalog, changes: Changes) -> None:
    """Finishing the delete of one version does not settle the delete of another."""
    catalog.sync([obj("a", etag='"v1"')])
    changes.unlink(ROOT, "a")
    changes.finish_delete("a", '"v0"')
    assert pending(catalog) == {"a": '"v1"'}


# -- renames -----------------------------------------------------------------------------------


def test_rename_clean_file_defers_delete_until_copied(catalog: Catalog, changes: Changes) -> None:
    """A renamed file reads from its old key until copied; the old key's delete waits for it."""
    catalog.sync([obj("a", size=10, etag='"v1"')])
    a = at(catalog, "a")
    moved, replaced = changes.rename(ROOT, "a", ROOT, "b")
    assert replaced is None
    assert moved.ino == a.ino and moved.name == "b"
    assert (moved.key, moved.fetch_key, moved.cloud_key) == ("b", "a", "a")
    assert moved.base_etag is None and moved.dirty == CLEAN
    assert node_at(catalog, "a") is None and at(catalog, "b") == moved
    assert pending(catalog) == {"a": '"v1"'}
    work = changes.work(10)
    assert work.deletes == []  # a is still read by b
    assert [node.ino for node in work.copies] == [a.ino]

    changes.finish_copy(work.copies[0], obj("b", size=10, etag='"v2"'))
    done = fresh(catalog, a)
    assert (done.fetch_key, done.etag, done.base_etag, done.key) == (None, '"v2"', '"v2"', "b")
    work = changes.work(10)
    assert work.copies == []
    assert work.deletes == [("a", '"v1"')]


def test_rename_of_local_file_has_no_copy(catalog: Catalog, changes: Changes) -> None:
    """Renaming a file not yet uploaded moves its key only: no copy, no delete."""
    node = write_file(changes, ROOT, "a")
    moved, _ = changes.rename(ROOT, "a", ROOT, "b")
    assert (moved.key, moved.fetch_key, moved.dirty, moved.staged) == (
        "b",
        None,
        READY,
        node.staged,
    )
    work = changes.work(10)
    assert ([n.key for n in work.uploads], work.copies, work.deletes) == (["b"], [], [])


def test_rename_over_file_replaces_its_version(catalog: Catalog, changes: Changes) -> None:
    """Renaming onto a file replaces it: its delete is queued and the move replaces that version."""
    catalog.sync([obj("a", etag='"va"'), obj("b", etag='"vb"')])
    b = at(catalog, "b")
    moved, replaced = changes.rename(ROOT, "a", ROOT, "b")
    assert replaced is not None and replaced.ino == b.ino
    assert catalog.get(b.ino) is None
    assert (moved.key, moved.fetch_key, moved.base_etag) == ("b", "a", '"vb"')
    assert pending(catalog) == {"a": '"va"', "b": '"vb"'}
    # b is about to be replaced by the copy; a is still read.
    assert changes.work(10).deletes == [("b", '"vb"')]
    assert changes.claim_delete("b", '"vb"') is False


def test_rename_local_file_over_listed_file(catalog: Catalog, changes: Changes) -> None:
    """A new file moved over an uploaded one uploads as a replacement of that version."""
    catalog.sync([obj("t", etag='"vt"')])
    write_file(changes, ROOT, "new")
    moved, replaced = changes.rename(ROOT, "new", ROOT, "t")
    assert replaced is not None and replaced.key == "t"
    assert (moved.key, moved.base_etag, moved.fetch_key, moved.dirty) == ("t", '"vt"', None, READY)


def test_rename_noreplace_onto_existing_is_eexist(catalog: Catalog, changes: Changes) -> None:
    """RENAME_NOREPLACE never replaces an existing name."""
    catalog.sync([obj("a", etag='"va"'), obj("b", etag='"vb"')])
    check_errno(errno.EEXIST, changes.rename, ROOT, "a", ROOT, "b", RENAME_NOREPLACE)
    assert at(catalog, "b").etag == '"vb"' and at(catalog, "a").key == "a"
    assert pending(catalog) == {}
    moved, _ = changes.rename(ROOT, "a", ROOT, "c", RENAME_NOREPLACE)
    assert moved.key == "c"


def test_rename_exchange_is_einval(catalog: Catalog, changes: Changes) -> None:
    """RENAME_EXCHANGE is refused with EINVAL and nothing moves."""
    catalog.sync([obj("a"), obj("b")])
    check_errno(errno.EINVAL, changes.rename, ROOT, "a", ROOT, "b", RENAME_EXCHANGE)
    assert at(catalog, "a").key == "a" and at(catalog, "b").key == "b"


def test_rename_directory_into_itself_is_einval(catalog: Catalog, changes: Changes) -> None:
    """A directory cannot move into its own subtree; the refusal leaves the tree unchanged."""
    catalog.sync([obj("a/x")])
    a = at(catalog, "a")
    sub = changes.make_directory(a.ino, "sub", 0o755, UID, GID)
    check_errno(errno.EINVAL, changes.rename, ROOT, "a", sub.ino, "deeper")
    # Onto an empty directory inside itself: refused, and that directory is not lost.
    check_errno(errno.EINVAL, changes.rename, ROOT, "a", a.ino, "sub")
    assert at(catalog, "a/sub").ino == sub.ino
    assert at(catalog, "a/x").key == "a/x" and pending(catalog) == {}


def test_rename_directory_over_non_empty_is_enotempty(catalog: Catalog, changes: Changes) -> None:
    """A directory replaces only an empty directory."""
    catalog.sync([obj("a/x"), obj("b/y")])
    check_errno(errno.ENOTEMPTY, changes.rename, ROOT, "a", ROOT, "b")
    assert at(catalog, "b/y").key == "b/y" and at(catalog, "a/x").key == "a/x"
    changes.make_directory(ROOT, "empty", 0o755, UID, GID)
    moved, replaced = changes.rename(ROOT, "a", ROOT, "empty")
    assert replaced is not None and replaced.name == "empty"
    assert at(catalog, "empty/x").key == "empty/x"


def test_rename_between_file_and_directory(catalog: Catalog, changes: Changes) -> None:
    """A file cannot replace a directory (EISDIR), nor a directory a file (ENOTDIR)."""
    catalog.sync([obj("f"), obj("d/x")])
    changes.make_directory(ROOT, "e", 0o755, UID, GID)
    check_errno(errno.EISDIR, changes.rename, ROOT, "f", ROOT, "e")
    check_errno(errno.ENOTDIR, changes.rename, ROOT, "d", ROOT, "f")
    assert at(catalog, "f").key == "f" and pending(catalog) == {}


def test_rename_onto_itself_changes_nothing(catalog: Catalog, changes: Changes) -> None:
    """Renaming a name onto itself is a no-op with nothing queued."""
    catalog.sync([obj("a")])
    a = at(catalog, "a")
    moved, replaced = changes.rename(ROOT, "a", ROOT, "a")
    assert replaced is None and fresh(catalog, a) == a
    assert pending(catalog) == {} and changes.work(10).copies == []


def test_rename_directory_leaves_prefix_siblings(catalog: Catalog, changes: Changes) -> None:
    """Renaming 'a' re-keys exactly the keys under 'a/', not those of 'a.b', 'a-b' or 'ab'."""
    keys = ["a/x", "a/s/y", "a-b/z", "a.b/z", "ab/z", "a0"]
    catalog.sync(listing(obj(key) for key in keys))
    changes.rename(ROOT, "a", ROOT, "n")
    assert at(catalog, "n/x").key == "n/x" and at(catalog, "n/s/y").key == "n/s/y"
    for key in ("a-b/z", "a.b/z", "ab/z", "a0"):
        node = at(catalog, key)
        assert (node.key, node.fetch_key, node.local_at) == (key, None, 0)
    assert set(pending(catalog)) == {"a/x", "a/s/y"}


def test_rename_directory_with_marker(catalog: Catalog, changes: Changes) -> None:
    """A directory's marker object moves with it, copied and then deleted like a file."""
    catalog.sync([obj("d/", size=0, etag='"m"'), obj("d/f", etag='"f"')])
    d = at(catalog, "d")
    changes.rename(ROOT, "d", ROOT, "e")
    e = fresh(catalog, d)
    assert (e.name, e.key, e.fetch_key) == ("e", "e/", "d/")
    assert (at(catalog, "e/f").key, at(catalog, "e/f").fetch_key) == ("e/f", "d/f")
    assert pending(catalog) == {"d/": '"m"', "d/f": '"f"'}
    assert changes.work(10).deletes == []


def test_directory_rename_of_2000_files(catalog: Catalog, changes: Changes) -> None:
    """A directory of 2,000 listed files is renamed in one call; every key follows."""
    count = 2000
    keys = [f"study/s{i % 8}/img{i:05d}.dcm" for i in range(count)]
    catalog.sync(listing(obj(key, etag=f'"{i}"') for i, key in enumerate(keys)))
    started = time.monotonic()
    moved, replaced = changes.rename(ROOT, "study", ROOT, "archived")
    elapsed = time.monotonic() - started
    assert elapsed < 5.0  # a sanity bound only
    assert replaced is None and moved.name == "archived"
    db = catalog.connection()
    left = db.execute("SELECT count(*) FROM nodes WHERE key >= 'study/' AND key < 'study0'")
    assert left.fetchone()[0] == 0
    rows = db.execute(
        "SELECT key, fetch_key, local_at FROM nodes WHERE key >= 'archived/' AND key < 'archived0'"
    ).fetchall()
    assert len(rows) == count
    for key, fetch_key, local_at in rows:
        assert fetch_key == "study/" + key[len("archived/") :]
        assert local_at > 0
    for i in (0, 1, 777, count - 1):
        node = at(catalog, f"archived/s{i % 8}/img{i:05d}.dcm")
        assert (node.key, node.fetch_key, node.etag) == (
            f"archived/s{i % 8}/img{i:05d}.dcm",
            keys[i],
            f'"{i}"',
        )
    assert len(pending(catalog)) == count
    work = changes.work(10_000)
    assert work.deletes == [] and len(work.copies) == count


# -- finishing uploads, copies -----------------------------------------------------------------


def test_finish_upload_of_unchanged_node_is_clean(catalog: Catalog, changes: Changes) -> None:
    """An upload of the node as it still is makes it clean at the uploaded version."""
    node = write_file(changes, ROOT, "a", size=42)
    (uploading,) = changes.work(10).uploads
    done = changes.finish_upload(uploading, obj("a", size=42, etag='"up"'), False)
    assert done == (True, True)
    done = fresh(catalog, node)
    assert (done.dirty, done.staged, done.etag, done.base_etag) == (CLEAN, None, '"up"', '"up"')
    assert (done.size, done.storage_class, done.fetch_key) == (42, "STANDARD", None)
    assert changes.work(10).uploads == [] and changes.staged_names() == set()


def test_finish_upload_of_changed_node_stays_dirty(catalog: Catalog, changes: Changes) -> None:
    """A file written again during its upload stays dirty, its next upload replacing this one."""
    node = write_file(changes, ROOT, "a", size=42)
    (uploading,) = changes.work(10).uploads
    time.sleep(0.001)
    changes.record_write(node.ino, 50, 6_000, True, False)
    done = changes.finish_upload(uploading, obj("a", size=42, etag='"up"'), False)
    assert done == (False, False)
    now = fresh(catalog, node)
    assert (now.dirty, now.staged, now.base_etag, now.size) == (READY, "stage-a", '"up"', 50)
    assert [n.ino for n in changes.work(10).uploads] == [node.ino]


def test_finish_upload_with_new_staging_file(catalog: Catalog, changes: Changes) -> None:
    """When the file moved to another staging file meanwhile, the old one is no longer needed."""
    node = write_file(changes, ROOT, "a")
    (uploading,) = changes.work(10).uploads
    changes.stage(node.ino, "copy-on-write")
    assert changes.finish_upload(uploading, obj("a", etag='"up"'), False) == (False, True)
    now = fresh(catalog, node)
    assert (now.dirty, now.staged, now.base_etag) == (READY, "copy-on-write", '"up"')


def test_finish_upload_after_rename_deletes_upload(catalog: Catalog, changes: Changes) -> None:
    """An upload to a key the file has left is queued for delete; the file uploads again."""
    node = write_file(changes, ROOT, "a")
    (uploading,) = changes.work(10).uploads
    changes.rename(ROOT, "a", ROOT, "b")
    assert changes.finish_upload(uploading, obj("a", etag='"up"'), False) == (False, False)
    assert pending(catalog) == {"a": '"up"'}
    now = fresh(catalog, node)
    assert (now.key, now.dirty, now.base_etag, now.etag) == ("b", READY, None, None)
    assert [n.key for n in changes.work(10).uploads] == ["b"]


def test_finish_upload_after_rename_to_reused_key(catalog: Catalog, changes: Changes) -> None:
    """An upload to a key another new file now holds is replaced by that file, not deleted."""
    write_file(changes, ROOT, "a")
    (uploading,) = changes.work(10).uploads
    changes.rename(ROOT, "a", ROOT, "b")
    other = write_file(changes, ROOT, "a")
    changes.finish_upload(uploading, obj("a", etag='"up"'), False)
    assert pending(catalog) == {}
    assert fresh(catalog, other).base_etag == '"up"'


def test_finish_upload_after_unlink_deletes_upload(catalog: Catalog, changes: Changes) -> None:
    """An upload of a file removed meanwhile is deleted again, and its staging file freed."""
    write_file(changes, ROOT, "a")
    (uploading,) = changes.work(10).uploads
    changes.unlink(ROOT, "a")
    assert changes.finish_upload(uploading, obj("a", etag='"up"'), False) == (False, True)
    assert changes.work(10).deletes == [("a", '"up"')]


def test_finish_upload_keeping_staging_file_then_unstage(
    catalog: Catalog, changes: Changes
) -> None:
    """An upload of a file still open leaves it clean on its staging file until unstaged."""
    node = write_file(changes, ROOT, "a", size=42)
    (uploading,) = changes.work(10).uploads
    done = changes.finish_upload(uploading, obj("a", size=42, etag='"up"'), True)
    assert done == (True, False)
    kept = fresh(catalog, node)
    assert (kept.dirty, kept.staged, kept.etag, kept.base_etag) == (
        CLEAN,
        "stage-a",
        '"up"',
        '"up"',
    )
    assert changes.work(10).uploads == [] and changes.staged_names() == {"stage-a"}
    assert changes.unstage(node.ino, "other-name") is False
    assert changes.unstage(node.ino, "stage-a") is True
    assert fresh(catalog, node).staged is None
    assert changes.unstage(node.ino, "stage-a") is False


def test_unstage_refused_after_new_write(catalog: Catalog, changes: Changes) -> None:
    """A kept staging file written again after its upload is not dropped for the cloud copy."""
    node = write_file(changes, ROOT, "a", size=42)
    (uploading,) = changes.work(10).uploads
    changes.finish_upload(uploading, obj("a", size=42, etag='"up"'), True)
    changes.record_write(node.ino, 50, 6_000, True, False)
    assert changes.unstage(node.ino, "stage-a") is False
    now = fresh(catalog, node)
    assert (now.dirty, now.staged, now.size) == (READY, "stage-a", 50)


def test_set_attributes_on_clean_kept_file_reaches_cloud(
    catalog: Catalog, changes: Changes
) -> None:
    """chmod of a clean file whose staging file is still open is still sent to the cloud."""
    node = write_file(changes, ROOT, "a", size=42)
    (uploading,) = changes.work(10).uploads
    changes.finish_upload(uploading, obj("a", size=42, etag='"up"'), True)
    changes.set_attributes(node.ino, mode=0o600)
    assert changes.unstage(node.ino, "stage-a") is True  # the last writer closes
    now = fresh(catalog, node)
    assert now.mode == 0o600 and now.dirty == CLEAN
    assert now.fetch_key == "a"
    assert [n.ino for n in changes.work(10).copies] == [node.ino]


def test_finish_copy_after_second_rename(catalog: Catalog, changes: Changes) -> None:
    """A copy to a key the file has left again is deleted; the file still reads its source."""
    catalog.sync([obj("a", etag='"va"')])
    changes.rename(ROOT, "a", ROOT, "b")
    (copying,) = changes.work(10).copies
    changes.rename(ROOT, "b", ROOT, "c")
    changes.finish_copy(copying, obj("b", etag='"vb"'))
    c = at(catalog, "c")
    assert (c.key, c.fetch_key, c.etag) == ("c", "a", '"va"')
    assert pending(catalog) == {"a": '"va"', "b": '"vb"'}
    assert changes.work(10).deletes == [("b", '"vb"')]


def test_finish_copy_keeps_metadata_changed_during_copy(catalog: Catalog, changes: Changes) -> None:
    """A chmod made while a metadata copy runs is copied again afterwards."""
    catalog.sync([obj("a", etag='"v1"')])
    a = at(catalog, "a")
    changes.set_attributes(a.ino, mode=0o600)
    (copying,) = changes.work(10).copies
    time.sleep(0.001)
    changes.set_attributes(a.ino, mode=0o640)  # while the copy with mode 0o600 runs
    changes.finish_copy(copying, obj("a", etag='"v2"'))
    now = fresh(catalog, a)
    assert now.mode == 0o640
    assert now.fetch_key == "a"  # another copy must carry mode 0o640
    assert [n.ino for n in changes.work(10).copies] == [a.ino]


# -- attributes --------------------------------------------------------------------------------


def test_set_attributes_on_clean_file_queues_metadata_copy(
    catalog: Catalog, changes: Changes
) -> None:
    """chmod of an uploaded file is a server-side copy onto itself."""
    catalog.sync([obj("a", etag='"v1"')])
    a = at(catalog, "a")
    node = changes.set_attributes(a.ino, mode=0o600, uid=7, gid=8, mtime_ns=123)
    assert (node.mode, node.uid, node.gid, node.mtime_ns) == (0o600, 7, 8, 123)
    assert (node.key, node.fetch_key, node.dirty) == ("a", "a", CLEAN)
    assert [n.ino for n in changes.work(10).copies] == [a.ino]
    assert changes.backlog().copies == 1
    # The copy onto itself does not free the key for a delete.
    assert pending(catalog) == {}
    node = changes.set_attributes(a.ino, gid=9)
    assert (node.mode, node.uid, node.gid) == (0o600, 7, 9)  # None leaves a field alone


def test_set_attributes_on_staged_file_needs_no_copy(catalog: Catalog, changes: Changes) -> None:
    """A file waiting for its upload carries its new attributes in that upload."""
    catalog.sync([obj("a", etag='"v1"')])
    a = at(catalog, "a")
    changes.stage(a.ino, "s")
    changes.record_write(a.ino, 10, 2_000, True, False)
    node = changes.set_attributes(a.ino, mode=0o600)
    assert node.mode == 0o600 and node.fetch_key is None
    assert changes.work(10).copies == []
    fresh_file = write_file(changes, ROOT, "new")
    assert changes.set_attributes(fresh_file.ino, mode=0o600).fetch_key is None


def test_set_attributes_on_directory_or_missing(catalog: Catalog, changes: Changes) -> None:
    """Directories get attributes without cloud work; a missing inode is ENOENT."""
    d = changes.make_directory(ROOT, "d", 0o755, UID, GID)
    assert changes.set_attributes(d.ino, mode=0o700).mode == 0o700
    assert changes.work(10).copies == []
    check_errno(errno.ENOENT, changes.set_attributes, 10**6, 0o600)


# -- conflicts and crash recovery --------------------------------------------------------------


def test_divert_gives_conflict_name_next_to_original(catalog: Catalog, changes: Changes) -> None:
    """A conflicting file is renamed '<name>.conflict-...' beside the original, as a new key."""
    catalog.sync([obj("d/f.dcm", etag='"seen"')])
    d = at(catalog, "d")
    changes.unlink(d.ino, "f.dcm")
    node = write_file(changes, d.ino, "f.dcm")  # to replace "seen", which another writer changed
    assert node.base_etag == '"seen"'
    diverted = changes.divert(node.ino)
    assert diverted.ino == node.ino and diverted.parent == d.ino
    assert diverted.name.startswith("f.dcm.conflict-")
    assert diverted.key == f"d/{diverted.name}"
    assert diverted.base_etag is None
    assert (diverted.dirty, diverted.staged) == (READY, node.staged)
    assert node_at(catalog, "d/f.dcm") is None
    assert at(catalog, f"d/{diverted.name}") == diverted
    assert [n.key for n in changes.work(10).uploads] == [diverted.key]
    check_errno(errno.ENOENT, changes.divert, 10**6)


def test_divert_name_fits_name_max(catalog: Catalog, changes: Changes) -> None:
    """A conflict name is still a valid name (at most NAME_MAX bytes)."""
    name = "x" * 250
    node = write_file(changes, ROOT, name)
    diverted = changes.divert(node.ino)
    assert diverted.name != name
    assert len(diverted.name.encode("utf-8")) <= NAME_MAX
    assert diverted.key is not None and key_problem(diverted.key) is None


def test_recover_reverts_or_removes_unfinished_writes(catalog: Catalog, changes: Changes) -> None:
    """After a crash, writes never made durable are dropped: back to the cloud version, or gone."""
    catalog.sync([obj("cloud", size=10, etag='"v1"'), obj("gone", etag='"vg"')])
    cloud = at(catalog, "cloud")
    changes.stage(cloud.ino, "s-cloud")  # opened for writing
    never = write_file(changes, ROOT, "never", ready=False)
    ready = write_file(changes, ROOT, "ready", ready=True)
    changes.unlink(ROOT, "gone")
    over = write_file(changes, ROOT, "gone", ready=False)  # over a pending delete

    reverted, removed = changes.recover()
    assert [n.ino for n in reverted] == [cloud.ino]
    assert {n.ino for n in removed} == {never.ino, over.ino}
    assert {n.staged for n in removed} == {"stage-never", "stage-gone"}

    back = fresh(catalog, cloud)
    assert (back.dirty, back.staged, back.etag, back.key) == (CLEAN, None, '"v1"', "cloud")
    assert catalog.get(never.ino) is None and catalog.get(over.ino) is None
    assert fresh(catalog, ready) == ready
    # The version deleted before the crash still goes; the never-stored file leaves no work.
    assert pending(catalog) == {"gone": '"vg"'}
    assert changes.staged_names() == {"stage-ready"}
    assert changes.recover() == ([], [])


def test_recover_keeps_durable_file_reopened_for_writing(
    catalog: Catalog, changes: Changes
) -> None:
    """A file fsync'd before it was re-opened for writing survives a crash during that write."""
    node = write_file(changes, ROOT, "a", size=10)
    changes.record_write(node.ino, 10, 5_000, True, True)  # fsync: durable
    changes.stage(node.ino, "copy-on-write")  # re-opened while its upload ran
    changes.recover()
    assert catalog.get(node.ino) is not None


# -- relists and local changes -----------------------------------------------------------------


def test_sync_keeps_ready_node_missing_from_listing(catalog: Catalog, changes: Changes) -> None:
    """A file waiting for its upload is not removed by a listing that lacks it."""
    catalog.sync([obj("d/old")])
    node = write_file(changes, at(catalog, "d").ino, "new")
    time.sleep(0.001)
    report = catalog.sync([obj("d/old")])
    assert report.removed == 0
    assert fresh(catalog, node).dirty == READY
    report = catalog.sync([])  # the last listed file goes; the directory stays for "new"
    assert report.removed == 1 and node_at(catalog, "d/old") is None
    assert at(catalog, "d/new").ino == node.ino


def test_sync_keeps_directory_made_through_mount(catalog: Catalog, changes: Changes) -> None:
    """An empty directory made through the mount survives relists (it has no object)."""
    d = changes.make_directory(ROOT, "d", 0o755, UID, GID)
    catalog.sync([obj("x")])
    catalog.sync([])
    assert at(catalog, "d").ino == d.ino


def test_sync_does_not_bring_back_pending_delete(catalog: Catalog, changes: Changes) -> None:
    """A key deleted through the mount is not re-added while its delete is pending."""
    catalog.sync([obj("a"), obj("d/b")])
    changes.unlink(ROOT, "a")
    changes.unlink(at(catalog, "d").ino, "b")
    report = catalog.sync([obj("a"), obj("d/b")])
    assert report.added == 0
    assert node_at(catalog, "a") is None and node_at(catalog, "d/b") is None


def test_sync_purges_tombstone_after_later_sync(catalog: Catalog, changes: Changes) -> None:
    """A finished delete is forgotten by the first relist that started after it."""
    catalog.sync([obj("a")])
    changes.unlink(ROOT, "a")
    changes.finish_delete("a", '"e1"')
    ((key, done_at),) = tombstones(catalog)
    assert key == "a" and done_at is not None
    time.sleep(0.01)
    catalog.sync([])
    assert tombstones(catalog) == []
    # With the tombstone gone, a listing showing the key again (a new object) adds it.
    catalog.sync([obj("a", etag='"new"')])
    assert at(catalog, "a").etag == '"new"'


def test_sync_keeps_tombstone_finished_after_its_start(catalog: Catalog, changes: Changes) -> None:
    """A delete finished after a relist started keeps its key out, and its tombstone stays."""
    catalog.sync([obj("a")])
    changes.unlink(ROOT, "a")
    changes.finish_delete("a", '"e1"')
    later = time.time() + 60  # as if the delete finished while this relist ran
    catalog.connection().execute("UPDATE deletes SET done_at=?", (later,))
    report = catalog.sync([obj("a")])
    assert report.added == 0 and node_at(catalog, "a") is None
    assert tombstones(catalog) == [("a", later)]


def test_sync_keeps_renamed_node_before_its_copy(catalog: Catalog, changes: Changes) -> None:
    """A renamed file whose copy has not run stays although the listing lacks its new key."""
    catalog.sync([obj("a", etag='"va"'), obj("z")])
    a = at(catalog, "a")
    changes.rename(ROOT, "a", ROOT, "b")
    time.sleep(0.001)
    report = catalog.sync([obj("a", etag='"va"'), obj("z")])
    assert (report.added, report.removed) == (0, 0)
    b = at(catalog, "b")
    assert (b.ino, b.key, b.fetch_key) == (a.ino, "b", "a")
    assert node_at(catalog, "a") is None


def test_sync_keeps_local_mtime_of_same_version(catalog: Catalog, changes: Changes) -> None:
    """A file's mtime set through the mount survives a listing of the same version."""
    catalog.sync([obj("a", size=10, etag='"v1"', mtime_ns=1_000)])
    a = at(catalog, "a")
    changes.set_attributes(a.ino, mtime_ns=123_000)
    (copying,) = changes.work(10).copies
    changes.finish_copy(copying, obj("a", size=10, etag='"v2"', mtime_ns=9_999_000))
    time.sleep(0.001)
    report = catalog.sync([obj("a", size=10, etag='"v2"', mtime_ns=9_999_000)])
    assert report.changed == 0
    now = fresh(catalog, a)
    assert (now.mtime_ns, now.etag) == (123_000, '"v2"')
    # Another writer's version brings its own mtime.
    report = catalog.sync([obj("a", size=11, etag='"v3"', mtime_ns=7_000)])
    assert report.changed == 1
    now = fresh(catalog, a)
    assert (now.mtime_ns, now.etag, now.size, now.base_etag) == (7_000, '"v3"', 11, '"v3"')


def test_sync_removes_clean_untouched_vanished_node(catalog: Catalog, changes: Changes) -> None:
    """A clean file nobody touched through the mount goes when its object leaves the listing."""
    catalog.sync([obj("a"), obj("d/b"), obj("keep")])
    a = at(catalog, "a")
    report = catalog.sync([obj("keep")])
    assert report.removed == 2
    assert catalog.get(a.ino) is None and node_at(catalog, "d") is None
    assert at(catalog, "keep").key == "keep"


def test_sync_keeps_file_uploaded_while_it_runs(catalog: Catalog, changes: Changes) -> None:
    """A file whose upload finishes during a relist is not removed by that relist."""
    catalog.sync([obj("a"), obj("z")])
    node = write_file(changes, ROOT, "m")
    (uploading,) = changes.work(10).uploads
    time.sleep(0.001)

    def pages() -> Iterator[ObjectInfo]:
        page = [obj("a"), obj("z")]  # one page, read before "m" reached the bucket
        yield page[0]
        # The upload finishes while the relist reads its listing.
        changes.finish_upload(uploading, obj("m", etag='"up"'), False)
        yield page[1]

    catalog.sync(pages())
    assert catalog.get(node.ino) is not None
