"""The staging area's bytes, sealed and plain: the same answers, no plaintext on disk when
sealed, and an altered chunk is an error, never returned bytes."""

from __future__ import annotations

import dataclasses
import os
import random
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner
from helpers_unit import ino_of, make_rig, run_fs, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudfs.catalog import ROOT
from cloudfs.cli import main
from cloudfs.config import WriteOptions
from cloudfs.crypto import KEY_ENVIRONMENT
from cloudfs.errors import ConfigError
from cloudfs.fs import ArchiveFS
from cloudfs.staging import CHUNK, HEADER, MAGIC, STRIDE, StagingArea, Tampered, payload_size
from cloudfs.store import FileSource
from cloudfs.store.local import LocalStore

KEY = bytes(range(32))
LIMIT = 1 << 40


def area(directory: Path, key: bytes | None = KEY) -> StagingArea:
    return StagingArea(directory, LIMIT, key)


def staged(staging: StagingArea, data: bytes) -> tuple[str, int]:
    name, fd = staging.take()
    staging.write(fd, data, 0)
    return name, fd


def flip(path: Path, position: int) -> None:
    with open(path, "r+b") as file:
        file.seek(position)
        byte = file.read(1)
        file.seek(position)
        file.write(bytes([byte[0] ^ 0x04]))


# -- sealed and plain agree ---------------------------------------------------------------------

_SPAN = 4 * CHUNK + 123
"""Offsets reach a few chunks in, so writes, reads and truncates cross chunk boundaries."""

operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("write"),
            st.integers(0, _SPAN),
            st.integers(0, 2 * CHUNK + 7),
            st.integers(0, 255),
        ),
        st.tuples(st.just("truncate"), st.integers(0, _SPAN)),
        st.tuples(st.just("read"), st.integers(0, _SPAN), st.integers(0, 3 * CHUNK)),
        st.tuples(st.just("copy")),
    ),
    max_size=25,
)


@settings(max_examples=120, deadline=None)
@given(steps=operations)
def test_sealed_and_plain_staging_give_the_same_bytes(steps: list[tuple[object, ...]]) -> None:
    """Writes at any offset (past the end too), truncates down and up, reads across chunks and
    copies: a sealed file answers what a plain file and a bytearray answer."""
    with tempfile.TemporaryDirectory() as scratch:
        plain, sealed = area(Path(scratch) / "plain", None), area(Path(scratch) / "sealed")
        files = {"plain": (plain, *plain.take()), "sealed": (sealed, *sealed.take())}
        model = bytearray()
        for step in steps:
            if step[0] == "write":
                _, offset, length, seed = step
                assert isinstance(offset, int) and isinstance(length, int)
                data = random.Random(seed).randbytes(length)
                if offset > len(model) and length:
                    model.extend(bytes(offset - len(model)))
                model[offset : offset + length] = data
                for staging, _, fd in files.values():
                    assert staging.write(fd, data, offset) == length
            elif step[0] == "truncate":
                size = step[1]
                assert isinstance(size, int)
                model = model[:size] + bytearray(max(0, size - len(model)))
                for staging, _, fd in files.values():
                    staging.truncate(fd, size)
            elif step[0] == "read":
                _, offset, length = step
                assert isinstance(offset, int) and isinstance(length, int)
                expected = bytes(model[offset : offset + length])
                for staging, _, fd in files.values():
                    assert staging.read(fd, length, offset) == expected
            else:
                for label, (staging, name, fd) in list(files.items()):
                    copied = staging.copy(fd, len(model))
                    os.close(fd)
                    staging.remove(name)
                    files[label] = (staging, *copied)
            for staging, _, fd in files.values():
                assert staging.size(fd) == len(model)
        for staging, name, fd in files.values():
            assert staging.read(fd, len(model) + 10, 0) == model
            with staging.source(name) as source:
                assert source.size == len(model)
                assert source.read(0, len(model)) == model
            os.close(fd)
        assert sealed.used == plain.used


def test_no_plaintext_in_a_sealed_staging_file(tmp_path: Path) -> None:
    """A marker written at aligned and unaligned offsets, rewritten in place, truncated and
    copied never appears in the sealed files; the same writes leave it in a plain file."""
    marker = b"PATIENT^SECRET^0042" * 4
    for key, should_appear in ((None, True), (KEY, False)):
        staging = area(tmp_path / f"area-{key is not None}", key)
        name, fd = staging.take()
        for offset in (0, CHUNK - 10, 3 * CHUNK + 5, 10 * CHUNK):
            staging.write(fd, marker * 50, offset)
        staging.write(fd, marker, CHUNK + 3)
        staging.truncate(fd, 5 * CHUNK + 1)
        copy, copy_fd = staging.copy(fd, 5 * CHUNK + 1)
        for path in (staging.path(name), staging.path(copy)):
            assert (marker in path.read_bytes()) is should_appear, path
        os.close(fd)
        os.close(copy_fd)


