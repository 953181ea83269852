"""Synthetic DICOM studies for the tests, on top of ``cloudfs.dicom.sample_instance``.

What is here is what only tests want: values pydicom would refuse to write (raw bytes spliced
into the encoded instance), and whole studies keyed as a PACS stores them, with UIDs a test can
compute from the same arguments.  Everything is derived from the arguments, so two calls with the
same arguments describe the same objects.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from typing import Any

from cloudfs.dicom import Header, derived_uid, sample_instance

_LONG_LENGTH_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


def instance_bytes(
    *, implicit_vr: bool = False, extra: Mapping[str | int, object] | None = None, **tags: Any
) -> bytes:
    """``sample_instance`` (same arguments) with hostile values allowed: in ``extra``, an int
    tag may map to ``(VR, raw bytes)``, stored byte for byte even where pydicom would refuse to
    encode them."""
    kept: dict[str | int, object] = {}
    splices: list[tuple[int, str, bytes, bytes]] = []
    for key, value in (extra or {}).items():
        if isinstance(key, int) and isinstance(value, tuple) and isinstance(value[1], bytes):
            # A stand-in now, the exact bytes after encoding: pydicom validates (and may
            # refuse) values as they are set, and hostile values are the point here.
            placeholder = f"RAW{len(splices):05d}".encode()
            kept[key] = ("LO", placeholder.decode())
            splices.append((key, value[0], placeholder, value[1]))
        else:
            kept[key] = value
    data = sample_instance(implicit_vr=implicit_vr, extra=kept, **tags)
    for tag, vr, placeholder, value in splices:
        data = _splice(data, tag, vr, placeholder, value, implicit_vr)
    return data


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
            data = sample_instance(
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


SAMPLE_HEADER = Header(
    patient_id="PAT1",
    patient_name="DOE^JANE",
    study_uid="1.2.1",
    study_date="20240315",
    study_time="093000",
    accession="ACC1",
    study_description="CT CHEST",
    series_uid="1.2.1.1",
    series_number=2,
    modality="CT",
    series_description="AXIAL",
    sop_uid="1.2.1.1.1",
    instance_number=1,
    body_part="CHEST",
    transfer_syntax="1.2.840.10008.1.2.1",
)
"""The tags of one CT instance, as the index records them; tests change what they need."""
