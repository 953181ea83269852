"""Turning the samples into the Markdown tables, bench/results/*.json and docs/benchmarks-read.md.

Every figure is the median over the repetitions, with each repetition's value beside it so the
spread is visible.  The ratios put each cloudfs figure next to the limit that bounds it: the
endpoint's parallel throughput for a cold read, the no-op FUSE ceiling for a cached read.

The pieces every benchmark's report is made of live here too (tables of measurements, ratios and
targets, the facts about the run, the pages with one section per setup), so the write and viewer
reports only say what their own tables and sections hold.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    """MB/s, GB/s (stored as MB/s, shown divided by 1000), ms, s or files/s."""


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
    Metric(
        "cloudfs_cached_hot_seq",
        "cloudfs: first read from the disk cache, its files in the page cache (remount)",
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

Ratio = tuple[str, str, str]
"""(label, numerator key, denominator key)."""


RATIOS: tuple[Ratio, ...] = (
    ("cloudfs cold sequential / boto3 parallel ranged GETs", "cloudfs_cold_seq", "boto3_parallel"),
    ("cloudfs cold sequential / boto3 single stream", "cloudfs_cold_seq", "boto3_single"),
    ("cloudfs cached first read / FUSE ceiling (1024 KiB)", "cloudfs_cached_seq", "memfs_1024"),
    ("cloudfs cached first read / local disk, cold", "cloudfs_cached_seq", "local_cold"),
    (
        "cloudfs cached first read, cache files in the page cache / FUSE ceiling (1024 KiB)",
        "cloudfs_cached_hot_seq",
        "memfs_1024",
    ),
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


@dataclass(frozen=True)
class Target:
    """A figure with a goal: met below ``threshold`` (a time), or at or above it (a rate)."""

    label: str
    key: str
    threshold: float
    of: str | None = None
    """Compare ``key / of`` with the threshold instead of ``key`` itself."""
    higher: bool = False
    """Met at or above the threshold (a rate or a share) rather than below it (a time)."""
    inclusive: bool = False
    """A time met at the threshold itself too (``<=``)."""

    def met(self, value: float) -> bool:
        if self.higher:
            return value >= self.threshold
        return value <= self.threshold if self.inclusive else value < self.threshold


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {key: statistics.median(values) for key, values in samples.items() if values}


def ratios(middle: dict[str, float], rows: Iterable[Ratio] = RATIOS) -> dict[str, float]:
    return {
        label: middle[top] / middle[bottom]
        for label, top, bottom in rows
        if middle.get(top) and middle.get(bottom)
    }


def verdicts(middle: dict[str, float], goals: Iterable[Target]) -> dict[str, dict[str, Any]]:
    """Per target: the value (None without a figure), its threshold and whether it is met."""
    found: dict[str, dict[str, Any]] = {}
    for goal in goals:
        value = middle.get(goal.key)
        if value is not None and goal.of is not None:
            value = value / middle[goal.of] if middle.get(goal.of) else None
        met = None if value is None else goal.met(value)
        found[goal.label] = {"value": value, "threshold": goal.threshold, "met": met}
    return found


def missing(samples: dict[str, list[float]], keys: Iterable[str] | None = None) -> list[str]:
    """The figures (of ``keys``, by default the read benchmark's) without a single sample."""
    wanted = [metric.key for metric in METRICS] if keys is None else keys
    return [key for key in wanted if not samples.get(key)]


def _shown(metric: Metric, value: float) -> str:
    if metric.unit == "GB/s":
        return f"{value / 1000:.2f}"
    if metric.unit == "ms":
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    return f"{value:.0f}"


def measurement_table(
    samples: dict[str, list[float]],
    metrics: Iterable[Metric],
    shown: Callable[[Metric, float], str] = _shown,
) -> list[str]:
    """One row per metric: its median, unit and every run's value."""
    middle = medians(samples)
    lines = ["| Measurement | Median | Unit | Each run |", "| --- | ---: | --- | --- |"]
    for metric in metrics:
        values = samples.get(metric.key, [])
        median = shown(metric, middle[metric.key]) if values else "**missing**"
        each = ", ".join(shown(metric, v) for v in values) or "-"
        lines.append(f"| {metric.label} | {median} | {metric.unit} | {each} |")
    return lines


def ratio_table(middle: dict[str, float], rows: Iterable[Ratio]) -> list[str]:
    rows = tuple(rows)
    found = ratios(middle, rows)
    lines = ["| Ratio (of medians) | Value |", "| --- | ---: |"]
    for label, _, _ in rows:
        lines.append(f"| {label} | {found[label]:.2f} |" if label in found else f"| {label} | - |")
    return lines


def target_table(found: dict[str, dict[str, Any]], shown: Callable[[str, float], str]) -> list[str]:
    """One row per verdict; ``shown(label, value)`` writes the value."""
    lines = ["| Target | Value | Met |", "| --- | ---: | --- |"]
    for label, verdict in found.items():
        value = verdict["value"]
        text = "-" if value is None else shown(label, value)
        met = {True: "met", False: "**not met**", None: "no figure"}[verdict["met"]]
        lines.append(f"| {label} | {text} | {met} |")
    return lines


def tables(samples: dict[str, list[float]]) -> str:
    lines = measurement_table(samples, METRICS)
    return "\n".join([*lines, "", *ratio_table(medians(samples), RATIOS)])


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")


def run_facts(result: dict[str, Any]) -> list[str]:
    """The list items saying when, where and how a result was measured."""
    machine = result["machine"]
    options = result["options"]
    where = f", behind a WAN proxy ({options['wan']})" if options.get("wan") else " (loopback)"
    lines = [
        f"- Date: {result['date']}",
        f"- Machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['memory_gib']} GiB RAM, "
        f"Linux {machine['kernel']}, Python {machine['python']}",
    ]
    if "disk" in result:
        lines.append(f"- Cache disk: {result['disk']}")
    if "revision" in result:
        lines.append(f"- cloudfs: commit {result['revision']}")
    lines += [
        f"- Command: `{result['command']}` (from the repository root; took "
        f"{result['runtime_seconds'] / 60:.1f} min)",
        f"- Endpoint: {result['endpoint']['kind']} on 127.0.0.1{where}",
    ]
    return lines


def _notes(result: dict[str, Any], notes: str, errors: str) -> list[str]:
    lines = [notes, "", *(f"- {note}" for note in result["notes"])]
    if result["errors"]:
        lines += ["", errors, "", *(f"- {error}" for error in result["errors"])]
    return lines


def markdown_page(result: dict[str, Any], table: str) -> str:
    options = result["options"]
    lines = [
        "# cloudfs read-path benchmark",
        "",
        "Produced by `python -m bench` (see `bench/README.md`); rerun it to refresh this page.",
        "",
        *run_facts(result),
        f"- Object: {options['size_bytes'] / 2**20:.0f} MiB; {options['repeat']} repetitions, "
        f"systems in rotating order; {options['random_reads']} random reads per run",
        "",
        "## Results",
        "",
        table,
        "",
        *_notes(result, "## Notes", "## Errors"),
    ]
    return "\n".join(lines) + "\n"


# -- pages with a section per setup (the write and viewer benchmarks) ----------------------------


def section_name(result: dict[str, Any]) -> str:
    """The setup a result belongs to: loopback or wan, and the server when not s3rver."""
    options = result["options"]
    name = "loopback" if not options.get("wan") else "wan"
    return name if options["server"] == "s3rver" else f"{name}-{options['server']}"


def section(result: dict[str, Any], table: str, workload: str) -> str:
    """The section of one setup: its facts, ``workload`` (what was measured), table and notes."""
    options = result["options"]
    title = "Behind the WAN proxy" if options.get("wan") else "Loopback"
    if options["server"] != "s3rver":
        title += f", {options['server']}"
    lines = [f"## {title}", "", *run_facts(result), f"- {workload}", "", table, ""]
    return "\n".join(lines + _notes(result, "Notes:", "Errors:"))


def updated_page(existing: str | None, name: str, body: str, head: str) -> str:
    """The page with the section ``name`` replaced by ``body`` (added if new), others kept; a
    page that does not start with ``head``'s title is started afresh."""
    start, end = f"<!-- section: {name} -->", f"<!-- end of section: {name} -->"
    block = f"{start}\n{body}\n{end}"
    if existing and start in existing and end in existing:
        pattern = re.escape(start) + r".*?" + re.escape(end)
        return re.sub(pattern, lambda _: block, existing, count=1, flags=re.DOTALL)
    page = existing if existing and existing.startswith(head.splitlines()[0]) else head
    return page.rstrip("\n") + "\n\n" + block + "\n"
