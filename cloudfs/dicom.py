"""DICOM header parsing for the archive indexer: the only module that imports pydicom.

The indexer reads the first ``HEADER_PROBE`` bytes of an object with one ranged GET and asks
``parse_header`` for its study, series and instance tags.  Pixel data is never read or decoded:
parsing stops at the first top-level element past the last tag recorded, (0020,0013) Instance
Number, which DICOM's ascending tag order puts before the pixel data and before the large
private groups that usually follow.  When the bytes end before that point the answer is
``NeedMore`` with the size to fetch next, so a header costs one GET almost always and a few for
the rare header with a large private element.  (The parse is pydicom's ``read_partial``, the
reader under ``dcmread``, given this stop condition in place of ``stop_before_pixels``.)

What counts as DICOM (``force=True`` alone lets pydicom accept any bytes):

* the object carries the Part 10 signature, ``DICM`` at offset 128; or it starts with a
  plausible first element: group 0x0000, 0x0002 or 0x0008 (command, file meta, identifying
  group), read little endian with either a valid explicit VR or an implicit length under 64 KiB
  (exactly 4 for a group length), or read big endian with a valid explicit VR;
* and, once parsed, at least one of Study, Series or SOP Instance UID (or the file meta's Media
  Storage SOP Instance UID) is present.  Missing UIDs come back as ``''``: the caller decides
  whether such an object belongs in the browse view.

A whole object that is torn inside the header (or whose header pydicom cannot read to the end)
is kept only when all three UIDs were read before the damage.

Invariants: ``parse_header`` raises only ``NotDicom`` or ``NeedMore``, whatever the bytes; it
never decodes pixel data, never asks for more than ``HEADER_LIMIT`` bytes and never inflates
more than that from a deflated object.  It holds no state, so any thread may call it;
pydicom's complaints about odd values are silenced here because the archive's objects are not
ours to fix and a warning per object would bury the log.

The last section, "sample instances", goes the other way: ``sample_instance`` writes one valid
instance with made-up tags and pixels, derived only from its arguments.  The demo archive, the
tests and the benchmarks all build their DICOM objects with it, so each generates an archive
instead of storing one, and all of them exercise the same kind of object.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import logging
import re
import struct
import unicodedata
import uuid
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset, read_partial
from pydicom.filewriter import dcmwrite
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, STANDARD_VR

HEADER_PROBE: int = 64 * 1024
"""First ranged read of an object.  Typical headers are 1-10 KiB, but vendors' private tags
(protocol blocks, CSA headers) can take tens of KiB more; 64 KiB covers nearly all of them in one
GET and costs no more latency than 8 KiB."""

HEADER_LIMIT: int = 4 * 1024 * 1024
"""Never read more than this for a header: an object whose identifying tags lie further in is
reported ``NotDicom``, so a hostile or broken object cannot make the indexer fetch gigabytes."""

_QUIET_MODULES = r"(pydicom|cloudfs\.dicom)(\.|$)"
# The entry as warnings.filterwarnings stores it, to tell whether it is still in place.
_QUIET_FILTER = ("ignore", None, Warning, re.compile(_QUIET_MODULES), 0)


def _quiet_pydicom() -> None:
    """Silence pydicom's per-value warnings (see the module docstring).

    A filter rather than ``catch_warnings`` around each parse: that swaps the process-wide
    filter list and races between threads.  Whoever resets the warning filters (test runners
    do, around every test) drops this one, so each parse puts it back if it is gone.
    """
    if _QUIET_FILTER not in warnings.filters:
        warnings.filterwarnings("ignore", module=_QUIET_MODULES)


_quiet_pydicom()
logging.getLogger("pydicom").setLevel(logging.ERROR)

_LAST_WANTED = 0x00200013  # (0020,0013) Instance Number: the highest tag Header needs
_FIRST_GROUPS = frozenset({0x0000, 0x0002, 0x0008})
_VALID_VRS = frozenset(vr.encode("ascii") for vr in STANDARD_VR)
_IMPLICIT_FIRST_LENGTH = 64 * 1024
_SIGNATURE_END = 132  # 128-byte preamble + b"DICM"
_INTEGER = re.compile(r"[+-]?[0-9]{1,10}(?:\.0*)?")
_INT32 = range(-(2**31), 2**31)

_CHARSET = 0x00080005
_STUDY_UID = 0x0020000D
_SERIES_UID = 0x0020000E
_SOP_UID = 0x00080018


@dataclass(frozen=True)
class Header:
    """The tags the browse view is built from; text is decoded, stripped and never None."""

    patient_id: str
    patient_name: str
    """``str`` of the PersonName, decoded with the dataset's character set, ``^`` kept."""
    study_uid: str
    study_date: str
    """``YYYYMMDD`` if the stored value is a real date, else ``''``."""
    study_time: str
    accession: str
    study_description: str
    series_uid: str
    series_number: int | None
    modality: str
    series_description: str
    sop_uid: str
    instance_number: int | None
    body_part: str
    transfer_syntax: str
    """Transfer Syntax UID from the file meta; ``''`` when the object has none."""


