"""The write benchmark, ``python -m bench write``: what a writer waits for through cloudfs, and how
soon the bucket has the bytes, beside the local disk and the endpoint's raw upload speed.

Per repetition three systems run in an order rotated by one each time (as in the read benchmark):

* the local disk: ``dd bs=1M conv=fsync`` of the large file into the scratch directory, which is
  on the disk holding cloudfs's cache and staging area, and the PACS ingest loop into a directory
  there, from 1 and from 4 threads;
* the endpoint with raw boto3: ``upload_file`` of the large file with cloudfs's part size and part
  concurrency, and one ``put_object`` per ingest file from 4 and from 8 threads;
* cloudfs, one mount with a fresh cache directory per measurement: the same ``dd`` and the same
  ingest loop through the mount, then the wait until the mount reports nothing left to upload,
  then a check of the bucket (sizes, listing, bytes) outside the timed part.

cloudfs is mounted with ``--upload-delay 0``: the delay (1 s by default) lets a writer rename its
temp file into place before the upload starts, so the upload goes to the final key once; a PACS
writes final names, and the benchmark measures the upload pipeline, not a wait chosen for another
kind of writer.  ``--drain-timeout 5`` only shortens the unmount after a measurement whose uploads
kept failing (every measurement waits for its own uploads before unmounting).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import botocore.exceptions

from cloudfs.config import format_size, parse_size

from . import write_measure as wm
from . import write_report
from .data import generate, write_file
from .mounts import CloudfsMount
from .report import medians, write_json
from .run import Bench, conclude, execute
from .servers import BUCKET, REPO, Endpoint, Process
from .system import BenchError, free_port, is_root, machine, port_open, timed_dd, wait_for

QUICK_SIZE = 64 * 2**20
QUICK_FILES = 100
INGEST_THREADS = (1, 4)
PUT_THREADS = (4, 8)
MOUNT_OPTIONS = ("--upload-delay", "0", "--drain-timeout", "5")
CONFORMANCE_PART = 5 * 2**20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench write",
        description="cloudfs write-path benchmark: a large file written with dd and a PACS-like "
        "ingest of many small files, through cloudfs, to the local disk and with raw boto3, in "
        "one run (see bench/README.md).",
    )
    parser.add_argument("--size", default="1G", help="large file size (default: 1G)")
    parser.add_argument("--files", type=int, default=1000, help="ingest files (default: 1000)")
    parser.add_argument("--file-size", default="512K", help="ingest file size (default: 512K)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (default: 3)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="harness check for CI: 64 MiB, 100 files, one repetition, no docs page; fails if "
        "any figure is missing, never on speed",
    )
    parser.add_argument(
        "--spot-checks", type=int, default=5, help="ingest objects read back (default: 5)"
    )
    parser.add_argument("--server", choices=("s3rver", "moto"), default="s3rver")
    parser.add_argument(
        "--wan", action="store_true", help="put a proxy with latency and a bandwidth cap in front"
    )
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="WAN round trip (default: 20)")
    parser.add_argument(
        "--bandwidth",
        default="50M",
        help="WAN cap per connection and direction, bytes/s (default: 50M)",
    )
    parser.add_argument(
        "--prefault",
        default=None,
        help="memory to touch once before measuring (default: 8G, capped at half the available "
        "memory; 0 with --quick)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="scratch directory on the disk to measure; cloudfs's cache goes there too "
        "(default: /var/tmp)",
    )
    parser.add_argument(
        "--no-docs", action="store_true", help="do not rewrite docs/benchmarks-write.md"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.files, args.repeat, args.no_docs = str(QUICK_SIZE), QUICK_FILES, 1, True
        args.prefault = args.prefault or "0"
    args.size_bytes = parse_size(args.size)
    args.file_size_bytes = parse_size(args.file_size)
    if args.size_bytes < 16 * 2**20:
        parser.error("--size must be at least 16M")
    if args.files < 1 or args.file_size_bytes < 1:
        parser.error("--files and --file-size must be positive")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


class WriteBench(Bench):
    """The read benchmark's bookkeeping (steps that fail without stopping the run, mounts undone
    on the way out, child processes, memory pre-touch) with the write measurements."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.metrics = write_report.metrics(INGEST_THREADS, PUT_THREADS)
        self.ratio_rows = write_report.ratio_rows(INGEST_THREADS, PUT_THREADS)
        self.goals = write_report.targets(INGEST_THREADS)
        self.samples = {metric.key: [] for metric in self.metrics}
        self.details = {"cloudfs": [], "local": []}
        self.key = f"big-{format_size(self.size).replace(' ', '').replace('.0', '')}.bin"
        self.files: int = args.files
        self.file_size: int = args.file_size_bytes
        self.payload = bytearray()
        self.direct: Any = None
        self.revision = ""
        self.sources = ""
        self.log_kinds: dict[str, list[str]] = {}

    # -- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        self.revision = revision()
        self.sources = sources_digest()
        self.say(f"scratch directory {self.workdir}; cloudfs at {self.revision}")
        self.prefault()
        self.expected = generate(self.size)
        self.source = self.workdir / "source.bin"
        write_file(self.source, self.expected)
        self.payload = generate(self.files * self.file_size, seed=2)
        self.endpoint = self.start_server()
        if self.endpoint.kind == "moto_server":
            # The read benchmark's warning is about GETs; what matters here is the PUT side.
            self.notes = [note for note in self.notes if "MOTO_SERVER" not in note]
            self.notes.append(
                "**moto_server, not s3rver**: a Python server holding objects in memory; every "
                "figure that involves the endpoint is bounded by its speed, not an object store's."
            )
        self.direct = self.endpoint.client(direct=True, pool=16)
        try:
            self.direct.create_bucket(Bucket=BUCKET)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                raise
        facts = self.check_write_conformance()
        self.details["endpoint_conformance"] = facts
        self.notes.append(f"Endpoint: ETag of a multipart upload {facts['multipart_etag']}.")
        self.notes.append(f"Endpoint: If-None-Match: * on PUT {facts['if_none_match']}.")
        if self.args.wan:
            self.start_wan_proxy(self.endpoint)
        self.client = self.endpoint.client(pool=max(PUT_THREADS) * 2)

    def check_write_conformance(self) -> dict[str, str]:
        """How the server answers the two things cloudfs's uploads rely on: the ETag of a
        multipart upload (cloudfs compares it with the MD5 of its parts' MD5s, as S3 computes it)
        and a conditional PUT that must not overwrite (``If-None-Match: *``)."""
        key = "bench-conformance.bin"
        data = bytes(self.expected[: 2 * CONFORMANCE_PART])
        parts = [data[:CONFORMANCE_PART], data[CONFORMANCE_PART:]]
        upload = self.direct.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
        done = []
        for number, part in enumerate(parts, 1):
            reply = self.direct.upload_part(
                Bucket=BUCKET, Key=key, UploadId=upload, PartNumber=number, Body=part
            )
            done.append({"ETag": reply["ETag"], "PartNumber": number})
        etag = self.direct.complete_multipart_upload(
            Bucket=BUCKET, Key=key, UploadId=upload, MultipartUpload={"Parts": done}
        )["ETag"]
        digests = b"".join(hashlib.md5(part).digest() for part in parts)
        s3_style = f'"{hashlib.md5(digests).hexdigest()}-{len(parts)}"'
        whole = f'"{hashlib.md5(data).hexdigest()}"'
        facts: dict[str, str] = {}
        if etag == s3_style:
            facts["multipart_etag"] = "as S3 computes it (MD5 of the parts' MD5s, -N)"
        elif etag == whole:
            facts["multipart_etag"] = (
                f"NOT as S3 computes it: {etag} is the MD5 of the whole object, where S3 answers "
                f"{s3_style} (MD5 of the parts' MD5s, -N); cloudfs accepts either form when it "
                f"checks a multipart upload (files above the 16 MiB part size)"
            )
        else:
            facts["multipart_etag"] = f"unexpected: {etag} (S3 would answer {s3_style})"
        try:
            reply = self.direct.put_object(Bucket=BUCKET, Key=key, Body=b"x", IfNoneMatch="*")
            status = reply["ResponseMetadata"]["HTTPStatusCode"]
            facts["if_none_match"] = (
                f"IGNORED: a PUT onto an existing key got {status} instead of 412; cloudfs's "
                f"check that a new file never overwrites another writer's object cannot work here"
            )
        except botocore.exceptions.ClientError as exc:
            status = exc.response["ResponseMetadata"]["HTTPStatusCode"]
            facts["if_none_match"] = (
                "honoured (412 onto an existing key)" if status == 412 else f"answered {status}"
            )
        self.direct.delete_object(Bucket=BUCKET, Key=key)
        return facts

    def start_wan_proxy(self, endpoint: Endpoint) -> None:
        """The read benchmark's proxy, with request bodies paced too (``--upload-bandwidth``):
        here the bytes go towards the server."""
        port = free_port()
        target = endpoint.direct_url.rsplit(":", 1)[1]
        bandwidth = parse_size(self.args.bandwidth)
        command = [sys.executable, "-m", "bench.wanproxy", "--listen", str(port)]
        command += ["--target", target, "--rtt-ms", str(self.args.rtt_ms)]
        command += ["--bandwidth", str(bandwidth), "--upload-bandwidth", str(bandwidth)]
        process = Process("wanproxy", command, self.workdir / "wanproxy.log")
        self.processes.append(process)
        wait_for(lambda: port_open(port), 30, "the WAN proxy")
        endpoint.url = f"http://127.0.0.1:{port}"
        wan = (
            f"{self.args.rtt_ms:g} ms per request, {format_size(bandwidth)}/s per connection "
            f"each way"
        )
        self.details["wan"] = wan
        self.notes.append(f"WAN proxy in front of the endpoint: {wan}.")

    def ingest(self, prefix: str, seed: int) -> wm.Ingest:
        return wm.Ingest(prefix, self.files, self.file_size, self.payload, seed)

    def warm_source(self) -> None:
        """Read the source file once, so every dd copies it from the page cache."""
        timed_dd(self.source, self.size)

    def settle(self) -> None:
        """Write back what earlier steps left dirty, so it does not land in the next figure."""
        os.sync()

    # -- the systems -------------------------------------------------------------------------

    def run_local(self, rep: int) -> None:
        def big() -> None:
            target = self.workdir / "local-big.bin"
            self.warm_source()
            self.settle()
            seconds = timed_dd(self.source, self.size, target)
            target.unlink()
            self.record("local_dd", wm.mb_per_s(self.size, seconds))

        def ingest(threads: int) -> None:
            root = self.workdir / "local-ingest"
            plan = self.ingest(f"local-r{rep}-{threads}t", seed=100 * rep + threads)
            self.settle()
            try:
                seconds, phases = wm.timed_ingest(root, plan, threads)
            finally:
                shutil.rmtree(root, ignore_errors=True)
            self.details["local"].append(
                {"repetition": rep, "threads": threads, "mean_ms_per_step": phases}
            )
            self.record(f"local_ingest_{threads}", plan.count / seconds)

        self.attempt(f"rep {rep} local disk dd", big)
        for threads in INGEST_THREADS:
            self.attempt(f"rep {rep} local ingest, {threads} threads", partial(ingest, threads))

    def run_boto3(self, rep: int) -> None:
        def upload() -> None:
            key = f"raw-r{rep}-{self.key}"
            self.warm_source()
            self.settle()
            try:
                figure = wm.boto3_upload_file(self.client, self.source, key, self.size)
            finally:
                wm.delete_prefix(self.direct, key)
            self.record("boto3_upload", figure)

        def puts(threads: int) -> None:
            plan = self.ingest(f"raw-r{rep}-{threads}t", seed=200 + 100 * rep + threads)
            self.settle()
            try:
                figure = wm.boto3_put_objects(self.client, plan, threads)
                wm.check_ingest(self.direct, plan, spot_checks=0)
            finally:
                wm.delete_prefix(self.direct, plan.prefix + "/")
            self.record(f"boto3_put_{threads}", figure)

        self.attempt(f"rep {rep} boto3 upload_file", upload)
        for threads in PUT_THREADS:
            self.attempt(f"rep {rep} boto3 put_object, {threads} threads", partial(puts, threads))

    def write_mount(self, cache: Path, options: tuple[str, ...] = MOUNT_OPTIONS) -> CloudfsMount:
        assert self.endpoint is not None
        return CloudfsMount(self.endpoint, self.workdir / "mnt", cache, options)

    def through_cloudfs(
        self,
        rep: int,
        label: str,
        measure: Callable[[CloudfsMount, dict[str, Any]], None],
        threads: int | None = None,
        options: tuple[str, ...] = MOUNT_OPTIONS,
    ) -> None:
        """One cloudfs measurement on a fresh cache directory and an empty bucket; afterwards
        the cache directory goes, and what is in the bucket once the daemon has exited (an upload
        retried while it drained may land after the measurement's own cleanup)."""
        cache = self.workdir / f"cache-{rep}-{label}"
        mount = self.write_mount(cache, options)
        facts: dict[str, Any] = {"repetition": rep, "measurement": label, "threads": threads}
        self.details["cloudfs"].append(facts)
        self.empty_bucket(f"before cloudfs {label} (repetition {rep + 1})")
        try:
            with self.mounted(mount):
                try:
                    measure(mount, facts)
                    facts["status"] = {
                        name: value
                        for name, value in mount.status().items()
                        if name in ("uploads", "cache", "catalog")
                    }
                except BenchError:
                    raise
                except Exception as exc:
                    raise BenchError(f"{exc}\n{mount.log_tail()}") from exc
        except BaseException:
            if mount.log_path.exists():  # the evidence outlives the cache directory
                shutil.copyfile(mount.log_path, self.workdir / f"cloudfs-{rep}-{label}.log")
            raise
        finally:
            self.check_log(mount, facts, f"{label} (repetition {rep + 1})")
            shutil.rmtree(cache, ignore_errors=True)
            wm.delete_prefix(self.direct, "")

    def empty_bucket(self, when: str) -> None:
        leftover = wm.list_keys(self.direct, "")
        if leftover:
            self.notes.append(
                f"{len(leftover)} objects were in the bucket {when} (e.g. {leftover[0]}); "
                f"deleted before mounting."
            )
            wm.delete_prefix(self.direct, "")

    def check_log(self, mount: CloudfsMount, facts: dict[str, Any], phase: str) -> None:
        """Keep the daemon's warnings and errors; ``result`` sums them up by kind."""
        problems = mount.log_problems()
        if problems:
            facts["log_problems"] = problems[-20:]
            facts["log_problem_count"] = len(problems)
            for line in problems:
                self.log_kinds.setdefault(log_kind(line), []).append(f"{phase}: {line}")

    def run_cloudfs(self, rep: int) -> None:
        def big(mount: CloudfsMount, facts: dict[str, Any]) -> None:
            target = mount.mountpoint / self.key
            self.warm_source()
            self.settle()
            start = time.perf_counter()
            seconds = timed_dd(self.source, self.size, target)
            acknowledged = time.perf_counter()
            self.record("cloudfs_dd", wm.mb_per_s(self.size, seconds))
            facts["seconds"] = {"dd": round(seconds, 3)}
            try:
                uploaded = wm.wait_uploaded(mount.mountpoint, "the large file", mount.log_tail)
                facts["seconds"]["ack_to_bucket"] = round(uploaded - acknowledged, 3)
                wm.check_object(self.direct, self.key, self.expected)
            finally:
                wm.delete_prefix(self.direct, self.key)
            self.record("cloudfs_big_in_bucket", uploaded - start)
            self.record("cloudfs_big_upload", wm.mb_per_s(self.size, uploaded - acknowledged))

        def ingest(threads: int, mount: CloudfsMount, facts: dict[str, Any]) -> None:
            plan = self.ingest(f"ingest-r{rep}-{threads}t", seed=300 + 100 * rep + threads)
            self.settle()
            start = time.perf_counter()
            seconds, phases = wm.timed_ingest(mount.mountpoint, plan, threads)
            acknowledged = time.perf_counter()
            self.record(f"cloudfs_ingest_{threads}", plan.count / seconds)
            facts["seconds"] = {"ingest": round(seconds, 3)}
            facts["mean_ms_per_step"] = phases
            try:
                uploaded = wm.wait_uploaded(
                    mount.mountpoint, f"the ingest from {threads} threads", mount.log_tail
                )
                facts["seconds"]["ack_to_bucket"] = round(uploaded - acknowledged, 3)
                facts["bucket_check"] = wm.check_ingest(self.direct, plan, self.args.spot_checks)
            finally:
                wm.delete_prefix(self.direct, plan.prefix + "/")
            self.record(f"cloudfs_ingest_{threads}_in_bucket", uploaded - start)
            self.record(f"cloudfs_ingest_{threads}_bucket_rate", plan.count / (uploaded - start))

        def held_back(mount: CloudfsMount, facts: dict[str, Any]) -> None:
            """The acknowledged path alone: no upload competes for the two cores meanwhile."""
            plan = self.ingest(f"held-r{rep}", seed=900 + rep)
            self.settle()
            seconds, phases = wm.timed_ingest(mount.mountpoint, plan, 1)
            self.record("cloudfs_ingest_held", plan.count / seconds)
            facts["seconds"] = {"ingest": round(seconds, 3)}
            facts["mean_ms_per_step"] = phases

        self.attempt(f"rep {rep} cloudfs dd", lambda: self.through_cloudfs(rep, "dd", big))
        self.attempt(
            f"rep {rep} cloudfs ingest, uploads held back",
            lambda: self.through_cloudfs(
                rep, "held", held_back, 1, ("--upload-delay", "3600", "--drain-timeout", "0")
            ),
        )
        for threads in INGEST_THREADS:
            self.attempt(
                f"rep {rep} cloudfs ingest, {threads} threads",
                partial(
                    self.through_cloudfs, rep, f"ingest{threads}", partial(ingest, threads), threads
                ),
            )

    # -- the run -----------------------------------------------------------------------------

    def measure(self) -> None:
        systems = [self.run_local, self.run_boto3, self.run_cloudfs]
        for rep in range(self.args.repeat):
            turn = rep % len(systems)
            for system in systems[turn:] + systems[:turn]:
                self.say(f"repetition {rep + 1}/{self.args.repeat}: {system.__name__[4:]}")
                system(rep)

    def result(self, runtime: float) -> dict[str, Any]:
        python = (
            os.path.relpath(sys.executable, REPO)
            if sys.executable.startswith(str(REPO))
            else sys.executable
        )
        command = " ".join([python, "-m", "bench", *sys.argv[1:]])
        middle = medians(self.samples)
        if "prefault" in self.details:
            touch = self.details["prefault"]
            self.notes.append(
                f"{format_size(touch['bytes'])} of memory was touched once before measuring "
                f"({touch['seconds']}s), as in the read benchmark."
            )
        if self.sources and sources_digest() != self.sources:
            self.notes.append(
                "**cloudfs's sources changed during the run** (each mount runs the code as it is "
                "then): the figures may mix two versions of cloudfs."
            )
        self.notes += self.step_notes()
        for kind, lines in self.log_kinds.items():
            self.notes.append(
                f"cloudfs's log has {len(lines)} warning/error line{'s' if len(lines) > 1 else ''} "
                f"of the kind `{kind}`; the first: {lines[0]}"
            )
        return {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": command,
            "machine": machine(),
            "disk": disk_of(self.workdir),
            "revision": self.revision,
            "options": {
                "size_bytes": self.size,
                "files": self.files,
                "file_size": self.file_size,
                "repeat": self.args.repeat,
                "quick": self.args.quick,
                "wan": self.details.get("wan"),
                "server": self.args.server,
                "mount_options": list(MOUNT_OPTIONS),
                "ingest_threads": list(INGEST_THREADS),
                "put_threads": list(PUT_THREADS),
            },
            "endpoint": {
                "kind": self.endpoint.kind if self.endpoint else None,
                "conformance": self.details.get("endpoint_conformance"),
            },
            "units": {m.key: m.unit for m in self.metrics},
            "medians": middle,
            "ratios": write_report.ratios(middle, self.ratio_rows),
            "targets": write_report.verdicts(middle, self.goals),
            "samples": self.samples,
            "details": self.details,
            "notes": self.notes,
            "errors": self.errors,
            "missing": write_report.missing(self.samples, self.metrics),
            "runtime_seconds": round(runtime, 1),
        }

    def step_notes(self) -> list[str]:
        """Where an ingest file's time goes, through cloudfs and on the local disk."""
        notes = []
        for threads in INGEST_THREADS:
            found: dict[str, dict[str, float]] = {}
            for system, runs in (
                ("cloudfs", [f for f in self.details["cloudfs"] if f.get("threads") == threads]),
                ("local", [f for f in self.details["local"] if f.get("threads") == threads]),
            ):
                steps = [run["mean_ms_per_step"] for run in runs if "mean_ms_per_step" in run]
                if steps:
                    found[system] = {
                        name: statistics.median(step[name] for step in steps) for name in wm.PHASES
                    }
            if len(found) == 2:
                parts = ", ".join(
                    f"{name} {found['cloudfs'][name]:.2f} / {found['local'][name]:.2f}"
                    for name in wm.PHASES
                )
                notes.append(
                    f"Ingest, {threads} thread{'s' if threads > 1 else ''}: mean ms per call "
                    f"(median over the runs), cloudfs / local disk: {parts}."
                )
        return notes


