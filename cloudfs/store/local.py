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
        """The file behind ``key``, refusing any key that would name something outside the root."""
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") for p in parts[:-1]) or parts[-1] in (".", ".."):
            raise NotFound(key)
        return self.root.joinpath(*parts)

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
        try:
            st = os.stat(self._path(key), follow_symlinks=False)
        except OSError as exc:
            raise NotFound(key) from exc
        if not stat.S_ISREG(st.st_mode):
            raise NotFound(key)
        return ObjectInfo(key, st.st_size, st.st_mtime_ns, _etag(st))

    def get_range(self, key: str, start: int, end: int, etag: str) -> bytes:
        try:
            fd = os.open(self._path(key), os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError as exc:
            raise NotFound(key) from exc
        except OSError as exc:
            raise Unavailable(f"{key}: {exc.strerror}") from exc
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

    def put_file(self, key: str, path: Path, metadata: Mapping[str, str]) -> ObjectInfo:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.cloudfs-upload")
        try:
            shutil.copyfile(path, temporary)
            with open(temporary, "rb+") as handle:
                os.fsync(handle.fileno())
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
        return self.put_file(target, self._path(source), {})