def test_sealed_layout_and_size(tmp_path: Path) -> None:
    """A header, then records of a chunk plus nonce and tag; the payload size follows from the
    file size, and a trailing record too short to hold any payload is damage."""
    staging = area(tmp_path)
    name, fd = staged(staging, os.urandom(2 * CHUNK + 100))
    raw = staging.path(name).read_bytes()
    assert raw.startswith(MAGIC)
    assert len(raw) == HEADER + 2 * STRIDE + 100 + (STRIDE - CHUNK)
    assert payload_size(len(raw)) == 2 * CHUNK + 100
    assert payload_size(HEADER) == 0
    for broken in (HEADER - 1, HEADER + STRIDE + 5, HEADER + STRIDE - CHUNK):
        with pytest.raises(Tampered):
            payload_size(broken)
    os.close(fd)


# -- tampering ----------------------------------------------------------------------------------


def test_a_flipped_bit_fails_reads_and_uploads_instead_of_returning_bytes(tmp_path: Path) -> None:
    """One flipped bit in the second chunk: reads that touch it raise, reads of other chunks do
    not, and an upload through the store fails without creating the object."""
    staging = area(tmp_path / "staging")
    data = os.urandom(3 * CHUNK)
    name, fd = staged(staging, data)
    flip(staging.path(name), HEADER + STRIDE + 1000)
    assert staging.read(fd, CHUNK, 0) == data[:CHUNK]
    assert staging.read(fd, 100, 2 * CHUNK) == data[2 * CHUNK : 2 * CHUNK + 100]
    with pytest.raises(Tampered):
        staging.read(fd, 3 * CHUNK, 0)
    with pytest.raises(Tampered):
        staging.write(fd, b"x", CHUNK + 5)  # re-sealing must not launder the damage
    with pytest.raises(Tampered), staging.source(name) as source:
        source.read(0, source.size)
    root = tmp_path / "store"
    root.mkdir()
    store = LocalStore(root)
    with pytest.raises(Tampered), staging.source(name) as source:
        store.put_file("up/loaded.dcm", source, {}, None)
    assert not list(root.rglob("*.dcm"))
    os.close(fd)


def test_reordered_cut_or_rekeyed_chunks_fail(tmp_path: Path) -> None:
    """Chunks swapped, a file cut inside a record, a salt changed, or another key: each read
    raises instead of answering."""
    data = os.urandom(2 * CHUNK)
    staging = area(tmp_path)
    swapped, fd = staged(staging, data)
    path = staging.path(swapped)
    raw = path.read_bytes()
    path.write_bytes(raw[:HEADER] + raw[HEADER + STRIDE :] + raw[HEADER : HEADER + STRIDE])
    with pytest.raises(Tampered):
        staging.read(fd, CHUNK, 0)
    os.close(fd)

    cut, fd = staged(staging, data)
    os.truncate(staging.path(cut), HEADER + STRIDE + 1000)
    with pytest.raises(Tampered):
        staging.read(fd, 10, CHUNK)
    os.close(fd)

    salted, fd = staged(staging, data)
    flip(staging.path(salted), len(MAGIC) + 3)
    with pytest.raises(Tampered):
        staging.read(fd, 10, 0)
    os.close(fd)

    name, fd = staged(staging, data)
    os.close(fd)
    other = area(tmp_path, os.urandom(32))
    fd = other.open(name)
    with pytest.raises(Tampered):
        other.read(fd, 10, 0)
    with pytest.raises(Tampered), other.source(name) as source:
        source.read(0, 10)
    os.close(fd)
    fd = staging.open(name)
    assert staging.read(fd, 2 * CHUNK, 0) == data  # the right key still reads it
    os.close(fd)


# -- concurrency and memory ---------------------------------------------------------------------


