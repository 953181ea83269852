"""The DICOM header index and its browse tree on a real catalog: which objects are pending, how
read results are recorded, the names the view gives (layout, collisions, duplicates, hostile tag
values, stability), purges, the queries study prefetch and pins run, and the pins table.

Objects enter the catalog through ``Catalog.sync`` as a relist would put them there; headers are
``dataclasses.replace`` variations of one base Header, as ``parse_header`` would return them."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dicom_samples import SAMPLE_HEADER, instance_bytes
from helpers_unit import listing, obj

from cloudfs.catalog import Catalog
from cloudfs.dicom import Header, NotDicom, parse_header
from cloudfs.dicom_index import (
    BY_DATE,
    BY_PATIENT,
    VIEW_BASE,
    VIEW_ROOT,
    DicomIndex,
    ObjectRef,
    Pending,
    ViewEntry,
)
from cloudfs.store import ObjectInfo

STUDY = "20240315_CT CHEST_ACC1"
SERIES = "002_CT_AXIAL"
SIZE = 100


def header(**changes: Any) -> Header:
    return dataclasses.replace(SAMPLE_HEADER, **changes)


def instance_header(study: int, series: int, number: int | None, **changes: Any) -> Header:
    """Instance ``number`` of series ``series`` of study ``study``: UIDs derived from the three."""
    sop = f"1.2.{study}.{series}.{number if number is not None else 'x'}"
    uids = {
        "study_uid": f"1.2.{study}",
        "series_uid": f"1.2.{study}.{series}",
        "series_number": series,
        "sop_uid": sop,
        "instance_number": number,
    }
    return header(**(uids | changes))


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return Catalog(tmp_path / "catalog.db")


@pytest.fixture
def index(catalog: Catalog) -> DicomIndex:
    return DicomIndex(catalog, patient_names=False)


def put(catalog: Catalog, objects: dict[str, str], size: int = SIZE) -> None:
    """Make the catalog hold exactly ``objects`` (key -> ETag), as a complete relist would."""
    catalog.sync(listing(obj(key, size=size, etag=etag) for key, etag in objects.items()))


def queued(catalog: Catalog) -> list[str]:
    return [row[0] for row in catalog.connection().execute("SELECT key FROM dicom_queue")]


def pending_of(index: DicomIndex, key: str) -> Pending:
    found = [item for item in index.pending(10_000) if item.key == key]
    assert len(found) == 1, f"{key} is not pending"
    return found[0]


def record(
    index: DicomIndex, outcomes: dict[str, Header | str], local: bool = False
) -> tuple[list[str], list[str]]:
    """Record read results for pending objects, in the order given."""
    return index.record(
        [(pending_of(index, key), outcome, local) for key, outcome in outcomes.items()]
    )


def children(index: DicomIndex, parent: int, page: int = 3) -> list[ViewEntry]:
    """Every entry of a view directory, read in small pages as readdir does."""
    found: list[ViewEntry] = []
    after = 0
    while batch := index.view_children(parent, after, page):
        found.extend(batch)
        after = batch[-1].id
    return found


def walk(index: DicomIndex) -> Iterator[tuple[str, ViewEntry]]:
    """Every view entry below the view's root with its path."""
    stack = [("", VIEW_ROOT)]
    while stack:
        prefix, parent = stack.pop()
        for entry in children(index, parent):
            path = prefix + entry.name
            yield path, entry
            if entry.is_dir:
                stack.append((path + "/", entry.id))


def files(index: DicomIndex) -> dict[str, str]:
    """The view's files: path -> the object key holding their bytes."""
    return {path: entry.target for path, entry in walk(index) if entry.target is not None}


def dirs(index: DicomIndex) -> set[str]:
    return {path for path, entry in walk(index) if entry.is_dir}


def entry_at(index: DicomIndex, path: str) -> ViewEntry | None:
    """The entry at ``path`` by lookups from the view's root, as the kernel would find it."""
    parent: ViewEntry | None = index.view_entry(VIEW_ROOT)
    for name in path.split("/"):
        assert parent is not None
        parent = index.view_lookup(parent.id, name)
        if parent is None:
            return None
    return parent


# -- pending and record ----------------------------------------------------------------------------


def test_pending_lists_clean_files_whose_current_version_has_no_row(
    catalog: Catalog, index: DicomIndex
) -> None:
    """Only files with bytes in the cloud are read: not directories, empty objects, files being
    written through the mount or renamed ones whose cloud copy is still under the old key."""
    catalog.sync(
        listing(
            [
                obj("a.dcm", SIZE, '"a"'),
                obj("b.dcm", SIZE, '"b"'),
                obj("dir/c.dcm", SIZE, '"c"'),
                obj("dir/d.dcm", SIZE, '"d"'),
                obj("dir/e.dcm", SIZE, '"e"'),
                obj("empty.dcm", 0, '"z"'),
                obj("marker/", 0, '"m"'),
            ]
        )
    )
    db = catalog.connection()
    # What the write path leaves in the catalog: a file written but not yet uploaded, one
    # renamed whose bytes still sit under its old key, and one written and since uploaded.
    db.execute("UPDATE nodes SET dirty=2 WHERE key='dir/c.dcm'")
    db.execute("UPDATE nodes SET fetch_key='old/d.dcm' WHERE key='dir/d.dcm'")
    db.execute("UPDATE nodes SET local_at=1 WHERE key='dir/e.dcm'")

    pending = {item.key: item for item in index.pending(100)}
    assert set(pending) == {"a.dcm", "b.dcm", "dir/e.dcm"}
    assert pending["a.dcm"] == Pending("a.dcm", '"a"', SIZE, False)
    assert pending["dir/e.dcm"].local, "a file changed through the mount is read as local"
    assert len(index.pending(2)) == 2

    record(index, {"a.dcm": header(), "b.dcm": "not DICOM: no DICM signature"})
    assert [item.key for item in index.pending(100)] == ["dir/e.dcm"]
    record(index, {"dir/e.dcm": "not DICOM: empty"})
    assert index.pending(100) == []


