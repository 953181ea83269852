"""The DICOM features through a real FUSE mount of a real moto_server: header index, browse view,
study prefetch, pins and the commands that drive them.

"Local" is checked by freezing the S3 server and reading: only bytes in the block cache can be
served then, so these tests look at the cache, never at a clock.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pty
import re
import select
import subprocess
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import (
    PYTHON,
    Bucket,
    MotoServer,
    Mount,
    Mounter,
    cloudfs,
    drop_kernel_caches,
    wait_until,
)
from dicom_samples import instance_bytes, synthetic_study
from pydicom.data import get_charset_files, get_testdata_file

from cloudfs.dicom import folder_name

FAST = ["--upload-delay", "0.2", "--io-timeout", "4"]
VIEW = "@dicom"


def index_status(m: Mount) -> dict[str, Any]:
    result = cloudfs("index", "status", m.path, "--json", timeout=60)
    assert result.returncode == 0, f"{result.stderr}\n{m.log_tail()}"
    facts: dict[str, Any] = json.loads(result.stdout)
    return facts


def wait_indexed(m: Mount, dicom: int, timeout: float = 120) -> dict[str, Any]:
    """Wait until nothing is pending and at least ``dicom`` instances are indexed."""
    facts: dict[str, Any] = {}

    def done() -> bool:
        nonlocal facts
        facts = index_status(m)
        return facts["pending"] == 0 and facts["dicom"] >= dicom

    assert wait_until(done, timeout, interval=0.3), f"{facts}\n{m.log_tail()}"
    return facts


def put_all(bucket: Bucket, files: list[tuple[str, bytes]]) -> None:
    bucket.put_many(dict(files))


def readable_offline(path: Path) -> bool:
    """True if the whole file reads (with the server frozen: only from the cache)."""
    try:
        with open(path, "rb", buffering=0) as handle:
            while handle.read(1 << 20):
                pass
        return True
    except OSError as exc:
        assert exc.errno in (errno.EIO, errno.ETIMEDOUT, errno.EAGAIN), exc
        return False


def tree(root: Path) -> dict[str, bytes]:
    found = {}
    for directory, _, files in os.walk(root):
        for name in files:
            path = Path(directory) / name
            found[str(path.relative_to(root))] = path.read_bytes()
    return found


CHARSET_FILES = {
    "charsets/russian.dcm": "chrRuss.dcm",  # ISO_IR 144
    "charsets/japanese.dcm": "chrH31.dcm",  # ISO 2022 IR 87, with code extensions
    "charsets/chinese.dcm": "chrX1.dcm",  # ISO_IR 192 (UTF-8)
    "charsets/greek.dcm": "chrGreek.dcm",  # ISO_IR 126
    "charsets/german.dcm": "chrGerm.dcm",  # ISO_IR 100
}


def bundled_file(name: str) -> bytes:
    """One of pydicom's bundled test files."""
    path = get_testdata_file(name)
    assert isinstance(path, str), name
    return Path(path).read_bytes()


def charset_file(name: str) -> bytes:
    """One of pydicom's bundled files of a character set."""
    return Path(get_charset_files(name)[0]).read_bytes()


def view_paths(data: bytes) -> tuple[str, str]:
    """The by-patient and by-date paths the README's layout gives an instance, from the tags
    pydicom reads in it; name parts are cleaned by ``folder_name`` (test_unit_dicom covers it)."""
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)

    def text(keyword: str) -> str:
        return str(ds.get(keyword, "") or "").strip(" \x00")

    def joined(*parts: str) -> str:
        return "_".join(folder_name(part) for part in parts if part.strip()) or "unknown"

    patient = folder_name(text("PatientID"), fallback="unknown-patient")
    date = text("StudyDate")
    day = f"{date[:4]}/{date[4:6]}/{date[6:]}" if date else "undated"
    series = joined(f"{int(ds.SeriesNumber):03d}", text("Modality"), text("SeriesDescription"))
    instance = f"{int(ds.InstanceNumber):04d}.dcm"
    study = joined(date or "undated", text("StudyDescription"), text("AccessionNumber"))
    dated = joined(patient, text("StudyDescription"), text("AccessionNumber"))
    return f"{patient}/{study}/{series}/{instance}", f"{day}/{dated}/{series}/{instance}"


