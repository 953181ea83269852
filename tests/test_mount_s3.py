"""cloudfs mounted through /dev/fuse on a real moto_server: what a reader of the mount sees.

Every test mounts with ``python -m cloudfs mount`` and reads with ordinary system calls; objects
are put into the bucket with boto3 over HTTP and the bytes read back are compared with them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import (
    PYTHON,
    Bucket,
    Gate,
    MotoServer,
    Mount,
    Mounter,
    assert_bytes,
    drop_kernel_caches,
    is_mounted,
    new_bucket,
    payload,
    process_alive,
    read_direct,
    read_file,
    sha256,
    wait_until,
)
from hypothesis import given, settings
from hypothesis import strategies as st

KiB = 1024
MiB = 1024 * KiB
BLOCK = 64 * KiB
SMALL_BLOCKS = ["--block-size", "64K"]


def ls_sizes(directory: Path) -> dict[str, int]:
    """Sizes as ``ls -ln`` prints them: name -> size."""
    result = subprocess.run(
        ["ls", "-ln", "--quoting-style=literal", str(directory)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    sizes = {}
    for line in result.stdout.splitlines()[1:]:
        fields = line.split(None, 8)
        sizes[fields[8]] = int(fields[4])
    return sizes


def timed_errno(action: Callable[[], object]) -> tuple[int | None, float]:
    """Run ``action``; return the errno of the OSError it raised (None if none) and the time."""
    started = time.monotonic()
    try:
        action()
    except OSError as exc:
        return exc.errno, time.monotonic() - started
    return None, time.monotonic() - started


# -- 1. byte-exact reads ---------------------------------------------------------------------------

EDGE_SIZES = {
    "empty.bin": 0,
    "one.bin": 1,
    "one-block.bin": BLOCK,
    "block-plus-one.bin": BLOCK + 1,
    "many-blocks.bin": 37 * BLOCK + 4321,
    "nested/dir/ranged.bin": 9 * MiB + 12345,  # above the whole-object size: ranged GETs
}


@pytest.mark.timeout(120)
def test_whole_files_and_sizes_are_exact(bucket: Bucket, mount: Mounter) -> None:
    """Objects of 0, 1, one block, one block + 1 and many blocks read back whole, byte for byte,
    through the page cache and with O_DIRECT; stat and ls -l show their true sizes."""
    for key, size in EDGE_SIZES.items():
        bucket.put(key, payload(size, key))
    mounted = mount(bucket, options=SMALL_BLOCKS)

    for key, data in bucket.objects.items():
        path = mounted.path / key
        assert os.stat(path).st_size == len(data), key
        assert_bytes(read_direct(path), data, key)
        assert_bytes(read_file(path, chunk=4096), data, key)
        assert_bytes(read_file(path), data, key)

    listed = ls_sizes(mounted.path)
    expected = {key: len(data) for key, data in bucket.objects.items() if "/" not in key}
    assert {name: size for name, size in listed.items() if name != "nested"} == expected
    assert ls_sizes(mounted.path / "nested/dir") == {"ranged.bin": 9 * MiB + 12345}


@pytest.mark.timeout(180)
def test_random_ranges_match_the_source(bucket: Bucket, mount: Mounter) -> None:
    """Reads at random offsets and lengths, across block boundaries and past the end of file,
    return exactly the source bytes, both through the page cache and with O_DIRECT."""
    sources = {
        "ranged.bin": payload(9 * MiB + 777, "ranged"),
        "small.bin": payload(21 * BLOCK + 3, "small"),
    }
    for key, data in sources.items():
        bucket.put(key, data)
    mounted = mount(bucket, options=SMALL_BLOCKS)
    direct = {key: os.open(mounted.path / key, os.O_RDONLY | os.O_DIRECT) for key in sources}
    cached = {key: os.open(mounted.path / key, os.O_RDONLY) for key in sources}

    @st.composite
    def ranges(draw: st.DrawFn) -> tuple[str, int, int]:
        key = draw(st.sampled_from(sorted(sources)))
        size = len(sources[key])
        if draw(st.booleans()):
            offset = draw(st.integers(min_value=0, max_value=size + 10))
        else:  # on or next to a block boundary
            boundary = draw(st.integers(min_value=0, max_value=size // BLOCK + 1)) * BLOCK
            offset = max(0, boundary + draw(st.integers(min_value=-3, max_value=3)))
        length = draw(
            st.one_of(
                st.integers(min_value=0, max_value=3 * BLOCK + 5),
                st.sampled_from([1, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK]),
            )
        )
        return key, offset, length

    @settings(max_examples=50, deadline=None, database=None)
    @given(ranges())
    def check(read: tuple[str, int, int]) -> None:
        key, offset, length = read
        expected = sources[key][offset : offset + length]
        assert_bytes(os.pread(direct[key], length, offset), expected)
        assert_bytes(os.pread(cached[key], length, offset), expected)

    try:
        check()
    finally:
        for fd in [*direct.values(), *cached.values()]:
            os.close(fd)


# -- 2. served from the cache ----------------------------------------------------------------------


def mount_and_read_a_study(server: MotoServer, mount: Mounter) -> tuple[Bucket, Mount]:
    """A bucket with two instances, mounted with small blocks, every byte read once."""
    bucket = new_bucket(server)
    bucket.put("study/a.dcm", payload(3 * MiB + 17, "a"))
    bucket.put("study/b.dcm", payload(200 * KiB, "b"))
    mounted = mount(bucket, options=SMALL_BLOCKS)
    for key, data in bucket.objects.items():
        assert_bytes(read_file(mounted.path / key), data)
    return bucket, mounted


@pytest.mark.timeout(120)
def test_cached_file_is_served_while_the_server_is_down(
    private_s3_server: MotoServer, mount: Mounter
) -> None:
    """A file read once is read again, byte for byte, after the S3 server stopped and the kernel
    dropped its page cache: the daemon serves it from its own cache."""
    bucket, mounted = mount_and_read_a_study(private_s3_server, mount)

    private_s3_server.stop()
    drop_kernel_caches()

    for key, data in bucket.objects.items():
        assert_bytes(read_file(mounted.path / key), data, key)
        assert_bytes(read_direct(mounted.path / key), data, key)
    assert sorted(os.listdir(mounted.path / "study")) == ["a.dcm", "b.dcm"]


@pytest.mark.timeout(120)
def test_remount_serves_the_cache_while_the_server_is_down(
    private_s3_server: MotoServer, mount: Mounter
) -> None:
    """After an unmount, a remount on the same cache directory succeeds with the S3 server
    stopped (the catalog persists) and serves the files read before, byte for byte."""
    bucket, first = mount_and_read_a_study(private_s3_server, mount)
    first.unmount()

    private_s3_server.stop()
    again = mount(bucket, mountpoint=first.path, cache_dir=first.cache_dir, options=SMALL_BLOCKS)

    assert sorted(os.listdir(again.path / "study")) == ["a.dcm", "b.dcm"]
    for key, data in bucket.objects.items():
        assert os.stat(again.path / key).st_size == len(data)
        assert_bytes(read_file(again.path / key), data, key)
    assert again.status()["reads"]["disk_hits"] > 0
    warned = [line for line in again.log_text().splitlines() if "unreachable" in line]
    assert warned and "WARNING" in warned[-1], again.log_tail()


# -- 3. uncached file during an outage -------------------------------------------------------------


def mount_with_one_file_cached(server: MotoServer, mount: Mounter) -> tuple[Bucket, Mount]:
    """``cached.dcm`` read once, ``uncached.dcm`` never; reads give up after 10 s."""
    bucket = new_bucket(server)
    bucket.put("cached.dcm", payload(300 * KiB, "cached"))
    bucket.put("uncached.dcm", payload(2 * MiB, "uncached"))
    mounted = mount(bucket, options=[*SMALL_BLOCKS, "--io-timeout", "10"])
    assert_bytes(read_file(mounted.path / "cached.dcm"), bucket.objects["cached.dcm"])
    return bucket, mounted


@pytest.mark.timeout(120)
def test_uncached_read_fails_with_eio_when_the_server_is_stopped(
    private_s3_server: MotoServer, mount: Mounter
) -> None:
    """With the S3 server stopped, reading a file that was never cached fails with EIO well within
    --io-timeout plus a margin; cached files and the mount keep working, and the file reads once
    the server is back."""
    bucket, mounted = mount_with_one_file_cached(private_s3_server, mount)

    private_s3_server.stop()

    code, seconds = timed_errno(lambda: read_direct(mounted.path / "uncached.dcm", 0, 4096))
    assert code == errno.EIO, f"O_DIRECT read: errno {code} after {seconds:.1f}s"
    assert seconds < 30
    code, seconds = timed_errno(lambda: read_file(mounted.path / "uncached.dcm"))
    assert code == errno.EIO, f"buffered read: errno {code} after {seconds:.1f}s"
    assert seconds < 30

    assert_bytes(read_direct(mounted.path / "cached.dcm"), bucket.objects["cached.dcm"])
    assert os.stat(mounted.path / "uncached.dcm").st_size == 2 * MiB
    assert mounted.status()["reads"]["fetch_errors"] >= 1

    # The server comes back (empty: moto keeps state in memory) and the same object is restored.
    private_s3_server.start()
    private_s3_server.client().create_bucket(Bucket=bucket.name)
    bucket.put("uncached.dcm", bucket.objects["uncached.dcm"])
    assert_bytes(read_direct(mounted.path / "uncached.dcm"), bucket.objects["uncached.dcm"])


@pytest.mark.timeout(120)
def test_uncached_read_fails_with_eio_within_io_timeout_when_the_server_hangs(
    private_s3_server: MotoServer, mount: Mounter
) -> None:
    """With the S3 server frozen (connections accepted, never answered), a read of an uncached
    file fails with EIO after about --io-timeout, not after botocore's longer read timeouts."""
    bucket, mounted = mount_with_one_file_cached(private_s3_server, mount)

    private_s3_server.pause()
    try:
        code, seconds = timed_errno(lambda: read_direct(mounted.path / "uncached.dcm", 0, 4096))
        assert code == errno.EIO, f"errno {code} after {seconds:.1f}s"
        assert seconds < 10 + 8, f"EIO took {seconds:.1f}s with --io-timeout 10"
        assert_bytes(read_direct(mounted.path / "cached.dcm"), bucket.objects["cached.dcm"])
    finally:
        private_s3_server.resume()


