"""The HIPAA audit trail: an append-only, hash-chained JSON-lines log of who touched which file.

The filesystem reports accesses here: ``event`` for operations, ``read`` and ``write`` for each
chunk of I/O on a handle (folded into one record per handle and process), ``released`` when a
handle closes.  Records go through a bounded queue to one writer thread, so the trio thread that
serves FUSE never waits for the disk.

Records
-------
One JSON object per line: ASCII, no whitespace, keys sorted, except ``hash``, which comes last.

==============  ======  ===========================================================================
field           type    meaning
==============  ======  ===========================================================================
time            str     UTC, ISO 8601 with microseconds and ``Z``; for an aggregate, its end
since           str     aggregates only (read, write): when the first folded access happened
host            str     the host serving the mount
uid, gid, pid   int     the requesting process, as FUSE reports it
executable      str     ``/proc/<pid>/exe``; ``''`` when unreadable (process gone, no permission)
operation       str     open, read, write, create, rename, unlink, mkdir, rmdir or setattr
path            str     relative to the mount root
patient_id      str     the DICOM PatientID, present only when known
study_uid       str     the DICOM StudyInstanceUID, present only when known
bytes           int     bytes read or written (the total, for an aggregate); 0 for other operations
outcome         str     ``success`` or the errno name of a refused or failed access (``EACCES``)
seq             int     1 for the first record of a log, then +1 for each record
prev            str     the ``hash`` of the record before; 64 zeros before the first record
hash            str     sha256 hex of ``prev`` followed by the canonical JSON of the record without
                        ``hash`` (exactly the bytes of the line before ``,"hash"``)
==============  ======  ===========================================================================

Reads are aggregated per handle and process: a viewer streaming a 500 MiB series makes one
``read`` record per file, not one per 128 KiB request.  The record is written when the handle is
released, or once its first folded read is ``AGGREGATE_SECONDS`` old, so a handle held open for
hours (or a crash) loses at most a minute of read records.  Writes are folded the same way into
one ``write`` summary.  A failed read or write is reported with ``event`` and stands alone.

Levels
------
======== ==========================================================================
level    operations written
======== ==========================================================================
off      none; no file is opened and no thread started
changes  open, create, write (summaries), rename, unlink, mkdir, rmdir, setattr
all      everything in ``changes`` and the aggregated read records
======== ==========================================================================

An open is an access in HIPAA's sense, so even ``changes`` shows who looked at which study; ``all``
adds how much of each file was read.  Failed and refused operations are written like successful
ones, with their errno name as the outcome.

The chain and what ``verify`` proves
------------------------------------
Each record's ``hash`` covers its fields and the hash of the record before, and ``seq`` counts up
by one, so editing, deleting, inserting or reordering any record breaks the chain at that point:
``verify`` names the file, the line and the reason.  Rotation continues the chain (the first
record of a new file chains to the last of the file before), so ``verify(rotated_files(path))``
checks the whole retained history, and a missing middle file is a break.

What a hash chain without a secret cannot prove: that nobody able to write the file rewrote its
*tail* (recomputing every hash after the change), nor that records were not cut from the head of
the oldest file given: rotation removes old files, so ``verify`` accepts a chain whose first line
is a record with ``seq`` above 1 and reports where it starts (``first_seq`` and a note).  Both
gaps are closed by sending every record to syslog, where another host keeps a copy of each
``hash``.

A crash can leave an unfinished last line.  ``verify`` reports it (``torn last line``).  The next
writer to open the log logs a warning, starts a new line and chains from the last complete record,
so the unfinished line ends up between two records that chain over it: ``verify`` then accepts it
and lists it in ``notes``, because nothing was lost that had ever been written in full.  A line that
is not JSON and is not bridged that way is a failure.

Rotation, durability
--------------------
The live file is ``path``; when a record would take it past ``max_bytes`` it becomes
``path.1``, ``path.1`` becomes ``path.2`` and so on up to ``path.<backups>`` (the names of
``logging.handlers.RotatingFileHandler``); the oldest is removed.  The file is opened with
O_APPEND and mode 0600 (its directory is created 0700), and each record is handed to the kernel by
its own ``write`` call at once, so a crash of the daemon loses nothing already recorded.  fsync is
batched: at most once per ``FSYNC_SECONDS`` while records arrive, within that time after the last
one, at rotation and on close; a power loss can lose at most that last second.

A record the file cannot take (a full disk, an I/O error) is not lost: the writer keeps it, and
every record after it, in memory (up to ``HELD_RECORDS``), logs the error once, and tries the
file again every ``HELD_RETRY_SECONDS``; once space is freed the held records go out in their
order, the chain unbroken.  ``AuditLog.state`` reports how many are held, since when and why
(``cloudfs status``, the metrics).  Beyond the bound, and for whatever is still held when the
mount stops, records are dropped: counted and logged, never silently.  Accesses go on meanwhile
(``when_unwritable="serve"``: images stay readable for patient care), or, for a site whose policy
is that nothing may be accessed unrecorded, every operation the level records is refused with
EACCES while records are held (``"refuse"``); the refusals are recorded too, and served again
once the held records are in the file.

Threads
-------
Caller threads (the trio thread, worker threads) build each record as a new dict and hand it to the
queue, never touching it again.  The writer thread alone owns the file descriptor, the chain state
(``seq``, last hash) and the syslog socket.  The pending aggregates and the executable cache are
shared between threads and guarded by their own locks.  A full queue makes the caller wait up to
``QUEUE_WAIT_SECONDS`` rather than lose a record; only after that is a record dropped, counted in
``AuditLog.dropped`` and logged.

Mapping to DICOM PS3.15 A.5 / IHE ATNA audit messages
-----------------------------------------------------
=========================  ===================================================================
cloudfs                    DICOM audit message
=========================  ===================================================================
operation                  EventID and EventActionCode, per operation:
                           open, read: 110103 "DICOM Instances Accessed", R;
                           read covering the whole instance: 110104 "DICOM Instances
                           Transferred", R; create, mkdir: 110103, C; write, setattr,
                           rename: 110103, U; unlink, rmdir: 110103, D
time                       EventDateTime
outcome                    EventOutcomeIndicator: success 0; refused (EACCES, ENOENT, ...) 4;
                           failed (EIO, ENOSPC, other errnos) 8; mount unavailable
                           (ENOTCONN, ESHUTDOWN) 12
uid                        ActiveParticipant (UserIsRequestor true): UserID
executable, pid            ActiveParticipant of the process: UserID, AlternativeUserID
host                       ActiveParticipant NetworkAccessPointID (TypeCode 1, machine
                           name); AuditSourceIdentification AuditSourceID
patient_id                 ParticipantObjectIdentification: ParticipantObjectID, TypeCode 1
                           (person), TypeCodeRole 1 (patient), IDTypeCode 2 (patient number)
study_uid                  ParticipantObjectIdentification: ParticipantObjectID, TypeCode 2
                           (system object), TypeCodeRole 3 (report), IDTypeCode (110180,
                           DCM, "Study Instance UID")
path                       ParticipantObjectDetail type "path" of the study object
bytes, since               ParticipantObjectDetail types "bytes", "since" (no standard element)
gid, seq, prev, hash       no element: local review and the integrity of this file; ATNA
                           relies on its transport (syslog over TLS, RFC 5425) instead
=========================  ===================================================================

``DICOM_EVENTS`` and ``DICOM_MAPPING`` hold the same tables as data; ``outcome_indicator`` gives
the EventOutcomeIndicator of an outcome.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import queue
import re
import socket
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from logging.handlers import SysLogHandler
from pathlib import Path
from typing import Any

from .processes import Executables

log = logging.getLogger(__name__)

_MiB = 1024 * 1024

LEVELS = ("off", "changes", "all")
WHEN_UNWRITABLE = ("serve", "refuse")
"""What accesses get while the log cannot be written (see ``AuditOptions.when_unwritable``)."""
OPERATIONS = ("open", "read", "write", "create", "rename", "unlink", "mkdir", "rmdir", "setattr")
LEVEL_OPERATIONS: dict[str, frozenset[str]] = {
    "off": frozenset(),
    "changes": frozenset(OPERATIONS) - {"read"},
    "all": frozenset(OPERATIONS),
}
GENESIS = "0" * 64
"""The ``prev`` of the first record of a log."""
SYSLOG_DEFAULT = "/dev/log"
"""The local syslog daemon's socket: the address to offer when syslog output is switched on."""

