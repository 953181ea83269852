"""The SQLite catalog: tree building, incremental syncs, inode stability and hostile keys."""

from __future__ import annotations

import errno
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_unit import listing, node_at, obj

from cloudfs.catalog import NAME_MAX, ROOT, Catalog, Listed, key_problem
from cloudfs.errors import DiskFull, Unavailable
from cloudfs.store import ObjectInfo


def all_children(catalog: Catalog, parent: int, limit: int = 1000) -> list[Listed]:
    """Every entry of a directory, read in pages as readdir does."""
    found: list[Listed] = []
    after = 0
    while True:
        page = catalog.children(parent, after, limit)
        if not page:
            return found
        assert len(page) <= limit
        found.extend(page)
        after = page[-1].ino


def names(catalog: Catalog, path: str | None = None) -> set[str]:
    """The names in the directory at ``path`` (the root when None)."""
    if path is None:
        return {node.name for node in all_children(catalog, ROOT)}
    directory = node_at(catalog, path)
    assert directory is not None and directory.is_dir, path
    return {node.name for node in all_children(catalog, directory.ino)}


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return Catalog(tmp_path / "catalog.db")


BASE = [
    obj("a.txt", size=1),
    obj("dir1/b.txt", size=2),
    obj("dir1/sub/c.txt", size=3),
    obj("dir1/sub/deeper/d.txt", size=4),
    obj("empty/", size=0),
    obj("marked/", size=0),
    obj("marked/m.txt", size=5),
    obj("only/child.txt", size=6),
]


def test_sync_builds_tree(catalog: Catalog) -> None:
    """Files, implicit directories and 'dir/' markers become the right nodes."""
    report = catalog.sync(listing(BASE))
    assert report.added == len(BASE)
    assert (report.changed, report.removed, report.rejected) == (0, 0, 0)

    assert names(catalog) == {"a.txt", "dir1", "empty", "marked", "only"}
    assert names(catalog, "dir1") == {"b.txt", "sub"}
    assert names(catalog, "dir1/sub") == {"c.txt", "deeper"}
    assert names(catalog, "dir1/sub/deeper") == {"d.txt"}
    assert names(catalog, "empty") == set()

    root = catalog.get(ROOT)
    assert root is not None and root.is_dir

    a = node_at(catalog, "a.txt")
    assert a is not None and not a.is_dir
    assert (a.key, a.size, a.etag, a.parent) == ("a.txt", 1, '"e1"', ROOT)

    dir1 = node_at(catalog, "dir1")
    assert dir1 is not None and dir1.is_dir and dir1.key is None  # implicit
    empty = node_at(catalog, "empty")
    assert empty is not None and empty.is_dir and empty.key == "empty/"
    marked = node_at(catalog, "marked")
    assert marked is not None and marked.is_dir and marked.key == "marked/"

    d = node_at(catalog, "dir1/sub/deeper/d.txt")
    assert d is not None and d.size == 4 and d.key == "dir1/sub/deeper/d.txt"
    assert catalog.get(d.ino) == d
    assert catalog.by_key("dir1/sub/deeper/d.txt") == d
    assert catalog.lookup(ROOT, "missing") is None
    assert catalog.get(10**9) is None

    counts = catalog.counts()
    assert counts["files"] == 6
    assert counts["bytes"] == 1 + 2 + 3 + 4 + 5 + 6
    # root, dir1, sub, deeper, empty, marked, only
    assert counts["directories"] == 7
    assert counts["rejected_keys"] == 0


def test_root_is_not_its_own_child(catalog: Catalog) -> None:
    """The root (parent 0) never appears in a listing of itself."""
    catalog.sync(listing(BASE))
    assert ROOT not in {node.ino for node in all_children(catalog, ROOT)}


def test_readdir_paging_returns_every_entry_once(catalog: Catalog) -> None:
    """Paging a 2,500-entry directory by inode yields each name exactly once, in inode order."""
    expected = {f"f{i:05d}.dcm" for i in range(2500)}
    catalog.sync(listing(obj(f"big/{name}") for name in expected))
    big = node_at(catalog, "big")
    assert big is not None
    for limit in (7, 100, 1000, 5000):
        seen = [node.name for node in all_children(catalog, big.ino, limit)]
        assert len(seen) == len(expected)
        assert set(seen) == expected
    inos = [node.ino for node in all_children(catalog, big.ino, 100)]
    assert inos == sorted(inos)


