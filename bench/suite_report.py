"""The suite's figures as one comparison table, the limits beside it, the issue's targets, and
docs/benchmarks.md.

Every cell is the median over the repetitions with each run's value in brackets, so a reader sees
the spread.  The "cloudfs vs best peer" column is a factor where above 1 means cloudfs is better
(throughputs are divided as cloudfs / peer, times as peer / cloudfs), so one reading rule holds for
every row.  A system that never mounted shows its reason in every cell of its column, and a
workload that failed shows the failure, so nothing is silently absent.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from typing import Any

from .report import run_facts


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    unit: str
    higher_is_better: bool


ROWS = (
    Row("seq_cold", "1. sequential read, cold", "MB/s", True),
    Row("seq_warm", "1. sequential read, warm (daemon cache)", "MB/s", True),
    Row("random_cold_p50", "2. random 64 KiB read, cold, p50", "ms", False),
    Row("random_cold_p99", "2. random 64 KiB read, cold, p99", "ms", False),
    Row("random_warm_p50", "2. random 64 KiB read, warm, p50", "ms", False),
    Row("random_warm_p99", "2. random 64 KiB read, warm, p99", "ms", False),
    Row("viewer_first", "3. viewer: first image", "s", False),
    Row("viewer_total", "3. viewer: whole series", "s", False),
    Row("mount_tree_answer", "4. mount of the bucket holding the tree: answers", "s", False),
    Row("mount_tree", "4. mount of the bucket holding the tree: every entry listed", "s", False),
    Row("ls_cold", "4. `ls -l` of the big directory, cold", "s", False),
    Row("ls_warm", "4. `ls -l` of the big directory, warm", "s", False),
    Row("find_cold", "4. `find` over the tree, cold", "s", False),
    Row("find_warm", "4. `find` over the tree, warm", "s", False),
    Row("backup", "5. backup: `tar` of the mixed tree", "MB/s", True),
    Row(
        "hot_after_backup", "5. hot study still served from cache after the backup", "yes/no", True
    ),
    Row("ingest_rate", "6. PACS ingest with fsync (acknowledged)", "files/s", True),
    Row("ingest_bucket", "6. PACS ingest: time until all in the bucket", "s", False),
    Row("peak_rss", "7. daemon peak RSS over the run", "MiB", False),
)
LIMITS = (
    ("boto3_single", "S3 endpoint, boto3: one GET stream", "MB/s"),
    ("boto3_parallel", "S3 endpoint, boto3: 8 threads x 8 MiB ranged GETs", "MB/s"),
    ("local_cold", "local disk, page cache dropped (dd bs=1M)", "MB/s"),
    ("local_warm", "local disk, page cache (dd bs=1M)", "MB/s"),
    ("memfs_128", "no-op pyfuse3 ceiling, read_ahead_kb=128", "MB/s"),
    ("memfs_1024", "no-op pyfuse3 ceiling, read_ahead_kb=1024", "MB/s"),
)
EXPLANATIONS = "## Where a peer is ahead, why, and what would close it"


def summarize(
    figures: dict[str, dict[str, list[float]]],
    limits: dict[str, list[float]],
    rss: dict[str, int],
    catalog: dict[str, Any],
    failures: dict[str, list[str]],
    mounted: dict[str, int],
    *,
    wan: bool,
    setup_error: str | None = None,
) -> dict[str, Any]:
    """Everything the table, the targets and the JSON say, from the raw samples."""
    status = {}
    for system, count in mounted.items():
        if count:
            status[system] = "ok"
        elif setup_error and not failures[system]:
            status[system] = f"not measured: {setup_error}"
        else:
            reason = failures[system][0] if failures[system] else "never mounted"
            status[system] = f"mount failed: {reason}"
    rows = []
    missing = []
    for row in ROWS:
        values: dict[str, Any] = {}
        for system, state in status.items():
            if state != "ok":
                values[system] = {"failed": state}
                continue
            samples = figures[system].get(row.key, [])
            if row.key == "peak_rss" and system in rss:
                samples = [rss[system] / 2**20]
            if samples:
                values[system] = {"median": statistics.median(samples), "samples": samples}
            else:
                why = [f for f in failures[system] if f.startswith(workload_of(row.key))]
                values[system] = {"failed": why[0] if why else "no figure"}
                missing.append(f"{system} {row.key}")
        rows.append({"key": row.key, **_compare(row, values), "values": values})
    limit_figures = {
        key: {"median": statistics.median(limits[key]), "samples": limits[key]}
        for key, _, _ in LIMITS
        if limits.get(key)
    }
    missing += [f"limit {key}" for key, _, _ in LIMITS if key not in limit_figures]
    if status.get("cloudfs") == "ok" and not catalog:
        missing.append("cloudfs catalog_rss")
    summary = {
        "status": status,
        "rows": rows,
        "limits": limit_figures,
        "catalog": catalog,
        "failures": failures,
        "missing": missing,
    }
    summary["targets"] = targets(summary, wan=wan)
    return summary


def workload_of(key: str) -> str:
    """The workload (a method of the suite) that produces the figure ``key``."""
    prefixes = {
        "seq": "sequential",
        "random": "random",
        "viewer": "viewer",
        "ls": "listing",
        "mount": "listing",
        "find": "walk",
        "backup": "backup",
        "hot": "backup",
        "ingest": "ingest",
    }
    return prefixes.get(key.split("_")[0], key)


def _compare(row: Row, values: dict[str, Any]) -> dict[str, Any]:
    """The best peer of ``row`` and cloudfs's advantage over it (above 1: cloudfs better)."""
    peers = {
        system: value["median"]
        for system, value in values.items()
        if system != "cloudfs" and "median" in value
    }
    ours = values.get("cloudfs", {}).get("median")
    if not peers:
        return {"best_peer": None, "advantage": None}
    pick = max if row.higher_is_better else min
    best = pick(peers, key=lambda s: peers[s])
    if ours is None or row.unit == "yes/no":
        return {"best_peer": best, "advantage": None}
    theirs = peers[best]
    if row.higher_is_better:
        advantage = ours / theirs if theirs else None
    else:
        advantage = theirs / ours if ours else None
    return {"best_peer": best, "advantage": advantage}


