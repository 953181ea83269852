"""Mounting and unmounting the filesystems under test: cloudfs (its own CLI) and the no-op memfs.

cloudfs is driven only through its command line (``python -m cloudfs mount`` without
``--foreground`` returns once the mount answers; ``python -m cloudfs unmount`` waits for the
daemon to exit), as an operator would, so the benchmark measures what users get.  Every mount is
registered for cleanup and undone even when a measurement fails or the run is interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .servers import BUCKET, Endpoint, Process
from .system import BenchError, force_unmount, is_mount, wait_for

CACHE_SIZE = "4G"
MOUNT_TIMEOUT = 60.0


class CloudfsMount:
    """One cloudfs mount of the benchmark bucket with a given cache directory.

    ``options`` replace the benchmark's own mount options (``--cache-size``) when given: the write
    benchmark mounts with cloudfs's defaults except where it says otherwise."""

    def __init__(
        self,
        endpoint: Endpoint,
        mountpoint: Path,
        cache_dir: Path,
        options: Sequence[str] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.mountpoint = mountpoint
        self.cache_dir = cache_dir
        self.options = ("--cache-size", CACHE_SIZE) if options is None else tuple(options)
        self.pid: int | None = None
        self.mount_timeout = MOUNT_TIMEOUT
        """How long the mount may take to answer, and then again to list the whole bucket."""
        self.answered_in = 0.0
        """Seconds ``cloudfs mount`` took to return, the mount answering."""

    @property
    def log_path(self) -> Path:
        return self.cache_dir / "cloudfs.log"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "AWS_ACCESS_KEY_ID": self.endpoint.access_key,
            "AWS_SECRET_ACCESS_KEY": self.endpoint.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "cloudfs",
            "mount",
            f"s3://{BUCKET}",
            str(self.mountpoint),
            "--endpoint-url",
            self.endpoint.url,
            "--path-style",
            "--cache-dir",
            str(self.cache_dir),
            *self.options,
        ]

    def mount(self) -> None:
        """Mount, then wait until the first listing of the bucket has ended: the mount answers
        before that, but the measurements assume every object is cataloged."""
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        try:
            result = subprocess.run(
                self.command(),
                env=self.env(),
                capture_output=True,
                text=True,
                timeout=self.mount_timeout,
            )
        except subprocess.TimeoutExpired as exc:
            # the daemon goes on starting in the background: stop it, or it would load the
            # endpoint during the measurements that follow
            self.pid = self._locked_pid()
            if self.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            force_unmount(self.mountpoint)
            raise BenchError(
                f"cloudfs mount did not answer within {self.mount_timeout:.0f}s\n{self.log_tail()}"
            ) from exc
        found = re.search(r"pid (\d+)", result.stderr)
        self.pid = int(found.group(1)) if found else None
        if result.returncode != 0 or not is_mount(self.mountpoint):
            raise BenchError(
                f"cloudfs mount failed ({result.returncode}): {result.stderr.strip()}\n"
                f"{self.log_tail()}"
            )
        self.answered_in = time.perf_counter() - started
        deadline = time.monotonic() + self.mount_timeout
        while self.status()["catalog"]["first_listing"] is not None:
            if time.monotonic() > deadline:
                raise BenchError(
                    f"cloudfs did not list the bucket within {self.mount_timeout:.0f}s\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.2)

    def _locked_pid(self) -> int | None:
        """The daemon's pid, which it writes into the cache directory's lock file."""
        with contextlib.suppress(OSError, ValueError):
            return int((self.cache_dir / "lock").read_text().strip())
        return None

    def status(self) -> dict[str, Any]:
        result = subprocess.run(
            [sys.executable, "-m", "cloudfs", "status", "--json", str(self.mountpoint)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise BenchError(f"cloudfs status failed: {result.stderr.strip()}")
        return dict(json.loads(result.stdout))

    def unmount(self) -> None:
        """Unmount cleanly; force it (and stop the daemon) if the clean way fails."""
        if not is_mount(self.mountpoint):
            return
        failure = ""
        try:
            result = subprocess.run(
                [sys.executable, "-m", "cloudfs", "unmount", str(self.mountpoint)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if result.returncode == 0 and not is_mount(self.mountpoint):
                return
            failure = result.stderr.strip()
        except subprocess.TimeoutExpired:
            failure = "cloudfs unmount did not finish within 60s"
        force_unmount(self.mountpoint)
        pid = self.pid or self._locked_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        raise BenchError(f"cloudfs unmount failed: {failure}; forced\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
            return f"--- last lines of {self.log_path} ---\n" + "\n".join(text)
        return f"(no log at {self.log_path})"

    def log_size(self) -> int:
        """Where the log ends now: a remount of the cache directory appends to it."""
        with contextlib.suppress(OSError):
            return self.log_path.stat().st_size
        return 0

    def log_problems(self, since: int = 0) -> list[str]:
        """Warning and error lines of this cache directory's log, from offset ``since`` on."""
        with contextlib.suppress(OSError), open(self.log_path, "rb") as log:
            log.seek(since)
            lines = log.read().decode(errors="replace").splitlines()
            return [line for line in lines if " WARNING " in line or " ERROR " in line]
        return []


class MemfsMount:
    """The no-op filesystem in its own process, serving ``name`` of ``size`` bytes."""

    def __init__(self, mountpoint: Path, size: int, log_path: Path, name: str) -> None:
        self.mountpoint = mountpoint
        self.size = size
        self.log_path = log_path
        self.name = name
        self.process: Process | None = None

    @property
    def file(self) -> Path:
        return self.mountpoint / self.name

    def mount(self) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "bench.memfs", str(self.mountpoint)]
        command += ["--size", str(self.size), "--name", self.name]
        self.process = Process("memfs", command, self.log_path)
        process = self.process

        def mounted() -> bool:
            if not process.alive():
                raise BenchError(f"memfs exited at start:\n{process.log_tail()}")
            return is_mount(self.mountpoint)

        wait_for(mounted, 120, f"memfs at {self.mountpoint}")

    def unmount(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None
        if is_mount(self.mountpoint):
            force_unmount(self.mountpoint)
