"""DICOM header parsing: pydicom's own sample files, synthetic instances, prefixes of both, and
bytes that are not DICOM or are hostile.  No FUSE, no network."""

from __future__ import annotations

import json
import random
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dicom_samples import instance_bytes, study_uids, synthetic_study
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian

from cloudfs.dicom import (
    HEADER_LIMIT,
    HEADER_PROBE,
    Header,
    NeedMore,
    NotDicom,
    folder_name,
    parse_header,
)

DATA = Path(pydicom.data.__file__).parent
TEST_FILES = sorted((DATA / "test_files").glob("*.dcm"))
CHARSET_FILES = sorted((DATA / "charset_files").glob("*.dcm"))
KiB = 1024


def sample_path(name: str) -> Path:
    """A file bundled with pydicom (never one it would download)."""
    for folder in ("test_files", "charset_files"):
        if (DATA / folder / name).exists():
            return DATA / folder / name
    raise FileNotFoundError(name)


def sample(name: str) -> bytes:
    return sample_path(name).read_bytes()


CT_SMALL = sample("CT_small.dcm")
MR_IMPLICIT = sample("MR_small_implicit.dcm")
RT_PLAN = sample("rtplan.dcm")


def parse(data: bytes) -> Header:
    return parse_header(data, len(data))


def outcome(data: bytes, total_size: int) -> Header | str:
    """The Header, or the NotDicom reason: comparable across calls."""
    try:
        return parse_header(data, total_size)
    except NotDicom as exc:
        return f"NotDicom: {exc}"


def grow(full: bytes, start: int) -> tuple[Header | str, int]:
    """Parse as the indexer does: from ``start`` bytes, refetching what NeedMore asks for."""
    have, rounds = start, 0
    while True:
        rounds += 1
        try:
            return outcome(full[:have], len(full)), rounds
        except NeedMore as more:
            assert have < more.wanted <= min(len(full), HEADER_LIMIT)
            have = more.wanted


def make(**overrides: Any) -> bytes:
    """A small synthetic CT instance; keyword arguments override instance_bytes'."""
    arguments: dict[str, Any] = dict(
        patient_id="PAT-1",
        patient_name="DOE^JANE",
        study_uid="1.2.3.100",
        study_date="20260110",
        study_description="CT CHEST",
        accession="ACC1",
        series_uid="1.2.3.100.2",
        series_number=2,
        modality="CT",
        series_description="AXIAL 1mm",
        sop_uid="1.2.3.100.2.3",
        instance_number=3,
        rows=16,
        columns=16,
    )
    arguments.update(overrides)
    return instance_bytes(**arguments)


# pydicom's sample files


@pytest.mark.parametrize("path", TEST_FILES + CHARSET_FILES, ids=lambda path: path.name)
def test_every_bundled_file_parses_or_is_not_dicom(path: Path) -> None:
    """Every sample is a Header or NotDicom, and growing from a small prefix gives the same."""
    full = path.read_bytes()
    whole = outcome(full, len(full))
    assert grow(full, 256)[0] == whole
    assert grow(full, 0)[0] == whole
    for size in (512, HEADER_PROBE):
        try:
            assert outcome(full[:size], len(full)) == whole
        except NeedMore as more:
            assert size < more.wanted <= len(full)


def test_ct_small() -> None:
    header = parse(sample("CT_small.dcm"))
    assert header == Header(
        patient_id="1CT1",
        patient_name="CompressedSamples^CT1",
        study_uid="1.3.6.1.4.1.5962.1.2.1.20040119072730.12322",
        study_date="20040119",
        study_time="072730",
        accession="",
        study_description="e+1",
        series_uid="1.3.6.1.4.1.5962.1.3.1.1.20040119072730.12322",
        series_number=1,
        modality="CT",
        series_description="",
        sop_uid="1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322",
        instance_number=1,
        body_part="",
        transfer_syntax="1.2.840.10008.1.2.1",
    )