def test_changed_etag_is_pending_again_and_its_entry_moves(
    catalog: Catalog, index: DicomIndex
) -> None:
    """A new version is read again; recorded with other tags, its files move and the directories
    it leaves empty go, up to (not including) by-patient and by-date."""
    put(catalog, {"a.dcm": '"1"', "b.dcm": '"1"'})
    record(
        index,
        {
            "a.dcm": header(),
            "b.dcm": instance_header(7, 1, 1, patient_id="OTHER", study_date="20190101"),
        },
    )
    before = files(index)
    assert before[f"by-patient/PAT1/{STUDY}/{SERIES}/0001.dcm"] == "a.dcm"
    assert index.pending(10) == []

    put(catalog, {"a.dcm": '"2"', "b.dcm": '"1"'})
    assert index.pending(10) == [Pending("a.dcm", '"2"', SIZE, False)]

    moved = header(
        patient_id="PAT2",
        study_uid="9.9",
        series_uid="9.9.1",
        sop_uid="9.9.1.5",
        study_date="20230102",
        series_number=1,
        instance_number=5,
    )
    new, _ = record(index, {"a.dcm": moved})
    assert new == ["9.9"]
    after = files(index)
    assert {path for path, key in after.items() if key == "a.dcm"} == {
        "by-patient/PAT2/20230102_CT CHEST_ACC1/001_CT_AXIAL/0005.dcm",
        "by-date/2023/01/02/PAT2_CT CHEST_ACC1/001_CT_AXIAL/0005.dcm",
    }
    assert {path for path, key in after.items() if key == "b.dcm"} == {
        path for path, key in before.items() if key == "b.dcm"
    }
    left = dirs(index)
    assert not any(path.startswith(("by-patient/PAT1", "by-date/2024")) for path in left), left
    assert {"by-patient", "by-date"} <= left

    # A new version that is no DICOM at all takes its files out of the view.
    put(catalog, {"a.dcm": '"3"', "b.dcm": '"1"'})
    record(index, {"a.dcm": "not DICOM: no DICM signature"})
    assert "a.dcm" not in files(index).values()
    assert not any(path.startswith(("by-patient/PAT2", "by-date/2023")) for path in dirs(index))
    assert index.progress()["not_dicom"] == 1


def test_result_for_a_version_the_catalog_no_longer_holds_is_ignored(
    catalog: Catalog, index: DicomIndex
) -> None:
    """A header read while the object changed or went away describes bytes nobody can open: it
    is dropped and the object stays pending for its current version."""
    put(catalog, {"a.dcm": '"1"', "gone.dcm": '"1"'})
    stale, gone = pending_of(index, "a.dcm"), pending_of(index, "gone.dcm")
    put(catalog, {"a.dcm": '"2"'})

    assert index.record([(stale, header(), False), (gone, header(sop_uid="1.2.1.1.2"), False)]) == (
        [],
        [],
    )
    assert files(index) == {}
    assert index.pending(10) == [Pending("a.dcm", '"2"', SIZE, False)]
    assert index.progress()["indexed"] == 0


def test_record_returns_new_studies_and_those_from_local_writes(
    catalog: Catalog, index: DicomIndex
) -> None:
    """A study is new the first time any of its instances is recorded, once per batch; the
    second list holds the new studies whose instance came from a local write."""
    put(catalog, {f"{n}.dcm": '"1"' for n in range(6)})
    batch: list[tuple[Pending, Header | str, bool]] = [
        (pending_of(index, "0.dcm"), instance_header(1, 1, 1), False),
        (pending_of(index, "1.dcm"), instance_header(1, 1, 2), False),
        (pending_of(index, "2.dcm"), instance_header(2, 1, 1), True),
        (pending_of(index, "3.dcm"), "not DICOM: empty object", True),
        (pending_of(index, "4.dcm"), instance_header(3, 1, 1, study_uid=""), True),
    ]
    assert index.record(batch) == (["1.2.1", "1.2.2"], ["1.2.2"])
    # Another instance of a known study is not news, even from a local write.
    assert record(index, {"5.dcm": instance_header(1, 2, 1)}, local=True) == ([], [])


# -- view layout -----------------------------------------------------------------------------------