class NotDicom(Exception):
    """Not a DICOM object, or its header is unusable; str(exc) is the reason (one short line)."""


class NeedMore(Exception):
    """The header continues past the bytes given; parse again with at least ``wanted`` bytes."""

    def __init__(self, wanted: int) -> None:
        super().__init__(f"header continues; read the first {wanted} bytes")
        self.wanted = wanted


class _Deflated(Exception):
    """Raised from inside pydicom where it would inflate the rest of the object in one go."""

    def __init__(self, offset: int) -> None:
        super().__init__(offset)
        self.offset = offset


class _Probe(io.BytesIO):
    """The bytes given, remembering how pydicom's reads met their end.

    A short read tells "the parse wanted more" apart from "the parse finished"; a read that got
    some but not all of its bytes means the object is torn mid-element.
    """

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.ran_out = False
        self.torn = False
        self.need = 0

    def read(self, size: int | None = -1, /) -> bytes:
        start = self.tell()
        if size is None or size < 0:
            # Only the deflate branch of read_partial reads "the rest"; inflating is done here
            # instead, bounded and incrementally (see _parse_deflated).
            raise _Deflated(start)
        chunk = super().read(size)
        if len(chunk) < size:
            self.ran_out = True
            self.torn = self.torn or bool(chunk)
            self.need = max(self.need, start + size)
        return chunk


@dataclass
class _Attempt:
    """What one pydicom pass over a buffer produced, and how it ended."""

    dataset: Dataset | None = None
    meta: Dataset | None = None
    stopped: bool = False
    """Reached a top-level element past the wanted ones: nothing after it matters."""
    ran_out: bool = False
    torn: bool = False
    need: int = 0
    error: Exception | None = None
    last_start: int | None = None
    """Offset of the last top-level element begun: a clean place to cut a damaged buffer."""
    charset_value: tuple[int, int] | None = None
    """Offset and length of the Specific Character Set value, if one was met."""
    deflated_at: int | None = None


def _run(buffer: bytes, *, body_only: bool = False) -> _Attempt:
    """Parse ``buffer``: a whole Part 10 stream, or (``body_only``) an inflated explicit VR
    little endian dataset.

    pydicom gives up on the whole dataset when the Specific Character Set is unusable (a NUL
    in it, say); the tags are still worth having, so the parse is tried again with that value
    blanked, which leaves the text decoded with the default repertoire.
    """
    attempt = _pass(buffer, body_only)
    if attempt.error is None or attempt.charset_value is None:
        return attempt
    start, length = attempt.charset_value
    end = min(start + length, len(buffer))  # the length is the object's word: bound it
    retry = _pass(buffer[:start] + b" " * (end - start) + buffer[end:], body_only)
    return retry if retry.error is None else attempt


