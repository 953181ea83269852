"""Turning the samples into the Markdown tables, bench/results/*.json and docs/benchmarks.md.

Every figure is the median over the repetitions, with each repetition's value beside it so the
spread is visible.  The ratios put each cloudfs figure next to the limit that bounds it: the
endpoint's parallel throughput for a cold read, the no-op FUSE ceiling for a cached read.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    """MB/s, GB/s (stored as MB/s, shown divided by 1000) or ms."""


METRICS = (
    Metric("boto3_single", "S3 endpoint, raw boto3: one GET stream", "MB/s"),
    Metric("boto3_parallel", "S3 endpoint, raw boto3: 8 threads x 8 MiB ranged GETs", "MB/s"),
    Metric("boto3_block_p50", "S3 endpoint, raw boto3: one 1 MiB ranged GET, p50", "ms"),
    Metric("boto3_block_p99", "S3 endpoint, raw boto3: one 1 MiB ranged GET, p99", "ms"),
    Metric("cloudfs_cold_seq", "cloudfs: cold sequential read, empty cache (dd bs=1M)", "MB/s"),
    Metric(
        "cloudfs_cached_seq",
        "cloudfs: first read from the disk cache (remount, page cache dropped)",
        "MB/s",
    ),
    Metric("cloudfs_warm_seq", "cloudfs: warm re-read, same mount (kernel page cache)", "GB/s"),
    Metric("cloudfs_random_cold_p50", "cloudfs: random 64 KiB pread, cold cache, p50", "ms"),
    Metric("cloudfs_random_cold_p99", "cloudfs: random 64 KiB pread, cold cache, p99", "ms"),
    Metric("cloudfs_random_warm_p50", "cloudfs: random 64 KiB pread, disk cache, p50", "ms"),
    Metric("cloudfs_random_warm_p99", "cloudfs: random 64 KiB pread, disk cache, p99", "ms"),
    Metric("memfs_128", "no-op pyfuse3 FUSE ceiling, read_ahead_kb=128", "MB/s"),
    Metric("memfs_1024", "no-op pyfuse3 FUSE ceiling, read_ahead_kb=1024", "MB/s"),
    Metric("local_cold", "local disk, page cache dropped (dd bs=1M)", "MB/s"),
    Metric("local_warm", "local disk, page cache (dd bs=1M)", "GB/s"),
)

RATIOS = (
    ("cloudfs cold sequential / boto3 parallel ranged GETs", "cloudfs_cold_seq", "boto3_parallel"),
    ("cloudfs cold sequential / boto3 single stream", "cloudfs_cold_seq", "boto3_single"),
    ("cloudfs cached first read / FUSE ceiling (1024 KiB)", "cloudfs_cached_seq", "memfs_1024"),
    ("cloudfs cached first read / local disk, cold", "cloudfs_cached_seq", "local_cold"),
    ("cloudfs warm re-read / local page-cache re-read", "cloudfs_warm_seq", "local_warm"),
    (
        "cloudfs random 64 KiB p50: cold / disk cache",
        "cloudfs_random_cold_p50",
        "cloudfs_random_warm_p50",
    ),
    (
        "cloudfs random 64 KiB cold p50 / boto3 1 MiB GET p50",
        "cloudfs_random_cold_p50",
        "boto3_block_p50",
    ),
    ("FUSE ceiling: read_ahead_kb 1024 / 128", "memfs_1024", "memfs_128"),
    ("boto3: parallel ranged GETs / single stream", "boto3_parallel", "boto3_single"),
)


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {key: statistics.median(values) for key, values in samples.items() if values}


def ratios(middle: dict[str, float]) -> dict[str, float]:
    found = {}
    for label, top, bottom in RATIOS:
        if middle.get(top) and middle.get(bottom):
            found[label] = middle[top] / middle[bottom]
    return found


def _shown(metric: Metric, value: float) -> str:
    if metric.unit == "GB/s":
        return f"{value / 1000:.2f}"
    if metric.unit == "ms":
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    return f"{value:.0f}"


def tables(samples: dict[str, list[float]]) -> str:
    middle = medians(samples)
    lines = ["| Measurement | Median | Unit | Each run |", "| --- | ---: | --- | --- |"]
    for metric in METRICS:
        values = samples.get(metric.key, [])
        median = _shown(metric, middle[metric.key]) if values else "**missing**"
        each = ", ".join(_shown(metric, v) for v in values) or "-"
        lines.append(f"| {metric.label} | {median} | {metric.unit} | {each} |")
    lines += ["", "| Ratio (of medians) | Value |", "| --- | ---: |"]
    found = ratios(middle)
    for label, _, _ in RATIOS:
        lines.append(f"| {label} | {found[label]:.2f} |" if label in found else f"| {label} | - |")
    return "\n".join(lines)


def missing(samples: dict[str, list[float]]) -> list[str]:
    return [metric.key for metric in METRICS if not samples.get(metric.key)]


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")


def markdown_page(result: dict[str, Any], table: str) -> str:
    machine = result["machine"]
    endpoint = result["endpoint"]
    options = result["options"]
    lines = [
        "# cloudfs read-path benchmark",
        "",
        "Produced by `python -m bench` (see `bench/README.md`); rerun it to refresh this page.",
        "",
        f"- Date: {result['date']}",
        f"- Machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['memory_gib']} GiB RAM, "
        f"Linux {machine['kernel']}, Python {machine['python']}",
        f"- Command: `{result['command']}` (from the repository root; took "
        f"{result['runtime_seconds'] / 60:.1f} min)",
        f"- Endpoint: {endpoint['kind']} on 127.0.0.1"
        + (f", behind a WAN proxy ({options['wan']})" if options.get("wan") else " (loopback)"),
        f"- Object: {options['size_bytes'] / 2**20:.0f} MiB; {options['repeat']} repetitions, "
        f"systems in rotating order; {options['random_reads']} random reads per run",
        "",
        "## Results",
        "",
        table,
        "",
        "## Notes",
        "",
    ]
    lines += [f"- {note}" for note in result["notes"]]
    if result["errors"]:
        lines += ["", "## Errors", ""] + [f"- {error}" for error in result["errors"]]
    return "\n".join(lines) + "\n"