def test_view_layout_by_patient_and_by_date(catalog: Catalog, index: DicomIndex) -> None:
    """One instance shows as one file in each tree, at the documented paths."""
    put(catalog, {"raw/a.dcm": '"1"'})
    record(index, {"raw/a.dcm": header()})
    assert files(index) == {
        f"by-patient/PAT1/{STUDY}/{SERIES}/0001.dcm": "raw/a.dcm",
        f"by-date/2024/03/15/PAT1_CT CHEST_ACC1/{SERIES}/0001.dcm": "raw/a.dcm",
    }
    assert [entry.name for entry in children(index, VIEW_ROOT)] == ["by-patient", "by-date"]
    entry = entry_at(index, f"by-patient/PAT1/{STUDY}/{SERIES}/0001.dcm")
    assert entry is not None and not entry.is_dir and entry.ino == VIEW_BASE + entry.id
    assert index.view_entry(entry.id) == entry
    top = index.view_entry(BY_PATIENT)
    assert top is not None and top.is_dir and top.parent == VIEW_ROOT
    assert index.view_lookup(BY_DATE, "missing") is None
    assert index.view_entry(10**9) is None
    assert index.progress()["placed_in_view"] == 1


@pytest.mark.parametrize(
    ("changes", "by_patient", "by_date"),
    [
        pytest.param(
            {"study_date": ""},
            f"PAT1/undated_CT CHEST_ACC1/{SERIES}/0001.dcm",
            f"undated/PAT1_CT CHEST_ACC1/{SERIES}/0001.dcm",
            id="undated",
        ),
        pytest.param(
            {"instance_number": None},
            f"PAT1/{STUDY}/{SERIES}/x1.2.1.1.1.dcm",
            f"2024/03/15/PAT1_CT CHEST_ACC1/{SERIES}/x1.2.1.1.1.dcm",
            id="no-instance-number",
        ),
        pytest.param(
            {"series_number": None, "series_description": ""},
            f"PAT1/{STUDY}/CT/0001.dcm",
            "2024/03/15/PAT1_CT CHEST_ACC1/CT/0001.dcm",
            id="series-without-number",
        ),
        pytest.param(
            {
                "study_description": "",
                "accession": "",
                "modality": "",
                "series_number": None,
                "series_description": "",
            },
            "PAT1/20240315/unknown/0001.dcm",
            "2024/03/15/PAT1/unknown/0001.dcm",
            id="bare",
        ),  # fmt: skip
        pytest.param(
            {"patient_id": "", "series_number": 1234, "instance_number": 123456},
            f"unknown-patient/{STUDY}/1234_CT_AXIAL/123456.dcm",
            "2024/03/15/unknown-patient_CT CHEST_ACC1/1234_CT_AXIAL/123456.dcm",
            id="no-patient-wide-numbers",
        ),
    ],
)
def test_view_names_for_missing_tags(
    catalog: Catalog, index: DicomIndex, changes: dict[str, Any], by_patient: str, by_date: str
) -> None:
    put(catalog, {"a.dcm": '"1"'})
    record(index, {"a.dcm": header(**changes)})
    assert files(index) == {f"by-patient/{by_patient}": "a.dcm", f"by-date/{by_date}": "a.dcm"}


@pytest.mark.parametrize("stored", ["20241399", "2024/1/1", "2024-03-15", "20240230", ""])
def test_invalid_study_dates_are_filed_undated(
    catalog: Catalog, index: DicomIndex, stored: str
) -> None:
    """From the object's bytes to the view: a StudyDate that is no calendar date never becomes
    a by-date folder."""
    data = instance_bytes(
        patient_id="PAT1", patient_name="DOE^JANE", study_uid="1.2.1", study_date=stored,
        study_description="CT CHEST", accession="ACC1", series_uid="1.2.1.1", series_number=2,
        modality="CT", series_description="AXIAL", sop_uid="1.2.1.1.1", instance_number=1,
        rows=8, columns=8,
    )  # fmt: skip
    parsed = parse_header(data, len(data))
    put(catalog, {"a.dcm": '"1"'})
    record(index, {"a.dcm": parsed})
    assert set(files(index)) == {
        f"by-patient/PAT1/undated_CT CHEST_ACC1/{SERIES}/0001.dcm",
        f"by-date/undated/PAT1_CT CHEST_ACC1/{SERIES}/0001.dcm",
    }


def test_patient_names_only_when_asked(tmp_path: Path) -> None:
    """Names are PHI: folders carry them only with patient_names=True."""
    variants = {
        "a.dcm": instance_header(1, 1, 1),
        "b.dcm": instance_header(2, 1, 1, patient_id="", patient_name="ROE^RICHARD"),
        "c.dcm": instance_header(3, 1, 1, patient_id="PAT3", patient_name="  "),
    }
    expected = {
        False: {"PAT1", "unknown-patient", "PAT3"},
        True: {"DOE JANE_PAT1", "ROE RICHARD_noid", "PAT3"},
    }
    for names, folders in expected.items():
        catalog = Catalog(tmp_path / f"names-{names}.db")
        index = DicomIndex(catalog, patient_names=names)
        put(catalog, dict.fromkeys(variants, '"1"'))
        record(index, dict(variants))
        assert {entry.name for entry in children(index, BY_PATIENT)} == folders
        by_date = {path.split("/")[4] for path in files(index) if path.startswith("by-date/")}
        assert by_date == {f"{folder}_CT CHEST_ACC1" for folder in folders}


