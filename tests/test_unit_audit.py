"""The audit trail on real files: record contents, levels, read aggregation, the hash chain and
what ``verify`` catches, rotation, reopening, file modes and the RFC 5424 syslog copy."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import re
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import fill
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudfs import audit
from cloudfs.audit import (
    DICOM_EVENTS,
    DICOM_MAPPING,
    GENESIS,
    LEVEL_OPERATIONS,
    LEVELS,
    OPERATIONS,
    AuditLog,
    AuditOptions,
    outcome_for,
    outcome_indicator,
    rotated_files,
    verify,
)

UID, GID = 1000, 100
PID = os.getpid()
GONE_PID = 2**22 + 12345  # above the kernel's pid_max: never a live process
STUDY = "1.2.840.113619.2.55.3.604688119.868.1249391193.494"
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def who(pid: int = PID) -> dict[str, Any]:
    return {"uid": UID, "gid": GID, "pid": pid}


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def write_log(path: Path, count: int, **options: Any) -> None:
    """A log of ``count`` open records, one path each."""
    with AuditLog(AuditOptions(path, **options), host="pacs1") as log:
        for number in range(count):
            log.event("open", **who(), path=f"CT/{STUDY}/IM{number:05d}.dcm", study_uid=STUDY)


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "cloudfs-audit.log"


@pytest.fixture
def full_log(log_path: Path) -> Iterator[AuditLog]:
    log = AuditLog(AuditOptions(log_path, level="all"), host="pacs1")
    yield log
    log.close()


# -- records ------------------------------------------------------------------------------------


def test_record_has_every_field_with_its_type(log_path: Path, full_log: AuditLog) -> None:
    """An event becomes one line with the documented fields; the DICOM identifiers appear only
    when known, and a process that is gone has an empty executable."""
    full_log.event("open", **who(), path="CT/a.dcm", patient_id="P123", study_uid=STUDY)
    full_log.event("unlink", **who(GONE_PID), path="CT/b.dcm", outcome="EACCES")
    full_log.close()
    first, second = records(log_path)
    assert set(first) == {
        "time",
        "host",
        "uid",
        "gid",
        "pid",
        "executable",
        "operation",
        "path",
        "patient_id",
        "study_uid",
        "bytes",
        "outcome",
        "seq",
        "prev",
        "hash",
    }
    assert ISO_UTC.fullmatch(first["time"])
    assert (first["host"], first["uid"], first["gid"], first["pid"]) == ("pacs1", UID, GID, PID)
    assert first["executable"] == os.readlink(f"/proc/{PID}/exe")
    assert (first["operation"], first["path"], first["bytes"]) == ("open", "CT/a.dcm", 0)
    assert (first["patient_id"], first["study_uid"], first["outcome"]) == ("P123", STUDY, "success")
    assert (first["seq"], first["prev"]) == (1, GENESIS)
    assert re.fullmatch(r"[0-9a-f]{64}", first["hash"])
    assert "patient_id" not in second and "study_uid" not in second
    assert (second["executable"], second["outcome"], second["seq"]) == ("", "EACCES", 2)
    assert second["prev"] == first["hash"]


def test_hash_is_sha256_of_prev_and_canonical_record(log_path: Path) -> None:
    """The documented formula, recomputed independently: anyone can check the chain without
    cloudfs."""
    write_log(log_path, 3)
    prev = "0" * 64
    for raw in log_path.read_text().splitlines():
        record = json.loads(raw)
        digest = record.pop("hash")
        canonical = json.dumps(record, sort_keys=True, separators=(",", ":"))
        assert hashlib.sha256((prev + canonical).encode()).hexdigest() == digest
        assert raw == canonical[:-1] + f',"hash":"{digest}"}}'
        prev = digest


@pytest.mark.parametrize("level", LEVELS)
def test_levels_choose_the_operations_written(tmp_path: Path, level: str) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(AuditOptions(path, level=level)) as log:
        for operation in OPERATIONS:
            if operation not in ("read", "write"):
                log.event(operation, **who(), path="f")
        log.read(1, **who(), path="f", size=10)
        log.write(2, **who(), path="g", size=20)
        log.released(1)
        log.released(2)
    if level == "off":
        assert not path.exists()
        return
    written = [record["operation"] for record in records(path)]
    assert set(written) == LEVEL_OPERATIONS[level]
    assert ("read" in written) == (level == "all")
    assert written.count("write") == 1  # the summary of handle 2


def test_unknown_operation_is_a_programming_error(full_log: AuditLog) -> None:
    with pytest.raises(ValueError, match="chmod"):
        full_log.event("chmod", **who(), path="f")


# -- aggregation --------------------------------------------------------------------------------


def test_reads_fold_into_one_record_at_release(log_path: Path, full_log: AuditLog) -> None:
    for _ in range(1000):
        full_log.read(7, **who(), path="CT/a.dcm", size=4096, study_uid=STUDY)
    full_log.flush()
    assert log_path.read_bytes() == b""  # nothing until the handle is released
    full_log.released(7)
    full_log.close()
    [record] = records(log_path)
    assert (record["operation"], record["bytes"], record["path"]) == ("read", 4096000, "CT/a.dcm")
    assert record["study_uid"] == STUDY
    assert ISO_UTC.fullmatch(record["since"]) and record["since"] <= record["time"]


def test_two_processes_reading_one_file_get_a_record_each(
    log_path: Path, full_log: AuditLog
) -> None:
    """Per process, even through one shared handle: each reader is accounted for separately."""
    for _ in range(10):
        full_log.read(3, **who(PID), path="CT/a.dcm", size=100)
        full_log.read(3, **who(GONE_PID), path="CT/a.dcm", size=1)
        full_log.read(4, **who(GONE_PID), path="CT/a.dcm", size=1000)
    full_log.released(3)
    full_log.released(4)
    full_log.close()
    reads = {(r["pid"], r["bytes"]) for r in records(log_path)}
    assert reads == {(PID, 1000), (GONE_PID, 10), (GONE_PID, 10000)}


def test_long_lived_handle_is_summarised_after_the_bound(
    log_path: Path, full_log: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit, "AGGREGATE_SECONDS", 0.0)
    full_log.read(9, **who(), path="CT/a.dcm", size=512)
    deadline = time.monotonic() + 5
    while not log_path.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.05)
    [record] = records(log_path)
    assert (record["operation"], record["bytes"]) == ("read", 512)


def test_close_writes_summaries_of_handles_still_open(log_path: Path) -> None:
    with AuditLog(AuditOptions(log_path)) as log:
        log.write(1, **who(), path="new.dcm", size=100)
        log.write(1, **who(), path="new.dcm", size=50)
    [record] = records(log_path)
    assert (record["operation"], record["bytes"]) == ("write", 150)


# -- verify -------------------------------------------------------------------------------------


@pytest.fixture
def five(log_path: Path) -> list[bytes]:
    """A five-record log; returns its lines."""
    write_log(log_path, 5)
    return lines_of(log_path)


def rewrite(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def test_intact_log_verifies(log_path: Path, five: list[bytes]) -> None:
    result = verify([log_path])
    assert result.ok and result.records == 5 and result.first_seq == 1
    assert result.line is None and result.notes == []


def test_edited_field_fails_at_its_line(log_path: Path, five: list[bytes]) -> None:
    five[2] = five[2].replace(b'"bytes":0', b'"bytes":1')
    rewrite(log_path, five)
    result = verify([log_path])
    assert not result.ok and (result.file, result.line) == (log_path, 3)
    assert "hash does not match" in result.reason
    assert result.records == 2


def test_removed_line_fails_where_it_was(log_path: Path, five: list[bytes]) -> None:
    del five[2]
    rewrite(log_path, five)
    result = verify([log_path])
    assert not result.ok and result.line == 3
    assert "seq 4 where 3 was expected" in result.reason and "prev" in result.reason


def test_swapped_lines_fail(log_path: Path, five: list[bytes]) -> None:
    five[1], five[2] = five[2], five[1]
    rewrite(log_path, five)
    result = verify([log_path])
    assert not result.ok and result.line == 2
    assert "seq 3 where 2 was expected" in result.reason


def test_forged_line_with_its_own_valid_hash_fails_at_the_next(
    log_path: Path, five: list[bytes]
) -> None:
    """A forger who recomputes the inserted record's hash still breaks the link to the genuine
    record after it."""
    before = json.loads(five[1])
    forged = {key: value for key, value in before.items() if key != "hash"}
    forged.update(seq=before["seq"] + 1, prev=before["hash"], path="CT/forged.dcm")
    canonical = json.dumps(forged, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256((before["hash"] + canonical).encode()).hexdigest()
    five.insert(2, (canonical[:-1] + f',"hash":"{digest}"}}\n').encode())
    rewrite(log_path, five)
    result = verify([log_path])
    assert not result.ok and result.line == 4
    assert "prev does not match the hash of the record before" in result.reason


def test_truncated_last_line_is_reported_as_torn(log_path: Path, five: list[bytes]) -> None:
    five[-1] = five[-1][:40]
    rewrite(log_path, five)
    result = verify([log_path])
    assert not result.ok and result.line == 5 and "torn last line" in result.reason
    assert result.records == 4


def test_deleted_first_record_of_a_fresh_log_is_caught_only_by_first_seq(
    log_path: Path, five: list[bytes]
) -> None:
    """Without the older files nothing can show what preceded the first record: verify accepts
    the set but says where the chain starts."""
    rewrite(log_path, five[1:])
    result = verify([log_path])
    assert result.ok and result.first_seq == 2
    assert "starts at seq 2" in result.notes[0]


def test_verify_of_nothing_fails(log_path: Path) -> None:
    assert not verify([]).ok
    result = verify([log_path])
    assert not result.ok and "cannot read" in result.reason


# -- crashes and reopening ----------------------------------------------------------------------


def test_reopening_continues_the_chain(log_path: Path) -> None:
    write_log(log_path, 3)
    write_log(log_path, 2)
    assert [r["seq"] for r in records(log_path)] == [1, 2, 3, 4, 5]
    assert verify([log_path]).ok


def test_writer_recovers_from_a_torn_last_line(
    log_path: Path, five: list[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    """After a crash mid-write the next writer warns, starts a new line and chains from the
    last complete record; verify accepts the bridged remnant and notes it."""
    five[-1] = five[-1][:40]
    rewrite(log_path, five)
    with caplog.at_level(logging.WARNING, logger="cloudfs.audit"):
        write_log(log_path, 2)
    assert "unfinished line" in caplog.text
    lines = lines_of(log_path)
    assert lines[4] == five[-1] + b"\n"
    after = [json.loads(line) for line in lines[5:]]
    assert [r["seq"] for r in after] == [5, 6]
    assert after[0]["prev"] == json.loads(five[3])["hash"]
    result = verify([log_path])
    assert result.ok and result.records == 6
    assert result.notes and ":5: unfinished line" in result.notes[0]


def test_a_full_disk_holds_records_until_space_is_freed(small_disk: Path) -> None:
    """The disk under the audit log fills up: the records that arrive meanwhile wait in memory,
    their state says so (how many, since when, why), and once space is freed they reach the
    file in their order, none lost and the chain unbroken."""
    path = small_disk / "audit" / "audit.log"
    paths = [f"CT/{STUDY}/IM{number:05d}-{'x' * 200}.dcm" for number in range(300)]
    with AuditLog(AuditOptions(path), host="pacs1") as log:
        log.event("open", **who(), path="CT/before.dcm")
        log.flush()
        filler = fill(small_disk, leave=0)
        for name in paths:
            log.event("open", **who(), path=name)
        deadline = time.monotonic() + 10
        while log.state()["held"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        state = log.state()
        assert state["held"] > 0 and state["held_since"] is not None
        assert "No space left" in state["last_error"]
        assert not state["refusing"] and not log.refuses("open")  # serving is the default
        filler.unlink()
        log.flush()
        state = log.state()
        assert (state["held"], state["held_since"], state["dropped"]) == (0, None, 0)
        assert state["written"] == 301
    result = verify([path])
    assert result.ok and result.records == 301
    written = []
    for line in path.read_bytes().splitlines():
        with contextlib.suppress(ValueError):  # a line cut short by the full disk
            written.append(json.loads(line))
    assert [record["seq"] for record in written] == list(range(1, 302))
    assert [record["path"] for record in written] == ["CT/before.dcm", *paths]


def test_records_past_the_held_bound_or_still_held_at_close_are_counted_as_dropped(
    small_disk: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Holding is bounded: past ``HELD_RECORDS`` a record is dropped, and so is what is still
    held when the log closes on a disk that stayed full; every one is counted and logged."""
    monkeypatch.setattr(audit, "HELD_RECORDS", 5)
    path = small_disk / "audit" / "audit.log"
    log = AuditLog(AuditOptions(path), host="pacs1")
    log.event("open", **who(), path="CT/before.dcm")
    log.flush()
    fill(small_disk, leave=0)
    for number in range(50):
        log.event("open", **who(), path=f"CT/IM{number:05d}-{'x' * 400}.dcm")

    def accounted() -> int:
        state = log.state()
        return int(state["written"] + state["held"] + state["dropped"])

    deadline = time.monotonic() + 10
    while accounted() < 51 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert log.state()["held"] == 5
    with caplog.at_level(logging.ERROR, logger="cloudfs.audit"):
        log.close()
    state = log.state()
    assert state["held"] == 0 and state["written"] + state["dropped"] == 51
    assert state["dropped"] >= 5 and "audit records dropped" in caplog.text
    assert verify([path]).records == state["written"]


