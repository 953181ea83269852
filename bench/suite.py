"""``python -m bench suite``: cloudfs, s3fs-fuse and ``rclone mount`` side by side on one endpoint.

The other benchmarks measure cloudfs against the limits around it; this one answers the user's
question, "is it faster than what I already use", with the same workloads on every system, in one
run, against the same server and link.  Per repetition the systems run in an order rotated by one,
so drift of the machine spreads over all of them; every figure is a median with each run's value
beside it.

Every measurement gets a fresh mount on an empty cache directory (cold), and its "warm" figure is
taken through the same mount after the kernel page cache is dropped, so it measures the daemon's
own cache, not the kernel's.  Each data set lives in its own bucket, so a workload's mount lists
and indexes only what it reads.  Bytes read through every system are checked against the expected
ones outside the timed parts.  A system that cannot be installed or mounted is reported with the
reason in every row.

The data sets are written into s3rver's on-disk layout directly (``SeedWriter``) instead of being
PUT one by one: s3rver keeps each object as three files (the bytes, their MD5, the metadata) and
reads them on every request, so the result is what PUTs would have produced, in seconds rather
than the minutes 100,000 PUTs take.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import ctstudy, measure, suite_report
from .common import TrackedBench, revision, sources_digest
from .data import generate
from .peers import SYSTEMS, SystemMount, current_rss, ensure_installed, make_mount, peak_rss
from .report import write_json
from .run import conclude, execute, parse_common
from .servers import BUCKET, REPO, Endpoint, create_bucket
from .system import (
    BenchError,
    drop_page_cache,
    force_unmount,
    needs_root,
    timed_dd,
    verify_file,
    wait_for,
)
from .viewer import check_series, read_files, settle, wait_indexed
from .write_measure import Ingest, delete_prefix, timed_ingest

CT_BUCKET = "bench-ct"
TREE_BUCKET = "bench-tree"
MIXED_BUCKET = "bench-mixed"
INGEST_BUCKET = "bench-ingest"
SEED = 1
TREE_DIR = "tree/flat"
"""The directory of ``tree_entries`` objects that ``ls -l`` lists; ``find`` walks ``tree``."""
TREE_SIDE_DIRS = 4
TREE_SIDE_ENTRIES = 50
"""A few smaller sibling directories, so ``find`` walks a tree and not one listing."""
HOT_CHECK_TIMEOUT = 20.0
"""Seconds the hot study may take to read with the server paused before it counts as not
served from cache: a read from a local cache takes well under a second here."""
LIST_TIMEOUT = 300.0
"""A listing command slower than this counts as failed (and the table says so): s3rver alone
needs about 50 s to list 100,000 keys, so this leaves a peer six times that."""
CLOUDFS_MIN_CACHE = 544 * 2**20
"""The smallest ``--cache-size`` cloudfs accepts (four read-ahead windows); the backup workload
caps every cache that has a cap at this, below the mixed tree plus the hot study, so that the
backup must evict something and the question of what it evicts is real (full sizes only)."""


@dataclass(frozen=True)
class Sizes:
    large: int
    random_reads: int
    series: int
    tree_entries: int
    mixed: tuple[tuple[int, int], ...]
    """(count, size) groups of the backup tree."""
    ingest_files: int
    ingest_size: int
    catalog_objects: int

    @property
    def mixed_bytes(self) -> int:
        return sum(count * size for count, size in self.mixed)


FULL = Sizes(
    large=2**30,
    random_reads=200,
    series=300,
    tree_entries=100_000,
    mixed=((16, 32 * 2**20), (400, 512 * 2**10), (4000, 8 * 2**10)),
    ingest_files=1000,
    ingest_size=512 * 2**10,
    catalog_objects=1_000_000,
)
QUICK = Sizes(
    large=64 * 2**20,
    random_reads=40,
    series=12,
    tree_entries=2000,
    mixed=((2, 4 * 2**20), (16, 256 * 2**10), (100, 8 * 2**10)),
    ingest_files=50,
    ingest_size=512 * 2**10,
    catalog_objects=50_000,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench suite",
        description="cloudfs side by side with s3fs-fuse and rclone mount on one endpoint, with "
        "the endpoint's limits (see bench/README.md).",
    )
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated systems to compare (default: {','.join(SYSTEMS)})",
    )
    args = parse_common(
        parser,
        argv,
        page="benchmarks.md",
        quick="small data sets",
        workdir=" and the systems' cache directories",
    )
    args.sizes = QUICK if args.quick else FULL
    args.size_bytes = args.sizes.large
    args.random_reads = args.sizes.random_reads
    args.systems = [s for s in args.systems.split(",") if s]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    return args


class SeedWriter:
    """Objects written straight into s3rver's data directory (see the module docstring), or PUT
    through boto3 on another server."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.client = endpoint.client(direct=True, pool=16)
        self.raw = endpoint.kind.startswith("s3rver")

    def bucket(self, name: str) -> None:
        create_bucket_named(self.client, name)

    def put(self, bucket: str, key: str, data: bytes) -> None:
        if not self.raw:
            self.client.put_object(Bucket=bucket, Key=key, Body=data)
            return
        # a string join keeps the trailing slash of a directory marker ("ct/" -> "ct/._S3rver_")
        stem = f"{self.endpoint.data_dir / bucket}/{key}"
        Path(stem).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{stem}._S3rver_object").write_bytes(data)
        Path(f"{stem}._S3rver_object.md5").write_text(hashlib.md5(data).hexdigest())
        Path(f"{stem}._S3rver_metadata.json").write_text(
            '{\n  "content-type": "binary/octet-stream"\n}'
        )

    def put_many(self, bucket: str, items: Iterator[tuple[str, bytes]]) -> int:
        """Put every item, 8 at a time, then a zero-byte marker ("a/b/") for every directory.

        The markers work around s3rver 3.7.1: a delimited listing only reports a common prefix
        for a directory that directly holds an object, so without them ``ct/`` (which holds only
        deeper keys) is invisible to a peer that walks the tree with delimited listings (s3fs,
        rclone).  cloudfs lists without a delimiter and does not need them; real S3 neither."""
        directories: set[str] = set()

        def put(item: tuple[str, bytes]) -> None:
            self.put(bucket, *item)

        def note(item: tuple[str, bytes]) -> tuple[str, bytes]:
            parts = item[0].split("/")[:-1]
            directories.update("/".join(parts[: n + 1]) + "/" for n in range(len(parts)))
            return item

        with ThreadPoolExecutor(8) as pool:
            done = len(list(pool.map(put, map(note, items))))
            list(pool.map(put, ((directory, b"") for directory in sorted(directories))))
        return done


