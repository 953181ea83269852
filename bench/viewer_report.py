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

from .report import medians
from .write_report import updated_page

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


@dataclass(frozen=True)
class Target:
    label: str
    key: str
    threshold: float
    of: str | None = None
    """Compare ``key / of`` with the threshold instead of ``key`` itself."""
    inclusive: bool = False
    """Met at the threshold itself (``<=``) rather than only below it."""


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
    bottom = middle.get(f"{LIMIT}_total_s")
    return {
        row.key: middle[f"{row.key}_total_s"] / bottom
        for row in ROWS
        if bottom and middle.get(f"{row.key}_total_s")
    }


def verdicts(middle: dict[str, float]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for goal in TARGETS:
        value = middle.get(goal.key)
        if value is not None and goal.of is not None:
            value = value / middle[goal.of] if middle.get(goal.of) else None
        met = None
        if value is not None:
            met = value <= goal.threshold if goal.inclusive else value < goal.threshold
        found[goal.label] = {"value": value, "threshold": goal.threshold, "met": met}
    return found


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
    lines += ["", "| Target | Value | Met |", "| --- | ---: | --- |"]
    for label, verdict in verdicts(middle).items():
        value = verdict["value"]
        if value is None:
            shown = "-"
        elif label.startswith("whole series"):
            shown = f"{value:.2f} x"
        else:
            shown = f"{_ms(value)} ms"
        met = {True: "met", False: "**not met**", None: "no figure"}[verdict["met"]]
        lines.append(f"| {label} | {shown} | {met} |")
    return "\n".join(lines)


def missing(samples: dict[str, list[float]]) -> list[str]:
    return [key for key in metric_keys() if not samples.get(key)]


# -- the page ------------------------------------------------------------------------------------

PAGE_HEAD = """# cloudfs viewer benchmark

Produced by `python -m bench viewer` (see `bench/README.md`); rerun it to refresh this page. A
viewer reads a cold CT series instance by instance, through cloudfs with study prefetch on and
off, beside the fastest download of the same series with boto3 from the same endpoint. Each
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
    counts = options["series_instances"]
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
        f"- Study: one CT study, series of {' and '.join(map(str, counts))} instances of 512 x 512 "
        f"x 16 bits ({options['instance_bytes'] / 1024:.0f} KiB each); the viewer reads the "
        f"{counts[0]}-instance series ({options['series_bytes'] / 2**20:.0f} MiB) in Instance "
        f"Number order; {options['repeat']} repetitions, systems in rotating order; cloudfs "
        f"mounted with `{' '.join(options['mount_options'])}` and defaults otherwise, a fresh "
        f"cache directory per mount",
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


def page(existing: str | None, result: dict[str, Any], table: str) -> str:
    return updated_page(existing, section_name(result), section(result, table), PAGE_HEAD)
