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

cloudfs is mounted with its default upload delay: uploads wait for a 1 s pause in the files
arriving, so the PACS's writes have the machine to themselves and the files go up in the pause
after the burst.  One more ingest runs with ``--upload-delay 0``, uploads beside the writes, to
show what that wait buys.  ``--drain-timeout 5`` only shortens the unmount after a measurement
whose uploads kept failing (every measurement waits for its own uploads before unmounting).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import botocore.exceptions

from cloudfs.config import format_size, parse_size

from . import write_measure as wm
from . import write_report
from .common import TrackedBench, publish
from .data import generate, write_file
from .mounts import CloudfsMount
from .report import medians, missing, ratios, verdicts
from .run import parse_common
from .servers import BUCKET, create_bucket
from .system import needs_root, timed_dd

QUICK_SIZE = 64 * 2**20
QUICK_FILES = 100
INGEST_THREADS = (1, 4)
PUT_THREADS = (4, 8)
MOUNT_OPTIONS = ("--drain-timeout", "5")
AT_ONCE = "at_once"
"""Names the ingest measured with ``--upload-delay 0``."""
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
    parser.add_argument(
        "--spot-checks", type=int, default=5, help="ingest objects read back (default: 5)"
    )
    args = parse_common(
        parser,
        argv,
        page="benchmarks-write.md",
        quick="64 MiB, 100 files",
        workdir=" on the disk to measure; cloudfs's cache goes there too",
    )
    if args.quick:
        args.size, args.files = str(QUICK_SIZE), QUICK_FILES
    args.size_bytes = parse_size(args.size)
    args.file_size_bytes = parse_size(args.file_size)
    if args.size_bytes < 16 * 2**20:
        parser.error("--size must be at least 16M")
    if args.files < 1 or args.file_size_bytes < 1:
        parser.error("--files and --file-size must be positive")
    return args


class WriteBench(TrackedBench):
    """The shared bookkeeping (steps that fail without stopping the run, mounts undone on the way
    out, child processes, memory pre-touch, the commit and the daemon's log) with the write
    measurements."""

    kind = "write"
    pace_uploads = True

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

    # -- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        self.start()
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
        create_bucket(self.direct)
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

        def body(_: float) -> None:
            measure(mount, facts)
            facts["status"] = {
                name: value
                for name, value in mount.status().items()
                if name in ("uploads", "cache", "catalog")
            }

        try:
            self.in_mount(mount, rep, label, facts, body)
        finally:
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

        def ingest(threads: int, name: str, mount: CloudfsMount, facts: dict[str, Any]) -> None:
            plan = self.ingest(f"ingest-r{rep}-{name}", seed=300 + 100 * rep + threads)
            self.settle()
            start = time.perf_counter()
            seconds, phases = wm.timed_ingest(mount.mountpoint, plan, threads)
            acknowledged = time.perf_counter()
            self.record(f"cloudfs_ingest_{name}", plan.count / seconds)
            facts["seconds"] = {"ingest": round(seconds, 3)}
            facts["mean_ms_per_step"] = phases
            try:
                uploaded = wm.wait_uploaded(mount.mountpoint, f"the ingest {name}", mount.log_tail)
                facts["seconds"]["ack_to_bucket"] = round(uploaded - acknowledged, 3)
                facts["bucket_check"] = wm.check_ingest(self.direct, plan, self.args.spot_checks)
            finally:
                wm.delete_prefix(self.direct, plan.prefix + "/")
            self.record(f"cloudfs_ingest_{name}_in_bucket", uploaded - start)
            self.record(f"cloudfs_ingest_{name}_bucket_rate", plan.count / (uploaded - start))

        self.attempt(f"rep {rep} cloudfs dd", lambda: self.through_cloudfs(rep, "dd", big))
        self.attempt(
            f"rep {rep} cloudfs ingest, uploads at once",
            lambda: self.through_cloudfs(
                rep,
                AT_ONCE,
                partial(ingest, 1, AT_ONCE),
                1,
                (*MOUNT_OPTIONS, "--upload-delay", "0"),
            ),
        )
        for threads in INGEST_THREADS:
            self.attempt(
                f"rep {rep} cloudfs ingest, {threads} threads",
                partial(
                    self.through_cloudfs,
                    rep,
                    f"ingest{threads}",
                    partial(ingest, threads, str(threads)),
                    threads,
                ),
            )

    # -- the run -----------------------------------------------------------------------------

    def tables(self) -> str:
        return write_report.tables(self.samples, self.metrics, self.ratio_rows, self.goals)

    def systems(self) -> list[Callable[[int], None]]:
        return [self.run_local, self.run_boto3, self.run_cloudfs]

    def result(self, runtime: float) -> dict[str, Any]:
        middle = medians(self.samples)
        self.notes += self.step_notes()
        self.closing_notes()
        return self.document(
            runtime,
            missing(self.samples, [metric.key for metric in self.metrics]),
            options={
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
            endpoint={
                "kind": self.endpoint.kind if self.endpoint else None,
                "conformance": self.details.get("endpoint_conformance"),
            },
            units={m.key: m.unit for m in self.metrics},
            medians=middle,
            ratios=ratios(middle, self.ratio_rows),
            targets=verdicts(middle, self.goals),
        )

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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not needs_root("FUSE mounts with cloudfs's defaults"):
        return 2
    return publish(WriteBench(args), write_report.workload, write_report.PAGE_HEAD)