def _row(summary: dict[str, Any], key: str) -> dict[str, Any]:
    return next(row for row in summary["rows"] if row["key"] == key)


def targets(summary: dict[str, Any], *, wan: bool) -> list[dict[str, Any]]:
    """The issue's targets, met or not; they are stated for a run with the WAN emulator."""
    found = []

    def judge(name: str, value: float | None, met: bool | None, shown: str) -> None:
        found.append(
            {
                "target": name,
                "value": value,
                "met": met,
                "shown": shown,
                "judged": wan,
            }
        )

    def advantage(key: str) -> float | None:
        value = _row(summary, key)["advantage"]
        return None if value is None else float(value)

    for key, name in (
        ("seq_cold", "cold sequential read >= 2x the best peer"),
        ("viewer_total", "viewer (whole series) >= 2x the best peer"),
    ):
        value = advantage(key)
        judge(name, value, None if value is None else value >= 2, _factor(value))
    ours = _row(summary, "seq_cold")["values"].get("cloudfs", {}).get("median")
    parallel = summary["limits"].get("boto3_parallel", {}).get("median")
    share = ours / parallel if ours and parallel else None
    judge(
        "cold sequential read >= 80% of boto3 parallel ranged GETs",
        share,
        None if share is None else share >= 0.8,
        "?" if share is None else f"{share:.0%}",
    )
    for key, name in (
        ("seq_warm", "warm sequential read within 20% of the best peer or better"),
        ("random_warm_p50", "warm random read (p50) within 20% of the best peer or better"),
    ):
        value = advantage(key)
        judge(name, value, None if value is None else value >= 1 / 1.2, _factor(value))
    warm = _row(summary, "ls_warm")["values"].get("cloudfs", {}).get("median")
    judge(
        "warm `ls -l` of the big directory < 1 s",
        warm,
        None if warm is None else warm < 1.0,
        "?" if warm is None else f"{warm:.2f} s",
    )
    return found


def _factor(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}x"


def _number(value: float, unit: str) -> str:
    if unit == "yes/no":
        return "yes" if value >= 0.5 else "no"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3f}"


