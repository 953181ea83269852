"""The S3 store: the only module that imports boto3.

Retries, backoff and timeouts come from botocore's configuration ('standard' mode), not from loops
here.  Every transport failure leaves this module as a ``cloudfs.errors`` exception.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions as bex

from ..config import GiB, MiB, S3Options
from ..errors import (
    S3_ERRORS,
    CloudfsError,
    ConfigError,
    Conflict,
    Interrupted,
    NotFound,
    StaleObject,
    StoreUnreachable,
    Unavailable,
)
from . import UPLOAD_TOKEN, ObjectInfo, Source

log = logging.getLogger(__name__)

T = TypeVar("T")

SSE_MODES = ("", "AES256", "aws:kms")
"""Server-side encryption modes a mount may ask for (see ``S3Options.sse``)."""
MIN_PART = 5 * MiB
"""S3 refuses a multipart upload whose parts (all but the last) are smaller."""
MAX_PARTS = 10_000
"""S3's limit on the parts of one multipart upload."""
COPY_LIMIT = 5 * GiB
"""The largest object one CopyObject call may copy; larger ones are copied part by part."""
COPY_PART = 512 * MiB
"""Part size of a multipart copy: the bytes never pass through this host, so large parts only
mean fewer requests (a 5 TiB object still fits in 10,000 of them once grown, see _part_size)."""

_MD5_ETAG = re.compile(r'^"[0-9a-f]{32}(-[0-9]+)?"$')
_MULTIPART_ETAG = re.compile(r'^"[0-9a-f]{32}-[0-9]+"$')
"""S3's ETag of a multipart upload: the MD5 of its parts' MD5s, then the number of parts."""
_CONFLICT_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})

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


