"""Machine facts and kernel levers the measurements depend on.

* ``drop_page_cache``: a "cold" or "from the disk cache" figure means nothing if the bytes are still
  in the kernel page cache, so those measurements sync and drop it first (root only).
* ``read_ahead_kb``: the kernel's read-ahead of a FUSE mount decides the size of the read requests
  the daemon gets (128 KiB by default, up to 1 MiB when raised), which bounds a Python filesystem's
  throughput more than anything it does itself.
* ``timed_dd``: sequential reads use dd with 1 MiB blocks, the way an operator would check a mount.
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


class BenchError(Exception):
    """A measurement or a setup step failed; the message says what and where to look."""


def is_root() -> bool:
    return os.geteuid() == 0


def needs_root(why: str) -> bool:
    """Whether the run may go on: False, after saying ``why`` root is needed, when not root."""
    if is_root():
        return True
    print(f"bench: needs root ({why})", file=sys.stderr)
    return False


def drop_page_cache() -> bool:
    """Write back dirty pages and drop the page cache; False when not allowed (not root)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def bdi_path(path: Path) -> Path:
    """The backing-device directory in sysfs of the filesystem holding ``path``."""
    device = os.stat(path).st_dev
    return Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}")


def read_ahead_kb(path: Path) -> int | None:
    try:
        return int((bdi_path(path) / "read_ahead_kb").read_text())
    except (OSError, ValueError):
        return None


def set_read_ahead_kb(path: Path, kilobytes: int) -> None:
    target = bdi_path(path) / "read_ahead_kb"
    try:
        target.write_text(f"{kilobytes}\n")
    except OSError as exc:
        raise BenchError(f"cannot set {target} to {kilobytes}: {exc.strerror}") from exc
    if read_ahead_kb(path) != kilobytes:
        raise BenchError(f"{target} did not take the value {kilobytes}")


def timed_dd(path: Path, size: int, target: Path | None = None) -> float:
    """Seconds dd takes, with 1 MiB blocks, to read ``path`` or, given a ``target``, to copy it
    there with ``conv=fsync``; checks that the file read or written holds ``size`` bytes."""
    if target is None:
        command = ["dd", f"if={path}", "of=/dev/null", "bs=1M", "status=none"]
    else:
        command = ["dd", f"if={path}", f"of={target}", "bs=1M", "conv=fsync", "status=none"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise BenchError(f"dd {path} {target or ''} failed: {result.stderr.strip()}")
    checked = target or path
    if os.stat(checked).st_size != size:
        raise BenchError(f"{checked}: size {os.stat(checked).st_size}, expected {size}")
    return seconds


def verify_file(path: Path, expected: bytes | bytearray) -> None:
    """Read ``path`` in 1 MiB pieces and compare with ``expected``; raise at the first mismatch."""
    piece = 1 << 20
    buffer = bytearray(piece)
    view = memoryview(buffer)
    want = memoryview(expected)
    offset = 0
    with open(path, "rb", buffering=0) as handle:
        while True:
            count = handle.readinto(buffer)
            if not count:
                break
            if view[:count] != want[offset : offset + count]:
                raise BenchError(f"{path}: wrong bytes in the MiB at offset {offset}")
            offset += count
    if offset != len(expected):
        raise BenchError(f"{path}: read {offset} bytes, expected {len(expected)}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def mount_device(path: Path) -> tuple[int, int] | None:
    """(major, minor) of the filesystem mounted at ``path``, read from /proc/self/mountinfo.

    Never touches the mount itself: a stat of a FUSE mount whose daemon hangs would hang too.
    """
    target = os.path.abspath(path)
    with open("/proc/self/mountinfo") as info:
        for line in info:
            fields = line.split()
            point = fields[4].replace("\\040", " ")
            if point == target:
                major, minor = fields[2].split(":")
                return int(major), int(minor)
    return None


def is_mount(path: Path) -> bool:
    return mount_device(path) is not None


def force_unmount(path: Path) -> None:
    """Abort the FUSE connection of ``path`` (so nothing waits on its daemon) and detach it."""
    device = mount_device(path)
    if device is None:
        return
    connections = Path("/sys/fs/fuse/connections")
    if device[0] == 0 and connections.is_dir() and not any(connections.iterdir()):
        # the fusectl filesystem is not always mounted (containers): without it, no abort
        subprocess.run(["mount", "-t", "fusectl", "none", str(connections)], capture_output=True)
    if device[0] == 0:
        with contextlib.suppress(OSError):
            Path(f"/sys/fs/fuse/connections/{device[1]}/abort").write_text("1\n")
    subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)
    if is_mount(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def machine() -> dict[str, str | int]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = 0
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as info:
        memory = int(info.readline().split()[1]) * 1024
    return {
        "nproc": os.cpu_count() or 0,
        "cpu": cpu,
        "kernel": platform.release(),
        "memory_gib": round(memory / (1 << 30)),
        "python": platform.python_version(),
    }
