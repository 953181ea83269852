"""A local or NFS directory used as the object store: the embedded default and a test double.

The directory stays a plain tree (key ``a/b.dcm`` is the file ``ROOT/a/b.dcm``).  The ETag is
derived from size and mtime, as web servers do, so a file rewritten in place gets a new version.
Symbolic links and special files are not objects: following them could leave the root.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

from ..errors import ConfigError, NotFound, StaleObject, Unavailable
from . import ObjectInfo

log = logging.getLogger(__name__)


def _etag(st: os.stat_result) -> str:
    return f'"{st.st_mtime_ns:x}-{st.st_size:x}"'


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def describe(self) -> str:
        return f"file://{self.root}"

    def check(self) -> None:
        if not self.root.is_dir():
            raise ConfigError(f"{self.root}: source directory does not exist")
        if not os.access(self.root, os.R_OK | os.X_OK):
            raise ConfigError(f"{self.root}: source directory is not readable")

    def _path(self, key: str) -> Path:
        """The path behind ``key``, refusing keys that would name something outside the root."""
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") for p in parts[:-1]) or parts[-1] in (".", ".."):
            raise NotFound(key)
        return self.root.joinpath(*parts)

    def _open(self, key: str) -> int:
        """A read descriptor on the regular file behind ``key``.  Each component is opened
        relative to its parent without following symbolic links, so no link anywhere on the way
        can lead outside the root; O_NONBLOCK keeps a FIFO from blocking the open."""
        parts = self._path(key).relative_to(self.root).parts
        directory = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for part in parts[:-1]:
                inner = os.open(
                    part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=directory
                )
                os.close(directory)
                directory = inner
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=directory)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise NotFound(key) from exc
            raise Unavailable(f"{key}: {exc.strerror}") from exc
        finally:
            os.close(directory)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise NotFound(key)
        return fd

    def _walk(self, directory: str, prefix: str) -> Iterator[tuple[str, os.DirEntry[str]]]:
        try:
            entries = list(os.scandir(directory))
        except OSError as exc:
            log.warning("cannot list %s: %s", directory, exc)
            return
        for entry in entries:
            key = prefix + entry.name
            try:
                key.encode("utf-8")
            except UnicodeEncodeError:
                log.warning("skipping %r: the name is not valid UTF-8", entry.path)
                continue
            yield key, entry

    def list(self) -> Iterator[ObjectInfo]:
        # Keys must come out in UTF-8 byte order, which is not the order of a depth-first walk
        # ("a-b" sorts before "a/b"), so collect and sort.  Empty directories become "dir/"
        # markers, as S3 consoles create them, so they stay visible.
        found: list[ObjectInfo] = []
        pending = [(str(self.root), "")]
        while pending:
            directory, prefix = pending.pop()
            empty = True
            for key, entry in self._walk(directory, prefix):
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    pending.append((entry.path, key + "/"))
                    empty = False
                elif stat.S_ISREG(st.st_mode):
                    found.append(ObjectInfo(key, st.st_size, st.st_mtime_ns, _etag(st)))
                    empty = False
            if empty and prefix:
                st = os.stat(directory)
                found.append(ObjectInfo(prefix, 0, st.st_mtime_ns, '"dir"'))
        found.sort(key=lambda info: info.key)
        return iter(found)

    def head(self, key: str) -> ObjectInfo:
        fd = self._open(key)
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return ObjectInfo(key, st.st_size, st.st_mtime_ns, _etag(st))

    def get_range(self, key: str, start: int, end: int, etag: str) -> bytes:
        fd = self._open(key)
        try:
            if _etag(os.fstat(fd)) != etag:
                raise StaleObject(key)
            data = os.pread(fd, end - start, start)
            # A rewrite during the read would mix versions: check the version again afterwards.
            if _etag(os.fstat(fd)) != etag or len(data) != end - start:
                raise StaleObject(key)
            return data
        except OSError as exc:
            raise Unavailable(f"{key}: {exc.strerror}") from exc
        finally:
            os.close(fd)

    def request_restore(self, key: str, days: int) -> None:
        """Nothing in a directory is archived: every file is readable as it is."""

    def put_file(self, key: str, path: Path, metadata: Mapping[str, str]) -> ObjectInfo:
        with open(path, "rb") as source:
            return self._write(key, source)

    def _write(self, key: str, source: BinaryIO) -> ObjectInfo:
        """Store ``source`` as ``key`` all at once: readers see the old file or the new one."""
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        root = os.path.realpath(self.root)
        if os.path.commonpath([root, os.path.realpath(target.parent)]) != root:
            raise NotFound(f"{key}: leads outside the store through a symbolic link")
        temporary = target.with_name(f".{target.name}.cloudfs-upload")
        try:
            with open(temporary, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, target)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise Unavailable(f"{key}: {exc.strerror}") from exc
        return self.head(key)

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass  # S3 semantics: deleting a missing key succeeds
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise Unavailable(f"{key}: {exc.strerror}") from exc

    def copy(self, source: str, target: str) -> ObjectInfo:
        with os.fdopen(self._open(source), "rb") as handle:
            return self._write(target, handle)
