"""The timed writes of ``python -m bench write``, and the checks that the bucket got the bytes.

Write throughput is in MB/s (10^6 bytes per second) of wall-clock time around the whole ``dd``,
open and fsync included: what the writer waits for before it may report the data as safe.  An
ingest rate is files per second around the whole loop, directory creation included, as a PACS
storing one instance after the other would see it.  Every check of the bucket's content happens
outside the timed part.
"""

from __future__ import annotations

import contextlib
import os
import random
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from boto3.s3.transfer import TransferConfig

from cloudfs import control

from .servers import BUCKET
from .system import BenchError

MB = 1e6
PART_SIZE = 16 * 2**20
"""cloudfs's default ``--part-size``: the raw upload uses the same parts."""
PART_THREADS = 4
"""cloudfs sends the parts of one upload four at a time (``upload_part_threads``)."""
POLL_INTERVAL = 0.1
GIVE_UP_AFTER_ERRORS = 2
"""Upload errors cloudfs may report during one wait before the wait fails (one may be transient):
cloudfs retries a failed upload forever (1 s doubling to 60 s), so a systematic failure would
otherwise only end at the stall timeout."""
STALL_TIMEOUT = 300.0
"""Seconds without any change in the upload counters before a wait fails."""


def mb_per_s(size: int, seconds: float) -> float:
    return size / seconds / MB


# -- the writers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ingest:
    """``count`` files of ``size`` bytes in a 2-level shard tree under ``prefix``, as Orthanc's
    file storage lays them out (``ab/cd/abcd....dcm``); file ``i`` holds bytes ``i*size`` to
    ``(i+1)*size`` of ``payload``."""

    prefix: str
    count: int
    size: int
    payload: bytes | bytearray
    seed: int
    names: list[str] = field(init=False)

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        names = []
        for _ in range(self.count):
            text = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            names.append(f"{self.prefix}/{text[0:2]}/{text[2:4]}/{text}.dcm")
        object.__setattr__(self, "names", names)
        if len(self.payload) < self.count * self.size:
            raise BenchError(f"ingest payload holds {len(self.payload)} bytes, too few")

    def data(self, index: int) -> memoryview:
        return memoryview(self.payload)[index * self.size : (index + 1) * self.size]


PHASES = ("mkdir", "open", "write", "fdatasync", "close")


def store_like_orthanc(path: Path, data: memoryview) -> tuple[float, ...]:
    """One instance as Orthanc's file storage writes it: make the shard directories, open the
    final name O_CREAT|O_WRONLY|O_TRUNC, write it all, fdatasync, close.  Returns the seconds of
    each step (``PHASES``), so a slow ingest shows where its time goes."""
    marks = [time.perf_counter()]
    path.parent.mkdir(parents=True, exist_ok=True)
    marks.append(time.perf_counter())
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    marks.append(time.perf_counter())
    try:
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        marks.append(time.perf_counter())
        os.fdatasync(fd)
        marks.append(time.perf_counter())
    finally:
        os.close(fd)
    marks.append(time.perf_counter())
    return tuple(later - earlier for earlier, later in zip(marks, marks[1:], strict=False))


def timed_ingest(root: Path, ingest: Ingest, threads: int) -> tuple[float, dict[str, float]]:
    """Seconds to store every file of ``ingest`` under ``root`` from ``threads`` threads, each
    taking the next file as it finishes one; and the mean milliseconds of each step (with one
    thread they add up to the time per file)."""
    counter = iter(range(ingest.count))
    lock = threading.Lock()
    steps: list[tuple[float, ...]] = []

    def worker() -> None:
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            steps.append(store_like_orthanc(root / ingest.names[index], ingest.data(index)))

    with ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        futures = [pool.submit(worker) for _ in range(threads)]
        for future in futures:
            future.result()
        seconds = time.perf_counter() - start
    phases = {
        name: round(statistics.fmean(step[i] for step in steps) * 1000, 3)
        for i, name in enumerate(PHASES)
    }
    return seconds, phases


# -- the endpoint's limits -----------------------------------------------------------------------


def transfer_config() -> TransferConfig:
    """boto3's managed upload with cloudfs's part size and part concurrency."""
    return TransferConfig(
        multipart_threshold=PART_SIZE + 1,
        multipart_chunksize=PART_SIZE,
        max_concurrency=PART_THREADS,
        use_threads=True,
    )


def boto3_upload_file(client: Any, source: Path, key: str, size: int) -> float:
    """MB/s of ``upload_file`` of ``source`` as ``key``, in 16 MiB parts, four at a time."""
    start = time.perf_counter()
    client.upload_file(str(source), BUCKET, key, Config=transfer_config())
    seconds = time.perf_counter() - start
    head = client.head_object(Bucket=BUCKET, Key=key)
    if head["ContentLength"] != size:
        raise BenchError(f"upload_file {key}: the server reports {head['ContentLength']} bytes")
    return mb_per_s(size, seconds)


