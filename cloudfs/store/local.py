"""A local or NFS directory used as the object store: the embedded default and a test double.

The directory stays a plain tree (key ``a/b.dcm`` is the file ``ROOT/a/b.dcm``).  The ETag is
derived from size and mtime, as web servers do, so a file rewritten in place gets a new version.
Symbolic links and special files are not objects: following them could leave the root.
Writes fill a temporary file in the target directory and rename it into place, so a reader sees
the old file or the new one, never part of either.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from decimal import Decimal
from pathlib import Path

from ..errors import CloudfsError, ConfigError, Conflict, NotFound, StaleObject, Unavailable
from . import FileSource, ObjectInfo, Source

log = logging.getLogger(__name__)

TEMPORARY_SUFFIX = ".cloudfs-upload"
"""Ends the name of a file being written; it becomes the object only when renamed."""

_PIECE = 1 << 20
"""Bytes copied at once into a new object's file."""

Place = Callable[[int, str, str, str], None]
"""Puts the finished temporary file in place: (directory fd, temporary name, name, key)."""


def _etag(st: os.stat_result) -> str:
    return f'"{st.st_mtime_ns:x}-{st.st_size:x}"'


def _failure(exc: OSError, key: str) -> CloudfsError:
    """A failed open or mkdir on the way to ``key``: a missing component, a file where a
    directory should be or a symbolic link on the way all mean there is no such object."""
    if exc.errno == errno.ELOOP:
        return NotFound(f"{key}: a symbolic link is on the way")
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return NotFound(key)
    return Unavailable(f"{key}: {exc.strerror}")


def _mode(text: str) -> int | None:
    """Permission bits only: a setuid bit set through the mount must not become a setuid file
    owned by the daemon's user."""
    try:
        mode = int(text, 8)
    except ValueError:
        return None
    return mode & 0o777 if 0 <= mode <= 0o7777 else None


def _mtime_ns(text: str) -> int | None:
    """Seconds since the epoch as text, exactly (Decimal keeps every nanosecond a float loses)."""
    try:
        mtime_ns = int(Decimal(text) * 1_000_000_000)
    except (ArithmeticError, ValueError):
        return None
    return mtime_ns if abs(mtime_ns) < 1 << 63 else None


def _attributes(key: str, metadata: Mapping[str, str]) -> tuple[int | None, int | None]:
    """The mode and mtime (ns) ``metadata`` asks for; a file has nowhere to keep the rest."""
    mode = _mode(metadata["mode"]) if "mode" in metadata else None
    mtime_ns = _mtime_ns(metadata["mtime"]) if "mtime" in metadata else None
    for name, value in (("mode", mode), ("mtime", mtime_ns)):
        if name in metadata and value is None:
            log.warning("%s: ignoring the invalid %s %r", key, name, metadata[name])
    return mode, mtime_ns


def _replace(directory: int, temporary: str, name: str, key: str) -> None:
    os.replace(temporary, name, src_dir_fd=directory, dst_dir_fd=directory)