def test_failing_closed_refuses_the_audited_operations_while_records_are_held(
    small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With ``when_unwritable="refuse"``, from the moment the log refuses a record until the
    held records are in it, the operations the level records are to be refused (reads are not
    recorded at ``changes``, so they are not); the log says when refusing starts and ends."""
    path = small_disk / "audit" / "audit.log"
    with AuditLog(AuditOptions(path, when_unwritable="refuse"), host="pacs1") as log:
        log.event("open", **who(), path="CT/before.dcm")
        log.flush()
        assert not log.refuses("open") and not log.state()["refusing"]
        filler = fill(small_disk, leave=0)
        with caplog.at_level(logging.WARNING, logger="cloudfs.audit"):
            # the log file's last block may take a record or two more
            for number in range(20):
                log.event("open", **who(), path=f"CT/{number}-{'x' * 1000}.dcm")
            deadline = time.monotonic() + 10
            while not log.refuses("open") and time.monotonic() < deadline:
                time.sleep(0.01)
            assert log.refuses("open") and log.refuses("create") and log.refuses("write")
            assert not log.refuses("read")
            assert log.state()["refusing"]
            assert "accesses through the mount are REFUSED" in caplog.text
            assert "failures so far" not in caplog.text  # one line says it, not two
            filler.unlink()
            log.flush()
        assert not log.refuses("open") and not log.state()["refusing"]
        assert "accesses are served again" in caplog.text
    assert verify([path]).records == 21


def test_second_writer_on_one_log_is_refused(log_path: Path, full_log: AuditLog) -> None:
    with pytest.raises(OSError) as caught:
        AuditLog(AuditOptions(log_path))
    assert caught.value.errno == errno.EBUSY


# -- rotation -----------------------------------------------------------------------------------


def test_rotation_keeps_one_chain_across_files(log_path: Path) -> None:
    write_log(log_path, 40, max_bytes=2000, backups=20)
    files = rotated_files(log_path)
    assert len(files) >= 5
    assert files[-1] == log_path and files[-2].name == log_path.name + ".1"
    assert all(path.stat().st_size <= 2000 for path in files)
    chained = [record for path in files for record in records(path)]
    assert [r["seq"] for r in chained] == list(range(1, 41))
    assert all(r["prev"] == before["hash"] for before, r in zip(chained, chained[1:], strict=False))
    result = verify(files)
    assert result.ok and result.records == 40


def test_missing_middle_file_breaks_the_chain(log_path: Path) -> None:
    write_log(log_path, 40, max_bytes=2000, backups=20)
    files = rotated_files(log_path)
    files[2].unlink()
    assert rotated_files(log_path) == files[:2] + files[3:]
    result = verify(rotated_files(log_path))
    assert not result.ok and (result.file, result.line) == (files[3], 1)
    assert "prev does not match" in result.reason


def test_backups_bound_the_files_and_older_records_go(log_path: Path) -> None:
    write_log(log_path, 40, max_bytes=2000, backups=2)
    files = rotated_files(log_path)
    assert [path.name for path in files] == [
        f"{log_path.name}.2",
        f"{log_path.name}.1",
        log_path.name,
    ]
    result = verify(files)
    assert result.ok and result.first_seq is not None and result.first_seq > 1
    assert result.records == 41 - result.first_seq


def test_fewer_backups_later_removes_the_surplus(log_path: Path) -> None:
    """Files numbered above a lowered ``backups`` would sit before a gap; rotation removes them."""
    write_log(log_path, 40, max_bytes=2000, backups=5)
    write_log(log_path, 10, max_bytes=2000, backups=2)
    assert len(rotated_files(log_path)) == 3
    assert verify(rotated_files(log_path)).ok


def test_rotated_files_lists_oldest_first(tmp_path: Path) -> None:
    live = tmp_path / "a.log"
    for name in ("a.log", "a.log.1", "a.log.10", "a.log.2", "a.log.x", "a.log.0", "b.log.1"):
        (tmp_path / name).touch()
    assert [p.name for p in rotated_files(live)] == ["a.log.10", "a.log.2", "a.log.1", "a.log"]
    assert rotated_files(tmp_path / "missing" / "a.log") == []


# -- files and syslog ---------------------------------------------------------------------------


def test_file_mode_0600_in_a_directory_made_0700(log_path: Path) -> None:
    write_log(log_path, 1)
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(log_path.parent.stat().st_mode) == 0o700


def test_existing_file_is_tightened_to_0600(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    path.touch()
    path.chmod(0o644)
    write_log(path, 1)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


RFC5424 = re.compile(r"<(\d+)>1 (\S+) (\S+) cloudfs (\d+) audit - (\{.*\})")


def test_syslog_receives_rfc5424_messages(log_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.settimeout(5)
        port = server.getsockname()[1]
        options = AuditOptions(log_path, syslog=f"127.0.0.1:{port}")
        with AuditLog(options, host="pacs1") as log:
            log.event("open", **who(), path="CT/a.dcm")
            log.event("open", **who(), path="CT/b.dcm", outcome="EACCES")
            messages = [server.recv(65536).decode() for _ in range(2)]
    for message, line in zip(messages, log_path.read_text().splitlines(), strict=True):
        match = RFC5424.fullmatch(message)
        assert match, message
        priority, when, host, pid, body = match.groups()
        assert (host, int(pid), body) == ("pacs1", os.getpid(), line)
        assert when == json.loads(line)["time"]
    # facility authpriv (10); severity info (6) for a success, warning (4) for a refusal
    assert [RFC5424.fullmatch(m)[1] for m in messages] == ["86", "84"]  # type: ignore[index]


def test_unreachable_syslog_never_stops_the_file(
    log_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    options = AuditOptions(log_path, syslog=str(tmp_path / "no-such-socket"))
    with caplog.at_level(logging.WARNING, logger="cloudfs.audit"), AuditLog(options) as log:
        for number in range(3):
            log.event("open", **who(), path=f"f{number}")
    assert len(records(log_path)) == 3
    assert caplog.text.count("cannot send audit records to syslog") == 1


# -- options and tables -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"level": "some"},
        {"max_bytes": -1},
        {"syslog": "localhost"},
        {"syslog": "host:99999"},
        {"when_unwritable": "block"},
    ],
)
def test_bad_options_are_refused(tmp_path: Path, options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        AuditOptions(tmp_path / "audit.log", **options)


def test_dicom_tables_cover_every_operation_and_field() -> None:
    assert {row[0] for row in DICOM_EVENTS} >= set(OPERATIONS)
    assert all(
        code in ("110103", "110104") and action in "CRUD" for _, code, _, action in DICOM_EVENTS
    )
    mapped = {name.strip() for row in DICOM_MAPPING for name in row[0].split(",")}
    assert mapped >= {"time", "host", "uid", "gid", "pid", "executable", "operation", "path"}
    assert mapped >= {"patient_id", "study_uid", "bytes", "outcome", "seq", "prev", "hash"}


def test_outcomes_map_to_dicom_indicators() -> None:
    assert outcome_for(None) == "success" and outcome_for(errno.EACCES) == "EACCES"
    assert [outcome_indicator(o) for o in ("success", "EACCES", "EIO", "ENOTCONN")] == [0, 4, 8, 12]


# -- property: every byte counts ----------------------------------------------------------------


@functools.cache
def sample_log() -> bytes:
    """A small valid log with varied records, built once for all examples."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "audit.log"
        with AuditLog(AuditOptions(path, level="all"), host="pacs1") as log:
            log.event("open", **who(), path="CT/ä.dcm", patient_id="P1", study_uid=STUDY)
            log.read(1, **who(), path="CT/ä.dcm", size=4096)
            log.released(1)
            log.event("rename", **who(GONE_PID), path="MR/b", outcome="ENOENT")
        data = path.read_bytes()
        assert verify([path]).ok
    return data


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_single_byte_change_fails_verify(data: st.DataObject) -> None:
    original = sample_log()
    position = data.draw(st.integers(0, len(original) - 1), label="position")
    byte = data.draw(st.integers(0, 255).filter(lambda b: b != original[position]), label="byte")
    changed = original[:position] + bytes([byte]) + original[position + 1 :]
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "audit.log"
        path.write_bytes(changed)
        assert not verify([path]).ok