def test_concurrent_readers_never_see_a_half_sealed_chunk(tmp_path: Path) -> None:
    """Readers on their own descriptors (as an upload has) and on the writer's, while a
    writer rewrites chunks in part and truncates: no read fails authentication."""
    staging = area(tmp_path)
    name, fd = staged(staging, os.urandom(6 * CHUNK))
    stop = threading.Event()
    failures: list[BaseException] = []
    reads = [0]

    def reader(own: bool) -> None:
        descriptor = staging.open(name) if own else fd
        try:
            while not stop.is_set():
                offset = random.randrange(0, 6 * CHUNK)
                data = staging.read(descriptor, random.randrange(1, 2 * CHUNK), offset)
                assert len(data) <= 2 * CHUNK
                reads[0] += 1
        except BaseException as exc:
            failures.append(exc)
        finally:
            if own:
                os.close(descriptor)

    threads = [threading.Thread(target=reader, args=(own,)) for own in (True, True, False)]
    for thread in threads:
        thread.start()
    # At least 400 rewrites, and on until the readers have read enough beside them (a loaded
    # machine may leave them little time during the first 400).
    deadline = time.monotonic() + 30
    round_ = 0
    try:
        while round_ < 400 or (reads[0] <= 100 and time.monotonic() < deadline):
            staging.write(fd, os.urandom(random.randrange(1, 3000)), random.randrange(6 * CHUNK))
            if round_ % 50 == 49:
                staging.truncate(fd, random.randrange(4 * CHUNK, 6 * CHUNK))
                staging.truncate(fd, 6 * CHUNK)
            round_ += 1
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not failures, failures[0]
    assert reads[0] > 100
    os.close(fd)