@pytest.mark.parametrize(
    ("name", "syntax"),
    [
        ("MR_small.dcm", "1.2.840.10008.1.2.1"),
        ("MR_small_implicit.dcm", "1.2.840.10008.1.2"),
        ("MR_small_bigendian.dcm", "1.2.840.10008.1.2.2"),
        ("MR_small_RLE.dcm", "1.2.840.10008.1.2.5"),
        ("MR_small_jp2klossless.dcm", "1.2.840.10008.1.2.4.90"),
        ("MR_truncated.dcm", "1.2.840.10008.1.2.1"),  # torn in the pixel data: header intact
    ],
)
def test_one_mr_instance_in_every_encoding(name: str, syntax: str) -> None:
    header = parse(sample(name))
    assert header.patient_id == "4MR1"
    assert header.patient_name == "CompressedSamples^MR1"
    assert header.study_uid == "1.3.6.1.4.1.5962.1.2.4.20040826185059.5457"
    assert header.series_uid == "1.3.6.1.4.1.5962.1.3.4.1.20040826185059.5457"
    assert header.sop_uid == "1.3.6.1.4.1.5962.1.1.4.1.1.20040826185059.5457"
    assert (header.modality, header.study_date, header.study_time) == ("MR", "20040826", "185059")
    assert (header.series_number, header.instance_number) == (1, 1)
    assert header.transfer_syntax == syntax


def test_jpeg2000_header_only() -> None:
    header = parse(sample("JPEG2000.dcm"))
    assert (header.modality, header.instance_number) == ("NM", 3)
    assert header.study_description == "Whole Body Bone"
    assert header.body_part == "WHOLE BODY"
    assert header.transfer_syntax == "1.2.840.10008.1.2.4.91"


@pytest.mark.parametrize("name", ["CT_small.dcm", "JPEG2000.dcm", "rtplan.dcm", "chrX1.dcm"])
def test_fields_agree_with_a_full_pydicom_read(name: str) -> None:
    header = parse(sample(name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(sample_path(name))
    assert header.patient_name == str(ds.PatientName)
    assert header.patient_id == ds.PatientID
    assert header.study_uid == ds.StudyInstanceUID
    assert header.series_uid == ds.SeriesInstanceUID
    assert header.sop_uid == ds.SOPInstanceUID
    assert header.modality == ds.Modality
    assert header.series_number == ds.get("SeriesNumber")
    assert header.instance_number == ds.get("InstanceNumber")


@pytest.mark.parametrize("name", ["ExplVR_LitEndNoMeta.dcm", "ExplVR_BigEndNoMeta.dcm"])
def test_no_preamble_no_file_meta(name: str) -> None:
    header = parse(sample(name))
    assert header.study_uid == "1.2.333.4444.5.6.7.8.9"
    assert header.series_uid == "1.2.333.4444.5.6.7.8.99"
    assert header.sop_uid == "1.2.333.4444.5.6.7.8"
    assert header.modality == "RTPLAN"
    assert header.transfer_syntax == ""


def test_no_meta_sample_is_one_byte_off() -> None:
    """pydicom's no_meta.dcm is CT_small's dataset behind one stray byte, so no element starts at
    offset 0 (pydicom itself reads nonsense from it); without that byte it parses."""
    data = sample("no_meta.dcm")
    with pytest.raises(NotDicom, match="^not DICOM"):
        parse(data)
    header = parse(data[1:])
    assert header == Header(**{**vars(parse(sample("CT_small.dcm"))), "transfer_syntax": ""})


def test_deflated_sample() -> None:
    data = sample("image_dfl.dcm")
    header = parse(data)
    assert header.study_uid == "1.3.6.1.4.1.5962.1.2.0.977067310.6001.0"
    assert header.modality == "OT"
    assert header.transfer_syntax == DeflatedExplicitVRLittleEndian
    for size in (200, 400, 1000, 2000):
        assert grow(data, size)[0] == header


def test_deflated_header_cannot_inflate_without_bound() -> None:
    """A few KiB of deflated zeros that would inflate past HEADER_LIMIT before the UIDs."""
    data = _deflated(extra={0x00091010: ("OB", bytes(HEADER_LIMIT + KiB))})
    assert len(data) < 64 * KiB
    with pytest.raises(NotDicom, match="larger than"):
        parse(data)


def _deflated(**overrides: Any) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(make(**overrides)))
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        out = pydicom.filebase.DicomBytesIO()
        ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_synthetic_deflated_round_trip() -> None:
    data = _deflated()
    assert parse(data) == Header(
        **{**vars(parse(make())), "transfer_syntax": DeflatedExplicitVRLittleEndian}
    )
    assert grow(data, 256)[0] == parse(data)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("chrH31.dcm", "Yamada^Tarou=山田^太郎=やまだ^たろう"),
        ("chrRuss.dcm", "Люкceмбypг"),
        ("chrGreek.dcm", "Διονυσιος"),
        ("chrX1.dcm", "Wang^XiaoDong=王^小東"),
        ("chrFren.dcm", "Buc^Jérôme"),
        ("chrGerm.dcm", "Äneas^Rüdiger"),
        ("chrHbrw.dcm", "שרון^דבורה"),
        ("chrI2.dcm", "Hong^Gildong=洪^吉洞=홍^길동"),
    ],
)
def test_character_sets(name: str, expected: str) -> None:
    assert parse(sample(name)).patient_name == expected


