"""The comparison suite's quick mode keeps working: ``python -m bench suite --quick``.

A harness check, never a speed check: every system must have mounted or be reported as failed
with a reason, and every workload must have produced a figure for each system that mounted.
It runs the real thing (s3rver through npm, FUSE mounts, dropping the page cache), so it needs
root, /dev/fuse and node; it takes about 2 minutes on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RESULT = REPO / "bench" / "results" / "suite-quick.json"


def test_quick_suite_produces_every_figure() -> None:
    missing = [
        what
        for what, present in (
            ("root (the suite drops caches and mounts)", os.geteuid() == 0),
            ("/dev/fuse", Path("/dev/fuse").exists()),
            ("node and npm (for s3rver; ./dev setup installs them)", shutil.which("node")),
        )
        if not present
    ]
    if missing:
        pytest.fail("the quick suite needs: " + ", ".join(missing), pytrace=False)
    RESULT.unlink(missing_ok=True)
    run = subprocess.run(
        [sys.executable, "-m", "bench", "suite", "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert RESULT.exists(), f"no result written\n{run.stderr[-3000:]}"
    result = json.loads(RESULT.read_text())
    suite = result["suite"]
    assert set(suite["status"]) == {"cloudfs", "s3fs", "rclone"}
    for system, state in suite["status"].items():
        # a peer may fail to install or mount, but then it says why
        assert state == "ok" or (state.startswith("mount failed: ") and len(state) > 14), system
    assert suite["status"]["cloudfs"] == "ok", run.stderr[-3000:]
    for row in suite["rows"]:
        for system, state in suite["status"].items():
            value = row["values"][system]
            if state == "ok":
                assert "median" in value, f"{system} {row['key']}: {value}"
            else:
                assert "failed" in value
    assert suite["limits"].keys() == {
        "boto3_single",
        "boto3_parallel",
        "local_cold",
        "local_warm",
        "memfs_128",
        "memfs_1024",
    }
    assert suite["catalog"]["rss_bytes"] > 0
    assert not suite["missing"], suite["missing"]
    assert run.returncode == 0, run.stderr[-3000:]
