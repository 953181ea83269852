"""The staging area: written files wait here, on the cache disk, until the cloud has them.

Staged bytes are never evicted (they may be the only copy).  Their total is bounded by
``staging_limit``: past it a write fails with ENOSPC, loudly, rather than dropping anything.
Files are named by the catalog (``Node.staged``); anything here that no node names is left over
from a crash and removed at start, and files whose writer never made them durable are moved to
``unsynced/`` for an operator to inspect instead of being uploaded as if complete.

With a cache key, staged files are sealed (AES-256-GCM), since a PACS's writes can wait here for
days of an outage.  A file starts with a header (a marker and a random salt); its key is derived
from the operator's key and that salt, so random nonces never approach the limit of one key
however much a site writes.  The payload is cut into ``CHUNK`` bytes, each sealed with a fresh
nonce and its index as associated data, at ``HEADER + index * STRIDE``: a chunk altered, moved or
sealed under another key fails authentication and is never returned (EIO for a reader; an upload
fails and is retried, so nothing altered reaches the cloud).  A write re-seals the chunks it
touches; the payload size follows from the file size.  Files set aside in ``unsynced/`` stay
sealed: ``cloudfs export-staged FILE > out`` (with the same key) writes one out in plaintext.
Without a key, files are plain and every call is the plain system call.

Every method blocks except ``reserve``/``release``; the byte count (of payload, sealed or not) is
guarded by a lock because worker threads remove files while the trio thread reserves space.
Reads run beside writes of the same file (the filesystem does not serialise them), so a sealed
file's read-modify-write holds a lock striped by inode that its reads take too: a read never
sees a chunk half re-sealed.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .crypto import OVERHEAD, derive_key
from .errors import CloudfsError, ConfigError, Unavailable
from .store import FileSource, Source

log = logging.getLogger(__name__)

_AHEAD = 64
"""Empty staging files made at once, with one directory sync for all of them."""

CHUNK = 64 * 1024
"""Payload bytes per sealed chunk: the kernel's 128 KiB writes cover whole chunks, so a
sequential writer never reads one back, and a small random write re-seals at most two."""
STRIDE = CHUNK + OVERHEAD
MAGIC = b"CFSSEAL1"
"""Starts every sealed staging file; a plain one starts so only if its payload does (a sealed
file written through the mount), and is then taken for sealed at start."""
_SALT = 16
HEADER = len(MAGIC) + _SALT
_NONCE = 12
_COPY = 1 << 20
"""Bytes a sealed copy decrypts and re-seals at once."""
_STRIPES = 64


class NoSpace(CloudfsError):
    errno = errno.ENOSPC


class Tampered(CloudfsError):
    """A sealed staged file failed authentication: altered on disk, cut short, or sealed under
    another key.  Its bytes are never returned."""

    errno = errno.EIO


def payload_size(file_size: int) -> int:
    """The payload a sealed file of ``file_size`` bytes holds; Tampered if no file of sealed
    chunks has that size (a trailing record too short to hold a chunk, or a cut header)."""
    if file_size < HEADER:
        raise Tampered(f"sealed staging file of {file_size} bytes has no header")
    chunks, rest = divmod(file_size - HEADER, STRIDE)
    if rest and rest <= OVERHEAD:
        raise Tampered(f"sealed staging file of {file_size} bytes ends in a partial chunk")
    return chunks * CHUNK + max(0, rest - OVERHEAD)


def _index(number: int) -> bytes:
    return number.to_bytes(8, "big")


class StagingArea:
    def __init__(self, directory: Path, limit: int, key: bytes | None = None) -> None:
        """``key``: the operator's cache key; staged files are sealed under keys derived from
        it, or plain without one."""
        self.directory = directory
        self.limit = limit
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._ready_lock = threading.Lock()
        self._ready: list[str] = []
        self._used = 0
        self._names = itertools.count()
        self._prefix = f"{time.time_ns():x}"
        self._warned = False
        self._key = key
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        # Derivation costs microseconds; the cache saves it on every write of a busy file.
        self._cipher = functools.lru_cache(maxsize=1024)(self._derive)

    @property
    def sealed(self) -> bool:
        return self._key is not None

    @property
    def used(self) -> int:
        return self._used

    def path(self, name: str) -> Path:
        return self.directory / name

    def take(self) -> tuple[str, int]:
        """A new, empty staging file, open for reading and writing, whose directory entry is
        already durable: files are made ahead in batches with one directory sync per batch
        (``make_ahead``), so an fsync costs a sync of the file alone."""
        with self._ready_lock:
            name = self._ready.pop() if self._ready else None
        if name is None:
            made = self._make(_AHEAD)
            name = made.pop()
            self._add_ready(made)
        return name, self.open(name)

    @property
    def running_low(self) -> bool:
        return len(self._ready) < _AHEAD // 2

    def make_ahead(self) -> None:
        """Top the batch of ready files up, off the path of a create (no lock is held while the
        files are made, so creates go on meanwhile)."""
        if self.running_low:
            self._add_ready(self._make(_AHEAD - len(self._ready)))

    def _add_ready(self, names: list[str]) -> None:
        with self._ready_lock:
            self._ready[:0] = names

    def _make(self, count: int) -> list[str]:
        made = []
        for _ in range(count):
            name = f"{self._prefix}-{next(self._names)}"
            fd = os.open(self.path(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                if self.sealed:
                    os.write(fd, MAGIC + os.urandom(_SALT))
            finally:
                os.close(fd)
            made.append(name)
        self._sync_directory()
        return made

    def scan(self, referenced: set[str], unsynced: set[str]) -> None:
        """At start: count what is staged, set aside ``unsynced`` files, remove leftovers.

        Files staged under another setting of the key are brought to this one: plain files
        from before a key was set are sealed in place; sealed files without the key are a
        ConfigError, since uploading them would put ciphertext in the cloud."""
        aside = self.directory / "unsynced"
        for entry in list(os.scandir(self.directory)):
            if not entry.is_file(follow_symlinks=False):
                continue
            if entry.name in unsynced:
                aside.mkdir(exist_ok=True)
                os.replace(entry.path, aside / entry.name)
                log.warning(
                    "staged file %s was being written when cloudfs stopped and was never "
                    "fsync'd or closed: not uploaded, kept in %s",
                    entry.name,
                    aside,
                )
            elif entry.name in referenced:
                is_sealed = self._starts_sealed(entry.path)
                if is_sealed and not self.sealed:
                    raise ConfigError(
                        f"staged file {entry.path} is encrypted and not yet uploaded: mount "
                        f"with the cache key it was written under"
                    )
                if self.sealed and not is_sealed:
                    self._seal_in_place(entry.name)
                self._used += self._accounted(entry.name)
            else:
                os.unlink(entry.path)

    @staticmethod
    def _starts_sealed(path: str) -> bool:
        with open(path, "rb") as file:
            return file.read(len(MAGIC)) == MAGIC

    def _seal_in_place(self, name: str) -> None:
        """Replace a plain staging file by a sealed copy under the same name (the catalog's)."""
        temporary = self.path(f"{name}.sealing")
        plain = os.open(self.path(name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            sealed = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(sealed, MAGIC + os.urandom(_SALT))
                source = FileSource.of(plain)
                for offset in range(0, source.size, _COPY):
                    data = source.read(offset, min(_COPY, source.size - offset))
                    self.write(sealed, data, offset)
                os.fdatasync(sealed)
            finally:
                os.close(sealed)
        finally:
            os.close(plain)
        os.replace(temporary, self.path(name))
        self._sync_directory()
        log.info("staged file %s, written before the cache key was set, is now sealed", name)

    def reserve(self, amount: int) -> None:
        """Account for ``amount`` more staged bytes, or fail with ENOSPC."""
        if amount <= 0:
            return
        with self._lock:
            if self._used + amount > self.limit:
                if not self._warned:
                    self._warned = True
                    log.error(
                        "staging area full (%d of %d bytes not yet in the cloud): writes fail "
                        "with ENOSPC until uploads drain",
                        self._used,
                        self.limit,
                    )
                raise NoSpace("staging area full: data not yet uploaded fills it")
            self._used += amount
            self._warned = False

    def release(self, amount: int) -> None:
        with self._lock:
            self._used = max(0, self._used - amount)

    def open(self, name: str) -> int:
        return os.open(self.path(name), os.O_RDWR | os.O_CLOEXEC)

    # -- the bytes of a staged file, sealed or plain --------------------------------------------

    def write(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        """Write ``data`` at ``offset`` (past the end: the gap reads as zeros); returns the
        count written."""
        if not self.sealed:
            return os.pwrite(fd, data, offset)
        if not data:
            return 0  # as pwrite: nothing written, not even the gap
        with self._locked(fd):
            cipher = self._file_cipher(fd)
            size = self._size(fd)
            if offset > size:
                self._fill(fd, cipher, size, offset)
                size = offset
            self._patch(fd, cipher, offset, data, size)
        return len(data)

    def read(self, fd: int, size: int, offset: int) -> bytes:
        """Up to ``size`` bytes at ``offset`` (fewer at the end of the file)."""
        if not self.sealed:
            return os.pread(fd, size, offset)
        with self._locked(fd):
            payload = self._size(fd)
            end = min(offset + size, payload)
            if end <= offset:
                return b""
            first, last = offset // CHUNK, (end - 1) // CHUNK
            chunks = self._open_chunks(fd, self._file_cipher(fd), first, last, payload)
            start = offset - first * CHUNK
            return b"".join(chunks)[start : start + end - offset]

    def truncate(self, fd: int, size: int) -> None:
        """Cut the file to ``size`` bytes (re-sealing the new last chunk) or extend it with
        zeros."""
        if not self.sealed:
            os.ftruncate(fd, size)
            return
        with self._locked(fd):
            cipher = self._file_cipher(fd)
            old = self._size(fd)
            if size >= old:
                self._fill(fd, cipher, old, size)
                return
            index, kept = divmod(size, CHUNK)
            head = self._open_chunks(fd, cipher, index, index, old)[0][:kept] if kept else b""
            os.ftruncate(fd, HEADER + index * STRIDE)
            if head:
                self._seal_at(fd, cipher, index, [head])

    def size(self, fd: int) -> int:
        """The payload size of an open staging file."""
        if not self.sealed:
            return os.fstat(fd).st_size
        with self._locked(fd):
            return self._size(fd)

    @contextlib.contextmanager
    def source(self, name: str) -> Iterator[Source]:
        """The bytes of a staging file as an upload reads them (decrypted if sealed)."""
        try:
            fd = os.open(self.path(name), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise Unavailable(f"staged file {name}: {exc.strerror}") from exc
        try:
            yield FileSource.of(fd) if not self.sealed else _SealedSource(self, fd)
        finally:
            os.close(fd)

    def copy(self, source_fd: int, size: int, durable: bool = False) -> tuple[str, int]:
        """A new staging file holding the first ``size`` bytes of ``source_fd``; ``durable``:
        on disk before this returns."""
        self.reserve(size)
        name, fd = self.take()
        offset = 0
        try:
            while offset < size:
                if self.sealed:
                    # Re-sealed under the new file's key: no two files share one.
                    data = self.read(source_fd, min(_COPY, size - offset), offset)
                    sent = self.write(fd, data, offset) if data else 0
                else:
                    sent = os.copy_file_range(source_fd, fd, size - offset, offset, offset)
                if sent == 0:
                    break
                offset += sent
        except BaseException:
            os.close(fd)
            self.remove(name)  # gives back the bytes copied so far
            self.release(size - offset)
            raise
        if durable:
            self.durable(fd)
        return name, fd

    def durable(self, fd: int) -> None:
        """The promise fsync() makes: the file's bytes and size on disk (its directory entry
        was made durable by ``take``)."""
        os.fdatasync(fd)

    def _sync_directory(self) -> None:
        directory = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def remove(self, name: str) -> None:
        try:
            size = self._accounted(name)
            self.path(name).unlink()
        except FileNotFoundError:
            return
        self.release(size)

    def _accounted(self, name: str) -> int:
        """The payload bytes a staging file counts for in ``used``."""
        size = self.path(name).stat().st_size
        if not self.sealed:
            return size
        try:
            return payload_size(size)
        except Tampered:
            return max(0, size - HEADER)  # a damaged file still takes room until removed

    # -- sealed chunks (callers hold the file's stripe lock) -----------------------------------

    @contextlib.contextmanager
    def _locked(self, fd: int) -> Iterator[None]:
        # By inode, not descriptor: an upload's descriptor and a writer's share the lock.
        with self._stripes[os.fstat(fd).st_ino % _STRIPES]:
            yield

    def _derive(self, salt: bytes) -> AESGCM:
        assert self._key is not None
        return AESGCM(derive_key(self._key, "cloudfs staging", salt))

    def _file_cipher(self, fd: int) -> AESGCM:
        header = os.pread(fd, HEADER, 0)
        if len(header) != HEADER or not header.startswith(MAGIC):
            raise Tampered("staging file without a sealed header")
        cipher: AESGCM = self._cipher(header[len(MAGIC) :])
        return cipher

    @staticmethod
    def _size(fd: int) -> int:
        return payload_size(os.fstat(fd).st_size)

    @staticmethod
    def _open_chunks(fd: int, cipher: AESGCM, first: int, last: int, size: int) -> list[bytes]:
        """The payloads of chunks ``first`` to ``last`` of a file of payload ``size``."""
        stop = min((last + 1) * CHUNK, size)
        length = (last - first) * STRIDE + (stop - last * CHUNK) + OVERHEAD
        sealed = memoryview(os.pread(fd, length, HEADER + first * STRIDE))
        if len(sealed) != length:
            raise Tampered("sealed staging file shrank while read")
        chunks = []
        for index in range(first, last + 1):
            record = sealed[(index - first) * STRIDE : (index - first + 1) * STRIDE]
            try:
                chunks.append(cipher.decrypt(record[:_NONCE], record[_NONCE:], _index(index)))
            except InvalidTag:
                raise Tampered(f"staged chunk {index} failed authentication") from None
        return chunks

    @staticmethod
    def _seal_at(fd: int, cipher: AESGCM, first: int, payloads: list[bytes]) -> None:
        """Seal consecutive chunks from ``first`` and write them with one call."""
        records = []
        for index, payload in enumerate(payloads, first):
            nonce = os.urandom(_NONCE)
            records += [nonce, cipher.encrypt(nonce, payload, _index(index))]
        os.pwritev(fd, records, HEADER + first * STRIDE)

    def _patch(
        self, fd: int, cipher: AESGCM, offset: int, data: bytes | memoryview, size: int
    ) -> None:
        """Put ``data`` at ``offset`` (at most ``size``, the payload size): chunks it covers
        whole are sealed anew, the one or two it covers in part are read, patched and
        re-sealed."""
        if not data:
            return
        view = memoryview(data)
        end = offset + len(data)
        first, last = offset // CHUNK, (end - 1) // CHUNK
        payloads = []
        for index in range(first, last + 1):
            start, stop = max(offset, index * CHUNK), min(end, (index + 1) * CHUNK)
            part = view[start - offset : stop - offset]
            base = index * CHUNK
            old_stop = min(size, base + CHUNK)
            if (start == base and stop >= old_stop) or old_stop <= base:
                payloads.append(bytes(part) if start == base else bytes(start - base) + part)
                continue
            old = self._open_chunks(fd, cipher, index, index, size)[0]
            payloads.append(old[: start - base] + part + old[stop - base :])
        self._seal_at(fd, cipher, first, payloads)

    def _fill(self, fd: int, cipher: AESGCM, size: int, end: int) -> None:
        """Zeros from payload ``size`` to ``end``, a chunk at a time (a gap of a gigabyte costs
        a chunk of memory)."""
        zeros = memoryview(bytes(CHUNK))
        while size < end:
            stop = min(end, (size // CHUNK + 1) * CHUNK)
            self._patch(fd, cipher, size, zeros[: stop - size], size)
            size = stop


def export(path: Path, key: bytes | None, out: BinaryIO) -> None:
    """Write the payload of one staging file to ``out``: how an operator reads a file set
    aside in ``unsynced/``.  A sealed file needs the key it was written under, and a damaged
    chunk stops the export with Tampered."""
    sealed = StagingArea._starts_sealed(str(path))
    if sealed and key is None:
        raise ConfigError("it is encrypted: give the cache key it was written under")
    area = StagingArea(path.parent, 0, key if sealed else None)
    with area.source(path.name) as source:
        for offset in range(0, source.size, _COPY):
            out.write(source.read(offset, min(_COPY, source.size - offset)))


class _SealedSource:
    """The payload of a sealed staging file, for an upload: any chunk that fails
    authentication fails the read, and so the upload."""

    def __init__(self, area: StagingArea, fd: int) -> None:
        self._area = area
        self._fd = fd
        self.size = area.size(fd)

    def read(self, offset: int, length: int) -> bytes:
        data = self._area.read(self._fd, length, offset)
        if len(data) != length:
            raise Unavailable("the staged file shrank while it was being uploaded")
        return data
