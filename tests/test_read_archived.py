"""Opening an archived (GLACIER) object with the store not answering: the open fails with EIO
after about io_timeout, never a hang, and answers normally once the store is back."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest
from helpers_unit import InstrumentedStore, Rig, ino_of, make_rig, run_fs

from cloudfs.config import MountOptions
from cloudfs.errors import CloudfsError
from cloudfs.fs import ArchiveFS
from cloudfs.store import ObjectInfo

pytestmark = pytest.mark.timeout(60)

IO_TIMEOUT = 1.0


class ArchiveStore(InstrumentedStore):
    """Every object is in GLACIER, not restored; the calls named in ``hanging`` ("head",
    "restore") do not answer until ``release()``."""

    def __init__(self, inner: InstrumentedStore, hanging: set[str]) -> None:
        super().__init__(inner.inner)
        self.hanging = hanging
        self.restore_requests: list[str] = []
        self._released = threading.Event()

    def _answer(self, call: str) -> None:
        if call in self.hanging:
            self._released.wait(20)

    def head(self, key: str) -> ObjectInfo:
        self._answer("head")
        base = self.inner.head(key)
        return ObjectInfo(key, base.size, base.mtime_ns, base.etag, "GLACIER")

    def request_restore(self, key: str, days: int) -> None:
        self.restore_requests.append(key)
        self._answer("restore")

    def release(self) -> None:
        self.hanging = set()
        self._released.set()


def archived_rig(tmp_path: Path, hanging: set[str], mount: MountOptions | None = None) -> Rig:
    rig = make_rig(tmp_path, {"cold.dcm": b"archived bytes"}, mount=mount, io_timeout=IO_TIMEOUT)
    info = rig.store.head("cold.dcm")
    rig.catalog.refresh_object(
        ObjectInfo(info.key, info.size, info.mtime_ns, info.etag, "GLACIER"), info.key
    )
    rig.store = ArchiveStore(rig.store, hanging)
    return rig


async def timed_open_errno(fs: ArchiveFS, path: str) -> tuple[int, float]:
    ino = await ino_of(fs, path)
    started = time.monotonic()
    with pytest.raises(CloudfsError) as caught:
        await fs.open(ino, os.O_RDONLY)
    return caught.value.errno, time.monotonic() - started


def test_open_of_archived_object_is_eio_within_io_timeout_when_head_hangs(tmp_path: Path) -> None:
    """A HEAD that never answers fails the open with EIO after about io_timeout; once the store
    answers, the open fails with EACCES as usual for an object needing a restore."""
    rig = archived_rig(tmp_path, {"head"})
    store = rig.store
    assert isinstance(store, ArchiveStore)

    async def body(fs: ArchiveFS) -> None:
        code, seconds = await timed_open_errno(fs, "cold.dcm")
        assert code == errno.EIO
        assert IO_TIMEOUT * 0.9 <= seconds < IO_TIMEOUT + 1.5
        store.release()
        code, seconds = await timed_open_errno(fs, "cold.dcm")
        assert code == errno.EACCES
        assert seconds < 1.0

    try:
        run_fs(rig, body)
    finally:
        store.release()
        rig.close()


def test_hung_restore_request_is_eio_and_asked_again_at_the_next_open(tmp_path: Path) -> None:
    """With --restore-days, a restore request that never answers fails the open with EIO within
    io_timeout and is not taken as done: the next open asks for the restore again."""
    rig = archived_rig(tmp_path, {"restore"}, MountOptions(restore_days=2))
    store = rig.store
    assert isinstance(store, ArchiveStore)

    async def body(fs: ArchiveFS) -> None:
        code, seconds = await timed_open_errno(fs, "cold.dcm")
        assert code == errno.EIO
        assert seconds < IO_TIMEOUT + 1.5
        store.release()
        code, _ = await timed_open_errno(fs, "cold.dcm")
        assert code == errno.EACCES
        assert store.restore_requests == ["cold.dcm", "cold.dcm"]

    try:
        run_fs(rig, body)
    finally:
        store.release()
        rig.close()