def test_truncated_rtplan_keeps_its_header() -> None:
    """rtplan_truncated.dcm is cut after the identifying tags: they are all there."""
    assert parse(sample("rtplan_truncated.dcm")) == parse(sample("rtplan.dcm"))


# prefixes and NeedMore


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "rtplan.dcm"]
)
@pytest.mark.parametrize("size", [0, 100, 132, 512, 2 * KiB, HEADER_PROBE])
def test_prefix_needs_more_or_agrees(name: str, size: int) -> None:
    full = sample(name)
    try:
        header = parse_header(full[:size], len(full))
    except NeedMore as more:
        assert size < more.wanted <= len(full)
    else:
        assert header == parse(full)


def test_first_probe_is_enough_for_a_typical_instance() -> None:
    data = make(rows=512, columns=512)
    assert parse_header(data[:HEADER_PROBE], len(data)) == parse(data)
    assert grow(data, HEADER_PROBE)[1] == 1


def test_large_private_tag_takes_a_second_round() -> None:
    """200 KiB of private data ahead of the patient and study tags."""
    data = make(
        extra={0x00090010: ("LO", "CLOUDFS TEST"), 0x00091010: ("OB", bytes(200 * KiB))},
        rows=256,
        columns=256,
    )
    with pytest.raises(NeedMore) as first:
        parse_header(data[:HEADER_PROBE], len(data))
    assert first.value.wanted > 200 * KiB
    header, rounds = grow(data, HEADER_PROBE)
    assert rounds == 2
    assert header == parse(data)
    assert isinstance(header, Header) and header.study_uid == "1.2.3.100"


def test_header_past_the_limit_is_refused_without_fetching_it() -> None:
    data = make(extra={0x00090010: ("LO", "CLOUDFS TEST"), 0x00091010: ("OB", bytes(5 << 20))})
    with pytest.raises(NotDicom, match="larger than 4 MiB"):
        parse_header(data[:HEADER_PROBE], len(data))
    with pytest.raises(NotDicom, match="larger than 4 MiB"):
        parse_header(data[:HEADER_LIMIT], len(data))


def test_object_torn_inside_the_header() -> None:
    full = make()
    torn_before_uids = full[: full.index(b"DOE^JANE") + 4]
    with pytest.raises(NotDicom, match="truncated"):
        parse(torn_before_uids)
    # Torn after Instance Number but before the first tag past it: all three UIDs are there.
    header = parse(full[: full.index(b"\x20\x00\x32\x00") + 6])
    assert header == parse(full)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(cut=st.integers(min_value=0, max_value=4 * KiB), name=st.sampled_from(["ct", "mr", "plan"]))
def test_any_truncation_of_a_valid_file(cut: int, name: str) -> None:
    """A prefix is NeedMore or the same Header; the prefix as a whole (torn) object is a Header
    or NotDicom: never another exception."""
    full = {"ct": CT_SMALL, "mr": MR_IMPLICIT, "plan": RT_PLAN}[name]
    prefix = full[:cut]
    try:
        assert parse_header(prefix, len(full)) == parse(full)
    except NeedMore as more:
        assert cut < more.wanted <= len(full)
    result = outcome(prefix, len(prefix))
    assert isinstance(result, Header | str)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    flips=st.lists(
        st.tuples(st.integers(min_value=0, max_value=2 * KiB), st.integers(0, 255)),
        min_size=1,
        max_size=8,
    ),
    whole=st.booleans(),
)
def test_corrupted_headers_never_escape(flips: list[tuple[int, int]], whole: bool) -> None:
    data = bytearray(CT_SMALL)
    for position, value in flips:
        data[position] = value
    _only_contract_errors(lambda: parse_header(bytes(data), len(data) if whole else 10 << 20))


