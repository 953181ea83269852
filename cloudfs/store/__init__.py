"""Object stores behind one protocol: the rest of cloudfs never sees boto3 or a directory walk.

Keys are relative to the store's root (an S3 prefix or a directory) and use ``/`` separators.
Every method blocks, so callers run them in worker threads; implementations are thread-safe and
raise only ``cloudfs.errors`` exceptions.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlparse

from ..config import S3Options
from ..errors import ConfigError

ARCHIVE_CLASSES = frozenset({"GLACIER", "DEEP_ARCHIVE"})
"""Storage classes whose objects need a restore before a GET (GLACIER_IR reads directly)."""
UPLOAD_TOKEN = "cloudfs-upload"
"""User metadata naming the version of a file an upload sent: a retried conditional write that
finds an object there recognises its own earlier success by it, whatever the ETag is (under
SSE-KMS and SSE-C an ETag is not an MD5 of the bytes)."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What a listing says of one object; ``etag`` identifies the version of its bytes."""

    key: str
    size: int
    mtime_ns: int
    etag: str
    storage_class: str = "STANDARD"
    restored: bool = False
    """True once an archived object has a readable restored copy (only HEAD reports it)."""

    @property
    def needs_restore(self) -> bool:
        return self.storage_class in ARCHIVE_CLASSES and not self.restored


class Source(Protocol):
    """Bytes to upload, read by position: the staging area hands its files over this way, so
    a sealed one is decrypted (and authenticated) as the store reads it."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (fewer only at the end); OSError if the file cannot
        be read, a CloudfsError if its bytes are not the ones written."""
        ...


@dataclass(frozen=True, slots=True)
class FileSource:
    """A plain local file as a Source, read through a descriptor its caller keeps open."""

    fd: int
    size: int

    @classmethod
    def of(cls, fd: int) -> FileSource:
        return cls(fd, os.fstat(fd).st_size)

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)


class ObjectStore(Protocol):
    """The calls cloudfs makes of a bucket or a directory used as one."""

    def describe(self) -> str:
        """A human name for logs and status; never contains a secret."""
        ...

    def check(self) -> None:
        """Prove the store is reachable and readable; raise ConfigError with one clear line."""
        ...

    def list(self, after: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key sorts after ``after`` (all of them by default), in ascending
        UTF-8 byte order of key (as ListObjectsV2 returns them, and as its StartAfter skips)."""
        ...

    def head(self, key: str) -> ObjectInfo: ...

    def get_range(self, key: str, start: int, end: int, etag: str) -> bytes:
        """Bytes ``[start, end)`` of the version ``etag``; StaleObject if the object changed."""
        ...

    def stream_range(
        self, key: str, start: int, end: int, etag: str, piece: int
    ) -> Generator[bytes, None, None]:
        """Bytes ``[start, end)`` of the version ``etag`` in consecutive pieces of ``piece``
        bytes (the last may be shorter), each as soon as it has arrived, so whoever waits for
        the first block of a long GET does not wait for the last; StaleObject, Unavailable...
        are raised from the iteration, after the pieces before the failure (Interrupted when
        the reply was cut short, so that asking again for the rest may succeed)."""
        ...

    def request_restore(self, key: str, days: int) -> None:
        """Ask for a readable copy of an archived object, kept ``days`` days (Standard tier:
        hours, not minutes).  Asking again while a restore runs is not an error."""
        ...

    def put_file(
        self, key: str, source: Source, metadata: Mapping[str, str], expect_etag: str | None
    ) -> ObjectInfo:
        """Upload the bytes of ``source`` as ``key`` with user metadata, only if the store still
        holds the version ``expect_etag`` (None: only if ``key`` is absent), so a newer object
        written by another site is never silently overwritten: Conflict otherwise.  The bytes
        are checked end to end; a source that fails a read fails the upload before the object
        exists.  Returns the stored object's info."""
        ...

    def delete(self, key: str, etag: str | None = None) -> None:
        """Remove ``key``, only if it still holds the version ``etag`` (None: whatever it
        holds), so an object another site wrote since this host last saw the key is kept:
        Conflict otherwise.  A missing key is not an error (S3 answers so)."""
        ...

    def copy(
        self, source: str, target: str, etag: str, metadata: Mapping[str, str] | None = None
    ) -> ObjectInfo:
        """Server-side copy (the bytes never pass through this host) of the version ``etag`` of
        ``source``: StaleObject if it changed, NotFound if it is gone.  ``metadata`` None keeps
        the source's metadata, anything else replaces it; copying a key onto itself with new
        metadata is how chmod and utime of an uploaded file reach the store."""
        ...


def open_store(source: str, s3: S3Options) -> ObjectStore:
    """Build the store a ``s3://bucket[/prefix]`` or ``file:///path`` source names."""
    url = urlparse(source)
    if url.scheme == "s3":
        if not url.netloc:
            raise ConfigError(f"{source}: an s3 source needs a bucket, as in s3://bucket/prefix")
        from .s3 import S3Store

        return S3Store(url.netloc, unquote(url.path).strip("/"), s3)
    if url.scheme == "file":
        if url.netloc not in ("", "localhost"):
            raise ConfigError(f"{source}: file sources are local paths, as in file:///srv/archive")
        from .local import LocalStore

        return LocalStore(Path(unquote(url.path)))
    raise ConfigError(f"{source}: unknown source; use s3://bucket[/prefix] or file:///path")