def test_a_reply_cut_short_mid_body_is_asked_again_and_the_bytes_are_right(
    bucket: Bucket, mount: Mounter, gate: Gate
) -> None:
    """The link drops two GETs in the middle of their bodies: the daemon asks again for what
    did not arrive, and the reader gets the whole file right, with no error."""
    data = payload(6 * MiB, "cut short")
    bucket.put("series/cut.dcm", data)
    mounted = mount(bucket, endpoint=gate.endpoint, options=["--no-dicom-index"])
    gate.cut_replies(2, after=200 * KiB)
    assert_bytes(read_file(mounted.path / "series/cut.dcm"), data, "read across the drops")
    assert gate.cuts == 0, "the link dropped fewer replies than the test meant"
    assert mounted.log_text().count("the reply was cut short") == 2, mounted.log_tail()
    assert mounted.status()["reads"]["fetch_errors"] == 0


# -- 4. a changed object ---------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_changed_object_is_read_whole_after_refresh_never_mixed(
    bucket: Bucket, mount: Mounter
) -> None:
    """After objects are overwritten with other bytes of another size and `cloudfs refresh` ran,
    a new open reads exactly the new version, whether the old one was read (growing and
    shrinking) or only listed with ls -l; a file opened before the change returns old bytes or
    ESTALE, never new bytes."""
    old = {
        "grow.bin": payload(9 * MiB + 1000, "grow-1"),
        "shrink.bin": payload(MiB + 77, "shrink-1"),
        "listed.bin": payload(700 * KiB + 1, "listed-1"),
    }
    new = {
        "grow.bin": payload(10 * MiB + 333, "grow-2"),
        "shrink.bin": payload(300 * KiB, "shrink-2"),
        "listed.bin": payload(MiB + 5, "listed-2"),
    }
    for key, data in old.items():
        bucket.put(key, data)
    mounted = mount(bucket, options=SMALL_BLOCKS)
    for key in ("grow.bin", "shrink.bin"):
        assert_bytes(read_file(mounted.path / key, chunk=4096), old[key])
    assert ls_sizes(mounted.path) == {key: len(data) for key, data in old.items()}

    # An O_DIRECT reader half way through the old version when the object changes.
    early = os.open(mounted.path / "grow.bin", os.O_RDONLY | os.O_DIRECT)
    try:
        step = BLOCK
        for offset in range(0, MiB, step):
            assert_bytes(os.pread(early, step, offset), old["grow.bin"][offset : offset + step])
        for key, data in old.items():  # the sizes a user last saw
            assert os.stat(mounted.path / key).st_size == len(data)

        for key, data in new.items():
            bucket.put(key, data)
        mounted.refresh()

        for offset in range(MiB, len(old["grow.bin"]), step):
            try:
                chunk = os.pread(early, step, offset)
            except OSError as exc:
                assert exc.errno == errno.ESTALE, exc
                break
            assert_bytes(chunk, old["grow.bin"][offset : offset + step], f"old file at {offset}")
    finally:
        os.close(early)

    for key, data in new.items():
        path = mounted.path / key
        got = read_file(path, chunk=4096)
        assert_bytes(
            got, data, f"{key} after refresh (old version {len(old[key])} bytes, new {len(data)})"
        )
        assert os.stat(path).st_size == len(data)


