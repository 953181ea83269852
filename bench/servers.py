"""The S3 endpoint under test, started for the run: s3rver, or moto_server as a fallback.

s3rver (npm) keeps objects as files and answers a ranged GET by streaming that range from disk, as
a real object store does.  moto_server loads the whole object into memory for every GET, so a
ranged read of a 1 GiB object costs a gigabyte of copying and its figures say nothing about
cloudfs; it is used only when s3rver cannot be installed or started, and the report says so.

``check_conformance`` records whether the endpoint honours Range and If-Match on GET: cloudfs
sends ``If-Match: <ETag>`` with every ranged GET so that a changed object fails instead of mixing
versions; on a server that ignores the header, cloudfs falls back on comparing the ETag of each
reply.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from .system import BenchError, free_port, port_open, wait_for

S3RVER_VERSION = "3.7.1"
S3RVER_CREDENTIALS = ("S3RVER", "S3RVER")
"""s3rver accepts only its built-in key pair; other servers accept any."""
BUCKET = "bench-bucket"
REPO = Path(__file__).resolve().parent.parent


def tools_dir() -> Path:
    """Where npm packages for the benchmark are installed once (not in the source tree)."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "cloudfs-bench"


@dataclass
class Endpoint:
    kind: str
    url: str
    """What the clients under test use (the WAN proxy in front of the server when there is one)."""
    direct_url: str
    """The server itself, for setup (uploading the object)."""
    access_key: str
    secret_key: str
    data_dir: Path
    notes: list[str] = field(default_factory=list)

    def client(self, *, direct: bool = False, pool: int = 16) -> Any:
        config = botocore.config.Config(
            s3={"addressing_style": "path"},
            max_pool_connections=pool,
            retries={"mode": "standard", "max_attempts": 3},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            connect_timeout=5,
            read_timeout=60,
        )
        return boto3.client(
            "s3",
            endpoint_url=self.direct_url if direct else self.url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=config,
        )

    def object_file(self, key: str) -> Path | None:
        """The server's own file holding ``key``'s bytes, when it keeps one (s3rver)."""
        path = self.data_dir / BUCKET / f"{key}._S3rver_object"
        return path if path.exists() else None