def test_a_large_gap_is_filled_in_bounded_memory(tmp_path: Path) -> None:
    """ftruncate far past the end, then a write further still: the gap reads as zeros and
    sealing it never holds more than a few chunks in memory."""
    staging = area(tmp_path)
    name, fd = staged(staging, b"head")
    tracemalloc.start()
    try:
        staging.truncate(fd, 48 * CHUNK * 16)
        staging.write(fd, b"tail", 64 * CHUNK * 16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * CHUNK, peak
    assert staging.size(fd) == 64 * CHUNK * 16 + 4
    assert staging.read(fd, 10, 0) == b"head" + bytes(6)
    assert staging.read(fd, 8, 64 * CHUNK * 16 - 4) == bytes(4) + b"tail"
    assert staging.read(fd, CHUNK, 40 * CHUNK * 16) == bytes(CHUNK)
    os.close(fd)


# -- accounting and restarts --------------------------------------------------------------------


def test_accounting_is_in_payload_bytes(tmp_path: Path) -> None:
    """``used`` counts what was written, not the sealed file's size, through scan and remove."""
    staging = area(tmp_path)
    name, fd = staged(staging, os.urandom(CHUNK + 10))
    os.close(fd)
    again = area(tmp_path)
    again.scan({name}, set())
    assert again.used == CHUNK + 10
    again.remove(name)
    assert again.used == 0


def test_plain_files_are_sealed_at_start_and_sealed_files_need_the_key(tmp_path: Path) -> None:
    """A file staged before the key was set is sealed in place (same name, same bytes); a sealed
    file found by a mount without the key stops the mount rather than going up as ciphertext."""
    plain = area(tmp_path, None)
    data = os.urandom(CHUNK + 77)
    name, fd = staged(plain, data)
    os.close(fd)
    sealed = area(tmp_path)
    sealed.scan({name}, set())
    assert sealed.used == len(data)
    assert sealed.path(name).read_bytes().startswith(MAGIC)
    assert data[:64] not in sealed.path(name).read_bytes()
    with sealed.source(name) as source:
        assert source.read(0, source.size) == data
    with pytest.raises(ConfigError, match="cache key"):
        area(tmp_path, None).scan({name}, set())


def test_file_source_reads_a_plain_file(tmp_path: Path) -> None:
    path = tmp_path / "plain"
    path.write_bytes(b"0123456789")
    fd = os.open(path, os.O_RDONLY)
    try:
        source = FileSource.of(fd)
        assert (source.size, source.read(3, 4)) == (10, b"3456")
    finally:
        os.close(fd)


# -- through the filesystem core ----------------------------------------------------------------


def test_the_filesystem_seals_what_it_stages_and_uploads_the_plaintext(tmp_path: Path) -> None:
    """With a key, a new file written with a gap and truncated, and a cloud file edited in
    place, read back right through the core, leave no plaintext in the staging directory, and
    reach the store as exactly the bytes written."""
    old = os.urandom(3 * CHUNK + 11)
    rig = make_rig(tmp_path, {"old.dcm": old})
    rig.key = KEY
    rig.config = dataclasses.replace(rig.config, write=WriteOptions(upload_delay=3600))
    new = os.urandom(2 * CHUNK)
    expected_new = bytes(5000) + new[: CHUNK + 3]
    expected_old = old[:100] + b"edited" + old[106:]

    async def body(fs: ArchiveFS) -> None:
        handle, _ = await fs.create(ROOT, "new.dcm", 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
        assert await fs.write(handle, 5000, new) == len(new)
        await fs.setattr((await ino_of(fs, "new.dcm")), handle, size=5000 + CHUNK + 3)
        assert bytes(await fs.read(handle, 0, len(expected_new) + 9)) == expected_new
        edit, _ = await fs.open(await ino_of(fs, "old.dcm"), os.O_RDWR)
        await fs.write(edit, 100, b"edited")
        assert bytes(await fs.read(edit, 0, len(old))) == expected_old
        staged = [path.read_bytes() for path in fs.staging.directory.iterdir()]
        for sample in (new[:64], new[CHUNK : CHUNK + 64], old[:64], old[-64:]):
            assert not any(sample in content for content in staged)
        for opened in (handle, edit):
            await fs.fsync(opened)
            await fs.release(opened)
        await fs.drain()
        assert fs.staging.used == 0

    run_fs(rig, body)
    assert (rig.source / "new.dcm").read_bytes() == expected_new
    assert (rig.source / "old.dcm").read_bytes() == expected_old


def test_an_operator_exports_a_staged_file_with_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cloudfs export-staged`` writes a sealed file's plaintext with the right key, refuses
    without one, and stops at a damaged chunk; a plain file comes out as it is."""
    data = os.urandom(CHUNK + 500)
    name, fd = staged(area(tmp_path), data)
    os.close(fd)
    path = str(area(tmp_path).path(name))
    runner = CliRunner()
    monkeypatch.delenv(KEY_ENVIRONMENT, raising=False)
    refused = runner.invoke(main, ["export-staged", path])
    assert refused.exit_code != 0 and "cache key" in refused.output
    monkeypatch.setenv(KEY_ENVIRONMENT, KEY.hex())
    exported = runner.invoke(main, ["export-staged", path])
    assert exported.exit_code == 0 and exported.stdout_bytes == data
    flip(Path(path), HEADER + STRIDE + 7)
    damaged = runner.invoke(main, ["export-staged", path])
    assert damaged.exit_code != 0 and "authentication" in damaged.output
    plain, fd = staged(area(tmp_path, None), data)
    os.close(fd)
    as_is = runner.invoke(main, ["export-staged", str(tmp_path / plain)])
    assert as_is.exit_code == 0 and as_is.stdout_bytes == data


def test_a_damaged_staged_file_is_not_retried_until_written_again(tmp_path: Path) -> None:
    """A sealed staged file whose chunk fails authentication (torn by a crash, or altered) is
    neither uploaded nor retried every minute for ever: one error, shown in status, and the
    upload goes ahead once the file is written anew."""
    rig = make_rig(tmp_path, {})
    rig.key = KEY
    rig.config = dataclasses.replace(rig.config, write=WriteOptions(upload_delay=0))
    data = os.urandom(2 * CHUNK)

    async def body(fs: ArchiveFS) -> None:
        handle, _ = await fs.create(ROOT, "x.dcm", 0o644, os.O_RDWR | os.O_CREAT, 0, 0)
        await fs.write(handle, 0, data)
        ino = await ino_of(fs, "x.dcm")
        name = fs._staged[ino].name
        await fs.fsync(handle)
        flip(fs.staging.path(name), HEADER + STRIDE + 7)
        await fs.release(handle)
        assert await wait_until(lambda: fs.uploader.stats.damaged == {name}, 10)
        await trio.sleep(1.5)  # a retry, if any, would come after 1 s
        assert fs.uploader.stats.errors == 1
        assert (await fs.status())["uploads"]["damaged_files"] == 1
        assert not (rig.source / "x.dcm").exists()
        handle, _ = await fs.open(ino, os.O_RDWR)
        await fs.write(handle, CHUNK, data[CHUNK:])  # the damaged chunk, written again
        await fs.fsync(handle)
        await fs.release(handle)
        assert await wait_until(lambda: (rig.source / "x.dcm").exists(), 10)
        assert fs.uploader.stats.damaged == set()

    run_fs(rig, body)
    assert (rig.source / "x.dcm").read_bytes() == data
