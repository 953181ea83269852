"""The write benchmark's tables, targets and its page, ``docs/benchmarks-write.md``.

As in the read report, every figure is the median over the repetitions with each run's value
beside it, and each cloudfs figure is put next to the limit measured in the same run: the local
disk for what a writer waits for, the endpoint's raw boto3 uploads for how fast the bucket fills.

The page holds one section per setup (loopback, ``--wan``, another server), between markers, so
a run rewrites its own section and keeps the others.
"""

from __future__ import annotations

from typing import Any

from . import report
from .report import Metric, Ratio, Target, medians


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
    found += [
        Metric(
            "cloudfs_ingest_at_once",
            "cloudfs: PACS ingest, 1 thread, acknowledged, uploads beside the writes "
            "(--upload-delay 0)",
            "files/s",
        ),
        Metric(
            "cloudfs_ingest_at_once_in_bucket",
            "cloudfs: the same: start to all in the bucket",
            "s",
        ),
        Metric(
            "cloudfs_ingest_at_once_bucket_rate",
            "cloudfs: the same: files / time to all in the bucket",
            "files/s",
        ),
    ]
    for count in put_threads:
        found.append(
            Metric(
                f"boto3_put_{count}",
                f"S3 endpoint, raw boto3 put_object, {count} threads",
                "files/s",
            )
        )
    return tuple(found)


def ratio_rows(threads: tuple[int, ...], put_threads: tuple[int, ...]) -> tuple[Ratio, ...]:
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


def targets(threads: tuple[int, ...]) -> tuple[Target, ...]:
    found = [
        Target(
            "acknowledged write throughput >= 50% of the local-disk write",
            "cloudfs_dd",
            0.5,
            of="local_dd",
            higher=True,
        )
    ]
    for count in threads:
        label = f"PACS ingest >= 100 files/s with fdatasync, {_threads(count)}"
        found.append(Target(label, f"cloudfs_ingest_{count}", 100.0, higher=True))
    return tuple(found)


def _shown(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def tables(
    samples: dict[str, list[float]],
    metric_list: tuple[Metric, ...],
    rows: tuple[Ratio, ...],
    goals: tuple[Target, ...],
) -> str:
    middle = medians(samples)
    lines = report.measurement_table(samples, metric_list, lambda _, value: _shown(value))
    lines += ["", *report.ratio_table(middle, rows), ""]
    lines += report.target_table(
        report.verdicts(middle, goals),
        lambda _, value: f"{value:.2f}" if value < 10 else f"{value:.0f}",
    )
    return "\n".join(lines)


# -- the page ------------------------------------------------------------------------------------

PAGE_HEAD = """# cloudfs write-path benchmark

Produced by `python -m bench write` (see `bench/README.md`); rerun it to refresh this page. Each
setup (loopback, `--wan`, another server) has its own section, rewritten by a run of that setup.
"""


def workload(options: dict[str, Any]) -> str:
    """What a run measured, for its section of the page."""
    return (
        f"Large file: {options['size_bytes'] / 2**20:.0f} MiB; ingest: {options['files']} files "
        f"of {options['file_size'] // 1024} KiB; {options['repeat']} repetitions, systems in "
        f"rotating order; cloudfs mounted with `{' '.join(options['mount_options'])}`, "
        f"defaults otherwise, a fresh cache directory per measurement"
    )