def test_switching_the_patient_folder_choice_renames_every_folder(tmp_path: Path) -> None:
    """Names are stored: a switch from names to IDs must not leave names (PHI) in the view,
    and switching back brings them back; nothing else of the tree changes."""
    path = tmp_path / "catalog.db"
    catalog = Catalog(path)
    index = DicomIndex(catalog, patient_names=True)
    put(catalog, {"a.dcm": '"1"', "b.dcm": '"1"'})
    record(index, {"a.dcm": instance_header(1, 1, 1), "b.dcm": instance_header(1, 1, 2)})
    with_names = files(index)
    assert with_names[f"by-patient/DOE JANE_PAT1/{STUDY}/001_CT_AXIAL/0002.dcm"] == "b.dcm"
    ids_only = files(DicomIndex(Catalog(path), patient_names=False))
    assert not any("JANE" in name for name in ids_only), ids_only
    assert ids_only == {
        name.replace("DOE JANE_PAT1", "PAT1"): target for name, target in with_names.items()
    }
    assert files(DicomIndex(Catalog(path), patient_names=True)) == with_names


# -- collisions, duplicates, stability -------------------------------------------------------------


def test_studies_with_the_same_name_get_suffixes(catalog: Catalog, index: DicomIndex) -> None:
    """Three studies of one patient with the same date, description and accession."""
    put(catalog, {f"{n}.dcm": '"1"' for n in range(3)})
    record(index, {f"{n}.dcm": instance_header(n + 1, 1, 1) for n in range(3)})
    patient = entry_at(index, "by-patient/PAT1")
    day = entry_at(index, "by-date/2024/03/15")
    assert patient is not None and day is not None
    assert [e.name for e in children(index, patient.id)] == [STUDY, f"{STUDY}~2", f"{STUDY}~3"]
    assert [e.name for e in children(index, day.id)] == [
        "PAT1_CT CHEST_ACC1",
        "PAT1_CT CHEST_ACC1~2",
        "PAT1_CT CHEST_ACC1~3",
    ]
    got = files(index)
    for n, suffix in enumerate(("", "~2", "~3")):
        assert got[f"by-patient/PAT1/{STUDY}{suffix}/001_CT_AXIAL/0001.dcm"] == f"{n}.dcm"


def test_instances_with_the_same_number_get_suffixes(catalog: Catalog, index: DicomIndex) -> None:
    """Two SOP instances numbered 1 in one series: both shown, the second as 0001~2.dcm."""
    put(catalog, {"a.dcm": '"1"', "b.dcm": '"1"', "c.dcm": '"1"'})
    record(
        index,
        {
            "a.dcm": header(),
            "b.dcm": header(sop_uid="1.2.1.1.99"),
            "c.dcm": header(sop_uid="1.2.1.1.98", instance_number=None),
        },
    )
    series = f"by-patient/PAT1/{STUDY}/{SERIES}"
    assert {path: key for path, key in files(index).items() if path.startswith(series)} == {
        f"{series}/0001.dcm": "a.dcm",
        f"{series}/0001~2.dcm": "b.dcm",
        f"{series}/x1.2.1.1.98.dcm": "c.dcm",
    }


def test_patients_whose_ids_clean_to_the_same_name_get_separate_folders(
    catalog: Catalog, index: DicomIndex
) -> None:
    """'A/B' and 'A_B' are two patients; both clean to 'A_B'.  Their studies must not be shown
    in one patient folder: the second patient gets 'A_B~2', as any other name taken by another
    patient does."""
    put(catalog, {"a.dcm": '"1"', "b.dcm": '"1"'})
    record(
        index,
        {"a.dcm": instance_header(1, 1, 1, patient_id="A/B"),
         "b.dcm": instance_header(2, 1, 1, patient_id="A_B")},
    )  # fmt: skip
    assert sorted(entry.name for entry in children(index, BY_PATIENT)) == ["A_B", "A_B~2"]


def test_names_are_stable_across_reopening_and_rerecording(tmp_path: Path) -> None:
    """Names are stored, never recomputed: a new index on the same database sees the same tree,
    a new version with the same tags keeps its name (suffix included), and a '~2' keeps its
    suffix when the name it avoided is freed."""
    path = tmp_path / "catalog.db"
    catalog = Catalog(path)
    index = DicomIndex(catalog, patient_names=False)
    objects = {"a.dcm": '"1"', "b.dcm": '"1"', "s1.dcm": '"1"', "s2.dcm": '"1"'}
    put(catalog, objects)
    headers: dict[str, Header | str] = {
        "a.dcm": header(),
        "b.dcm": header(sop_uid="1.2.1.1.99"),
        "s1.dcm": instance_header(5, 1, 1),
        "s2.dcm": instance_header(6, 1, 1),
    }
    record(index, headers)
    first = files(index)
    assert first[f"by-patient/PAT1/{STUDY}/{SERIES}/0001~2.dcm"] == "b.dcm"
    assert first[f"by-patient/PAT1/{STUDY}~3/001_CT_AXIAL/0001.dcm"] == "s2.dcm"

    again = DicomIndex(Catalog(path), patient_names=False)
    assert files(again) == first

    # New versions of both numbered-1 instances, read in the other order: each keeps its name.
    objects |= {"a.dcm": '"2"', "b.dcm": '"2"'}
    put(catalog, objects)
    record(index, {"b.dcm": headers["b.dcm"], "a.dcm": headers["a.dcm"]})
    assert files(index) == first

    # The study named STUDY~2 goes; the one named STUDY~3 keeps its name.
    del objects["s1.dcm"]
    put(catalog, objects)
    assert index.pending(10) == []
    assert files(index) == {path: key for path, key in first.items() if key != "s1.dcm"}


