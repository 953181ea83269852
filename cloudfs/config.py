"""Mount configuration: one frozen value built by the CLI, read by every layer.

Every default carries the reason it was chosen, so an operator can tell what changing it costs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .audit import AuditOptions

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

_UNITS = {"": 1, "B": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1024 * GiB}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse ``20G``, ``512M``, ``64KiB`` or a plain byte count (binary units, as df and du use)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (expected a number and a unit: K, M, G, T)")
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit.upper()])


def format_size(count: float) -> str:
    """Render a byte count for humans (``1.5 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class S3Options:
    """How to reach an S3-compatible endpoint; anything left None follows the AWS configuration."""

    endpoint_url: str | None = None
    """None: AWS_ENDPOINT_URL or the AWS default endpoint."""
    region: str | None = None
    """None: AWS_REGION / the profile's region."""
    profile: str | None = None
    """None: AWS_PROFILE or the default credential chain."""
    path_style: bool = False
    """Virtual-host addressing is the AWS default; many on-premise S3 servers need path style."""
    max_attempts: int = 3
    """botocore 'standard' retries: 3 attempts ride out a dropped connection or a 503 SlowDown
    without turning an outage into a long hang."""
    connect_timeout: float = 5.0
    """Seconds; a healthy endpoint answers a TCP connect in milliseconds even over a WAN."""
    read_timeout: float = 20.0
    """Seconds without a byte before botocore gives up on a response; long enough for a loaded
    server to start sending an 8 MiB range, short enough that a dead link becomes EIO."""
    max_pool_connections: int = 32
    """botocore's connection pool; sized above the fetch thread limits so no thread waits for a
    connection."""
    part_size: int = 16 * MiB
    """Uploads up to this size go up in one PUT; larger ones as a multipart upload in parts of
    this size (grown for files above 10,000 parts).  AWS recommends 8-16 MiB parts for throughput,
    S3 refuses parts under 5 MiB, and an upload holds one part in memory per upload thread."""
    sse: str = ""
    """Server-side encryption asked for on every PUT and copy: ``AES256`` (SSE-S3) or
    ``aws:kms`` (SSE-KMS); empty: the bucket's default encryption decides."""
    sse_kms_key_id: str | None = None
    """The KMS key for ``aws:kms``; None: the account's default ``aws/s3`` key."""
    verify_tls: bool = True
    """Check the endpoint's TLS certificate.  Off only for a test endpoint with a self-signed
    certificate: without it, anyone on the path can read and change the archive's traffic."""
    upload_part_threads: int = 4
    """Parts of one multipart upload (or copy) sent at once: four keep a WAN link busy while one
    upload holds at most 64 MiB of parts in memory and a few of botocore's pooled connections."""


BACKUP_PROGRAMS = frozenset(
    {"tar", "bsdtar", "star", "cpio", "rsync", "rclone", "restic", "borg", "duplicity"}
    | {"bacula-fd", "bareos-fd", "dsmc", "dsmcad"}
)
"""Archivers, copy and backup clients (Bacula, Bareos, IBM Storage Protect) found reading a whole
archive at night; cloudfs's own readers and viewers are not among them."""


@dataclass(frozen=True)
class CacheOptions:
    """The persistent block cache and the read path that fills it."""

    directory: Path
    """Blocks, the catalog and the log live here; it survives unmounts and restarts."""
    size_limit: int = 10 * GiB
    """Hard cap on the block store, enforced on every insert."""
    block_size: int = 1 * MiB
    """One cache entry and the unit of a ranged GET.  1 MiB matches the largest read the kernel
    sends once read_ahead_kb is raised to 1024, so a cached sequential read costs one cache lookup
    per request; a random 64 KiB read costs one 1 MiB GET (about 20 ms extra at 50 MB/s), while
    sequential readers coalesce blocks into larger GETs (see ``fetch_chunk``).  Measured against
    4 MiB blocks here: reading cached data ran at the same 0.8 GB/s, a cold read from a local
    store was slower (271 against 455 MB/s), and a random read fetches four times the bytes."""
    fetch_chunk: int = 8 * MiB
    """Largest ranged GET read-ahead issues; AWS recommends 8-16 MiB ranges for throughput, and at
    20 ms RTT and 50 MB/s one request then spends about 88% of its time moving bytes."""
    small_object: int = 8 * MiB
    """Objects up to this size are fetched whole with one GET on first read: a DICOM instance is
    typically 0.1-1 MiB and a viewer reads all of it."""
    readahead_initial: int = 2 * MiB
    """Window after the first sequential read; doubles on each sequential step."""
    readahead_max: int = 128 * MiB
    """Largest read-ahead window per open file.  It is topped up when half of it is left, so a
    steady reader keeps eight 8 MiB GETs in flight: measured over a 20 ms, 50 MB/s-per-stream
    link, 64 MiB gave 0.70 of eight parallel boto3 readers and 128 MiB gave 0.77."""
    readahead_budget: int = 128 * MiB
    """Memory for read-ahead in flight across all open files together (a GET is charged twice its
    size: its reply and the blocks cut from it), so 100 open files cannot grow memory 100-fold."""
    foreground_budget: int = 64 * MiB
    """Memory for demand fetches in flight across all readers, charged the same way."""
    memory_blocks: int = 64 * MiB
    """Recently used blocks kept in memory, so the several kernel requests that fall in one block
    do not each read it from disk."""
    fetch_threads: int = 16
    """Concurrent ranged GETs; half of botocore's pool so refresh and heads never starve."""
    disk_threads: int = 8
    """Concurrent cache reads/writes; more gives nothing on two cores."""
    key_file: Path | None = None
    """Encrypt cached blocks, staged writes and the catalog under the key in this file (32 bytes
    or 64 hex digits, readable by its owner only); None: the key in $CLOUDFS_CACHE_KEY, if set."""
    io_timeout: float = 60.0
    """Upper bound in seconds on one read waiting for the cloud before it fails with EIO."""
    backup_programs: frozenset[str] = BACKUP_PROGRAMS
    """Programs (executable names) whose reads must not displace the cache: the blocks they
    bring in go first and their reads do not make blocks recent, so a nightly backup of the
    archive leaves the studies radiologists use where they were (see ``cache``)."""


@dataclass(frozen=True)
class MountOptions:
    """What the kernel sees of the mount."""

    read_only: bool = False
    attr_timeout: float = 60.0
    """Seconds the kernel may trust a stat result; the catalog refresh interval bounds how stale
    the catalog can be anyway, and ETag-pinned reads never mix versions."""
    negative_timeout: float = 10.0
    """Seconds the kernel remembers a missing name: viewers probe many files that do not exist."""
    fuse_options: tuple[str, ...] = ()
    refresh_interval: float = 600.0
    """Seconds between catalog relists.  A relist costs one LIST per 1,000 objects; every 10 minutes
    keeps a 1M-object archive at about $1 a month of requests."""
    read_ahead_kb: int = 1024
    """The kernel read-ahead of the mount (root only): 1 MiB requests roughly double the FUSE
    ceiling measured here (0.5 -> 1.2 GB/s)."""
    restore_days: int = 0
    """On open of an archived object (GLACIER, DEEP_ARCHIVE), ask S3 for a restored copy kept
    this many days.  0 never asks: a restore costs money and takes hours, so it is opt-in."""
    free_space: int = 1 << 50
    """statfs free space: large and stable, so PACS free-space thresholds never stop ingest
    (the cloud has no "full"; the staging area's own limit answers ENOSPC).  A site may set it
    lower, for a PACS that plans its storage from the free space it is told."""
    owner_uid: int | None = None
    """Owner shown for objects that carry none (written by other S3 clients); None: the user
    running the daemon."""
    owner_gid: int | None = None
    umask: int = 0o022
    """Cleared from the default modes (0755 directories, 0644 files) of objects that carry no
    mode; 0o027 keeps others out of an archive whose objects have no stored permissions."""
    metrics_address: str = ""
    """``host:port`` of the Prometheus endpoint; empty: none.  ``--metrics`` alone serves on
    127.0.0.1:9464: the endpoint has no authentication, so only the host's own scraper (or an
    agent forwarding to it) should reach it unless the operator says otherwise."""


MAX_FREE_SPACE = 1 << 60
"""The most free space statfs may report: its block counts stay far inside 64 bits."""

UPLOAD_MODES = ("async", "sync")


@dataclass(frozen=True)
class WriteOptions:
    """Write-back: where written data waits for the cloud, and when it goes."""

    staging_limit: int = 10 * GiB
    """Bytes of written data not yet in the cloud that the staging area may hold (beside the block
    cache on the same disk).  Staged data is never evicted: past this, writes fail with ENOSPC
    instead of dropping anything, so it bounds how long an outage the site can ride out."""
    upload_mode: str = "async"
    """``async``: fsync returns once the data is durable on local disk and journaled; ``sync``:
    fsync also waits until the cloud has it (slower, for sites that must not rely on the disk)."""
    sync_on_close: bool = False
    """Make close() as durable as fsync(), for writers that never call fsync."""
    upload_delay: float = 1.0
    """Seconds without a file being completed (closed or fsync'd) before uploads start: a PACS
    storing a study writes it at local-disk speed and the study goes up in the pause after it,
    and a writer that renames its temp file into place (editors, rsync) does so within this
    time, so the upload goes to the final key once instead of to the temp name and then a
    copy."""
    upload_max_delay: float = 30.0
    """Longest uploads wait for that pause while files keep arriving; after it they go on beside
    the writes (as they do once half the staging area is taken)."""
    upload_threads: int = 8
    """Files uploaded at once; each large file also sends its parts in parallel.  A small file's
    PUT over a 20 ms WAN spends most of its time waiting: measured here, 4 at once uploaded about
    60 files of 512 KiB a second, fewer than a modality sends; 8 raw boto3 PUTs at once gave 133."""
    drain_timeout: float = 30.0
    """On unmount or SIGTERM, seconds to wait for uploads in progress; the rest stays journaled
    and goes up after the next mount."""


PATIENT_FOLDERS = ("id", "name")


@dataclass(frozen=True)
class DicomOptions:
    """What cloudfs knows of DICOM: the header index, the browse view, study prefetch, tiering."""

    index: bool = True
    """Read the header of every object (one ranged GET of its first 64 KiB, never pixel data) into
    the catalog; the view, study prefetch and pins all depend on it."""
    index_threads: int = 4
    """Header reads at once: a header is one small GET, so four keep a WAN link busy while leaving
    the fetch threads to readers."""
    view_dir: str = "@dicom"
    """Name of the read-only browse tree at the root of the mount (empty: no view).  A name no
    PACS layout uses (``@`` never starts a UID, date or hash), so it shadows no real prefix."""
    patient_folder: str = "id"
    """``id``: patient folders are named by PatientID only; ``name``: ``<PatientName>_<ID>``.
    Names are PHI that every directory listing would show, so the safer choice is the default."""
    study_prefetch: bool = True
    """On open of an instance, fetch the rest of its series (nearest first), then its study."""
    prefetch_threads: int = 8
    """Instances fetched at once by study prefetch: over a 20 ms link a 512 KiB instance takes
    about 50 ms, so eight fetch a CT series faster than a radiologist scrolls (50 images/s),
    while the read path keeps threads and a memory budget of its own for foreground reads."""
    max_study_size: int = 4 * GiB
    """Larger studies are not prefetched whole (a 4 GiB study is a long CT or a large tomo)."""
    priors: int = 2
    """Prior studies of the same patient prefetched after the opened one (same modality first);
    a radiologist compares with the most recent one or two."""
    keep_recent_days: int = 0
    """Pin studies whose StudyDate is within this many days (fetched ahead, never evicted); 0 off.
    365 keeps about 85% of the priors radiologists ask for local, if the cache can hold them."""
    pin_fraction: float = 0.8
    """Share of the cache that pins may take: the rest keeps serving unpinned reads."""


@dataclass(frozen=True)
class Config:
    source: str
    mountpoint: Path
    cache: CacheOptions
    mount: MountOptions = field(default_factory=MountOptions)
    s3: S3Options = field(default_factory=S3Options)
    write: WriteOptions = field(default_factory=WriteOptions)
    dicom: DicomOptions = field(default_factory=DicomOptions)
    audit: AuditOptions | None = None
    """The HIPAA audit trail; None: no trail."""

    def check(self) -> None:
        """Reject combinations that would make the cache thrash or the fetch path deadlock."""
        c = self.cache
        if c.block_size < 64 * KiB or c.block_size > 64 * MiB:
            raise ValueError("block size must be between 64K and 64M")
        if c.fetch_chunk < c.block_size:
            raise ValueError("fetch chunk must be at least one block")
        if c.small_object > c.fetch_chunk:
            raise ValueError("small objects must fit in one fetch chunk (one GET)")
        minimum = 4 * (c.readahead_max + c.fetch_chunk)
        if c.size_limit < minimum:
            raise ValueError(
                f"cache size {format_size(c.size_limit)} is too small: at least "
                f"{format_size(minimum)} (four read-ahead windows) so read-ahead never evicts "
                f"blocks it is about to serve"
            )
        if c.readahead_budget < c.fetch_chunk or c.foreground_budget < c.fetch_chunk:
            raise ValueError("memory budgets must hold at least one fetch chunk")
        if not c.block_size <= self.mount.free_space <= MAX_FREE_SPACE:
            raise ValueError(
                f"free space must be at least one cache block ({format_size(c.block_size)}: "
                f"statfs counts whole blocks) and at most 1048576T"
            )
        d = self.dicom
        if d.patient_folder not in PATIENT_FOLDERS:
            raise ValueError(f"patient folder must be one of {', '.join(PATIENT_FOLDERS)}")
        if d.view_dir and (d.view_dir in (".", "..") or "/" in d.view_dir or "\0" in d.view_dir):
            raise ValueError("the view directory must be one plain name")
        if not 0 < d.pin_fraction <= 0.95:
            raise ValueError("pin fraction must be above 0 and at most 0.95")
        if self.write.upload_mode not in UPLOAD_MODES:
            raise ValueError(f"upload mode must be one of {', '.join(UPLOAD_MODES)}")
