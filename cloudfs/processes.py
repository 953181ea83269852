"""Which program a request comes from: the path of ``/proc/<pid>/exe``, remembered per pid.

The kernel gives every FUSE request the caller's pid; the audit trail names the program that read a
study, and the read path treats backup programs differently.  A viewer makes thousands of requests
from one pid, so the answer is remembered; for a bounded time, which limits how long a pid reused
by another program could be taken for the old one.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict

REMEMBERED = 1024
"""Processes whose executable is remembered."""
REMEMBERED_SECONDS = 300.0
"""A remembered executable is looked up again after this long."""


class Executables:
    """Thread-safe: the audit writer asks from worker threads, the read path from the trio one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: OrderedDict[int, tuple[str, float]] = OrderedDict()

    def of(self, pid: int) -> str:
        """The executable's path; ``''`` when unreadable (the process is gone, or belongs to a
        user this daemon may not inspect)."""
        now = time.monotonic()
        with self._lock:
            known = self._known.get(pid)
            if known is not None and now - known[1] < REMEMBERED_SECONDS:
                self._known.move_to_end(pid)
                return known[0]
        try:
            executable = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            executable = ""
        with self._lock:
            self._known[pid] = (executable, now)
            self._known.move_to_end(pid)
            while len(self._known) > REMEMBERED:
                self._known.popitem(last=False)
        return executable