def _pass(buffer: bytes, body_only: bool) -> _Attempt:
    """One pass of pydicom over ``buffer``, noting how it ended."""
    attempt = _Attempt()
    probe = _Probe(buffer)

    def stop(tag: BaseTag, vr: str | None, length: int) -> bool:
        header = 12 if vr in EXPLICIT_VR_LENGTH_32 else 8
        attempt.last_start = max(probe.tell() - header, 0)
        if tag == _CHARSET and length != 0xFFFFFFFF:
            attempt.charset_value = (probe.tell(), length)
        if tag > _LAST_WANTED:
            attempt.stopped = True
            return True
        return False

    try:
        if body_only:
            attempt.dataset = read_dataset(probe, False, True, stop_when=stop)
        else:
            found = read_partial(probe, stop_when=stop, force=True)
            attempt.dataset = found
            attempt.meta = found.file_meta
    except _Deflated as deflated:
        attempt.deflated_at = deflated.offset
    except Exception as exc:  # pydicom fails on broken input in many ways; all are "unreadable"
        attempt.error = exc
    attempt.ran_out, attempt.torn, attempt.need = probe.ran_out, probe.torn, probe.need
    return attempt


def _grow(have: int, need: int, total_size: int) -> NeedMore | NotDicom:
    """The next read: what the parse asked for plus one probe, at least double, within limits."""
    if have >= HEADER_LIMIT or (need > HEADER_LIMIT and total_size > HEADER_LIMIT):
        return _too_large()
    return NeedMore(min(total_size, HEADER_LIMIT, max(2 * have, need + HEADER_PROBE)))


def _too_large() -> NotDicom:
    return NotDicom(f"header larger than {HEADER_LIMIT // (1024 * 1024)} MiB")


def _plausible_start(data: bytes) -> bool:
    """Whether ``data`` opens with an element a dataset without file meta would start with."""
    if len(data) < 8:
        return False
    group, element = struct.unpack_from("<HH", data)
    if group in _FIRST_GROUPS:
        if data[4:6] in _VALID_VRS:
            return True
        (length,) = struct.unpack_from("<I", data, 4)
        # A group length element holds one UL; this also turns away runs of zero bytes.
        return length == 4 if element == 0 else length < _IMPLICIT_FIRST_LENGTH
    # Big endian data is always explicit VR.
    group, _ = struct.unpack_from(">HH", data)
    return group in _FIRST_GROUPS and data[4:6] in _VALID_VRS


def _sniff(data: bytes, total_size: int) -> None:
    """Reject what is plainly not DICOM before pydicom sees it (see the module docstring)."""
    whole = len(data) >= total_size
    if not data and whole:
        raise NotDicom("not DICOM: empty object")
    if len(data) >= _SIGNATURE_END and data[128:_SIGNATURE_END] == b"DICM":
        return
    if len(data) < _SIGNATURE_END and not whole:
        # The signature may still follow: the preamble's 128 bytes can hold anything.
        raise _grow(len(data), _SIGNATURE_END, total_size)
    if not _plausible_start(data):
        raise NotDicom("not DICOM: no DICM signature and no DICOM element at the start")


def parse_header(data: bytes, total_size: int) -> Header:
    """``data`` is the first len(data) bytes of an object of ``total_size`` bytes.

    Returns the Header, or raises ``NeedMore`` (fetch ``wanted`` bytes and call again) or
    ``NotDicom``; nothing else, whatever the bytes.
    """
    _quiet_pydicom()
    try:
        return _parse_header(bytes(data), total_size)
    except (NotDicom, NeedMore):
        raise
    except Exception as exc:  # a last guard: the contract is two exception types, never more
        raise NotDicom(f"unreadable header: {_brief(exc)}") from exc