AGGREGATE_SECONDS = 60.0
"""A read or write aggregate is written at the latest this long after its first access: bounds
what a crash or a handle held open for hours can keep out of the log."""
FSYNC_SECONDS = 1.0
"""fsync at most this often: one fsync per record would cap the log at a few hundred records a
second on a disk without a write cache; a second is what a power loss can cost."""
QUEUE_RECORDS = 10_000
"""Records waiting for the writer thread: some 10 MiB of dicts, and a fraction of a second of
the writer's work (it writes tens of thousands of records a second)."""
HELD_RECORDS = 10_000
"""Records kept in memory while the log cannot be written (a full or failing disk), to be
written in order once it can: as many as the queue holds, some 10 MiB more at most."""
HELD_RETRY_SECONDS = 1.0
"""How often the writer tries the log again while it holds records back."""
QUEUE_WAIT_SECONDS = 1.0
"""How long a caller waits for room in a full queue before the record is dropped (and counted):
long enough to ride out a slow fsync, short enough that a dead disk cannot hang the mount."""
TAIL_WINDOW = 64 * 1024
"""Bytes read from the end of a log at a time when looking for its last record (a record is a few
hundred bytes; a path full of escaped characters may reach some tens of KiB)."""

DICOM_EVENTS: tuple[tuple[str, str, str, str], ...] = (
    ("open", "110103", "DICOM Instances Accessed", "R"),
    ("read", "110103", "DICOM Instances Accessed", "R"),
    ("read of the whole instance", "110104", "DICOM Instances Transferred", "R"),
    ("create", "110103", "DICOM Instances Accessed", "C"),
    ("mkdir", "110103", "DICOM Instances Accessed", "C"),
    ("write", "110103", "DICOM Instances Accessed", "U"),
    ("setattr", "110103", "DICOM Instances Accessed", "U"),
    ("rename", "110103", "DICOM Instances Accessed", "U"),
    ("unlink", "110103", "DICOM Instances Accessed", "D"),
    ("rmdir", "110103", "DICOM Instances Accessed", "D"),
)
"""Rows of (operation, EventID code, EventID meaning, EventActionCode)."""