def create_bucket_named(client: Any, name: str) -> None:
    if name == BUCKET:
        create_bucket(client)
        return
    with suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=name)


def tree_items(entries: int) -> Iterator[tuple[str, bytes]]:
    """The listing tree: ``entries`` small objects in one directory, a few small siblings."""
    for n in range(entries):
        yield f"{TREE_DIR}/item-{n:06d}.txt", f"entry {n}\n".encode()
    for side in range(TREE_SIDE_DIRS):
        for n in range(TREE_SIDE_ENTRIES):
            yield f"tree/side-{side}/item-{n:04d}.txt", f"side {side} entry {n}\n".encode()


def mixed_items(groups: tuple[tuple[int, int], ...]) -> Iterator[tuple[str, bytes]]:
    """The backup tree: groups of files of one size each, deterministic bytes, a few levels."""
    for group, (count, size) in enumerate(groups):
        data = bytes(generate(size * min(count, 4), seed=100 + group))
        for n in range(count):
            piece = (n % 4) * size
            body = data[piece : piece + size - 8] + n.to_bytes(8, "little")
            yield f"mixed/g{group}/d{n % 10}/file-{n:05d}.bin", body


class SuiteBench(TrackedBench):
    kind = "suite"

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.sizes: Sizes = args.sizes
        self.figures: dict[str, dict[str, list[float]]] = {s: {} for s in args.systems}
        self.failures: dict[str, list[str]] = {s: [] for s in args.systems}
        self.mounted_ok: dict[str, int] = dict.fromkeys(args.systems, 0)
        self.rss: dict[str, int] = {}
        self.series: tuple[ctstudy.Instance, ...] = ()
        self.writer: SeedWriter | None = None
        self.server_pid: int | None = None
        self.catalog: dict[str, Any] = {}
        self.details["suite"] = []
        self.ingest_payload = bytearray()

    # -- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        # what ``start`` records, without its memory pre-touch: the read benchmark's setup does it
        self.revision, self.sources = revision(), sources_digest()
        self.say(f"cloudfs at {self.revision}")
        super(TrackedBench, self).setup()  # the large object, conformance, WAN proxy, client
        assert self.endpoint is not None
        self.server_pid = self.processes[0].popen.pid if self.processes else None
        self.writer = SeedWriter(self.endpoint)
        started = time.perf_counter()
        self.seed_datasets()
        self.say(f"seeded the data sets in {time.perf_counter() - started:.1f}s")
        for system in self.args.systems:
            reason = ensure_installed(system)
            if reason:
                self.failures[system].append(f"install: {reason}")

    def seed_datasets(self) -> None:
        writer = self.writer
        assert writer is not None
        for name in (CT_BUCKET, TREE_BUCKET, MIXED_BUCKET, INGEST_BUCKET):
            writer.bucket(name)
        found: list[ctstudy.Instance] = []
        ct: list[tuple[str, bytes]] = []
        for instance, data in ctstudy.instances(SEED, (self.sizes.series,)):
            found.append(instance)
            ct.append((instance.key, data))
        writer.put_many(CT_BUCKET, iter(ct))
        writer.put_many(MIXED_BUCKET, iter(ct))  # the hot study of the backup workload
        self.series = ctstudy.study_of(SEED, (self.sizes.series,), found).series[0]
        del ct
        writer.put_many(TREE_BUCKET, tree_items(self.sizes.tree_entries))
        writer.put_many(MIXED_BUCKET, mixed_items(self.sizes.mixed))
        # the server must list what was written behind its back
        listed = keys_in(writer.client, TREE_BUCKET, "tree/side-0/")
        count = len([key for key in listed if not key.endswith("/")])
        if count != TREE_SIDE_ENTRIES:
            raise BenchError(f"the seeded tree lists {count} keys, not {TREE_SIDE_ENTRIES}")

    # -- mounts ------------------------------------------------------------------------------

    def open_mount(
        self,
        system: str,
        bucket: str,
        label: str,
        rep: int,
        *,
        cloudfs_options: tuple[str, ...] = (),
        cache_limit: int | None = None,
    ) -> SystemMount:
        assert self.endpoint is not None
        cache = self.workdir / f"cache-{system}-{rep}-{label}"
        shutil.rmtree(cache, ignore_errors=True)
        return make_mount(
            system,
            self.endpoint,
            bucket,
            self.workdir / f"mnt-{system}",
            cache,
            self.workdir,
            cloudfs_options=cloudfs_options,
            cache_limit=cache_limit,
        )

    @contextmanager
    def cold(self, mount: SystemMount) -> Iterator[SystemMount]:
        """``mount`` mounted; its daemon's peak RSS noted before it goes; its cache removed."""
        try:
            with self.mounted(mount):
                self.mounted_ok[mount.system] += 1
                try:
                    yield mount
                except BenchError:
                    raise
                except Exception as exc:
                    raise BenchError(f"{exc}\n{mount.log_tail()}") from exc
                finally:
                    peak = mount.peak_rss()
                    if peak is not None:
                        self.rss[mount.system] = max(self.rss.get(mount.system, 0), peak)
                        # per mount too, so the JSON says which workload reached the peak
                        self.details.setdefault("peak_rss_per_mount", {})[
                            mount.cache_dir.name.removeprefix("cache-")
                        ] = peak
        finally:
            shutil.rmtree(mount.cache_dir, ignore_errors=True)

    def put(self, system: str, metric: str, value: float) -> None:
        self.figures[system].setdefault(metric, []).append(value)

    # -- the workloads -----------------------------------------------------------------------

    def sequential(self, system: str, rep: int) -> None:
        mount = self.open_mount(system, BUCKET, "seq", rep)
        path = mount.mountpoint / self.key
        with self.cold(mount):
            drop(self)
            self.warm_server_copy()
            cold = timed_dd(path, self.size)
            drop(self)
            warm = timed_dd(path, self.size)
            verify_file(path, self.expected)
        self.put(system, "seq_cold", measure.mb_per_s(self.size, cold))
        self.put(system, "seq_warm", measure.mb_per_s(self.size, warm))

    def random(self, system: str, rep: int) -> None:
        offsets = measure.random_offsets(self.size, self.sizes.random_reads, seed=rep)
        mount = self.open_mount(system, BUCKET, "random", rep)
        path = mount.mountpoint / self.key
        with self.cold(mount):
            drop(self)
            self.warm_server_copy()
            cold = measure.random_reads(path, offsets, self.expected)
            drop(self)
            warm = measure.random_reads(path, offsets, self.expected)
        for name, values in (("cold", cold), ("warm", warm)):
            self.put(system, f"random_{name}_p50", measure.percentile(values, 0.50))
            self.put(system, f"random_{name}_p99", measure.percentile(values, 0.99))

    def viewer(self, system: str, rep: int) -> None:
        mount = self.open_mount(system, CT_BUCKET, "viewer", rep)
        paths = [mount.mountpoint / instance.key for instance in self.series]
        with self.cold(mount):
            if system == "cloudfs":
                # as in the viewer benchmark: study prefetch needs the study indexed first
                wait_indexed(mount.inner, len(self.series))  # type: ignore[attr-defined]
            drop(self)
            self.warm_ct_server()
            read = read_files(paths)
            check_series(read, self.series, f"{system} viewer")
        self.put(system, "viewer_first", read.first)
        self.put(system, "viewer_total", read.total)

    def listing(self, system: str, rep: int) -> None:
        """``ls -l`` of the big directory, cold then warm, in a mount of its own."""
        self.list_tree(system, rep, "ls")

    def walk(self, system: str, rep: int) -> None:
        """``find`` over the tree, cold then warm, in another mount (so its cold is cold)."""
        self.list_tree(system, rep, "find")

    def list_tree(self, system: str, rep: int, what: str) -> None:
        mount = self.open_mount(system, TREE_BUCKET, what, rep)
        started = time.perf_counter()
        with self.cold(mount):
            if what == "ls":
                # cloudfs answers at once and lists the bucket meanwhile (the mount waits for
                # the end of the listing): both are part of the cost
                self.put(system, "mount_tree_answer", mount.answered_in)
                self.put(system, "mount_tree", time.perf_counter() - started)
                command = ["ls", "-l", str(mount.mountpoint / TREE_DIR)]
                want = self.sizes.tree_entries + 1  # the "total" line
            else:
                command = ["find", str(mount.mountpoint / "tree")]
                # tree, its five directories, and every object under them
                want = 1 + 1 + self.sizes.tree_entries + TREE_SIDE_DIRS * (1 + TREE_SIDE_ENTRIES)
            for state in ("cold", "warm"):
                drop(self)
                seconds, lines = timed_lines(command, mount.mountpoint)
                if lines != want:
                    raise BenchError(f"{' '.join(command)}: {lines} lines, expected {want}")
                self.put(system, f"{what}_{state}", seconds)

    def backup(self, system: str, rep: int) -> None:
        study = sum(instance.size for instance in self.series)
        limit = max(2 * study, CLOUDFS_MIN_CACHE)
        mount = self.open_mount(system, MIXED_BUCKET, "backup", rep, cache_limit=limit)
        paths = [mount.mountpoint / instance.key for instance in self.series]
        with self.cold(mount):
            check_series(read_files(paths), self.series, f"{system} hot study")
            if system == "cloudfs":
                settle_cloudfs(mount)
            drop(self)
            start = time.perf_counter()
            archived = tar_bytes(mount.mountpoint, "mixed")
            seconds = time.perf_counter() - start
            if archived < self.sizes.mixed_bytes:
                raise BenchError(f"tar of the mixed tree gave {archived} bytes, too few")
            drop(self)
            served = self.read_with_server_paused(paths)
        self.put(system, "backup", measure.mb_per_s(self.sizes.mixed_bytes, seconds))
        self.put(system, "hot_after_backup", 1.0 if served else 0.0)
        self.details["suite"].append(
            {"system": system, "rep": rep, "backup_cache_limit": limit, "hot_served": served}
        )

    def ingest(self, system: str, rep: int) -> None:
        sizes = self.sizes
        payload = self.ingest_payload
        prefix = f"ingest-{system}-{rep}"
        job = Ingest(prefix, sizes.ingest_files, sizes.ingest_size, payload, seed=rep)
        # cloudfs's own upload delay, as every peer runs with its own defaults.
        options = ("--drain-timeout", "5")
        mount = self.open_mount(system, INGEST_BUCKET, "ingest", rep, cloudfs_options=options)
        assert self.endpoint is not None
        client = self.endpoint.client(direct=True)
        wanted = set(job.names)
        try:
            with self.cold(mount):
                start = time.perf_counter()
                seconds, _ = timed_ingest(mount.mountpoint, job, 1)

                def all_there() -> bool:
                    return wanted <= set(keys_in(client, INGEST_BUCKET, prefix + "/"))

                wait_for(all_there, 600, f"{system}'s ingest in the bucket")
                in_bucket = time.perf_counter() - start
            for name in job.names[:: max(1, len(job.names) // 3)]:
                index = job.names.index(name)
                body = client.get_object(Bucket=INGEST_BUCKET, Key=name)["Body"].read()
                if body != bytes(job.data(index)):
                    raise BenchError(f"{system} ingest: wrong bytes in the bucket for {name}")
        finally:
            delete_prefix_in(client, INGEST_BUCKET, prefix)
        self.put(system, "ingest_rate", sizes.ingest_files / seconds)
        self.put(system, "ingest_bucket", in_bucket)

    WORKLOADS = ("sequential", "random", "viewer", "listing", "walk", "backup", "ingest")

    # -- helpers -----------------------------------------------------------------------------

    def warm_ct_server(self) -> None:
        """The server's files of the study read once, so it serves them from memory."""
        if self.endpoint is None:
            return
        for instance in self.series:
            path = self.endpoint.data_dir / CT_BUCKET / f"{instance.key}._S3rver_object"
            if path.exists():
                path.read_bytes()

    def read_with_server_paused(self, paths: list[Path]) -> bool:
        """Whether the series reads, with the right bytes, while the server is stopped
        (SIGSTOP): only a system serving it from its own cache can."""
        if self.server_pid is None:
            raise BenchError("no server process to pause")
        hashes = [instance.sha256 for instance in self.series]
        script = (
            "import hashlib,sys\n"
            "for p in sys.argv[1:]:\n"
            "    print(hashlib.sha256(open(p,'rb').read()).hexdigest(), flush=True)\n"
        )
        os.kill(self.server_pid, signal.SIGSTOP)
        try:
            child = subprocess.Popen(
                [sys.executable, "-c", script, *map(str, paths)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            try:
                out, _ = child.communicate(timeout=HOT_CHECK_TIMEOUT)
                finished = child.returncode == 0
            except subprocess.TimeoutExpired:
                finished, out = False, ""
        finally:
            os.kill(self.server_pid, signal.SIGCONT)
        if not finished:
            child.kill()
            child.communicate()
            return False
        return out.split() == hashes

    def catalog_rss(self) -> None:
        """cloudfs's memory with ``catalog_objects`` objects cataloged: a ``file://`` source of
        that many empty files (made in seconds; the catalog holds names, sizes and times, not
        bytes, so empty files catalog like any), mounted, one directory listed."""
        count = self.sizes.catalog_objects
        source = self.workdir / "catalog-source"
        per_dir = 1000
        started = time.perf_counter()
        for directory in range(-(-count // per_dir)):
            folder = source / f"d{directory:04d}"
            folder.mkdir(parents=True)
            for n in range(min(per_dir, count - directory * per_dir)):
                os.close(os.open(folder / f"f{n:04d}", os.O_CREAT | os.O_WRONLY, 0o644))
        made = time.perf_counter() - started
        mountpoint = self.workdir / "mnt-catalog"
        mountpoint.mkdir(exist_ok=True)
        cache = self.workdir / "cache-catalog"
        command = [sys.executable, "-m", "cloudfs", "mount", f"file://{source}", str(mountpoint)]
        command += ["--cache-dir", str(cache)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        if result.returncode != 0:
            raise BenchError(f"cloudfs mount of {count} files failed: {result.stderr.strip()}")
        pid = None
        try:
            pid = int((cache / "lock").read_text().strip())
            start = time.perf_counter()
            seconds, lines = timed_lines(["ls", "-l", str(mountpoint / "d0000")])
            if lines != min(per_dir, count) + 1:
                raise BenchError(f"ls of a cataloged directory: {lines} lines")
            status = json.loads(
                subprocess.run(
                    [sys.executable, "-m", "cloudfs", "status", "--json", str(mountpoint)],
                    capture_output=True,
                    text=True,
                    timeout=120,
                ).stdout
                or "{}"
            )
            listed = time.perf_counter() - start
            self.catalog = {
                "objects": count,
                "rss_bytes": current_rss(pid),
                "peak_rss_bytes": peak_rss(pid),
                "files_made_seconds": round(made, 1),
                "ls_seconds": round(seconds, 3),
                "status_seconds": round(listed, 3),
                "catalog": status.get("catalog"),
            }
        finally:
            subprocess.run(
                [sys.executable, "-m", "cloudfs", "unmount", str(mountpoint)],
                capture_output=True,
                timeout=120,
            )
            shutil.rmtree(source, ignore_errors=True)
            shutil.rmtree(cache, ignore_errors=True)

    # -- the run -----------------------------------------------------------------------------

    def measure(self) -> None:
        self.ingest_payload = generate(self.sizes.ingest_files * self.sizes.ingest_size, seed=7)
        systems = [s for s in self.args.systems if not self.failures[s]]
        for rep in range(self.args.repeat):
            self.say(f"repetition {rep + 1}/{self.args.repeat}: the limits")
            for limit in (self.run_local, self.run_boto3, self.run_memfs):
                limit(rep)
            turn = rep % max(len(systems), 1)
            order = systems[turn:] + systems[:turn]
            for workload in self.WORKLOADS:
                for system in order:
                    self.say(f"repetition {rep + 1}/{self.args.repeat}: {system} {workload}")
                    self.attempt_system(system, workload, rep)
        if "cloudfs" in systems:
            self.say(f"cloudfs with {self.sizes.catalog_objects} objects cataloged")
            self.attempt("cloudfs catalog RSS", self.catalog_rss)

    def attempt_system(self, system: str, workload: str, rep: int) -> None:
        try:
            getattr(self, workload)(system, rep)
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.failures[system].append(f"{workload} (repetition {rep + 1}): {first}")
            self.errors.append(f"{system} {workload} rep {rep + 1}: {first}")
            self.say(f"FAILED {system} {workload}: {exc}")

    def tables(self) -> str:
        return suite_report.tables(self.summary())

    def summary(self) -> dict[str, Any]:
        return suite_report.summarize(
            self.figures,
            self.samples,
            self.rss,
            self.catalog,
            self.failures,
            self.mounted_ok,
            wan=bool(self.args.wan),
            setup_error=next((e for e in self.errors if e.startswith("setup:")), None),
        )

    def result(self, runtime: float) -> dict[str, Any]:
        self.closing_notes()
        summary = self.summary()
        return self.document(
            runtime,
            summary["missing"],
            options={
                "size_bytes": self.size,
                "repeat": self.args.repeat,
                "quick": self.args.quick,
                "systems": self.args.systems,
                "sizes": self.sizes.__dict__,
                "wan": self.details.get("wan"),
                "server": self.args.server,
            },
            endpoint={
                "kind": self.endpoint.kind if self.endpoint else None,
                "conformance": self.details.get("endpoint_conformance"),
            },
            suite=summary,
        )


# -- small helpers -------------------------------------------------------------------------------


def drop(_: SuiteBench) -> None:
    if not drop_page_cache():
        raise BenchError("cannot drop the page cache (not root)")


def timed_lines(command: list[str], mountpoint: Path | None = None) -> tuple[float, int]:
    """Seconds ``command`` takes with its output drained, and how many lines it printed.

    After ``LIST_TIMEOUT`` the FUSE connection of ``mountpoint`` is aborted (a process waiting
    on a FUSE daemon cannot be killed otherwise) and the command counts as failed."""
    start = time.perf_counter()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        try:
            out, err = process.communicate(timeout=LIST_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            if mountpoint is not None:
                force_unmount(mountpoint)
            process.kill()
            process.communicate()
            raise BenchError(
                f"{' '.join(command)} did not finish within {LIST_TIMEOUT:.0f}s"
            ) from exc
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        raise BenchError(f"{' '.join(command)} failed: {err.decode()[-300:]}")
    return seconds, out.count(b"\n")


def tar_bytes(root: Path, directory: str) -> int:
    """Bytes of ``tar cf - directory`` read from a pipe.  Not ``tar cf /dev/null``: GNU tar
    notices /dev/null and skips reading the files, which would measure only the metadata."""
    with subprocess.Popen(
        ["tar", "-cf", "-", "-C", str(root), directory], stdout=subprocess.PIPE
    ) as process:
        assert process.stdout is not None
        total = 0
        while chunk := process.stdout.read(1 << 20):
            total += len(chunk)
    if process.returncode != 0:
        raise BenchError(f"tar of {root / directory} failed ({process.returncode})")
    return total


def settle_cloudfs(mount: SystemMount) -> None:
    """Wait for cloudfs's study prefetch of the hot study to finish, so the backup is not
    timed while it competes with it."""
    settle(mount.mountpoint)


def keys_in(client: Any, bucket: str, prefix: str) -> list[str]:
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return keys


def delete_prefix_in(client: Any, bucket: str, prefix: str) -> None:
    """``delete_prefix`` on another bucket than the benchmark's (also the directory markers)."""
    if bucket == BUCKET:
        delete_prefix(client, prefix)
        return
    keys = keys_in(client, bucket, prefix)
    for start in range(0, len(keys), 1000):
        batch = [{"Key": key} for key in keys[start : start + 1000]]
        client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not needs_root("drop_caches, FUSE mounts, pausing the server"):
        return 2
    bench = SuiteBench(args)
    result, table, interrupted = execute(bench)
    setup = "wan" if args.wan else "loopback"
    name = "suite-quick.json" if args.quick else f"suite-{setup}.json"
    write_json(REPO / "bench" / "results" / name, result)
    if not (args.no_docs or interrupted):
        path = REPO / "docs" / "benchmarks.md"
        existing = path.read_text() if path.exists() else None
        path.write_text(suite_report.page(result, table, existing))
    return conclude(bench, result, interrupted, name)
