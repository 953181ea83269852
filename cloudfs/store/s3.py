"""The S3 store: the only module that imports boto3.

Retries, backoff and timeouts come from botocore's configuration ('standard' mode), not from loops
here.  Every transport failure leaves this module as a ``cloudfs.errors`` exception.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions as bex

from ..config import S3Options
from ..errors import S3_ERRORS, ConfigError, StaleObject, StoreUnreachable, Unavailable
from . import ObjectInfo

log = logging.getLogger(__name__)

_TRANSPORT_ERRORS = (
    bex.EndpointConnectionError,
    bex.ConnectTimeoutError,
    bex.ReadTimeoutError,
    bex.ConnectionClosedError,
    bex.ResponseStreamingError,
    bex.IncompleteReadError,
    bex.HTTPClientError,
)


def _mtime_ns(value: Any) -> int:
    return int(value.timestamp() * 1_000_000_000)


class S3Store:
    def __init__(self, bucket: str, prefix: str, options: S3Options) -> None:
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        session = boto3.session.Session(profile_name=options.profile)
        config = botocore.config.Config(
            retries={"mode": "standard", "max_attempts": options.max_attempts},
            connect_timeout=options.connect_timeout,
            read_timeout=options.read_timeout,
            max_pool_connections=options.max_pool_connections,
            s3={"addressing_style": "path" if options.path_style else "auto"},
            tcp_keepalive=True,
        )
        try:
            self.client = session.client(
                "s3", endpoint_url=options.endpoint_url, region_name=options.region, config=config
            )
        except bex.BotoCoreError as exc:
            raise ConfigError(f"cannot configure S3: {exc}") from exc

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix} at {self.client.meta.endpoint_url}"

    def _error(self, exc: Exception, key: str) -> Exception:
        """Translate a botocore failure into our taxonomy, keeping the S3 code in the message."""
        if isinstance(exc, bex.ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            kind = S3_ERRORS.get(code, Unavailable)
            return kind(f"{key}: {code} {exc.response.get('Error', {}).get('Message', '')}".strip())
        if isinstance(exc, bex.NoCredentialsError):
            return ConfigError("no AWS credentials found (environment, profile or instance role)")
        return Unavailable(f"{key}: {exc}")

    def check(self) -> None:
        where = f"s3://{self.bucket} at {self.client.meta.endpoint_url}"
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except bex.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchBucket", "404"):
                raise ConfigError(f"{where}: the bucket does not exist") from exc
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise ConfigError(f"{where}: access denied ({code}); check credentials") from exc
            raise ConfigError(f"{where}: {code}") from exc
        except bex.NoCredentialsError as exc:
            raise ConfigError(f"{where}: no AWS credentials found") from exc
        except _TRANSPORT_ERRORS as exc:
            raise StoreUnreachable(f"{where}: endpoint unreachable ({exc})") from exc
        except bex.BotoCoreError as exc:
            raise ConfigError(f"{where}: {exc}") from exc

    def list(self) -> Iterator[ObjectInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        strip = len(self.prefix)
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for item in page.get("Contents", ()):
                    key = item["Key"][strip:]
                    if key:
                        yield ObjectInfo(
                            key,
                            item["Size"],
                            _mtime_ns(item["LastModified"]),
                            item["ETag"],
                            item.get("StorageClass", "STANDARD"),
                        )
        except (bex.BotoCoreError, bex.ClientError) as exc:
            raise self._error(exc, self.prefix or "/") from exc

    def head(self, key: str) -> ObjectInfo:
        try:
            reply = self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)
        except (bex.BotoCoreError, bex.ClientError) as exc:
            raise self._error(exc, key) from exc
        return ObjectInfo(
            key,
            reply["ContentLength"],
            _mtime_ns(reply["LastModified"]),
            reply["ETag"],
            reply.get("StorageClass", "STANDARD"),
            restored='ongoing-request="false"' in reply.get("Restore", ""),
        )

    def get_range(self, key: str, start: int, end: int, etag: str) -> bytes:
        try:
            reply = self.client.get_object(
                Bucket=self.bucket,
                Key=self.prefix + key,
                Range=f"bytes={start}-{end - 1}",
                IfMatch=etag,
            )
            data: bytes = reply["Body"].read()
        except (bex.BotoCoreError, bex.ClientError) as exc:
            raise self._error(exc, key) from exc
        # Some S3-compatible servers ignore If-Match: the reply's ETag is the second check.
        if reply.get("ETag", etag) != etag:
            raise StaleObject(f"{key}: changed in the store (ETag {reply['ETag']})")
        if len(data) != end - start:
            raise Unavailable(f"{key}: short read ({len(data)} of {end - start} bytes)")
        return data

    def request_restore(self, key: str, days: int) -> None:
        try:
            self.client.restore_object(
                Bucket=self.bucket,
                Key=self.prefix + key,
                RestoreRequest={"Days": days, "GlacierJobParameters": {"Tier": "Standard"}},
            )
        except bex.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "RestoreAlreadyInProgress":
                raise self._error(exc, key) from exc
        except bex.BotoCoreError as exc:
            raise self._error(exc, key) from exc

    def put_file(self, key: str, path: Path, metadata: Mapping[str, str]) -> ObjectInfo:
        try:
            self.client.upload_file(
                str(path), self.bucket, self.prefix + key, ExtraArgs={"Metadata": dict(metadata)}
            )
        except (bex.BotoCoreError, bex.ClientError) as exc:
            raise self._error(exc, key) from exc
        except boto3.exceptions.S3UploadFailedError as exc:
            raise Unavailable(f"{key}: {exc}") from exc
        return self.head(key)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key)
        except (bex.BotoCoreError, bex.ClientError) as exc:
            raise self._error(exc, key) from exc

    def copy(self, source: str, target: str) -> ObjectInfo:
        try:
            self.client.copy(
                {"Bucket": self.bucket, "Key": self.prefix + source},
                self.bucket,
                self.prefix + target,
            )
        except (bex.BotoCoreError, bex.ClientError) as exc:
            raise self._error(exc, source) from exc
        return self.head(target)
