"""The viewer benchmark, ``python -m bench viewer``: a radiologist opening a cold CT series.

A viewer shows the first image of a series, then the radiologist scrolls through it.  Two figures
matter: the time to the first image, and the time until every image of the series has been read.
cloudfs's study prefetch exists for the second one: once an instance is opened, the rest of the
study is fetched in the background, several instances at a time and in scrolling order, so the
viewer's one-file-after-the-other reads find their bytes already local.  Without it, each file is
a miss that waits for its own GETs, one after the other.

One run measures, against the same endpoint (and the same WAN proxy with ``--wan``) and the same
synthetic study (``bench/ctstudy.py``):

* the endpoint's limits with raw boto3: one GET per instance in scrolling order (what a single
  reader gets), and the whole series with 8 parallel readers (the fastest parallel download, the
  figure cloudfs's cold series time is divided by);
* cloudfs with study prefetch on (its default) and off, each on a fresh cache directory and a
  fresh mount: after mounting, the benchmark waits until the DICOM header index holds every
  instance (indexing reads headers only, with GETs that do not fill the block cache, so the cache
  is still cold; the run checks that), drops the page cache and reads the series as a viewer does
  (open, read to the end, close, next instance by Instance Number);
* cloudfs warm, twice, after the cold read with prefetch on: the same mount again (page cache
  dropped, so the bytes come from cloudfs's own caches), then a remount of the same cache
  directory (page cache dropped again), where every byte comes from the disk cache.

Before every timed read from the endpoint, the page cache is dropped and the server's own files of
the study are read once, so the endpoint serves every measurement from memory, as the read
benchmark does.  Each boto3 measurement uses a new client (created outside the timed part), so
like a fresh mount it starts without open connections.  Every byte read is checked against the
SHA-256 of the generated instance, after the timed part.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from cloudfs import control
from cloudfs.config import format_size

from . import ctstudy, viewer_report
from .common import TrackedBench, publish
from .ctstudy import Instance, Study
from .measure import percentile
from .mounts import CACHE_SIZE, CloudfsMount
from .report import medians
from .run import parse_common
from .servers import BUCKET, create_bucket
from .system import BenchError, drop_page_cache, needs_root

SEED = 1
SERIES = 300
SECOND_SERIES = 100
QUICK_SERIES = (40, 10)
READERS = 8
"""boto3's parallel readers; also the connection pool of every boto3 client here."""
MOUNT_OPTIONS = ("--cache-size", CACHE_SIZE)
"""The read benchmark's cache size (the study takes 200 MiB); cloudfs's defaults otherwise."""
VIEW_DIR = "@dicom"
"""cloudfs's default ``--view-dir``."""
POLL_INTERVAL = 0.1
INDEX_STALL = 120.0
"""Seconds without any change in the index counters before the wait for the index fails."""
INDEX_TIMEOUT = 900.0
PREFETCH_SETTLE = 120.0
"""Seconds to wait, before the warm read, for study prefetch to finish the rest of the study."""
VIEW_SPOT_CHECKS = 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench viewer",
        description="cloudfs viewer benchmark: a cold CT series read instance by instance "
        "through cloudfs with study prefetch on and off, beside boto3 with 1 and 8 readers on "
        "the same endpoint, in one run (see bench/README.md).",
    )
    parser.add_argument(
        "--instances", type=int, default=SERIES, help=f"series the viewer reads (default: {SERIES})"
    )
    parser.add_argument(
        "--second-series",
        type=int,
        default=SECOND_SERIES,
        help=f"instances of the study's other series, 0 for none (default: {SECOND_SERIES})",
    )
    args = parse_common(
        parser,
        argv,
        page="benchmarks-viewer.md",
        quick=f"{QUICK_SERIES[0]} + {QUICK_SERIES[1]} instances",
        workdir="; cloudfs's cache directories go there too",
    )
    if args.quick:
        args.instances, args.second_series = QUICK_SERIES
    if args.instances < 2 or args.second_series < 0:
        parser.error("--instances must be at least 2 and --second-series at least 0")
    args.size_bytes = 0  # the read benchmark's object size: no large object here
    return args


