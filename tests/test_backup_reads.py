"""A backup program reading the archive through the mount leaves the cache as it found it.

Real FUSE mounts against the moto server: a study is read once by a viewer, then GNU tar reads an
archive larger than the cache; the study must still come from the cache afterwards (no GET), where
plain LRU (backup handling switched off) loses it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import (
    Bucket,
    Mount,
    Mounter,
    drop_kernel_caches,
    payload,
    read_file,
    sha256,
)

KiB = 1024
MiB = 1024 * KiB
CACHE = 48 * MiB
"""The smallest cache the read-ahead below allows."""
STUDY = {f"study/{index:02d}.dcm": payload(1 * MiB, f"study-{index}") for index in range(8)}
ARCHIVE_FILES = 20
ARCHIVE_FILE_SIZE = 4 * MiB
"""80 MiB of other files: more than the cache, and more than the 64 MiB of blocks the daemon
keeps in memory (which would serve the study again without the disk cache)."""


def seed(bucket: Bucket) -> None:
    archive = {
        f"archive/{index:02d}.bin": payload(ARCHIVE_FILE_SIZE, f"archive-{index}")
        for index in range(ARCHIVE_FILES)
    }
    bucket.put_many(STUDY | archive)


def view_study_then_back_up(mounted: Mount, tmp_path: Path) -> int:
    """Read the study (this process, a viewer), then tar the archive; returns the GETs that
    re-reading the study took afterwards."""
    for key, data in STUDY.items():
        assert sha256(read_file(mounted.path / key)) == sha256(data), key
    tarball = tmp_path / "archive.tar"
    # To a file, not /dev/null: GNU tar reads no file contents when writing to /dev/null.
    subprocess.run(
        ["tar", "-cf", str(tarball), "-C", str(mounted.path), "archive"],
        check=True,
        timeout=120,
    )
    assert tarball.stat().st_size > ARCHIVE_FILES * ARCHIVE_FILE_SIZE
    drop_kernel_caches()
    before = mounted.status()["reads"]["requests"]
    for key, data in STUDY.items():
        assert sha256(read_file(mounted.path / key)) == sha256(data), key
    requests: int = mounted.status()["reads"]["requests"] - before
    return requests


@pytest.mark.timeout(240)
def test_backup_larger_than_the_cache_keeps_the_viewed_study_cached(
    bucket: Bucket, mount: Mounter, tmp_path: Path
) -> None:
    seed(bucket)
    options = ["--read-ahead", "4M", "--block-size", "256K", "--no-dicom-index"]
    kept = mount(bucket, cache_size="48M", options=[*options, "--backup-programs", "tar"])
    assert view_study_then_back_up(kept, tmp_path) == 0
    assert kept.status()["cache"]["bytes"] <= CACHE

    plain = mount(bucket, cache_size="48M", options=[*options, "--backup-programs", ""])
    assert view_study_then_back_up(plain, tmp_path) > 0, "the study was never evicted"