DICOM_MAPPING: tuple[tuple[str, str], ...] = (
    ("operation", "EventID, EventActionCode (see DICOM_EVENTS)"),
    ("time", "EventDateTime"),
    ("outcome", "EventOutcomeIndicator (see outcome_indicator)"),
    ("uid", "ActiveParticipant (UserIsRequestor true): UserID"),
    ("executable, pid", "ActiveParticipant of the process: UserID, AlternativeUserID"),
    (
        "host",
        "ActiveParticipant NetworkAccessPointID (TypeCode 1); AuditSourceIdentification "
        "AuditSourceID",
    ),
    (
        "patient_id",
        "ParticipantObjectIdentification: ParticipantObjectID, TypeCode 1 (person), "
        "TypeCodeRole 1 (patient), IDTypeCode 2 (patient number)",
    ),
    (
        "study_uid",
        "ParticipantObjectIdentification: ParticipantObjectID, TypeCode 2 (system object), "
        'TypeCodeRole 3 (report), IDTypeCode (110180, DCM, "Study Instance UID")',
    ),
    ("path", 'ParticipantObjectDetail type "path" of the study object'),
    ("bytes, since", 'ParticipantObjectDetail types "bytes", "since" (no standard element)'),
    ("gid, seq, prev, hash", "no element: local review and the integrity of this file"),
)
"""Rows of (cloudfs field, DICOM PS3.15 A.5 audit message element)."""

_REFUSED = frozenset(
    {
        "EACCES",
        "EPERM",
        "ENOENT",
        "EEXIST",
        "ENOTDIR",
        "EISDIR",
        "ENOTEMPTY",
        "EROFS",
        "ENAMETOOLONG",
        "EINVAL",
        "EXDEV",
        "EBADF",
        "EFBIG",
        "ENODATA",
        "EOPNOTSUPP",
        "ENOTSUP",
        "ENOSYS",
    }
)
_UNAVAILABLE = frozenset({"ENOTCONN", "ESHUTDOWN"})


def outcome_indicator(outcome: str) -> int:
    """The DICOM EventOutcomeIndicator of an outcome.

    0 success; 4 (minor failure) for a request the filesystem refused, which changed nothing and
    can be retried by the user; 12 (major failure) when the mount itself is gone; 8 (serious
    failure) for everything else, an action that was attempted and failed.
    """
    if outcome == "success":
        return 0
    if outcome in _REFUSED:
        return 4
    if outcome in _UNAVAILABLE:
        return 12
    return 8


def outcome_for(error: int | None) -> str:
    """The outcome field for an errno (None or 0: success)."""
    if not error:
        return "success"
    return errno.errorcode.get(error, f"E{error}")


@dataclass(frozen=True)
class AuditOptions:
    """Where the audit trail goes and how much it records."""

    path: Path
    """The live log file; rotated files sit beside it.  Keep it on a local disk outside the mount:
    a log inside the mount would audit its own writes."""
    level: str = "changes"
    """``changes``: every open and every modification, but no read records, which dominate a
    viewer's traffic; opens alone already show who accessed which study.  ``all`` adds them."""
    max_bytes: int = 64 * _MiB
    """Rotate before the live file passes this size.  64 MiB holds about 130 000 records (some
    500 bytes each with a DICOM path and UIDs): days to weeks of a busy reading room at
    ``changes``, and ``verify`` checks such a file in about 1.5 s.  0: never rotate."""
    backups: int = 10
    """Rotated files kept (``path.1`` newest ... ``path.10`` oldest), bounding the disk use near
    700 MiB; keeping more is the job of archiving the rotated files or of syslog.  0: never
    rotate, as with logging's RotatingFileHandler."""
    syslog: str | None = None
    """Also send each record to syslog as an RFC 5424 message: a socket path (``/dev/log``, see
    ``SYSLOG_DEFAULT``) or ``host:port`` over UDP.  None: the file only.  A copy on another host is
    what protects the newest records from someone able to rewrite the file."""
    when_unwritable: str = "serve"
    """While the file refuses records (full or failing disk): ``serve`` goes on serving every
    access, the records waiting in memory; ``refuse`` fails every operation the level records
    with EACCES until the waiting records are in the file (fail closed)."""

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"audit level {self.level!r} is not one of {', '.join(LEVELS)}")
        if self.when_unwritable not in WHEN_UNWRITABLE:
            raise ValueError(
                f"audit when_unwritable {self.when_unwritable!r} is not one of "
                f"{', '.join(WHEN_UNWRITABLE)}"
            )
        if self.max_bytes < 0 or self.backups < 0:
            raise ValueError("audit max_bytes and backups cannot be negative")
        if self.syslog is not None:
            _syslog_address(self.syslog)


