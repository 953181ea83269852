"""The deterministic bytes every system serves: the S3 object, the local file and the memfs file.

Generating a gigabyte with a PRNG costs seconds, so each 1 MiB block is a window of a 2 MiB random
base at an offset that depends on the block index, with the index and seed stamped in its first
16 bytes.  Different blocks never share a 64 KiB-aligned window (the offset step is odd, so two
windows line up only 64K blocks apart), so a read served from the wrong offset or the wrong block
is caught by comparing with these bytes.
"""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

BLOCK = 1 << 20
_STEP = 127_007
"""Odd, so window offsets of blocks less than 64K apart never differ by a multiple of 64 KiB."""


def _base(seed: int) -> bytes:
    return random.Random(seed).randbytes(2 * BLOCK)


def _fill_block(out: memoryview, base: bytes, seed: int, index: int) -> None:
    start = (index * _STEP) % BLOCK
    out[:] = base[start : start + len(out)]
    stamp = struct.pack("<QQ", index, seed)[: len(out)]
    out[: len(stamp)] = stamp


def generate(size: int, seed: int = 1) -> bytearray:
    """The ``size`` bytes of the benchmark object, built in memory."""
    base = _base(seed)
    buffer = bytearray(size)
    view = memoryview(buffer)
    for index, offset in enumerate(range(0, size, BLOCK)):
        _fill_block(view[offset : min(offset + BLOCK, size)], base, seed, index)
    return buffer


def write_file(path: Path, data: bytes | bytearray) -> None:
    """Write ``data`` to ``path`` and make it durable, so a later page-cache drop empties it."""
    with open(path, "wb") as handle:
        view = memoryview(data)
        for offset in range(0, len(data), 16 * BLOCK):
            handle.write(view[offset : offset + 16 * BLOCK])
        handle.flush()
        os.fsync(handle.fileno())
