"""The systems the suite compares, behind one interface: cloudfs, s3fs-fuse and ``rclone mount``.

Each ``SystemMount`` mounts one bucket of the endpoint cold (a fresh mountpoint use, and a cache
directory the caller made empty), knows its daemon's pid, reads the daemon's peak resident memory
(``VmHWM`` of /proc/PID/status, the kernel's own high-water mark, so nothing is missed between
polls) and unmounts.  Every peer is driven by its own command line, as an operator would run it,
with the endpoint, path-style addressing and s3rver's key pair: the same bytes over the same link.

Peers run in the foreground as children of the benchmark (``-f`` for s3fs, rclone's default), so
the pid read is the daemon's and a peer that dies at start is noticed at once with its log.
``ensure_installed`` installs a missing peer with apt-get once; a peer that cannot be installed or
mounted is reported by the suite with the reason, never dropped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from .mounts import CACHE_SIZE, CloudfsMount
from .servers import Endpoint, Process
from .system import BenchError, force_unmount, is_mount, wait_for

SYSTEMS = ("cloudfs", "s3fs", "rclone")
PACKAGES = {"s3fs": ("s3fs", "s3fs"), "rclone": ("rclone", "rclone")}
"""Peer -> (executable, Debian package)."""
MOUNT_TIMEOUT = 900.0
"""How long a mount may take to answer: cloudfs lists a new bucket into its catalog before it
answers, which for 100,000 objects behind the WAN proxy on s3rver takes minutes."""


def peak_rss(pid: int | None) -> int | None:
    """Bytes of the peak resident set of ``pid`` (VmHWM), or None when it is gone."""
    if pid is None:
        return None
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def current_rss(pid: int | None) -> int | None:
    """Bytes resident now (VmRSS) for ``pid``, or None when it is gone."""
    if pid is None:
        return None
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return None


_install_failures: dict[str, str] = {}


def ensure_installed(system: str) -> str | None:
    """None when ``system`` can run here, else why not; installs a missing peer once."""
    if system == "cloudfs":
        return None
    executable, package = PACKAGES[system]
    if shutil.which(executable):
        return None
    if system in _install_failures:
        return _install_failures[system]
    result = subprocess.run(
        ["apt-get", "install", "-y", "-qq", package],
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        capture_output=True,
        text=True,
    )
    if result.returncode == 0 and shutil.which(executable):
        return None
    reason = (
        f"not installed (apt-get install {package}: {result.stderr.strip()[-200:] or 'failed'})"
    )
    _install_failures[system] = reason
    return reason


class SystemMount:
    """One mount of one bucket by one system; subclasses say how to start the daemon."""

    system = ""

    def __init__(
        self, endpoint: Endpoint, bucket: str, mountpoint: Path, cache_dir: Path, workdir: Path
    ) -> None:
        self.endpoint = endpoint
        self.bucket = bucket
        self.mountpoint = mountpoint
        self.cache_dir = cache_dir
        self.workdir = workdir
        self.process: Process | None = None
        self.answered_in = 0.0
        """Seconds from the start of the mount until it answered."""

    @property
    def pid(self) -> int | None:
        return self.process.popen.pid if self.process else None

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.system}-{self.cache_dir.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def mount(self) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.process = Process(self.system, self.command(), self.log_path)
        process = self.process

        def mounted() -> bool:
            if not process.alive():
                raise BenchError(f"{self.system} exited at start:\n{process.log_tail(10)}")
            return is_mount(self.mountpoint)

        started = time.perf_counter()
        try:
            wait_for(mounted, MOUNT_TIMEOUT, f"{self.system} at {self.mountpoint}")
        except BenchError:
            self.unmount()
            raise
        self.answered_in = time.perf_counter() - started

    def peak_rss(self) -> int | None:
        return peak_rss(self.pid)

    def unmount(self) -> None:
        if is_mount(self.mountpoint):
            subprocess.run(["fusermount", "-u", str(self.mountpoint)], capture_output=True)
            if is_mount(self.mountpoint):
                subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.popen.wait(30)
            self.process.stop()
        if is_mount(self.mountpoint):
            force_unmount(self.mountpoint)

    def log_tail(self, lines: int = 20) -> str:
        return self.process.log_tail(lines) if self.process else ""


class S3fsMount(SystemMount):
    """s3fs-fuse with a disk cache (``use_cache``): without it s3fs keeps nothing between reads.

    ``cache_limit`` has no s3fs equivalent (s3fs only keeps free disk space, ``ensure_diskfree``),
    so it is ignored and the suite says so."""

    system = "s3fs"

    def command(self) -> list[str]:
        passwd = self.workdir / "s3fs.passwd"
        passwd.write_text(f"{self.endpoint.access_key}:{self.endpoint.secret_key}\n")
        passwd.chmod(0o600)
        options = [
            f"url={self.endpoint.url}",
            "use_path_request_style",
            f"passwd_file={passwd}",
            f"use_cache={self.cache_dir}",
            "endpoint=us-east-1",
            "dbglevel=warn",
        ]
        command = ["s3fs", self.bucket, str(self.mountpoint), "-f"]
        for option in options:
            command += ["-o", option]
        return command


class RcloneMount(SystemMount):
    """``rclone mount`` with ``--vfs-cache-mode full`` (rclone's caching mode for random reads
    and writes), configured through environment variables so no config file is read."""

    system = "rclone"

    def __init__(self, *args: object, cache_limit: int | None = None) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.cache_limit = cache_limit

    def settings(self) -> dict[str, str]:
        return {
            "RCLONE_CONFIG_BENCH_TYPE": "s3",
            "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
            "RCLONE_CONFIG_BENCH_ENDPOINT": self.endpoint.url,
            "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": self.endpoint.access_key,
            "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": self.endpoint.secret_key,
            "RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE": "true",
            "RCLONE_CONFIG_BENCH_REGION": "us-east-1",
        }

    def command(self) -> list[str]:
        config = self.workdir / "rclone.conf"
        config.touch()
        command = ["env", "-u", "AWS_CA_BUNDLE"]
        command += [f"{name}={value}" for name, value in self.settings().items()]
        command += ["rclone", "mount", f"bench:{self.bucket}", str(self.mountpoint)]
        command += ["--config", str(config), "--vfs-cache-mode", "full"]
        command += ["--cache-dir", str(self.cache_dir), "--log-level", "NOTICE"]
        if self.cache_limit is not None:
            # in MiB with its suffix: rclone reads a bare number as KiB
            command += ["--vfs-cache-max-size", f"{self.cache_limit // 2**20}M"]
        return command


class CloudfsSystemMount(SystemMount):
    """cloudfs through the benchmark's existing ``CloudfsMount`` (its own CLI, daemonized), on
    the bucket the workload names."""

    system = "cloudfs"

    def __init__(
        self, *args: object, options: Sequence[str] = (), cache_limit: int | None = None
    ) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        size = f"{cache_limit // 2**20}M" if cache_limit is not None else CACHE_SIZE
        extra = [*options, "--cache-size", size]
        bucket = self.bucket

        class OnBucket(CloudfsMount):
            def command(self) -> list[str]:
                command = super().command()
                return [f"s3://{bucket}" if part.startswith("s3://") else part for part in command]

        self.inner = OnBucket(self.endpoint, self.mountpoint, self.cache_dir, extra)
        self.inner.mount_timeout = MOUNT_TIMEOUT

    @property
    def pid(self) -> int | None:
        return self.inner.pid or self.inner._locked_pid()

    def mount(self) -> None:
        self.inner.mount()
        self.answered_in = self.inner.answered_in

    def unmount(self) -> None:
        self.inner.unmount()

    def log_tail(self, lines: int = 20) -> str:
        return self.inner.log_tail(lines)


def make_mount(
    system: str,
    endpoint: Endpoint,
    bucket: str,
    mountpoint: Path,
    cache_dir: Path,
    workdir: Path,
    *,
    cloudfs_options: Sequence[str] = (),
    cache_limit: int | None = None,
) -> SystemMount:
    """A cold mount of ``bucket`` by ``system``: ``cache_dir`` must not exist yet (or be empty).

    ``cache_limit`` caps the daemon's disk cache where the system has such a cap (cloudfs
    ``--cache-size``, rclone ``--vfs-cache-max-size``; s3fs has none)."""
    args = (endpoint, bucket, mountpoint, cache_dir, workdir)
    if system == "cloudfs":
        return CloudfsSystemMount(*args, options=cloudfs_options, cache_limit=cache_limit)
    if system == "s3fs":
        return S3fsMount(*args)
    if system == "rclone":
        return RcloneMount(*args, cache_limit=cache_limit)
    raise ValueError(f"unknown system {system}")
