"""The error taxonomy: every store failure carries the errno a reader of the mount sees."""

from __future__ import annotations

import errno

import pytest

from cloudfs.errors import (
    S3_ERRORS,
    AccessDenied,
    CloudfsError,
    ConfigError,
    NeedsRestore,
    NotFound,
    StaleObject,
    StoreUnreachable,
    Unavailable,
)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("NoSuchKey", errno.ENOENT),
        ("NoSuchBucket", errno.ENOENT),
        ("404", errno.ENOENT),
        ("NotFound", errno.ENOENT),
        ("AccessDenied", errno.EACCES),
        ("403", errno.EACCES),
        ("Forbidden", errno.EACCES),
        ("InvalidAccessKeyId", errno.EACCES),
        ("SignatureDoesNotMatch", errno.EACCES),
        ("ExpiredToken", errno.EACCES),
        ("InvalidObjectState", errno.EACCES),
        ("PreconditionFailed", errno.ESTALE),
        ("412", errno.ESTALE),
    ],
)
def test_s3_codes_map_to_errnos(code: str, expected: int) -> None:
    """S3 error codes and bare HTTP statuses become the errno POSIX callers expect."""
    error = S3_ERRORS[code]("x")
    assert isinstance(error, CloudfsError)
    assert error.errno == expected


def test_specific_classes() -> None:
    """Precondition failures are stale versions; archived objects are a restore problem."""
    assert S3_ERRORS["PreconditionFailed"] is StaleObject
    assert S3_ERRORS["InvalidObjectState"] is NeedsRestore
    assert S3_ERRORS["NoSuchKey"] is NotFound
    assert S3_ERRORS["AccessDenied"] is AccessDenied


def test_errnos_of_the_classes() -> None:
    """Each class has its documented errno; unknown failures are EIO."""
    assert StaleObject.errno == 116 == errno.ESTALE
    assert Unavailable.errno == errno.EIO
    assert CloudfsError.errno == errno.EIO
    assert ConfigError.errno == errno.EINVAL
    assert issubclass(StoreUnreachable, ConfigError)
