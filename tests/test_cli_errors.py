"""`cloudfs mount` refusals: each is one clear line on stderr, exit status 1, nothing mounted and
no daemon left behind (a real moto_server and /dev/fuse, as in test_mount_s3.py)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from conftest import (
    Bucket,
    MotoServer,
    Mounter,
    assert_bytes,
    cache_lock_held,
    free_port,
    is_mounted,
    mounts_at,
    new_bucket,
    payload,
    processes_mentioning,
    read_file,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)


def assert_refused(result: subprocess.CompletedProcess[str], mountpoint: Path, *words: str) -> None:
    """Exit status 1, one line on stderr naming the problem, no daemon for ``mountpoint``."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert any(word.lower() in lines[0].lower() for word in words), lines[0]
    assert result.stdout == ""
    assert wait_until(lambda: not processes_mentioning(str(mountpoint)), 10), (
        "a cloudfs process for the refused mount is still running"
    )


def cache_released(cache_dir: Path) -> bool:
    """No process holds ``cache_dir`` (waiting out a daemon's last threads as it exits)."""
    return wait_until(lambda: not cache_lock_held(cache_dir), 10)


def assert_nothing_mounted(mountpoint: Path, cache_dir: Path) -> None:
    assert not is_mounted(mountpoint)
    assert cache_released(cache_dir)


def test_unknown_bucket_is_refused(bucket: Bucket, mount: Mounter, tmp_path: Path) -> None:
    """A bucket that does not exist: one line saying so, nothing mounted."""
    missing = Bucket(bucket.server, "no-such-bucket-for-cloudfs")
    mountpoint, cache_dir = mount.new_dir("mnt"), tmp_path / "cache"
    result = mount.attempt(missing, mountpoint, cache_dir)
    assert_refused(result, mountpoint, "does not exist", "no such bucket")
    assert "no-such-bucket-for-cloudfs" in result.stderr
    assert_nothing_mounted(mountpoint, cache_dir)


def test_bad_credentials_are_refused(
    private_s3_server: MotoServer, mount: Mounter, tmp_path: Path
) -> None:
    """Credentials the server rejects (moto with authentication switched on, where no access key
    is known): one line about access or credentials, nothing mounted."""
    bucket = new_bucket(private_s3_server)
    bucket.put("a.dcm", b"x")
    private_s3_server.require_authentication(True)
    with pytest.raises(ClientError, match="InvalidAccessKeyId"):
        private_s3_server.client().list_objects_v2(Bucket=bucket.name)

    mountpoint, cache_dir = mount.new_dir("mnt"), tmp_path / "cache"
    result = mount.attempt(bucket, mountpoint, cache_dir)
    assert_refused(result, mountpoint, "credentials", "access denied")
    assert_nothing_mounted(mountpoint, cache_dir)


def test_unreachable_endpoint_is_refused(bucket: Bucket, mount: Mounter, tmp_path: Path) -> None:
    """An endpoint where nothing listens, at a first mount: one line saying it is unreachable,
    promptly, nothing mounted."""
    mountpoint, cache_dir = mount.new_dir("mnt"), tmp_path / "cache"
    started = time.monotonic()
    result = mount.attempt(
        bucket, mountpoint, cache_dir, endpoint=f"http://127.0.0.1:{free_port()}"
    )
    assert time.monotonic() - started < 60
    assert_refused(result, mountpoint, "unreachable", "could not connect")
    assert_nothing_mounted(mountpoint, cache_dir)


def test_missing_mountpoint_is_refused(bucket: Bucket, mount: Mounter, tmp_path: Path) -> None:
    """A mountpoint that does not exist: one line saying so; it is not created."""
    mountpoint, cache_dir = tmp_path / "not-there", tmp_path / "cache"
    result = mount.attempt(bucket, mountpoint, cache_dir)
    assert_refused(result, mountpoint, "does not exist")
    assert not mountpoint.exists()
    assert cache_released(cache_dir)


def test_busy_mountpoint_is_refused(bucket: Bucket, mount: Mounter, tmp_path: Path) -> None:
    """Mounting over a live mount: one line saying the mountpoint is busy; the first mount is
    untouched and still serves."""
    bucket.put("a.dcm", payload(50_000, "a"))
    first = mount(bucket)
    cache_dir = tmp_path / "second-cache"
    result = mount.attempt(bucket, first.path, cache_dir)
    assert_refused(result, cache_dir, "busy", "already mounted")
    assert mounts_at(first.path) == 1
    assert cache_released(cache_dir)
    assert_bytes(read_file(first.path / "a.dcm"), bucket.objects["a.dcm"], "a.dcm")


def test_cache_dir_in_use_is_refused(bucket: Bucket, mount: Mounter) -> None:
    """A cache directory held by another running mount: one line saying it is in use; nothing is
    mounted at the second mountpoint and the first mount still serves."""
    bucket.put("a.dcm", payload(50_000, "a"))
    first = mount(bucket)
    mountpoint = mount.new_dir("mnt")
    result = mount.attempt(bucket, mountpoint, first.cache_dir)
    assert_refused(result, mountpoint, "in use")
    assert not is_mounted(mountpoint)
    assert os.listdir(mountpoint) == []
    assert_bytes(read_file(first.path / "a.dcm"), bucket.objects["a.dcm"], "a.dcm")
    assert first.status()["pid"] == first.pid