def _only_contract_errors(call: Callable[[], Header]) -> None:
    try:
        call()
    except NeedMore as more:
        assert more.wanted > 0
    except NotDicom as exc:
        assert str(exc) and "\n" not in str(exc)


# not DICOM


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello, world\n" * 40,
        json.dumps({"PatientName": "DOE^JANE", "StudyInstanceUID": "1.2.3"}).encode() * 10,
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(300),
        random.Random(7).randbytes(4096),
        bytes(4096),
        b"DICM" + bytes(200),
    ],
    ids=["empty", "text", "json", "png", "random", "zeros", "dicm-at-0"],
)
def test_not_dicom(data: bytes) -> None:
    with pytest.raises(NotDicom, match="^not DICOM"):
        parse(data)
    if len(data) >= 132:
        # Known at once from the first bytes, whatever the object's size.
        with pytest.raises(NotDicom, match="^not DICOM"):
            parse_header(data[:132], 10 << 20)


def test_preamble_without_dataset_has_no_uids() -> None:
    with pytest.raises(NotDicom):
        parse(bytes(128) + b"DICM" + bytes(64))


def test_a_short_prefix_cannot_decide_yet() -> None:
    """Fewer than 132 bytes: the DICM signature may still follow."""
    with pytest.raises(NeedMore) as more:
        parse_header(b"hello", 10 << 20)
    assert more.value.wanted >= 132


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2048), extra=st.integers(min_value=0, max_value=1 << 30))
def test_random_bytes_never_escape(data: bytes, extra: int) -> None:
    _only_contract_errors(lambda: parse_header(data, len(data) + extra))


@settings(max_examples=200, deadline=None)
@given(tail=st.binary(min_size=0, max_size=1024), whole=st.booleans())
def test_random_bytes_after_the_signature_never_escape(tail: bytes, whole: bool) -> None:
    data = bytes(128) + b"DICM" + tail
    _only_contract_errors(lambda: parse_header(data, len(data) if whole else len(data) * 4))


# hostile and odd values


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"abc ", None),
        (b"", None),
        (b"1.5 ", None),
        (b"1.0 ", 1),
        (b" 42", 42),
        (b"+7\\8", 7),
        (b"-3", -3),
        (b"9" * 5000, None),
        (b"99999999999", None),
        (b"\xd9\xa3", None),  # an Arabic-Indic digit: int() would take it, DICOM does not
    ],
)
def test_odd_instance_numbers(raw: bytes, expected: int | None) -> None:
    data = make(extra={0x00200013: ("IS", raw)})
    assert parse(data).instance_number == expected


def test_missing_uids_are_empty_not_fatal() -> None:
    header = parse(make(extra={"StudyInstanceUID": None, "SeriesInstanceUID": None}))
    assert (header.study_uid, header.series_uid) == ("", "")
    assert header.sop_uid == "1.2.3.100.2.3"


def test_sop_uid_from_file_meta_when_the_dataset_lacks_it() -> None:
    header = parse(make(extra={"SOPInstanceUID": None}))
    assert header.sop_uid == "1.2.3.100.2.3"


def test_no_uid_anywhere_is_not_dicom() -> None:
    data = make(
        preamble=False,
        extra={"StudyInstanceUID": None, "SeriesInstanceUID": None, "SOPInstanceUID": None},
    )
    with pytest.raises(NotDicom, match="no study, series or SOP"):
        parse(data)


