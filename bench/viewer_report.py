"""The viewer benchmark's table, targets and page, ``docs/benchmarks-viewer.md``.

One row per way of getting the series to the radiologist's screen, with the two figures a
radiologist notices: how long until the first image shows, and how long until the whole series
can be scrolled.  Every cloudfs row is put next to the fastest way the same endpoint delivers the
series at all (boto3 with 8 readers, measured in the same run), so the ratio says what cloudfs
costs, whatever the link.

As for the other benchmarks, every figure is the median over the repetitions with each run's
value beside it.  The page has one section per setup (loopback, ``--wan``, another server), so a
run rewrites its own and keeps the others.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import report
from .report import Target, medians

MB = 1e6


@dataclass(frozen=True)
class Row:
    key: str
    label: str


ROWS = (
    Row("boto3_1", "boto3, 1 reader: one GET per instance, in order"),
    Row("boto3_8", "boto3, 8 parallel readers (the fastest parallel download)"),
    Row("cloudfs_on", "cloudfs, study prefetch on (default), cold"),
    Row("cloudfs_off", "cloudfs, `--no-study-prefetch`, cold"),
    Row("cloudfs_disk", "cloudfs, warm: disk cache (remounted, page cache dropped)"),
    Row("cloudfs_again", "cloudfs, warm: the same mount again (page cache dropped)"),
)
LIMIT = "boto3_8"
"""The row every series time is divided by."""
INDEX_ROWS = (
    Row("cloudfs_on_index", "mount to a complete DICOM index, empty cache (prefetch on)"),
    Row("cloudfs_off_index", "mount to a complete DICOM index, empty cache (prefetch off)"),
    Row("cloudfs_disk_index", "remount to a complete DICOM index, cache kept"),
)


def metric_keys() -> list[str]:
    """Every sampled figure: first image (ms) and whole series (s) per row, index time (s)."""
    keys = [f"{row.key}_{part}" for row in ROWS for part in ("first_ms", "total_s")]
    return keys + [f"{row.key}_s" for row in INDEX_ROWS]


TARGETS = (
    Target("first image, cold, prefetch on: < 2 s", "cloudfs_on_first_ms", 2000.0),
    Target("first image, cold, prefetch off: < 2 s", "cloudfs_off_first_ms", 2000.0),
    Target("first image, warm (disk cache): < 50 ms", "cloudfs_disk_first_ms", 50.0),
    Target("first image, warm (same mount again): < 50 ms", "cloudfs_again_first_ms", 50.0),
    Target(
        "whole series with prefetch: <= 1.5 x boto3 8 readers",
        "cloudfs_on_total_s",
        1.5,
        of=f"{LIMIT}_total_s",
        inclusive=True,
    ),
)


def ratios(middle: dict[str, float]) -> dict[str, float]:
    """Each row's median series time over the 8-reader download's."""
    return report.ratios(
        middle, [(row.key, f"{row.key}_total_s", f"{LIMIT}_total_s") for row in ROWS]
    )


def verdicts(middle: dict[str, float]) -> dict[str, dict[str, Any]]:
    return report.verdicts(middle, TARGETS)


def _ms(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _s(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _cell(values: list[float], shown: Callable[[float], str]) -> str:
    if not values:
        return "**missing**"
    median = shown(statistics.median(values))
    if len(values) == 1:
        return median
    return f"{median} ({', '.join(shown(v) for v in values)})"


def tables(samples: dict[str, list[float]], series_bytes: int) -> str:
    middle = medians(samples)
    found = ratios(middle)
    lines = [
        "| System | First image (ms) | Whole series (s) | MB/s | Series time / boto3 8 readers |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in ROWS:
        total = middle.get(f"{row.key}_total_s")
        rate = f"{series_bytes / total / MB:.0f}" if total else "-"
        ratio = f"{found[row.key]:.2f}" if row.key in found else "-"
        first = _cell(samples.get(f"{row.key}_first_ms", []), _ms)
        whole = _cell(samples.get(f"{row.key}_total_s", []), _s)
        lines.append(f"| {row.label} | {first} | {whole} | {rate} | {ratio} |")
    lines += ["", "| Before the viewer starts | Seconds |", "| --- | ---: |"]
    for row in INDEX_ROWS:
        lines.append(f"| {row.label} | {_cell(samples.get(f'{row.key}_s', []), _s)} |")
    lines += ["", *report.target_table(verdicts(middle), _target)]
    return "\n".join(lines)


def _target(label: str, value: float) -> str:
    return f"{value:.2f} x" if label.startswith("whole series") else f"{_ms(value)} ms"


def missing(samples: dict[str, list[float]]) -> list[str]:
    return report.missing(samples, metric_keys())


# -- the page ------------------------------------------------------------------------------------

PAGE_HEAD = """# cloudfs viewer benchmark

Produced by `python -m bench viewer` (see `bench/README.md`); rerun it to refresh this page. A
viewer reads a cold CT series instance by instance, through cloudfs with study prefetch on and
off, beside the fastest download of the same series with boto3 from the same endpoint. Each
setup (loopback, `--wan`, another server) has its own section, rewritten by a run of that setup.
"""


def workload(options: dict[str, Any]) -> str:
    """What a run measured, for its section of the page."""
    counts = options["series_instances"]
    return (
        f"Study: one CT study, series of {' and '.join(map(str, counts))} instances of 512 x 512 "
        f"x 16 bits ({options['instance_bytes'] / 1024:.0f} KiB each); the viewer reads the "
        f"{counts[0]}-instance series ({options['series_bytes'] / 2**20:.0f} MiB) in Instance "
        f"Number order; {options['repeat']} repetitions, systems in rotating order; cloudfs "
        f"mounted with `{' '.join(options['mount_options'])}` and defaults otherwise, a fresh "
        f"cache directory per mount"
    )
