"""Writing through a real FUSE mount to a real moto_server: what a PACS and ordinary tools do.

Each test writes with ordinary system calls, then checks what the bucket holds (over HTTP with
boto3), not only what the mount shows.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import (
    Bucket,
    Gate,
    Mount,
    Mounter,
    assert_bytes,
    cloudfs,
    drop_kernel_caches,
    fill,
    payload,
    process_alive,
    read_direct,
    wait_until,
)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
FAST = ["--upload-delay", "0.2", "--drain-timeout", "20"]
"""Upload soon after close, so tests need not wait for the default delay."""


def bucket_objects(bucket: Bucket) -> dict[str, bytes]:
    client = bucket.server.client()
    return {
        key: client.get_object(Bucket=bucket.name, Key=key)["Body"].read()
        for key in bucket.listed_keys()
    }


def wait_for_bucket(
    bucket: Bucket, expected: dict[str, bytes], mount: Mount, timeout: float = 60
) -> None:
    """Wait until the bucket holds exactly ``expected`` (keys and bytes)."""

    def matches() -> bool:
        return set(bucket.listed_keys()) == set(expected)

    wait_until(matches, timeout, interval=0.2)
    got = bucket_objects(bucket)
    assert sorted(got) == sorted(expected), f"{sorted(got)}\n{mount.log_tail()}"
    for key, data in expected.items():
        assert_bytes(got[key], data, key)


def write_synced(path: Path, data: bytes) -> None:
    """Orthanc's way: open the final path, write it all, fdatasync, close."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fdatasync(fd)
    finally:
        os.close(fd)


def kill_daemon(m: Mount, open_fd: int) -> None:
    """kill -9 the daemon with ``open_fd`` still open on the mount, then clear the dead mount."""
    os.kill(m.pid, signal.SIGKILL)
    assert wait_until(lambda: not process_alive(m.pid), 10)
    with contextlib.suppress(OSError):
        os.close(open_fd)  # the daemon is gone: close may report it
    cleared = cloudfs("unmount", m.path)
    assert cleared.returncode == 0, cleared.stderr


def backlog(mount: Mount) -> dict:
    uploads: dict = mount.status()["uploads"]
    return uploads


def drained(mount: Mount) -> bool:
    pending = backlog(mount)
    return (
        pending["pending_files"] == 0
        and pending["pending_renames"] == 0
        and (pending["pending_deletes"] == 0)
    )


def test_create_write_read_back_and_upload(mount: Callable[..., Mount], bucket: Bucket) -> None:
    """A new file is readable at once with the bytes written, and reaches the bucket with its
    metadata."""
    m = mount(bucket, options=FAST)
    data = payload(300 * KiB, "first")
    (m.path / "studies").mkdir()
    write_synced(m.path / "studies" / "a.dcm", data)
    os.chmod(m.path / "studies" / "a.dcm", 0o640)
    assert (m.path / "studies" / "a.dcm").read_bytes() == data
    assert (m.path / "studies" / "a.dcm").stat().st_size == len(data)
    wait_for_bucket(bucket, {"studies/a.dcm": data}, m)
    assert wait_until(lambda: drained(m), 30)
    head = bucket.server.client().head_object(Bucket=bucket.name, Key="studies/a.dcm")
    assert int(head["Metadata"]["mode"]) & 0o7777 == 0o640, head["Metadata"]
    drop_kernel_caches()
    assert (m.path / "studies" / "a.dcm").read_bytes() == data
    assert (m.path / "studies" / "a.dcm").stat().st_mode & 0o7777 == 0o640


