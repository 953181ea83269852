"""The README's first command and the mount modes: the demo archive, read-only, write refusals."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
from pathlib import Path

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


def digest(path: Path) -> str:
    return hashlib.sha256(read_file(path)).hexdigest()


@pytest.mark.timeout(240)
def test_demo_mounts_generated_samples_and_stops(tmp_path: Path) -> None:
    """`cloudfs demo` generates the sample archive once, mounts it in the background, prints
    where to look and how to stop, and every sample reads back byte for byte."""
    archive, mountpoint = tmp_path / "demo" / "archive", tmp_path / "mnt"
    try:
        first = cloudfs("demo", "--mountpoint", mountpoint, "--archive", archive)
        assert first.returncode == 0, first.stderr
        assert f"mounted at {mountpoint}" in first.stdout
        assert f"unmount {mountpoint}" in first.stdout
        assert is_mounted(mountpoint)
        assert sorted(os.listdir(mountpoint)) == ["README.txt", "reports", "series", "volume"]
        assert len(os.listdir(mountpoint / "series")) == 120
        for name in ("README.txt", "series/image-0007.raw", "volume/volume.raw"):
            assert digest(mountpoint / name) == digest(archive / name), name

        status = cloudfs("status", mountpoint)
        assert status.returncode == 0, status.stderr
        assert f"file://{archive}" in status.stdout
        assert "hit ratio:" in status.stdout

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