# -- records and the chain ---------------------------------------------------------------------

Record = dict[str, Any]

_HEX64 = re.compile(r"[0-9a-f]{64}")


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _canonical(body: Record) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _chain_hash(prev: str, canonical: str) -> str:
    return hashlib.sha256((prev + canonical).encode("ascii")).hexdigest()


def _line(canonical: str, digest: str) -> bytes:
    """The line for a record, without its newline: the canonical body with the hash appended, so
    the bytes the hash covers are the line itself up to ``,"hash"``."""
    return f'{canonical[:-1]},"hash":"{digest}"}}'.encode("ascii")


def _problem(value: object, raw: bytes) -> str | None:
    """Why a line that is valid JSON is not a sealed record, or None if its own hash holds."""
    if not isinstance(value, dict):
        return "not a JSON object"
    digest, seq, prev = value.get("hash"), value.get("seq"), value.get("prev")
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        return "no valid hash field"
    if type(seq) is not int or seq < 1:
        return "no valid seq field"
    if not isinstance(prev, str) or not _HEX64.fullmatch(prev):
        return "no valid prev field"
    canonical = _canonical({key: item for key, item in value.items() if key != "hash"})
    # Any byte changed without changing the parsed value (an escape, spacing, key order) still
    # shows here: the line must be exactly the form the writer produces.
    if _line(canonical, digest) != raw:
        return "line is not in canonical form (its bytes were changed)"
    if _chain_hash(prev, canonical) != digest:
        return "hash does not match the record (a field was changed)"
    return None


def _decode(raw: bytes) -> object:
    """The JSON value of a line; ValueError if it is not JSON (an unfinished write, or damage)."""
    return json.loads(raw.decode("ascii"))


def _sealed(raw: bytes) -> Record | None:
    try:
        value = _decode(raw)
    except ValueError:
        return None
    if _problem(value, raw) is not None:
        return None
    assert isinstance(value, dict)
    return value


def _tail(path: Path) -> tuple[Record | None, int, bool]:
    """The last record of a file whose own hash holds, how many lines after it are not such
    records, and whether the file ends in an unfinished line."""
    try:
        file = path.open("rb")
    except FileNotFoundError:
        return None, 0, False
    with file:
        size = file.seek(0, os.SEEK_END)
        if size == 0:
            return None, 0, False
        file.seek(size - 1)
        torn = file.read(1) != b"\n"
        window = TAIL_WINDOW
        while True:
            start = max(0, size - window)
            file.seek(start)
            lines = file.read(size - start).split(b"\n")
            lines.pop()  # what follows the last newline: nothing, or the unfinished line
            if start > 0:
                lines = lines[1:]  # may begin in the middle of a line
            skipped = 0
            for raw in reversed(lines):
                record = _sealed(raw)
                if record is not None:
                    return record, skipped, torn
                skipped += 1
            if start == 0:
                return None, skipped, torn
            window *= 4


def rotated_files(path: Path) -> list[Path]:
    """The live log and its rotated files, oldest first: ``path.N`` ... ``path.1``, ``path``.

    Every numbered file present is listed, gaps included, so that ``verify`` sees a missing one
    as the break in the chain it is.
    """
    path = Path(path)
    pattern = re.compile(re.escape(path.name) + r"\.([1-9][0-9]*)")
    numbered: list[tuple[int, Path]] = []
    if path.parent.is_dir():
        for entry in path.parent.iterdir():
            match = pattern.fullmatch(entry.name)
            if match:
                numbered.append((int(match.group(1)), entry))
    files = [entry for _, entry in sorted(numbered, reverse=True)]
    if path.exists():
        files.append(path)
    return files


@dataclass
class VerifyResult:
    """The outcome of ``verify``: on failure, where the first bad line is and why."""

    ok: bool
    records: int
    """Records whose hash and chain were checked (up to the first bad line)."""
    line: int | None = None
    """1-based line of the first bad line in ``file``; None when ok (or the file is unreadable)."""
    file: Path | None = None
    reason: str = ""
    first_seq: int | None = None
    """``seq`` of the first record: above 1 when older files were rotated away, so the records
    before it cannot be checked."""
    notes: list[str] = field(default_factory=list)
    """Things that do not make the log invalid but an auditor should know (crash remnants)."""