@pytest.mark.timeout(120)
def test_short_refresh_interval_picks_up_added_keys_by_itself(
    bucket: Bucket, mount: Mounter
) -> None:
    """With --refresh-interval 1, keys another client adds to the bucket appear in the mount
    within seconds without `cloudfs refresh`, also a name looked up (and missed) just before."""
    bucket.put("first.dcm", payload(10 * KiB, "first"))
    mounted = mount(bucket, options=["--refresh-interval", "1"])
    assert os.listdir(mounted.path) == ["first.dcm"]
    assert not (mounted.path / "late.dcm").exists()  # the kernel now caches a missing name

    bucket.put("late.dcm", payload(20 * KiB, "late"))
    bucket.put("new/deep.dcm", payload(30 * KiB, "deep"))

    # Well under the 10 s the kernel keeps a missing name.
    assert wait_until(lambda: (mounted.path / "late.dcm").exists(), 8), mounted.log_tail()
    assert wait_until(lambda: "new" in os.listdir(mounted.path), 8), mounted.log_tail()
    for key in ("late.dcm", "new/deep.dcm"):
        assert_bytes(read_file(mounted.path / key), bucket.objects[key], key)


# -- 5. eviction -----------------------------------------------------------------------------------


def du_bytes(path: Path) -> int:
    result = subprocess.run(
        ["du", "-s", "--block-size=1", str(path)], capture_output=True, text=True, check=True
    )
    return int(result.stdout.split()[0])