def test_pacs_workload_temp_fsync_rename_delete(
    mount: Callable[..., Mount], bucket: Bucket
) -> None:
    """dcm4chee/rsync style: write to a temp name, fsync, rename into a dated tree; read back;
    delete some; the bucket ends with exactly the expected keys and bytes."""
    m = mount(bucket, options=FAST)
    expected: dict[str, bytes] = {}
    for index in range(40):
        day = f"2026/11/{10 + index % 3:02d}"
        folder = m.path / day / f"study{index % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        data = payload(20 * KiB + index * 997, f"pacs{index}")
        temp = folder / f".tmp-{index}"
        write_synced(temp, data)
        os.rename(temp, folder / f"{index}.dcm")
        expected[f"{day}/study{index % 4}/{index}.dcm"] = data
    for key, data in expected.items():
        assert (m.path / key).read_bytes() == data
    for index in range(0, 40, 5):
        key = next(k for k in expected if k.endswith(f"/{index}.dcm"))
        os.unlink(m.path / key)
        del expected[key]
    wait_for_bucket(bucket, expected, m)
    assert wait_until(lambda: drained(m), 30), backlog(m)
    assert not any(".tmp-" in key for key in bucket.listed_keys())
    # A relist agrees with what the mount shows.
    m.refresh()
    shown = sorted(str(p.relative_to(m.path)) for p in m.path.rglob("*.dcm"))
    assert shown == sorted(expected)