def _parse_header(data: bytes, total_size: int) -> Header:
    _sniff(data, total_size)
    whole = len(data) >= total_size
    attempt = _run(data)
    if attempt.deflated_at is not None:
        return _parse_deflated(data, total_size, attempt.deflated_at)
    dataset, meta, damaged = _settle(attempt, data, whole, total_size)
    return _header(dataset, meta, damaged)


def _settle(
    attempt: _Attempt, buffer: bytes, whole: bool, total_size: int, *, body_only: bool = False
) -> tuple[Dataset | None, Dataset | None, bool]:
    """The dataset and file meta to read tags from and whether they are damaged, or NeedMore
    when more bytes would let the parse reach the end of the header."""
    if attempt.stopped and attempt.error is None:
        return attempt.dataset, attempt.meta, False
    if attempt.ran_out and not whole:
        raise _grow(len(buffer), attempt.need, total_size)
    if attempt.error is None:
        # pydicom ended the dataset by itself: at the end of a whole object (torn only if the
        # last read came up short), or at a stray delimiter.
        return attempt.dataset, attempt.meta, attempt.torn
    # Broken inside an element: keep the elements before it, cut at a clean boundary.
    if attempt.last_start is None:
        return None, None, True
    salvage = _run(buffer[: attempt.last_start], body_only=body_only)
    if salvage.error is not None:
        return None, None, True
    return salvage.dataset, salvage.meta, True


def _parse_deflated(data: bytes, total_size: int, offset: int) -> Header:
    """Deflated Explicit VR Little Endian: inflate only as much as the header needs.

    pydicom would inflate the whole rest of the object at once, which fails on a prefix and
    lets a small object expand without bound.
    """
    meta = _run(data[:offset]).meta
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        body = inflater.decompress(data[offset:], HEADER_LIMIT)
    except zlib.error as exc:
        raise NotDicom(f"unreadable header: deflated data is corrupt ({_brief(exc)})") from exc
    capped = len(body) >= HEADER_LIMIT
    complete = inflater.eof or len(data) >= total_size
    attempt = _run(body, body_only=True)
    if not attempt.stopped and attempt.ran_out:
        if capped:
            raise _too_large()
        if not complete:
            # How far the compressed stream must go for the bytes wanted is unknown: double.
            raise _grow(len(data), len(data) + 1, total_size)
    dataset, _, damaged = _settle(attempt, body, True, total_size, body_only=True)
    return _header(dataset, meta, damaged, DeflatedExplicitVRLittleEndian)


def _header(
    dataset: Dataset | None, meta: Dataset | None, damaged: bool, syntax: str = ""
) -> Header:
    """Build the Header; apply the UID rule of the module docstring."""
    ds = dataset if dataset is not None else Dataset()
    media_uid = _text(meta, 0x00020003) if meta is not None else ""
    header = Header(
        patient_id=_text(ds, 0x00100020),
        patient_name=_text(ds, 0x00100010),
        study_uid=_text(ds, _STUDY_UID),
        study_date=_date(_text(ds, 0x00080020)),
        study_time=_text(ds, 0x00080030),
        accession=_text(ds, 0x00080050),
        study_description=_text(ds, 0x00081030),
        series_uid=_text(ds, _SERIES_UID),
        series_number=_integer(ds, 0x00200011),
        modality=_text(ds, 0x00080060),
        series_description=_text(ds, 0x0008103E),
        # The file meta repeats the instance UID; a dataset missing it still names it there.
        sop_uid=_text(ds, _SOP_UID) or media_uid,
        instance_number=_integer(ds, 0x00200013),
        body_part=_text(ds, 0x00180015),
        transfer_syntax=syntax or (_text(meta, 0x00020010) if meta is not None else ""),
    )
    uids = (header.study_uid, header.series_uid, _text(ds, _SOP_UID))
    if damaged and not all(uids):
        raise NotDicom("header truncated or unreadable before the study, series and SOP UIDs")
    if not any(uids) and not media_uid:
        # With a file meta group it is DICOM of a kind, just not an instance to index.
        kind = "" if meta else "not DICOM: "
        raise NotDicom(f"{kind}no study, series or SOP instance UID")
    return header