def test_second_copy_of_an_instance_in_a_series_is_not_placed(
    catalog: Catalog, index: DicomIndex
) -> None:
    """The same SOP instance stored under two keys shows once; both are indexed."""
    put(catalog, {"a.dcm": '"1"', "copy/a.dcm": '"1"'})
    record(index, {"a.dcm": header(), "copy/a.dcm": header()})
    assert set(files(index).values()) == {"a.dcm"}
    assert len(files(index)) == 2
    progress = index.progress()
    assert (progress["dicom"], progress["placed_in_view"], progress["pending"]) == (2, 1, 0)
    assert index.studies({}, 10)[0]["instances"] == 1


def test_remaining_copy_of_an_instance_is_shown_once_the_placed_one_goes(
    catalog: Catalog, index: DicomIndex
) -> None:
    """When the object shown for an SOP instance is deleted (or changes into something else),
    the other copy of that instance must take its place: the raw tree still holds it."""
    put(catalog, {"a.dcm": '"1"', "copy/a.dcm": '"1"'})
    record(index, {"a.dcm": header(), "copy/a.dcm": header()})
    put(catalog, {"copy/a.dcm": '"1"'})
    assert index.pending(10) == []
    assert set(files(index).values()) == {"copy/a.dcm"}


def test_instances_without_uids_are_indexed_but_not_placed(
    catalog: Catalog, index: DicomIndex
) -> None:
    put(catalog, {"no-study.dcm": '"1"', "no-series.dcm": '"1"', "no-sop.dcm": '"1"'})
    record(
        index,
        {
            "no-study.dcm": header(study_uid=""),
            "no-series.dcm": header(series_uid="", sop_uid="1.2.1.1.7"),
            "no-sop.dcm": header(sop_uid="", instance_number=3),
        },
    )
    assert files(index) == {}
    assert dirs(index) == {"by-patient", "by-date"}
    progress = index.progress()
    assert progress["indexed"] == progress["dicom"] == 3
    assert (progress["pending"], progress["placed_in_view"], progress["not_dicom"]) == (0, 0, 0)
    assert progress["studies"] == 1  # the two with a study UID share it
    assert progress["series"] == 1


def not_dicom_reason(data: bytes) -> str:
    """What ``parse_header`` says of a whole object that is not a usable DICOM instance."""
    with pytest.raises(NotDicom) as refused:
        parse_header(data, len(data))
    return str(refused.value)


def test_each_object_kept_out_of_the_view_is_logged_once(
    catalog: Catalog, index: DicomIndex, caplog: pytest.LogCaptureFixture
) -> None:
    """One info line per object version kept out of the view, naming the object and the
    reason; another round of pending and record reads nothing and logs nothing; a new
    version of a bad object is logged again."""
    instance = instance_bytes(
        patient_id="PAT1", patient_name="DOE^JANE", study_uid="1.2.1", study_date="20240315",
        study_description="CT CHEST", accession="ACC1", series_uid="1.2.1.1", series_number=2,
        modality="CT", series_description="AXIAL", sop_uid="1.2.1.1.1", instance_number=1,
        rows=8, columns=8,
    )  # fmt: skip
    notes = not_dicom_reason(b"not an image\n" * 50)
    torn = not_dicom_reason(instance[:600])
    put(catalog, dict.fromkeys(["notes.txt", "torn.dcm", "no-sop.dcm", "a.dcm", "copy.dcm"], '"1"'))
    with caplog.at_level(logging.INFO, logger="cloudfs.dicom_index"):
        record(
            index,
            {
                "notes.txt": notes,
                "torn.dcm": torn,
                "no-sop.dcm": header(sop_uid="", instance_number=3),
                "a.dcm": header(),
                "copy.dcm": header(),
            },
        )
        first = [(r.levelno, r.getMessage()) for r in caplog.records]
        caplog.clear()
        assert index.pending(100) == []
        assert index.record((item, "unused", False) for item in index.pending(100)) == ([], [])
        again = [r.getMessage() for r in caplog.records]
        put(catalog, {"notes.txt": '"2"', "torn.dcm": '"1"', "no-sop.dcm": '"1"', "a.dcm": '"1"'})
        record(index, {"notes.txt": notes})
        changed = [r.getMessage() for r in caplog.records]
    assert first == [
        (logging.INFO, f"notes.txt: {notes}; not placed in the view"),
        (logging.INFO, f"torn.dcm: {torn}; not placed in the view"),
        (logging.INFO, "no-sop.dcm: no study, series or SOP instance UID; not placed in the view"),
        (logging.INFO, "copy.dcm: SOP instance 1.2.1.1.1 is already shown as a.dcm"),
    ]
    assert notes.startswith("not DICOM") and torn.startswith("header truncated"), (notes, torn)
    assert again == []
    assert changed == [f"notes.txt: {notes}; not placed in the view"]


