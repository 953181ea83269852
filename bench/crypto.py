"""The encryption benchmark, ``python -m bench crypto``: what a cache key costs, end to end.

With ``--cache-key-file``, cloudfs seals what it keeps on the cache disk: cached blocks
(AES-256-GCM), staged writes (AES-GCM chunks) and the catalog with its journal (SQLCipher).  This
benchmark mounts cloudfs twice for every workload, without and with a key, with otherwise
identical options, on the same endpoint and the same bytes, and reports both figures and their
ratio.  Per repetition each workload runs plain then encrypted, or encrypted then plain, the order
alternating between repetitions, so drift of the machine spreads over both.

The workloads, each on a fresh cache directory:

* reads of the large object: the cold sequential read (``dd bs=1M``); after an unmount and a
  drop of the page cache, the first read from the disk block cache, where every byte is
  decrypted; after another, 64 KiB ``pread``s at random offsets (the read benchmark's pattern);
* a write of the large file with ``dd bs=1M conv=fsync`` (acknowledged once in staging), then
  the wait until the bucket has it;
* the PACS ingest of the write benchmark (``bench/write_measure.py``), then the wait until the
  bucket has every file;
* a bucket of many small objects: the first mount (which lists them into the catalog), then,
  after a remount, ``ls -l`` of their directory (``os.scandir`` and a ``stat`` of each entry)
  once with the catalog read from disk, then warm.

Beside them, the machine's raw AES-GCM speed on 1 MiB buffers (``cryptography``, one thread),
the limit a decrypting read cannot pass.  After each workload the run looks at what the mount
left on disk (the catalog's header, the staged file's header, plaintext in cached blocks), so the
page says what the key actually covered in the version measured.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import struct
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cloudfs.config import format_size, parse_size
from cloudfs.crypto import KEY_ENVIRONMENT

from . import crypto_report, measure
from . import write_measure as wm
from .common import TrackedBench, publish
from .crypto_report import VARIANTS
from .data import BLOCK, generate, write_file
from .mounts import CACHE_SIZE, CloudfsMount
from .report import medians, missing
from .run import parse_common
from .servers import BUCKET, Endpoint, upload
from .suite import TREE_DIR, SeedWriter, keys_in, tree_items
from .system import BenchError, drop_page_cache, needs_root, timed_dd, verify_file
from .viewer import mount_status

QUICK_SIZE = 64 * 2**20
QUICK_FILES = 100
ENTRIES = 10_000
QUICK_ENTRIES = 2_000
TREE_BUCKET = "bench-crypto-tree"
"""The listing's objects have a bucket of their own, so the other mounts do not list them."""
MOUNT_OPTIONS = (
    "--cache-size",
    CACHE_SIZE,
    "--no-dicom-index",
    "--no-study-prefetch",
    "--upload-delay",
    "0",
    "--drain-timeout",
    "5",
)
"""Every mount, plain or encrypted; the encrypted ones add ``--cache-key-file``.  No DICOM index
and no study prefetch: nothing here is DICOM, and neither must read in the background while a
figure is taken.  ``--upload-delay 0``: uploads start as each file closes, so the ingest pays
for reading its sealed staging files back while it writes; ``--drain-timeout 5``: an unmount
after failed uploads does not wait long."""
WARM_LISTINGS = 3
"""Warm listings per repetition, each after dropping the kernel's caches."""
SEAL_MAGIC = b"CFSSEAL1"
"""How a sealed staging file starts (``cloudfs/staging.py``)."""
SQLITE_MAGIC = b"SQLite format 3\0"
"""How a plain SQLite database starts; a SQLCipher one starts with random bytes."""
AESGCM_MIN_BUFFERS = 256
"""At least 256 MiB each way, so a quick run's limit is not a few milliseconds of timing."""
PROBED_BLOCKS = 8
"""Cached block files searched for plaintext of the object, biggest first."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench crypto",
        description="cloudfs encryption-at-rest benchmark: reads, writes, a PACS ingest and a "
        "listing through cloudfs mounted without and with a cache key, beside the machine's raw "
        "AES-GCM speed, in one run (see bench/README.md).",
    )
    parser.add_argument("--size", default="1G", help="large object size (default: 1G)")
    parser.add_argument(
        "--random-reads", type=int, default=200, help="64 KiB reads per random run (default: 200)"
    )
    parser.add_argument("--files", type=int, default=1000, help="ingest files (default: 1000)")
    parser.add_argument("--file-size", default="512K", help="ingest file size (default: 512K)")
    parser.add_argument(
        "--entries",
        type=int,
        default=ENTRIES,
        help=f"objects in the listed directory (default: {ENTRIES})",
    )
    args = parse_common(
        parser,
        argv,
        page="benchmarks-crypto.md",
        quick=f"64 MiB, {QUICK_FILES} files, {QUICK_ENTRIES} objects",
        workdir=" on the disk to measure; cloudfs's cache directories go there too",
    )
    if args.quick:
        args.size, args.files, args.entries = str(QUICK_SIZE), QUICK_FILES, QUICK_ENTRIES
    args.size_bytes = parse_size(args.size)
    args.file_size_bytes = parse_size(args.file_size)
    if args.size_bytes < 16 * 2**20:
        parser.error("--size must be at least 16M")
    if min(args.files, args.file_size_bytes, args.entries, args.random_reads) < 1:
        parser.error("--files, --file-size, --entries and --random-reads must be positive")
    return args


class VariantMount(CloudfsMount):
    """A mount of ``bucket`` with ``MOUNT_OPTIONS``, and the key file when given.  The key's
    environment variable is never passed on: a plain mount must be plain, whatever the
    environment of the run holds."""

    def __init__(
        self,
        endpoint: Endpoint,
        mountpoint: Path,
        cache_dir: Path,
        bucket: str,
        key_file: Path | None,
    ) -> None:
        key = ("--cache-key-file", str(key_file)) if key_file is not None else ()
        super().__init__(endpoint, mountpoint, cache_dir, (*MOUNT_OPTIONS, *key))
        self.bucket = bucket

    def env(self) -> dict[str, str]:
        env = super().env()
        env.pop(KEY_ENVIRONMENT, None)
        return env

    def command(self) -> list[str]:
        return [
            f"s3://{self.bucket}" if part == f"s3://{BUCKET}" else part
            for part in super().command()
        ]


# -- the measurements ----------------------------------------------------------------------------


def aesgcm_speed(total: int) -> tuple[float, float]:
    """MB/s of sealing ``total`` bytes in 1 MiB buffers with AES-256-GCM, one thread, and of
    opening them again: a fresh nonce per buffer and a short associated datum, as a cached
    block is sealed."""
    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    payload = os.urandom(BLOCK)
    identity = b"bench-1G.bin\0etag\0" + bytes(8)
    count = max(total // BLOCK, AESGCM_MIN_BUFFERS)
    nonces = [secrets.token_bytes(12) for _ in range(count)]
    start = time.perf_counter()
    for nonce in nonces:
        sealed = aead.encrypt(nonce, payload, identity)
    sealing = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(count):
        opened = aead.decrypt(nonces[-1], sealed, identity)
    opening = time.perf_counter() - start
    if opened != payload:
        raise BenchError("AES-GCM: the opened buffer differs from the sealed one")
    return measure.mb_per_s(count * BLOCK, sealing), measure.mb_per_s(count * BLOCK, opening)


def timed_listing(directory: Path, expected: int) -> float:
    """Seconds of ``ls -l`` done in Python: ``os.scandir`` and an ``lstat`` of every entry."""
    start = time.perf_counter()
    count = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            entry.stat(follow_symlinks=False)
            count += 1
    seconds = time.perf_counter() - start
    if count != expected:
        raise BenchError(f"{directory}: {count} entries listed, expected {expected}")
    return seconds


def at_rest(cache: Path, expected_blocks: int) -> dict[str, str]:
    """What a cache directory holds in the clear, after its daemon exited: whether the catalog
    is a plain SQLite file, and whether cached blocks carry the object's plaintext (each 1 MiB
    block of the benchmark's bytes starts with its index and seed, ``bench/data.py``)."""
    found: dict[str, str] = {}
    catalog = cache / "catalog.sqlite"
    if catalog.exists():
        with open(catalog, "rb") as handle:
            plain = handle.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
        found["catalog"] = "plain SQLite" if plain else "encrypted (no SQLite header)"
    blocks = sorted(
        (path for path in (cache / "blocks").rglob("*") if path.is_file()),
        key=lambda path: path.stat().st_size,
        reverse=True,
    )[:PROBED_BLOCKS]
    if blocks and expected_blocks:
        stamps = {struct.pack("<QQ", index, 1) for index in range(expected_blocks)}
        seen = 0
        for path in blocks:
            head = path.read_bytes()[: 2 * BLOCK]
            for match in re.finditer(re.escape(struct.pack("<Q", 1)), head):
                if head[max(match.start() - 8, 0) : match.end()] in stamps:
                    seen += 1
                    break
        found["blocks"] = (
            f"plaintext of the object in {seen} of the {len(blocks)} largest block files"
            if seen
            else f"no plaintext of the object in the {len(blocks)} largest block files"
        )
    return found


