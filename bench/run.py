"""Command line and the order of a run: set up, measure each system per repetition, report.

Per repetition the four systems (local disk, raw boto3, the no-op FUSE filesystem, cloudfs) run in
an order rotated by one each time, so slow drift of the machine (other load, writeback, memory
first touch) spreads over all of them instead of always hitting the same one.

cloudfs runs in five mounts per repetition, because each figure needs a different cache state:

1. a fresh cache directory: random 64 KiB reads, cold;
2. another fresh cache directory: the cold sequential read, then the warm re-read through the same
   mount (page cache), then a full comparison of the bytes;
3. the cache directory of 2, remounted after dropping the page cache: the first read served by
   the disk block cache, bounded by the disk under it;
4. the same, remounted without dropping the page cache: the first read through the mount again,
   the cache's files still in memory, which is cloudfs's own cost per cached byte (the figure to
   set beside the no-op FUSE ceiling);
5. the same again: random 64 KiB reads served by the disk block cache.

Before anything that reads from the endpoint, the server's own copy of the object is read once so
the endpoint serves it from memory in every measurement (the drops in 3 and 4 would otherwise make
it alternate between disk and memory).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from cloudfs.config import format_size, parse_size

from . import measure, report
from .data import generate, write_file
from .mounts import CloudfsMount, MemfsMount
from .servers import REPO, Endpoint, Process, check_conformance, start_moto, start_s3rver, upload
from .system import (
    BenchError,
    drop_page_cache,
    free_port,
    machine,
    needs_root,
    port_open,
    read_ahead_kb,
    set_read_ahead_kb,
    timed_dd,
    verify_file,
    wait_for,
)

QUICK_SIZE = 64 * 2**20
MEMORY_TOUCH_PIECE = 256 * 2**20


class Mount(Protocol):
    mountpoint: Path

    def mount(self) -> None: ...

    def unmount(self) -> None: ...


def parse_common(
    parser: argparse.ArgumentParser, argv: list[str] | None, *, page: str, quick: str, workdir: str
) -> argparse.Namespace:
    """Add the options every benchmark takes, parse ``argv`` and apply what ``--quick`` means to
    them (one repetition, no docs page, no memory pre-touch); the caller adds its own options
    before and applies ``--quick`` to them after.  ``page`` is the docs page a run rewrites,
    ``quick`` the workload of a quick run, ``workdir`` what else goes into the scratch directory."""
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (default: 3)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"harness check for CI: {quick}, one repetition, no docs page; fails if any figure "
        "is missing, never on speed",
    )
    parser.add_argument("--server", choices=("s3rver", "moto"), default="s3rver")
    parser.add_argument(
        "--wan", action="store_true", help="put a proxy with latency and a bandwidth cap in front"
    )
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="WAN round trip (default: 20)")
    parser.add_argument(
        "--bandwidth",
        default="50M",
        help="WAN cap per connection (each way, where the benchmark uploads), bytes/s "
        "(default: 50M)",
    )
    parser.add_argument(
        "--prefault",
        default=None,
        help="memory to touch once before measuring (default: 8G, capped at half the available "
        "memory; 0 with --quick); see bench/README.md",
    )
    parser.add_argument(
        "--workdir", type=Path, help=f"scratch directory{workdir} (default: /var/tmp)"
    )
    parser.add_argument("--no-docs", action="store_true", help=f"do not rewrite docs/{page}")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat, args.no_docs = 1, True
        args.prefault = args.prefault or "0"
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="cloudfs read-path benchmark: the S3 endpoint's limits, cloudfs on it, the "
        "Python FUSE ceiling and the local disk, in one run (see bench/README.md).",
    )
    parser.add_argument("--size", default="1G", help="object size (default: 1G)")
    parser.add_argument(
        "--random-reads", type=int, default=200, help="64 KiB reads per random run (default: 200)"
    )
    args = parse_common(
        parser,
        argv,
        page="benchmarks-read.md (benchmarks-wan.md with --wan)",
        quick="64 MiB",
        workdir=" on the disk to measure",
    )
    if args.quick:
        args.size = str(QUICK_SIZE)
    args.size_bytes = parse_size(args.size)
    if args.size_bytes < 16 * 2**20:
        parser.error("--size must be at least 16M")
    return args


class Bench:
    """One run of a benchmark: its samples, notes and errors, the mounts and processes to undo on
    the way out, and the steps every benchmark takes (memory pre-touch, the endpoint, the WAN
    proxy, systems in rotating order, the result document).  The read benchmark is this class;
    the others build on it."""

    pace_uploads = False
    """Whether the WAN proxy paces request bodies too (a benchmark that uploads)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.size: int = args.size_bytes
        self.key = f"bench-{format_size(self.size).replace(' ', '').replace('.0', '')}.bin"
        self.samples: dict[str, list[float]] = {m.key: [] for m in report.METRICS}
        self.errors: list[str] = []
        self.notes: list[str] = []
        self.details: dict[str, Any] = {"cloudfs": [], "memfs_default_read_ahead_kb": None}
        self.live: list[Mount] = []
        self.processes: list[Process] = []
        self.workdir = Path(
            tempfile.mkdtemp(prefix="cloudfs-bench-", dir=args.workdir or "/var/tmp")
        )
        self.expected = bytearray()
        self.endpoint: Endpoint | None = None
        self.client: Any = None

    # -- bookkeeping -------------------------------------------------------------------------

    def say(self, message: str) -> None:
        print(f"bench: {message}", file=sys.stderr, flush=True)

    def attempt(self, name: str, action: Callable[[], None]) -> bool:
        """Run one measurement; a failure is recorded and the run goes on."""
        try:
            action()
            return True
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.errors.append(f"{name}: {first}")
            self.say(f"FAILED {name}: {exc}")
            return False

    def record(self, key: str, value: float) -> None:
        self.samples[key].append(value)

    @contextlib.contextmanager
    def mounted(self, mount: Mount) -> Iterator[Mount]:
        self.live.append(mount)
        try:
            mount.mount()
            yield mount
        finally:
            try:
                mount.unmount()
            except Exception as exc:
                self.errors.append(f"unmount {mount.mountpoint}: {str(exc).splitlines()[0]}")
                self.say(f"FAILED unmount {mount.mountpoint}: {exc}")
            finally:
                self.live.remove(mount)

    def cleanup(self) -> None:
        for mount in reversed(self.live):
            with contextlib.suppress(Exception):
                mount.unmount()
        self.live.clear()
        for process in reversed(self.processes):
            with contextlib.suppress(Exception):
                process.stop()
        self.processes.clear()

    # -- setup -------------------------------------------------------------------------------

    def prefault(self) -> None:
        """Touch memory once so first-touch costs of a VM's memory do not land in a figure."""
        wanted = self.args.prefault
        if wanted is None:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            amount = min(8 * 2**30, available // 2)
        else:
            amount = parse_size(wanted)
        if amount <= 0:
            return
        start = time.perf_counter()
        pieces = []
        for _ in range(amount // MEMORY_TOUCH_PIECE):
            piece = bytearray(MEMORY_TOUCH_PIECE)
            piece[::4096] = b"\1" * (MEMORY_TOUCH_PIECE // 4096)
            pieces.append(piece)
        del pieces
        seconds = time.perf_counter() - start
        self.details["prefault"] = {"bytes": amount, "seconds": round(seconds, 2)}
        self.say(f"touched {format_size(amount)} of memory in {seconds:.1f}s")

    def setup(self) -> None:
        self.say(f"scratch directory {self.workdir}")
        self.prefault()
        self.expected = generate(self.size)
        self.local_file = self.workdir / "local.bin"
        write_file(self.local_file, self.expected)
        self.endpoint = self.start_server()
        started = time.perf_counter()
        etag = upload(self.endpoint, self.key, self.local_file, self.size)
        self.say(f"uploaded {self.key} in {time.perf_counter() - started:.1f}s (ETag {etag})")
        facts = check_conformance(self.endpoint, self.key, etag, bytes(self.expected))
        self.details["endpoint_conformance"] = facts
        self.notes.append(f"Endpoint: Range on GET {facts['range']}.")
        self.notes.append(f"Endpoint: If-Match on GET {facts['if_match']}.")
        if self.args.wan:
            self.start_wan_proxy(self.endpoint)
        self.client = self.endpoint.client(pool=measure.PARALLEL_THREADS * 2)

    def start_server(self) -> Endpoint:
        if self.args.server == "s3rver":
            try:
                process, endpoint = start_s3rver(self.workdir)
                self.processes.append(process)
                self.say(f"{endpoint.kind} at {endpoint.url}")
                return endpoint
            except BenchError as exc:
                self.say(f"s3rver unusable ({exc}); FALLING BACK TO moto_server")
                self.notes.append(f"s3rver could not be used: {str(exc).splitlines()[0]}")
        process, endpoint = start_moto(self.workdir)
        self.processes.append(process)
        for note in endpoint.notes:
            self.say("!" * 20 + " " + note)
            self.notes.append(f"**{note}**")
        return endpoint

    def start_wan_proxy(self, endpoint: Endpoint) -> None:
        port = free_port()
        target = endpoint.direct_url.rsplit(":", 1)[1]
        bandwidth = parse_size(self.args.bandwidth)
        command = [sys.executable, "-m", "bench.wanproxy", "--listen", str(port)]
        command += ["--target", target, "--rtt-ms", str(self.args.rtt_ms)]
        command += ["--bandwidth", str(bandwidth)]
        if self.pace_uploads:
            command += ["--upload-bandwidth", str(bandwidth)]
        process = Process("wanproxy", command, self.workdir / "wanproxy.log")
        self.processes.append(process)
        wait_for(lambda: port_open(port), 30, "the WAN proxy")
        endpoint.url = f"http://127.0.0.1:{port}"
        wan = f"{self.args.rtt_ms:g} ms per request, {format_size(bandwidth)}/s per connection"
        if self.pace_uploads:
            wan += " each way"
        self.details["wan"] = wan
        self.notes.append(f"WAN proxy in front of the endpoint: {wan}.")

    def warm_server_copy(self) -> None:
        """Read the server's file of the object, so the endpoint serves it from memory."""
        assert self.endpoint is not None
        path = self.endpoint.object_file(self.key)
        if path is not None:
            timed_dd(path, self.size)

    # -- the systems -------------------------------------------------------------------------

    def run_local(self, rep: int) -> None:
        def local() -> None:
            if not drop_page_cache():
                raise BenchError("cannot drop the page cache (not root)")
            self.record(
                "local_cold", measure.mb_per_s(self.size, timed_dd(self.local_file, self.size))
            )
            self.record(
                "local_warm", measure.mb_per_s(self.size, timed_dd(self.local_file, self.size))
            )

        self.attempt(f"rep {rep} local disk", local)

    def run_boto3(self, rep: int) -> None:
        def single() -> None:
            self.warm_server_copy()
            self.record("boto3_single", measure.boto3_single(self.client, self.key, self.size))

        def parallel() -> None:
            self.warm_server_copy()
            self.record("boto3_parallel", measure.boto3_parallel(self.client, self.key, self.size))

        def blocks() -> None:
            self.warm_server_copy()
            offsets = measure.random_offsets(self.size, self.args.random_reads, seed=rep)
            latencies = measure.boto3_block_latency(self.client, self.key, self.size, offsets)
            self.record("boto3_block_p50", measure.percentile(latencies, 0.50))
            self.record("boto3_block_p99", measure.percentile(latencies, 0.99))

        self.attempt(f"rep {rep} boto3 single stream", single)
        self.attempt(f"rep {rep} boto3 parallel", parallel)
        self.attempt(f"rep {rep} boto3 1 MiB ranged GETs", blocks)

    def run_memfs(self, rep: int) -> None:
        memfs = MemfsMount(
            self.workdir / "memfs", self.size, self.workdir / "memfs.log", "data.bin"
        )

        def ceiling() -> None:
            with self.mounted(memfs):
                default = read_ahead_kb(memfs.mountpoint)
                self.details["memfs_default_read_ahead_kb"] = default
                for kilobytes in (128, 1024):
                    set_read_ahead_kb(memfs.mountpoint, kilobytes)
                    seconds = timed_dd(memfs.file, self.size)
                    self.record(f"memfs_{kilobytes}", measure.mb_per_s(self.size, seconds))

        self.attempt(f"rep {rep} no-op FUSE ceiling", ceiling)

    def cloudfs(self, cache_dir: Path) -> CloudfsMount:
        assert self.endpoint is not None
        return CloudfsMount(self.endpoint, self.workdir / "mnt", cache_dir)

    def run_cloudfs(self, rep: int) -> None:
        offsets = measure.random_offsets(self.size, self.args.random_reads, seed=rep)
        cold_cache = self.workdir / f"cache-{rep}-random"
        cache = self.workdir / f"cache-{rep}"
        facts: dict[str, Any] = {"repetition": rep}
        self.details["cloudfs"].append(facts)

        def random_reads(label: str, directory: Path) -> None:
            """Random 64 KiB reads through a mount of ``directory``: cold (an empty cache, the
            server's copy warm) or from the disk cache (the page cache dropped first)."""
            if label == "random_cold":
                os.sync()
                self.warm_server_copy()
            elif not drop_page_cache():
                raise BenchError("cannot drop the page cache (not root)")
            mount = self.cloudfs(directory)
            try:
                with self.mounted(mount):
                    latencies = measure.random_reads(self.file(mount), offsets, self.expected)
                    facts[f"{label}_status"] = mount.status()["reads"]
            except Exception as exc:
                raise BenchError(f"{exc}\n{mount.log_tail()}") from exc
            self.record(f"cloudfs_{label}_p50", measure.percentile(latencies, 0.50))
            self.record(f"cloudfs_{label}_p99", measure.percentile(latencies, 0.99))
            self.check_log(mount, facts, label)

        def sequential() -> None:
            os.sync()
            self.warm_server_copy()
            mount = self.cloudfs(cache)
            try:
                with self.mounted(mount):
                    facts["read_ahead_kb"] = read_ahead_kb(mount.mountpoint)
                    cold = timed_dd(self.file(mount), self.size)
                    facts["cold_status"] = mount.status()["reads"]
                    warm = timed_dd(self.file(mount), self.size)
                    verify_file(self.file(mount), self.expected)
            except Exception as exc:
                raise BenchError(f"{exc}\n{mount.log_tail()}") from exc
            self.record("cloudfs_cold_seq", measure.mb_per_s(self.size, cold))
            self.record("cloudfs_warm_seq", measure.mb_per_s(self.size, warm))
            self.check_log(mount, facts, "sequential")

        def cached() -> None:
            if not drop_page_cache():
                raise BenchError("cannot drop the page cache (not root)")
            mount = self.cloudfs(cache)
            try:
                with self.mounted(mount):
                    seconds = timed_dd(self.file(mount), self.size)
                    status = mount.status()["reads"]
                    facts["cached_status"] = status
                    verify_file(self.file(mount), self.expected)
            except Exception as exc:
                raise BenchError(f"{exc}\n{mount.log_tail()}") from exc
            self.record("cloudfs_cached_seq", measure.mb_per_s(self.size, seconds))
            if status.get("bytes_fetched"):
                self.notes.append(
                    f"Repetition {rep}: the read from a full disk cache still fetched "
                    f"{format_size(status['bytes_fetched'])} from the endpoint."
                )
            self.check_log(mount, facts, "cached")
            # Unmounting drops the mount's own pages; the cache's files stay in the page cache.
            mount = self.cloudfs(cache)
            try:
                with self.mounted(mount):
                    seconds = timed_dd(self.file(mount), self.size)
            except Exception as exc:
                raise BenchError(f"{exc}\n{mount.log_tail()}") from exc
            self.record("cloudfs_cached_hot_seq", measure.mb_per_s(self.size, seconds))
            self.check_log(mount, facts, "cached, files in the page cache")

        self.attempt(
            f"rep {rep} cloudfs random cold", lambda: random_reads("random_cold", cold_cache)
        )
        shutil.rmtree(cold_cache, ignore_errors=True)
        if self.attempt(f"rep {rep} cloudfs sequential cold/warm", sequential):
            self.attempt(f"rep {rep} cloudfs cached first read", cached)
            self.attempt(
                f"rep {rep} cloudfs random from disk cache",
                lambda: random_reads("random_warm", cache),
            )
        shutil.rmtree(cache, ignore_errors=True)

    def file(self, mount: CloudfsMount) -> Path:
        return mount.mountpoint / self.key

    def check_log(self, mount: CloudfsMount, facts: dict[str, Any], phase: str) -> None:
        problems = mount.log_problems()
        if problems:
            facts[f"{phase}_log_problems"] = problems[-20:]
            self.notes.append(
                f"cloudfs logged {len(problems)} warnings/errors during {phase} "
                f"(see the JSON); last: {problems[-1]}"
            )

    # -- the run -----------------------------------------------------------------------------

    def tables(self) -> str:
        """The Markdown tables of the samples so far."""
        return report.tables(self.samples)

    def systems(self) -> list[Callable[[int], None]]:
        """What one repetition measures, each ``run_<name>(repetition)``."""
        return [self.run_local, self.run_boto3, self.run_memfs, self.run_cloudfs]

    def measure(self) -> None:
        systems = self.systems()
        for rep in range(self.args.repeat):
            turn = rep % len(systems)
            for system in systems[turn:] + systems[:turn]:
                self.say(f"repetition {rep + 1}/{self.args.repeat}: {system.__name__[4:]}")
                system(rep)

    def prefault_note(self) -> None:
        if "prefault" in self.details:
            touch = self.details["prefault"]
            self.notes.append(
                f"{format_size(touch['bytes'])} of memory was touched once before measuring "
                f"({touch['seconds']}s): on a VM whose memory is backed on first touch, the first "
                f"use of never-used pages runs at that backing speed, not the system's."
            )

    def document(self, runtime: float, missing: list[str], **figures: Any) -> dict[str, Any]:
        """The result as bench/results/*.json keeps it: when, what and where it ran, then
        ``figures`` (options, endpoint, units, medians, ...), then every sample and what went
        wrong."""
        return {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": command_line(),
            "machine": machine(),
            **figures,
            "samples": self.samples,
            "details": self.details,
            "notes": self.notes,
            "errors": self.errors,
            "missing": missing,
            "runtime_seconds": round(runtime, 1),
        }

    def result(self, runtime: float) -> dict[str, Any]:
        middle = report.medians(self.samples)
        if self.details.get("memfs_default_read_ahead_kb") not in (None, 128):
            self.notes.append(
                f"The kernel's default read_ahead_kb of a new FUSE mount here is "
                f"{self.details['memfs_default_read_ahead_kb']}, not 128."
            )
        ra = {facts.get("read_ahead_kb") for facts in self.details["cloudfs"]} - {None}
        if ra:
            self.notes.append(f"read_ahead_kb of the cloudfs mount: {', '.join(map(str, ra))}.")
        gets = [f["cold_status"]["requests"] for f in self.details["cloudfs"] if "cold_status" in f]
        if gets:
            self.notes.append(
                f"GETs cloudfs issued for one cold sequential read: {', '.join(map(str, gets))} "
                f"(the object is {self.size // 2**20} MiB; 8 MiB ranges would be "
                f"{-(-self.size // (8 * 2**20))})."
            )
        self.prefault_note()
        return self.document(
            runtime,
            report.missing(self.samples),
            options={
                "size_bytes": self.size,
                "repeat": self.args.repeat,
                "quick": self.args.quick,
                "random_reads": self.args.random_reads,
                "wan": self.details.get("wan"),
                "server": self.args.server,
            },
            endpoint={
                "kind": self.endpoint.kind if self.endpoint else None,
                "conformance": self.details.get("endpoint_conformance"),
            },
            units={m.key: m.unit.replace("GB/s", "MB/s") for m in report.METRICS},
            medians=middle,
            ratios=report.ratios(middle),
        )


def command_line() -> str:
    """How the run was started, with the interpreter relative to the checkout when inside it."""
    python = (
        os.path.relpath(sys.executable, REPO)
        if sys.executable.startswith(str(REPO))
        else sys.executable
    )
    return " ".join([python, "-m", "bench", *sys.argv[1:]])


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def execute(bench: Bench) -> tuple[dict[str, Any], str, bool]:
    """Set up, measure and clean up ``bench`` (Ctrl-C and SIGTERM stop it cleanly), then print
    its tables and notes.  Returns the result, the tables and whether it was stopped."""
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.perf_counter()
    interrupted = False
    try:
        bench.setup()
        bench.measure()
    except KeyboardInterrupt:
        interrupted = True
        bench.say("interrupted: cleaning up")
    except Exception as exc:
        bench.errors.append(f"setup: {str(exc).splitlines()[0]}")
        bench.say(f"FAILED: {exc}")
    finally:
        bench.cleanup()
    result = bench.result(time.perf_counter() - started)
    table = bench.tables()
    print(table)
    for note in result["notes"]:
        print(f"- {note}")
    return result, table, interrupted


def conclude(bench: Bench, result: dict[str, Any], interrupted: bool, name: str) -> int:
    """The exit status; the scratch directory is kept, with its logs, when anything failed."""
    if result["errors"] or result["missing"] or interrupted:
        bench.say(f"kept the scratch directory with the logs: {bench.workdir}")
        for error in result["errors"]:
            bench.say(f"error: {error}")
        if result["missing"]:
            bench.say(f"missing figures: {', '.join(result['missing'])}")
        return 130 if interrupted else 1
    shutil.rmtree(bench.workdir, ignore_errors=True)
    bench.say(f"done in {result['runtime_seconds']:.0f}s; results in bench/results/{name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not needs_root("drop_caches, read_ahead_kb, FUSE mounts"):
        return 2
    bench = Bench(args)
    result, table, interrupted = execute(bench)
    name = "quick.json" if args.quick else "latest.json"
    report.write_json(REPO / "bench" / "results" / name, result)
    if not (args.no_docs or interrupted or result["missing"]):
        page = "benchmarks-wan.md" if args.wan else "benchmarks-read.md"
        (REPO / "docs" / page).write_text(report.markdown_page(result, table))
    return conclude(bench, result, interrupted, name)