def _text(ds: Dataset, tag: int) -> str:
    """The element's value as one string, '' when absent.  Surrounding spaces and NULs go: they
    are padding, and insignificant in every VR read here."""
    try:
        if tag not in ds:
            return ""
        value = ds[tag].value
    except Exception:
        value = _raw(ds, tag)
    try:
        return _flatten(value).strip(" \x00")
    except Exception:
        return ""


def _flatten(value: Any) -> str:
    """Any element value pydicom produces as text."""
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray):
        # No VR to decode by (an unknown or UN element): latin-1 never fails.
        return bytes(value).decode("latin-1")
    if isinstance(value, str):
        return str(value)
    if isinstance(value, Dataset):
        return ""
    if isinstance(value, MultiValue | list | tuple):
        # Multi-valued: joined as DICOM stores it, so nothing is lost.
        return "\\".join(_flatten(item) for item in value)
    return str(value)


def _raw(ds: Dataset, tag: int) -> bytes:
    """The element's undecoded bytes (pydicom's conversion failed or cannot be trusted)."""
    try:
        element = ds.get_item(tag)
    except Exception:
        return b""
    value = getattr(element, "value", None)
    return bytes(value) if isinstance(value, bytes | bytearray) else b""


def _integer(ds: Dataset, tag: int) -> int | None:
    """An IS value as an int: the first value, in the 32-bit range DICOM allows, else None."""
    try:
        if tag not in ds:
            return None
    except Exception:
        return None
    # The raw bytes rather than pydicom's IS: its conversion rejects or warns about the very
    # values (``abc``, ``1.5``, 10,000 digits) this has to shrug off.
    text = _raw(ds, tag).decode("latin-1").split("\\")[0].strip(" \x00")
    if not text:
        try:
            text = _flatten(ds[tag].value).split("\\")[0].strip(" \x00")
        except Exception:
            return None
    if not _INTEGER.fullmatch(text):
        return None
    number = int(text.split(".")[0])
    return number if number in _INT32 else None


def _date(text: str) -> str:
    """``YYYYMMDD`` for a real calendar date (the old ``YYYY.MM.DD`` form too), else ''."""
    digits = text.replace(".", "") if len(text) == 10 and text[4] == text[7] == "." else text
    if len(digits) != 8 or not digits.isascii() or not digits.isdigit():
        return ""
    try:
        datetime.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        return ""
    return digits


def _brief(exc: BaseException) -> str:
    """An exception as one short line for a NotDicom reason."""
    text = " ".join(str(exc).split())[:120]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def folder_name(text: str, limit: int = 64, fallback: str = "unknown") -> str:
    """A safe single path component for the browse view.

    Tag values come from whoever wrote the object, so anything may be in them: the result has
    no '/', no backslash (Windows clients of a re-export split on it), no control or invisible
    format characters (bidi overrides could disguise a name), no surrounding spaces or dots, is
    never '.' or '..', and fits in ``limit`` UTF-8 bytes without a split character.  The DICOM
    name separator '^' becomes a space.  Empty after cleaning: ``fallback``, cleaned the same.
    """
    if limit < 1:
        raise ValueError("limit must be at least one byte")
    return _clean(text, limit) or _clean(fallback, limit) or "_"


def _clean(text: str, limit: int) -> str:
    words = " ".join(text.replace("^", " ").split())
    kept: list[str] = []
    for char in words:
        category = unicodedata.category(char)
        if category == "Cf":
            continue
        if category in ("Cc", "Cs") or char in "/\\":
            kept.append("_")
        else:
            kept.append(char)
    name = "".join(kept).strip(" .")
    encoded = name.encode("utf-8")
    if len(encoded) > limit:
        name = encoded[:limit].decode("utf-8", "ignore").rstrip(" .")
    return name