def test_purge_forgets_objects_that_left_the_catalog(catalog: Catalog, index: DicomIndex) -> None:
    """Rows and view files of deleted objects go, with the directories left empty."""
    put(catalog, {"a.dcm": '"1"', "b.dcm": '"1"', "c.txt": '"1"'})
    record(
        index,
        {
            "a.dcm": header(),
            "b.dcm": instance_header(4, 1, 1, patient_id="PAT4", study_date="20200101"),
            "c.txt": "not DICOM: no DICM signature",
        },
    )
    kept = {path: key for path, key in files(index).items() if key == "a.dcm"}
    put(catalog, {"a.dcm": '"1"'})
    assert index.pending(10) == []
    assert files(index) == kept
    assert not any("PAT4" in path or "2020" in path for path in dirs(index))
    progress = index.progress()
    assert (progress["objects"], progress["indexed"], progress["not_dicom"]) == (1, 1, 0)
    assert queued(catalog) == []


def test_only_changed_keys_are_looked_at_and_a_renamed_key_leaves_the_index(
    catalog: Catalog, index: DicomIndex
) -> None:
    """Once everything is indexed the queue is empty, so an upload landing in a large archive
    costs a look at its own key; a rename queues both keys, and the old one leaves the index."""
    put(catalog, {f"s{n}.dcm": '"1"' for n in range(50)})
    record(index, {f"s{n}.dcm": instance_header(n + 1, 1, 1) for n in range(50)})
    assert index.pending(100) == [] and queued(catalog) == []
    db = catalog.connection()
    db.execute("UPDATE nodes SET key='moved.dcm', name='moved.dcm' WHERE key='s7.dcm'")
    db.execute("UPDATE nodes SET etag='\"2\"' WHERE key='s8.dcm'")
    assert queued(catalog) == ["moved.dcm", "s7.dcm", "s8.dcm"]
    assert {item.key for item in index.pending(100)} == {"moved.dcm", "s8.dcm"}
    assert "s7.dcm" not in set(files(index).values())
    assert queued(catalog) == ["moved.dcm", "s8.dcm"], "pending keys stay until recorded"


def test_an_index_from_before_the_queue_is_looked_at_whole(tmp_path: Path) -> None:
    """A catalog indexed before changes were queued: opening it queues every key once, so
    objects left pending and rows of deleted objects are still found."""
    catalog = Catalog(tmp_path / "catalog.db")
    put(catalog, {"a.dcm": '"1"', "b.dcm": '"1"'})
    record(DicomIndex(catalog, patient_names=False), {"a.dcm": header()})
    db = catalog.connection()
    for name in ("added", "changed", "left", "removed"):
        db.execute(f"DROP TRIGGER dicom_queue_{name}")
    db.execute("DROP TABLE dicom_queue")
    db.execute("DELETE FROM nodes WHERE key='a.dcm'")
    reopened = DicomIndex(catalog, patient_names=False)
    assert [item.key for item in reopened.pending(10)] == ["b.dcm"]
    assert files(reopened) == {}


# -- hostile tag values ----------------------------------------------------------------------------

HOSTILE = [
    "a/b",
    "../../etc",
    "..",
    ".",
    "/",
    "\\",
    "\x00",
    "x\x00y/..",
    "\x01\x1f\x7f\x9b",
    " . . ",
    "\u202eexe.fdp",
    "A" * 10_240,
    "\u00e9" * 10_240,
    "\U0001f600" * 3_000,
    "..." + "/" * 300,
]


@pytest.mark.parametrize("names", [False, True], ids=["ids", "names"])
@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_tag_values_never_make_unsafe_names(
    tmp_path: Path, names: bool, value: str
) -> None:
    """Whatever the text tags hold, every name is one path component of at most 255 bytes, even
    with a collision suffix; and the instance is still shown."""
    catalog = Catalog(tmp_path / "catalog.db")
    index = DicomIndex(catalog, patient_names=names)
    text = {
        "patient_id": value,
        "patient_name": value,
        "accession": value,
        "study_description": value,
        "modality": value,
        "series_description": value,
        "study_uid": value,
        "series_uid": value,
    }
    put(catalog, {"a.dcm": '"1"', "b.dcm": '"1"', "c.dcm": '"1"', "d.dcm": '"1"'})
    record(
        index,
        {
            "a.dcm": header(**{**text, "sop_uid": value, "instance_number": None}),
            "b.dcm": header(**{**text, "sop_uid": value + "2", "instance_number": None}),
            "c.dcm": header(
                **{**text, "study_uid": value + "2", "sop_uid": "3", "series_number": -7}
            ),
            "d.dcm": header(**{**text, "study_uid": value + "3", "sop_uid": "4", "study_date": ""}),
        },
    )
    found = list(walk(index))
    assert len([entry for _, entry in found if entry.target]) == 8
    for _, entry in found:
        assert "/" not in entry.name and "\x00" not in entry.name, repr(entry.name)
        assert entry.name not in ("", ".", ".."), repr(entry.name)
        assert len(entry.name.encode("utf-8")) <= 255, len(entry.name.encode("utf-8"))
        assert entry_at_parent(index, entry) == entry


def entry_at_parent(index: DicomIndex, entry: ViewEntry) -> ViewEntry | None:
    """The entry found by looking its name up in its parent (names are unique per directory)."""
    return index.view_lookup(entry.parent, entry.name)


# -- queries ---------------------------------------------------------------------------------------