def test_readdir_offsets_survive_changes(catalog: Catalog) -> None:
    """Deleting entries between pages neither repeats nor skips the remaining ones."""
    keys = [f"d/f{i:04d}" for i in range(300)]
    catalog.sync(listing(obj(key) for key in keys))
    d = node_at(catalog, "d")
    assert d is not None
    first = catalog.children(d.ino, 0, 100)
    seen = [node.name for node in first]
    deleted = {f"f{i:04d}" for i in range(0, 300, 3)}
    catalog.sync(listing(obj(key) for key in keys if key.split("/")[1] not in deleted))
    after = first[-1].ino
    while page := catalog.children(d.ino, after, 100):
        seen.extend(node.name for node in page)
        after = page[-1].ino
    assert len(seen) == len(set(seen))
    survivors = {f"f{i:04d}" for i in range(300)} - deleted
    assert survivors <= set(seen)
    assert set(seen[100:]).isdisjoint(deleted)


def test_second_sync_reports_and_applies_changes(catalog: Catalog) -> None:
    """Added, changed (etag or size) and deleted objects are counted and reflected in the tree."""
    catalog.sync(listing(BASE))
    before = {key: node_at(catalog, key) for key in ("a.txt", "dir1/b.txt", "marked")}
    changed = [
        obj("a.txt", size=1, etag='"e2"'),  # new etag
        obj("dir1/b.txt", size=20),  # new size
        obj("dir1/sub/c.txt", size=3),
        # dir1/sub/deeper/d.txt deleted: "deeper" is implicit and now empty
        obj("empty/", size=0),
        obj("marked/", size=0),
        # marked/m.txt deleted: "marked" has a marker and stays
        # only/child.txt deleted: "only" is implicit and goes
        obj("new/x.txt", size=7),
        obj("z.txt", size=8),
    ]
    report = catalog.sync(listing(changed))
    assert (report.added, report.changed, report.removed) == (2, 2, 3)

    assert names(catalog) == {"a.txt", "dir1", "empty", "marked", "new", "z.txt"}
    assert names(catalog, "dir1/sub") == {"c.txt"}
    assert node_at(catalog, "dir1/sub/deeper") is None
    assert node_at(catalog, "only") is None
    assert names(catalog, "marked") == set()
    assert names(catalog, "empty") == set()

    a = node_at(catalog, "a.txt")
    b = node_at(catalog, "dir1/b.txt")
    assert a is not None and a.etag == '"e2"'
    assert b is not None and b.size == 20
    # Changed objects keep their inode; the marker directory too.
    for key, old in before.items():
        now = node_at(catalog, key)
        assert old is not None and now is not None and now.ino == old.ino, key

    again = catalog.sync(listing(changed))
    assert (again.added, again.changed, again.removed) == (0, 0, 0)


def test_mtime_or_storage_class_change_is_a_change(catalog: Catalog) -> None:
    """Any listed attribute that differs is written; identical listings write nothing."""
    catalog.sync([obj("f", mtime_ns=1)])
    report = catalog.sync([obj("f", mtime_ns=2)])
    assert report.changed == 1
    node = node_at(catalog, "f")
    assert node is not None and node.mtime_ns == 2
    report = catalog.sync([ObjectInfo("f", 10, 2, '"e1"', storage_class="GLACIER")])
    assert report.changed == 1
    node = node_at(catalog, "f")
    assert node is not None and node.storage_class == "GLACIER"


def test_relist_of_unchanged_marker_writes_nothing(catalog: Catalog) -> None:
    """A 'dir/' marker listed again with the same etag, size and mtime is not a change."""
    marker = ObjectInfo("m/", 0, 5, '"d41d8cd98f00b204e9800998ecf8427e"')
    assert catalog.sync([marker]).added == 1
    report = catalog.sync([marker])
    assert (report.added, report.changed, report.removed) == (0, 0, 0)
    m = node_at(catalog, "m")
    assert m is not None and m.is_dir and m.key == "m/"