def test_orthanc_and_dcm4chee_patterns_from_many_threads(
    mount: Callable[..., Mount], bucket: Bucket
) -> None:
    """Concurrent ``mkdir -p`` of the same shard never fails a writer; O_EXCL is honoured and an
    EEXIST retry under another name works; delete + rmdir of parents relies on ENOTEMPTY."""
    m = mount(bucket, options=FAST)
    shards = ["ab/cd", "ab/ce", "ff/00"]
    written: dict[str, bytes] = {}
    lock = threading.Lock()

    def orthanc(worker: int) -> None:
        for n in range(12):
            shard = shards[(worker + n) % len(shards)]
            (m.path / shard).mkdir(parents=True, exist_ok=True)
            name = f"{shard}/{uuid.uuid4()}"
            data = payload(8 * KiB + n, name)
            write_synced(m.path / name, data)
            with lock:
                written[name] = data

    def dcm4chee(worker: int) -> None:
        folder = m.path / "2026" / "11" / "23"
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(8):
            attempt = 0
            while True:
                name = f"2026/11/23/sop-{n}-{attempt}"
                try:
                    fd = os.open(m.path / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    attempt += 1
                    continue
                data = payload(4 * KiB, f"{name}-{worker}")
                os.write(fd, data)
                os.fsync(fd)
                os.close(fd)
                with lock:
                    written[name] = data
                break

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(orthanc, w) for w in range(4)]
        futures += [pool.submit(dcm4chee, w) for w in range(4)]
        for future in futures:
            future.result()
    # Four dcm4chee writers raced for each name: each got its own, none overwrote another.
    assert len([k for k in written if k.startswith("2026/")]) == 32
    with pytest.raises(FileExistsError):
        os.open(m.path / "2026/11/23/sop-0-0", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    for name, data in written.items():
        assert (m.path / name).read_bytes() == data, name
    # Orthanc's delete: unlink, then rmdir the parents and rely on ENOTEMPTY.
    victim = next(k for k in written if k.startswith("ab/cd/"))
    os.unlink(m.path / victim)
    del written[victim]
    with pytest.raises(OSError) as caught:
        os.rmdir(m.path / "ab" / "cd")
    assert caught.value.errno == errno.ENOTEMPTY
    for name in [k for k in written if k.startswith("ff/00/")]:
        os.unlink(m.path / name)
        del written[name]
    os.rmdir(m.path / "ff" / "00")
    os.rmdir(m.path / "ff")
    assert not (m.path / "ff").exists()
    wait_for_bucket(bucket, written, m)


def test_kill_9_mid_burst_loses_no_fsynced_file(mount: Mounter, bucket: Bucket) -> None:
    """kill -9 during a write burst; after a remount, every file whose fsync returned is in the
    bucket with its bytes, and a file never fsync'd nor closed is not uploaded as complete."""
    cache_dir = mount.tmp_path / "crash-cache"
    # A long delay after close keeps the burst in the journal when the daemon dies.
    m = mount(bucket, cache_dir=cache_dir, options=["--upload-delay", "3600"])
    synced: dict[str, bytes] = {}
    for index in range(30):
        data = payload(64 * KiB + index, f"crash{index}")
        write_synced(m.path / f"synced-{index}.dcm", data)
        synced[f"synced-{index}.dcm"] = data
    half = os.open(m.path / "half-written.dcm", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(half, payload(100 * KiB, "half"))
    kill_daemon(m, half)
    assert bucket.listed_keys() == []  # nothing went up before the crash
    again = mount(bucket, mountpoint=m.path, cache_dir=cache_dir, options=FAST)
    wait_for_bucket(bucket, synced, again)
    assert not (again.path / "half-written.dcm").exists()
    assert "never fsync'd or closed" in again.log_text()
    assert (cache_dir / "staging" / "unsynced").is_dir()


def test_outage_writes_queue_and_drain_when_the_cloud_returns(
    mount: Callable[..., Mount], bucket: Bucket, gate: Gate
) -> None:
    """With the cloud unreachable, writes, renames, deletes and cached reads keep working; the
    backlog drains by itself when it returns, and status shows it meanwhile."""
    old = payload(200 * KiB, "before")
    bucket.put("old.dcm", old)
    m = mount(bucket, endpoint=gate.endpoint, options=FAST)
    assert (m.path / "old.dcm").read_bytes() == old  # cached now
    gate.close()
    expected = {"old.dcm": old}
    for index in range(10):
        data = payload(50 * KiB, f"outage{index}")
        write_synced(m.path / f"during-{index}.dcm", data)
        expected[f"during-{index}.dcm"] = data
    os.rename(m.path / "during-0.dcm", m.path / "renamed.dcm")
    expected["renamed.dcm"] = expected.pop("during-0.dcm")
    os.unlink(m.path / "during-1.dcm")
    del expected["during-1.dcm"]
    drop_kernel_caches()
    assert (m.path / "old.dcm").read_bytes() == old
    assert wait_until(lambda: backlog(m)["errors"] > 0, 30)
    pending = backlog(m)
    assert pending["pending_files"] == 9 and pending["last_error"], pending
    assert pending["oldest_pending_age"] is not None
    human = cloudfs("status", m.path)
    assert "9 files" in human.stdout and "last upload error:" in human.stdout, human.stdout
    gate.open()
    wait_for_bucket(bucket, expected, m, timeout=120)
    assert wait_until(lambda: drained(m), 60), backlog(m)


def test_large_file_multipart_and_in_place_changes(
    mount: Callable[..., Mount], bucket: Bucket
) -> None:
    """A file of a few hundred MiB goes up in parts; overwrites at random offsets, truncate down
    and up, and append on an uploaded file all end in the bucket byte for byte."""
    m = mount(bucket, options=[*FAST, "--part-size", "16M"])
    size = 320 * MiB
    chunk = payload(4 * MiB, "big")
    with open(m.path / "volume.raw", "wb") as out:
        for _ in range(size // len(chunk)):
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    expected = bytearray(chunk * (size // len(chunk)))
    wait_for_bucket(bucket, {"volume.raw": bytes(expected)}, m, timeout=180)
    etag = bucket.server.client().head_object(Bucket=bucket.name, Key="volume.raw")["ETag"]
    assert etag.strip('"').endswith("-20"), etag  # 320 MiB in 16 MiB parts

    small = payload(3 * MiB, "small")
    (m.path / "edit.bin").write_bytes(small)
    wait_for_bucket(bucket, {"volume.raw": bytes(expected), "edit.bin": small}, m)
    edited = bytearray(small)
    with open(m.path / "edit.bin", "r+b") as f:
        for offset in (0, 12345, 1_500_000, len(small) - 10):
            patch = payload(10, offset)
            f.seek(offset)
            f.write(patch)
            edited[offset : offset + 10] = patch
    os.truncate(m.path / "edit.bin", 2 * MiB)
    del edited[2 * MiB :]
    os.truncate(m.path / "edit.bin", 2 * MiB + 5000)
    edited += bytes(5000)
    with open(m.path / "edit.bin", "ab") as f:
        f.write(b"appended")
    edited += b"appended"
    got = (m.path / "edit.bin").read_bytes()
    assert len(got) == len(edited), m.log_tail()
    assert_bytes(got, bytes(edited), "edit.bin")
    wait_for_bucket(bucket, {"volume.raw": bytes(expected), "edit.bin": bytes(edited)}, m)
    drop_kernel_caches()
    assert (m.path / "edit.bin").read_bytes() == bytes(edited)


def test_rename_directory_of_more_than_a_listing_page_and_rename_over_a_file(
    mount: Callable[..., Mount], bucket: Bucket
) -> None:
    """A directory of 1,200 objects (more than one listing page or catalog batch of 1,000) is
    renamed at once in the namespace; the bucket converges to the new keys by server-side
    copies.  Renaming over an existing file replaces it."""
    expected = {f"series/{index:04d}.dcm": f"instance {index}".encode() for index in range(1200)}
    bucket.put_many(expected)
    bucket.put("a.txt", b"replacement")
    bucket.put("b.txt", b"old target")
    m = mount(bucket, options=FAST)
    os.rename(m.path / "series", m.path / "renamed")
    assert len(os.listdir(m.path / "renamed")) == 1200
    assert not (m.path / "series").exists()
    assert (m.path / "renamed" / "1134.dcm").read_bytes() == b"instance 1134"
    os.rename(m.path / "a.txt", m.path / "b.txt")
    assert (m.path / "b.txt").read_bytes() == b"replacement"
    final = {key.replace("series/", "renamed/"): data for key, data in expected.items()}
    final["b.txt"] = b"replacement"
    wait_for_bucket(bucket, final, m, timeout=240)
    assert wait_until(lambda: drained(m), 60), backlog(m)


def test_full_staging_area_gives_enospc_and_loses_nothing(
    mount: Callable[..., Mount], bucket: Bucket, gate: Gate
) -> None:
    """With the cloud down and the staging area full of data not yet uploaded, a write fails
    with ENOSPC; everything written before survives and goes up when the cloud returns."""
    m = mount(bucket, endpoint=gate.endpoint, options=[*FAST, "--staging-size", "4M"])
    gate.close()
    kept = {}
    with pytest.raises(OSError) as caught:
        for index in range(10):
            data = payload(MiB, f"full{index}")
            write_synced(m.path / f"f{index}", data)
            kept[f"f{index}"] = data
    assert caught.value.errno == errno.ENOSPC
    assert len(kept) == 4  # 4 MiB of staging holds four 1 MiB files
    for name, data in kept.items():
        assert (m.path / name).read_bytes() == data
    assert "staging area full" in m.log_text()
    gate.open()
    partial = {p.name for p in m.path.iterdir()} - set(kept)
    for name in partial:  # the file that hit ENOSPC holds what fitted; drop it
        os.unlink(m.path / name)
    wait_for_bucket(bucket, kept, m, timeout=120)


def test_a_full_cache_disk_fails_writes_with_enospc_and_keeps_serving(
    small_disk: Path, mount: Callable[..., Mount], bucket: Bucket
) -> None:
    """The disk under the cache directory fills up (another program, a cache size above the
    disk): reads are still served with the right bytes, a write fails with ENOSPC, never EIO
    or a dead mount, what was fsync'd before reaches the bucket, and writes work again once
    space is freed."""
    big = payload(12 * MiB, "big")
    bucket.put("big.dcm", big)
    m = mount(bucket, cache_dir=small_disk / "cache", options=FAST)
    before = payload(200 * KiB, "before")
    write_synced(m.path / "before.dcm", before)
    filler = fill(small_disk, 2 * MiB)

    assert_bytes(read_direct(m.path / "big.dcm"), big, "read with the cache disk full")
    with pytest.raises(OSError) as caught:
        for index in range(4):
            write_synced(m.path / f"full{index}.dcm", payload(2 * MiB, f"full{index}"))
    assert caught.value.errno == errno.ENOSPC, m.log_tail()
    assert "writes fail with ENOSPC until space is freed" in m.log_text()
    assert (m.path / "before.dcm").read_bytes() == before
    assert "before.dcm" in os.listdir(m.path)
    assert m.status()["cache"]["failed_inserts"] > 0  # the read above could not be cached

    filler.unlink()
    for name in os.listdir(m.path):  # what hit ENOSPC holds what fitted; drop it
        if name.startswith("full"):
            os.unlink(m.path / name)
    after = payload(300 * KiB, "after")
    write_synced(m.path / "after.dcm", after)
    wait_for_bucket(bucket, {"big.dcm": big, "before.dcm": before, "after.dcm": after}, m)
    assert "unexpected error" not in m.log_text()


def test_posix_corners(mount: Callable[..., Mount], bucket: Bucket) -> None:
    """What ordinary tools meet: EEXIST and ENOTEMPTY where POSIX says, locks that work on one
    host, hard links and device files refused with EPERM, a large stable statfs, no NO_MOUNT."""
    m = mount(bucket, options=FAST)
    (m.path / "d").mkdir()
    with pytest.raises(FileExistsError):
        (m.path / "d").mkdir()
    (m.path / "d" / "f").write_bytes(b"x")
    with pytest.raises(OSError) as caught:
        (m.path / "d").rmdir()
    assert caught.value.errno == errno.ENOTEMPTY
    with pytest.raises(OSError) as caught:
        os.link(m.path / "d" / "f", m.path / "d" / "g")
    assert caught.value.errno == errno.EPERM
    with pytest.raises(OSError) as caught:
        os.mkfifo(m.path / "fifo")
    assert caught.value.errno == errno.EPERM
    with pytest.raises(OSError) as caught:
        os.symlink("d/f", m.path / "link")
    assert caught.value.errno == errno.EPERM
    with pytest.raises(OSError) as caught:
        (m.path / "NO_MOUNT").write_bytes(b"")
    assert caught.value.errno == errno.EACCES
    first, second = os.statvfs(m.path), os.statvfs(m.path)
    assert first.f_bavail * first.f_frsize >= 1 << 40
    assert first.f_bavail == second.f_bavail
    # Locks are kernel-local: a second open file description conflicts with the first.
    with open(m.path / "d" / "f", "r+b") as one, open(m.path / "d" / "f", "r+b") as two:
        fcntl.flock(one, fcntl.LOCK_EX)
        with pytest.raises(BlockingIOError):
            fcntl.flock(two, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(one, fcntl.LOCK_UN)
        fcntl.flock(two, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # POSIX record locks are per process: another process must see this one.
        fcntl.lockf(one, fcntl.LOCK_EX)
        probe = (
            "import fcntl, sys\n"
            "with open(sys.argv[1], 'r+b') as f:\n"
            "    try: fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "    except OSError: sys.exit(3)\n"
        )
        held = subprocess.run([sys.executable, "-c", probe, str(m.path / "d" / "f")], timeout=30)
        assert held.returncode == 3
        fcntl.lockf(one, fcntl.LOCK_UN)
        free = subprocess.run([sys.executable, "-c", probe, str(m.path / "d" / "f")], timeout=30)
        assert free.returncode == 0
    shutil.copytree(m.path / "d", m.path / "copy")
    assert (m.path / "copy" / "f").read_bytes() == b"x"
    os.utime(m.path / "copy" / "f", (1_000_000_000, 1_000_000_000))
    assert (m.path / "copy" / "f").stat().st_mtime == 1_000_000_000


def test_conflicting_writer_is_never_silently_overwritten(
    mount: Callable[..., Mount], bucket: Bucket
) -> None:
    """Another site writes the same key before this host's upload: both versions survive, the
    other writer's under the key and the local one under a conflict name beside it."""
    m = mount(bucket, options=["--upload-delay", "1.5"])
    local = payload(40 * KiB, "local version")
    write_synced(m.path / "report.pdf", local)
    remote = payload(30 * KiB, "remote version")
    bucket.put("report.pdf", remote)  # lands before the delayed upload

    def conflict_keys() -> list[str]:
        return [key for key in bucket.listed_keys() if key.startswith("report.pdf.conflict-")]

    assert wait_until(lambda: len(conflict_keys()) == 1, 60), m.log_tail()
    objects = bucket_objects(bucket)
    assert_bytes(objects["report.pdf"], remote, "the other writer's object")
    assert_bytes(objects[conflict_keys()[0]], local, "the local version")
    assert "changed in the cloud by another writer" in m.log_text()
    assert backlog(m)["conflicts"] == 1
    names = sorted(os.listdir(m.path))
    assert names[0] == "report.pdf" and names[1].startswith("report.pdf.conflict-"), names
    assert wait_until(lambda: (m.path / "report.pdf").read_bytes() == remote, 30)


def test_sync_upload_mode_fsync_waits_for_the_cloud(
    mount: Callable[..., Mount], bucket: Bucket, gate: Gate
) -> None:
    """--upload-mode=sync: when fsync returns the object is in the bucket; with the cloud down,
    fsync fails with EIO, and the data still goes up once the cloud returns."""
    m = mount(bucket, endpoint=gate.endpoint, options=["--upload-mode", "sync"])
    data = payload(100 * KiB, "sync mode")
    write_synced(m.path / "now.dcm", data)
    assert bucket_objects(bucket) == {"now.dcm": data}  # no waiting
    gate.close()
    later = payload(10 * KiB, "later")
    with pytest.raises(OSError) as caught:
        write_synced(m.path / "later.dcm", later)
    assert caught.value.errno == errno.EIO
    gate.open()
    wait_for_bucket(bucket, {"now.dcm": data, "later.dcm": later}, m, timeout=120)


def test_unmount_drains_uploads_or_leaves_them_journaled(
    mount: Callable[..., Mount], bucket: Bucket, gate: Gate
) -> None:
    """SIGTERM and unmount wait for pending uploads (even those still in their delay after
    close); with the cloud down they give up after --drain-timeout, say so, and the next mount
    uploads the rest."""
    m = mount(bucket, options=["--upload-delay", "3600"])
    first = payload(64 * KiB, "drained")
    write_synced(m.path / "first.dcm", first)
    os.kill(m.pid, signal.SIGTERM)  # as systemd stops the service
    assert wait_until(lambda: not process_alive(m.pid), 60), m.log_tail()
    assert bucket_objects(bucket) == {"first.dcm": first}

    cache_dir = mount.tmp_path / "drain-cache"
    down = mount(
        bucket,
        endpoint=gate.endpoint,
        cache_dir=cache_dir,
        options=["--upload-delay", "3600", "--drain-timeout", "2"],
    )
    gate.close()
    second = payload(64 * KiB, "journaled")
    write_synced(down.path / "second.dcm", second)
    down.unmount()
    assert "stay journaled" in down.log_text()
    assert set(bucket.listed_keys()) == {"first.dcm"}
    gate.open()
    again = mount(bucket, endpoint=gate.endpoint, cache_dir=cache_dir, options=FAST)
    wait_for_bucket(bucket, {"first.dcm": first, "second.dcm": second}, again)


def test_chmod_chown_utime_of_an_uploaded_file_reach_the_bucket(
    mount: Callable[..., Mount], bucket: Bucket
) -> None:
    """Attributes changed after the upload reach the object's metadata (a server-side copy
    onto itself): mode, uid, gid and mtime all, with the bytes unchanged."""
    m = mount(bucket, options=FAST)
    data = payload(100 * KiB, "attributes")
    path = m.path / "a.dcm"
    write_synced(path, data)
    wait_for_bucket(bucket, {"a.dcm": data}, m)
    assert wait_until(lambda: drained(m), 30), backlog(m)
    os.chmod(path, 0o600)
    os.chown(path, 1234, 5678)
    os.utime(path, (1_500_000_000, 1_600_000_000))
    wanted = {
        "mode": str(stat.S_IFREG | 0o600),
        "uid": "1234",
        "gid": "5678",
        "mtime": "1600000000",
    }
    client = bucket.server.client()

    def metadata() -> dict[str, str]:
        return dict(client.head_object(Bucket=bucket.name, Key="a.dcm")["Metadata"])

    assert wait_until(lambda: metadata() == wanted, 30, interval=0.2), (metadata(), m.log_tail())
    assert wait_until(lambda: drained(m), 30), backlog(m)
    assert bucket_objects(bucket) == {"a.dcm": data}
    shown = path.stat()
    assert (stat.S_IMODE(shown.st_mode), shown.st_uid, shown.st_gid) == (0o600, 1234, 5678)
    assert shown.st_mtime == 1_600_000_000


def test_free_space_option_sets_what_statfs_reports(
    mount: Callable[..., Mount], bucket: Bucket
) -> None:
    """--free-space replaces the default 2^50 bytes, for a PACS that plans by free space."""
    m = mount(bucket, options=[*FAST, "--free-space", "3G"])
    figures = os.statvfs(m.path)
    assert figures.f_bavail * figures.f_frsize == 3 * GiB
    assert figures.f_bfree == figures.f_bavail
    assert shutil.disk_usage(m.path).free == 3 * GiB


def test_sqlite_in_rollback_journal_and_wal_mode(
    mount: Callable[..., Mount], bucket: Bucket, tmp_path: Path
) -> None:
    """SQLite works on the mount in both journal modes: rows committed, the database closed and
    reopened, integrity_check passes, and the copy that reaches the bucket is whole too."""
    m = mount(bucket, options=FAST)
    (m.path / "index").mkdir()
    expected: dict[str, list[tuple[str, bytes]]] = {}
    for mode in ("delete", "wal"):
        path = m.path / "index" / f"{mode}.sqlite"
        rows = [(f"{mode}-{n}", payload(1500 + n, f"{mode}{n}")) for n in range(300)]
        expected[f"index/{mode}.sqlite"] = rows
        db = sqlite3.connect(path)
        assert db.execute(f"PRAGMA journal_mode={mode}").fetchone()[0] == mode
        db.execute("CREATE TABLE instances (uid TEXT PRIMARY KEY, body BLOB)")
        for start in range(0, len(rows), 50):  # one transaction per batch, as an index writes
            with db:
                db.executemany("INSERT INTO instances VALUES (?, ?)", rows[start : start + 50])
        db.close()
        db = sqlite3.connect(path)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == mode
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT uid, body FROM instances ORDER BY rowid").fetchall() == rows
        db.close()

    def only_databases() -> bool:
        return set(bucket.listed_keys()) == set(expected) and drained(m)

    assert wait_until(only_databases, 60, interval=0.2), (bucket.listed_keys(), m.log_tail())
    for key, data in bucket_objects(bucket).items():
        assert_bytes(data, (m.path / key).read_bytes(), key)
        copy = tmp_path / key.replace("/", "-")
        copy.write_bytes(data)
        db = sqlite3.connect(copy)
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert (
            db.execute("SELECT uid, body FROM instances ORDER BY rowid").fetchall()
            == (expected[key])
        )
        db.close()


def test_delete_keeps_an_object_another_writer_replaced(
    mount: Callable[..., Mount], bucket: Bucket
) -> None:
    """An unlink of a file whose object another site replaced since the last relist keeps the
    other writer's object; the delete is settled (counted, logged once), and a relist shows the
    object again."""
    m = mount(bucket, options=FAST)
    write_synced(m.path / "report.pdf", payload(40 * KiB, "this host's version"))
    assert wait_until(lambda: bucket.listed_keys() == ["report.pdf"] and drained(m), 30)
    remote = payload(30 * KiB, "another site's version")
    bucket.put("report.pdf", remote)
    os.unlink(m.path / "report.pdf")
    assert wait_until(lambda: drained(m), 30), backlog(m)
    assert bucket_objects(bucket) == {"report.pdf": remote}
    assert backlog(m)["conflicts"] == 1
    assert m.log_text().count("not deleted, the other writer's object is kept") == 1
    m.refresh()
    assert (m.path / "report.pdf").read_bytes() == remote


def test_kill_9_while_writes_and_uploads_are_in_flight(mount: Mounter, bucket: Bucket) -> None:
    """Four writers and immediate uploads, one writer with multipart files; kill -9 while a
    multipart upload is open.  After a remount and the backlog drained, every file whose fsync
    returned is in the bucket with its bytes, and nothing else is, except a file whose fsync was
    under way (its bytes complete): one still being written is absent, never a torn object."""
    cache_dir = mount.tmp_path / "crash-cache"
    parts = ["--part-size", "5M"]
    """The same on both mounts: an upload completed just before the kill is recognised after
    the remount by its multipart ETag, which the part size determines."""
    m = mount(bucket, cache_dir=cache_dir, options=["--upload-delay", "0", *parts])
    acked: dict[str, bytes] = {}
    syncing: dict[str, bytes] = {}
    """Files whose writes all returned and whose fdatasync was called (it may not have)."""
    lock = threading.Lock()

    def writer(worker: int) -> None:
        for index in itertools.count():
            name = f"w{worker}/{index:03d}.dcm"
            size = 6 * MiB + index * 4099 if worker == 0 else 40 * KiB + index * 1009
            data = payload(size, name)
            try:
                fd = os.open(m.path / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    for offset in range(0, size, MiB):
                        os.pwrite(fd, data[offset : offset + MiB], offset)
                    with lock:
                        syncing[name] = data
                    os.fdatasync(fd)
                    with lock:
                        acked[name] = data
                finally:
                    os.close(fd)
            except OSError:
                return  # the daemon is gone

    client = bucket.server.client()

    def multipart_in_flight() -> bool:
        with lock:
            enough = len(acked) >= 12
        return enough and bool(client.list_multipart_uploads(Bucket=bucket.name).get("Uploads"))

    for worker in range(4):
        (m.path / f"w{worker}").mkdir()
    with ThreadPoolExecutor(4) as pool:
        writers = [pool.submit(writer, worker) for worker in range(4)]
        in_flight = wait_until(multipart_in_flight, 60, interval=0.01)
        os.kill(m.pid, signal.SIGKILL)
        for future in writers:
            future.result()
    assert in_flight, m.log_tail()
    assert wait_until(lambda: not process_alive(m.pid), 10)
    cleared = cloudfs("unmount", m.path)
    assert cleared.returncode == 0, cleared.stderr
    with lock:
        acknowledged, under_way = dict(acked), dict(syncing)
    assert len(acknowledged) > len(bucket.listed_keys())  # the kill left uploads to do

    again = mount(bucket, mountpoint=m.path, cache_dir=cache_dir, options=[*FAST, *parts])
    assert wait_until(lambda: drained(again), 120, interval=0.2), backlog(again)
    assert backlog(again)["conflicts"] == 0, again.log_tail()
    objects = bucket_objects(bucket)
    for name, data in acknowledged.items():
        assert name in objects, f"{name} was fsync'd but is not in the bucket"
        assert_bytes(objects[name], data, name)
    for name, data in objects.items():
        assert name in under_way, f"{name} is in the bucket but its writer never fsync'd it"
        assert_bytes(data, under_way[name], name)
    shown = {str(p.relative_to(again.path)) for p in again.path.rglob("*.dcm")}
    assert shown == set(objects)


def test_kill_9_during_a_rewrite_of_a_synced_file_uploads_what_the_disk_holds(
    mount: Mounter, bucket: Bucket
) -> None:
    """A file fsync'd but not yet uploaded, reopened and rewritten in place (no fsync), then
    kill -9: it is not set aside; what goes up is what a local disk would hold, the
    acknowledged bytes with the rewrite's writes that returned (here an overwrite and an
    append)."""
    cache_dir = mount.tmp_path / "rewrite-cache"
    m = mount(bucket, cache_dir=cache_dir, options=["--upload-delay", "3600"])
    first = payload(300 * KiB, "acknowledged")
    write_synced(m.path / "report.dcm", first)
    patch, tail = payload(50 * KiB, "rewrite"), payload(20 * KiB, "appended")
    fd = os.open(m.path / "report.dcm", os.O_WRONLY)
    os.pwrite(fd, patch, 100 * KiB)
    os.pwrite(fd, tail, len(first))
    kill_daemon(m, fd)
    assert bucket.listed_keys() == []
    again = mount(bucket, mountpoint=m.path, cache_dir=cache_dir, options=FAST)
    expected = first[: 100 * KiB] + patch + first[150 * KiB :] + tail
    wait_for_bucket(bucket, {"report.dcm": expected}, again)
    assert "never fsync'd or closed" not in again.log_text()