def test_study_instances_in_viewing_order(catalog: Catalog, index: DicomIndex) -> None:
    """By series number, then instance number, both compared as numbers; only the instances
    of the study whose current version was read."""
    numbers = [(10, 2), (2, 10), (2, 1), (10, 1), (2, 2), (1, 3)]
    objects = {f"s{series}-i{number}.dcm": '"1"' for series, number in numbers}
    objects |= {"other.dcm": '"1"', "changed.dcm": '"1"'}
    put(catalog, objects)
    outcomes: dict[str, Header | str] = {
        f"s{series}-i{number}.dcm": instance_header(1, series, number) for series, number in numbers
    }
    outcomes["other.dcm"] = instance_header(2, 1, 1)
    outcomes["changed.dcm"] = instance_header(1, 1, 1)
    record(index, outcomes)
    put(catalog, {**objects, "changed.dcm": '"2"'})

    found = index.study_instances("1.2.1")
    assert [(i.series_number, i.instance_number) for i in found] == [
        (1, 3), (2, 1), (2, 2), (2, 10), (10, 1), (10, 2),
    ]  # fmt: skip
    first = found[0]
    assert (first.key, first.etag, first.size, first.patient_id, first.study_uid) == (
        "s1-i3.dcm", '"1"', SIZE, "PAT1", "1.2.1",
    )  # fmt: skip
    assert (first.series_uid, first.modality, first.study_date) == ("1.2.1.1", "CT", "20240315")
    assert index.instance("s2-i10.dcm") == found[3]
    assert index.instance("changed.dcm") is None, "a version not read yet is not prefetched"
    assert index.study_instances("no.such.study") == []


def test_priors_are_earlier_studies_same_modality_first_then_most_recent(
    catalog: Catalog, index: DicomIndex
) -> None:
    """Only studies dated before the current one count: not later ones, not the same day, not
    undated ones; an undated current study has none."""
    studies = {
        1: ("PAT1", "CT", "20240315"),  # the current study
        2: ("PAT1", "CT", "20200101"),
        3: ("PAT1", "MR", "20231231"),
        4: ("PAT1", "CT", "20220610"),
        5: ("PAT1", "CT", ""),
        6: ("PAT2", "CT", "20240101"),
        7: ("PAT1", "MR", "20240101"),
        8: ("PAT1", "CT", "20250101"),
        9: ("PAT1", "CT", "20240315"),
    }
    put(catalog, {f"{n}.dcm": '"1"' for n in studies})
    record(
        index,
        {
            f"{n}.dcm": instance_header(n, 1, 1, patient_id=p, modality=m, study_date=d)
            for n, (p, m, d) in studies.items()
        },
    )
    assert index.priors("1.2.1", "PAT1", "CT", 2) == ["1.2.4", "1.2.2"]
    assert index.priors("1.2.1", "PAT1", "CT", 10) == ["1.2.4", "1.2.2", "1.2.7", "1.2.3"]
    assert index.priors("1.2.1", "PAT1", "MR", 3) == ["1.2.7", "1.2.3", "1.2.4"]
    assert index.priors("1.2.8", "PAT1", "CT", 3) == ["1.2.1", "1.2.9", "1.2.4"]
    assert index.priors("1.2.2", "PAT1", "CT", 5) == []
    assert index.priors("1.2.5", "PAT1", "CT", 5) == []
    assert index.priors("1.2.1", "PAT1", "CT", 0) == []
    assert index.priors("1.2.1", "", "CT", 5) == []
    assert index.priors("1.2.6", "PAT2", "CT", 5) == []
    assert index.priors("no.such.study", "PAT1", "CT", 5) == []


@pytest.fixture
def archive(catalog: Catalog, index: DicomIndex) -> DicomIndex:
    """Two patients, four studies, a non-DICOM file, raw keys by patient."""
    layout = {
        "PAT1/s1/a.dcm": instance_header(1, 1, 1, study_date="20240101"),
        "PAT1/s1/b.dcm": instance_header(1, 1, 2, study_date="20240101"),
        "PAT1/s2/a.dcm": instance_header(2, 1, 1, study_date="20240301", modality="MR"),
        "PAT1/s3/a.dcm": instance_header(3, 1, 1, study_date=""),
        "PAT10/s4/a.dcm": instance_header(4, 1, 1, patient_id="PAT10", study_date="20231231"),
    }
    objects = dict.fromkeys(layout, '"1"') | {"PAT1/notes.txt": '"1"'}
    catalog.sync(
        listing(obj(key, size=SIZE + n, etag=etag) for n, (key, etag) in enumerate(objects.items()))
    )
    outcomes: dict[str, Header | str] = dict(layout)
    outcomes["PAT1/notes.txt"] = "not DICOM: no DICM signature"
    record(index, outcomes)
    return index


def keys(refs: list[ObjectRef]) -> list[str]:
    return [ref.key for ref in refs]