def footprint(directory: Path) -> str:
    """Where the disk space of a block cache goes, for failure messages."""
    files = [path for path in directory.rglob("*") if path.is_file()]
    values = sum(path.stat().st_size for path in files if path.suffix == ".val")
    others = {path.name: path.stat().st_size for path in files if path.suffix != ".val"}
    dirs = sum(1 for path in directory.rglob("*") if path.is_dir())
    return f"block files {values} bytes, other files {others}, {dirs} subdirectories"


@pytest.mark.timeout(180)
def test_eviction_keeps_the_cache_under_its_cap(bucket: Bucket, mount: Mounter) -> None:
    """Reading 96 MiB through a 64 MiB cache keeps the cache (as status reports it and as du
    measures its blocks directory) under the cap, and every read stays byte-exact."""
    objects = {f"series/{index:02d}.dcm": payload(4 * MiB, f"evict-{index}") for index in range(24)}
    bucket.put_many(objects)
    digests = {key: sha256(data) for key, data in objects.items()}
    mounted = mount(
        bucket, cache_size="64M", options=["--read-ahead", "8M", "--block-size", "256K"]
    )
    for key, digest in digests.items():
        assert sha256(read_file(mounted.path / key)) == digest, key

    facts = mounted.status()["cache"]
    limit = 64 * MiB
    assert facts["limit"] == limit
    assert 0 < facts["bytes"] <= limit, facts
    blocks = mounted.cache_dir / "blocks"
    on_disk = du_bytes(blocks)
    assert on_disk <= limit, (
        f"du: the cache's blocks directory takes {on_disk} bytes, over the {limit} cap "
        f"(status says {facts['bytes']}); {footprint(blocks)}"
    )

    drop_kernel_caches()
    for key in list(digests)[:3]:  # evicted long ago: fetched again
        assert sha256(read_file(mounted.path / key)) == digests[key], key
    assert mounted.status()["cache"]["bytes"] <= limit
    assert du_bytes(mounted.cache_dir / "blocks") <= limit


