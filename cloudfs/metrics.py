"""The Prometheus endpoint of a mount: read latencies, cloud errors and the daemon's own counters.

Two kinds of figures share one registry per mount:

* Metrics the read path feeds as events happen: the read-latency histogram (``observe_read``) and
  the cloud-error counter (``cloud_error``).
* Everything else is read at scrape time from a *snapshot*: a plain mapping the daemon keeps
  current on the trio thread (keys in ``Snapshot``).  Nothing is pushed, so an idle mount costs
  nothing, and the daemon never blocks on the exporter.

Threads: the daemon runs on one trio thread; prometheus_client's HTTP server answers scrapes in
threads of its own and calls the collector there.  So the collector only *reads*: it copies the
snapshot mapping (one dict copy under the GIL) and never calls into the daemon's objects, whose
tables belong to the trio thread.  The daemon replaces the snapshot's values (ints and floats,
each assignment atomic), never mutates them in place.  The histogram and counter take their own
locks, so feeding them from the trio thread is safe.

Invariant: a scrape never fails because of the daemon's state.  A key missing from the snapshot, or
holding None or a non-number, drops that one figure; a snapshot function that raises drops the
snapshot figures of that scrape (logged) while the histogram and counters are still served.

Ages (uptime, time since the catalog's refresh, the oldest upload waiting) are computed at scrape
time from Unix timestamps in the snapshot, so they stay current however rarely the daemon refreshes
it.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypedDict
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9464
"""The port OpenTelemetry's Prometheus exporter registered; free on a typical archive server."""
DEFAULT_ADDRESS = f"{DEFAULT_HOST}:{DEFAULT_PORT}"
"""What ``--metrics`` without a value serves on."""

READ_SOURCES = ("memory", "disk", "cloud")
"""Where a FUSE read was served from, the ``source`` label of the read-latency histogram."""

READ_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
"""Seconds.  Memory hits take tens of microseconds, disk hits about a millisecond, a ranged GET
tens of milliseconds on a LAN and seconds over a slow WAN; 30 s is past botocore's read timeout,
so the +Inf bucket holds only reads that waited through retries."""

MAX_ERROR_KINDS = 32
"""Distinct ``kind`` labels of the cloud-error counter; later kinds count as ``other``.  Kinds are
meant to be a small fixed set (error classes), and a bug passing a message instead must not
create a time series per message."""


@dataclass(frozen=True)
class MetricsOptions:
    """Whether and where a mount serves its metrics."""

    address: str = ""
    """``HOST:PORT``, ``[IPV6]:PORT`` or a bare port to serve on; empty: no endpoint.  Loopback
    unless told otherwise (``--metrics`` alone gives ``127.0.0.1:9464``): the figures name no
    patient or key, but the endpoint has no authentication, so exposing it beyond the machine is
    a decision to make explicitly (``0.0.0.0:9464``), normally behind a firewall."""


_PORT_RE = re.compile(r"\d{1,5}", re.ASCII)
_HOST_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?", re.ASCII)
_FORMS = "PORT, HOST:PORT or [IPV6]:PORT"


def parse_address(text: str) -> tuple[str, int]:
    """Parse a metrics address: ``9464`` (loopback), ``0.0.0.0:9464``, ``[::1]:9464``.

    A host is required before a colon: ``:9464`` would mean every interface to some programs and
    loopback to others, and an endpoint without authentication should not depend on the guess."""
    text = text.strip()
    if not text:
        raise ValueError(f"empty metrics address (expected {_FORMS})")
    if _PORT_RE.fullmatch(text):
        return DEFAULT_HOST, _port(text, text)
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        if not closed or not rest.startswith(":"):
            raise ValueError(f"not a metrics address: {text!r} (expected {_FORMS})")
        if not _is_ipv6(host):
            raise ValueError(
                f"not a metrics address: {text!r} (only an IPv6 address goes in brackets)"
            )
        return host, _port(rest[1:], text)
    host, colon, port = text.rpartition(":")
    if not colon:
        raise ValueError(f"not a metrics address: {text!r} (expected {_FORMS})")
    if (":" in host and _is_ipv6(host)) or _is_ipv6(text):
        raise ValueError(
            f"not a metrics address: {text!r} (put an IPv6 address in brackets: "
            f"[::1]:{DEFAULT_PORT})"
        )
    if not host:
        raise ValueError(
            f"not a metrics address: {text!r} (give a host before the port: {DEFAULT_HOST} for "
            "this machine only, 0.0.0.0 for every interface)"
        )
    if not _HOST_RE.fullmatch(host):
        raise ValueError(f"not a metrics address: {text!r} (bad host name {host!r})")
    return host, _port(port, text)


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _port(port: str, text: str) -> int:
    if not _PORT_RE.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise ValueError(
            f"not a metrics address: {text!r} (the port must be a number from 1 to 65535)"
        )
    return int(port)


