"""Synthetic DICOM instances for tests and benchmarks: deterministic, valid, cheap to make.

Everything is derived from the arguments: the same call gives the same bytes, so a benchmark can
regenerate an archive instead of storing one, and a test can predict every tag.  Pixel data is a
short pattern seeded by the SOP Instance UID and repeated, so instances differ without the cost of
random bytes (a 300-instance series of 512 KiB images takes about a second).

Importable from tests/ (pytest puts it on sys.path) and from bench/ after inserting tests/ into
sys.path; it depends on pydicom only.
"""

from __future__ import annotations

import hashlib
import io
import struct
import uuid
import warnings
from collections.abc import Mapping
from typing import cast

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
)

_SOP_CLASSES = {"CT": CTImageStorage, "MR": MRImageStorage}
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "cloudfs:tests/dicom_samples")
_LONG_LENGTH_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


def derived_uid(*parts: str) -> str:
    """A 2.25 UID from a name-based UUID of ``parts``: the same parts, the same UID.

    (pydicom's ``generate_uid(prefix=None)`` ignores its entropy sources and is random.)
    """
    return f"2.25.{uuid.uuid5(_NAMESPACE, chr(0).join(parts)).int}"


_IMPLEMENTATION_UID = UID(derived_uid("implementation"))


def instance_bytes(
    *,
    patient_id: str,
    patient_name: str,
    study_uid: str,
    study_date: str,
    study_description: str,
    accession: str,
    series_uid: str,
    series_number: int,
    modality: str,
    series_description: str,
    sop_uid: str,
    instance_number: int,
    rows: int = 512,
    columns: int = 512,
    implicit_vr: bool = False,
    preamble: bool = True,
    charset: str | None = None,
    extra: Mapping[str | int, object] | None = None,
) -> bytes:
    """One valid instance with 16-bit pixels: CT or MR Image Storage for those modalities,
    Secondary Capture otherwise.

    ``preamble=False`` writes the dataset alone (no preamble, no file meta), as some archives
    hold them.  ``extra`` adds, overrides or (with None) removes elements: a keyword maps to its
    value, an int tag to a ``(VR, value)`` pair (private tags, or raw bytes as VR UN to store a
    value pydicom would refuse to encode).
    ``charset`` is the Specific Character Set the text is encoded with.
    """
    sop_class = _SOP_CLASSES.get(modality, SecondaryCaptureImageStorage)
    ds = Dataset()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.StudyTime = "093000"
    ds.AccessionNumber = accession
    ds.Modality = modality
    ds.Manufacturer = "CLOUDFS SAMPLES"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST" if modality in _SOP_CLASSES else ""
    ds.SliceThickness = "1.0"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = accession[:16]
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [0, 0, instance_number]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = study_uid + ".1"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.PixelSpacing = [0.7, 0.7]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixel_bytes(sop_uid, rows * columns * 2)
    splices: list[tuple[int, str, bytes, bytes]] = []
    for key, value in (extra or {}).items():
        if value is None:
            del ds[Tag(key)]
        elif isinstance(key, int):
            vr, item = cast(tuple[str, object], value)
            if isinstance(item, bytes):
                # Stand-in now, the exact bytes after encoding: pydicom validates (and may
                # refuse) values as they are set, and hostile values are the point here.
                placeholder = f"RAW{len(splices):05d}".encode()
                ds.add_new(Tag(key), "LO", placeholder.decode())
                splices.append((key, vr, placeholder, item))
            else:
                ds.add_new(Tag(key), vr, item)
        else:
            setattr(ds, key, value)

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # A stand-in character set or an odd value set on purpose is no news.
        warnings.simplefilter("ignore")
        _write(buffer, ds, sop_class, sop_uid, implicit_vr=implicit_vr, preamble=preamble)
    data = buffer.getvalue()
    for tag, vr, placeholder, value in splices:
        data = _splice(data, tag, vr, placeholder, value, implicit_vr)
    return data


