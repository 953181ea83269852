"""The write benchmark's tables, targets and its page, ``docs/benchmarks-write.md``.

As in the read report, every figure is the median over the repetitions with each run's value
beside it, and each cloudfs figure is put next to the limit measured in the same run: the local
disk for what a writer waits for, the endpoint's raw boto3 uploads for how fast the bucket fills.

The page holds one section per setup (loopback, ``--wan``, another server), between markers, so
a run rewrites its own section and keeps the others.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .report import Metric, medians


def _threads(count: int) -> str:
    return f"{count} thread{'s' if count > 1 else ''}"


def metrics(threads: tuple[int, ...], put_threads: tuple[int, ...]) -> tuple[Metric, ...]:
    found = [
        Metric("local_dd", "local disk (cache disk): dd bs=1M conv=fsync", "MB/s"),
        Metric("cloudfs_dd", "cloudfs: dd bs=1M conv=fsync, acknowledged", "MB/s"),
        Metric("cloudfs_big_in_bucket", "cloudfs: dd start to the object in the bucket", "s"),
        Metric("cloudfs_big_upload", "cloudfs: upload after the ack (size / time)", "MB/s"),
        Metric("boto3_upload", "S3 endpoint, raw boto3 upload_file (16 MiB parts x4)", "MB/s"),
    ]
    for count in threads:
        label = _threads(count)
        found += [
            Metric(f"local_ingest_{count}", f"local disk: PACS ingest, {label}", "files/s"),
            Metric(
                f"cloudfs_ingest_{count}", f"cloudfs: PACS ingest, {label}, acknowledged", "files/s"
            ),
            Metric(
                f"cloudfs_ingest_{count}_in_bucket",
                f"cloudfs: PACS ingest, {label}: start to all in the bucket",
                "s",
            ),
            Metric(
                f"cloudfs_ingest_{count}_bucket_rate",
                f"cloudfs: PACS ingest, {label}: files / time to all in the bucket",
                "files/s",
            ),
        ]
    found.append(
        Metric(
            "cloudfs_ingest_held",
            "cloudfs: PACS ingest, 1 thread, acknowledged, uploads held back (--upload-delay 3600)",
            "files/s",
        )
    )
    for count in put_threads:
        found.append(
            Metric(
                f"boto3_put_{count}",
                f"S3 endpoint, raw boto3 put_object, {count} threads",
                "files/s",
            )
        )
    return tuple(found)


def ratio_rows(
    threads: tuple[int, ...], put_threads: tuple[int, ...]
) -> tuple[tuple[str, str, str], ...]:
    top = max(put_threads)
    rows = [
        ("cloudfs dd acknowledged / local disk dd", "cloudfs_dd", "local_dd"),
        ("cloudfs upload after the ack / boto3 upload_file", "cloudfs_big_upload", "boto3_upload"),
    ]
    for count in threads:
        rows.append(
            (
                f"cloudfs ingest {count}t acknowledged / local disk {count}t",
                f"cloudfs_ingest_{count}",
                f"local_ingest_{count}",
            )
        )
    for count in threads:
        rows.append(
            (
                f"cloudfs ingest {count}t into the bucket / boto3 put_object {top} threads",
                f"cloudfs_ingest_{count}_bucket_rate",
                f"boto3_put_{top}",
            )
        )
    return tuple(rows)


@dataclass(frozen=True)
class Target:
    label: str
    key: str
    threshold: float
    of: str | None = None
    """Compare ``key / of`` with the threshold instead of ``key`` itself."""


def targets(threads: tuple[int, ...]) -> tuple[Target, ...]:
    found = [
        Target(
            "acknowledged write throughput >= 50% of the local-disk write",
            "cloudfs_dd",
            0.5,
            of="local_dd",
        )
    ]
    for count in threads:
        label = f"PACS ingest >= 100 files/s with fdatasync, {_threads(count)}"
        found.append(Target(label, f"cloudfs_ingest_{count}", 100.0))
    return tuple(found)


def ratios(middle: dict[str, float], rows: tuple[tuple[str, str, str], ...]) -> dict[str, float]:
    return {
        label: middle[top] / middle[bottom]
        for label, top, bottom in rows
        if middle.get(top) and middle.get(bottom)
    }


def verdicts(middle: dict[str, float], goals: tuple[Target, ...]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for goal in goals:
        value = middle.get(goal.key)
        if value is not None and goal.of is not None:
            value = value / middle[goal.of] if middle.get(goal.of) else None
        found[goal.label] = {
            "value": value,
            "threshold": goal.threshold,
            "met": None if value is None else value >= goal.threshold,
        }
    return found


def _shown(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def tables(
    samples: dict[str, list[float]],
    metric_list: tuple[Metric, ...],
    rows: tuple[tuple[str, str, str], ...],
    goals: tuple[Target, ...],
) -> str:
    middle = medians(samples)
    lines = ["| Measurement | Median | Unit | Each run |", "| --- | ---: | --- | --- |"]
    for metric in metric_list:
        values = samples.get(metric.key, [])
        median = _shown(middle[metric.key]) if values else "**missing**"
        each = ", ".join(_shown(v) for v in values) or "-"
        lines.append(f"| {metric.label} | {median} | {metric.unit} | {each} |")
    lines += ["", "| Ratio (of medians) | Value |", "| --- | ---: |"]
    found = ratios(middle, rows)
    for label, _, _ in rows:
        lines.append(f"| {label} | {found[label]:.2f} |" if label in found else f"| {label} | - |")
    lines += ["", "| Target | Value | Met |", "| --- | ---: | --- |"]
    for label, verdict in verdicts(middle, goals).items():
        value = verdict["value"]
        shown = "-" if value is None else (f"{value:.2f}" if value < 10 else f"{value:.0f}")
        met = {True: "met", False: "**not met**", None: "no figure"}[verdict["met"]]
        lines.append(f"| {label} | {shown} | {met} |")
    return "\n".join(lines)


def missing(samples: dict[str, list[float]], metric_list: tuple[Metric, ...]) -> list[str]:
    return [metric.key for metric in metric_list if not samples.get(metric.key)]


# -- the page ------------------------------------------------------------------------------------

PAGE_HEAD = """# cloudfs write-path benchmark