def expected_view(objects: list[tuple[str, bytes]]) -> tuple[dict[str, set[bytes]], set[str]]:
    """The by-patient paths of ``objects`` with the bytes each may show (copies of one SOP
    instance share a path), and the by-date paths."""
    by_patient: dict[str, set[bytes]] = {}
    by_date = set()
    for _, data in objects:
        patient_path, date_path = view_paths(data)
        by_patient.setdefault(patient_path, set()).add(data)
        by_date.add(date_path)
    return by_patient, by_date


def assert_view(view: Path, objects: list[tuple[str, bytes]]) -> None:
    """The view holds exactly the paths of ``objects``, each with the bytes of its object."""
    by_patient, by_date = expected_view(objects)
    shown = tree(view / "by-patient")
    assert set(shown) == set(by_patient), sorted(set(shown) ^ set(by_patient))
    for path, data in shown.items():
        assert data in by_patient[path], path
    assert set(tree(view / "by-date")) == by_date, sorted(set(tree(view / "by-date")) ^ by_date)


def test_view_shows_patients_studies_series_with_raw_bytes(
    mount: Mounter, bucket: Bucket, tmp_path: Path
) -> None:
    """Synthetic studies, pydicom's own files of several transfer syntaxes and charsets, and
    hostile or broken objects: the view lists exactly the DICOM instances, each with the bytes
    of its raw object; nothing escapes the view; the raw tree still shows everything.  A
    remount keeps the names and reads no header again; an object added later appears after a
    refresh, with one header read."""
    ct = synthetic_study("PAT-1", 1, [("CT", 6), ("CT", 3)], rows=64, columns=64)
    mr = synthetic_study("PAT-2", 2, [("MR", 4)], rows=64, columns=64, study_date="20250301")
    bundled = [
        (key, bundled_file(name))
        for key, name in {
            "misc/ct_small.dcm": "CT_small.dcm",
            "misc/mr_implicit.dcm": "MR_small_implicit.dcm",
            "misc/no_meta.dcm": "ExplVR_LitEndNoMeta.dcm",
            "misc/jpeg2000.dcm": "JPEG2000.dcm",
            "misc/rle.dcm": "MR_small_RLE.dcm",  # the same SOP instance as mr_implicit
        }.items()
    ]
    charsets = [(key, charset_file(name)) for key, name in CHARSET_FILES.items()]
    hostile = instance_bytes(
        patient_id="../../etc",
        patient_name="EVIL^NAME",
        study_uid="1.2.3.999",
        study_date="20240101",
        study_description="a/b\x00c\x07" + "x" * 10_000,
        accession="../..",
        series_uid="1.2.3.999.1",
        series_number=1,
        modality="CT",
        series_description="..",
        sop_uid="1.2.3.999.1.1",
        instance_number=1,
        rows=8,
        columns=8,
    )
    duplicate = ct[0][1]
    dicom = [
        *ct, *mr, *bundled, *charsets,
        ("odd/hostile.dcm", hostile), ("odd/duplicate-of-first.dcm", duplicate),
    ]  # fmt: skip
    put_all(bucket, dicom)
    bucket.put("odd/notes.txt", b"not an image\n" * 100)
    bucket.put("odd/truncated.dcm", ct[1][1][:200])
    m = mount(bucket, options=FAST)
    facts = wait_indexed(m, len(dicom))
    assert (facts["dicom"], facts["not_dicom"]) == (len(dicom), 2), facts
    # The raw tree is untouched.
    for key in ["odd/notes.txt", "odd/truncated.dcm", "odd/hostile.dcm", *dict(bundled)]:
        assert (m.path / key).exists(), key
    view = m.path / VIEW
    assert VIEW in os.listdir(m.path)
    assert sorted(os.listdir(view)) == ["by-date", "by-patient"]
    # Exactly the instances, where their tags put them, with their raw bytes; the second copy
    # of an SOP instance (duplicate-of-first, rle) takes no place of its own.
    assert_view(view, dicom)
    patients = os.listdir(view / "by-patient")
    assert sorted(patients) == sorted([
        "PAT-1", "PAT-2", "1CT1", "4MR1", "8NM1", "unknown-patient", "_.._etc",
        "SCSRUSS", "H31EXAMPLE", "X1EXAMPLE", "SCSGREEK", "SCSGERM",
    ])  # fmt: skip
    # Names are PHI: patient names appear nowhere by default.
    assert not any("DOE" in name or "EVIL" in name for name in patients)
    first_series = next((view / "by-patient" / "PAT-1").glob("*/001_CT*"))
    assert sorted(os.listdir(first_series)) == [f"{n:04d}.dcm" for n in range(1, 7)]
    # Hostile values stay inside the view, as plain names of bounded length.
    for directory, dirs, files in os.walk(view):
        for name in dirs + files:
            assert "/" not in name and "\x00" not in name and name not in (".", "..")
            assert len(name.encode()) <= 255
            resolved = (Path(directory) / name).resolve()
            assert resolved.is_relative_to(view.resolve()), resolved
    # Read-only.
    with pytest.raises(OSError) as caught:
        (first_series / "new.dcm").write_bytes(b"x")
    assert caught.value.errno == errno.EROFS
    with pytest.raises(OSError) as caught:
        (first_series / "0001.dcm").open("r+b")
    assert caught.value.errno == errno.EROFS
    with pytest.raises(OSError) as caught:
        (m.path / VIEW / "by-patient" / "x").mkdir()
    assert caught.value.errno == errno.EROFS
    # Scripting: studies by patient, JSON.
    result = cloudfs("studies", m.path, "--json", timeout=60)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert {row["patient_id"] for row in rows} >= {"PAT-1", "PAT-2", "../../etc"}
    assert all("patient_name" not in row for row in rows)
    result = cloudfs("studies", m.path, "--patient", "PAT-1", "--json", timeout=60)
    (only,) = json.loads(result.stdout)
    assert only["instances"] == len(ct) and only["series"] == 2
    result = cloudfs("studies", m.path, "--from", "2025-01-01", "--to", "2025-12-31", timeout=60)
    assert "PAT-2" in result.stdout and "PAT-1" not in result.stdout, result.stdout
    # Remount: the same names (stored, not recomputed), and no header read again.
    before = sorted(tree(view))
    m.unmount()
    again = mount(bucket, options=FAST, cache_dir=m.cache_dir)
    assert sorted(tree(again.path / VIEW)) == before
    assert index_status(again)["headers_read"] == 0
    # An object added to the bucket appears once a refresh lists it; only its header is read.
    added = synthetic_study("PAT-3", 3, [("CT", 1)], rows=64, columns=64)
    put_all(bucket, added)
    again.refresh()
    facts = wait_indexed(again, len(dicom) + 1)
    assert (facts["dicom"], facts["headers_read"]) == (len(dicom) + 1, 1), facts
    assert_view(again.path / VIEW, dicom + added)


