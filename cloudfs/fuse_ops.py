"""The only module that imports pyfuse3: turns kernel requests into ArchiveFS calls and back.

pyfuse3 catches only FUSEError; any other exception ends ``pyfuse3.main()`` and leaves a dead
mount.  Every handler therefore goes through ``_guard``: expected failures become their errno,
anything unexpected is logged once with its traceback and becomes EIO.

``serve`` owns the FUSE session: mount, the trio loop with the caller's background tasks, unmount.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, NamedTuple, ParamSpec, TypeVar

import pyfuse3
import trio

from .audit import AuditLog, outcome_for
from .errors import CloudfsError, DiskFull
from .fs import ArchiveFS, Attributes
from .processes import Executables

log = logging.getLogger(__name__)

_DISK_FULL_REPORT_PERIOD = 60.0
"""Seconds between log lines about requests refused for a full cache disk."""

P = ParamSpec("P")
T = TypeVar("T")


def _guard(handler: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    @functools.wraps(handler)
    async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
        operations = args[0]
        if isinstance(operations, FuseOperations):
            operations.fs.active_at = time.monotonic()
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except CloudfsError as exc:
            if exc.errno == errno.EIO:
                log.warning("%s: %s", handler.__name__, exc)
            elif isinstance(exc, DiskFull) and isinstance(operations, FuseOperations):
                operations.report_disk_full(handler.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:  # the staging disk: ENOSPC, EIO
            log.error("%s: local disk error: %s", handler.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s; answering EIO", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return guarded


class FuseOperations(pyfuse3.Operations):
    """Extended attributes are deliberately not implemented: after the first ENOSYS the kernel
    stops asking, which keeps ``ls -l`` from costing two round trips per file."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: ArchiveFS) -> None:
        super().__init__()
        self.fs = fs
        fs.kernel = _KernelCache()
        fs.present = self._listed_entry
        mount = fs.config.mount
        self.attr_timeout = mount.attr_timeout
        self.negative_timeout = mount.negative_timeout
        self.backup_programs = fs.config.cache.backup_programs
        self.executables = Executables()
        self._disk_full_reported_at = -_DISK_FULL_REPORT_PERIOD

    def report_disk_full(self, request: str, error: DiskFull) -> None:
        """One log line a minute while requests fail because the cache disk is full (a PACS
        retrying its writes would otherwise fill the log too)."""
        now = time.monotonic()
        if now - self._disk_full_reported_at >= _DISK_FULL_REPORT_PERIOD:
            self._disk_full_reported_at = now
            log.error("%s: %s; writes fail with ENOSPC until space is freed", request, error)

    def _entry(self, attributes: Attributes) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = attributes.ino
        entry.st_mode = attributes.mode
        entry.st_nlink = 2 if attributes.is_dir else 1
        entry.st_size = attributes.size
        entry.st_uid = attributes.uid
        entry.st_gid = attributes.gid
        entry.st_blksize = attributes.block_size
        entry.st_blocks = (attributes.size + 511) // 512
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = attributes.mtime_ns
        entry.attr_timeout = self.attr_timeout
        entry.entry_timeout = self.attr_timeout
        entry.generation = 0
        return entry

    def _listed_entry(
        self, name: str, attributes: Attributes
    ) -> tuple[bytes, pyfuse3.EntryAttributes, int]:
        """A readdir reply entry, built by the core in a worker thread and kept with its batch:
        sending one is then all a listing costs this thread."""
        return os.fsencode(name), self._entry(attributes), attributes.ino

    @_guard
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        attributes = await self.fs.lookup(parent_inode, os.fsdecode(name))
        if attributes is None:
            # A negative entry: the kernel remembers the miss for negative_timeout seconds.
            entry = pyfuse3.EntryAttributes()
            entry.st_ino = 0
            entry.entry_timeout = self.negative_timeout
            return entry
        return self._entry(attributes)

    @_guard
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(await self.fs.getattr(inode))

    @_guard
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return await self.fs.opendir(inode)

    @_guard
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for name, entry, ino in await self.fs.readdir(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, entry, ino):
                return

    async def releasedir(self, fh: int) -> None:
        self.fs.releasedir(fh)

    @_guard
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        handle, keep_cache = await self.fs.open(inode, flags, self._is_backup(ctx.pid))
        return pyfuse3.FileInfo(fh=handle, keep_cache=keep_cache)

    def _is_backup(self, pid: int) -> bool:
        """Whether the caller is one of the backup programs (a readlink of /proc, remembered)."""
        if not self.backup_programs:
            return False
        return os.path.basename(self.executables.of(pid)) in self.backup_programs

    @_guard
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.fs.read(fh, off, size)  # type: ignore[return-value]  # memoryview works

    @_guard
    async def release(self, fh: int) -> None:
        await self.fs.release(fh)

    @_guard
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        figures = self.fs.statfs()
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = figures["block_size"]
        data.f_blocks = figures["blocks"]
        data.f_bfree = data.f_bavail = figures["free_blocks"]
        data.f_files = figures["files"]
        data.f_ffree = data.f_favail = figures["free_files"]
        data.f_namemax = figures["name_max"]
        return data

    @_guard
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        handle, attributes = await self.fs.create(
            parent_inode, os.fsdecode(name), mode, flags, ctx.uid, ctx.gid
        )
        return pyfuse3.FileInfo(fh=handle), self._entry(attributes)

    @_guard
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """Regular files only: an object store has no device nodes, FIFOs or sockets."""
        if not stat.S_ISREG(mode):
            raise pyfuse3.FUSEError(errno.EPERM)
        info, entry = await self.create(parent_inode, name, mode, os.O_WRONLY | os.O_EXCL, ctx)
        await self.fs.release(info.fh)
        return entry

    @_guard
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.fs.write(fh, off, buf)

    @_guard
    async def flush(self, fh: int) -> None:
        await self.fs.flush(fh)

    @_guard
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.fs.fsync(fh)

    @_guard
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        attributes = await self.fs.setattr(
            inode,
            fh,
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        return self._entry(attributes)

    @_guard
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        attributes = await self.fs.mkdir(parent_inode, os.fsdecode(name), mode, ctx.uid, ctx.gid)
        return self._entry(attributes)

    @_guard
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.unlink(parent_inode, os.fsdecode(name))

    @_guard
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.rmdir(parent_inode, os.fsdecode(name))

    @_guard
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        await self.fs.rename(
            parent_inode_old,
            os.fsdecode(name_old),
            parent_inode_new,
            os.fsdecode(name_new),
            flags,
        )

    async def _not_supported(self, *args: Any) -> Any:
        """Hard links and symbolic links have no object-store form: EPERM, as POSIX specifies
        for a filesystem that does not support them."""
        raise pyfuse3.FUSEError(errno.EPERM)

    # The signatures differ, hence the assignment; extended attributes keep pyfuse3's ENOSYS so
    # the kernel stops asking.
    link = symlink = _not_supported  # type: ignore[assignment]

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # Inode numbers are catalog row ids, valid without a lookup count: nothing to free.
        pass


class _Accessor(NamedTuple):
    """Who opened a handle and what it is, for the records of its reads and writes."""

    uid: int
    gid: int
    pid: int
    path: str
    patient_id: str
    study_uid: str


class AuditedOperations(FuseOperations):
    """The same operations, each also recorded in the audit trail with the caller's uid, gid
    and pid (which only the kernel's request carries), the path, and the patient and study when
    the index knows them.  Failures are recorded with their errno.  Reads and writes are folded
    per handle into one record at close.  While the trail cannot be written and the options say
    to fail closed, the operations it records are refused (EACCES), and so recorded.  Accesses
    the kernel refuses itself (with ``default_permissions``) never reach the filesystem and are
    not recorded here."""

    def __init__(self, fs: ArchiveFS, audit: AuditLog) -> None:
        super().__init__(fs)
        self.audit = audit
        self._accessors: dict[int, _Accessor] = {}

    async def _recorded(
        self,
        operation: str,
        ctx: pyfuse3.RequestContext,
        inode: int,
        name: bytes | None,
        call: Callable[[], Coroutine[Any, Any, T]],
        path: str | None = None,
    ) -> tuple[T, _Accessor]:
        described, patient_id, study_uid = await self.fs.describe(
            inode, None if name is None else os.fsdecode(name)
        )
        accessor = _Accessor(ctx.uid, ctx.gid, ctx.pid, path or described, patient_id, study_uid)
        outcome = "success"
        try:
            self._refuse_if_unrecordable(operation)
            return await call(), accessor
        except pyfuse3.FUSEError as exc:
            outcome = outcome_for(exc.errno)
            raise
        finally:
            self.audit.event(
                operation,
                uid=accessor.uid,
                gid=accessor.gid,
                pid=accessor.pid,
                path=accessor.path,
                outcome=outcome,
                patient_id=accessor.patient_id,
                study_uid=accessor.study_uid,
            )

    def _refuse_if_unrecordable(self, operation: str) -> None:
        """EACCES while the trail cannot be written, if the site chose to fail closed."""
        if self.audit.refuses(operation):
            raise pyfuse3.FUSEError(errno.EACCES)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        info, accessor = await self._recorded(
            "open", ctx, inode, None, lambda: super(AuditedOperations, self).open(inode, flags, ctx)
        )
        self._accessors[info.fh] = accessor
        return info

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        (info, entry), accessor = await self._recorded(
            "create",
            ctx,
            parent_inode,
            name,
            lambda: super(AuditedOperations, self).create(parent_inode, name, mode, flags, ctx),
        )
        self._accessors[info.fh] = accessor
        return info, entry

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self._transfer("read", fh, lambda: super(AuditedOperations, self).read(
            fh, off, size
        ))  # fmt: skip

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self._transfer("write", fh, lambda: super(AuditedOperations, self).write(
            fh, off, buf
        ))  # fmt: skip

    async def _transfer(self, operation: str, fh: int, call: Callable[[], Any]) -> Any:
        accessor = self._accessors.get(fh)
        try:
            self._refuse_if_unrecordable(operation)
            result = await call()
        except pyfuse3.FUSEError as exc:
            if accessor is not None:
                self.audit.event(operation, outcome=outcome_for(exc.errno), **accessor._asdict())
            raise
        if accessor is not None:
            count = result if isinstance(result, int) else len(result)
            record = self.audit.read if operation == "read" else self.audit.write
            record(fh, size=count, **accessor._asdict())
        return result

    async def release(self, fh: int) -> None:
        try:
            await super().release(fh)
        finally:
            if self._accessors.pop(fh, None) is not None:
                self.audit.released(fh)

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        entry, _ = await self._recorded(
            "setattr",
            ctx,
            inode,
            None,
            lambda: super(AuditedOperations, self).setattr(inode, attr, fields, fh, ctx),
        )
        return entry

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        entry, _ = await self._recorded(
            "mkdir",
            ctx,
            parent_inode,
            name,
            lambda: super(AuditedOperations, self).mkdir(parent_inode, name, mode, ctx),
        )
        return entry

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._recorded(
            "unlink",
            ctx,
            parent_inode,
            name,
            lambda: super(AuditedOperations, self).unlink(parent_inode, name, ctx),
        )

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._recorded(
            "rmdir",
            ctx,
            parent_inode,
            name,
            lambda: super(AuditedOperations, self).rmdir(parent_inode, name, ctx),
        )

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        target, _, _ = await self.fs.describe(parent_inode_new, os.fsdecode(name_new))
        source, _, _ = await self.fs.describe(parent_inode_old, os.fsdecode(name_old))
        await self._recorded(
            "rename",
            ctx,
            parent_inode_old,
            name_old,
            lambda: super(AuditedOperations, self).rename(
                parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx
            ),
            path=f"{source} -> {target}",
        )


class _KernelCache:
    async def forget(self, inodes: list[int], names: list[tuple[int, str]]) -> None:
        """Invalidate cached attributes, pages and lookups.  pyfuse3 forbids these calls on the
        thread serving requests (they may wait for it): they run in a worker thread."""

        def invalidate() -> None:
            for inode in inodes:
                with contextlib.suppress(OSError):  # ENOENT: the kernel holds nothing of it
                    pyfuse3.invalidate_inode(inode)
            for parent, name in names:
                with contextlib.suppress(OSError):
                    pyfuse3.invalidate_entry(parent, os.fsencode(name))

        if inodes or names:
            await trio.to_thread.run_sync(invalidate)


def serve(
    fs: ArchiveFS,
    mountpoint: Path,
    options: set[str],
    start_tasks: Callable[[trio.Nursery], None],
    audit: AuditLog | None = None,
) -> None:
    """Mount, serve until unmounted or ``stop()``, unmount, then give pending uploads their
    bounded time.  ``start_tasks`` starts the daemon's background tasks in the nursery that also
    runs the FUSE loop; with ``audit``, every access is also recorded there."""
    operations = FuseOperations(fs) if audit is None else AuditedOperations(fs, audit)
    pyfuse3.init(operations, str(mountpoint), set(pyfuse3.default_options) | options)
    session = _Session()
    try:
        trio.run(_main, fs, start_tasks, session)
    finally:
        session.close()


class _Session:
    """Unmounts once: right after the FUSE loop ends (so nobody waits on a mount that no longer
    answers while uploads drain), or on the way out after an error."""

    def __init__(self) -> None:
        self.open = True

    def close(self) -> None:
        if self.open:
            self.open = False
            pyfuse3.close(unmount=True)


async def _main(
    fs: ArchiveFS, start_tasks: Callable[[trio.Nursery], None], session: _Session
) -> None:
    async with trio.open_nursery() as nursery:
        start_tasks(nursery)
        await pyfuse3.main()
        session.close()
        await fs.drain()
        nursery.cancel_scope.cancel()


def stop() -> None:
    """End ``serve`` from a task on its loop (a signal handler): unmounts cleanly."""
    pyfuse3.terminate()
