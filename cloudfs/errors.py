"""One error taxonomy for every layer: each error knows the errno a reader sees.

Stores raise these instead of transport exceptions, so the filesystem core maps any failure to an
errno without knowing whether S3 or a local directory produced it.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class CloudfsError(Exception):
    """Base of every expected failure; ``errno`` is what a FUSE caller receives."""

    errno: int = errno.EIO


class NotFound(CloudfsError):
    errno = errno.ENOENT


class AccessDenied(CloudfsError):
    errno = errno.EACCES


class NeedsRestore(CloudfsError):
    """The object is in an archive storage class (GLACIER, DEEP_ARCHIVE) and not restored.

    EACCES, as mountpoint-s3 does: an immediate, permanent-looking failure is better than EAGAIN,
    which some readers retry forever and Python's ``read()`` reports as a silent ``None``.
    """

    errno = errno.EACCES


class StaleObject(CloudfsError):
    """The object changed under an open file (ETag mismatch); never serve a mix of versions."""

    errno = errno.ESTALE


class Conflict(CloudfsError):
    """Another writer changed the key since the version a conditional write was based on (or
    created it first); the write did not happen, so nobody's newer object was overwritten."""

    errno = errno.EBUSY


class Unavailable(CloudfsError):
    """The store could not be reached or kept failing after the configured retries."""

    errno = errno.EIO


class DiskFull(CloudfsError):
    """The local disk under the cache directory is full: a writer gets ENOSPC, as from a full
    local drive, and nothing already written is lost."""

    errno = errno.ENOSPC


class Interrupted(Unavailable):
    """A reply cut short: the connection dropped or stalled in the middle of the body.  The
    request itself was answered, so it is worth sending again at once for what is missing
    (botocore's retries end when the reply's headers arrive)."""


class FsError(CloudfsError):
    """A POSIX refusal with an explicit errno (EEXIST, ENOTEMPTY, EROFS, ...)."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or errno.errorcode.get(code, str(code)))
        self.errno = code


class ConfigError(CloudfsError):
    """A setting or the source cannot work; reported before anything is mounted."""

    errno = errno.EINVAL


class StoreUnreachable(ConfigError):
    """The endpoint did not answer at mount time.  Fatal for a first mount (there is no catalog
    to serve from); a remount serves the catalog and cache and catches up when the cloud returns."""


async def contained(what: str, work: Callable[..., Awaitable[object]], *args: object) -> None:
    """Run background work whose failure must not end the mount (an exception escaping any task
    of the daemon unmounts it): an expected failure is logged as a warning, anything else with
    its traceback."""
    try:
        await work(*args)
    except CloudfsError as exc:
        log.warning("%s failed: %s", what, exc)
    except Exception:
        log.exception("%s failed unexpectedly", what)


# S3 error codes (and HTTP statuses, for HEAD responses that carry no code) to our errors.
S3_ERRORS: dict[str, type[CloudfsError]] = {
    "NoSuchKey": NotFound,
    "NoSuchBucket": NotFound,
    "404": NotFound,
    "NotFound": NotFound,
    "AccessDenied": AccessDenied,
    "403": AccessDenied,
    "Forbidden": AccessDenied,
    "InvalidAccessKeyId": AccessDenied,
    "SignatureDoesNotMatch": AccessDenied,
    "ExpiredToken": AccessDenied,
    "InvalidObjectState": NeedsRestore,
    "PreconditionFailed": StaleObject,
    "412": StaleObject,
}