def _link_new(directory: int, temporary: str, name: str, key: str) -> None:
    """Create only: link() refuses an existing name atomically, whoever made it."""
    try:
        os.link(temporary, name, src_dir_fd=directory, dst_dir_fd=directory)
    except FileExistsError as exc:
        raise Conflict(f"{key}: another writer created it first") from exc


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._tree = threading.Lock()
        """Held while a write makes its directories and its temporary file, and while a delete
        prunes empty directories, so a prune never removes a directory a write is entering."""
        self._replacing = threading.Lock()
        """Makes the version check and the rename of a conditional replace one step (among the
        threads of this process: a directory has no conditional rename)."""

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

    @contextlib.contextmanager
    def _directories(self, key: str, create: bool) -> Iterator[list[int]]:
        """Descriptors of the root and of each directory on the way to ``key``.  Each one is
        opened relative to its parent without following symbolic links, so no link anywhere on
        the way can lead outside the root; ``create`` makes the missing ones."""
        names = self._path(key).relative_to(self.root).parts[:-1]
        try:
            chain = [os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)]
        except OSError as exc:
            raise Unavailable(f"{self.root}: {exc.strerror}") from exc
        try:
            for name in names:
                chain.append(self._enter(chain[-1], name, key, create))
            yield chain
        finally:
            for fd in chain:
                os.close(fd)

    @staticmethod
    def _enter(parent: int, name: str, key: str, create: bool) -> int:
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
        try:
            try:
                return os.open(name, flags, dir_fd=parent)
            except FileNotFoundError:
                if not create:
                    raise
            with contextlib.suppress(FileExistsError):  # another writer made it meanwhile
                os.mkdir(name, dir_fd=parent)
                os.fsync(parent)  # the new directory outlives a crash along with its file
            return os.open(name, flags, dir_fd=parent)
        except OSError as exc:
            raise _failure(exc, key) from exc

    def _open(self, key: str) -> int:
        """A read descriptor on the regular file behind ``key``, reached without following
        symbolic links; O_NONBLOCK keeps a FIFO from blocking the open."""
        name = self._path(key).name
        with self._directories(key, create=False) as chain:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=chain[-1])
            except OSError as exc:
                raise _failure(exc, key) from exc
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

    def list(self, after: str = "") -> Iterator[ObjectInfo]:
        """Every object after ``after``, in UTF-8 byte order as ListObjectsV2 returns them,
        streamed: memory holds one directory per level, not the listing (a million-file tree
        listed whole took 300 MiB).  Empty directories become "dir/" markers, as S3 consoles
        create them, so they stay visible."""
        return self._list_directory(str(self.root), "", after)

    def _list_directory(self, directory: str, prefix: str, after: str) -> Iterator[ObjectInfo]:
        # A directory's keys all start with "name/", so sorting it among its siblings as
        # "name/" puts "a-b" before "a/x" before "a0": a walk in that order is in key order.
        entries: list[tuple[str, os.DirEntry[str], os.stat_result]] = []
        for key, entry in self._walk(directory, prefix):
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                entries.append((key + "/", entry, st))
            elif stat.S_ISREG(st.st_mode):
                entries.append((key, entry, st))
        if not entries and prefix > after:
            yield ObjectInfo(prefix, 0, os.stat(directory).st_mtime_ns, '"dir"')
        entries.sort(key=lambda item: item[0])
        for key, entry, st in entries:
            if key.endswith("/"):
                # Every key below starts with "key/": all of them sort after ``after`` when
                # "key/" does, none does when "key/" sorts before it without leading to it.
                if after.startswith(key):
                    yield from self._list_directory(entry.path, key, after)
                elif key > after:
                    yield from self._list_directory(entry.path, key, "")
            elif key > after:
                yield ObjectInfo(key, st.st_size, st.st_mtime_ns, _etag(st))

    def head(self, key: str) -> ObjectInfo:
        fd = self._open(key)
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return ObjectInfo(key, st.st_size, st.st_mtime_ns, _etag(st))

    def get_range(self, key: str, start: int, end: int, etag: str) -> bytes:
        return b"".join(self.stream_range(key, start, end, etag, max(end - start, 1)))

    def stream_range(
        self, key: str, start: int, end: int, etag: str, piece: int
    ) -> Generator[bytes, None, None]:
        fd = self._open(key)
        try:
            if _etag(os.fstat(fd)) != etag:
                raise StaleObject(key)
            for offset in range(start, end, piece):
                length = min(piece, end - offset)
                data = os.pread(fd, length, offset)
                # A rewrite during the read would mix versions: check the version again after
                # each piece, before anyone is given it.
                if _etag(os.fstat(fd)) != etag or len(data) != length:
                    raise StaleObject(key)
                yield data
        except OSError as exc:
            raise Unavailable(f"{key}: {exc.strerror}") from exc
        finally:
            os.close(fd)

    def request_restore(self, key: str, days: int) -> None:
        """Nothing in a directory is archived: every file is readable as it is."""

    def put_file(
        self, key: str, source: Source, metadata: Mapping[str, str], expect_etag: str | None
    ) -> ObjectInfo:
        """Store a copy of ``source`` as ``key`` if the key is absent (``expect_etag`` None) or
        still holds ``expect_etag``; Conflict otherwise.  ``mode`` and ``mtime`` metadata become
        the file's permission bits and modification time."""
        mode, mtime_ns = _attributes(key, metadata)
        if expect_etag is None:
            return self._write(key, source, mode, mtime_ns, _link_new, parents=True)
        place = self._replace_version(expect_etag)
        return self._write(key, source, mode, mtime_ns, place, parents=False)

    def _replace_version(self, expect_etag: str) -> Place:
        def place(directory: int, temporary: str, name: str, key: str) -> None:
            with self._replacing:
                try:
                    st = os.stat(name, dir_fd=directory, follow_symlinks=False)
                except FileNotFoundError as exc:
                    raise Conflict(f"{key}: another writer deleted it") from exc
                if not stat.S_ISREG(st.st_mode) or _etag(st) != expect_etag:
                    raise Conflict(f"{key}: another writer changed it")
                _replace(directory, temporary, name, key)

        return place

    def _write(
        self,
        key: str,
        source: Source,
        mode: int | None,
        mtime_ns: int | None,
        place: Place,
        parents: bool,
    ) -> ObjectInfo:
        """Store the bytes of ``source`` as ``key`` all at once.  The temporary file gets its
        mode and mtime (part of the ETag) and reaches the disk before ``place`` gives it its
        name, so a crash leaves the old object or the new one.  ``parents`` makes missing
        directories; without it (replacing a version that must exist) a missing one is a
        Conflict, and a failed write leaves no empty directories behind."""
        if key.endswith("/"):
            raise NotFound(f"{key}: a directory marker holds no bytes")
        name = self._path(key).name
        temporary = f".{secrets.token_hex(8)}{TEMPORARY_SUFFIX}"
        with contextlib.ExitStack() as stack:
            with self._tree:
                try:
                    chain = stack.enter_context(self._directories(key, create=parents))
                except NotFound as exc:
                    if parents:
                        raise
                    raise Conflict(f"{key}: another writer deleted it") from exc
                directory = chain[-1]
                try:
                    fd = os.open(
                        temporary,
                        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                        0o666,
                        dir_fd=directory,
                    )
                except OSError as exc:
                    raise _failure(exc, key) from exc
            try:
                with open(fd, "wb") as out:
                    for offset in range(0, source.size, _PIECE):
                        piece = source.read(offset, min(_PIECE, source.size - offset))
                        if len(piece) != min(_PIECE, source.size - offset):
                            raise Unavailable(f"{key}: the local file shrank while stored")
                        out.write(piece)
                    out.flush()
                    if mode is not None:
                        os.fchmod(fd, mode)
                    if mtime_ns is not None:
                        os.utime(fd, ns=(time.time_ns(), mtime_ns))
                    os.fsync(fd)
                    place(directory, temporary, name, key)
                    os.fsync(directory)
                    st = os.fstat(fd)
            except OSError as exc:
                raise Unavailable(f"{key}: {exc.strerror}") from exc
            finally:
                with contextlib.suppress(OSError):  # gone already once renamed into place
                    os.unlink(temporary, dir_fd=directory)
        return ObjectInfo(key, st.st_size, st.st_mtime_ns, _etag(st))

    def delete(self, key: str, etag: str | None = None) -> None:
        """Remove the file behind ``key`` (if it still holds the version ``etag``: Conflict
        otherwise) and the directories that leaves empty, up to the root: S3 has no
        directories, so none may linger as a "dir/" marker.  A marker key removes its directory
        if empty.  A missing key, a symbolic link or a special file (none of them an object) is
        left alone, as S3 answers a delete of a missing key with success."""
        path = self._path(key)
        names = path.relative_to(self.root).parts
        try:
            with self._directories(key, create=False) as chain:
                if not key.endswith("/"):
                    self._unlink_file(chain[-1], path.name, key, etag)
                    names = names[:-1]
                self._prune(chain, names)
        except NotFound:
            pass  # something on the way is missing, so the key is too

    def _prune(self, chain: Sequence[int], names: Sequence[str]) -> None:
        """Remove the directories ``names`` (``chain[i]`` holds ``names[i]``) from the deepest
        up while they are empty.  One that cannot go ends the pruning, never the delete: the
        object is gone either way."""
        with self._tree:
            for depth in range(len(names), 0, -1):
                try:
                    os.rmdir(names[depth - 1], dir_fd=chain[depth - 1])
                except OSError:
                    return

    def _unlink_file(self, directory: int, name: str, key: str, etag: str | None) -> None:
        """The version check and the unlink are one step among this process's threads, as
        for a conditional replace (a directory has no conditional unlink)."""
        with self._replacing:
            try:
                st = os.stat(name, dir_fd=directory, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    return
                if etag is not None and _etag(st) != etag:
                    raise Conflict(f"{key}: another writer changed it; not deleted")
                os.unlink(name, dir_fd=directory)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise Unavailable(f"{key}: {exc.strerror}") from exc

    def copy(
        self, source: str, target: str, etag: str, metadata: Mapping[str, str] | None = None
    ) -> ObjectInfo:
        """Copy the version ``etag`` of ``source``; ``metadata`` None keeps its mode and mtime.
        A rewrite of the source during the copy is caught before the copy takes its name."""
        fd = self._open(source)
        with open(fd, "rb"):  # closes fd
            st = os.fstat(fd)
            if _etag(st) != etag:
                raise StaleObject(f"{source}: changed since version {etag}")
            mode: int | None = stat.S_IMODE(st.st_mode)
            mtime_ns: int | None = st.st_mtime_ns
            if metadata is not None:
                mode, mtime_ns = _attributes(target, metadata)

            def place(directory: int, temporary: str, name: str, key: str) -> None:
                if _etag(os.fstat(fd)) != etag:
                    raise StaleObject(f"{source}: changed while it was being copied")
                _replace(directory, temporary, name, key)

            return self._write(
                target, FileSource(fd, st.st_size), mode, mtime_ns, place, parents=True
            )