class Process:
    """A child process in its own session, so a Ctrl-C reaches the benchmark first and the
    benchmark stops its children in order (unmount, then servers)."""

    def __init__(self, name: str, command: list[str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=REPO,
        )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()


def install_s3rver() -> Path:
    """The s3rver script, installed with npm on first use."""
    prefix = tools_dir() / "s3rver"
    script = prefix / "node_modules" / "s3rver" / "bin" / "s3rver.js"
    if script.exists():
        return script
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise BenchError("node and npm are needed for s3rver (apt-get install nodejs npm)")
    prefix.mkdir(parents=True, exist_ok=True)
    print(f"bench: installing s3rver@{S3RVER_VERSION} into {prefix}", file=sys.stderr)
    result = subprocess.run(
        [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--loglevel=error"]
        + [f"s3rver@{S3RVER_VERSION}"],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0 or not script.exists():
        raise BenchError(f"npm install s3rver failed: {result.stderr.strip()[-2000:]}")
    return script


def node_options() -> list[str]:
    """``--openssl-legacy-provider`` where node knows it (17 and later).

    s3rver 3.7.1 encrypts the continuation token of a truncated ListObjectsV2 with DES, which
    OpenSSL 3 (node 17 and later) only offers through its legacy provider: without it, every
    listing with more keys than ``MaxKeys`` fails with InternalError, and cloudfs's startup check
    (``MaxKeys=1``) fails on any bucket holding two objects or more."""
    flag = "--openssl-legacy-provider"
    probe = subprocess.run(["node", flag, "-e", ""], capture_output=True)
    return [flag] if probe.returncode == 0 else []


def start_s3rver(workdir: Path) -> tuple[Process, Endpoint]:
    script = install_s3rver()
    data_dir = workdir / "s3rver"
    data_dir.mkdir()
    port = free_port()
    command = ["node", *node_options(), str(script), "-d", str(data_dir)]
    command += ["-a", "127.0.0.1", "-p", str(port)]
    process = Process(
        "s3rver", [*command, "--silent", "--no-vhost-buckets"], workdir / "s3rver.log"
    )
    _wait_listening(process, port)
    url = f"http://127.0.0.1:{port}"
    key, secret = S3RVER_CREDENTIALS
    return process, Endpoint(f"s3rver {S3RVER_VERSION}", url, url, key, secret, data_dir)


def start_moto(workdir: Path) -> tuple[Process, Endpoint]:
    port = free_port()
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    process = Process("moto_server", command, workdir / "moto.log")
    _wait_listening(process, port)
    url = f"http://127.0.0.1:{port}"
    endpoint = Endpoint("moto_server", url, url, "bench", "bench", workdir)
    endpoint.notes.append(
        "MOTO_SERVER FALLBACK: moto reads the whole object into memory on every GET, so every "
        "figure that involves the endpoint is far below what cloudfs can do on a real server."
    )
    return process, endpoint


def _wait_listening(process: Process, port: int) -> None:
    def ready() -> bool:
        if not process.alive():
            raise BenchError(f"{process.name} exited at start:\n{process.log_tail()}")
        return port_open(port)

    try:
        wait_for(ready, 30, f"{process.name} on port {port}")
    except BenchError:
        process.stop()
        raise


def create_bucket(client: Any) -> None:
    """The benchmark bucket, whether or not an earlier step created it."""
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=BUCKET)


def upload(endpoint: Endpoint, key: str, path: Path, size: int) -> str:
    """Create the bucket and upload ``path`` as ``key`` with one PUT; returns the ETag."""
    client = endpoint.client(direct=True)
    create_bucket(client)
    with open(path, "rb") as body:
        client.put_object(Bucket=BUCKET, Key=key, Body=body, ContentLength=size)
    head = client.head_object(Bucket=BUCKET, Key=key)
    if head["ContentLength"] != size:
        raise BenchError(f"uploaded {key}: the server reports {head['ContentLength']} bytes")
    return str(head["ETag"])


def check_conformance(endpoint: Endpoint, key: str, etag: str, expected: bytes) -> dict[str, str]:
    """How the server answers a ranged GET, with the right If-Match and with a wrong one."""
    client = endpoint.client(direct=True)
    start, end = len(expected) // 3, len(expected) // 3 + 65535
    facts: dict[str, str] = {}
    answer = client.get_object(Bucket=BUCKET, Key=key, Range=f"bytes={start}-{end}", IfMatch=etag)
    body = answer["Body"].read()
    status = answer["ResponseMetadata"]["HTTPStatusCode"]
    if status == 206 and body == expected[start : end + 1]:
        facts["range"] = "honoured (206, the right bytes)"
    else:
        facts["range"] = f"NOT honoured: status {status}, {len(body)} bytes"
    try:
        answer = client.get_object(
            Bucket=BUCKET, Key=key, Range=f"bytes={start}-{end}", IfMatch='"0123456789abcdef"'
        )
        status = answer["ResponseMetadata"]["HTTPStatusCode"]
        length = len(answer["Body"].read())
        facts["if_match"] = (
            f"IGNORED: a GET with a wrong If-Match got {status} and {length} bytes instead of "
            f"412; cloudfs then relies on the ETag of each reply to detect a changed object"
        )
    except botocore.exceptions.ClientError as exc:
        status = exc.response["ResponseMetadata"]["HTTPStatusCode"]
        code = exc.response.get("Error", {}).get("Code", "?")
        facts["if_match"] = (
            "honoured (412 on a wrong ETag)" if status == 412 else f"answered {status} {code}"
        )
    return facts