def verify(paths: Iterable[Path]) -> VerifyResult:
    """Check a log and its rotated files, given oldest first (``rotated_files`` order)."""
    paths = [Path(path) for path in paths]
    records = 0
    first_seq: int | None = None
    last_seq, last_hash = 0, ""
    torn: tuple[Path, int] | None = None  # the first non-JSON line since the last record
    notes: list[str] = []

    def fail(path: Path, line: int | None, reason: str) -> VerifyResult:
        return VerifyResult(False, records, line, path, reason, first_seq, notes)

    if not paths:
        return VerifyResult(False, 0, None, None, "no log files to verify")
    for path in paths:
        try:
            lines = path.read_bytes().split(b"\n")
        except OSError as exc:
            return fail(path, None, f"cannot read the file: {exc.strerror or exc}")
        unfinished = lines.pop()
        for number, raw in enumerate(lines, start=1):
            try:
                value = _decode(raw)
            except ValueError:
                # Possibly the remnant of a crash: acceptable only if the next record chains
                # over it from the last complete one.
                torn = torn or (path, number)
                continue
            problem = _problem(value, raw)
            if problem is not None:
                return fail(path, number, problem)
            assert isinstance(value, dict)
            seq, prev = value["seq"], value["prev"]
            if first_seq is None and seq > 1 and torn is None:
                # The set begins after older files were rotated away: nothing to check this
                # record's prev against.
                expected_seq, expected_prev = seq, prev
                notes.append(f"the chain starts at seq {seq}: older records are not in this set")
            elif first_seq is None:
                expected_seq, expected_prev = 1, GENESIS
            else:
                expected_seq, expected_prev = last_seq + 1, last_hash
            wrong = []
            if seq != expected_seq:
                wrong.append(f"seq {seq} where {expected_seq} was expected")
            if prev != expected_prev:
                wrong.append(
                    "prev does not match the hash of the record before"
                    if first_seq is not None
                    else "prev is not the 64 zeros that start a log"
                )
            if wrong and torn is not None:
                return fail(
                    torn[0],
                    torn[1],
                    f"line is not a JSON record and the record after it does not chain over it "
                    f"({'; '.join(wrong)})",
                )
            if wrong:
                return fail(
                    path, number, "; ".join(wrong) + " (a record was removed, inserted or moved)"
                )
            if torn is not None:
                notes.append(
                    f"{torn[0]}:{torn[1]}: unfinished line (a write cut short by a crash); "
                    "the chain continues over it"
                )
                torn = None
            if first_seq is None:
                first_seq = seq
            last_seq, last_hash = seq, value["hash"]
            records += 1
        if unfinished and torn is not None:
            break
        if unfinished:
            return fail(path, len(lines) + 1, "torn last line: no newline (a write cut short)")
    if torn is not None:
        return fail(torn[0], torn[1], "line is not a JSON record and no record chains over it")
    reason = f"{records} records intact" + (f", seq {first_seq}..{last_seq}" if records else "")
    return VerifyResult(True, records, None, None, reason, first_seq, notes)


# -- the writer thread's side --------------------------------------------------------------------


def _syslog_address(text: str) -> str | tuple[str, int]:
    """A socket path, or (host, port) for ``host:port`` / ``[v6 address]:port`` over UDP."""
    if text.startswith("/"):
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"syslog address {text!r}: expected a socket path or host:port")
    return host.strip("[]"), int(port)


class _Syslog(SysLogHandler):
    """Sends records as RFC 5424 messages: ``<PRI>1 TIME HOST cloudfs PID audit - JSON``.

    Facility authpriv, because audit records name patients and belong with the other security
    messages that syslog keeps from ordinary readers.  Failures are logged once and otherwise
    ignored: the file is the record of truth, syslog a copy.
    """

    def __init__(self, address: str | tuple[str, int], host: str) -> None:
        super().__init__(address=address, facility=SysLogHandler.LOG_AUTHPRIV)
        self.append_nul = False  # RFC 5424 frames a datagram by its length, not by a NUL
        self.setFormatter(logging.Formatter("%(message)s"))
        self.hostname = "".join(c if 32 < ord(c) < 127 else "-" for c in host)[:255] or "-"
        self.complained = False

    def send(self, when: str, line: str, success: bool) -> None:
        message = f"1 {when} {self.hostname} cloudfs {os.getpid()} audit - {line}"
        level = logging.INFO if success else logging.WARNING
        self.emit(logging.LogRecord(__name__, level, __file__, 0, message, None, None))

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.complained:
            self.complained = True
            log.warning(
                "cannot send audit records to syslog at %s (%s); the audit file is still written",
                self.address,
                sys.exc_info()[1],
            )


