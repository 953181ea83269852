"""The write calls of both stores: conditional puts, server-side copies and deletes.

The S3 store talks to a real moto_server process (conftest); the local store writes under
tmp_path.  Where moto does not enforce a condition AWS enforces, the test says so in its name.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.exceptions as bex
import pytest
from conftest import REGION, Bucket, assert_bytes, payload
from helpers_unit import source_files

from cloudfs.config import KiB, MiB, S3Options
from cloudfs.errors import ConfigError, Conflict, NotFound, StaleObject, Unavailable
from cloudfs.staging import CHUNK, HEADER, STRIDE, StagingArea, Tampered
from cloudfs.store import UPLOAD_TOKEN, ObjectInfo, ObjectStore
from cloudfs.store import s3 as s3_module
from cloudfs.store.local import TEMPORARY_SUFFIX, LocalStore
from cloudfs.store.s3 import S3Store

PREFIX = "site"
"""The S3 store works under a prefix, so every test also checks that keys carry it."""
PART = 5 * MiB
"""S3's smallest part, so a multipart upload stays small enough for a quick test."""


@dataclass
class Site:
    """A store under test and a way to look behind it (the bucket or the directory)."""

    store: ObjectStore
    bucket: Bucket | None = None
    root: Path | None = None

    def rewrite(self, key: str, data: bytes) -> None:
        """Another writer replaces ``key`` behind the store's back."""
        if self.bucket is not None:
            self.bucket.put(f"{PREFIX}/{key}", data)
            return
        assert self.root is not None
        path = self.root / key
        before = path.stat().st_mtime_ns
        path.write_bytes(data)
        os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))

    def raw_client(self) -> Any:
        assert self.bucket is not None
        return self.bucket.server.client()

    def user_metadata(self, key: str) -> dict[str, str]:
        reply = self.raw_client().head_object(Bucket=self.bucket_name, Key=f"{PREFIX}/{key}")
        return dict(reply["Metadata"])

    def open_uploads(self) -> list[str]:
        """Keys of multipart uploads begun and neither completed nor aborted."""
        reply = self.raw_client().list_multipart_uploads(Bucket=self.bucket_name)
        return [upload["Key"] for upload in reply.get("Uploads", ())]

    @property
    def bucket_name(self) -> str:
        assert self.bucket is not None
        return self.bucket.name


def s3_site(bucket: Bucket) -> Site:
    options = S3Options(
        endpoint_url=bucket.endpoint, region=REGION, path_style=True, part_size=PART
    )
    return Site(S3Store(bucket.name, PREFIX, options), bucket=bucket)


@pytest.fixture
def s3(bucket: Bucket) -> Site:
    return s3_site(bucket)


@pytest.fixture
def local(tmp_path: Path) -> Site:
    root = tmp_path / "root"
    root.mkdir()
    return Site(LocalStore(root), root=root)


@pytest.fixture(params=["s3", "local"])
def site(request: pytest.FixtureRequest) -> Site:
    chosen: Site = request.getfixturevalue(request.param)
    return chosen


@pytest.fixture
def files(tmp_path: Path) -> Iterator[Any]:
    """``files(data)``: a Source over a local file holding ``data``, as the staging area hands
    one to an upload."""
    with source_files(tmp_path / "staging") as make:
        yield make


def read_all(store: ObjectStore, info: ObjectInfo) -> bytes:
    return store.get_range(info.key, 0, info.size, info.etag)


def multipart_etag(data: bytes, part: int) -> str:
    digests = b"".join(
        hashlib.md5(data[offset : offset + part]).digest() for offset in range(0, len(data), part)
    )
    return f'"{hashlib.md5(digests).hexdigest()}-{-(-len(data) // part)}"'


# -- put_file ------------------------------------------------------------------------------------


def test_small_put_then_head_and_read(site: Site, files: Any) -> None:
    """A put returns what head then reports, and the bytes read back are the bytes sent."""
    data = payload(100_000, "small")
    info = site.store.put_file("dir/small.bin", files(data), {}, None)
    assert (info.key, info.size) == ("dir/small.bin", 100_000)
    head = site.store.head("dir/small.bin")
    assert (head.size, head.etag) == (info.size, info.etag)
    assert_bytes(read_all(site.store, info), data, "dir/small.bin")
    if site.bucket is not None:
        assert info.etag == f'"{hashlib.md5(data).hexdigest()}"'
        assert site.bucket.listed_keys() == [f"{PREFIX}/dir/small.bin"]