def _write(
    buffer: io.BytesIO,
    ds: Dataset,
    sop_class: UID,
    sop_uid: str,
    *,
    implicit_vr: bool,
    preamble: bool,
) -> None:
    if preamble:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit_vr else ExplicitVRLittleEndian
        )
        ds.file_meta.ImplementationClassUID = _IMPLEMENTATION_UID
        dcmwrite(buffer, ds, enforce_file_format=True)
    else:
        dcmwrite(buffer, ds, implicit_vr=implicit_vr, little_endian=True)


def _splice(
    data: bytes, tag: int, vr: str, placeholder: bytes, value: bytes, implicit_vr: bool
) -> bytes:
    """Replace the stand-in LO element for ``tag`` by ``vr`` with ``value``, byte for byte."""
    prefix = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if implicit_vr:
        old = prefix + struct.pack("<I", len(placeholder)) + placeholder
        new = prefix + struct.pack("<I", len(value)) + value
    else:
        old = prefix + b"LO" + struct.pack("<H", len(placeholder)) + placeholder
        if vr in _LONG_LENGTH_VRS:
            new = prefix + vr.encode() + b"\0\0" + struct.pack("<I", len(value)) + value
        else:
            new = prefix + vr.encode() + struct.pack("<H", len(value)) + value
    if data.count(old) != 1:
        raise ValueError(f"cannot place the raw value of ({tag >> 16:04X},{tag & 0xFFFF:04X})")
    return data.replace(old, new)


def pixel_bytes(seed: str, size: int) -> bytes:
    """``size`` bytes that differ per seed: a 4 KiB pattern from a hash, repeated."""
    block = hashlib.shake_128(seed.encode()).digest(4096)
    whole, rest = divmod(size, len(block))
    return block * whole + block[:rest]


def study_uids(patient_id: str, study_index: int, series_count: int) -> tuple[str, list[str]]:
    """The Study and Series Instance UIDs ``synthetic_study`` gives these arguments."""
    study_uid = derived_uid(patient_id, str(study_index), "study")
    series = [
        derived_uid(patient_id, str(study_index), "series", str(number))
        for number in range(1, series_count + 1)
    ]
    return study_uid, series


def synthetic_study(
    patient_id: str,
    study_index: int,
    series: list[tuple[str, int]],
    *,
    study_date: str = "20260110",
    rows: int = 512,
    columns: int = 512,
    patient_name: str = "DOE^JANE",
    description: str = "CT CHEST",
) -> list[tuple[str, bytes]]:
    """One study as ``(key, bytes)`` per instance, keyed
    ``{patient_id}/{study_uid}/{series_uid}/{sop_uid}.dcm``.

    ``series`` lists ``(modality, instance count)``; UIDs derive from the arguments (see
    ``derived_uid``), so two calls with the same arguments describe the same objects.
    """
    study_uid, series_uids = study_uids(patient_id, study_index, len(series))
    accession = "A" + hashlib.sha1(study_uid.encode()).hexdigest()[:12].upper()
    objects: list[tuple[str, bytes]] = []
    for number, ((modality, count), series_uid) in enumerate(
        zip(series, series_uids, strict=True), start=1
    ):
        for instance in range(1, count + 1):
            sop_uid = derived_uid(patient_id, str(study_index), "sop", str(number), str(instance))
            data = instance_bytes(
                patient_id=patient_id,
                patient_name=patient_name,
                study_uid=study_uid,
                study_date=study_date,
                study_description=description,
                accession=accession,
                series_uid=series_uid,
                series_number=number,
                modality=modality,
                series_description=f"{modality} series {number}",
                sop_uid=sop_uid,
                instance_number=instance,
                rows=rows,
                columns=columns,
            )
            objects.append((f"{patient_id}/{study_uid}/{series_uid}/{sop_uid}.dcm", data))
    return objects