# -- 6. concurrent readers -------------------------------------------------------------------------

_READER_SCRIPT = """
import hashlib, sys
for path in sys.argv[1:]:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(48 * 1024):
            digest.update(chunk)
    print(digest.hexdigest(), path, flush=True)
"""


@pytest.mark.timeout(180)
def test_concurrent_threads_and_processes_read_correct_bytes(
    bucket: Bucket, mount: Mounter
) -> None:
    """8 threads and 4 processes reading different files and the same files at once, on a cold
    cache, all get the source bytes."""
    sizes = [700 * KiB, 2 * MiB + 5, 3 * MiB, MiB + 1, 9 * MiB + 99, 5 * MiB]
    digests = {}
    for index, size in enumerate(sizes):
        data = payload(size, f"concurrent-{index}")
        bucket.put(f"c/{index}.bin", data)
        digests[f"c/{index}.bin"] = sha256(data)
    mounted = mount(bucket, options=["--block-size", "128K"])
    keys = sorted(digests)
    shared = "c/4.bin"  # every reader also reads this one

    processes = []
    for number in range(4):
        paths = [str(mounted.path / shared), str(mounted.path / keys[number])]
        processes.append(
            subprocess.Popen(
                [PYTHON, "-c", _READER_SCRIPT, *paths],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )

    start = threading.Barrier(8, timeout=60)

    def reader(number: int) -> dict[str, str]:
        start.wait()
        own = keys[(number + 2) % len(keys)]
        chunk = (number + 1) * 24 * KiB  # sizes unaligned to the 128 KiB blocks
        return {
            key: sha256(read_file(mounted.path / key, chunk=chunk))
            for key in ((own, shared) if number % 2 else (shared, own))
        }

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(reader, range(8)))
    for found in results:
        for key, digest in found.items():
            assert digest == digests[key], key

    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        lines = out.splitlines()
        assert len(lines) == 2, out
        for line in lines:
            digest, path = line.split(" ", 1)
            assert digest == digests[str(Path(path).relative_to(mounted.path))], path


# -- 7. hostile keys -------------------------------------------------------------------------------

UNSAFE_KEYS = ["/lead", "a//b", "./x", "../y", "d/../e", "n" * 300]