def log_kind(line: str) -> str:
    """A log line without its time, paths, names and numbers, to count lines of one kind."""
    text = line.split(" WARNING ", 1)[-1].split(" ERROR ", 1)[-1]
    text = re.sub(r"[\w.-]+(?:/[\w.-]+)*\.(?:dcm|bin)\b", "<key>", text)
    text = re.sub(r"/[^\s:]+", "<path>", text)
    text = re.sub(r'"[0-9a-f-]+"', "<etag>", text)
    return re.sub(r"\d+", "N", text)


def revision() -> str:
    """The commit measured, and whether cloudfs's sources differed from it (edited meanwhile)."""
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    changed = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "cloudfs"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return head.stdout.strip() + (" with uncommitted changes in cloudfs/" if changed else "")


def sources_digest() -> str:
    """A digest of cloudfs's Python sources: a mount runs them as they are when it starts, so a
    change during the run would mix versions in one table."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "cloudfs").rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def disk_of(path: Path) -> str:
    """The device and filesystem holding ``path`` (cloudfs's cache and the local figures)."""
    result = subprocess.run(
        ["findmnt", "-n", "-o", "SOURCE,FSTYPE", "-T", str(path)], capture_output=True, text=True
    )
    found = result.stdout.split()
    if result.returncode != 0 or len(found) < 2:
        return f"{path} (device unknown)"
    return f"{found[0]} ({found[1]}), scratch directory under {path.parent}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not is_root():
        print("bench: needs root (FUSE mounts with cloudfs's defaults)", file=sys.stderr)
        return 2
    bench = WriteBench(args)
    result, table, interrupted = execute(
        bench,
        lambda: write_report.tables(bench.samples, bench.metrics, bench.ratio_rows, bench.goals),
    )
    section = write_report.section_name(result)
    name = "write-quick.json" if args.quick else f"write-{section}.json"
    write_json(REPO / "bench" / "results" / name, result)
    if not (args.no_docs or interrupted):
        page = REPO / "docs" / "benchmarks-write.md"
        existing = page.read_text() if page.exists() else None
        body = write_report.section(result, table)
        page.write_text(write_report.updated_page(existing, section, body))
    return conclude(bench, result, interrupted, name)