def test_streamed_range_comes_in_pieces(site: Site, files: Any) -> None:
    """stream_range hands out exactly the bytes asked for, in pieces of the size asked (the
    last shorter), whatever the range; get_range gives the same bytes at once."""
    data = payload(300_000, "streamed")
    info = site.store.put_file("dir/streamed.bin", files(data), {}, None)
    for start, end, piece in [(0, 300_000, 65_536), (5, 200_001, 100_000), (7, 8, 4096)]:
        pieces = list(site.store.stream_range(info.key, start, end, info.etag, piece))
        assert [len(p) for p in pieces[:-1]] == [piece] * (len(pieces) - 1)
        assert 0 < len(pieces[-1]) <= piece
        assert b"".join(pieces) == data[start:end]
        assert site.store.get_range(info.key, start, end, info.etag) == data[start:end]


def test_a_reply_that_ignores_the_range_is_refused(
    s3: Site, files: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that ignores Range answers the whole object, whose first bytes are not the
    range's: nothing of such a reply is handed out, the read fails as Unavailable."""
    assert isinstance(s3.store, S3Store)
    data = payload(300_000, "ranged")
    info = s3.store.put_file("ranged.bin", files(data), {}, None)
    client = s3.store.client
    get = client.get_object

    def whole_object(**kwargs: Any) -> Any:
        kwargs.pop("Range")
        return get(**kwargs)

    monkeypatch.setattr(client, "get_object", whole_object)
    with pytest.raises(Unavailable, match="answered 300000 bytes for a range of 4000"):
        next(s3.store.stream_range(info.key, 1000, 5000, info.etag, 1024))


def test_empty_file_put(site: Site, files: Any) -> None:
    """A zero-byte file is an object like any other."""
    info = site.store.put_file("empty", files(b""), {}, None)
    assert info.size == 0 and site.store.head("empty").etag == info.etag


def test_metadata_round_trip_s3(s3: Site, files: Any) -> None:
    """User metadata reaches S3 as x-amz-meta-* headers, every entry as given."""
    metadata = {"mode": "640", "mtime": "1700000000.5", "patient": "anon-17"}
    s3.store.put_file("meta.dcm", files(b"dicom"), metadata, None)
    assert s3.user_metadata("meta.dcm") == metadata


def test_metadata_round_trip_local(local: Site, files: Any) -> None:
    """The local store keeps what a file can hold: permission bits and mtime, to the ns."""
    metadata = {"mode": "4640", "mtime": "1700000000.123456789", "patient": "anon-17"}
    info = local.store.put_file("meta.dcm", files(b"dicom"), metadata, None)
    assert local.root is not None
    st = (local.root / "meta.dcm").stat()
    assert oct(st.st_mode & 0o7777) == oct(0o640), "setuid must be dropped"
    assert st.st_mtime_ns == info.mtime_ns == 1_700_000_000_123_456_789
    assert local.store.head("meta.dcm").etag == info.etag


def test_multipart_upload(s3: Site, files: Any) -> None:
    """Above part_size a file goes up in parts: same bytes, the '-N' ETag of three parts."""
    data = payload(12 * MiB + 123, "multipart")
    info = s3.store.put_file("big/scan.bin", files(data), {"mode": "600"}, None)
    assert info.size == len(data)
    assert info.etag.endswith('-3"') and info.etag == multipart_etag(data, PART)
    assert s3.store.head("big/scan.bin").etag == info.etag
    assert_bytes(read_all(s3.store, info), data, "big/scan.bin")
    assert s3.user_metadata("big/scan.bin") == {"mode": "600"}
    assert s3.open_uploads() == []


def test_failed_part_aborts_the_upload(
    s3: Site, files: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A part that fails aborts the multipart upload: no object and no parts left behind."""
    assert isinstance(s3.store, S3Store)
    client = s3.store.client
    send = client.upload_part

    def failing(**kwargs: Any) -> Any:
        if kwargs["PartNumber"] == 2:
            error = {"Error": {"Code": "InternalError", "Message": "injected"}}
            raise bex.ClientError(error, "UploadPart")
        return send(**kwargs)

    monkeypatch.setattr(client, "upload_part", failing)
    with pytest.raises(Unavailable, match="InternalError"):
        s3.store.put_file("broken.bin", files(payload(11 * MiB, "broken")), {}, None)
    assert s3.open_uploads() == []
    with pytest.raises(NotFound):
        s3.store.head("broken.bin")


@pytest.mark.parametrize("size", [300 * KiB, 11 * MiB])
def test_a_tampered_sealed_staging_file_is_never_uploaded(
    s3: Site, tmp_path: Path, size: int
) -> None:
    """A staged file sealed under the cache key, with one bit flipped past the first part:
    the upload fails on that chunk, leaving no object and no multipart upload behind."""
    staging = StagingArea(tmp_path / "sealed", 1 << 30, os.urandom(32))
    name, fd = staging.take()
    staging.write(fd, payload(size, "sealed"), 0)
    os.close(fd)
    chunk = (size - 1) // CHUNK
    with open(staging.path(name), "r+b") as raw:
        raw.seek(HEADER + chunk * STRIDE + 40)
        byte = raw.read(1)
        raw.seek(-1, os.SEEK_CUR)
        raw.write(bytes([byte[0] ^ 0x80]))
    with pytest.raises(Tampered), staging.source(name) as source:
        s3.store.put_file("tampered.bin", source, {}, None)
    assert s3.open_uploads() == []
    with pytest.raises(NotFound):
        s3.store.head("tampered.bin")


def test_create_only_put_refuses_an_existing_key(site: Site, files: Any) -> None:
    """expect_etag=None never replaces an object another writer created."""
    first = site.store.put_file("k", files(b"first"), {}, None)
    with pytest.raises(Conflict):
        site.store.put_file("k", files(b"second, longer"), {}, None)
    assert read_all(site.store, site.store.head("k")) == b"first"
    assert site.store.head("k").etag == first.etag


def test_retried_upload_finds_its_own_bytes_and_succeeds(s3: Site, files: Any) -> None:
    """An upload retried after its reply was lost meets its own object: not a conflict."""
    small = files(b"same bytes")
    first = s3.store.put_file("k", small, {}, None)
    assert s3.store.put_file("k", small, {}, None).etag == first.etag
    large = files(payload(11 * MiB, "retried"))
    uploaded = s3.store.put_file("big", large, {}, None)
    assert s3.store.put_file("big", large, {}, None).etag == uploaded.etag


def test_retried_upload_knows_its_own_object_by_its_token_when_etags_say_nothing(
    s3: Site, files: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under SSE-KMS or SSE-C an ETag is no MD5 of the bytes, so a retry whose first attempt
    landed cannot know its object by its ETag: the upload token in its metadata tells it.  An
    object with another token (another writer's, or another version's) stays a conflict."""
    monkeypatch.setattr(s3_module, "_etags_of", lambda source, part, key: set())
    small, large = files(b"same bytes"), files(payload(11 * MiB, "retried"))
    for key, data in (("k", small), ("big", large)):
        first = s3.store.put_file(key, data, {UPLOAD_TOKEN: "v1"}, None)
        assert s3.user_metadata(key)[UPLOAD_TOKEN] == "v1"
        assert s3.store.put_file(key, data, {UPLOAD_TOKEN: "v1"}, None).etag == first.etag
        with pytest.raises(Conflict):
            s3.store.put_file(key, data, {UPLOAD_TOKEN: "v2"}, None)
        with pytest.raises(Conflict):
            s3.store.put_file(key, data, {}, None)


def test_retry_with_another_part_size_still_finds_its_own_multipart_object(
    bucket: Bucket, files: Any
) -> None:
    """Uploaded in 5 MiB parts, retried after a remount with 6 MiB parts: the object's ETag is
    that of 5 MiB parts, and the retry must still know it for its own (not a conflict copy)."""
    data = files(payload(12 * MiB, "reparted"))
    uploaded = s3_site(bucket).store.put_file("big", data, {}, None)
    options = S3Options(
        endpoint_url=bucket.endpoint, region=REGION, path_style=True, part_size=6 * MiB
    )
    retried = S3Store(bucket.name, PREFIX, options).put_file("big", data, {}, None)
    assert retried.etag == uploaded.etag and uploaded.etag.endswith('-3"')
    with pytest.raises(Conflict):
        S3Store(bucket.name, PREFIX, options).put_file(
            "big", files(payload(12 * MiB, "other")), {}, None
        )


def test_create_only_multipart_put_refuses_an_existing_key(s3: Site, files: Any) -> None:
    """The create-only condition also holds for a multipart upload, which is then aborted."""
    s3.store.put_file("k", files(b"small"), {}, None)
    with pytest.raises(Conflict):
        s3.store.put_file("k", files(payload(11 * MiB, "late")), {}, None)
    assert read_all(s3.store, s3.store.head("k")) == b"small"
    assert s3.open_uploads() == []


def test_if_match_put_replaces_only_that_version(site: Site, files: Any) -> None:
    """A wrong or missing version is a Conflict; the right one is replaced."""
    old = site.store.put_file("k", files(b"version one"), {}, None)
    with pytest.raises(Conflict):
        site.store.put_file("k", files(b"x"), {}, '"0123456789abcdef0123456789abcdef"')
    with pytest.raises(Conflict):
        site.store.put_file("absent/key", files(b"x"), {}, old.etag)
    new = site.store.put_file("k", files(b"version two, longer"), {}, old.etag)
    assert new.etag != old.etag and site.store.head("k").etag == new.etag
    assert read_all(site.store, new) == b"version two, longer"
    if site.root is not None:
        assert not (site.root / "absent").exists(), "a refused put left a directory behind"


def test_put_never_overwrites_another_writers_version(site: Site, files: Any) -> None:
    """The case the condition exists for: another site wrote a newer object meanwhile."""
    mine = site.store.put_file("shared.dcm", files(b"mine"), {}, None)
    site.rewrite("shared.dcm", b"theirs, newer")
    with pytest.raises(Conflict):
        site.store.put_file("shared.dcm", files(b"mine, edited"), {}, mine.etag)
    assert read_all(site.store, site.store.head("shared.dcm")) == b"theirs, newer"


def test_moto_ignores_if_match_on_multipart_complete(s3: Site, files: Any) -> None:
    """moto 5 enforces If-None-Match on CompleteMultipartUpload but not If-Match (AWS does).
    This records that gap: should moto start enforcing it, this test fails and the assertion
    becomes pytest.raises(Conflict), as for a single PUT."""
    s3.store.put_file("k", files(b"small"), {}, None)
    data = payload(11 * MiB, "unchecked")
    info = s3.store.put_file("k", files(data), {}, '"0123456789abcdef0123456789abcdef"')
    assert info.etag == multipart_etag(data, PART)


# -- copy ----------------------------------------------------------------------------------------


def test_copy_keeps_bytes_and_metadata(site: Site, files: Any) -> None:
    """Without metadata a copy keeps the source's (S3 metadata, local mode and mtime)."""
    data = payload(70_000, "copy")
    metadata = {"mode": "600", "mtime": "1600000000", "patient": "anon-3"}
    source = site.store.put_file("a/src", files(data), metadata, None)
    copied = site.store.copy("a/src", "b/dst", source.etag)
    assert (copied.key, copied.size) == ("b/dst", len(data))
    assert site.store.head("b/dst").etag == copied.etag
    assert_bytes(read_all(site.store, copied), data, "b/dst")
    if site.bucket is not None:
        assert site.user_metadata("b/dst") == metadata
    else:
        assert site.root is not None
        st = (site.root / "b" / "dst").stat()
        assert (st.st_mode & 0o777, st.st_mtime_ns) == (0o600, 1_600_000_000 * 10**9)


def test_copy_onto_itself_replaces_metadata(site: Site, files: Any) -> None:
    """How chmod and utime of an uploaded file reach the store: same bytes, new metadata."""
    data = b"pixel data"
    source = site.store.put_file("img", files(data), {"mode": "600", "old": "yes"}, None)
    changed = site.store.copy("img", "img", source.etag, {"mode": "644", "mtime": "1500000000"})
    assert site.store.head("img").etag == changed.etag
    assert read_all(site.store, changed) == data
    if site.bucket is not None:
        assert site.user_metadata("img") == {"mode": "644", "mtime": "1500000000"}
    else:
        assert site.root is not None
        st = (site.root / "img").stat()
        assert (st.st_mode & 0o777, st.st_mtime_ns) == (0o644, 1_500_000_000 * 10**9)


def test_copy_of_a_changed_source_is_stale(site: Site, files: Any) -> None:
    """A copy is of one version: once the source changed, StaleObject and no target."""
    old = site.store.put_file("src", files(b"old bytes"), {}, None)
    site.rewrite("src", b"new bytes, longer")
    with pytest.raises(StaleObject):
        site.store.copy("src", "dst", old.etag)
    with pytest.raises(NotFound):
        site.store.head("dst")


def test_copy_of_a_missing_source_is_not_found(site: Site) -> None:
    with pytest.raises(NotFound):
        site.store.copy("never/was", "dst", '"0123456789abcdef0123456789abcdef"')


def test_multipart_copy(s3: Site, files: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the CopyObject limit (5 GiB, lowered here) objects are copied part by part."""
    monkeypatch.setattr(s3_module, "COPY_LIMIT", 6 * MiB)
    monkeypatch.setattr(s3_module, "COPY_PART", PART)
    data = payload(12 * MiB, "copy parts")
    source = s3.store.put_file("huge", files(data), {"patient": "anon-9"}, None)
    copied = s3.store.copy("huge", "huge-copy", source.etag)
    assert copied.etag.endswith('-3"') and copied.size == len(data)
    assert s3.store.head("huge-copy").etag == copied.etag
    assert_bytes(read_all(s3.store, copied), data, "huge-copy")
    assert s3.user_metadata("huge-copy") == {"patient": "anon-9"}
    assert s3.open_uploads() == []


# -- delete --------------------------------------------------------------------------------------


def test_delete(site: Site, files: Any) -> None:
    """A deleted key is gone; deleting a missing one is not an error."""
    site.store.put_file("d/x", files(b"x"), {}, None)
    site.store.delete("d/x")
    with pytest.raises(NotFound):
        site.store.head("d/x")
    site.store.delete("d/x")
    site.store.delete("never/was")
    assert list(site.store.list()) == []


def test_list_after_a_key_skips_what_sorts_before_it(site: Site, files: Any) -> None:
    """``list(after)`` (StartAfter on S3, under the store's prefix) gives only the keys after
    ``after``: what a first listing that was interrupted asks for when it goes on."""
    names = ["a/1", "a/2", "b", "c/d/e", "é"]
    for name in names:
        site.store.put_file(name, files(name.encode()), {}, None)
    assert [info.key for info in site.store.list()] == names
    assert [info.key for info in site.store.list("a/2")] == ["b", "c/d/e", "é"]
    assert [info.key for info in site.store.list("a/")] == names
    assert [info.key for info in site.store.list("c/d/e")] == ["é"]
    assert list(site.store.list("é")) == []


def test_local_delete_prunes_empty_parents(local: Site, files: Any) -> None:
    """Directories a delete leaves empty go too, so no "dir/" marker appears; the root stays."""
    assert local.root is not None
    local.store.put_file("a/b/c/file", files(b"1"), {}, None)
    local.store.put_file("a/keep", files(b"2"), {}, None)
    local.store.delete("a/b/c/file")
    assert [info.key for info in local.store.list()] == ["a/keep"]
    assert not (local.root / "a" / "b").exists()
    local.store.delete("a/keep")
    assert list(local.store.list()) == [] and list(local.root.iterdir()) == []


def test_local_delete_of_a_marker_removes_its_empty_directory(local: Site) -> None:
    assert local.root is not None
    (local.root / "p" / "empty").mkdir(parents=True)
    assert [info.key for info in local.store.list()] == ["p/empty/"]
    local.store.delete("p/empty/")
    assert list(local.root.iterdir()) == []


# -- the local store stays inside its root -------------------------------------------------------


def test_local_put_refuses_a_path_through_a_symlink(
    local: Site, files: Any, tmp_path: Path
) -> None:
    """A symbolic link on the way, or at the name itself, is never followed out of the root."""
    assert local.root is not None
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"untouched")
    (local.root / "escape").symlink_to(outside)
    (local.root / "victim").symlink_to(outside / "victim")
    with pytest.raises(NotFound):
        local.store.put_file("escape/new", files(b"evil"), {}, None)
    with pytest.raises(Conflict):
        local.store.put_file("escape/victim", files(b"evil"), {}, '"0-0"')
    with pytest.raises(Conflict):
        local.store.put_file("victim", files(b"evil"), {}, None)
    st = (outside / "victim").stat()
    with pytest.raises(Conflict):
        local.store.put_file("victim", files(b"evil"), {}, f'"{st.st_mtime_ns:x}-{st.st_size:x}"')
    assert sorted(path.name for path in outside.iterdir()) == ["victim"]
    assert (outside / "victim").read_bytes() == b"untouched"
    assert (local.root / "victim").is_symlink()


def test_local_write_leaves_no_temporary_file(local: Site, files: Any) -> None:
    """Neither a put that succeeds nor one refused leaves its temporary file behind."""
    assert local.root is not None
    local.store.put_file("d/f", files(b"1"), {}, None)
    with pytest.raises(Conflict):
        local.store.put_file("d/f", files(b"2"), {}, None)
    assert [path.name for path in (local.root / "d").iterdir()] == ["f"]
    assert not list(local.root.rglob(f"*{TEMPORARY_SUFFIX}"))


# -- integrity checks ----------------------------------------------------------------------------


def test_etag_mismatch_is_unavailable(files: Any) -> None:
    """An MD5 ETag that differs from the bytes sent fails the upload; the whole-object MD5 some
    servers give multipart uploads is accepted; SSE-KMS and other ETags that are not an MD5 of
    the data are not compared."""
    data = b"sent" * 1000
    source = files(data)
    sent = f'"{hashlib.md5(data).hexdigest()}"'
    other = f'"{hashlib.md5(b"other").hexdigest()}"'
    multipart = '"0123456789abcdef0123456789abcdef-2"'

    def check(reply: dict[str, str], expected: str) -> None:
        s3_module._check_etag("k", reply, expected, source, 2500)

    check({"ETag": sent}, sent)
    with pytest.raises(Unavailable, match="damaged"):
        check({"ETag": other}, sent)
    check({"ETag": sent}, multipart)  # a server that answers the MD5 of the whole
    with pytest.raises(Unavailable, match="damaged"):
        check({"ETag": other}, multipart)
    check({"ETag": other, "ServerSideEncryption": "aws:kms"}, sent)
    check({"ETag": '"not-an-md5"'}, sent)


def test_part_size_grows_past_ten_thousand_parts() -> None:
    """A file above 10,000 parts of part_size gets larger parts instead of failing."""
    assert s3_module._part_size(100 * MiB, 16 * MiB) == 16 * MiB
    huge = 10_000 * 16 * MiB + 1
    grown = s3_module._part_size(huge, 16 * MiB)
    assert grown > 16 * MiB and -(-huge // grown) <= 10_000


def test_part_size_below_the_s3_minimum_is_refused() -> None:
    with pytest.raises(ConfigError, match="part size"):
        S3Store("bucket", "", S3Options(part_size=1 * MiB))


# -- encryption in the cloud -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["AES256", "aws:kms"])
def test_every_written_object_asks_for_server_side_encryption(
    bucket: Bucket, files: Any, mode: str
) -> None:
    """With ``sse`` set, single PUTs, multipart uploads and copies all ask for it, and the
    server reports each object encrypted that way; the bytes read back unchanged."""
    key_id = "arn:aws:kms:us-east-1:123456789012:key/cloudfs-test" if mode == "aws:kms" else None
    options = S3Options(
        endpoint_url=bucket.endpoint,
        region=REGION,
        path_style=True,
        part_size=PART,
        sse=mode,
        sse_kms_key_id=key_id,
    )
    site = Site(S3Store(bucket.name, PREFIX, options), bucket=bucket)
    small, large = payload(300 * KiB, "sse-small"), payload(12 * MiB + 5, "sse-large")
    infos = [
        site.store.put_file("enc/small.dcm", files(small), {}, None),
        site.store.put_file("enc/large.bin", files(large), {}, None),
    ]
    infos.append(site.store.copy("enc/small.dcm", "enc/moved.dcm", infos[0].etag))
    for info, data in zip(infos, (small, large, small), strict=True):
        head = site.raw_client().head_object(Bucket=bucket.name, Key=f"{PREFIX}/{info.key}")
        assert head.get("ServerSideEncryption") == mode, (info.key, head)
        if key_id is not None:
            assert key_id in head.get("SSEKMSKeyId", ""), head
        assert_bytes(read_all(site.store, info), data, info.key)


def test_encryption_options_are_checked(bucket: Bucket) -> None:
    with pytest.raises(ConfigError, match="must be one of"):
        S3Store(bucket.name, PREFIX, S3Options(endpoint_url=bucket.endpoint, sse="rot13"))
    with pytest.raises(ConfigError, match="needs server-side encryption aws:kms"):
        S3Store(
            bucket.name,
            PREFIX,
            S3Options(endpoint_url=bucket.endpoint, sse="AES256", sse_kms_key_id="k"),
        )


# -- the standard AWS configuration ----------------------------------------------------------------


def test_standard_aws_environment_chooses_region_profile_and_endpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AWS_REGION (which botocore alone ignores), AWS_PROFILE and AWS_ENDPOINT_URL are honoured
    as the AWS CLI honours them; an explicit option wins over the environment."""
    config = tmp_path / "config"
    config.write_text("[profile archive]\nregion = ap-south-1\n")
    for name in ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    client = S3Store("bucket", "", S3Options()).client
    assert client.meta.region_name == "eu-west-3"
    assert client.meta.endpoint_url == "http://127.0.0.1:9"
    assert S3Store("bucket", "", S3Options(region="us-west-2")).client.meta.region_name == (
        "us-west-2"
    )
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.setenv("AWS_PROFILE", "archive")
    assert S3Store("bucket", "", S3Options()).client.meta.region_name == "ap-south-1"


# -- conditional delete --------------------------------------------------------------------------


def test_delete_keeps_a_version_another_writer_wrote(site: Site, files: Any) -> None:
    """A delete of the version this host knew is refused once another writer replaced it: the
    newer object stays.  The version the store holds now deletes; a missing key is no error."""
    old = site.store.put_file("d/report.pdf", files(b"this host's version"), {}, None)
    site.rewrite("d/report.pdf", b"another site's version")
    with pytest.raises(Conflict):
        site.store.delete("d/report.pdf", old.etag)
    current = site.store.head("d/report.pdf")
    assert read_all(site.store, current) == b"another site's version"
    site.store.delete("d/report.pdf", current.etag)
    with pytest.raises(NotFound):
        site.store.head("d/report.pdf")
    site.store.delete("d/report.pdf", current.etag)


def test_conditional_delete_is_checked_by_the_server_too(
    s3: Site, files: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer lands between the HEAD and the DELETE: If-Match on the DeleteObject
    (which moto enforces, as AWS does) keeps the newer object."""
    old = s3.store.put_file("k", files(b"old"), {}, None)
    real_head = s3.store.head

    def head_then_rewrite(key: str) -> ObjectInfo:
        info = real_head(key)
        s3.rewrite(key, b"newer, written between the two requests")
        return info

    monkeypatch.setattr(s3.store, "head", head_then_rewrite)
    with pytest.raises(Conflict):
        s3.store.delete("k", old.etag)
    monkeypatch.undo()
    assert read_all(s3.store, s3.store.head("k")) == b"newer, written between the two requests"


def test_conditional_delete_of_a_key_removed_meanwhile_succeeds(
    s3: Site, files: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another client deletes the key between the HEAD and the DELETE: the key is gone, which
    is what the delete was for (S3 answers If-Match on a missing key with NoSuchKey)."""
    old = s3.store.put_file("k", files(b"old"), {}, None)
    real_head = s3.store.head

    def head_then_delete(key: str) -> ObjectInfo:
        info = real_head(key)
        s3.raw_client().delete_object(Bucket=s3.bucket_name, Key=f"{PREFIX}/{key}")
        return info

    monkeypatch.setattr(s3.store, "head", head_then_delete)
    s3.store.delete("k", old.etag)
    assert s3.bucket is not None and s3.bucket.listed_keys() == []


def test_conditional_delete_on_a_server_that_ignores_if_match(s3: Site, files: Any) -> None:
    """An endpoint that ignores If-Match on a delete (the header is dropped before it is sent
    here) still never loses another writer's object: the HEAD before the delete sees it."""
    old = s3.store.put_file("k", files(b"old"), {}, None)
    s3.rewrite("k", b"another site's version")
    sent: list[dict[str, Any]] = []

    def drop_condition(params: dict[str, Any], **_: Any) -> None:
        params.pop("IfMatch", None)
        sent.append(dict(params))

    assert isinstance(s3.store, S3Store)
    s3.store.client.meta.events.register("before-parameter-build.s3.DeleteObject", drop_condition)
    with pytest.raises(Conflict):
        s3.store.delete("k", old.etag)
    assert sent == []  # refused before any DeleteObject
    assert read_all(s3.store, s3.store.head("k")) == b"another site's version"
    s3.store.delete("k", s3.store.head("k").etag)
    assert len(sent) == 1 and "IfMatch" not in sent[0]
    assert s3.bucket is not None and s3.bucket.listed_keys() == []