@pytest.mark.timeout(120)
def test_hostile_keys_never_escape_the_mount(bucket: Bucket, mount: Mounter) -> None:
    """Keys with empty, '.' or '..' segments or overlong names are not shown anywhere; a key that
    is also a prefix shows as the directory; a directory marker is an empty directory; unicode
    and space names read back; status counts the hidden keys with examples."""
    readable = {
        "f/g": b"the file under a key that is also a prefix",
        "Ünïcødé/ß.txt": "unicode ✓".encode(),
        "with space/a file.txt": b"spaces are fine",
        "plain.dcm": payload(150 * KiB, "plain"),
    }
    for key in UNSAFE_KEYS:
        bucket.put(key, f"unsafe {key}".encode())
    bucket.put("f", b"the file f, hidden by the directory f")
    bucket.put("dirmarker/", b"")
    for key, data in readable.items():
        bucket.put(key, data)
    assert set(bucket.listed_keys()) == set(bucket.objects), "the server changed a key"

    mounted = mount(bucket)
    root = os.path.realpath(mounted.path)
    seen = set()
    for directory, dirnames, filenames in os.walk(mounted.path):
        for name in dirnames + filenames:
            full = os.path.join(directory, name)
            relative = os.path.relpath(full, mounted.path)
            assert os.path.realpath(full).startswith(root + os.sep), full
            assert ".." not in Path(relative).parts and "." not in Path(relative).parts
            assert len(name.encode()) <= 255
            seen.add(relative)
    assert seen == {
        "f",
        "f/g",
        "dirmarker",
        "Ünïcødé",
        "Ünïcødé/ß.txt",
        "with space",
        "with space/a file.txt",
        "plain.dcm",
    }
    assert not (mounted.path.parent / "y").exists()
    assert not (mounted.path / "lead").exists() and not (mounted.path / "a").exists()
    assert (mounted.path / "f").is_dir() and os.listdir(mounted.path / "f") == ["g"]
    assert (mounted.path / "dirmarker").is_dir() and os.listdir(mounted.path / "dirmarker") == []
    for key, data in readable.items():
        assert_bytes(read_file(mounted.path / key), data, key)
        assert os.stat(mounted.path / key).st_size == len(data), key

    catalog = mounted.status()["catalog"]
    assert catalog["rejected_keys"] >= len(UNSAFE_KEYS), catalog
    examples = {example["key"] for example in catalog["rejected_examples"]}
    assert set(UNSAFE_KEYS) <= examples, examples
    # Still serving after all of it.
    assert_bytes(read_direct(mounted.path / "plain.dcm"), readable["plain.dcm"])


# -- 8. archive storage class ----------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_glacier_object_is_listed_but_refused_with_eacces(bucket: Bucket, mount: Mounter) -> None:
    """An object in GLACIER shows its true size, but opening it fails quickly with EACCES, with
    one log line naming the key and class; other files keep being served."""
    bucket.put("archive/cold.dcm", payload(300_000, "cold"), storage_class="GLACIER")
    bucket.put("archive/warm.dcm", payload(200_000, "warm"))
    mounted = mount(bucket)
    cold = mounted.path / "archive/cold.dcm"

    assert sorted(os.listdir(mounted.path / "archive")) == ["cold.dcm", "warm.dcm"]
    assert os.stat(cold).st_size == 300_000
    for _ in range(2):
        code, seconds = timed_errno(lambda: read_file(cold))
        assert code == errno.EACCES, f"errno {code}"
        assert seconds < 5
    assert_bytes(read_file(mounted.path / "archive/warm.dcm"), bucket.objects["archive/warm.dcm"])

    warnings = [
        line
        for line in mounted.log_text().splitlines()
        if "archive/cold.dcm" in line and "GLACIER" in line
    ]
    assert len(warnings) == 1, warnings


def test_glacier_restore_is_requested_when_asked(bucket: Bucket, mount: Mounter) -> None:
    """With --restore-days, opening an archived object still fails with EACCES but asks S3 for a
    restore (logged once); once S3 has restored it (moto does so at once), it reads correctly."""
    bucket.put("archive/cold.dcm", payload(300_000, "restore"), storage_class="GLACIER")
    mounted = mount(bucket, options=["--restore-days", "2"])
    cold = mounted.path / "archive/cold.dcm"

    code, _ = timed_errno(lambda: read_file(cold))
    assert code == errno.EACCES, f"errno {code}"
    head = bucket.server.client().head_object(Bucket=bucket.name, Key="archive/cold.dcm")
    assert 'ongoing-request="false"' in head.get("Restore", ""), head.get("Restore")
    requested = [line for line in mounted.log_text().splitlines() if "restore requested" in line]
    assert len(requested) == 1, mounted.log_tail()

    assert_bytes(read_file(cold), bucket.objects["archive/cold.dcm"])