HOSTILE: dict[str, dict[int | str, object]] = {
    "slashes": {"PatientID": "../../etc/passwd", "SeriesDescription": "a/b/../c"},
    "dots": {"PatientID": "..", "StudyDescription": "."},
    "nul-and-controls": {
        0x00100010: ("PN", b"DOE\x00^JA\x01NE\x1b[2J"),
        0x0008103E: ("LO", b"line\nbreak\ttab\x7f"),
    },
    "long-description": {0x00081030: ("LO", b"x" * 10_000)},
    "unknown-charset": {0x00080005: ("CS", b"ISO_IR 999"), 0x00100010: ("PN", b"M\xfcller ")},
    "charset-garbage": {0x00080005: ("CS", b"\xff\xfe\x00 "), 0x00100010: ("PN", b"\xc3\x28")},
    "wrong-charset": {0x00080005: ("CS", b"ISO_IR 192"), 0x00100010: ("PN", b"M\xfcller ")},
    "multi-valued": {0x00081030: ("LO", b"A\\B\\C "), 0x00080060: ("CS", b"CT\\MR")},
    "bad-dates": {0x00080020: ("DA", b"20240230"), 0x00080030: ("TM", b"\xff ")},
    "bidi-override": {0x00100010: ("PN", "ABC\u202eFDP.EXE".encode())},
    "series-number-words": {0x00200011: ("IS", b"two ")},
    "uid-as-unknown-vr": {0x0020000E: ("UN", b"1.2.3.4.5\x00")},
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
@pytest.mark.parametrize("implicit_vr", [False, True], ids=["explicit", "implicit"])
def test_hostile_values_never_raise_and_name_safely(case: str, implicit_vr: bool) -> None:
    data = make(implicit_vr=implicit_vr, extra=HOSTILE[case])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", append=True)
        header = parse(data)
    assert not [w for w in caught if "pydicom" in w.filename], "a pydicom warning escaped"
    assert header.study_uid == "1.2.3.100" and header.sop_uid
    for value in vars(header).values():
        if isinstance(value, str):
            _assert_safe(folder_name(value), 64)


@settings(max_examples=200, deadline=None)
@given(charset=st.binary(max_size=40), name=st.binary(max_size=40))
def test_any_character_set_bytes_keep_the_header(charset: bytes, name: bytes) -> None:
    """Garbage in (0008,0005) or the name decodes best-effort; the UIDs survive it."""
    data = make(extra={0x00080005: ("CS", charset), 0x00100010: ("PN", name)})
    header = parse(data)
    assert header.study_uid == "1.2.3.100"
    assert header.sop_uid == "1.2.3.100.2.3"


def test_torn_object_keeps_its_transfer_syntax() -> None:
    full = make()
    start = full.index(b"\x20\x00\x32\x00")  # Image Position (Patient), after the UIDs
    torn = full[:start] + b"\x20\x00\x32\x00DS\xff\x00"  # claims 255 bytes, has none
    header = parse(torn)
    assert header == parse(full)


@pytest.mark.parametrize("implicit_vr", [False, True], ids=["explicit", "implicit"])
def test_unusable_character_set_with_a_huge_length(implicit_vr: bool) -> None:
    """A NUL in the character set makes pydicom give up; a length of ~4 GiB must not make the
    retry allocate it."""
    data = make(implicit_vr=implicit_vr, charset="ISO_IR 100")
    if implicit_vr:
        good = b"\x08\x00\x05\x00\x0a\x00\x00\x00ISO_IR 100"
        bad = b"\x08\x00\x05\x00\xf0\xff\xff\xffI\x00O_IR 100"
    else:
        good = b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100"
        bad = b"\x08\x00\x05\x00CS\xff\xff\x00SO_IR 100"
    assert data.count(good) == 1
    data = data.replace(good, bad)
    started = time.monotonic()
    with pytest.raises(NotDicom):
        parse(data)
    if implicit_vr:
        # In a larger object, the claimed length alone says the header cannot fit.
        with pytest.raises(NotDicom, match="larger than"):
            parse_header(data, 1 << 33)
    assert time.monotonic() - started < 1


def test_hostile_value_details() -> None:
    assert parse(make(extra=HOSTILE["long-description"])).study_description == "x" * 10_000
    assert parse(make(extra=HOSTILE["multi-valued"])).study_description == "A\\B\\C"
    assert parse(make(extra=HOSTILE["bad-dates"])).study_date == ""
    assert parse(make(extra=HOSTILE["series-number-words"])).series_number is None
    assert parse(make(extra=HOSTILE["slashes"])).patient_id == "../../etc/passwd"
    assert parse(make(extra=HOSTILE["unknown-charset"])).patient_name.startswith("M")
    assert parse(make(study_date="2024.01.31")).study_date == "20240131"
    assert parse(make(extra=HOSTILE["uid-as-unknown-vr"])).series_uid == "1.2.3.4.5"
    padded = parse(make(extra={0x00081030: ("LO", b"  HEAD \x00\x00")}))
    assert padded.study_description == "HEAD"


# folder_name


def _assert_safe(name: str, limit: int) -> None:
    assert name and name not in (".", "..")
    assert "/" not in name and "\x00" not in name
    assert not any(ord(char) < 0x20 or ord(char) == 0x7F for char in name)
    assert name == name.strip(" .")
    assert len(name.encode("utf-8")) <= limit


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("DOE^JANE", "DOE JANE"),
        ("Yamada^Tarou=山田^太郎", "Yamada Tarou=山田 太郎"),
        ("  CT   CHEST\t\n", "CT CHEST"),
        ("a/b", "a_b"),
        ("a\\b", "a_b"),
        ("..", "unknown"),
        (".", "unknown"),
        ("", "unknown"),
        ("^^^^", "unknown"),
        ("...hidden...", "hidden"),
        ("NUL\x00here", "NUL_here"),
        ("ABC\u202eFDP.EXE", "ABCFDP.EXE"),
        ("lone\ud800surrogate", "lone_surrogate"),
    ],
)
def test_folder_name_examples(text: str, expected: str) -> None:
    assert folder_name(text) == expected