def format_address(host: str, port: int) -> str:
    """The form ``parse_address`` reads back (brackets around an IPv6 address)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Snapshot(TypedDict, total=False):
    """The daemon's figures the collector reads at scrape time; every key is optional (a missing
    one drops its metric).  Counters only ever grow during a mount; ``*_at`` keys are Unix times
    (``time.time()``), 0 meaning never or nothing."""

    # the read path (ReadStats) and the block cache (BlockCache)
    memory_hits: int  # blocks found in the in-memory LRU
    disk_hits: int  # blocks found in the disk cache
    blocks_fetched: int  # blocks fetched from the cloud on demand (cache misses)
    cache_served_bytes: int  # bytes of FUSE reads answered from memory or the disk cache
    cloud_fetched_bytes: int  # bytes of ranged GETs, on demand and read ahead
    cloud_fetches: int  # ranged GETs completed
    cloud_fetches_in_flight: int  # ranged GETs under way
    fetch_errors: int  # ranged GETs that failed after the store's retries
    cache_bytes: int  # BlockCache.volume()
    cache_limit_bytes: int  # BlockCache.size_limit
    cache_blocks: int  # BlockCache.block_count()
    cache_pinned_bytes: int  # BlockCache.pinned_volume()
    corrupt_blocks: int  # BlockCache.corrupt_blocks
    failed_inserts: int  # BlockCache.failed_inserts
    # read-ahead
    prefetched_blocks: int  # blocks fetched by read-ahead
    prefetched_bytes: int  # bytes of read-ahead GETs
    prefetch_used_bytes: int  # PrefetchLedger: prefetched bytes a read then asked for
    prefetch_wasted_bytes: int  # PrefetchLedger: prefetched bytes no read asked for in time
    prefetch_unread_bytes: int  # PrefetchLedger: prefetched bytes not yet either
    studies_prefetched: int  # Studies.prefetched_studies
    # uploads (Backlog, UploadStats, staging)
    upload_pending_files: int
    upload_pending_bytes: int
    upload_oldest_pending_at: float  # Backlog.oldest; 0 when nothing waits
    uploaded_files: int
    uploaded_bytes: int
    upload_conflicts: int
    upload_errors: int
    staging_bytes: int
    staging_limit_bytes: int
    # the catalog (Catalog.counts(), meta synced_at)
    catalog_files: int
    catalog_directories: int
    catalog_bytes: int
    catalog_rejected_keys: int
    catalog_synced_at: float  # 0: never refreshed
    # the DICOM index (DicomIndex.progress(), Studies)
    dicom_objects: int
    dicom_indexed: int
    dicom_pending: int
    dicom_instances: int
    dicom_studies: int
    dicom_headers_read: int
    dicom_read_failures: int
    # the audit trail (AuditLog.state())
    audit_records_written: int
    audit_records_held: int  # kept in memory while the log cannot be written
    audit_records_dropped: int
    audit_held_since: float  # 0 when nothing is held
    audit_refusing: int  # 1 while audited accesses are refused (fail closed, log unwritable)
    # the mount
    open_files: int
    started_at: float


@dataclass(frozen=True, slots=True)
class _Figure:
    """One metric read from the snapshot: each (label value, key) pair gives one sample."""

    name: str
    kind: Literal["counter", "gauge"]
    help: str
    keys: tuple[tuple[str, str], ...]
    label: str = ""
    age: bool = False
    """The keys hold Unix times; the sample is the seconds elapsed since."""
    idle_age: float | None = None
    """For an age: what a timestamp of 0 (or None) reports; None drops the sample."""


def _one(key: str) -> tuple[tuple[str, str], ...]:
    return (("", key),)


FIGURES: tuple[_Figure, ...] = (
    _Figure(
        "cloudfs_cache_hits",
        "counter",
        "Blocks a read needed that were in the memory LRU or the disk cache.",
        (("memory", "memory_hits"), ("disk", "disk_hits")),
        label="source",
    ),
    _Figure(
        "cloudfs_cache_misses",
        "counter",
        "Blocks a read needed that no cache held, fetched from the cloud on demand.",
        _one("blocks_fetched"),
    ),
    _Figure(
        "cloudfs_cache_served_bytes",
        "counter",
        "Bytes of reads answered from memory or the disk cache.",
        _one("cache_served_bytes"),
    ),
    _Figure(
        "cloudfs_cloud_fetched_bytes",
        "counter",
        "Bytes fetched from the cloud by ranged GETs, on demand and read ahead.",
        _one("cloud_fetched_bytes"),
    ),
    _Figure(
        "cloudfs_cloud_fetches",
        "counter",
        "Ranged GETs completed (one GET may bring several blocks).",
        _one("cloud_fetches"),
    ),
    _Figure(
        "cloudfs_cloud_fetches_in_flight",
        "gauge",
        "Ranged GETs under way.",
        _one("cloud_fetches_in_flight"),
    ),
    _Figure(
        "cloudfs_fetch_errors",
        "counter",
        "Ranged GETs that failed after the store's retries; their readers got an error.",
        _one("fetch_errors"),
    ),
    _Figure(
        "cloudfs_cache_used_bytes",
        "gauge",
        "Bytes the block cache occupies on disk, blocks and index.",
        _one("cache_bytes"),
    ),
    _Figure(
        "cloudfs_cache_limit_bytes",
        "gauge",
        "Size limit of the block cache.",
        _one("cache_limit_bytes"),
    ),
    _Figure("cloudfs_cache_blocks", "gauge", "Blocks in the disk cache.", _one("cache_blocks")),
    _Figure(
        "cloudfs_cache_pinned_bytes",
        "gauge",
        "Bytes of cached blocks that eviction skips (pins and the recent-studies window).",
        _one("cache_pinned_bytes"),
    ),
    _Figure(
        "cloudfs_cache_corrupt_blocks",
        "counter",
        "Cached blocks that failed their checksum and were dropped (then fetched again).",
        _one("corrupt_blocks"),
    ),
    _Figure(
        "cloudfs_cache_failed_inserts",
        "counter",
        "Blocks the disk cache refused to store (disk full or I/O error); served uncached.",
        _one("failed_inserts"),
    ),
    _Figure(
        "cloudfs_prefetch_blocks",
        "counter",
        "Blocks fetched from the cloud by read-ahead and study prefetch.",
        _one("prefetched_blocks"),
    ),
    _Figure(
        "cloudfs_prefetch_bytes",
        "counter",
        "Bytes fetched from the cloud by read-ahead and study prefetch, used or not.",
        _one("prefetched_bytes"),
    ),
    _Figure(
        "cloudfs_prefetch_outcome_bytes",
        "counter",
        "Prefetched bytes by what became of them: used (a read asked for them) or wasted "
        "(unread after the cache took in a whole cache's worth of newer fetches).",
        (("used", "prefetch_used_bytes"), ("wasted", "prefetch_wasted_bytes")),
        label="outcome",
    ),
    _Figure(
        "cloudfs_prefetch_unread_bytes",
        "gauge",
        "Prefetched bytes no read has asked for yet, and not yet counted as wasted.",
        _one("prefetch_unread_bytes"),
    ),
    _Figure(
        "cloudfs_study_prefetches",
        "counter",
        "DICOM studies a study prefetch brought completely into the cache.",
        _one("studies_prefetched"),
    ),
    _Figure(
        "cloudfs_upload_backlog_files",
        "gauge",
        "Files written through the mount and not yet in the cloud.",
        _one("upload_pending_files"),
    ),
    _Figure(
        "cloudfs_upload_backlog_bytes",
        "gauge",
        "Bytes written through the mount and not yet in the cloud.",
        _one("upload_pending_bytes"),
    ),
    _Figure(
        "cloudfs_upload_backlog_oldest_age_seconds",
        "gauge",
        "Seconds the oldest file of the upload backlog has waited; 0 when nothing waits.",
        _one("upload_oldest_pending_at"),
        age=True,
        idle_age=0.0,
    ),
    _Figure(
        "cloudfs_uploaded_files", "counter", "Files uploaded to the cloud.", _one("uploaded_files")
    ),
    _Figure(
        "cloudfs_uploaded_bytes", "counter", "Bytes uploaded to the cloud.", _one("uploaded_bytes")
    ),
    _Figure(
        "cloudfs_upload_conflicts",
        "counter",
        "Uploads refused because another writer changed the key first; nothing was overwritten.",
        _one("upload_conflicts"),
    ),
    _Figure(
        "cloudfs_upload_errors",
        "counter",
        "Upload attempts that failed and will be retried.",
        _one("upload_errors"),
    ),
    _Figure(
        "cloudfs_staging_used_bytes",
        "gauge",
        "Bytes of local staging held by files being written or waiting for upload.",
        _one("staging_bytes"),
    ),
    _Figure(
        "cloudfs_staging_limit_bytes",
        "gauge",
        "Size limit of the local staging area.",
        _one("staging_limit_bytes"),
    ),
    _Figure("cloudfs_catalog_files", "gauge", "Files in the catalog.", _one("catalog_files")),
    _Figure(
        "cloudfs_catalog_directories",
        "gauge",
        "Directories in the catalog.",
        _one("catalog_directories"),
    ),
    _Figure(
        "cloudfs_catalog_bytes",
        "gauge",
        "Total size of the files in the catalog.",
        _one("catalog_bytes"),
    ),
    _Figure(
        "cloudfs_catalog_rejected_keys",
        "gauge",
        "Object keys left out of the namespace because no path can represent them.",
        _one("catalog_rejected_keys"),
    ),
    _Figure(
        "cloudfs_catalog_refresh_age_seconds",
        "gauge",
        "Seconds since the catalog last completed a refresh from the cloud listing.",
        _one("catalog_synced_at"),
        age=True,
    ),
    _Figure(
        "cloudfs_dicom_objects",
        "gauge",
        "Non-empty files in the catalog, each a candidate for the DICOM index.",
        _one("dicom_objects"),
    ),
    _Figure(
        "cloudfs_dicom_indexed_objects",
        "gauge",
        "Files whose header has been read, DICOM or not.",
        _one("dicom_indexed"),
    ),
    _Figure(
        "cloudfs_dicom_pending_objects",
        "gauge",
        "Files whose header is still to be read.",
        _one("dicom_pending"),
    ),
    _Figure(
        "cloudfs_dicom_instances", "gauge", "DICOM instances in the index.", _one("dicom_instances")
    ),
    _Figure("cloudfs_dicom_studies", "gauge", "DICOM studies in the index.", _one("dicom_studies")),
    _Figure(
        "cloudfs_dicom_headers_read",
        "counter",
        "DICOM headers read by the indexer.",
        _one("dicom_headers_read"),
    ),
    _Figure(
        "cloudfs_dicom_read_failures",
        "counter",
        "Header reads and study-prefetch fetches that failed (retried later).",
        _one("dicom_read_failures"),
    ),
    _Figure(
        "cloudfs_audit_records_written",
        "counter",
        "Audit records written to the audit log by this daemon.",
        _one("audit_records_written"),
    ),
    _Figure(
        "cloudfs_audit_records_held",
        "gauge",
        "Audit records kept in memory because the audit log cannot be written (disk full).",
        _one("audit_records_held"),
    ),
    _Figure(
        "cloudfs_audit_held_age_seconds",
        "gauge",
        "Seconds since the audit log first refused a record still held; 0 when none is.",
        _one("audit_held_since"),
        age=True,
        idle_age=0.0,
    ),
    _Figure(
        "cloudfs_audit_refusing_access",
        "gauge",
        "1 while audited accesses are refused because the audit log cannot be written "
        "(--audit-when-unwritable refuse); 0 otherwise.",
        _one("audit_refusing"),
    ),
    _Figure(
        "cloudfs_audit_records_dropped",
        "counter",
        "Audit records lost: the writer could not keep up, or too many were held.",
        _one("audit_records_dropped"),
    ),
    _Figure("cloudfs_open_files", "gauge", "Files open through the mount.", _one("open_files")),
    _Figure(
        "cloudfs_uptime_seconds",
        "gauge",
        "Seconds since the mount started.",
        _one("started_at"),
        age=True,
    ),
)

SNAPSHOT_KEYS = frozenset(key for figure in FIGURES for _, key in figure.keys)
"""Every key the collector reads: the keys of ``Snapshot``."""


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class _SnapshotCollector:
    """Turns the snapshot into metric families at each scrape (in the HTTP server's thread)."""

    def __init__(self, snapshot: Callable[[], Mapping[str, Any]]) -> None:
        self._snapshot = snapshot
        self._last_failure = ""

    def describe(self) -> Iterator[Metric]:
        """The families without samples, so the registry refuses a name clash at start-up
        rather than a scrape serving two families of one name."""
        for figure in FIGURES:
            yield self._family(figure)

    def collect(self) -> Iterator[Metric]:
        try:
            values = dict(self._snapshot())
        except Exception as exc:
            if str(exc) != self._last_failure:
                self._last_failure = str(exc)
                log.warning("metrics snapshot failed, its figures are left out: %s", exc)
            return
        self._last_failure = ""
        now = time.time()
        for figure in FIGURES:
            family = self._family(figure)
            for label, key in figure.keys:
                value = self._value(figure, values.get(key), now)
                if value is not None:
                    family.add_metric([label] if figure.label else [], value)
            if family.samples:
                yield family

    @staticmethod
    def _family(figure: _Figure) -> CounterMetricFamily | GaugeMetricFamily:
        labels = [figure.label] if figure.label else None
        # The unit is the name's suffix, as the naming conventions want; the OpenMetrics format
        # states it again in a UNIT line.
        suffix = figure.name.rpartition("_")[2]
        unit = suffix if suffix in ("bytes", "seconds") else ""
        if figure.kind == "counter":
            return CounterMetricFamily(figure.name, figure.help, labels=labels, unit=unit)
        return GaugeMetricFamily(figure.name, figure.help, labels=labels, unit=unit)

    @staticmethod
    def _value(figure: _Figure, raw: object, now: float) -> float | None:
        if not figure.age:
            return _number(raw)
        if raw is None or raw == 0:
            return figure.idle_age
        since = _number(raw)
        # A clock stepped backwards must not report a negative age.
        return None if since is None else max(now - since, 0.0)


class Metrics:
    """Figures of one mount for Prometheus: histograms and counters the read path feeds, plus
    a collector that reads the daemon's own counters at scrape time."""

    def __init__(self, snapshot: Callable[[], Mapping[str, Any]]) -> None:
        """``snapshot`` returns the daemon's current figures (keys of ``Snapshot``); it is called
        in the HTTP server's thread, so it must only read.  Each object has its own registry,
        never prometheus_client's global one: a process may hold several mounts, and tests
        build many."""
        self.registry = CollectorRegistry()
        self.read_latency = Histogram(
            "cloudfs_read_latency_seconds",
            "Seconds to answer a FUSE read, by where its data came from.",
            labelnames=["source"],
            buckets=READ_LATENCY_BUCKETS,
            unit="seconds",
            registry=self.registry,
        )
        # Children created up front: every source exports zeros from the first scrape, and the
        # hot path skips the label lookup.
        self._read_children = {source: self.read_latency.labels(source) for source in READ_SOURCES}
        self.cloud_errors = Counter(
            "cloudfs_cloud_errors",
            "Failed requests to the cloud store after retries, by kind of error.",
            labelnames=["kind"],
            registry=self.registry,
        )
        self._error_kinds: set[str] = set()
        self.registry.register(_SnapshotCollector(snapshot))
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def observe_read(self, seconds: float, source: str) -> None:
        """Record one FUSE read; ``source`` is one of ``READ_SOURCES``."""
        try:
            child = self._read_children[source]
        except KeyError:
            raise ValueError(
                f"unknown read source {source!r} (expected one of {', '.join(READ_SOURCES)})"
            ) from None
        child.observe(seconds)

    def cloud_error(self, kind: str) -> None:
        """Count one failed cloud request.  ``kind`` should come from a small fixed set, such as
        the error's class name (``NotFound``, ``Unavailable``, ``StaleObject``)."""
        if kind not in self._error_kinds:
            if len(self._error_kinds) >= MAX_ERROR_KINDS:
                kind = "other"
            self._error_kinds.add(kind)
        self.cloud_errors.labels(kind).inc()

    @property
    def address(self) -> tuple[str, int] | None:
        """Where the endpoint listens (the actual port when 0 was asked), None when stopped."""
        if self._server is None:
            return None
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def serve(self, address: tuple[str, int]) -> None:
        """Start answering ``GET /metrics`` on ``address`` in a daemon thread of
        prometheus_client's; returns once the socket is bound, so a bad address fails the mount's
        start rather than a scrape later."""
        where = self.address
        if where is not None:
            raise RuntimeError(f"metrics already served on {format_address(*where)}")
        host, port = address
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if exc.errno == errno.EADDRINUSE:
                reason += " (another process listens there: choose another port)"
            raise OSError(
                exc.errno, f"cannot serve metrics on {format_address(host, port)}: {reason}"
            ) from exc
        log.info("metrics served on http://%s/metrics", format_address(*self.address or address))

    def stop(self) -> None:
        """Stop the endpoint and free its port.  Blocks until the server loop notices (up to its
        half-second poll interval): call it at shutdown or from a worker thread, not from the
        trio thread while the mount still serves reads."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def render(self) -> bytes:
        """The current figures in the Prometheus text format, as a scrape would get them."""
        return generate_latest(self.registry)