@pytest.mark.timeout(120)
def test_glacier_object_open_fails_with_eio_within_io_timeout_when_the_server_hangs(
    private_s3_server: MotoServer, mount: Mounter
) -> None:
    """With the S3 server frozen, opening an archived object (which asks S3 whether it has been
    restored) fails with EIO after about --io-timeout, not after botocore's retries."""
    bucket = new_bucket(private_s3_server)
    bucket.put("cold.dcm", payload(100 * KiB, "frozen"), storage_class="GLACIER")
    mounted = mount(bucket, options=["--io-timeout", "3"])

    private_s3_server.pause()
    try:
        code, seconds = timed_errno(lambda: read_file(mounted.path / "cold.dcm"))
        assert code == errno.EIO, f"errno {code} after {seconds:.1f}s"
        assert seconds < 3 + 3, f"EIO took {seconds:.1f}s with --io-timeout 3"
    finally:
        private_s3_server.resume()
    code, _ = timed_errno(lambda: read_file(mounted.path / "cold.dcm"))
    assert code == errno.EACCES, f"errno {code} once the server answers"


# -- 10. stopping ----------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_unmounts_a_foreground_daemon_cleanly(
    bucket: Bucket, mount: Mounter, signum: signal.Signals
) -> None:
    """SIGTERM or SIGINT (Ctrl-C) to `cloudfs mount --foreground` unmounts and the process exits
    with status 0."""
    bucket.put("a.dcm", payload(100 * KiB, "a"))
    mounted = mount(bucket, foreground=True)
    assert_bytes(read_file(mounted.path / "a.dcm"), bucket.objects["a.dcm"])
    assert mounted.process is not None

    os.kill(mounted.pid, signum)
    code = mounted.process.wait(30)

    assert code == 0, mounted.log_tail()
    assert not is_mounted(mounted.path)
    assert os.listdir(mounted.path) == []


@pytest.mark.timeout(120)
def test_cloudfs_unmount_stops_a_background_daemon(bucket: Bucket, mount: Mounter) -> None:
    """`cloudfs unmount` of a background mount unmounts it and the daemon exits."""
    bucket.put("a.dcm", payload(100 * KiB, "a"))
    mounted = mount(bucket)
    assert_bytes(read_file(mounted.path / "a.dcm"), bucket.objects["a.dcm"])
    assert process_alive(mounted.pid)

    mounted.unmount()

    assert not is_mounted(mounted.path)
    assert wait_until(lambda: not process_alive(mounted.pid), 10)
    assert os.listdir(mounted.path) == []


def listing_checkpoint(catalog: Path) -> str | None:
    """The key an unfinished first listing has cataloged up to, read from the daemon's catalog
    (plaintext SQLite when no key is set) as it writes it."""
    if not catalog.exists():
        return None
    with contextlib.closing(sqlite3.connect(f"file:{catalog}?mode=ro", uri=True)) as db:
        try:
            row = db.execute("SELECT value FROM meta WHERE name='listing_checkpoint'").fetchone()
        except sqlite3.OperationalError:  # the schema is not there yet
            return None
    return None if row is None else str(row[0])