# -- sample instances ----------------------------------------------------------------------------
#
# Used by the demo archive (cloudfs/demo.py), the tests (tests/dicom_samples.py) and the viewer
# benchmark (bench/ctstudy.py).  Everything is derived from the arguments, so the same call gives
# the same bytes: an archive can be regenerated instead of stored, a test can predict every tag,
# and a benchmark can check what it read against a digest of what it generated.

_SAMPLE_SOP_CLASSES = {"CT": CTImageStorage, "MR": MRImageStorage}
_SAMPLE_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "cloudfs:sample-instances")


def derived_uid(*parts: str) -> str:
    """A 2.25 UID from a name-based UUID of ``parts``: the same parts, the same UID.

    (pydicom's ``generate_uid(prefix=None)`` ignores its entropy sources and is random, and a
    sample archive needs the same UIDs on every run.)
    """
    return f"2.25.{uuid.uuid5(_SAMPLE_NAMESPACE, chr(0).join(parts)).int}"


_SAMPLE_IMPLEMENTATION_UID = UID(derived_uid("implementation"))


def sample_pixels(seed: str, size: int) -> bytes:
    """``size`` bytes of a stream seeded by ``seed``: no two instances and no two blocks of one
    instance share bytes, so bytes served from the wrong place never pass a digest check.
    (SHAKE-128 makes them at several hundred MB/s, faster than ``random.randbytes``.)"""
    return hashlib.shake_128(seed.encode()).digest(size)


def sample_instance(
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
    slice_thickness: float = 1.0,
    implicit_vr: bool = False,
    preamble: bool = True,
    charset: str | None = None,
    extra: Mapping[str | int, object] | None = None,
) -> bytes:
    """One valid instance of ``rows`` x ``columns`` 16-bit pixels: CT or MR Image Storage for
    those modalities (axial slices ``slice_thickness`` mm apart, in Instance Number order),
    Secondary Capture otherwise.

    Part 10 (preamble, ``DICM``, file meta) by default, as a modality writes it;
    ``preamble=False`` writes the dataset alone, as some archives hold them.  Explicit VR little
    endian unless ``implicit_vr``.  ``charset`` is the Specific Character Set the text is
    encoded with.  ``extra`` adds, overrides or (with None) removes elements after the others
    are set: a keyword maps to its value, an int tag to a ``(VR, value)`` pair (private tags).
    """
    _quiet_pydicom()  # odd values set on purpose are no news, here as in parsing
    sop_class = _SAMPLE_SOP_CLASSES.get(modality, SecondaryCaptureImageStorage)
    z = f"{-(instance_number - 1) * slice_thickness:g}"
    ds = Dataset()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
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
    ds.BodyPartExamined = "CHEST" if modality in _SAMPLE_SOP_CLASSES else ""
    ds.SliceThickness = f"{slice_thickness:g}"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = accession[:16]
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = ["-250", "-250", z]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = derived_uid(study_uid, "frame")
    ds.SliceLocation = z
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.PixelSpacing = ["0.9765625", "0.9765625"]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0
    if modality == "CT":
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
    ds.PixelData = sample_pixels(sop_uid, rows * columns * 2)
    for key, value in (extra or {}).items():
        if value is None:
            del ds[Tag(key)]
        elif isinstance(key, int):
            vr, item = cast(tuple[str, object], value)
            ds.add_new(Tag(key), vr, item)
        else:
            setattr(ds, key, value)
    out = io.BytesIO()
    if preamble:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit_vr else ExplicitVRLittleEndian
        )
        ds.file_meta.ImplementationClassUID = _SAMPLE_IMPLEMENTATION_UID
        dcmwrite(out, ds, enforce_file_format=True)
    else:
        dcmwrite(out, ds, implicit_vr=implicit_vr, little_endian=True)
    return out.getvalue()