def test_select_objects(archive: DicomIndex) -> None:
    """Selectors by patient, study, modality and date range (inclusive, dated studies only),
    combined; by path: the key itself and everything below 'path/', never 'path2/'."""
    select = archive.select_objects
    assert set(keys(select({"patient": "PAT1"}))) == {
        "PAT1/s1/a.dcm", "PAT1/s1/b.dcm", "PAT1/s2/a.dcm", "PAT1/s3/a.dcm",
    }  # fmt: skip
    assert keys(select({"study": "1.2.1"})) == ["PAT1/s1/a.dcm", "PAT1/s1/b.dcm"]
    assert keys(select({"modality": "MR"})) == ["PAT1/s2/a.dcm"]
    assert keys(select({"from": "20240101", "to": "20240301"})) == [
        "PAT1/s2/a.dcm", "PAT1/s1/a.dcm", "PAT1/s1/b.dcm",
    ]  # fmt: skip
    assert keys(select({"from": "20240102"})) == ["PAT1/s2/a.dcm"]
    assert keys(select({"to": "20231231"})) == ["PAT10/s4/a.dcm"]
    assert keys(select({"patient": "PAT1", "to": "20240101"})) == [
        "PAT1/s1/a.dcm",
        "PAT1/s1/b.dcm",
    ]
    assert select({"patient": "PAT1", "modality": "XA"}) == []

    refs = select({"path": "PAT1"})
    assert set(keys(refs)) == {
        "PAT1/s1/a.dcm", "PAT1/s1/b.dcm", "PAT1/s2/a.dcm", "PAT1/s3/a.dcm", "PAT1/notes.txt",
    }  # fmt: skip
    assert all(ref.etag == '"1"' and ref.size >= SIZE for ref in refs)
    assert set(keys(select({"path": "/PAT1/s1/"}))) == {"PAT1/s1/a.dcm", "PAT1/s1/b.dcm"}
    assert keys(select({"path": "PAT1/s2/a.dcm"})) == ["PAT1/s2/a.dcm"]
    assert keys(select({"path": "PAT10"})) == ["PAT10/s4/a.dcm"]
    assert select({"path": "PAT1/s"}) == []


def test_select_objects_by_path_skips_files_not_in_the_cloud(
    catalog: Catalog, archive: DicomIndex
) -> None:
    catalog.connection().execute("UPDATE nodes SET dirty=2 WHERE key='PAT1/s1/b.dcm'")
    assert "PAT1/s1/b.dcm" not in keys(archive.select_objects({"path": "PAT1"}))


def test_path_selector_is_refused_with_other_keys(archive: DicomIndex) -> None:
    """A path names files, the other keys name studies: ``pin --path PAT1 --modality MR`` is
    refused with the reason rather than pinning all of PAT1/ (or nothing) silently."""
    with pytest.raises(ValueError, match="give --path alone"):
        archive.select_objects({"path": "PAT1", "modality": "MR"})
    with pytest.raises(ValueError, match="give --path alone"):
        archive.studies({"path": "PAT1"}, 10)
    assert keys(archive.select_objects({"path": "PAT1"}))


def test_studies_summary(catalog: Catalog, archive: DicomIndex) -> None:
    """One row per study, newest first; instances count distinct SOP instances."""
    catalog.sync(listing([*_archive_listing(catalog), obj("PAT1/s1/copy.dcm", SIZE, '"1"')]))
    record(archive, {"PAT1/s1/copy.dcm": instance_header(1, 1, 2, study_date="20240101")})

    rows = archive.studies({}, 10)
    assert [row["study_uid"] for row in rows] == ["1.2.2", "1.2.1", "1.2.4", "1.2.3"]
    assert rows[1] == {
        "patient_id": "PAT1",
        "patient_name": "DOE^JANE",
        "study_uid": "1.2.1",
        "study_date": "20240101",
        "study_time": "093000",
        "accession": "ACC1",
        "description": "CT CHEST",
        "modalities": "CT",
        "series": 1,
        "instances": 2,
        "bytes": SIZE + (SIZE + 1) + SIZE,  # a.dcm, b.dcm and copy.dcm
    }
    assert [row["study_uid"] for row in archive.studies({"patient": "PAT1"}, 2)] == [
        "1.2.2",
        "1.2.1",
    ]
    assert [row["study_uid"] for row in archive.studies({"modality": "MR"}, 10)] == ["1.2.2"]
    assert archive.studies({"from": "20250101"}, 10) == []


def _archive_listing(catalog: Catalog) -> list[ObjectInfo]:
    """The catalog's current files as a listing (to add one object to it)."""
    return listing(
        obj(node.key, node.size, node.etag or "", node.mtime_ns)
        for node in catalog.select("is_dir=0 AND key IS NOT NULL")
        if node.key is not None
    )


def test_progress_figures(catalog: Catalog, archive: DicomIndex) -> None:
    catalog.sync(listing([*_archive_listing(catalog), obj("new.dcm", SIZE, '"1"')]))
    assert archive.progress() == {
        "objects": 7,
        "indexed": 6,
        "pending": 1,
        "dicom": 5,
        "not_dicom": 1,
        "placed_in_view": 5,
        "patients": 2,
        "studies": 4,
        "series": 4,
    }


# -- pins ------------------------------------------------------------------------------------------


def test_pins_table(index: DicomIndex) -> None:
    assert index.pins() == []
    index.add_pin('{"patient": "PAT1"}')
    index.add_pin('{"study": "1.2.3"}')
    index.add_pin('{"patient": "PAT1"}')
    assert index.pins() == ['{"patient": "PAT1"}', '{"study": "1.2.3"}']
    assert index.remove_pin('{"patient": "PAT1"}')
    assert not index.remove_pin('{"patient": "PAT1"}')
    assert index.pins() == ['{"study": "1.2.3"}']
