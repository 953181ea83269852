"""The encryption benchmark's table and its page, ``docs/benchmarks-crypto.md``.

One row per figure, cloudfs without and with a cache key side by side, and their ratio: the
ratio is the cost of encryption at rest, whatever the machine.  Beside them, the machine's raw
AES-GCM speed on one core: decrypting a block cannot go faster than that, so it says how much of
a cached read's time decryption can take at all.

As in the other reports, every figure is the median over the repetitions with each run's value
beside it, and the page has one section per setup (loopback, ``--wan``, another server).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import report
from .report import Metric, Ratio, medians

VARIANTS = ("plain", "encrypted")
"""cloudfs without a cache key, then with one; a sample's key is ``<variant>_<figure>``."""


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    """With ``{size}``, ``{files}`` and ``{entries}`` standing for the sizes of the run."""
    unit: str
    """MB/s or files/s (higher is better), ms or s (lower is better)."""

    def labelled(self, options: dict[str, Any]) -> str:
        return self.label.format(
            size=f"{options['size_bytes'] / 2**20:.0f} MiB",
            files=f"{options['files']} x {options['file_size'] // 1024} KiB",
            entries=f"{options['entries']:,}",
        )


FIGURES = (
    Figure("cold_seq", "read {size}, cold: empty cache (dd bs=1M)", "MB/s"),
    Figure(
        "cached_seq", "read {size}, first from the disk cache (remount, page cache dropped)", "MB/s"
    ),
    Figure("random_p50", "random 64 KiB pread from the disk cache, p50", "ms"),
    Figure("random_p99", "random 64 KiB pread from the disk cache, p99", "ms"),
    Figure("write_dd", "write {size}: dd bs=1M conv=fsync, acknowledged", "MB/s"),
    Figure("write_in_bucket", "write {size}: dd start to the object in the bucket", "s"),
    Figure("ingest", "PACS ingest {files}, fdatasync each, acknowledged", "files/s"),
    Figure("ingest_in_bucket", "PACS ingest {files}: start to all in the bucket", "s"),
    Figure("catalog_mount", "first mount: {entries} objects listed into the catalog", "s"),
    Figure("ls_remount", "`ls -l` of {entries} entries after a remount (catalog from disk)", "s"),
    Figure("ls_warm", "`ls -l` of {entries} entries, warm (kernel caches dropped)", "s"),
)

LIMITS = (
    Metric("aesgcm_seal", "AES-256-GCM seal, 1 MiB buffers, one thread (cryptography)", "MB/s"),
    Metric("aesgcm_open", "AES-256-GCM open, 1 MiB buffers, one thread (cryptography)", "MB/s"),
)


def metric_keys() -> list[str]:
    """Every sampled figure: each figure for each variant, then the limits."""
    keys = [f"{variant}_{figure.key}" for figure in FIGURES for variant in VARIANTS]
    return keys + [limit.key for limit in LIMITS]


def ratio_rows() -> tuple[Ratio, ...]:
    """Per figure: encrypted / plain, labelled with the figure's key."""
    return tuple((f.key, f"encrypted_{f.key}", f"plain_{f.key}") for f in FIGURES)


def ratios(middle: dict[str, float]) -> dict[str, float]:
    return report.ratios(middle, ratio_rows())


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def _each(values: list[float], shown: Callable[[float], str]) -> str:
    return ", ".join(shown(value) for value in values) or "-"


def tables(samples: dict[str, list[float]], options: dict[str, Any]) -> str:
    middle = medians(samples)
    found = ratios(middle)
    lines = [
        "| Measurement | Unit | Plain | Encrypted | Encrypted / plain | Plain, each run "
        "| Encrypted, each run |",
        "| --- | --- | ---: | ---: | ---: | --- | --- |",
    ]
    for figure in FIGURES:
        cells = []
        for variant in VARIANTS:
            values = samples.get(f"{variant}_{figure.key}", [])
            cells.append(_number(statistics.median(values)) if values else "**missing**")
        ratio = f"{found[figure.key]:.2f}" if figure.key in found else "-"
        each = [_each(samples.get(f"{v}_{figure.key}", []), _number) for v in VARIANTS]
        lines.append(
            f"| {figure.labelled(options)} | {figure.unit} | {cells[0]} | {cells[1]} | {ratio} "
            f"| {each[0]} | {each[1]} |"
        )
    lines += ["", *report.measurement_table(samples, LIMITS, lambda _, v: _number(v))]
    return "\n".join(lines)


# -- the page ------------------------------------------------------------------------------------

PAGE_HEAD = """# cloudfs encryption-at-rest benchmark

Produced by `python -m bench crypto` (see `bench/README.md`); rerun it to refresh this page.
cloudfs mounted without and with a cache key (`--cache-key-file`), on the same endpoint and the
same bytes, in alternating order; the ratio encrypted / plain is the cost of the key. Each setup
(loopback, `--wan`, another server) has its own section, rewritten by a run of that setup.
"""


def workload(options: dict[str, Any]) -> str:
    """What a run measured, for its section of the page."""
    return (
        f"Object and written file: {options['size_bytes'] / 2**20:.0f} MiB; "
        f"{options['random_reads']} random reads per run; ingest: {options['files']} files of "
        f"{options['file_size'] // 1024} KiB; listing: {options['entries']:,} objects; "
        f"{options['repeat']} repetition{'s' if options['repeat'] > 1 else ''}, plain and "
        f"encrypted in alternating order; cloudfs "
        f"mounted with `{' '.join(options['mount_options'])}` (plus `--cache-key-file` for "
        f"the encrypted mounts), a fresh cache directory per workload"
    )