class _Writer:
    """The file, the chain and the syslog handler.  After construction, only the writer thread
    uses it."""

    def __init__(self, options: AuditOptions, host: str) -> None:
        self.path = Path(options.path)
        self.backups = options.backups
        self.max_bytes = options.max_bytes if options.backups else 0
        self.fd = -1
        self.size = 0
        self.dirty = False
        self.synced_at = 0.0
        self.failures = 0
        self.records = 0
        """Records written by this process."""
        self.needs_newline = False
        if not self.path.parent.is_dir():
            self.path.parent.mkdir(mode=0o700, parents=True)
        self.seq, self.last_hash = self._resume()
        self.fd = self._open()
        self.syslog: _Syslog | None = None
        if options.syslog is not None:
            try:
                self.syslog = _Syslog(_syslog_address(options.syslog), host)
            except OSError as exc:
                log.warning("audit records will not go to syslog at %s: %s", options.syslog, exc)

    def _resume(self) -> tuple[int, str]:
        """The chain state after the last complete record of the newest file that has one."""
        for path in reversed(rotated_files(self.path)):
            record, skipped, torn = _tail(path)
            if path == self.path and torn:
                self.needs_newline = True
                log.warning(
                    "%s ends in an unfinished line (a write cut short by a crash); the log "
                    "continues on a new line from the last complete record",
                    path,
                )
            elif skipped:
                log.warning("%s: the last %d lines are not valid records", path, skipped)
            if record is not None:
                return record["seq"], record["hash"]
        return 0, GENESIS

    def _open(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            # Two mounts sharing one log would fork its chain; the lock makes the second fail.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            info = os.fstat(fd)
            if stat.S_IMODE(info.st_mode) != 0o600:
                os.fchmod(fd, 0o600)  # created by something else, or before this rule
        except BlockingIOError:
            os.close(fd)
            raise OSError(
                errno.EBUSY, "the audit log is held by another process", str(self.path)
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self.size = info.st_size
        return fd

    def write(self, body: Record) -> None:
        record = dict(body)
        record["seq"] = self.seq + 1
        record["prev"] = self.last_hash
        canonical = _canonical(record)
        digest = _chain_hash(self.last_hash, canonical)
        line = _line(canonical, digest) + b"\n"
        if self.fd < 0:
            self.fd = self._open()  # a failed rotation left no file open
        elif self.max_bytes and self.size and self.size + len(line) > self.max_bytes:
            self._rotate()
        self._append(line)
        self.seq, self.last_hash = record["seq"], digest
        self.records += 1
        if self.syslog is not None:
            self.syslog.send(
                record["time"], line[:-1].decode("ascii"), body["outcome"] == "success"
            )

    def _append(self, line: bytes) -> None:
        data = b"\n" + line if self.needs_newline else line
        written = 0
        try:
            while written < len(data):
                written += os.write(self.fd, data[written:])
        finally:
            if written:
                self.size += written
                self.dirty = True
                # A write cut short leaves a partial line: the next record starts a new one.
                self.needs_newline = data[written - 1] != ord("\n")

    def _rotate(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        self.dirty = False
        try:
            for number in range(self.backups - 1, 0, -1):
                source = self.path.with_name(f"{self.path.name}.{number}")
                if source.exists():
                    os.replace(source, self.path.with_name(f"{self.path.name}.{number + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
            # Files numbered above the limit are left from a larger ``backups``; kept, they
            # would sit before a gap in the chain.
            for old in rotated_files(self.path):
                suffix = old.name.rpartition(".")[2]
                if old != self.path and int(suffix) > self.backups:
                    old.unlink()
            self._sync_directory()
        finally:
            self.fd = self._open()

    def _sync_directory(self) -> None:
        fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def sync(self) -> None:
        # Cleared first: a failing fsync is not retried in a tight loop (Linux reports a lost
        # write-back once, so a retry would not help either).
        self.synced_at = time.monotonic()
        if self.dirty and self.fd >= 0:
            self.dirty = False
            os.fsync(self.fd)

    def sync_due_in(self) -> float:
        """Seconds until the batched fsync is due (only meaningful while dirty)."""
        return self.synced_at + FSYNC_SECONDS - time.monotonic()

    def close(self) -> None:
        try:
            self.sync()
        finally:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            if self.syslog is not None:
                self.syslog.close()


# -- the callers' side ---------------------------------------------------------------------------


@dataclass
class _Aggregate:
    record: Record
    """The record as of the first access; ``time`` is that access's time."""
    started: float
    bytes: int = 0

    def finish(self) -> Record:
        record = dict(self.record)
        record["since"] = record["time"]
        record["time"] = _utc_now()
        record["bytes"] = self.bytes
        return record


_STOP = object()


class AuditLog:
    """The audit trail of one mount.  Every method may be called from any thread and returns
    without touching the disk, except ``flush`` and ``close``, which wait for the writer (call
    them from a worker thread, or at shutdown)."""

    def __init__(self, options: AuditOptions, host: str | None = None) -> None:
        self.options = options
        self.host = host or socket.gethostname()
        self.operations = LEVEL_OPERATIONS[options.level]
        self._fail_closed = options.when_unwritable == "refuse"
        self.dropped = 0
        """Records lost because the queue stayed full (or they arrived after ``close``)."""
        self._lock = threading.Lock()  # guards _pending, _closed and dropped
        self._pending: dict[int, dict[tuple[str, int], _Aggregate]] = {}
        self._closed = False
        self._executables = Executables()
        self._queue: queue.Queue[object] = queue.Queue(maxsize=QUEUE_RECORDS)
        # The writer thread's alone, read elsewhere only for ``state``:
        self._held: deque[Record] = deque()
        """Records the file could not take yet, oldest first (see ``HELD_RECORDS``)."""
        self._held_since: float | None = None
        """When the file first refused a record now held (wall clock); None: nothing held."""
        self._retry_at = 0.0
        self._last_error = ""
        self._writer: _Writer | None = None
        self._thread: threading.Thread | None = None
        if not self.operations:
            return
        # Opening here, not in the thread, lets a mount refuse to start unaudited.
        self._writer = _Writer(options, self.host)
        self._thread = threading.Thread(target=self._run, name="cloudfs-audit", daemon=True)
        self._thread.start()

    def state(self) -> dict[str, Any]:
        """What ``cloudfs status`` and the metrics show of the trail."""
        writer = self._writer
        return {
            "path": str(self.options.path),
            "level": self.options.level,
            "written": writer.records if writer else 0,
            "held": len(self._held),
            "held_since": self._held_since,
            "refusing": self.refusing,
            "dropped": self.dropped,
            "write_failures": writer.failures if writer else 0,
            "last_error": self._last_error,
        }

    @property
    def refusing(self) -> bool:
        """Whether audited accesses are refused now: the options say to fail closed and the log
        cannot be written (records are held)."""
        return self._fail_closed and bool(self._held)

    def refuses(self, operation: str) -> bool:
        """Whether ``operation`` must be refused now: ``refusing``, and the level records it."""
        return self.refusing and operation in self.operations

    def event(
        self,
        operation: str,
        *,
        uid: int,
        gid: int,
        pid: int,
        path: str,
        outcome: str = "success",
        bytes: int = 0,
        patient_id: str = "",
        study_uid: str = "",
    ) -> None:
        """Record one operation, if the level includes it."""
        if operation not in OPERATIONS:
            raise ValueError(f"unknown audit operation {operation!r}")
        if operation not in self.operations:
            return
        self._put(
            self._record(operation, uid, gid, pid, path, outcome, bytes, patient_id, study_uid)
        )

    def read(
        self,
        handle: int,
        *,
        uid: int,
        gid: int,
        pid: int,
        path: str,
        size: int,
        patient_id: str = "",
        study_uid: str = "",
    ) -> None:
        """Count a successful read of ``size`` bytes; one record per handle and process follows
        at ``released`` (or after ``AGGREGATE_SECONDS``)."""
        self._fold("read", handle, uid, gid, pid, path, size, patient_id, study_uid)

    def write(
        self,
        handle: int,
        *,
        uid: int,
        gid: int,
        pid: int,
        path: str,
        size: int,
        patient_id: str = "",
        study_uid: str = "",
    ) -> None:
        """Count a successful write; folded like ``read`` into one ``write`` summary."""
        self._fold("write", handle, uid, gid, pid, path, size, patient_id, study_uid)

    def released(self, handle: int) -> None:
        """The handle is closed: write its read and write summaries."""
        with self._lock:
            group = self._pending.pop(handle, {})
        for aggregate in group.values():
            self._put(aggregate.finish())

    def flush(self) -> None:
        """Wait until every record handed over so far is written and fsynced."""
        if self._thread is None or self._closed:
            return
        done = threading.Event()
        self._queue.put(done)
        done.wait()

    def close(self) -> None:
        """Write the pending summaries, drain the queue, fsync and close the file."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = [a for group in self._pending.values() for a in group.values()]
            self._pending.clear()
        if self._thread is None:
            return
        for aggregate in pending:
            self._queue.put(aggregate.finish())
        self._queue.put(_STOP)
        self._thread.join()
        # A record handed over while close ran, after the stop marker: not written.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, dict):
                self._count_drop("it arrived as the mount stopped")
            elif isinstance(item, threading.Event):
                item.set()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------

    def _record(
        self,
        operation: str,
        uid: int,
        gid: int,
        pid: int,
        path: str,
        outcome: str,
        size: int,
        patient_id: str,
        study_uid: str,
    ) -> Record:
        record: Record = {
            "time": _utc_now(),
            "host": self.host,
            "uid": int(uid),
            "gid": int(gid),
            "pid": int(pid),
            "executable": self._executables.of(pid),
            "operation": operation,
            "path": path,
            "bytes": int(size),
            "outcome": outcome,
        }
        if patient_id:
            record["patient_id"] = patient_id
        if study_uid:
            record["study_uid"] = study_uid
        return record

    def _fold(
        self,
        operation: str,
        handle: int,
        uid: int,
        gid: int,
        pid: int,
        path: str,
        size: int,
        patient_id: str,
        study_uid: str,
    ) -> None:
        if operation not in self.operations:
            return
        with self._lock:
            if self._closed:
                return
            aggregate = self._pending.get(handle, {}).get((operation, pid))
            if aggregate is not None:
                aggregate.bytes += size
                return
        # The first access of this handle and process: built outside the lock, as it reads /proc.
        record = self._record(operation, uid, gid, pid, path, "success", 0, patient_id, study_uid)
        with self._lock:
            if self._closed:
                return
            group = self._pending.setdefault(handle, {})
            aggregate = group.setdefault((operation, pid), _Aggregate(record, time.monotonic()))
            aggregate.bytes += size

    def _expired(self, now: float) -> list[Record]:
        """Summaries whose first access is ``AGGREGATE_SECONDS`` old, removed from pending."""
        due: list[_Aggregate] = []
        with self._lock:
            for handle, group in list(self._pending.items()):
                for key, aggregate in list(group.items()):
                    if now - aggregate.started >= AGGREGATE_SECONDS:
                        due.append(group.pop(key))
                if not group:
                    del self._pending[handle]
        return [aggregate.finish() for aggregate in due]

    def _put(self, record: Record) -> None:
        if self._thread is None or self._closed:
            if self._thread is not None:
                self._count_drop("it arrived as the mount stopped")
            return
        try:
            self._queue.put(record, timeout=QUEUE_WAIT_SECONDS)
        except queue.Full:
            self._count_drop("the audit writer cannot keep up")

    def _count_drop(self, why: str, records: int = 1) -> None:
        with self._lock:
            before = self.dropped
            self.dropped += records
            dropped = self.dropped
        if before == 0 or dropped // 1000 > before // 1000:
            log.error("audit records dropped: %d so far (the last because %s)", dropped, why)

    def _run(self) -> None:
        writer = self._writer
        assert writer is not None
        next_expiry = time.monotonic() + 1.0
        while True:
            timeout = writer.sync_due_in() if writer.dirty else 1.0
            try:
                item = self._queue.get(timeout=max(0.0, min(timeout, 1.0)))
            except queue.Empty:
                item = None
            if item is _STOP:
                break
            if isinstance(item, threading.Event):
                self._write_held()
                self._guard(writer.sync)
                item.set()
                continue
            if isinstance(item, dict):
                self._write(item)
            now = time.monotonic()
            if now >= next_expiry:
                next_expiry = now + 1.0
                for record in self._expired(now):
                    self._write(record)
            if self._held and now >= self._retry_at:
                self._write_held()
            if writer.dirty and writer.sync_due_in() <= 0:
                self._guard(writer.sync)
        self._write_held()
        if self._held:
            self._count_drop(
                "the log could not be written before the mount stopped", len(self._held)
            )
            self._held.clear()
        self._guard(writer.close)

    def _write(self, record: Record) -> None:
        """Write one record, after those held back; a record the file refuses is held too."""
        assert self._writer is not None
        if self._held:
            self._hold(record)
            if time.monotonic() >= self._retry_at:
                self._write_held()
        elif not self._guard(self._writer.write, record, report=False):
            self._hold(record)  # logs why

    def _hold(self, record: Record) -> None:
        if not self._held:
            self._held_since = time.time()
            self._retry_at = time.monotonic() + HELD_RETRY_SECONDS
            log.error(
                "audit log %s cannot be written (%s): records are kept in memory, up to %d, "
                "and written once it can%s",
                self.options.path,
                self._last_error,
                HELD_RECORDS,
                "; until then accesses through the mount are REFUSED" if self._fail_closed else "",
            )
        if len(self._held) >= HELD_RECORDS:
            self._count_drop(f"the log cannot be written and {HELD_RECORDS} records wait already")
        else:
            self._held.append(record)

    def _write_held(self) -> None:
        """Write the held records, oldest first, until the file refuses one."""
        assert self._writer is not None
        if not self._held:
            return
        count = len(self._held)
        while self._held:
            if not self._guard(self._writer.write, self._held[0]):
                self._retry_at = time.monotonic() + HELD_RETRY_SECONDS
                return
            self._held.popleft()
        self._held_since = None
        log.warning(
            "audit log %s written again: the %d records held are in it%s",
            self.options.path,
            count,
            "; accesses are served again" if self._fail_closed else "",
        )

    def _guard(self, action: Callable[..., object], *args: Any, report: bool = True) -> bool:
        """Run one step of the writer; whether it worked.  A failure is logged and counted,
        never ends the thread (a dead writer would leave every caller waiting on a full queue).
        ``report=False``: the caller logs this failure itself."""
        assert self._writer is not None
        try:
            action(*args)
        except Exception as exc:
            self._last_error = str(exc)
            self._writer.failures += 1
            failures = self._writer.failures
            if report and (failures == 1 or failures % 1000 == 0):
                log.error("audit log %s: %s (%d failures so far)", self.options.path, exc, failures)
            return False
        return True