def _cell(value: dict[str, Any], unit: str) -> str:
    if "failed" in value:
        return f"FAILED: {_clean(value['failed'])}"
    shown = _number(value["median"], unit)
    if len(value["samples"]) > 1:
        shown += " (" + ", ".join(_number(v, unit) for v in value["samples"]) + ")"
    return shown


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("|", "/"))[:160]


def tables(summary: dict[str, Any]) -> str:
    systems = list(summary["status"])
    lines = ["| Workload | Unit | " + " | ".join(systems) + " | best peer | cloudfs vs best peer |"]
    lines.append("| --- | --- |" + " --- |" * len(systems) + " --- | --- |")
    units = {row.key: row for row in ROWS}
    for row in summary["rows"]:
        meta = units[row["key"]]
        cells = [_cell(row["values"][s], meta.unit) for s in systems]
        advantage = row["advantage"]
        lines.append(
            f"| {meta.label} | {meta.unit} | "
            + " | ".join(cells)
            + f" | {row['best_peer'] or '-'} | {'-' if advantage is None else _factor(advantage)} |"
        )
    catalog = summary["catalog"]
    if catalog:
        rss = catalog.get("rss_bytes") or 0
        lines.append(
            f"| 7. cloudfs RSS with {catalog['objects']:,} objects cataloged | MiB | "
            + " | ".join(f"{rss / 2**20:.0f}" if s == "cloudfs" else "-" for s in systems)
            + " | - | - |"
        )
    lines += ["", "Limits measured in the same run:", "", "| Limit | MB/s |", "| --- | --- |"]
    for key, label, _ in LIMITS:
        value = summary["limits"].get(key)
        lines.append(f"| {label} | {_cell(value, 'MB/s') if value else 'missing'} |")
    lines += ["", "Targets of the issue (stated for a run with `--wan`):", ""]
    lines += ["| Target | cloudfs | Met |", "| --- | --- | --- |"]
    for target in summary["targets"]:
        met = "?" if target["met"] is None else ("yes" if target["met"] else "**no**")
        if not target["judged"]:
            met += " (loopback: not judged)"
        lines.append(f"| {target['target']} | {target['shown']} | {met} |")
    failed = [f"- {s}: {state}" for s, state in summary["status"].items() if state != "ok"]
    errors = [
        f"- {system}: {_clean(failure)}"
        for system, found in summary["failures"].items()
        for failure in found
        if summary["status"][system] == "ok"
    ]
    if failed or errors:
        lines += ["", "Failures:", "", *failed, *errors]
    return "\n".join(lines)


def page(result: dict[str, Any], table: str, existing: str | None) -> str:
    """docs/benchmarks.md: the latest full table, with the hand-written explanations of the
    existing page (the section titled ``EXPLANATIONS``) kept."""
    sizes = result["options"]["sizes"]
    kept = ""
    if existing and EXPLANATIONS in existing:
        kept = existing[existing.index(EXPLANATIONS) :].rstrip("\n")
    else:
        kept = f"{EXPLANATIONS}\n\nTo be explained from the figures of the table above."
    lines = [
        "# cloudfs benchmarks: cloudfs, s3fs-fuse and rclone mount side by side",
        "",
        "Produced by `python -m bench suite` (see `bench/README.md`); rerun it to refresh the "
        "table. The read, write and viewer benchmarks of cloudfs alone are in "
        "[benchmarks-read.md](benchmarks-read.md), [benchmarks-wan.md](benchmarks-wan.md), "
        "[benchmarks-write.md](benchmarks-write.md) and "
        "[benchmarks-viewer.md](benchmarks-viewer.md).",
        "",
        *run_facts(result),
        f"- Data: a {sizes['large'] / 2**20:.0f} MiB object ({sizes['random_reads']} random "
        f"reads); a CT series of {sizes['series']} instances of 513 KiB; a directory of "
        f"{sizes['tree_entries']:,} small objects; a mixed tree of "
        f"{sum(c * s for c, s in sizes['mixed']) / 2**20:.0f} MiB; an ingest of "
        f"{sizes['ingest_files']} files of {sizes['ingest_size'] // 1024} KiB; "
        f"{result['options']['repeat']} repetitions, systems in rotating order",
        "",
        "## Results",
        "",
        table,
        "",
        "## Notes",
        "",
        *(f"- {note}" for note in result["notes"]),
        "",
        kept,
    ]
    return "\n".join(lines) + "\n"
