"""A no-op pyfuse3 filesystem: one read-only file served from a buffer in memory.

It does the least any Python FUSE filesystem can do per read request (slice a memoryview of a
preallocated buffer), so its throughput is the ceiling of pyfuse3 + trio + the kernel's FUSE
round trips on this machine.  A cloudfs read served from its caches can approach this figure but
not pass it; the gap is what cloudfs's own read path costs.

The kernel's page cache is not kept between opens (``keep_cache`` is off), so every dd of the file
goes through the daemon.

Run as its own process: ``python -m bench.memfs MOUNTPOINT --size BYTES``; it serves until
SIGTERM or SIGINT and unmounts on the way out.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
from collections.abc import Sequence

import pyfuse3
import trio

from .data import generate

FILE_INODE = pyfuse3.ROOT_INODE + 1


class MemFS(pyfuse3.Operations):
    def __init__(self, name: str, data: bytearray) -> None:
        super().__init__()
        self.name = os.fsencode(name)
        self.data = memoryview(data).toreadonly()

    def _attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            entry.st_mode = stat.S_IFDIR | 0o555
            entry.st_nlink = 2
        elif inode == FILE_INODE:
            entry.st_mode = stat.S_IFREG | 0o444
            entry.st_nlink = 1
            entry.st_size = len(self.data)
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        entry.st_uid, entry.st_gid = os.getuid(), os.getgid()
        entry.st_blksize = 1 << 20
        entry.st_blocks = (entry.st_size + 511) // 512
        entry.attr_timeout = entry.entry_timeout = 300.0
        return entry

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attributes(inode)

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or name != self.name:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attributes(FILE_INODE)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, self.name, self._attributes(FILE_INODE), 1)

    async def releasedir(self, fh: int) -> None:
        pass

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=inode, keep_cache=False)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self.data[off : off + size]  # type: ignore[return-value]  # a buffer is accepted

    async def release(self, fh: int) -> None:
        pass

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        pass


async def _serve() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            pyfuse3.terminate()
            return


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memfs", description=__doc__)
    parser.add_argument("mountpoint")
    parser.add_argument("--size", type=int, required=True, help="file size in bytes")
    parser.add_argument("--name", default="data.bin", help="file name")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    operations = MemFS(args.name, generate(args.size, args.seed))
    options = set(pyfuse3.default_options) | {"fsname=benchmemfs", "subtype=benchmemfs", "ro"}
    pyfuse3.init(operations, args.mountpoint, options)
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