def test_removing_a_marker_keeps_a_populated_directory(catalog: Catalog) -> None:
    """A 'dir/' marker going away leaves the directory while it has children."""
    catalog.sync(listing([obj("m/", size=0), obj("m/f")]))
    m = node_at(catalog, "m")
    assert m is not None and m.key == "m/"
    report = catalog.sync([obj("m/f")])
    assert report.removed == 1
    m2 = node_at(catalog, "m")
    assert m2 is not None and m2.is_dir and m2.key is None and m2.ino == m.ino
    assert names(catalog, "m") == {"f"}
    catalog.sync([])
    assert node_at(catalog, "m") is None
    assert names(catalog) == set()


def test_inodes_stable_and_never_reused(catalog: Catalog) -> None:
    """Unchanged entries keep their inode; a deleted and re-added key gets a new, higher one."""
    keys = [f"d{d}/f{i}" for d in range(3) for i in range(5)]
    catalog.sync(listing(obj(key) for key in keys))
    first = {key: node_at(catalog, key) for key in keys}
    highest = max(node.ino for node in first.values() if node is not None)

    catalog.sync(listing(obj(key) for key in keys if key != "d1/f2" and not key.startswith("d2")))
    catalog.sync(listing(obj(key) for key in keys))
    for key in keys:
        now = node_at(catalog, key)
        old = first[key]
        assert now is not None and old is not None
        if key == "d1/f2" or key.startswith("d2"):
            assert now.ino > highest, key
        else:
            assert now.ino == old.ino, key
    all_inos = [node.ino for node in all_children(catalog, ROOT)]
    for d in ("d0", "d1", "d2"):
        parent = node_at(catalog, d)
        assert parent is not None
        all_inos.extend(node.ino for node in all_children(catalog, parent.ino))
    assert len(all_inos) == len(set(all_inos))


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("/lead", "empty path segment"),
        ("a//b", "empty path segment"),
        ("./x", "'.' path segment"),
        ("../y", "'..' path segment"),
        ("d/../e", "'..' path segment"),
        ("d/./e", "'.' path segment"),
        ("a\0b", "NUL"),
        ("n" * (NAME_MAX + 1), "longer than 255 bytes"),
        ("dir/" + "é" * 128, "longer than 255 bytes"),  # 256 bytes in UTF-8
        ("", "empty path segment"),
        ("/", "empty path segment"),
        ("x//", "empty path segment"),
    ],
)
def test_key_problem_reasons(key: str, reason: str) -> None:
    """Keys that cannot be paths are named with the reason."""
    problem = key_problem(key)
    assert problem is not None
    assert reason in problem


@pytest.mark.parametrize(
    "key", ["a", "a/b", "dir/", "a.b/c..d", "...", "n" * NAME_MAX, "é" * 127, "ünï/cødé.dcm"]
)
def test_key_problem_accepts_paths(key: str) -> None:
    """Ordinary keys, markers, dotted names and 255-byte names are fine."""
    assert key_problem(key) is None


def test_hostile_keys_rejected_and_recorded(catalog: Catalog) -> None:
    """Hostile keys are kept out of the tree and listed in rejected() with their reasons."""
    hostile = ["/lead", "a//b", "./x", "../y", "d/../e", "n" * 256, "nul\0key"]
    report = catalog.sync(listing([obj(key) for key in hostile] + [obj("ok/file")]))
    assert report.rejected == len(hostile)
    assert report.added == 1
    assert names(catalog) == {"ok"}
    assert node_at(catalog, "d") is None and node_at(catalog, "a") is None
    recorded = dict(catalog.rejected(limit=100))
    assert set(recorded) == set(hostile)
    for key, reason in recorded.items():
        assert reason == key_problem(key)
    assert catalog.counts()["rejected_keys"] == len(hostile)
    assert catalog.counts()["files"] == 1
    # A relist records them again (not twice) and adds nothing.
    again = catalog.sync(listing([obj(key) for key in hostile] + [obj("ok/file")]))
    assert again.rejected == len(hostile) and again.added == 0
    assert len(catalog.rejected(limit=100)) == len(hostile)
    # Once gone from the store, they are no longer reported.
    catalog.sync([obj("ok/file")])
    assert catalog.rejected() == []