def _part_size(size: int, preferred: int) -> int:
    """``preferred``, grown when ``size`` would otherwise need more than S3's 10,000 parts."""
    return max(preferred, -(-size // MAX_PARTS))


def _md5(data: bytes) -> Any:
    # An integrity check S3 defines, not a security measure (FIPS builds refuse it otherwise).
    return hashlib.md5(data, usedforsecurity=False)


def _base64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def _read(source: Source, offset: int, length: int, key: str) -> bytes:
    """``length`` bytes of the source at ``offset``; a short read means it shrank."""
    try:
        data = source.read(offset, length)
    except OSError as exc:
        raise Unavailable(f"{key}: cannot read the local file: {exc.strerror}") from exc
    if len(data) != length:
        raise Unavailable(f"{key}: the local file shrank while it was being uploaded")
    return data


def _etags_of(source: Source, part: int, key: str) -> set[str]:
    """The ETags a store may give these bytes: the MD5 of the whole (a single PUT, and some
    S3-compatible servers for multipart uploads too) and S3's multipart form for ``part``-sized
    parts.  One pass over the file."""
    whole = _md5(b"")
    parts = []
    size = source.size
    for offset in range(0, size, part):
        data = _read(source, offset, min(part, size - offset), key)
        whole.update(data)
        parts.append(_md5(data).digest())
    etags = {f'"{whole.hexdigest()}"'}
    if len(parts) > 1:
        etags.add(f'"{_md5(b"".join(parts)).hexdigest()}-{len(parts)}"')
    return etags


def _check_etag(
    key: str, reply: Mapping[str, Any], expected: str, source: Source, part: int
) -> None:
    """Compare the ETag S3 computed with the one of the bytes sent.  Under SSE-KMS or SSE-C the
    ETag is not an MD5 of the data, so there is nothing to compare."""
    etag = str(reply.get("ETag", ""))
    encrypted = str(reply.get("ServerSideEncryption", "")).startswith("aws:kms")
    if encrypted or "SSECustomerAlgorithm" in reply or not _MD5_ETAG.match(etag):
        return
    if etag != expected and etag not in _etags_of(source, part, key):
        raise Unavailable(
            f"{key}: the store holds ETag {etag} but the bytes sent have {expected}; "
            f"the upload was damaged on the way"
        )


class S3Store:
    def __init__(self, bucket: str, prefix: str, options: S3Options) -> None:
        if options.part_size < MIN_PART:
            raise ConfigError(f"the upload part size must be at least {MIN_PART // MiB} MiB")
        if options.upload_part_threads < 1:
            raise ConfigError("at least one upload part thread is needed")
        if options.sse not in SSE_MODES:
            raise ConfigError(f"server-side encryption must be one of {', '.join(SSE_MODES)}")
        if options.sse_kms_key_id and options.sse != "aws:kms":
            raise ConfigError("a KMS key id needs server-side encryption aws:kms")
        self.bucket = bucket
        self.options = options
        self.prefix = f"{prefix}/" if prefix else ""
        self._encryption: dict[str, str] = {}
        """Added to every request that creates an object (PUT, multipart upload, copy)."""
        if options.sse:
            self._encryption["ServerSideEncryption"] = options.sse
        if options.sse_kms_key_id:
            self._encryption["SSEKMSKeyId"] = options.sse_kms_key_id
        if not options.verify_tls:
            log.warning("TLS certificates of %s are not checked", options.endpoint_url or "S3")
        session = boto3.session.Session(profile_name=options.profile)
        config = botocore.config.Config(
            retries={"mode": "standard", "max_attempts": options.max_attempts},
            connect_timeout=options.connect_timeout,
            read_timeout=options.read_timeout,
            max_pool_connections=options.max_pool_connections,
            s3={"addressing_style": "path" if options.path_style else "auto"},
            tcp_keepalive=True,
            # Uploads carry Content-MD5 and are checked against the ETag: a CRC32 of every body
            # on top would only spend CPU that the PACS's writes need.
            request_checksum_calculation="when_required",
        )
        try:
            self.client = session.client(
                "s3",
                endpoint_url=options.endpoint_url,
                # botocore itself reads only AWS_DEFAULT_REGION; the AWS CLI and SDKs honour
                # AWS_REGION first, and so does cloudfs.
                region_name=options.region or os.environ.get("AWS_REGION") or None,
                config=config,
                verify=options.verify_tls,
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

    def _write_error(self, exc: Exception, key: str, condition: Mapping[str, str]) -> Exception:
        """Like _error, but a failed condition of a write is a Conflict, not a stale read: with
        If-None-Match the key exists, with If-Match it holds another version or none at all."""
        if condition and isinstance(exc, bex.ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _CONFLICT_CODES or ("IfMatch" in condition and code == "NoSuchKey"):
                return Conflict(f"{key}: another writer changed it in the store ({code})")
        return self._error(exc, key)

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
            message = str(exc.response.get("Error", {}).get("Message", "")).strip()
            raise ConfigError(
                f"{where}: listing the bucket failed with {code or 'an error'}"
                + (f" ({message})" if message else "")
            ) from exc
        except bex.NoCredentialsError as exc:
            raise ConfigError(f"{where}: no AWS credentials found") from exc
        except _TRANSPORT_ERRORS as exc:
            raise StoreUnreachable(f"{where}: endpoint unreachable ({exc})") from exc
        except bex.BotoCoreError as exc:
            raise ConfigError(f"{where}: {exc}") from exc

    def list(self, after: str = "") -> Iterator[ObjectInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        strip = len(self.prefix)
        params = {"StartAfter": self.prefix + after} if after else {}
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix, **params):
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

    def _head(self, key: str, **params: Any) -> dict[str, Any]:
        try:
            reply: dict[str, Any] = self.client.head_object(
                Bucket=self.bucket, Key=self.prefix + key, **params
            )
        except (bex.BotoCoreError, bex.ClientError) as exc:
            raise self._error(exc, key) from exc
        return reply

    def head(self, key: str) -> ObjectInfo:
        reply = self._head(key)
        return ObjectInfo(
            key,
            reply["ContentLength"],
            _mtime_ns(reply["LastModified"]),
            reply["ETag"],
            reply.get("StorageClass", "STANDARD"),
            restored='ongoing-request="false"' in reply.get("Restore", ""),
        )

    def get_range(self, key: str, start: int, end: int, etag: str) -> bytes:
        return b"".join(self.stream_range(key, start, end, etag, max(end - start, 1)))

    def stream_range(
        self, key: str, start: int, end: int, etag: str, piece: int
    ) -> Generator[bytes, None, None]:
        try:
            reply = self.client.get_object(
                Bucket=self.bucket,
                Key=self.prefix + key,
                Range=f"bytes={start}-{end - 1}",
                IfMatch=etag,
            )
        except (bex.BotoCoreError, bex.ClientError) as exc:
            raise self._error(exc, key) from exc
        body = reply["Body"]
        try:
            # Some S3-compatible servers ignore If-Match: the reply's ETag is the second check.
            if reply.get("ETag", etag) != etag:
                raise StaleObject(f"{key}: changed in the store (ETag {reply['ETag']})")
            # A server that ignores Range answers the whole object: its first bytes are not the
            # range's, so nothing of such a reply is handed out.
            answered = reply.get("ContentLength", end - start)
            if answered != end - start:
                raise Unavailable(
                    f"{key}: the store answered {answered} bytes for a range of {end - start}"
                )
            for offset in range(start, end, piece):
                yield self._read_exactly(body, min(piece, end - offset), key, end - start)
        finally:
            body.close()

    def _read_exactly(self, body: Any, length: int, key: str, asked: int) -> bytes:
        """``length`` bytes of a reply body: a body that ends early is a short read."""
        parts = []
        while length:
            try:
                data: bytes = body.read(length)
            except (bex.BotoCoreError, bex.ClientError) as exc:
                raise Interrupted(f"{key}: the reply was cut short: {exc}") from exc
            if not data:
                raise Interrupted(f"{key}: short read (the reply ended before {asked} bytes)")
            parts.append(data)
            length -= len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

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

    def put_file(
        self, key: str, source: Source, metadata: Mapping[str, str], expect_etag: str | None
    ) -> ObjectInfo:
        """Upload ``source`` as ``key`` only if the store still holds ``expect_etag`` (None:
        only if the key is absent), so a newer object from another site is never overwritten.
        A part the source cannot read fails the upload before anything is completed."""
        condition = {"IfNoneMatch": "*"} if expect_etag is None else {"IfMatch": expect_etag}
        size = source.size
        part = _part_size(size, self.options.part_size)
        try:
            if size <= self.options.part_size:
                reply, expected = self._put_whole(key, source, metadata, condition)
            else:
                reply, expected = self._put_parts(key, source, metadata, condition)
        except Conflict:
            # A retry of an upload whose reply was lost finds its own bytes there.
            own = self._own_upload(key, source, part, metadata.get(UPLOAD_TOKEN))
            if own is None:
                raise
            return ObjectInfo(key, size, time.time_ns(), own)
        _check_etag(key, reply, expected, source, part)
        return ObjectInfo(key, size, time.time_ns(), reply["ETag"])

    def _own_upload(self, key: str, source: Source, part: int, token: str | None) -> str | None:
        """The ETag of ``key`` if this upload (``token``) wrote it, or it holds exactly the bytes
        of ``source``; else None.  A multipart object is checked with the part size it was
        uploaded with (the size of its first part), which is not this mount's if ``--part-size``
        changed before the retry."""
        try:
            reply = self._head(key)
        except NotFound:
            return None
        etag = str(reply["ETag"])
        if reply["ContentLength"] != source.size:
            return None
        if token is not None and reply.get("Metadata", {}).get(UPLOAD_TOKEN) == token:
            return etag
        if _MULTIPART_ETAG.match(etag):
            # A server without part numbers: this mount's part size it is.
            with contextlib.suppress(CloudfsError, KeyError, ValueError):
                part = int(self._head(key, PartNumber=1)["ContentLength"]) or part
        return etag if etag in _etags_of(source, part, key) else None

    def _put_whole(
        self, key: str, source: Source, metadata: Mapping[str, str], condition: dict[str, str]
    ) -> tuple[dict[str, Any], str]:
        """One PUT; Content-MD5 makes S3 refuse a body damaged on the way."""
        data = _read(source, 0, source.size, key)
        digest = _md5(data)
        try:
            reply: dict[str, Any] = self.client.put_object(
                Bucket=self.bucket,
                Key=self.prefix + key,
                Body=data,
                ContentMD5=_base64(digest.digest()),
                Metadata=dict(metadata),
                **self._encryption,
                **condition,
            )
        except (bex.BotoCoreError, bex.ClientError) as exc:
            raise self._write_error(exc, key, condition) from exc
        return reply, f'"{digest.hexdigest()}"'

    def _put_parts(
        self, key: str, source: Source, metadata: Mapping[str, str], condition: dict[str, str]
    ) -> tuple[dict[str, Any], str]:
        """A multipart upload read from disk part by part; the multipart ETag is the MD5 of the
        parts' binary MD5s followed by the part count."""
        size = source.size
        part = _part_size(size, self.options.part_size)
        offsets = range(0, size, part)
        digests = [b""] * len(offsets)

        def send(upload_id: str, number: int, offset: int) -> str:
            data = _read(source, offset, min(part, size - offset), key)
            digest = _md5(data).digest()
            digests[number - 1] = digest
            try:
                reply = self.client.upload_part(
                    Bucket=self.bucket,
                    Key=self.prefix + key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=data,
                    ContentMD5=_base64(digest),
                )
            except (bex.BotoCoreError, bex.ClientError) as exc:
                raise self._error(exc, key) from exc
            return str(reply["ETag"])

        reply = self._multipart(key, {"Metadata": dict(metadata)}, send, offsets, condition)
        return reply, f'"{_md5(b"".join(digests)).hexdigest()}-{len(digests)}"'

    def _multipart(
        self,
        key: str,
        attributes: Mapping[str, Any],
        send: Callable[[str, int, int], str],
        offsets: Sequence[int],
        condition: dict[str, str],
    ) -> dict[str, Any]:
        """Create a multipart upload of ``key``, have ``send(upload_id, number, offset)`` send
        each part (a few at once) and complete it under ``condition``.  Any failure aborts the
        upload: S3 would otherwise keep, and bill, the parts already sent."""
        try:
            upload_id = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=self.prefix + key, **attributes, **self._encryption
            )["UploadId"]
        except (bex.BotoCoreError, bex.ClientError) as exc:
            raise self._error(exc, key) from exc
        try:
            etags = self._in_parallel(
                lambda number, offset: send(upload_id, number, offset), offsets
            )
            reply: dict[str, Any] = self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=self.prefix + key,
                UploadId=upload_id,
                MultipartUpload={
                    "Parts": [
                        {"ETag": etag, "PartNumber": number} for number, etag in enumerate(etags, 1)
                    ]
                },
                **condition,
            )
        except (bex.BotoCoreError, bex.ClientError) as exc:
            self._abort(key, upload_id)
            raise self._write_error(exc, key, condition) from exc
        except BaseException:
            self._abort(key, upload_id)
            raise
        return reply

    def _in_parallel(
        self, task: Callable[[int, int], T], offsets: Sequence[int]
    ) -> builtins.list[T]:
        """``task(part_number, offset)`` for every part, in order; the first failure is raised
        and the parts not yet started are dropped."""
        pool = ThreadPoolExecutor(
            max_workers=self.options.upload_part_threads, thread_name_prefix="cloudfs-part"
        )
        try:
            futures = [
                pool.submit(task, number, offset) for number, offset in enumerate(offsets, 1)
            ]
            return [future.result() for future in futures]
        finally:
            pool.shutdown(cancel_futures=True)

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=self.prefix + key, UploadId=upload_id
            )
        except (bex.BotoCoreError, bex.ClientError) as exc:
            log.warning(
                "%s: cannot abort multipart upload %s (%s); its parts stay until a lifecycle rule "
                "for incomplete uploads removes them",
                key,
                upload_id,
                exc,
            )

    def delete(self, key: str, etag: str | None = None) -> None:
        """Deleting a missing key succeeds, as S3 itself answers.  With ``etag``, the object is
        deleted only while it holds that version, so another writer's newer object is kept
        (Conflict): a HEAD compares the ETag first, for servers that ignore conditions on a
        delete, and the DeleteObject carries If-Match, which AWS (and moto) check, closing the
        window between the two requests."""
        condition: dict[str, str] = {}
        if etag is not None:
            try:
                current = self.head(key)
            except NotFound:
                return
            if current.etag.strip('"') != etag.strip('"'):
                raise Conflict(f"{key}: another writer changed it in the store; not deleted")
            condition = {"IfMatch": etag}
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key, **condition)
        except bex.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if condition and code in ("NoSuchKey", "404"):
                return  # deleted by someone else since the HEAD: gone either way
            raise self._write_error(exc, key, condition) from exc
        except bex.BotoCoreError as exc:
            raise self._error(exc, key) from exc

    def copy(
        self, source: str, target: str, etag: str, metadata: Mapping[str, str] | None = None
    ) -> ObjectInfo:
        """Server-side copy of the version ``etag`` of ``source``.  ``metadata`` None keeps the
        source's user metadata; otherwise it replaces it, which is how a key gets new metadata
        (copied onto itself).  Content type and storage class are kept either way: S3 would
        otherwise reset them, and a chmod must not move an object to another storage class."""
        try:
            # Also the check for servers that ignore CopySourceIfMatch (moto does); on AWS the
            # condition on the copy itself closes the window between the two requests.
            head = self.client.head_object(
                Bucket=self.bucket, Key=self.prefix + source, IfMatch=etag
            )
        except (bex.BotoCoreError, bex.ClientError) as exc:
            raise self._error(exc, source) from exc
        size: int = head["ContentLength"]
        kept = {name: head[name] for name in ("ContentType", "StorageClass") if name in head}
        if size > COPY_LIMIT:
            user = head.get("Metadata", {}) if metadata is None else dict(metadata)
            new_etag = self._copy_parts(source, target, etag, size, {**kept, "Metadata": user})
            mtime_ns = time.time_ns()
        else:
            new_etag, mtime_ns = self._copy_whole(source, target, etag, kept, metadata)
        return ObjectInfo(target, size, mtime_ns, new_etag, head.get("StorageClass", "STANDARD"))

    def _copy_whole(
        self,
        source: str,
        target: str,
        etag: str,
        kept: Mapping[str, str],
        metadata: Mapping[str, str] | None,
    ) -> tuple[str, int]:
        """One CopyObject; the new object's ETag and modification time."""
        extra: dict[str, Any]
        if metadata is None:
            extra = {name: value for name, value in kept.items() if name != "ContentType"}
        else:
            extra = {**kept, "MetadataDirective": "REPLACE", "Metadata": dict(metadata)}
        try:
            reply = self.client.copy_object(
                Bucket=self.bucket,
                Key=self.prefix + target,
                CopySource={"Bucket": self.bucket, "Key": self.prefix + source},
                CopySourceIfMatch=etag,
                **extra,
                **self._encryption,
            )
        except (bex.BotoCoreError, bex.ClientError) as exc:
            raise self._error(exc, source) from exc
        result = reply["CopyObjectResult"]
        return str(result["ETag"]), _mtime_ns(result["LastModified"])

    def _copy_parts(
        self, source: str, target: str, etag: str, size: int, attributes: Mapping[str, Any]
    ) -> str:
        """A multipart copy, for objects above the 5 GiB CopyObject accepts; every part is
        copied from the version ``etag`` only.  The new object's ETag."""
        part = _part_size(size, COPY_PART)

        def send(upload_id: str, number: int, offset: int) -> str:
            try:
                reply = self.client.upload_part_copy(
                    Bucket=self.bucket,
                    Key=self.prefix + target,
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource={"Bucket": self.bucket, "Key": self.prefix + source},
                    CopySourceRange=f"bytes={offset}-{min(offset + part, size) - 1}",
                    CopySourceIfMatch=etag,
                )
            except (bex.BotoCoreError, bex.ClientError) as exc:
                raise self._error(exc, source) from exc
            return str(reply["CopyPartResult"]["ETag"])

        reply = self._multipart(target, attributes, send, range(0, size, part), {})
        return str(reply["ETag"])