def start_first_mount(
    bucket: Bucket, mount: Mounter, tmp_path: Path
) -> tuple[subprocess.Popen[bytes], Path, Path, list[str]]:
    """Fill ``bucket`` with two listing pages of keys, start ``cloudfs mount --foreground`` on
    it with a new cache, and return once the first page is cataloged (the second still on its
    way): the daemon, its mountpoint, its cache and the keys."""
    keys = [f"series{i % 3}/img{i:05d}.dcm" for i in range(1500)]
    bucket.put_many(dict.fromkeys(keys, b"x"))
    mountpoint = mount.new_dir("mnt")
    cache_dir = tmp_path / "first-cache"
    args = mount.command(bucket, mountpoint, cache_dir, ["--foreground"], None, "1G")
    daemon = subprocess.Popen(
        [PYTHON, "-m", "cloudfs", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd="/",
    )
    # moto takes some 0.2 s per page: the second page is still coming when this sees the first.
    wait_until(lambda: listing_checkpoint(cache_dir / "catalog.sqlite"), 60, interval=0.002)
    return daemon, mountpoint, cache_dir, keys


@pytest.mark.timeout(180)
def test_a_first_listing_killed_part_way_goes_on_where_it_stopped(
    bucket: Bucket, mount: Mounter, tmp_path: Path
) -> None:
    """The first mount answers while it lists the bucket; ``kill -9`` of the daemon part way:
    the next mount lists only the keys after the last batch the first one cataloged (a first
    listing of tens of millions of objects is never started over), and every object is there."""
    daemon, mountpoint, cache_dir, keys = start_first_mount(bucket, mount, tmp_path)
    try:
        answering = is_mounted(mountpoint)
    finally:
        daemon.kill()
        daemon.wait(30)
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
    checkpoint = listing_checkpoint(cache_dir / "catalog.sqlite")
    assert checkpoint == sorted(keys)[999], "the first page of the listing was not cataloged"
    assert answering, "the mount did not answer while the bucket was being listed"
    assert not is_mounted(mountpoint)

    mounted = mount(bucket, mountpoint, cache_dir)
    log = mounted.log_text()
    assert f"goes on after {checkpoint!r}" in log, mounted.log_tail()
    assert "catalog ready: 1500 objects listed, 500 of them in" in log, mounted.log_tail()
    found = sorted(
        str(path.relative_to(mountpoint)) for path in mountpoint.rglob("*") if path.is_file()
    )
    assert found == sorted(keys)
    assert listing_checkpoint(cache_dir / "catalog.sqlite") is None


@pytest.mark.timeout(180)
def test_a_first_mount_serves_while_listing_and_never_lists_a_directory_in_part(
    bucket: Bucket, mount: Mounter, tmp_path: Path
) -> None:
    """While the first listing runs, a listed file reads at once, and a directory listed
    before the listing has passed it comes back whole (it waits for the listing), never with
    only the entries cataloged so far."""
    daemon, mountpoint, _, keys = start_first_mount(bucket, mount, tmp_path)
    try:
        assert (mountpoint / sorted(keys)[0]).read_bytes() == b"x"
        series = sorted(name for name in os.listdir(mountpoint) if name.startswith("series"))
        assert series == ["series0", "series1", "series2"]
        for name in series:
            want = sorted(key.split("/")[1] for key in keys if key.startswith(f"{name}/"))
            assert sorted(os.listdir(mountpoint / name)) == want
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
    assert not is_mounted(mountpoint)


# -- 11. many files at once ------------------------------------------------------------------------


def peak_rss(pid: int) -> int:
    """VmHWM of ``pid`` in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * KiB
    raise AssertionError(f"no VmHWM for pid {pid}")


@pytest.mark.timeout(240)
def test_hundred_files_read_at_once_stay_under_the_memory_bound(
    bucket: Bucket, mount: Mounter
) -> None:
    """100 files of 12 MiB (above the whole-object size, so every one gets read-ahead) opened
    and read at once by 100 threads return the source bytes, and the daemon's peak RSS stays
    under 500 MiB: the documented bound less the directory listings it may keep, which reading
    files does not use."""
    digests: dict[str, str] = {}

    def upload(index: int) -> None:
        data = payload(12 * MiB, f"hundred-{index}")
        key = f"many/{index:03d}.dcm"
        bucket.server.client().put_object(Bucket=bucket.name, Key=key, Body=data)
        digests[key] = sha256(data)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(upload, range(100)))
    mounted = mount(bucket)
    start = threading.Barrier(100, timeout=60)

    def reader(key: str) -> str:
        digest = hashlib.sha256()
        with open(mounted.path / key, "rb", buffering=0) as handle:
            start.wait()
            while chunk := handle.read(MiB):
                digest.update(chunk)
        return digest.hexdigest()

    with ThreadPoolExecutor(100) as pool:
        found = dict(zip(sorted(digests), pool.map(reader, sorted(digests)), strict=True))

    assert found == digests
    peak = peak_rss(mounted.pid)
    assert peak < 500 * MiB, f"daemon peak RSS {peak / MiB:.0f} MiB"
    assert mounted.status()["reads"]["blocks_read_ahead"] > 0
