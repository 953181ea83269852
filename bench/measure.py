"""The timed reads.  Each function returns plain figures and checks what it read.

Throughput is in MB/s (10^6 bytes per second) of wall-clock time around the whole read, including
the open and the first request, as a user timing ``dd`` would see it.  Random-read latency is
per ``pread`` call of 64 KiB at a 64 KiB-aligned offset, on a file descriptor opened once, in ms;
each read's bytes are compared with the expected ones outside the timed call.
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .servers import BUCKET
from .system import BenchError

MB = 1e6
RANDOM_READ = 64 * 1024
BLOCK = 1024 * 1024
PARALLEL_THREADS = 8
PARALLEL_RANGE = 8 * 1024 * 1024


def mb_per_s(size: int, seconds: float) -> float:
    return size / seconds / MB


def _drain(body: Any) -> int:
    total = 0
    while chunk := body.read(1 << 20):
        total += len(chunk)
    return total


def boto3_single(client: Any, key: str, size: int) -> float:
    """One GET of the whole object, read to the end in 1 MiB pieces."""
    start = time.perf_counter()
    total = _drain(client.get_object(Bucket=BUCKET, Key=key)["Body"])
    seconds = time.perf_counter() - start
    if total != size:
        raise BenchError(f"single GET returned {total} bytes, expected {size}")
    return mb_per_s(size, seconds)


def boto3_parallel(client: Any, key: str, size: int) -> float:
    """The whole object as 8 MiB ranged GETs, eight at a time."""
    ranges = [(o, min(o + PARALLEL_RANGE, size)) for o in range(0, size, PARALLEL_RANGE)]

    def fetch(span: tuple[int, int]) -> int:
        first, end = span
        answer = client.get_object(Bucket=BUCKET, Key=key, Range=f"bytes={first}-{end - 1}")
        count = _drain(answer["Body"])
        if count != end - first:
            raise BenchError(f"ranged GET {first}-{end - 1} returned {count} bytes")
        return count

    with ThreadPoolExecutor(PARALLEL_THREADS) as pool:
        start = time.perf_counter()
        total = sum(pool.map(fetch, ranges))
        seconds = time.perf_counter() - start
    if total != size:
        raise BenchError(f"parallel GETs returned {total} bytes, expected {size}")
    return mb_per_s(size, seconds)


def boto3_block_latency(client: Any, key: str, size: int, offsets: list[int]) -> list[float]:
    """Milliseconds of a ranged GET of the 1 MiB block around each offset, one at a time: what
    a cold random read through cloudfs costs at least (cloudfs fetches whole blocks)."""
    latencies = []
    for offset in offsets:
        first = offset - offset % BLOCK
        end = min(first + BLOCK, size)
        start = time.perf_counter()
        answer = client.get_object(Bucket=BUCKET, Key=key, Range=f"bytes={first}-{end - 1}")
        count = _drain(answer["Body"])
        latencies.append((time.perf_counter() - start) * 1000)
        if count != end - first:
            raise BenchError(f"ranged GET {first}-{end - 1} returned {count} bytes")
    return latencies


def random_offsets(size: int, count: int, seed: int) -> list[int]:
    """Up to ``count`` 64 KiB-aligned offsets, each in a different 1 MiB block (the cloudfs block),
    so that on an empty cache every read is a miss that costs a GET."""
    import random

    rng = random.Random(seed)
    blocks = max(size // BLOCK, 1)
    per_block = BLOCK // RANDOM_READ
    picked = rng.sample(range(blocks), min(count, blocks))
    return [block * BLOCK + rng.randrange(per_block) * RANDOM_READ for block in picked]


def random_reads(path: Path, offsets: list[int], expected: bytes | bytearray) -> list[float]:
    """Milliseconds of each 64 KiB pread at ``offsets``; raises on wrong bytes."""
    want = memoryview(expected)
    latencies = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset in offsets:
            start = time.perf_counter()
            data = os.pread(fd, RANDOM_READ, offset)
            latencies.append((time.perf_counter() - start) * 1000)
            if want[offset : offset + RANDOM_READ] != data:
                raise BenchError(f"{path}: wrong bytes from pread at offset {offset}")
    finally:
        os.close(fd)
    return latencies


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (p99 of 200 samples is the second largest)."""
    ordered = sorted(values)
    return ordered[max(math.ceil(fraction * len(ordered)) - 1, 0)]