def test_patient_folders_with_names_decode_the_character_set(
    mount: Mounter, bucket: Bucket
) -> None:
    """With ``--patient-folder name``, each patient folder is the PatientName decoded with the
    object's SpecificCharacterSet (single-byte, ISO 2022 with code extensions, UTF-8)."""
    charsets = [(key, charset_file(name)) for key, name in CHARSET_FILES.items()]
    put_all(bucket, charsets)
    m = mount(bucket, options=[*FAST, "--patient-folder", "name"])
    wait_indexed(m, len(charsets))
    expected = set()
    for _, data in charsets:
        ds = pydicom.dcmread(io.BytesIO(data))
        expected.add(f"{str(ds.PatientName).replace('^', ' ')}_{ds.PatientID}")
    folders = set(os.listdir(m.path / VIEW / "by-patient"))
    assert folders == expected
    assert {"Yamada Tarou=山田 太郎=やまだ たろう_H31EXAMPLE", "Διονυσιος_SCSGREEK"} <= folders
    assert "Äneas Rüdiger_SCSGERM" in folders


@pytest.mark.timeout(300)
def test_opening_one_instance_makes_the_whole_study_local(
    mount: Mounter, private_s3_server: MotoServer
) -> None:
    """One open of a cold instance prefetches the rest of its study; another study stays in the
    cloud.  Checked by freezing the server and reading everything.  The study is CT at a real
    size: a series of 200 slices of 512 x 512 x 16 bits (513 KiB each) and a second series."""
    from conftest import new_bucket

    bucket = new_bucket(private_s3_server)
    study = synthetic_study("PAT-9", 9, [("CT", 200), ("CT", 20)])
    other = synthetic_study("PAT-8", 8, [("CT", 5)], rows=256, columns=256)
    put_all(bucket, study + other)
    m = mount(bucket, options=[*FAST, "--priors", "0"])
    wait_indexed(m, len(study) + len(other))
    key, data = study[100]
    with open(m.path / key, "rb") as handle:
        assert handle.read() == data
    # Foreground reads are served while the prefetch runs: the last instance of the other
    # series, which the prefetch reaches last, reads correctly at once.
    assert (m.path / study[-1][0]).read_bytes() == study[-1][1]
    assert wait_until(lambda: index_status(m)["studies_prefetched"] >= 1, 120), m.log_tail()
    drop_kernel_caches()
    private_s3_server.pause()
    try:
        for key, data in study:
            assert readable_offline(m.path / key), f"{key} is not local\n{m.log_tail()}"
            assert (m.path / key).read_bytes() == data
        assert not readable_offline(m.path / other[0][0])
    finally:
        private_s3_server.resume()


