"""What the write and viewer benchmarks add to the read benchmark's ``Bench``, written once.

Both run cloudfs in many short mounts, each on its own cache directory, and publish one section
per setup on a docs page.  So both need to know which code they measured (the commit, and whether
cloudfs's sources changed during the run: each mount runs them as they are when it starts), to
keep a mount's log when a measurement fails (the cache directory holding it is deleted
afterwards), to sum up the daemon's warnings by kind rather than line by line, and to write the
result and the page the same way.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .mounts import CloudfsMount
from .report import section, section_name, updated_page, write_json
from .run import Bench, conclude, execute
from .servers import REPO
from .system import BenchError, read_ahead_kb


class TrackedBench(Bench):
    """A ``Bench`` that records the commit it measures and the daemon's warnings by kind."""

    kind = ""
    """The name in ``bench/results/<kind>-<setup>.json`` and ``docs/benchmarks-<kind>.md``."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.revision = ""
        self.sources = ""
        self.log_kinds: dict[str, list[str]] = {}

    def start(self) -> None:
        """The first steps of ``setup``: note what is measured, then touch memory."""
        self.revision = revision()
        self.sources = sources_digest()
        self.say(f"scratch directory {self.workdir}; cloudfs at {self.revision}")
        self.prefault()

    def in_mount(
        self,
        mount: CloudfsMount,
        rep: int,
        label: str,
        facts: dict[str, Any],
        body: Callable[[float], None],
    ) -> None:
        """Run ``body(time the mount began)`` with ``mount`` mounted; the time to mount and the
        mount's read-ahead go into ``facts`` first.  Unexpected errors come with the log's tail;
        on failure the log is copied out of the cache directory; the warnings and errors written
        during this mount go into ``facts``."""
        offset = mount.log_size()
        try:
            started = time.perf_counter()
            with self.mounted(mount):
                facts[f"{label}_mount_seconds"] = round(time.perf_counter() - started, 3)
                facts["read_ahead_kb"] = read_ahead_kb(mount.mountpoint)
                try:
                    body(started)
                except BenchError:
                    raise
                except Exception as exc:
                    raise BenchError(f"{exc}\n{mount.log_tail()}") from exc
        except BaseException:
            if mount.log_path.exists():  # the evidence outlives the cache directory
                shutil.copyfile(mount.log_path, self.workdir / f"cloudfs-{rep}-{label}.log")
            raise
        finally:
            problems = mount.log_problems(offset)
            if problems:
                facts.setdefault("log_problems", []).extend(problems[-20:])
                facts["log_problem_count"] = facts.get("log_problem_count", 0) + len(problems)
                for line in problems:
                    phase = f"{label} (repetition {rep + 1})"
                    self.log_kinds.setdefault(log_kind(line), []).append(f"{phase}: {line}")

    def closing_notes(self) -> None:
        """Notes on the run as a whole: memory pre-touch, sources changed meanwhile, and one
        per kind of warning or error the daemons logged."""
        self.prefault_note()
        if self.sources and sources_digest() != self.sources:
            self.notes.append(
                "**cloudfs's sources changed during the run** (each mount runs the code as it is "
                "then): the figures may mix two versions of cloudfs."
            )
        for kind, lines in self.log_kinds.items():
            self.notes.append(
                f"cloudfs's log has {len(lines)} warning/error line{'s' if len(lines) > 1 else ''} "
                f"of the kind `{kind}`; the first: {lines[0]}"
            )

    def document(self, runtime: float, missing: list[str], **figures: Any) -> dict[str, Any]:
        """The read benchmark's document, with the cache disk and the commit measured."""
        return super().document(
            runtime, missing, disk=disk_of(self.workdir), revision=self.revision, **figures
        )


def publish(bench: TrackedBench, workload: Callable[[dict[str, Any]], str], head: str) -> int:
    """Run ``bench`` and keep its result as ``bench/results/<kind>-<setup>.json`` (or
    ``<kind>-quick.json``); unless ``--no-docs`` or stopped, rewrite the setup's section of
    ``docs/benchmarks-<kind>.md`` (``head`` starts a new page; ``workload(options)`` says what
    was measured)."""
    result, table, interrupted = execute(bench)
    setup = section_name(result)
    name = f"{bench.kind}-quick.json" if bench.args.quick else f"{bench.kind}-{setup}.json"
    write_json(REPO / "bench" / "results" / name, result)
    if not (bench.args.no_docs or interrupted):
        path = REPO / "docs" / f"benchmarks-{bench.kind}.md"
        existing = path.read_text() if path.exists() else None
        body = section(result, table, workload(result["options"]))
        path.write_text(updated_page(existing, setup, body, head))
    return conclude(bench, result, interrupted, name)


def log_kind(line: str) -> str:
    """A log line without its time, paths, names and numbers, to count lines of one kind."""
    text = line.split(" WARNING ", 1)[-1].split(" ERROR ", 1)[-1]
    text = re.sub(r"[\w.-]+(?:/[\w.-]+)*\.(?:dcm|bin)\b", "<key>", text)
    text = re.sub(r"/[^\s:]+", "<path>", text)
    text = re.sub(r'"[0-9a-f-]+"', "<etag>", text)
    return re.sub(r"\d+", "N", text)


def revision() -> str:
    """The commit measured, and whether cloudfs's sources differed from it (edited meanwhile)."""
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    changed = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "cloudfs"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return head.stdout.strip() + (" with uncommitted changes in cloudfs/" if changed else "")


def sources_digest() -> str:
    """A digest of cloudfs's Python sources: a mount runs them as they are when it starts, so a
    change during the run would mix versions in one table."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "cloudfs").rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def disk_of(path: Path) -> str:
    """The device and filesystem holding ``path`` (cloudfs's cache and the local figures)."""
    result = subprocess.run(
        ["findmnt", "-n", "-o", "SOURCE,FSTYPE", "-T", str(path)], capture_output=True, text=True
    )
    found = result.stdout.split()
    if result.returncode != 0 or len(found) < 2:
        return f"{path} (device unknown)"
    return f"{found[0]} ({found[1]}), scratch directory under {path.parent}"