# -- the reads -----------------------------------------------------------------------------------


@dataclass
class SeriesRead:
    first: float
    """Seconds from the start to the last byte of the first instance."""
    total: float
    """Seconds from the start to the last byte of the last instance."""
    data: list[bytes]
    each: list[float] = field(default_factory=list)
    """Seconds of each instance's open, read and close (a one-at-a-time reader only): where a
    viewer would stall."""

    def stalls(self) -> dict[str, float]:
        """Per-instance milliseconds: median, p90 and the slowest."""
        ms = [seconds * 1000 for seconds in self.each]
        if not ms:
            return {}
        return {
            "p50": round(percentile(ms, 0.5), 2),
            "p90": round(percentile(ms, 0.9), 2),
            "max": round(max(ms), 2),
        }


def read_files(paths: list[Path]) -> SeriesRead:
    """What a viewer scrolling through a series does with files: open one, read it to the end,
    close it, then the next."""
    data: list[bytes] = []
    marks = [time.perf_counter()]
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            data.append(handle.readall())
        marks.append(time.perf_counter())
    each = [later - earlier for earlier, later in zip(marks, marks[1:], strict=False)]
    return SeriesRead(marks[1] - marks[0], marks[-1] - marks[0], data, each)


def boto3_series(client: Any, keys: list[str], readers: int) -> SeriesRead:
    """The series with one whole-object GET per instance, ``readers`` at a time, taken in
    scrolling order; the first image is the first instance's last byte."""
    if readers == 1:
        data: list[bytes] = []
        marks = [time.perf_counter()]
        for key in keys:
            data.append(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
            marks.append(time.perf_counter())
        each = [later - earlier for earlier, later in zip(marks, marks[1:], strict=False)]
        return SeriesRead(marks[1] - marks[0], marks[-1] - marks[0], data, each)
    done_at = [0.0] * len(keys)

    def fetch(index: int) -> bytes:
        body = client.get_object(Bucket=BUCKET, Key=keys[index])["Body"].read()
        done_at[index] = time.perf_counter()
        return bytes(body)

    with ThreadPoolExecutor(readers) as pool:
        start = time.perf_counter()
        data = list(pool.map(fetch, range(len(keys))))
        total = time.perf_counter() - start
    return SeriesRead(done_at[0] - start, total, data)


def check_series(read: SeriesRead, series: tuple[Instance, ...], what: str) -> None:
    """Every instance's bytes against its SHA-256; raise at the first one that differs."""
    if len(read.data) != len(series):
        raise BenchError(f"{what}: read {len(read.data)} instances, expected {len(series)}")
    for instance, data in zip(series, read.data, strict=True):
        if len(data) != instance.size or hashlib.sha256(data).hexdigest() != instance.sha256:
            raise BenchError(
                f"{what}: wrong bytes for instance {instance.instance_number} ({instance.key}): "
                f"{len(data)} bytes, expected {instance.size}"
            )


def index_facts(mountpoint: Path) -> dict[str, Any]:
    """The document ``cloudfs index status --json`` prints, asked over the control socket
    directly: a Python process per poll (0.3-1 s here) would blur the time being measured."""
    return control.request(mountpoint, "index", timeout=30)


def mount_status(mountpoint: Path) -> dict[str, Any]:
    """The document ``cloudfs status --json`` prints, over the control socket likewise."""
    return control.request(mountpoint, "status", timeout=30)


def wait_indexed(mount: CloudfsMount, instances: int) -> dict[str, Any]:
    """Poll until nothing is pending and the index holds at least ``instances`` DICOM
    instances; fails when the counters stop moving or after ``INDEX_TIMEOUT``."""
    started = last_change = time.monotonic()
    seen: tuple[Any, ...] = ()
    while True:
        facts = index_facts(mount.mountpoint)
        if facts["pending"] == 0 and facts["dicom"] >= instances:
            return facts
        progress = tuple(
            facts[name] for name in ("objects", "indexed", "dicom", "headers_read", "pending")
        )
        now = time.monotonic()
        if progress != seen:
            seen, last_change = progress, now
        elif now - last_change > INDEX_STALL or now - started > INDEX_TIMEOUT:
            raise BenchError(
                f"the DICOM index stopped short of {instances} instances: {facts}\n"
                f"{mount.log_tail()}"
            )
        time.sleep(POLL_INTERVAL)


def settle(mountpoint: Path) -> float | None:
    """Wait until no study is being prefetched and no GET is in flight; the seconds waited, or
    None if prefetch was still busy after ``PREFETCH_SETTLE``."""
    start = time.monotonic()
    while time.monotonic() - start < PREFETCH_SETTLE:
        busy = index_facts(mountpoint)["studies_prefetching"]
        if not busy and mount_status(mountpoint)["reads"]["requests_in_flight"] == 0:
            return time.monotonic() - start
        time.sleep(POLL_INTERVAL)
    return None


def counter_change(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What the mount's numeric read counters moved by between two statuses."""
    return {
        name: after[name] - before[name]
        for name, value in after.items()
        if isinstance(value, int) and isinstance(before.get(name), int)
    }


# -- the benchmark -------------------------------------------------------------------------------


class ViewerBench(TrackedBench):
    """The shared bookkeeping (steps that fail without stopping the run, mounts undone on the way
    out, child processes, memory pre-touch, the commit and the daemon's log) with the viewer
    measurements."""

    kind = "viewer"

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.samples = {key: [] for key in viewer_report.metric_keys()}
        self.details = {"cloudfs": [], "boto3": []}
        self.counts: tuple[int, ...] = (args.instances,)
        if args.second_series:
            self.counts += (args.second_series,)
        self.study: Study | None = None
        self.server_files: list[Path] = []

    @property
    def series(self) -> tuple[Instance, ...]:
        """The series the viewer reads."""
        assert self.study is not None
        return self.study.series[0]

    # -- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        self.start()
        self.endpoint = self.start_server()
        self.seed()
        if self.args.wan:
            self.start_wan_proxy(self.endpoint)

    def seed(self) -> None:
        """Generate the study and put it into the bucket, 8 instances at a time, directly."""
        assert self.endpoint is not None
        client = self.endpoint.client(direct=True, pool=READERS * 2)
        create_bucket(client)
        started = time.perf_counter()
        found: list[Instance] = []
        with ThreadPoolExecutor(READERS) as pool:
            uploads = []
            for instance, data in ctstudy.instances(SEED, self.counts):
                found.append(instance)
                uploads.append(
                    pool.submit(client.put_object, Bucket=BUCKET, Key=instance.key, Body=data)
                )
            for upload in uploads:
                upload.result()
        self.study = ctstudy.study_of(SEED, self.counts, found)
        total = sum(instance.size for instance in found)
        self.say(
            f"put {len(found)} instances ({format_size(total)}) in "
            f"{time.perf_counter() - started:.1f}s"
        )
        head = client.head_object(Bucket=BUCKET, Key=found[-1].key)
        if head["ContentLength"] != found[-1].size:
            raise BenchError(f"{found[-1].key}: the server reports {head['ContentLength']} bytes")
        files = [self.endpoint.object_file(instance.key) for instance in found]
        self.server_files = [path for path in files if path is not None]
        if len(self.server_files) != len(found):
            self.notes.append(
                f"The server's own files were found for {len(self.server_files)} of "
                f"{len(found)} instances; the others may be served from its disk."
            )

    def prepare(self) -> None:
        """Drop the page cache, then read the server's files once: nothing the measured
        system read before is in memory, and the endpoint serves the study from memory."""
        if not drop_page_cache():
            raise BenchError("cannot drop the page cache (not root)")
        for path in self.server_files:
            with open(path, "rb", buffering=0) as handle:
                while handle.read(1 << 20):
                    pass

    # -- the systems -------------------------------------------------------------------------

    def boto3(self, rep: int, readers: int) -> None:
        endpoint = self.endpoint
        assert endpoint is not None
        keys = [instance.key for instance in self.series]

        def download() -> None:
            client = endpoint.client(pool=READERS * 2)
            self.prepare()
            read = boto3_series(client, keys, readers)
            check_series(read, self.series, f"boto3 with {readers} readers")
            if read.each:
                self.details["boto3"].append({"repetition": rep, "instance_ms": read.stalls()})
            self.record(f"boto3_{readers}_first_ms", read.first * 1000)
            self.record(f"boto3_{readers}_total_s", read.total)

        self.attempt(f"rep {rep} boto3, {readers} readers", download)

    def run_boto3_single(self, rep: int) -> None:
        self.boto3(rep, 1)

    def run_boto3_parallel(self, rep: int) -> None:
        self.boto3(rep, READERS)

    def run_cloudfs_prefetch(self, rep: int) -> None:
        self.attempt(f"rep {rep} cloudfs, study prefetch on", partial(self.viewer, rep, True))

    def run_cloudfs_no_prefetch(self, rep: int) -> None:
        self.attempt(f"rep {rep} cloudfs, study prefetch off", partial(self.viewer, rep, False))

    def viewer(self, rep: int, prefetch: bool) -> None:
        """A fresh cache directory and mount: wait for the index, the cold read, then (prefetch
        on) the same series again in the same mount, and once more after a remount of the
        cache directory."""
        label = "on" if prefetch else "off"
        cache = self.workdir / f"cache-{rep}-{label}"
        facts: dict[str, Any] = {"repetition": rep, "prefetch": prefetch}
        self.details["cloudfs"].append(facts)
        try:
            mount = self.viewer_mount(cache, prefetch)
            self.in_mount(mount, rep, label, facts, partial(self.cold, mount, facts, label))
            if prefetch:
                remount = self.viewer_mount(cache, prefetch)
                self.attempt(
                    f"rep {rep} cloudfs, remounted disk cache",
                    lambda: self.in_mount(
                        remount, rep, "disk", facts, partial(self.from_disk, remount, facts)
                    ),
                )
        finally:
            shutil.rmtree(cache, ignore_errors=True)

    def viewer_mount(self, cache: Path, prefetch: bool) -> CloudfsMount:
        assert self.endpoint is not None
        flag = "--study-prefetch" if prefetch else "--no-study-prefetch"
        return CloudfsMount(self.endpoint, self.workdir / "mnt", cache, (*MOUNT_OPTIONS, flag))

    def indexed(
        self, mount: CloudfsMount, facts: dict[str, Any], label: str, started: float
    ) -> None:
        """Wait for the complete index; its time counts from the start of the mount."""
        assert self.study is not None
        facts[f"{label}_index"] = wait_indexed(mount, len(self.study.instances))
        self.record(f"cloudfs_{label}_index_s", time.perf_counter() - started)

    def timed_read(
        self, mount: CloudfsMount, facts: dict[str, Any], label: str, what: str
    ) -> SeriesRead:
        """The viewer's read of the series, page cache dropped first, checked afterwards; the
        mount's read counters during it go into ``facts``."""
        paths = [mount.mountpoint / instance.key for instance in self.series]
        self.prepare()
        before = mount_status(mount.mountpoint)
        read = read_files(paths)
        after = mount_status(mount.mountpoint)
        facts[f"{label}_cache_before"] = before["cache"]
        facts[f"{label}_reads"] = counter_change(before["reads"], after["reads"])
        facts[f"{label}_instance_ms"] = read.stalls()
        check_series(read, self.series, what)
        self.record(f"cloudfs_{label}_first_ms", read.first * 1000)
        self.record(f"cloudfs_{label}_total_s", read.total)
        return read

    def cold(self, mount: CloudfsMount, facts: dict[str, Any], label: str, started: float) -> None:
        self.indexed(mount, facts, label, started)
        self.timed_read(mount, facts, label, f"cloudfs prefetch {label}, cold")
        facts["index_after_cold"] = index_facts(mount.mountpoint)
        if label != "on":
            return
        waited = settle(mount.mountpoint)
        facts["settle_seconds"] = None if waited is None else round(waited, 2)
        self.timed_read(mount, facts, "again", "cloudfs, the same mount again")
        if not self.details.get("view_checked"):
            self.details["view_checked"] = True
            self.attempt("DICOM view check", partial(self.check_view, mount, facts))

    def from_disk(self, mount: CloudfsMount, facts: dict[str, Any], started: float) -> None:
        self.indexed(mount, facts, "disk", started)
        self.timed_read(mount, facts, "disk", "cloudfs, remounted disk cache")

    def check_view(self, mount: CloudfsMount, facts: dict[str, Any]) -> None:
        """The browse tree holds every instance once, and a few of its files hold the bytes of
        one of them (the view names files by Instance Number, so which one is not checked)."""
        assert self.study is not None
        root = mount.mountpoint / VIEW_DIR / "by-patient"
        if not root.is_dir():
            top = sorted(os.listdir(mount.mountpoint / VIEW_DIR))
            raise BenchError(f"no {root} (the view holds {top})")
        files = sorted(Path(folder) / name for folder, _, names in os.walk(root) for name in names)
        if len(files) != len(self.study.instances):
            raise BenchError(
                f"{root} holds {len(files)} files, the study {len(self.study.instances)} instances"
            )
        digests = {instance.sha256 for instance in self.study.instances}
        picks = [
            files[i * (len(files) - 1) // (VIEW_SPOT_CHECKS - 1)] for i in range(VIEW_SPOT_CHECKS)
        ]
        for path in picks:
            if hashlib.sha256(path.read_bytes()).hexdigest() not in digests:
                raise BenchError(f"{path}: bytes of no instance of the study")
        facts["view"] = {
            "files": len(files),
            "checked": len(picks),
            "example": str(files[0].relative_to(mount.mountpoint)),
        }

    # -- the run -----------------------------------------------------------------------------

    def tables(self) -> str:
        series = self.study.series_bytes() if self.study else 0
        return viewer_report.tables(self.samples, series)

    def systems(self) -> list[Callable[[int], None]]:
        return [
            self.run_boto3_single,
            self.run_boto3_parallel,
            self.run_cloudfs_prefetch,
            self.run_cloudfs_no_prefetch,
        ]

    def result(self, runtime: float) -> dict[str, Any]:
        middle = medians(self.samples)
        self.notes += self.cloudfs_notes()
        self.closing_notes()
        study = self.study
        return self.document(
            runtime,
            viewer_report.missing(self.samples),
            options={
                "series_instances": list(self.counts),
                "instance_bytes": study.series[0][0].size if study else 0,
                "series_bytes": study.series_bytes() if study else 0,
                "repeat": self.args.repeat,
                "quick": self.args.quick,
                "wan": self.details.get("wan"),
                "server": self.args.server,
                "readers": READERS,
                "mount_options": list(MOUNT_OPTIONS),
            },
            endpoint={"kind": self.endpoint.kind if self.endpoint else None},
            units={key: key.rsplit("_", 1)[1] for key in viewer_report.metric_keys()},
            medians=middle,
            ratios=viewer_report.ratios(middle),
            targets=viewer_report.verdicts(middle),
        )

    def cloudfs_notes(self) -> list[str]:
        """What cloudfs's own counters say about each read, run by run."""
        notes = []
        runs: list[dict[str, Any]] = self.details["cloudfs"]
        ra = {facts["read_ahead_kb"] for facts in runs if facts.get("read_ahead_kb")}
        if ra:
            notes.append(f"read_ahead_kb of the cloudfs mounts: {', '.join(map(str, sorted(ra)))}.")

        def each(label: str) -> list[dict[str, Any]]:
            return [facts for facts in runs if f"{label}_reads" in facts]

        for label, what in (("on", "prefetch on"), ("off", "prefetch off")):
            mine = each(label)
            if not mine:
                continue
            reads = [facts[f"{label}_reads"] for facts in mine]
            notes.append(
                f"Cold read, {what}: {', '.join(str(r['requests']) for r in reads)} GETs and "
                f"{', '.join(format_size(r['bytes_fetched']) for r in reads)} fetched while the "
                f"viewer read the series"
                + (" (study prefetch of the other series included)." if label == "on" else ".")
            )
            blocks = [facts[f"{label}_cache_before"].get("blocks", 0) for facts in mine]
            if any(blocks):
                notes.append(
                    f"**Cold read, {what}: the block cache held {', '.join(map(str, blocks))} "
                    f"blocks once indexing was done**, so the read did not start on an empty cache."
                )
            index = mine[-1].get(f"{label}_index")
            if index:
                notes.append(
                    f"Index before the cold read, {what}: {index['dicom']} DICOM instances, "
                    f"{index['headers_read']} headers read ({format_size(index['header_bytes'])}), "
                    f"{index['read_failures']} failed reads."
                )
        stalls = [("boto3, 1 reader", [run["instance_ms"] for run in self.details["boto3"]])]
        for label, what in (
            ("on", "cloudfs cold, prefetch on"),
            ("off", "cloudfs cold, prefetch off"),
            ("disk", "cloudfs, disk cache"),
        ):
            stalls.append((what, [facts[f"{label}_instance_ms"] for facts in each(label)]))

        def spread(run: dict[str, float]) -> str:
            return f"{run['p50']:.1f}/{run['p90']:.1f}/{run['max']:.0f}"

        shown = [f"{what} {', '.join(map(spread, runs))}" for what, runs in stalls if runs]
        if shown:
            notes.append(
                "Time per instance (open to close) in ms, p50/p90/slowest, run by run: "
                + "; ".join(shown)
                + "."
            )
        prefetched = [facts["index_after_cold"] for facts in each("on")]
        if prefetched:
            counts = ", ".join(str(facts["studies_prefetched"]) for facts in prefetched)
            notes.append(f"Studies prefetched to the end when the cold read finished: {counts}.")
        if any(facts.get("settle_seconds", 0) is None for facts in each("again")):
            notes.append(
                f"Study prefetch was still busy {PREFETCH_SETTLE:.0f}s after a cold read; the "
                f"read of the same mount again ran beside it."
            )
        for label, what in (("again", "the same mount again"), ("disk", "remounted")):
            reads = [facts[f"{label}_reads"] for facts in each(label)]
            if reads:
                hits = ", ".join(
                    f"{r['disk_hits']} disk / {r['memory_hits']} memory" for r in reads
                )
                fetched = ", ".join(format_size(r["bytes_fetched"]) for r in reads)
                notes.append(
                    f"Warm read, {what}: block cache hits {hits}; fetched from the endpoint: "
                    f"{fetched}."
                )
        view = [facts["view"] for facts in runs if "view" in facts]
        if view:
            notes.append(
                f"DICOM view: `{VIEW_DIR}/by-patient` lists {view[0]['files']} files, one per "
                f"instance; {view[0]['checked']} read back with the bytes of an instance "
                f"(e.g. `{view[0]['example']}`)."
            )
        return notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not needs_root("drop_caches, FUSE mounts"):
        return 2
    return publish(ViewerBench(args), viewer_report.workload, viewer_report.PAGE_HEAD)
