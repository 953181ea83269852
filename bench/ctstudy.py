"""The synthetic CT study of the viewer benchmark, the same bytes on every run.

A viewer benchmark needs objects that cloudfs's indexer takes for what a scanner writes: Part 10
files (128-byte preamble, ``DICM``, file meta) in explicit VR little endian, CT Image Storage, with
the patient, study, series and instance tags the browse view and study prefetch are built from.
Each instance is 512 x 512 pixels of 16 bits, so about 512 KiB, the size of a CT slice.  The
instances are written by ``cloudfs.dicom.sample_instance``, as the demo archive's and the tests'.

Everything is derived from the seed, the series index and the instance number: UIDs are derived
from the seed and the instance's place, pixel data from the SOP Instance UID.  So the bytes need
not be kept: the benchmark keeps a SHA-256 per instance and checks what it read against it, and
two instances never share pixel data, so an instance served in place of another is caught.  The
SOP Instance UIDs are hashes, so the keys ``ct/<study>/<series>/<sop>.dcm`` sort in an order
unrelated to the Instance Number, as they do in a real archive: only the DICOM index knows the
order in which a radiologist scrolls.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

from cloudfs.dicom import derived_uid, sample_instance

ROWS = COLUMNS = 512
STUDY_DATE = "20240315"
PATIENT_ID = "BENCH-VIEWER-01"
SLICE_MM = 1.25


@dataclass(frozen=True)
class Instance:
    key: str
    series_number: int
    instance_number: int
    sop_uid: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Study:
    patient_id: str
    study_uid: str
    series: tuple[tuple[Instance, ...], ...]
    """Each series' instances in Instance Number order (the viewer's scrolling order)."""

    @property
    def instances(self) -> list[Instance]:
        return [instance for series in self.series for instance in series]

    def series_bytes(self, index: int = 0) -> int:
        return sum(instance.size for instance in self.series[index])


def _uid(seed: int, *parts: object) -> str:
    """The UID of one part of the study of ``seed``: the same on every run."""
    return derived_uid("bench-viewer", str(seed), *map(str, parts))


class _Plan:
    """The identifiers of one study, from which every instance's bytes follow."""

    def __init__(self, seed: int, counts: tuple[int, ...]) -> None:
        self.seed = seed
        self.counts = counts
        self.study_uid = _uid(seed, "study")
        self.series_uids = [_uid(seed, "series", n) for n in range(len(counts))]

    def sop_uid(self, series: int, number: int) -> str:
        return _uid(self.seed, "instance", series, number)

    def key(self, series: int, number: int) -> str:
        return f"ct/{self.study_uid}/{self.series_uids[series]}/{self.sop_uid(series, number)}.dcm"

    def encode(self, series: int, number: int) -> bytes:
        """The Part 10 file of instance ``number`` (from 1) of series ``series`` (from 0)."""
        return sample_instance(
            patient_id=PATIENT_ID,
            patient_name="BENCH^VIEWER",
            study_uid=self.study_uid,
            study_date=STUDY_DATE,
            study_description="CT CHEST",
            accession=f"ACC{self.seed:07d}",
            series_uid=self.series_uids[series],
            series_number=series + 1,
            modality="CT",
            series_description="AXIAL 1.25mm" if series == 0 else f"RECON {series}",
            sop_uid=self.sop_uid(series, number),
            instance_number=number,
            rows=ROWS,
            columns=COLUMNS,
            slice_thickness=SLICE_MM,
            charset="ISO_IR 100",
        )


def instances(seed: int, counts: tuple[int, ...]) -> Iterator[tuple[Instance, bytes]]:
    """Every instance of the study with its bytes, series by series in Instance Number order."""
    plan = _Plan(seed, counts)
    for series, count in enumerate(counts):
        for number in range(1, count + 1):
            data = plan.encode(series, number)
            instance = Instance(
                key=plan.key(series, number),
                series_number=series + 1,
                instance_number=number,
                sop_uid=plan.sop_uid(series, number),
                size=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
            )
            yield instance, data


def study_of(seed: int, counts: tuple[int, ...], found: list[Instance]) -> Study:
    """The study made of the ``found`` instances (as ``instances`` yielded them)."""
    plan = _Plan(seed, counts)
    series = tuple(
        tuple(
            sorted((i for i in found if i.series_number == n + 1), key=lambda i: i.instance_number)
        )
        for n in range(len(counts))
    )
    return Study(PATIENT_ID, plan.study_uid, series)