@pytest.mark.timeout(300)
def test_pins_survive_cache_pressure_and_unpin_releases_them(
    mount: Mounter, private_s3_server: MotoServer
) -> None:
    """A pinned study stays in a small cache while three times the cache of other data passes
    through it; unpinned, it is evicted like anything else.  A pin bigger than the share of the
    cache pins may take is refused with a clear message."""
    from conftest import new_bucket

    bucket = new_bucket(private_s3_server)
    study = synthetic_study("PIN-1", 1, [("CT", 12)], rows=512, columns=512)  # 6 MiB
    unpinned = synthetic_study("FREE-1", 2, [("CT", 12)], rows=512, columns=512)
    big = synthetic_study("BIG-1", 3, [("CT", 70)], rows=512, columns=512)  # 35 MiB
    put_all(bucket, study + unpinned + big)
    filler = [(f"filler/{n}.bin", os.urandom(4 << 20)) for n in range(30)]  # 3 x the cache
    put_all(bucket, filler)
    options = [*FAST, "--read-ahead", "1M", "--no-study-prefetch"]
    m = mount(bucket, options=options, cache_size="40M")
    wait_indexed(m, len(study) + len(unpinned) + len(big))
    refused = cloudfs("pin", m.path, "--patient", "BIG-1", timeout=60)
    assert refused.returncode != 0
    assert "more than" in refused.stderr and "cache" in refused.stderr, refused.stderr
    pinned = cloudfs("pin", m.path, "--patient", "PIN-1", timeout=60)
    assert pinned.returncode == 0, pinned.stderr
    assert "12 files pinned" in pinned.stdout, pinned.stdout
    pins = json.loads(cloudfs("pins", m.path, "--json", timeout=60).stdout)
    assert pins["pins"] == [{"patient": "PIN-1"}]
    assert wait_until(
        lambda: (
            json.loads(cloudfs("pins", m.path, "--json").stdout)["pinned_in_cache"]
            >= sum(len(d) for _, d in study)
        ),
        120,
    ), m.log_tail()
    for key, _ in unpinned:
        (m.path / key).read_bytes()

    def pressure() -> None:
        for key, data in filler:
            assert (m.path / key).read_bytes() == data

    pressure()
    drop_kernel_caches()
    private_s3_server.pause()
    try:
        for key, data in study:
            assert readable_offline(m.path / key), f"pinned {key} was evicted\n{m.log_tail()}"
            assert (m.path / key).read_bytes() == data
        assert not readable_offline(m.path / unpinned[0][0])
    finally:
        private_s3_server.resume()
    released = cloudfs("unpin", m.path, "--patient", "PIN-1", timeout=60)
    assert released.returncode == 0, released.stderr
    pressure()
    drop_kernel_caches()
    private_s3_server.pause()
    try:
        assert not any(readable_offline(m.path / key) for key, _ in study[:3])
    finally:
        private_s3_server.resume()


