"""The catalog encrypted at rest under the cache key: what reaches the disk, reopening, refusals
of a wrong or missing key, and the conversion of a plaintext catalog holding pending work."""

from __future__ import annotations

import dataclasses
import gc
import multiprocessing
import os
import sqlite3
from pathlib import Path

import pytest
from dicom_samples import SAMPLE_HEADER
from helpers_unit import listing, node_at, obj

from cloudfs.catalog import READY, ROOT, Catalog
from cloudfs.changes import Changes
from cloudfs.dicom_index import DicomIndex
from cloudfs.errors import ConfigError

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
ARCHIVED = "patients/PAT-SECRET-77/ct/a.dcm"
WRITTEN = "PAT-SECRET-88.dcm"
MARKERS = (b"PAT-SECRET-77", b"PAT-SECRET-88", b"SECRETNAME")
"""The archived key, the name of a file written through the mount, the indexed PatientName."""

HEADER = dataclasses.replace(
    SAMPLE_HEADER, patient_id="PAT-SECRET-77", patient_name="DOE^SECRETNAME"
)


def populate(catalog: Catalog) -> None:
    """An archived object with its DICOM header indexed, an upload pending for a file written
    through the mount, and a file created and deleted after them."""
    catalog.sync(listing([obj(ARCHIVED, size=100)]))
    index = DicomIndex(catalog, patient_names=True)
    (pending,) = index.pending(10)
    index.record([(pending, HEADER, False)])
    changes = Changes(catalog)
    written = changes.create_file(ROOT, WRITTEN, 0o644, 1000, 1000, "stage-1")
    changes.record_write(written.ino, 5, 5_000, True, False)
    changes.create_file(ROOT, "gone.dcm", 0o644, 1000, 1000, "stage-2")
    changes.unlink(ROOT, "gone.dcm")


def catalog_bytes(directory: Path) -> dict[str, bytes]:
    """Every file next to the catalog (the database, its log and shared memory), by name."""
    return {path.name: path.read_bytes() for path in directory.iterdir() if path.is_file()}


def plaintext_markers(directory: Path) -> set[tuple[str, bytes]]:
    return {
        (name, marker)
        for name, content in catalog_bytes(directory).items()
        for marker in MARKERS
        if marker in content
    }


def check_contents(catalog: Catalog) -> None:
    """The data ``populate`` left, as a remount would find it."""
    archived = node_at(catalog, ARCHIVED)
    assert archived is not None and archived.size == 100
    index = DicomIndex(catalog, patient_names=True)
    instance = index.instance(ARCHIVED)
    assert instance is not None, "the DICOM index lost the instance"
    names = catalog.connection().execute("SELECT patient_name FROM dicom_instances").fetchall()
    assert names == [("DOE^SECRETNAME",)]
    uploads = Changes(catalog).work(10).uploads
    assert [(node.key, node.dirty, node.size) for node in uploads] == [(WRITTEN, READY, 5)]


def test_encrypted_catalog_keeps_no_phi_on_disk_and_reopens(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    catalog = Catalog(path, KEY)
    populate(catalog)
    wal = Path(f"{path}-wal")
    assert wal.exists() and wal.stat().st_size > 0, "the log must hold the writes checked here"
    assert plaintext_markers(tmp_path) == set()
    assert not path.read_bytes().startswith(b"SQLite format 3")
    del catalog
    gc.collect()  # closes its connection, which checkpoints the log into the file
    assert plaintext_markers(tmp_path) == set()

    check_contents(Catalog(path, KEY))


def test_without_a_key_the_catalog_is_plain_sqlite(tmp_path: Path) -> None:
    """As before encryption existed, and the markers the encrypted test looks for are there."""
    path = tmp_path / "catalog.sqlite"
    catalog = Catalog(path)
    populate(catalog)
    del catalog
    gc.collect()
    assert {marker for _, marker in plaintext_markers(tmp_path)} == set(MARKERS)
    with sqlite3.connect(path) as db:
        keys = {row[0] for row in db.execute("SELECT key FROM nodes WHERE key IS NOT NULL")}
    assert keys == {ARCHIVED, WRITTEN}


def test_a_wrong_or_missing_key_is_refused_clearly(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "catalog.sqlite"
    Catalog(path, KEY)
    gc.collect()
    before = path.read_bytes()

    with pytest.raises(ConfigError) as wrong:
        Catalog(path, OTHER_KEY)
    message = str(wrong.value)
    assert str(path) in message and "another" in message and "\n" not in message
    assert KEY.hex() not in message and OTHER_KEY.hex() not in message

    with pytest.raises(ConfigError) as missing:
        Catalog(path)
    assert str(path) in str(missing.value) and "is encrypted" in str(missing.value)

    assert capfd.readouterr().err == "", "SQLCipher's own log lines reached stderr"
    assert path.read_bytes() == before, "a refused open changed the file"
    Catalog(path, KEY)


def crash_after_populating(path: Path) -> None:
    """A daemon killed with its writes still in the write-ahead log."""
    populate(Catalog(path))
    os._exit(0)


def test_a_plaintext_catalog_with_pending_work_is_encrypted_in_place(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    child = multiprocessing.get_context("fork").Process(target=crash_after_populating, args=(path,))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    wal = Path(f"{path}-wal")
    assert wal.exists() and wal.stat().st_size > 0, "the crash must leave work in the log"
    with sqlite3.connect(path) as db:
        (gone,) = db.execute("SELECT seq FROM sqlite_sequence WHERE name='nodes'").fetchone()

    catalog = Catalog(path, KEY)
    assert not path.read_bytes().startswith(b"SQLite format 3")
    assert not Path(f"{path}.encrypting").exists()
    check_contents(catalog)
    # Inode numbers are never reused, across the conversion too.
    again = Changes(catalog).create_file(ROOT, "new.dcm", 0o644, 1000, 1000, "stage-3")
    assert again.ino > gone
    del catalog
    gc.collect()
    assert plaintext_markers(tmp_path) == set()
    check_contents(Catalog(path, KEY))