Produced by `python -m bench write` (see `bench/README.md`); rerun it to refresh this page. Each
setup (loopback, `--wan`, another server) has its own section, rewritten by a run of that setup.
"""


def section_name(result: dict[str, Any]) -> str:
    options = result["options"]
    name = "loopback" if not options.get("wan") else "wan"
    return name if options["server"] == "s3rver" else f"{name}-{options['server']}"


def section(result: dict[str, Any], table: str) -> str:
    machine = result["machine"]
    options = result["options"]
    endpoint = result["endpoint"]
    where = f", behind a WAN proxy ({options['wan']})" if options.get("wan") else " (loopback)"
    title = "Behind the WAN proxy" if options.get("wan") else "Loopback"
    if options["server"] != "s3rver":
        title += f", {options['server']}"
    lines = [
        f"## {title}",
        "",
        f"- Date: {result['date']}",
        f"- Machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['memory_gib']} GiB RAM, "
        f"Linux {machine['kernel']}, Python {machine['python']}",
        f"- Cache disk: {result['disk']}",
        f"- cloudfs: commit {result['revision']}",
        f"- Command: `{result['command']}` (from the repository root; took "
        f"{result['runtime_seconds'] / 60:.1f} min)",
        f"- Endpoint: {endpoint['kind']} on 127.0.0.1{where}",
        f"- Large file: {options['size_bytes'] / 2**20:.0f} MiB; ingest: {options['files']} files "
        f"of {options['file_size'] // 1024} KiB; {options['repeat']} repetitions, systems in "
        f"rotating order; cloudfs mounted with `{' '.join(options['mount_options'])}`, "
        f"defaults otherwise, a fresh cache directory per measurement",
        "",
        table,
        "",
        "Notes:",
        "",
    ]
    lines += [f"- {note}" for note in result["notes"]]
    if result["errors"]:
        lines += ["", "Errors:", ""] + [f"- {error}" for error in result["errors"]]
    return "\n".join(lines)


def updated_page(existing: str | None, name: str, body: str, head: str = PAGE_HEAD) -> str:
    """The page with the section ``name`` replaced by ``body`` (added if new), others kept; a
    page that does not start with ``head``'s title is started afresh."""
    start, end = f"<!-- section: {name} -->", f"<!-- end of section: {name} -->"
    block = f"{start}\n{body}\n{end}"
    if existing and start in existing and end in existing:
        pattern = re.escape(start) + r".*?" + re.escape(end)
        return re.sub(pattern, lambda _: block, existing, count=1, flags=re.DOTALL)
    page = existing if existing and existing.startswith(head.splitlines()[0]) else head
    return page.rstrip("\n") + "\n\n" + block + "\n"