def test_key_that_is_also_a_prefix(catalog: Catalog) -> None:
    """With 'f' and 'f/g' both present, f is a directory holding g and the file is rejected."""
    report = catalog.sync(listing([obj("f", size=99), obj("f/g", size=1)]))
    assert report.rejected == 1
    f = node_at(catalog, "f")
    assert f is not None and f.is_dir
    assert names(catalog, "f") == {"g"}
    assert [key for key, _ in catalog.rejected()] == ["f"]
    assert catalog.by_key("f") is None
    assert catalog.counts()["files"] == 1
    # Stable across relists.
    again = catalog.sync(listing([obj("f", size=99), obj("f/g", size=1)]))
    assert again.added == 0 and again.removed == 0 and again.rejected == 1
    f2 = node_at(catalog, "f")
    assert f2 is not None and f2.is_dir and f2.ino == f.ino
    # When the prefix goes away, the file can appear.
    catalog.sync([obj("f", size=99)])
    f3 = node_at(catalog, "f")
    assert f3 is not None and not f3.is_dir and f3.size == 99
    assert catalog.rejected() == []


def test_file_becomes_directory_on_a_later_sync(catalog: Catalog) -> None:
    """A file that later gains keys below it turns into a directory; the file is rejected."""
    catalog.sync([obj("f")])
    catalog.sync(listing([obj("f"), obj("f/g")]))
    f = node_at(catalog, "f")
    assert f is not None and f.is_dir
    assert names(catalog, "f") == {"g"}
    assert [key for key, _ in catalog.rejected()] == ["f"]


def test_marker_and_file_of_the_same_name(catalog: Catalog) -> None:
    """'d' and the marker 'd/' together show the directory; the file is rejected."""
    catalog.sync(listing([obj("d"), obj("d/", size=0)]))
    d = node_at(catalog, "d")
    assert d is not None and d.is_dir and d.key == "d/"
    assert [key for key, _ in catalog.rejected()] == ["d"]


def test_refresh_object_leaves_a_change_newer_than_its_head(catalog: Catalog) -> None:
    """A HEAD sent before an upload through the mount finished may answer for the old state
    (gone, or the previous version): applied after that upload, it must not undo it."""
    catalog.sync(listing(BASE))
    asked = time.time_ns()
    uploaded = asked + 1_000_000  # the upload finished while the HEAD was out
    catalog.connection().execute("UPDATE nodes SET local_at=? WHERE key='a.txt'", (uploaded,))
    before = node_at(catalog, "a.txt")
    catalog.refresh_object(None, "a.txt", asked)
    catalog.refresh_object(obj("a.txt", size=99, etag='"old"'), "a.txt", asked)
    assert node_at(catalog, "a.txt") == before
    catalog.refresh_object(None, "a.txt", uploaded + 1)  # a HEAD sent after it: applied
    assert node_at(catalog, "a.txt") is None


def test_refresh_object_add_update_remove(catalog: Catalog) -> None:
    """One object's state from a HEAD is applied without a relist."""
    catalog.sync(listing(BASE))
    catalog.refresh_object(obj("fresh/deep/new.bin", size=42), "fresh/deep/new.bin")
    new = node_at(catalog, "fresh/deep/new.bin")
    assert new is not None and new.size == 42

    catalog.refresh_object(obj("fresh/deep/new.bin", size=43, etag='"e9"'), "fresh/deep/new.bin")
    updated = node_at(catalog, "fresh/deep/new.bin")
    assert updated is not None
    assert (updated.size, updated.etag, updated.ino) == (43, '"e9"', new.ino)

    catalog.refresh_object(None, "fresh/deep/new.bin")
    assert catalog.by_key("fresh/deep/new.bin") is None
    assert node_at(catalog, "fresh") is None  # implicit parents pruned

    catalog.refresh_object(None, "never/existed")  # a no-op, not an error
    assert names(catalog) == {"a.txt", "dir1", "empty", "marked", "only"}


def test_catalog_persists_across_reopen(tmp_path: Path) -> None:
    """A reopened catalog file has the same tree and inodes, and a relist writes nothing."""
    path = tmp_path / "catalog.db"
    first = Catalog(path)
    first.sync(listing(BASE))
    first.set_meta("marker", "kept")
    inos = {key: node.ino for key in ("a.txt", "dir1/sub/c.txt") if (node := node_at(first, key))}
    del first

    reopened = Catalog(path)
    assert reopened.get_meta("marker") == "kept"
    assert reopened.get_meta("synced_at") is not None
    assert reopened.get_meta("nothing") is None
    for key, ino in inos.items():
        node = node_at(reopened, key)
        assert node is not None and node.ino == ino
    report = reopened.sync(listing(BASE))
    assert (report.added, report.changed, report.removed) == (0, 0, 0)


