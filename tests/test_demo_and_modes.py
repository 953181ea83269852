"""The README's first command and the mount modes: the demo archive, read-only, write refusals."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import (
    Bucket,
    Mounter,
    cloudfs,
    is_mounted,
    payload,
    process_alive,
    read_file,
    wait_until,
)

VIEW = "@dicom"
DEMO_PATIENTS = ["DEMO-0001", "DEMO-0002"]
DEMO_INSTANCES = 120 + 2 * 20


def digest(path: Path) -> str:
    return hashlib.sha256(read_file(path)).hexdigest()


def wait_indexed(mountpoint: Path, timeout: float = 120) -> dict[str, Any]:
    """The index figures once nothing is left pending (every demo header read)."""
    facts: dict[str, Any] = {}

    def done() -> bool:
        nonlocal facts
        result = cloudfs("index", "status", mountpoint, "--json", timeout=60)
        assert result.returncode == 0, result.stderr
        facts = json.loads(result.stdout)
        return facts["pending"] == 0 and facts["dicom"] > 0

    assert wait_until(done, timeout, interval=0.3), facts
    return facts


@pytest.mark.timeout(240)
def test_demo_mounts_generated_samples_and_stops(tmp_path: Path) -> None:
    """`cloudfs demo` generates the sample archive once, mounts it in the background, prints
    where to look and how to stop; the samples read back byte for byte, and once the headers
    are indexed the DICOM view and `cloudfs studies` show the demo patients."""
    archive, mountpoint = tmp_path / "demo" / "archive", tmp_path / "mnt"
    try:
        first = cloudfs("demo", "--mountpoint", mountpoint, "--archive", archive)
        assert first.returncode == 0, first.stderr
        assert f"mounted at {mountpoint}" in first.stdout
        assert f"unmount {mountpoint}" in first.stdout
        assert is_mounted(mountpoint)
        # The browse view joins the root listing once headers are indexed: not asked for yet.
        raw = sorted(set(os.listdir(mountpoint)) - {VIEW})
        assert raw == ["README.txt", "reports", "studies", "volume"]
        instances = sorted(
            Path(folder, name).relative_to(archive)
            for folder, _, names in os.walk(archive / "studies")
            for name in names
        )
        assert len(instances) == DEMO_INSTANCES and len(os.listdir(archive / "studies")) == 2
        for name in ("README.txt", instances[7], instances[-1], "volume/volume.raw"):
            assert digest(mountpoint / name) == digest(archive / name), name
        assert pydicom.dcmread(mountpoint / instances[7]).Modality in ("CT", "MR")

        facts = wait_indexed(mountpoint)
        assert facts["dicom"] == DEMO_INSTANCES and facts["patients"] == 2, facts
        assert sorted(os.listdir(mountpoint / VIEW / "by-patient")) == DEMO_PATIENTS
        ct_patient = mountpoint / VIEW / "by-patient" / DEMO_PATIENTS[0]
        assert sum(len(names) for _, _, names in os.walk(ct_patient)) == 120
        listed = cloudfs("studies", mountpoint, "--json")
        assert listed.returncode == 0, listed.stderr
        rows = json.loads(listed.stdout)
        studies = sorted((row["patient_id"], row["modalities"], row["instances"]) for row in rows)
        assert studies == [("DEMO-0001", "CT", 120), ("DEMO-0002", "MR", 40)], rows

        status = cloudfs("status", mountpoint)
        assert status.returncode == 0, status.stderr
        assert f"file://{archive}" in status.stdout
        assert "hit ratio:" in status.stdout
        assert "dicom:             160 instances in 2 studies, 0 objects pending" in status.stdout

        again = cloudfs("demo", "--mountpoint", mountpoint, "--archive", archive)
        assert again.returncode == 0, again.stderr
        assert "already mounted" in again.stderr
        assert "sample files" not in again.stderr

        stop = cloudfs("unmount", mountpoint)
        assert stop.returncode == 0, stop.stderr
        assert not is_mounted(mountpoint)
    finally:
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)


def test_read_only_mount_refuses_writes_and_serves_reads(bucket: Bucket, mount: Mounter) -> None:
    """--read-only: reads work; opening for writing and creating files fail with EROFS; the
    bucket is unchanged."""
    bucket.put("study/a.dcm", payload(3000, "ro"))
    mounted = mount(bucket, options=["--read-only"])
    assert read_file(mounted.path / "study/a.dcm") == bucket.objects["study/a.dcm"]
    assert_refuses_writes(mounted.path, "study/a.dcm")
    assert bucket.listed_keys() == ["study/a.dcm"]


def assert_refuses_writes(root: Path, existing: str) -> None:
    """Every way of changing the tree fails with EROFS."""
    attempts = {
        "open for writing": lambda: os.open(root / existing, os.O_RDWR),
        "create": lambda: os.open(root / "new.dcm", os.O_WRONLY | os.O_CREAT, 0o644),
        "mkdir": lambda: os.mkdir(root / "newdir"),
        "unlink": lambda: os.unlink(root / existing),
        "rename": lambda: os.rename(root / existing, root / "moved.dcm"),
        "chmod": lambda: os.chmod(root / existing, 0o600),
        "truncate": lambda: os.truncate(root / existing, 0),
    }
    for what, attempt in attempts.items():
        with pytest.raises(OSError) as caught:
            attempt()
        assert caught.value.errno == errno.EROFS, what


def test_killed_daemon_leaves_no_wrong_bytes_and_recovers(bucket: Bucket, mount: Mounter) -> None:
    """kill -9 of the daemon: reads fail (ENOTCONN or ECONNABORTED), never return wrong bytes; a
    new mount on the dead mountpoint is refused with the remedy; `cloudfs unmount` clears it; a
    remount on the same cache serves the file again."""
    bucket.put("series/1.dcm", payload(300_000, "killed"))
    mounted = mount(bucket)
    assert read_file(mounted.path / "series/1.dcm") == bucket.objects["series/1.dcm"]

    os.kill(mounted.pid, signal.SIGKILL)
    assert wait_until(lambda: not process_alive(mounted.pid), 10)
    with pytest.raises(OSError) as caught:
        os.listdir(mounted.path)
    assert caught.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)

    refused = mount.attempt(bucket, mountpoint=mounted.path, cache_dir=mounted.cache_dir)
    assert refused.returncode == 1
    assert "cloudfs unmount" in refused.stderr, refused.stderr

    cleared = cloudfs("unmount", mounted.path)
    assert cleared.returncode == 0, cleared.stderr
    assert not is_mounted(mounted.path)

    again = mount(bucket, mountpoint=mounted.path, cache_dir=mounted.cache_dir)
    assert read_file(again.path / "series/1.dcm") == bucket.objects["series/1.dcm"]