def test_folder_name_cuts_on_character_boundaries() -> None:
    assert folder_name("é" * 40) == "é" * 32
    assert folder_name("山" * 30, limit=10) == "山" * 3
    assert folder_name("ab cd", limit=3) == "ab"
    assert folder_name("", fallback="no name") == "no name"
    assert folder_name("..", fallback="..") == "_"


@settings(max_examples=500, deadline=None)
@given(text=st.text(), limit=st.integers(min_value=1, max_value=80))
def test_folder_name_is_always_one_safe_component(text: str, limit: int) -> None:
    _assert_safe(folder_name(text, limit), limit)


# synthetic instances


def test_synthetic_study_parses_back_to_its_tags() -> None:
    objects = synthetic_study("PAT7", 3, [("CT", 3), ("MR", 2), ("OT", 1)], rows=8, columns=8)
    study_uid, series = study_uids("PAT7", 3, 3)
    assert len(objects) == 6 and len({key for key, _ in objects}) == 6
    seen = []
    for key, data in objects:
        header = parse_header(data[:HEADER_PROBE], len(data))
        assert key == f"PAT7/{header.study_uid}/{header.series_uid}/{header.sop_uid}.dcm"
        assert (header.patient_id, header.patient_name) == ("PAT7", "DOE^JANE")
        assert (header.study_uid, header.study_date) == (study_uid, "20260110")
        assert header.study_description == "CT CHEST"
        assert header.series_number is not None
        assert header.series_uid == series[header.series_number - 1]
        seen.append((header.modality, header.series_number, header.instance_number))
    expected = [("CT", 1, 1), ("CT", 1, 2), ("CT", 1, 3), ("MR", 2, 1), ("MR", 2, 2), ("OT", 3, 1)]
    assert seen == expected
    assert synthetic_study("PAT7", 3, [("CT", 1)], rows=8, columns=8)[0] == objects[0]


def test_synthetic_instances_differ_in_their_pixels() -> None:
    first, second = synthetic_study("P", 0, [("CT", 2)], rows=32, columns=32)
    assert first[1][-2048:] != second[1][-2048:]
    assert len(first[1]) > 32 * 32 * 2


@pytest.mark.parametrize("implicit_vr", [False, True], ids=["explicit", "implicit"])
@pytest.mark.parametrize("preamble", [True, False], ids=["part10", "bare"])
def test_synthetic_encodings(implicit_vr: bool, preamble: bool) -> None:
    data = make(implicit_vr=implicit_vr, preamble=preamble)
    header = parse(data)
    assert header == Header(
        patient_id="PAT-1",
        patient_name="DOE^JANE",
        study_uid="1.2.3.100",
        study_date="20260110",
        study_time="093000",
        accession="ACC1",
        study_description="CT CHEST",
        series_uid="1.2.3.100.2",
        series_number=2,
        modality="CT",
        series_description="AXIAL 1mm",
        sop_uid="1.2.3.100.2.3",
        instance_number=3,
        body_part="CHEST",
        transfer_syntax=(
            ("1.2.840.10008.1.2" if implicit_vr else "1.2.840.10008.1.2.1") if preamble else ""
        ),
    )
    assert (data[128:132] == b"DICM") is preamble
    if implicit_vr and preamble:
        assert header.transfer_syntax == ImplicitVRLittleEndian
    assert grow(data, 256)[0] == header


def test_synthetic_charset() -> None:
    data = make(charset="ISO_IR 192", patient_name="Müller^Jürgen", study_description="Schädel")
    header = parse(data)
    assert (header.patient_name, header.study_description) == ("Müller^Jürgen", "Schädel")
    assert folder_name(header.patient_name) == "Müller Jürgen"
