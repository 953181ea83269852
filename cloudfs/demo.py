"""The embedded default archive: sample files generated once, so a first mount needs no cloud.

The archive is a hospital bucket in small: DICOM studies under the keys a PACS writes
(``studies/<study uid>/<series uid>/<sop uid>.dcm``), so the mount's DICOM browse view fills in
once the indexer has read their headers; one large file for sequential reads; a few reports.
Every byte follows from fixed seeds, so a regenerated archive is the same archive.  Generating
it takes a few seconds (most of it writing the 256 MiB volume).
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .dicom import derived_uid, sample_instance

_README = """\
This is the cloudfs demo archive, a local directory served as if it were an S3 bucket.

Every file you read here goes through the cloudfs block cache: the first read fetches blocks
from the archive, later reads come from the cache (see `cloudfs status MOUNTPOINT`).

  studies/  two patients' DICOM studies, stored as a PACS writes them
            (studies/<study uid>/<series uid>/<instance uid>.dcm): a CT of 120 slices of
            512 x 512, and an MR of 2 series of 20 images of 256 x 256
  @dicom/   the same studies by patient and by date, built from the DICOM headers; read-only,
            it appears once the headers are indexed (see `cloudfs index status MOUNTPOINT`)
  volume/   one 256 MiB file, for sequential reads (try: dd if=volume/volume.raw of=/dev/null bs=1M)
  reports/  small text files

`cloudfs studies MOUNTPOINT` lists the studies. Opening one instance fetches the rest of its
study in the background, so scrolling through a series reads from the cache.
"""

_OLD_LAYOUT = ("series",)
"""Top-level folders of earlier versions of the demo archive, removed when it is regenerated."""


@dataclass(frozen=True)
class _Study:
    patient_id: str
    patient_name: str
    study_date: str
    description: str
    modality: str
    body_part: str
    series: tuple[tuple[str, int], ...]
    """(description, instance count) per series."""
    matrix: int
    """Rows and columns."""
    slice_mm: float


_STUDIES = (
    _Study(
        patient_id="DEMO-0001",
        patient_name="DEMO^ALICE",
        study_date="20250114",
        description="CT CHEST",
        modality="CT",
        body_part="CHEST",
        series=(("AXIAL 1mm", 120),),
        matrix=512,
        slice_mm=1.0,
    ),
    _Study(
        patient_id="DEMO-0002",
        patient_name="DEMO^BOB",
        study_date="20250302",
        description="MR BRAIN",
        modality="MR",
        body_part="HEAD",
        series=(("T1 AXIAL", 20), ("T2 AXIAL", 20)),
        matrix=256,
        slice_mm=5.0,
    ),
)


def _dicom_files() -> Iterator[tuple[str, bytes]]:
    """Every instance of the demo studies as (key, bytes)."""
    for number, study in enumerate(_STUDIES, start=1):
        study_uid = derived_uid("demo", study.patient_id, "study")
        for series_number, (description, count) in enumerate(study.series, start=1):
            series_uid = derived_uid("demo", study.patient_id, "series", str(series_number))
            for instance in range(1, count + 1):
                sop_uid = derived_uid(
                    "demo", study.patient_id, "sop", str(series_number), str(instance)
                )
                data = sample_instance(
                    patient_id=study.patient_id,
                    patient_name=study.patient_name,
                    study_uid=study_uid,
                    study_date=study.study_date,
                    study_description=study.description,
                    accession=f"DEMO{number:04d}",
                    series_uid=series_uid,
                    series_number=series_number,
                    modality=study.modality,
                    series_description=description,
                    sop_uid=sop_uid,
                    instance_number=instance,
                    rows=study.matrix,
                    columns=study.matrix,
                    slice_thickness=study.slice_mm,
                    extra={"BodyPartExamined": study.body_part},
                )
                yield f"studies/{study_uid}/{series_uid}/{sop_uid}.dcm", data


def generate_samples(archive: Path) -> int:
    """Create the sample tree under ``archive`` unless this version of it is there; return how
    many files were written."""
    marker = archive / "README.txt"
    if marker.exists() and marker.read_text() == _README:
        return 0
    for name in _OLD_LAYOUT:
        shutil.rmtree(archive / name, ignore_errors=True)
    rng = random.Random(20261123)
    files: dict[str, list[bytes]] = {key: [data] for key, data in _dicom_files()}
    files["volume/volume.raw"] = [rng.randbytes(1024 * 1024) for _ in range(256)]
    for number in range(1, 6):
        files[f"reports/report-{number}.txt"] = [f"Sample report {number}\n".encode() * 40]
    for name, chunks in files.items():
        path = archive / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as out:
            out.writelines(chunks)
    # Written last: its presence (with this text) means the archive is complete.
    marker.write_text(_README)
    return len(files) + 1
