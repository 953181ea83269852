"""Fixtures of the integration tier: a real moto_server process and real FUSE mounts of cloudfs.

Nothing here stubs boto3 or the kernel.  The S3 server is a ``moto_server`` process on a free
loopback port, reached over HTTP; every mount is ``python -m cloudfs mount`` through /dev/fuse.
A missing /dev/fuse, fusermount3 or moto_server fails the run instead of skipping it.

A test that hangs in the kernel (a read the daemon never answers) cannot be interrupted by a
signal, so a watchdog aborts the FUSE connections of the test's mounts shortly before the test's
timeout: the stuck system call then fails with ENOTCONN and the teardown runs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest

PYTHON = sys.executable
REGION = "us-east-1"
ACCESS_KEY = "testing"
SECRET_KEY = "testing"
MOUNT_TIMEOUT = 60.0
"""Seconds a mount may take to answer before the test fails."""
LISTING_ENDED = "catalog ready:"
"""What the daemon logs once its first listing of a bucket has ended."""
CLI_TIMEOUT = 120.0


def _moto_server_command() -> str | None:
    beside_python = Path(PYTHON).parent / "moto_server"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("moto_server")


# -- helpers used by the tests -------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on (right now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def payload(size: int, seed: int | str) -> bytes:
    """Deterministic pseudo-random bytes: every object of a test has distinct content."""
    return random.Random(str(seed)).randbytes(size)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_bytes(got: bytes, expected: bytes, what: object = "") -> None:
    """``got == expected``, or an AssertionError that says where they part (no megabyte reprs)."""
    if got == expected:
        return
    common = min(len(got), len(expected))
    low, high = 0, common  # the first difference lies in got[low:high] (binary search)
    while high - low > 1:
        middle = (low + high) // 2
        if got[low:middle] != expected[low:middle]:
            high = middle
        else:
            low = middle
    first = low if common and got[low:high] != expected[low:high] else common
    raise AssertionError(
        f"{what}: read {len(got)} bytes, expected {len(expected)}; first difference at byte {first}"
    )


def cloudfs(*args: object, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run the ``cloudfs`` command line (``python -m cloudfs``) and capture its output."""
    return subprocess.run(
        [PYTHON, "-m", "cloudfs", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        cwd="/",
    )


def mount_entry(path: Path) -> tuple[str, str] | None:
    """(device "major:minor", filesystem type) of the mount at ``path``, read from
    /proc/self/mountinfo without touching the filesystem itself (a hung FUSE daemon would block a
    stat)."""
    target = os.path.realpath(path)
    found = None
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            separator = fields.index("-")
            mounted_at = fields[4].encode().decode("unicode_escape")
            if mounted_at == target:
                found = (fields[2], fields[separator + 1])
    return found


def is_mounted(path: Path) -> bool:
    return mount_entry(path) is not None


def mounts_at(path: Path) -> int:
    """How many mounts are stacked at ``path``."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as mountinfo:
        return sum(
            1 for line in mountinfo if line.split()[4].encode().decode("unicode_escape") == target
        )


def drop_kernel_caches() -> None:
    """Empty the kernel page cache, so the next read of a mounted file reaches the daemon."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as control:
        control.write("3\n")


def read_file(path: Path, chunk: int = 1 << 20) -> bytes:
    """The whole file, read with ``chunk``-sized read(2) calls."""
    parts = []
    with open(path, "rb", buffering=0) as handle:
        while data := handle.read(chunk):
            parts.append(data)
    return b"".join(parts)


def read_direct(path: Path, offset: int = 0, length: int | None = None) -> bytes:
    """Bytes read with O_DIRECT: the kernel page cache is bypassed, the daemon answers."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        if length is None:
            length = os.fstat(fd).st_size - offset
        parts = []
        while length > 0:
            data = os.pread(fd, min(length, 1 << 20), offset)
            if not data:
                break
            parts.append(data)
            offset += len(data)
            length -= len(data)
        return b"".join(parts)
    finally:
        os.close(fd)


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def processes_mentioning(argument: str) -> list[int]:
    """Live processes with ``argument`` (a test's unique tmp path) as one of their arguments."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                arguments = cmdline.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if argument in arguments and process_alive(int(entry)):
            found.append(int(entry))
    return found


def cache_lock_held(cache_dir: Path) -> bool:
    """True while a daemon holds ``cache_dir`` (its flock on CACHE_DIR/lock)."""
    lock = cache_dir / "lock"
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def wait_until(condition: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())


# -- the S3 server -------------------------------------------------------------------------------


class MotoServer:
    """One ``moto_server`` process on 127.0.0.1; stop() and start() keep the port.

    moto keeps its state in memory: a restarted server has no buckets."""

    def __init__(self, port: int, log_path: Path) -> None:
        self.port = port
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = _moto_server_command()
        if command is None:
            pytest.fail("moto_server is not installed (pip install 'moto[server]')")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [command, "-H", "127.0.0.1", "-p", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"moto_server exited at start:\n{self.log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).close()
                return
            except urllib.error.HTTPError:
                return  # it answers
            except OSError:
                time.sleep(0.1)
        self.stop()
        pytest.fail(f"moto_server did not answer within 30 s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        """Stop the server (its state is lost); a stopped port refuses connections."""
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def pause(self) -> None:
        """Freeze the server: connections are accepted by the kernel but never answered."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def client(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> Any:
        session = boto3.session.Session(
            aws_access_key_id=access_key, aws_secret_access_key=secret_key, region_name=REGION
        )
        return session.client("s3", endpoint_url=self.endpoint)

    def require_authentication(self, enabled: bool) -> None:
        """Make moto check credentials (it accepts any by default): with no IAM users defined,
        every access key is then unknown (InvalidAccessKeyId)."""
        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth",
            data=b"0" if enabled else b"inf",
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert json.loads(reply.read())["status"] == "ok"


@dataclass
class Bucket:
    """A bucket on a moto server, with the objects the test put into it."""

    server: MotoServer
    name: str
    objects: dict[str, bytes] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return f"s3://{self.name}"

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def put(self, key: str, data: bytes, storage_class: str | None = None) -> None:
        extra = {"StorageClass": storage_class} if storage_class else {}
        self.server.client().put_object(Bucket=self.name, Key=key, Body=data, **extra)
        self.objects[key] = data

    def put_many(self, objects: dict[str, bytes]) -> None:
        """Put many objects, eight at a time: moto answers each small PUT after some 40 ms."""
        client = self.server.client()

        def put(key: str) -> None:
            client.put_object(Bucket=self.name, Key=key, Body=objects[key])

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(put, objects))
        self.objects.update(objects)

    def listed_keys(self) -> list[str]:
        client = self.server.client()
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.name)
        return [item["Key"] for page in pages for item in page.get("Contents", ())]


def new_bucket(server: MotoServer) -> Bucket:
    name = f"cloudfs-test-{uuid.uuid4().hex[:12]}"
    server.client().create_bucket(Bucket=name)
    return Bucket(server, name)


# -- mounts --------------------------------------------------------------------------------------


@dataclass
class Mount:
    """One cloudfs mount started by a test."""

    path: Path
    cache_dir: Path
    pid: int
    process: subprocess.Popen[bytes] | None = None
    """The --foreground process; None for a background (daemonised) mount."""
    stderr_path: Path | None = None

    def status(self) -> dict[str, Any]:
        """``cloudfs status --json``."""
        result = cloudfs("status", self.path, "--json", timeout=60)
        assert result.returncode == 0, f"status failed: {result.stderr}\n{self.log_tail()}"
        facts: dict[str, Any] = json.loads(result.stdout)
        return facts

    def wait_listed(self, ended_before: int) -> None:
        """Until the first listing of the bucket has ended (the mount answers before that),
        so that every object is in the catalog, as the tests expect of a mount: the daemon
        logs "catalog ready" once it has; ``ended_before`` such lines were in the log before.
        (The log, not ``status``: a status command costs a Python start, and most mounts
        here are first mounts.)"""
        assert wait_until(
            lambda: self.log_text().count(LISTING_ENDED) > ended_before,
            MOUNT_TIMEOUT,
            interval=0.01,
        ), f"the first listing did not end in {MOUNT_TIMEOUT:.0f} s\n{self.log_tail()}"

    def refresh(self) -> None:
        """``cloudfs refresh``: relist the bucket now."""
        result = cloudfs("refresh", self.path, timeout=60)
        assert result.returncode == 0, f"refresh failed: {result.stderr}\n{self.log_tail()}"

    def unmount(self) -> None:
        """``cloudfs unmount``, which also waits for the daemon to exit."""
        result = cloudfs("unmount", self.path, timeout=60)
        assert result.returncode == 0, f"unmount failed: {result.stderr}\n{self.log_tail()}"
        assert not is_mounted(self.path)

    def log_text(self) -> str:
        parts = []
        for path in (self.cache_dir / "cloudfs.log", self.stderr_path):
            if path is not None and path.exists():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def log_tail(self, lines: int = 40) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return "daemon log (tail):\n" + "\n".join(tail)


class Mounter:
    """Mounts cloudfs for one test and guarantees that nothing of it outlives the test."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.count = 0
        self.mountpoints: list[Path] = []
        self.cache_dirs: list[Path] = []
        self.mounts: list[Mount] = []
        self.watchdog_fired = False

    def new_dir(self, name: str) -> Path:
        self.count += 1
        path = self.tmp_path / f"{name}{self.count}"
        path.mkdir()
        return path

    def command(
        self,
        bucket: Bucket,
        mountpoint: Path,
        cache_dir: Path,
        options: Sequence[str],
        endpoint: str | None,
        cache_size: str,
    ) -> list[str]:
        self.mountpoints.append(mountpoint)
        self.cache_dirs.append(cache_dir)
        return [
            "mount",
            bucket.source,
            str(mountpoint),
            "--endpoint-url",
            endpoint or bucket.endpoint,
            "--cache-dir",
            str(cache_dir),
            "--cache-size",
            cache_size,
            *options,
        ]

    def attempt(
        self,
        bucket: Bucket,
        mountpoint: Path | None = None,
        cache_dir: Path | None = None,
        options: Sequence[str] = (),
        endpoint: str | None = None,
        cache_size: str = "1G",
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cloudfs mount`` (background mode) and return its result, success or not."""
        _, _, args = self._prepare(bucket, mountpoint, cache_dir, options, endpoint, cache_size)
        return cloudfs(*args, timeout=MOUNT_TIMEOUT)

    def _prepare(
        self,
        bucket: Bucket,
        mountpoint: Path | None,
        cache_dir: Path | None,
        options: Sequence[str],
        endpoint: str | None,
        cache_size: str,
    ) -> tuple[Path, Path, list[str]]:
        """The mountpoint, the cache directory (new ones unless given) and the mount command."""
        mountpoint = mountpoint or self.new_dir("mnt")
        cache_dir = cache_dir or self.tmp_path / f"cache{self.count}"
        args = self.command(bucket, mountpoint, cache_dir, options, endpoint, cache_size)
        return mountpoint, cache_dir, args

    def __call__(
        self,
        bucket: Bucket,
        mountpoint: Path | None = None,
        cache_dir: Path | None = None,
        options: Sequence[str] = (),
        endpoint: str | None = None,
        foreground: bool = False,
        cache_size: str = "1G",
    ) -> Mount:
        """Mount ``bucket`` and return once the mount answers (the test fails otherwise)."""
        mountpoint, cache_dir, args = self._prepare(
            bucket, mountpoint, cache_dir, options, endpoint, cache_size
        )
        ended_before = Mount(mountpoint, cache_dir, pid=0).log_text().count(LISTING_ENDED)
        if foreground:
            return self._foreground(args, mountpoint, cache_dir, ended_before)
        try:
            result = cloudfs(*args, timeout=MOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"cloudfs mount did not return in {MOUNT_TIMEOUT:.0f} s")
        assert result.returncode == 0, (
            f"cloudfs mount failed ({result.returncode}): {result.stderr}"
        )
        assert is_mounted(mountpoint), f"{mountpoint} is not mounted: {result.stderr}"
        mount = Mount(mountpoint, cache_dir, pid=0)
        facts = mount.status()
        mount.pid = int(facts["pid"])
        self.mounts.append(mount)
        if facts["catalog"]["first_listing"] is not None:
            mount.wait_listed(ended_before)
        return mount

    def _foreground(
        self, args: list[str], mountpoint: Path, cache_dir: Path, ended_before: int
    ) -> Mount:
        stderr_path = self.tmp_path / f"foreground{self.count}.stderr"
        with open(stderr_path, "wb") as stderr:
            process = subprocess.Popen(
                [PYTHON, "-m", "cloudfs", *args, "--foreground"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                cwd="/",
            )
        mount = Mount(mountpoint, cache_dir, process.pid, process, stderr_path)
        self.mounts.append(mount)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not is_mounted(mountpoint):
            if process.poll() is not None:
                pytest.fail(
                    f"cloudfs --foreground exited with {process.returncode} before mounting:\n"
                    f"{stderr_path.read_text(errors='replace')[-3000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"cloudfs --foreground did not mount in {MOUNT_TIMEOUT:.0f} s")
            time.sleep(0.05)
        # Mounted is not yet answering: the root must stat (in a child, which a hung daemon
        # cannot block).
        probe = subprocess.run(["stat", str(mountpoint)], capture_output=True, timeout=30)
        assert probe.returncode == 0, f"the new mount does not answer: {probe.stderr!r}"
        if mount.status()["catalog"]["first_listing"] is not None:
            mount.wait_listed(ended_before)
        return mount

    def abort_connections(self) -> None:
        """Abort the FUSE connection of every mount of this test: hung calls get ENOTCONN."""
        for mountpoint in self.mountpoints:
            entry = mount_entry(mountpoint)
            if entry is None or not entry[1].startswith("fuse"):
                continue
            minor = entry[0].split(":")[1]
            with contextlib.suppress(OSError):
                Path(f"/sys/fs/fuse/connections/{minor}/abort").write_text("1")

    def _daemon_pids(self) -> set[int]:
        pids = {mount.pid for mount in self.mounts if mount.pid}
        for cache_dir in self.cache_dirs:
            with contextlib.suppress(OSError, ValueError):
                pids.add(int((cache_dir / "lock").read_text().strip()))
        for mountpoint in self.mountpoints:
            pids.update(processes_mentioning(str(mountpoint)))
        # Only processes of this test: their command line names one of its directories.
        return {pid for pid in pids if pid != os.getpid() and self._ours(pid)}

    def _ours(self, pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                arguments = cmdline.read().decode(errors="replace")
        except OSError:
            return False
        return str(self.tmp_path) in arguments

    def cleanup(self) -> None:
        """Lazy-unmount everything, then terminate and finally kill the daemons."""
        for mountpoint in self.mountpoints:
            if is_mounted(mountpoint):
                subprocess.run(
                    ["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, timeout=30
                )
        pids = self._daemon_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for mount in self.mounts:
            if mount.process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    mount.process.wait(10)
        if not wait_until(lambda: not any(process_alive(pid) for pid in pids), 10):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for mount in self.mounts:
            if mount.process is not None and mount.process.poll() is None:
                mount.process.kill()
                mount.process.wait(10)


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def integration_environment() -> Iterator[None]:
    """Fail (never skip) without FUSE or moto_server; give every process test credentials and
    nothing of the host's AWS configuration."""
    missing = []
    if not os.path.exists("/dev/fuse"):
        missing.append("/dev/fuse (load the fuse module)")
    if shutil.which("fusermount3") is None:
        missing.append("fusermount3 (apt-get install fuse3)")
    if _moto_server_command() is None:
        missing.append("moto_server (pip install 'moto[server]')")
    if missing:
        pytest.fail("integration tests need: " + ", ".join(missing), pytrace=False)
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("AWS_"):
                patch.delenv(name)
        patch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        patch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        patch.setenv("AWS_DEFAULT_REGION", REGION)
        patch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield


@pytest.fixture(scope="session")
def s3_server(
    integration_environment: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MotoServer]:
    """One moto_server for the whole session; tests that stop a server use ``private_s3_server``."""
    server = MotoServer(free_port(), tmp_path_factory.mktemp("moto") / "moto_server.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def private_s3_server(integration_environment: None, tmp_path: Path) -> Iterator[MotoServer]:
    """A moto_server of this test alone, free to be stopped, frozen or restarted."""
    server = MotoServer(free_port(), tmp_path / "moto_server.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def bucket(s3_server: MotoServer) -> Iterator[Bucket]:
    """A new empty bucket on the session's server, deleted with its objects afterwards."""
    made = new_bucket(s3_server)
    yield made
    with contextlib.suppress(Exception):
        client = s3_server.client()
        for key in made.listed_keys():
            client.delete_object(Bucket=made.name, Key=key)
        client.delete_bucket(Bucket=made.name)


_MOUNTER = pytest.StashKey["Mounter"]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test's report carries the end of each of its daemons' logs: the daemon's own
    account is what explains a failure seen only once, on a CI machine."""
    outcome = yield
    report = outcome.get_result()
    mounter = item.stash.get(_MOUNTER, None)
    if report.failed and mounter is not None:
        for number, mount in enumerate(mounter.mounts, 1):
            report.sections.append((f"daemon log {number}", mount.log_tail(60)))


class Gate:
    """A TCP relay in front of the S3 server that a test can close and reopen: while closed,
    connections are refused at once, as when a site's uplink is down.  ``cut_replies`` makes
    it drop connections in the middle of their replies."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self.cuts = 0
        """Connections still to be cut (moto answers one request per connection)."""
        self._cut_after = 0
        self.open()

    def cut_replies(self, count: int, after: int) -> None:
        """Close each of the next ``count`` connections once ``after`` bytes of its reply
        have been relayed, as a link that drops in the middle of a body."""
        with self._lock:
            self.cuts, self._cut_after = count, after

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):  # wakes the thread blocked in accept()
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
                connection.close()
            self._connections.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._connections += [client, upstream]
                limit = self._cut_after if self.cuts else None
                self.cuts -= limit is not None
            for source, target, most in ((client, upstream, None), (upstream, client, limit)):
                threading.Thread(
                    target=self._pipe, args=(source, target, most), daemon=True
                ).start()

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket, most: int | None) -> None:
        """Relay until either side closes, or ``most`` bytes have gone through."""
        relayed = 0
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                if most is not None and relayed + len(data) >= most:
                    target.sendall(data[: most - relayed])
                    break
                target.sendall(data)
                relayed += len(data)
        for end in (source, target):  # shut down first: a close alone waits for the other pipe
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                end.close()


@pytest.fixture
def gate(s3_server: MotoServer) -> Iterator[Gate]:
    relay = Gate(s3_server.port)
    yield relay
    relay.close()


@pytest.fixture
def mount(
    integration_environment: None, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Mounter]:
    """The mount factory: ``mount(bucket, ...)`` mounts and returns a ``Mount``; ``mount.attempt``
    runs a mount that may fail.  Everything is unmounted and every daemon ended afterwards."""
    mounter = Mounter(tmp_path)
    request.node.stash[_MOUNTER] = mounter
    marker = request.node.get_closest_marker("timeout")
    limit = float(marker.args[0]) if marker and marker.args else 300.0

    def fire() -> None:
        mounter.watchdog_fired = True
        mounter.abort_connections()

    watchdog = threading.Timer(max(limit - 15.0, limit * 0.8), fire)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield mounter
    finally:
        watchdog.cancel()
        logs = [mount.log_tail() for mount in mounter.mounts]
        mounter.cleanup()
    if mounter.watchdog_fired:
        pytest.fail(
            "the test hung in a FUSE call; its connections were aborted\n" + "\n".join(logs)
        )


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB file system of its own (tmpfs): a disk that really fills up, under everything
    cloudfs keeps on it (blocks, staging, catalog, journal, audit log)."""
    path = tmp_path / "small-disk"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` up to ``leave`` free bytes with one file; returns it."""
    filler = disk / "filler"
    space = os.statvfs(disk)
    wanted = max(space.f_bavail * space.f_frsize - leave, 0)
    chunk = bytes(1 << 20)
    with open(filler, "wb") as out:
        for _ in range(wanted // len(chunk)):
            out.write(chunk)
        out.write(bytes(wanted % len(chunk)))
    return filler