def cloudfs_on_terminal(*args: object, columns: int = 120, timeout: float = 120) -> str:
    """Run the ``cloudfs`` command line on a pseudo-terminal, as a user at a shell sees it,
    and return everything it printed."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [PYTHON, "-m", "cloudfs", *map(str, args)],
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
        cwd="/",
        env=os.environ | {"COLUMNS": str(columns)},
    )
    os.close(terminal)
    output = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([controller], [], [], 1)[0]:
                continue
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the command exited and its side of the terminal closed
                break
            if not chunk:
                break
            output += chunk
        returncode = process.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        os.close(controller)
        process.kill()
    text = output.decode(errors="replace")
    assert returncode == 0, text
    return text


def test_prefetch_command_and_written_studies_indexed_without_a_get(
    mount: Mounter, bucket: Bucket
) -> None:
    """``cloudfs prefetch`` makes a selection local and reports it, on a terminal with a
    progress bar (files, rate); a study written through the mount is indexed from the bytes
    just written (no header GET) and appears in the view."""
    cold = synthetic_study("COLD-1", 1, [("MR", 8)], rows=128, columns=128)
    on_terminal = synthetic_study("BAR-1", 2, [("CT", 6)], rows=128, columns=128)
    put_all(bucket, cold + on_terminal)
    m = mount(bucket, options=FAST)
    wait_indexed(m, len(cold) + len(on_terminal))
    output = cloudfs_on_terminal("prefetch", m.path, "--patient", "BAR-1")
    bar = re.findall(r"(\d+)/(\d+) files, ([\d.]+) (B|KiB|MiB|GiB)/s", output)
    assert bar, output
    done, total, rate, _ = bar[-1]
    assert (int(done), int(total)) == (len(on_terminal), len(on_terminal)), output
    assert float(rate) > 0 and "100%" in output, output
    fetched_before = m.status()["reads"]["bytes_fetched"]
    result = cloudfs("prefetch", m.path, "--patient", "COLD-1", "--quiet", timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"{len(cold)} files" in result.stdout and "0 failed" in result.stdout, result.stdout
    assert m.status()["reads"]["bytes_fetched"] - fetched_before >= sum(len(d) for _, d in cold)
    missing = cloudfs("prefetch", m.path, "--patient", "NOBODY", timeout=60)
    assert missing.returncode != 0 and "nothing matches" in missing.stderr
    before = index_status(m)
    written = synthetic_study("NEW-1", 5, [("CT", 6)], rows=64, columns=64)
    for key, data in written:
        path = m.path / "incoming" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.fdatasync(fd)
        os.close(fd)
    facts = wait_indexed(m, before["dicom"] + len(written))
    assert facts["header_bytes"] == before["header_bytes"], "written files were fetched again"
    shown = tree(m.path / VIEW / "by-patient" / "NEW-1")
    assert sorted(shown.values()) == sorted(data for _, data in written)