def test_sync_100k_objects_in_10_directories(catalog: Catalog) -> None:
    """A large listing lands completely: 10 directories of 10,000 files each."""
    report = catalog.sync(
        ObjectInfo(f"series{d}/img{i:05d}.dcm", i, 1, '"e"')
        for d in range(10)
        for i in range(10_000)
    )
    assert report.added == 100_000
    counts = catalog.counts()
    assert counts["files"] == 100_000
    assert counts["directories"] == 11
    assert len(all_children(catalog, ROOT)) == 10
    series = node_at(catalog, "series7")
    assert series is not None
    assert len(all_children(catalog, series.ino)) == 10_000


def test_children_pages_over_100k_entry_directory(catalog: Catalog) -> None:
    """Paging a directory of 100,000 entries returns every name exactly once."""
    expected = [f"img{i:06d}.dcm" for i in range(100_000)]
    catalog.sync(ObjectInfo(f"big/{name}", 1, 1, '"e"') for name in expected)
    big = node_at(catalog, "big")
    assert big is not None
    seen = [node.name for node in all_children(catalog, big.ino, 1000)]
    assert len(seen) == 100_000
    assert set(seen) == set(expected)


def cataloged_keys(catalog: Catalog) -> set[str]:
    return {node.key for node in catalog.select("key IS NOT NULL") if node.key is not None}


def test_interrupted_first_listing_goes_on_after_its_last_batch(
    catalog: Catalog, tmp_path: Path
) -> None:
    """A first listing that fails part way keeps the batches it finished and where they end;
    the next attempt lists only what comes after, and the catalog ends as one whole listing
    would have made it, keys refused before the interruption included."""
    objects = listing([obj("../escape"), *(obj(f"d{i % 7}/f{i:05d}", size=i) for i in range(3000))])

    def failing() -> Iterator[ObjectInfo]:
        yield from objects[:2500]
        raise Unavailable("connection reset")

    with pytest.raises(Unavailable):
        catalog.sync(failing(), resume="")
    checkpoint = catalog.listing_checkpoint()
    assert checkpoint == objects[1999].key  # two whole batches of 1,000 were written
    assert catalog.get_meta("synced_at") is None
    rest = [info for info in objects if info.key > checkpoint]
    assert len(rest) == 1001

    totals: list[int] = []
    report = catalog.sync(iter(rest), resume=checkpoint, progress=lambda r: totals.append(r.added))
    assert (report.added, report.removed) == (1001, 0)
    assert totals == [1000, 1001]  # after each batch
    assert catalog.listing_checkpoint() == ""
    assert catalog.get_meta("synced_at") is not None

    whole = Catalog(tmp_path / "whole.db")
    whole.sync(objects)
    assert cataloged_keys(catalog) == cataloged_keys(whole) == {o.key for o in objects[1:]}
    assert [key for key, _ in catalog.rejected()] == ["../escape"]


def test_a_refresh_leaves_no_checkpoint(catalog: Catalog) -> None:
    """Only a first listing records how far it got: a refresh that fails starts over."""

    def failing() -> Iterator[ObjectInfo]:
        yield from listing(obj(f"f{i:05d}") for i in range(1500))
        raise Unavailable("connection reset")

    with pytest.raises(Unavailable):
        catalog.sync(failing())
    assert catalog.listing_checkpoint() == ""


def test_a_write_the_full_disk_refuses_is_enospc_and_the_catalog_goes_on(tmp_path: Path) -> None:
    """SQLite's "database or disk is full" becomes DiskFull (ENOSPC for a writer, not an
    internal error), the transaction is rolled back, and the same connection writes again
    once there is room."""
    catalog = Catalog(tmp_path / "catalog.db")
    db = catalog.connection()
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count={pages}")  # the disk, as SQLite sees it, is full
    with pytest.raises(DiskFull) as refused, catalog.transaction() as writing:
        writing.execute("INSERT INTO meta VALUES (?, ?)", ("note", "x" * 100_000))
    assert refused.value.errno == errno.ENOSPC
    assert not db.in_transaction
    db.execute("PRAGMA max_page_count=1073741823")  # room again
    with catalog.transaction() as writing:
        writing.execute("INSERT INTO meta VALUES (?, ?)", ("note", "kept"))
    assert catalog.get_meta("note") == "kept"