def staged_header(cache: Path) -> str:
    """How the largest file in the staging area starts: sealed, plain, or none left."""
    staged = [path for path in (cache / "staging").rglob("*") if path.is_file()]
    staged = [path for path in staged if path.stat().st_size > 0]
    if not staged:
        return "no staged file left to look at (uploaded already)"
    biggest = max(staged, key=lambda path: path.stat().st_size)
    with open(biggest, "rb") as handle:
        sealed = handle.read(len(SEAL_MAGIC)) == SEAL_MAGIC
    return "sealed (starts with CFSSEAL1)" if sealed else "plain (no CFSSEAL1 header)"


# -- the benchmark -------------------------------------------------------------------------------


class CryptoBench(TrackedBench):
    """The shared bookkeeping (steps that fail without stopping the run, mounts undone on the way
    out, child processes, memory pre-touch, the commit and the daemon's log) with the plain and
    encrypted workloads."""

    kind = "crypto"
    pace_uploads = True

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.samples = {key: [] for key in crypto_report.metric_keys()}
        self.details = {"cloudfs": [], "at_rest": {}}
        self.files: int = args.files
        self.file_size: int = args.file_size_bytes
        self.entries: int = args.entries
        self.payload = bytearray()
        self.key_file = self.workdir / "cache.key"
        self.direct: Any = None

    # -- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        self.start()
        self.expected = generate(self.size)
        self.local_file = self.workdir / "source.bin"
        write_file(self.local_file, self.expected)
        self.payload = generate(self.files * self.file_size, seed=2)
        self.key_file.write_text(secrets.token_hex(32) + "\n")
        self.key_file.chmod(0o600)
        self.endpoint = self.start_server()
        started = time.perf_counter()
        upload(self.endpoint, self.key, self.local_file, self.size)
        self.direct = self.endpoint.client(direct=True, pool=16)
        self.seed_tree()
        self.say(f"uploaded and seeded in {time.perf_counter() - started:.1f}s")
        if self.args.wan:
            self.start_wan_proxy(self.endpoint)

    def seed_tree(self) -> None:
        """The listing's objects, written the way the comparison suite writes its tree."""
        assert self.endpoint is not None
        writer = SeedWriter(self.endpoint)
        writer.bucket(TREE_BUCKET)
        writer.put_many(TREE_BUCKET, tree_items(self.entries))
        listed = keys_in(self.direct, TREE_BUCKET, f"{TREE_DIR}/")
        count = len([key for key in listed if not key.endswith("/")])
        if count != self.entries:
            raise BenchError(f"the seeded directory lists {count} keys, not {self.entries}")

    def mount_of(self, variant: str, cache: Path, bucket: str = BUCKET) -> VariantMount:
        assert self.endpoint is not None
        key_file = self.key_file if variant == "encrypted" else None
        return VariantMount(self.endpoint, self.workdir / "mnt", cache, bucket, key_file)

    def facts_of(self, rep: int, variant: str, workload: str) -> dict[str, Any]:
        facts: dict[str, Any] = {"repetition": rep, "variant": variant, "workload": workload}
        self.details["cloudfs"].append(facts)
        return facts

    def note_at_rest(self, variant: str, found: dict[str, str]) -> None:
        """What a variant's mounts left on disk, as the first repetition found it."""
        kept = self.details["at_rest"].setdefault(variant, {})
        for name, text in found.items():
            kept.setdefault(name, text)

    def drop(self) -> None:
        if not drop_page_cache():
            raise BenchError("cannot drop the page cache (not root)")

    # -- the workloads -----------------------------------------------------------------------

    def run_aesgcm(self, rep: int) -> None:
        def limit() -> None:
            seal, open_ = aesgcm_speed(self.size)
            self.record("aesgcm_seal", seal)
            self.record("aesgcm_open", open_)

        self.attempt(f"rep {rep} AES-GCM", limit)

    def reads(self, rep: int, variant: str) -> None:
        """Cold, then from the disk cache twice (sequential, random), one cache directory."""
        cache = self.workdir / f"cache-{rep}-{variant}-read"
        facts = self.facts_of(rep, variant, "read")
        offsets = measure.random_offsets(self.size, self.args.random_reads, seed=rep)
        path = self.workdir / "mnt" / self.key

        def cold(_: float) -> None:
            seconds = timed_dd(path, self.size)
            facts["cold_reads"] = mount_status(path.parent)["reads"]
            verify_file(path, self.expected)
            self.record(f"{variant}_cold_seq", measure.mb_per_s(self.size, seconds))

        def cached(_: float) -> None:
            seconds = timed_dd(path, self.size)
            facts["cached_reads"] = reads = mount_status(path.parent)["reads"]
            verify_file(path, self.expected)
            self.record(f"{variant}_cached_seq", measure.mb_per_s(self.size, seconds))
            if reads.get("bytes_fetched"):
                self.notes.append(
                    f"Repetition {rep + 1}, {variant}: the read from a full disk cache still "
                    f"fetched {format_size(reads['bytes_fetched'])} from the endpoint."
                )

        def random(_: float) -> None:
            latencies = measure.random_reads(path, offsets, self.expected)
            facts["random_reads"] = mount_status(path.parent)["reads"]
            self.record(f"{variant}_random_p50", measure.percentile(latencies, 0.50))
            self.record(f"{variant}_random_p99", measure.percentile(latencies, 0.99))

        def step(label: str, body: Callable[[float], None]) -> None:
            if label == "cold":
                os.sync()
                self.warm_server_copy()
            else:
                self.drop()
            self.in_mount(self.mount_of(variant, cache), rep, f"{variant}-{label}", facts, body)

        try:
            if self.attempt(f"rep {rep} {variant} cold read", partial(step, "cold", cold)):
                self.note_at_rest(variant, at_rest(cache, -(-self.size // BLOCK)))
                self.attempt(f"rep {rep} {variant} cached read", partial(step, "cached", cached))
                self.attempt(f"rep {rep} {variant} random reads", partial(step, "random", random))
        finally:
            shutil.rmtree(cache, ignore_errors=True)

    def through(
        self,
        rep: int,
        variant: str,
        label: str,
        body: Callable[[VariantMount, dict[str, Any]], None],
    ) -> None:
        """One write workload on a fresh cache directory; its leftovers in the bucket go."""
        cache = self.workdir / f"cache-{rep}-{variant}-{label}"
        mount = self.mount_of(variant, cache)
        facts = self.facts_of(rep, variant, label)
        try:
            self.in_mount(mount, rep, f"{variant}-{label}", facts, lambda _: body(mount, facts))
        finally:
            shutil.rmtree(cache, ignore_errors=True)

    def write(self, rep: int, variant: str) -> None:
        key = f"written-r{rep}-{variant}.bin"

        def body(mount: VariantMount, facts: dict[str, Any]) -> None:
            timed_dd(self.local_file, self.size)  # the source from the page cache
            os.sync()
            start = time.perf_counter()
            seconds = timed_dd(self.local_file, self.size, mount.mountpoint / key)
            acknowledged = time.perf_counter()
            self.note_at_rest(variant, {"staging": staged_header(mount.cache_dir)})
            self.record(f"{variant}_write_dd", measure.mb_per_s(self.size, seconds))
            try:
                uploaded = wm.wait_uploaded(mount.mountpoint, "the large file", mount.log_tail)
                facts["seconds"] = {
                    "dd": round(seconds, 3),
                    "ack_to_bucket": round(uploaded - acknowledged, 3),
                }
                wm.check_object(self.direct, key, self.expected)
            finally:
                wm.delete_prefix(self.direct, key)
            self.record(f"{variant}_write_in_bucket", uploaded - start)

        self.attempt(
            f"rep {rep} {variant} dd write", partial(self.through, rep, variant, "dd", body)
        )

    def ingest(self, rep: int, variant: str) -> None:
        plan = wm.Ingest(
            f"ingest-r{rep}-{variant}", self.files, self.file_size, self.payload, seed=rep
        )

        def body(mount: VariantMount, facts: dict[str, Any]) -> None:
            os.sync()
            start = time.perf_counter()
            seconds, phases = wm.timed_ingest(mount.mountpoint, plan, 1)
            self.record(f"{variant}_ingest", plan.count / seconds)
            facts["mean_ms_per_step"] = phases
            try:
                uploaded = wm.wait_uploaded(mount.mountpoint, "the ingest", mount.log_tail)
                facts["bucket_check"] = wm.check_ingest(self.direct, plan, spot_checks=5)
            finally:
                wm.delete_prefix(self.direct, plan.prefix + "/")
            self.record(f"{variant}_ingest_in_bucket", uploaded - start)

        self.attempt(
            f"rep {rep} {variant} ingest", partial(self.through, rep, variant, "ingest", body)
        )

    def listing(self, rep: int, variant: str) -> None:
        """The first mount fills the catalog; a remount lists the directory from it."""
        cache = self.workdir / f"cache-{rep}-{variant}-list"
        facts = self.facts_of(rep, variant, "list")
        mountpoint = self.workdir / "mnt"
        directory = mountpoint / TREE_DIR

        def first(_: float) -> None:
            self.record(f"{variant}_catalog_mount", facts[f"{variant}-fill_mount_seconds"])
            facts["catalog"] = mount_status(mountpoint)["catalog"]

        def listed(_: float) -> None:
            self.record(f"{variant}_ls_remount", timed_listing(directory, self.entries))
            for _ in range(WARM_LISTINGS):
                self.drop()
                self.record(f"{variant}_ls_warm", timed_listing(directory, self.entries))

        def fill() -> None:
            mount = self.mount_of(variant, cache, TREE_BUCKET)
            self.in_mount(mount, rep, f"{variant}-fill", facts, first)
            self.note_at_rest(variant, at_rest(cache, 0))

        def remount() -> None:
            self.drop()
            mount = self.mount_of(variant, cache, TREE_BUCKET)
            self.in_mount(mount, rep, f"{variant}-list", facts, listed)

        try:
            if self.attempt(f"rep {rep} {variant} catalog fill", fill):
                self.attempt(f"rep {rep} {variant} listing", remount)
        finally:
            shutil.rmtree(cache, ignore_errors=True)

    # -- the run -----------------------------------------------------------------------------

    def measure(self) -> None:
        workloads = (self.reads, self.write, self.ingest, self.listing)
        for rep in range(self.args.repeat):
            self.say(f"repetition {rep + 1}/{self.args.repeat}: AES-GCM")
            self.run_aesgcm(rep)
            order = VARIANTS if rep % 2 == 0 else VARIANTS[::-1]
            for workload in workloads:
                for variant in order:
                    self.say(
                        f"repetition {rep + 1}/{self.args.repeat}: {variant} {workload.__name__}"
                    )
                    workload(rep, variant)

    def options(self) -> dict[str, Any]:
        return {
            "size_bytes": self.size,
            "random_reads": self.args.random_reads,
            "files": self.files,
            "file_size": self.file_size,
            "entries": self.entries,
            "repeat": self.args.repeat,
            "quick": self.args.quick,
            "wan": self.details.get("wan"),
            "server": self.args.server,
            "mount_options": list(MOUNT_OPTIONS),
        }

    def tables(self) -> str:
        return crypto_report.tables(self.samples, self.options())

    def result(self, runtime: float) -> dict[str, Any]:
        middle = medians(self.samples)
        self.notes += self.crypto_notes(middle)
        self.closing_notes()
        return self.document(
            runtime,
            missing(self.samples, crypto_report.metric_keys()),
            options=self.options(),
            endpoint={"kind": self.endpoint.kind if self.endpoint else None},
            units={
                **{
                    f"{variant}_{figure.key}": figure.unit
                    for figure in crypto_report.FIGURES
                    for variant in VARIANTS
                },
                **{limit.key: limit.unit for limit in crypto_report.LIMITS},
            },
            medians=middle,
            ratios=crypto_report.ratios(middle),
        )

    def crypto_notes(self, middle: dict[str, float]) -> list[str]:
        notes = [
            "Encrypted / plain above 1 for a time (ms, s), or below 1 for a rate (MB/s, "
            "files/s), is what the key costs; read it against the spread of each variant's runs."
        ]
        for variant in VARIANTS:
            found = self.details["at_rest"].get(variant)
            if found:
                parts = "; ".join(f"{name}: {text}" for name, text in found.items())
                notes.append(f"On disk after the {variant} mounts: {parts}.")
        opening, cached = middle.get("aesgcm_open"), middle.get("plain_cached_seq")
        if opening and cached and middle.get("encrypted_cached_seq"):
            plain_s = self.size / cached / measure.MB
            sealed_s = self.size / middle["encrypted_cached_seq"] / measure.MB
            notes.append(
                f"Decrypting {format_size(self.size)} at the AES-GCM open speed takes "
                f"{self.size / opening / measure.MB:.2f}s on one core; the first read from the "
                f"disk cache took {plain_s:.2f}s plain and {sealed_s:.2f}s encrypted."
            )
        return notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not needs_root("drop_caches, FUSE mounts"):
        return 2
    return publish(CryptoBench(args), crypto_report.workload, crypto_report.PAGE_HEAD)