def boto3_put_objects(client: Any, ingest: Ingest, threads: int) -> float:
    """Files/s of one ``put_object`` per file of ``ingest``, ``threads`` at a time."""

    def put(index: int) -> None:
        client.put_object(Bucket=BUCKET, Key=ingest.names[index], Body=bytes(ingest.data(index)))

    with ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        list(pool.map(put, range(ingest.count)))
        seconds = time.perf_counter() - start
    return ingest.count / seconds


# -- waiting for cloudfs's uploads ---------------------------------------------------------------


def upload_status(mountpoint: Path) -> dict[str, Any]:
    """The "uploads" section of the mount's status, asked over the control socket: the document
    ``cloudfs status --json`` prints, without starting a Python process per poll (0.3-1 s here,
    which would blur the time being measured)."""
    return dict(control.request(mountpoint, "status", timeout=30)["uploads"])


def wait_uploaded(mountpoint: Path, what: str, log_tail: Callable[[], str]) -> float:
    """Poll until the mount reports no file waiting for upload; returns ``time.perf_counter()``
    of the first poll that saw none.  Fails on repeated upload errors or when nothing moves."""
    first = upload_status(mountpoint)
    errors_before = first["errors"]
    last_change = time.monotonic()
    seen = first
    status = first
    while True:
        if status["pending_files"] == 0:
            return time.perf_counter()
        errors = status["errors"] - errors_before
        if errors >= GIVE_UP_AFTER_ERRORS:
            raise BenchError(
                f"cloudfs reported {errors} failed uploads while {what} waited for the bucket "
                f"({status['pending_files']} files, {status['pending_bytes']} bytes pending); "
                f"last error: {status['last_error']}\n{log_tail()}"
            )
        moving = ("pending_files", "pending_bytes", "uploaded_files", "errors")
        if any(status[name] != seen[name] for name in moving):
            seen, last_change = status, time.monotonic()
        elif time.monotonic() - last_change > STALL_TIMEOUT:
            raise BenchError(
                f"cloudfs uploads of {what} made no progress for {STALL_TIMEOUT:.0f}s: "
                f"{status}\n{log_tail()}"
            )
        time.sleep(POLL_INTERVAL)
        status = upload_status(mountpoint)


# -- checking the bucket -------------------------------------------------------------------------


def check_object(client: Any, key: str, expected: bytes | bytearray) -> None:
    """HEAD for the size, then the whole object compared with ``expected`` piece by piece."""
    head = client.head_object(Bucket=BUCKET, Key=key)
    if head["ContentLength"] != len(expected):
        raise BenchError(
            f"{key}: the bucket holds {head['ContentLength']} bytes, expected {len(expected)}"
        )
    body = client.get_object(Bucket=BUCKET, Key=key)["Body"]
    want = memoryview(expected)
    offset = 0
    while chunk := body.read(1 << 20):
        if want[offset : offset + len(chunk)] != chunk:
            raise BenchError(f"{key}: wrong bytes in the bucket near offset {offset}")
        offset += len(chunk)
    if offset != len(expected):
        raise BenchError(f"{key}: read {offset} bytes back, expected {len(expected)}")


def list_keys(client: Any, prefix: str) -> list[str]:
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return keys


def check_ingest(client: Any, ingest: Ingest, spot_checks: int) -> dict[str, int]:
    """Every key of ``ingest`` listed in the bucket, no other under its prefix, and the bytes of
    ``spot_checks`` of them (picked at random) as written."""
    listed = set(list_keys(client, ingest.prefix + "/"))
    wanted = set(ingest.names)
    if listed != wanted:
        missing, extra = sorted(wanted - listed), sorted(listed - wanted)
        raise BenchError(
            f"bucket listing of {ingest.prefix}/: {len(missing)} keys missing "
            f"(e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]})"
        )
    picks = random.Random(ingest.seed).sample(range(ingest.count), min(spot_checks, ingest.count))
    for index in picks:
        check_object(client, ingest.names[index], bytes(ingest.data(index)))
    return {"listed": len(listed), "spot_checked": len(picks)}


def delete_prefix(client: Any, prefix: str) -> None:
    """Remove what a measurement left in the bucket, so the next mount lists an empty one."""
    keys = list_keys(client, prefix)
    for start in range(0, len(keys), 1000):
        batch = [{"Key": key} for key in keys[start : start + 1000]]
        with contextlib.suppress(Exception):
            client.delete_objects(Bucket=BUCKET, Delete={"Objects": batch, "Quiet": True})
