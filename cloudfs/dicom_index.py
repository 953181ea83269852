"""The DICOM header index and the browse tree built from it, kept in the catalog's database.

One row per object in ``dicom_instances``, for the object version (ETag) whose header was read:
the tags of a DICOM instance, or the reason it is not one (``problem``), so no object is read twice.
An object with no row, or a row of another version, is *pending*: indexing resumes there after a
restart and picks up objects added by a relist or written through the mount.  Triggers on the
catalog queue every key whose node is added, changed or removed (``dicom_queue``), so finding
what is pending costs what changed, not a scan of an archive of millions of objects each time an
upload lands; a key whose node left the catalog leaves the index and the view from that queue.

The browse view is a tree of ``view_nodes``: directories for patients, studies, series and the
by-date levels, and files that name the object (``target``) holding their bytes.  Each directory
entry has an *identity* (a patient ID, a study or series UID, an SOP instance UID) besides its
name; a name already taken by another identity gets a ``~2``, ``~3`` suffix.  Rows are stored,
never recomputed, so names stay stable across remounts.  The layout:

    by-patient/<patient>/<date>_<description>_<accession>/<number>_<modality>_<description>/<n>.dcm
    by-date/<YYYY>/<MM>/<DD>/<patient>_<description>_<accession>/<series>/<n>.dcm

Objects that are not DICOM (or whose header is unreadable), instances without a study, series or
SOP instance UID, and second copies of an SOP instance already placed in the same series, are
indexed but not placed; the reason is logged (info) once per object version, when it is recorded.

Threads: every method blocks and runs in a worker thread; writes go through the catalog's
transactions (one in-process write lock for the whole database).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from .catalog import Catalog, Node
from .dicom import Header, folder_name

log = logging.getLogger(__name__)

VIEW_BASE = 1 << 48
"""Inode numbers of view entries start here, far above any catalog row id."""
VIEW_ROOT, BY_PATIENT, BY_DATE = 1, 2, 3
"""Row ids of the fixed top of the view tree."""
UNDATED = "undated"
_FOLDERS_META = "dicom_patient_folders"
"""Catalog meta entry: what patient folders are named by ("ids" or "names") in the stored view."""
_QUEUE_STEP = 1000
"""Queued keys looked at per transaction while looking for pending ones (the write lock is
held meanwhile: a queue of a million keys after a first listing must not stall writers)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dicom_instances (
    key TEXT PRIMARY KEY,
    etag TEXT,
    size INTEGER NOT NULL,
    problem TEXT,
    patient_id TEXT, patient_name TEXT,
    study_uid TEXT, study_date TEXT, study_time TEXT, accession TEXT, study_description TEXT,
    series_uid TEXT, series_number INTEGER, modality TEXT, series_description TEXT,
    sop_uid TEXT, instance_number INTEGER, body_part TEXT, transfer_syntax TEXT,
    local INTEGER NOT NULL DEFAULT 0,
    indexed_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS dicom_by_study
    ON dicom_instances(study_uid, series_number, series_uid, instance_number);
CREATE INDEX IF NOT EXISTS dicom_by_patient ON dicom_instances(patient_id, study_date);
CREATE INDEX IF NOT EXISTS dicom_by_date ON dicom_instances(study_date);
CREATE TABLE IF NOT EXISTS view_nodes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    parent INTEGER NOT NULL,
    name TEXT NOT NULL,
    identity TEXT NOT NULL,
    target TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS view_by_name ON view_nodes(parent, name);
CREATE UNIQUE INDEX IF NOT EXISTS view_by_identity ON view_nodes(parent, identity);
CREATE INDEX IF NOT EXISTS view_by_target ON view_nodes(target) WHERE target IS NOT NULL;
CREATE TABLE IF NOT EXISTS dicom_queue (key TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS dicom_queue_added AFTER INSERT ON nodes
    WHEN NEW.key IS NOT NULL AND NEW.is_dir = 0
    BEGIN INSERT OR IGNORE INTO dicom_queue(key) VALUES (NEW.key); END;
CREATE TRIGGER IF NOT EXISTS dicom_queue_changed
    AFTER UPDATE OF key, etag, size, dirty, fetch_key ON nodes
    WHEN NEW.key IS NOT NULL AND NEW.is_dir = 0
    BEGIN INSERT OR IGNORE INTO dicom_queue(key) VALUES (NEW.key); END;
CREATE TRIGGER IF NOT EXISTS dicom_queue_left AFTER UPDATE OF key ON nodes
    WHEN OLD.key IS NOT NULL AND OLD.key IS NOT NEW.key
    BEGIN INSERT OR IGNORE INTO dicom_queue(key) VALUES (OLD.key); END;
CREATE TRIGGER IF NOT EXISTS dicom_queue_removed AFTER DELETE ON nodes
    WHEN OLD.key IS NOT NULL
    BEGIN INSERT OR IGNORE INTO dicom_queue(key) VALUES (OLD.key); END;
CREATE TABLE IF NOT EXISTS pins (selector TEXT PRIMARY KEY, created REAL NOT NULL);
"""

_FIXED = ((VIEW_ROOT, 0, "", "view"), (BY_PATIENT, 1, "by-patient", "by-patient"),
          (BY_DATE, 1, "by-date", "by-date"))  # fmt: skip

_TAGS = (
    "patient_id, patient_name, study_uid, study_date, study_time, accession, study_description, "
    "series_uid, series_number, modality, series_description, sop_uid, instance_number, "
    "body_part, transfer_syntax"
)

NAME_LIMIT = 64
"""Bytes per name part: long enough for any real description, short enough that a full view
path stays far below PATH_MAX."""


class Pending(NamedTuple):
    """An object whose header is still to be read."""

    key: str
    etag: str
    size: int
    local: bool
    """Changed through the mount: its header comes from the bytes just written."""


class ObjectRef(NamedTuple):
    """One object version to fetch: what study prefetch and pins work on."""

    key: str
    etag: str
    size: int


class ViewEntry(NamedTuple):
    id: int
    parent: int
    name: str
    target: str | None
    """The object key of a file; None for a directory."""

    @property
    def ino(self) -> int:
        return VIEW_BASE + self.id

    @property
    def is_dir(self) -> bool:
        return self.target is None


@dataclass
class Instance:
    """An indexed instance with what study prefetch orders by."""

    key: str
    etag: str
    size: int
    patient_id: str
    study_uid: str
    study_date: str
    series_uid: str
    series_number: int | None
    modality: str
    instance_number: int | None


def is_view_inode(ino: int) -> bool:
    return ino >= VIEW_BASE


def _first_part(*parts: str) -> str:
    return "_".join(folder_name(part, NAME_LIMIT) for part in parts if part.strip()) or "unknown"


class DicomIndex:
    def __init__(self, catalog: Catalog, patient_names: bool) -> None:
        self.catalog = catalog
        self.patient_names = patient_names
        with catalog.write_lock:
            db = catalog.connection()
            queued = db.execute("SELECT 1 FROM sqlite_master WHERE name='dicom_queue'").fetchone()
            db.executescript(_SCHEMA)  # commits by itself
        with catalog.transaction(nodes=False) as db:
            if not queued:  # an index from before the queue, or none yet: look at everything
                db.execute(
                    "INSERT OR IGNORE INTO dicom_queue(key) SELECT key FROM nodes "
                    "WHERE key IS NOT NULL AND is_dir=0 UNION SELECT key FROM dicom_instances"
                )
            db.executemany(
                "INSERT OR IGNORE INTO view_nodes(id, parent, name, identity) VALUES (?,?,?,?)",
                _FIXED,
            )
            chosen = "names" if patient_names else "ids"
            if catalog.get_meta(_FOLDERS_META) != chosen:
                self._rebuild_view(db)
                catalog.set_meta(_FOLDERS_META, chosen)

    def _rebuild_view(self, db: sqlite3.Connection) -> None:
        """Name every patient folder anew, after ``--patient-folder`` changed (or on a view built
        before the choice was recorded): names are stored, so without this, folders named after
        patients would outlive a switch to IDs only.  One transaction: the view never mixes the
        two; a duplicate instance stays hidden behind the copy indexed first, as before."""
        fixed = [row[0] for row in _FIXED]
        db.execute(f"DELETE FROM view_nodes WHERE id NOT IN ({','.join('?' * len(fixed))})", fixed)
        rows = db.execute(
            f"SELECT key, {_TAGS} FROM dicom_instances WHERE problem IS NULL "
            "ORDER BY indexed_at, key"
        ).fetchall()
        for row in rows:
            self._place(db, row[0], Header(*row[1:]))
        if rows:
            log.info("DICOM view rebuilt for the patient-folder choice: %d instances", len(rows))

    # -- indexing --------------------------------------------------------------------------

    def pending(self, limit: int) -> list[Pending]:
        """Up to ``limit`` clean objects (their bytes are in the cloud) whose current version is
        not indexed.  Queued keys that need no read are settled on the way: one indexed at its
        current version, or not ready (being written, moved, empty: a later change queues it
        again), leaves the queue; one whose node left the catalog leaves the index and the view
        too.  A pending key stays queued until ``record`` stores it, so a failed read is tried
        again."""
        found: list[Pending] = []
        after = ""
        while len(found) < limit:
            with self.catalog.transaction(nodes=False) as db:
                rows = db.execute(
                    "SELECT q.key, n.ino, n.is_dir, n.dirty, n.fetch_key, n.etag, n.size, "
                    "n.local_at > 0, d.etag FROM dicom_queue q "
                    "LEFT JOIN nodes n ON n.key = q.key "
                    "LEFT JOIN dicom_instances d ON d.key = q.key "
                    "WHERE q.key > ? ORDER BY q.key LIMIT ?",
                    (after, _QUEUE_STEP),
                ).fetchall()
                if not rows:
                    break
                settled = []
                for key, ino, is_dir, dirty, fetch_key, etag, size, local, indexed in rows:
                    if ino is None or is_dir:
                        self._forget(db, key)
                    elif dirty or fetch_key is not None or etag is None or not size:
                        pass  # not in the cloud as it is (yet): its next change queues it
                    elif indexed != etag:
                        if len(found) < limit:
                            found.append(Pending(key, etag, size, bool(local)))
                        continue
                    settled.append((key,))
                db.executemany("DELETE FROM dicom_queue WHERE key=?", settled)
                after = rows[-1][0]
        return found

    def _forget(self, db: sqlite3.Connection, key: str) -> None:
        """``key`` left the catalog (deleted, or renamed away): out of the index and the view."""
        before = self._instance_identity(db, key)
        self._unplace(db, key)
        if db.execute("DELETE FROM dicom_instances WHERE key=?", (key,)).rowcount:
            self._show_other_copy(db, before, key)

    def record(
        self, results: Iterable[tuple[Pending, Header | str, bool]]
    ) -> tuple[list[str], list[str]]:
        """Store what was read: a Header, or the reason the object is not DICOM; ``local`` marks
        headers read from bytes written through the mount.  Returns the studies seen for the
        first time (and whether any came from local writes, as a second list)."""
        new_studies: list[str] = []
        local_studies: list[str] = []
        now = time.time()
        with self.catalog.transaction(nodes=False) as db:
            for item, outcome, local in results:
                current = db.execute("SELECT etag FROM nodes WHERE key=?", (item.key,)).fetchone()
                if current is None or current[0] != item.etag:
                    continue  # changed or gone while its header was read: pending again
                db.execute("DELETE FROM dicom_queue WHERE key=?", (item.key,))
                before = self._instance_identity(db, item.key)
                self._unplace(db, item.key)
                if isinstance(outcome, str):
                    # Only a new version is read again, so this is once per object version.
                    log.info("%s: %s; not placed in the view", item.key, outcome)
                    db.execute(
                        "INSERT OR REPLACE INTO dicom_instances(key, etag, size, problem, "
                        "indexed_at) VALUES (?,?,?,?,?)",
                        (item.key, item.etag, item.size, outcome, now),
                    )
                    self._show_other_copy(db, before, item.key)
                    continue
                h = outcome
                known = (
                    h.study_uid
                    and db.execute(
                        "SELECT 1 FROM dicom_instances WHERE study_uid=? AND problem IS NULL "
                        "LIMIT 1",
                        (h.study_uid,),
                    ).fetchone()
                )
                db.execute(
                    f"INSERT OR REPLACE INTO dicom_instances(key, etag, size, problem, {_TAGS}, "
                    "local, indexed_at) VALUES (?,?,?,NULL,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        item.key, item.etag, item.size,
                        h.patient_id, h.patient_name, h.study_uid, h.study_date, h.study_time,
                        h.accession, h.study_description, h.series_uid, h.series_number,
                        h.modality, h.series_description, h.sop_uid, h.instance_number,
                        h.body_part, h.transfer_syntax, int(local), now,
                    ),
                )  # fmt: skip
                if h.study_uid and not known:
                    new_studies.append(h.study_uid)
                    if local:
                        local_studies.append(h.study_uid)
                self._place(db, item.key, h)
                if before != (h.sop_uid, h.series_uid, h.study_uid):
                    self._show_other_copy(db, before, item.key)
        return new_studies, local_studies

    @staticmethod
    def _instance_identity(db: sqlite3.Connection, key: str) -> tuple[str, str, str] | None:
        row = db.execute(
            "SELECT sop_uid, series_uid, study_uid FROM dicom_instances "
            "WHERE key=? AND problem IS NULL",
            (key,),
        ).fetchone()
        return (row[0], row[1], row[2]) if row and row[0] else None

    def _show_other_copy(
        self, db: sqlite3.Connection, identity: tuple[str, str, str] | None, key: str
    ) -> None:
        """``key`` no longer shows the SOP instance ``identity``: place another current copy of
        it, which was kept out of the view as a duplicate, in its stead."""
        if identity is None:
            return
        row = db.execute(
            f"SELECT d.key, {_TAGS} FROM dicom_instances d "
            "JOIN nodes n ON n.key = d.key AND n.etag = d.etag "
            "WHERE d.sop_uid=? AND d.series_uid=? AND d.study_uid=? AND d.key != ? "
            "AND d.problem IS NULL ORDER BY d.indexed_at LIMIT 1",
            (*identity, key),
        ).fetchone()
        if row is not None:
            self._place(db, row[0], Header(*row[1:]))

    # -- the view tree ---------------------------------------------------------------------

    def _child(
        self, db: sqlite3.Connection, parent: int, identity: str, name: str, target: str | None
    ) -> int:
        """The entry of ``identity`` in ``parent``, made with a free name if it is new."""
        execute = db.execute
        row = execute(
            "SELECT id FROM view_nodes WHERE parent=? AND identity=?", (parent, identity)
        ).fetchone()
        if row:
            return int(row[0])
        candidate, suffix = name, 1
        while execute(
            "SELECT 1 FROM view_nodes WHERE parent=? AND name=?", (parent, candidate)
        ).fetchone():
            suffix += 1
            stem, dot, extension = name.rpartition(".") if target else (name, "", "")
            candidate = f"{stem}~{suffix}{dot}{extension}" if stem else f"{name}~{suffix}"
        cursor = execute(
            "INSERT INTO view_nodes(parent, name, identity, target) VALUES (?,?,?,?)",
            (parent, candidate, identity, target),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def _place(self, db: sqlite3.Connection, key: str, h: Header) -> None:
        if not (h.study_uid and h.series_uid and h.sop_uid):
            log.info("%s: no study, series or SOP instance UID; not placed in the view", key)
            return
        patient = self._patient_folder(h)
        study = _first_part(h.study_date or UNDATED, h.study_description, h.accession)
        number = "" if h.series_number is None else f"{h.series_number:03d}"
        series = _first_part(number, h.modality, h.series_description)
        if h.instance_number is None:
            instance = f"x{folder_name(h.sop_uid, NAME_LIMIT)}.dcm"
        else:
            instance = f"{h.instance_number:04d}.dcm"
        # The identity is the ID itself: two IDs may clean to the same folder name.
        identity = f"patient:{h.patient_id}"
        if self.patient_names:
            identity += f"\0{h.patient_name}"
        by_patient = self._child(db, BY_PATIENT, identity, patient, None)
        date_parent = self._date_folder(db, h.study_date)
        for parent, study_name in (
            (by_patient, study),
            (date_parent, _first_part(patient, h.study_description, h.accession)),
        ):
            study_id = self._child(db, parent, h.study_uid, study_name, None)
            series_id = self._child(db, study_id, h.series_uid, series, None)
            entry = self._child(db, series_id, h.sop_uid, instance, key)
            placed = db.execute("SELECT target FROM view_nodes WHERE id=?", (entry,)).fetchone()[0]
            if placed != key:
                log.info("%s: SOP instance %s is already shown as %s", key, h.sop_uid, placed)
                return

    def _patient_folder(self, h: Header) -> str:
        if self.patient_names and h.patient_name.strip():
            return _first_part(h.patient_name, h.patient_id or "noid")
        return folder_name(h.patient_id, NAME_LIMIT, fallback="unknown-patient")

    def _date_folder(self, db: sqlite3.Connection, date: str) -> int:
        if len(date) != 8 or not date.isdigit():
            return self._child(db, BY_DATE, UNDATED, UNDATED, None)
        parent = BY_DATE
        for part in (date[:4], date[4:6], date[6:]):
            parent = self._child(db, parent, part, part, None)
        return parent

    def _unplace(self, db: sqlite3.Connection, key: str) -> None:
        """Remove the view files of ``key`` and the directories that leaves empty."""
        execute = db.execute
        parents = [
            row[0] for row in execute("SELECT parent FROM view_nodes WHERE target=?", (key,))
        ]
        execute("DELETE FROM view_nodes WHERE target=?", (key,))
        for parent in parents:
            current = parent
            while (
                current > BY_DATE
                and not execute(
                    "SELECT 1 FROM view_nodes WHERE parent=? LIMIT 1", (current,)
                ).fetchone()
            ):
                row = execute("SELECT parent FROM view_nodes WHERE id=?", (current,)).fetchone()
                execute("DELETE FROM view_nodes WHERE id=?", (current,))
                if row is None:
                    break
                current = row[0]

    def view_entry(self, entry_id: int) -> ViewEntry | None:
        row = (
            self.catalog.connection()
            .execute("SELECT id, parent, name, target FROM view_nodes WHERE id=?", (entry_id,))
            .fetchone()
        )
        return ViewEntry(*row) if row else None

    def view_path(self, entry_id: int) -> str:
        """The path of a view entry below the view's root."""
        rows = (
            self.catalog.connection()
            .execute(
                "WITH RECURSIVE up(id, parent, name, depth) AS ("
                "SELECT id, parent, name, 0 FROM view_nodes WHERE id=? UNION ALL "
                "SELECT v.id, v.parent, v.name, up.depth + 1 FROM view_nodes v "
                "JOIN up ON v.id = up.parent WHERE up.id != ?) "
                "SELECT name FROM up ORDER BY depth DESC",
                (entry_id, VIEW_ROOT),
            )
            .fetchall()
        )
        return "/".join(row[0] for row in rows if row[0])

    def view_lookup(self, parent: int, name: str) -> ViewEntry | None:
        row = (
            self.catalog.connection()
            .execute(
                "SELECT id, parent, name, target FROM view_nodes WHERE parent=? AND name=?",
                (parent, name),
            )
            .fetchone()
        )
        return ViewEntry(*row) if row else None

    def view_children(self, parent: int, after: int, limit: int) -> list[ViewEntry]:
        rows = (
            self.catalog.connection()
            .execute(
                "SELECT id, parent, name, target FROM view_nodes WHERE parent=? AND id>? "
                "ORDER BY id LIMIT ?",
                (parent, after, limit),
            )
            .fetchall()
        )
        return [ViewEntry(*row) for row in rows]

    def target_nodes(self, keys: list[str]) -> dict[str, Node]:
        """The catalog nodes of view files, in one query per directory batch."""
        found: dict[str, Node] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for node in self.catalog.select(f"key IN ({marks})", *chunk):
                assert node.key is not None
                found[node.key] = node
        return found

    # -- queries ---------------------------------------------------------------------------

    def instance(self, key: str) -> Instance | None:
        rows = self._instances("d.key=?", key)
        return rows[0] if rows else None

    def _instances(self, where: str, *args: object) -> list[Instance]:
        rows = (
            self.catalog.connection()
            .execute(
                "SELECT d.key, n.etag, n.size, d.patient_id, d.study_uid, d.study_date, "
                "d.series_uid, d.series_number, d.modality, d.instance_number "
                "FROM dicom_instances d JOIN nodes n ON n.key = d.key AND n.etag = d.etag "
                f"WHERE d.problem IS NULL AND {where} "
                # Missing numbers last, as study prefetch orders them.
                "ORDER BY d.series_number IS NULL, d.series_number, d.series_uid, "
                "d.instance_number IS NULL, d.instance_number, d.key",
                args,
            )
            .fetchall()
        )
        return [Instance(*row) for row in rows]

    def study_instances(self, study_uid: str) -> list[Instance]:
        """A study's instances in viewing order: by series number, then instance number."""
        return self._instances("d.study_uid=?", study_uid)

    def priors(self, study_uid: str, patient_id: str, modality: str, count: int) -> list[str]:
        """The patient's ``count`` most recent studies dated before ``study_uid``, same modality
        first.  A later study is no prior; an undated study (or an undated current one) cannot
        be placed in time, so it is none either: prefetch is for what a reader will compare."""
        if not patient_id or count <= 0:
            return []
        rows = (
            self.catalog.connection()
            .execute(
                "SELECT study_uid, max(study_date) AS date, max(modality=?) FROM dicom_instances "
                "WHERE patient_id=? AND problem IS NULL AND study_uid != '' GROUP BY study_uid "
                "HAVING length(date) = 8 AND date < (SELECT max(study_date) FROM "
                "dicom_instances WHERE study_uid=? AND problem IS NULL) "
                "ORDER BY 3 DESC, 2 DESC LIMIT ?",
                (modality, patient_id, study_uid, count),
            )
            .fetchall()
        )
        return [row[0] for row in rows]

    def select_objects(self, selector: dict[str, str]) -> list[ObjectRef]:
        """The current object versions a selector names (see ``selector_sql``)."""
        db = self.catalog.connection()
        if "path" in selector:
            if len(selector) > 1:
                raise ValueError("a path selects files, not studies: give --path alone")
            prefix = selector["path"].strip("/")
            rows = db.execute(
                "SELECT key, etag, size FROM nodes WHERE is_dir=0 AND dirty=0 "
                "AND etag IS NOT NULL AND (key=? OR substr(key, 1, ?)=?)",
                (prefix, len(prefix) + 1, prefix + "/"),
            ).fetchall()
        else:
            where, args = selector_sql(selector)
            rows = db.execute(
                "SELECT n.key, n.etag, n.size FROM dicom_instances d "
                "JOIN nodes n ON n.key = d.key AND n.etag = d.etag "
                f"WHERE d.problem IS NULL AND {where} "
                "ORDER BY d.study_date DESC, d.study_uid, d.series_number, d.instance_number",
                args,
            ).fetchall()
        return [ObjectRef(*row) for row in rows]

    def studies(self, selector: dict[str, str], limit: int) -> list[dict[str, object]]:
        """One summary row per study matching the selector, newest first."""
        where, args = selector_sql(selector)
        rows = (
            self.catalog.connection()
            .execute(
                "SELECT patient_id, max(patient_name), study_uid, max(study_date), "
                "max(study_time), max(accession), max(study_description), "
                "group_concat(DISTINCT modality), count(DISTINCT series_uid), "
                "count(DISTINCT sop_uid), "
                "total(size) FROM dicom_instances d "
                f"WHERE problem IS NULL AND study_uid != '' AND {where} "
                "GROUP BY study_uid ORDER BY 4 DESC, 3 LIMIT ?",
                (*args, limit),
            )
            .fetchall()
        )
        names = (
            "patient_id", "patient_name", "study_uid", "study_date", "study_time", "accession",
            "description", "modalities", "series", "instances", "bytes",
        )  # fmt: skip
        return [dict(zip(names, row, strict=True)) for row in rows]

    def progress(self) -> dict[str, int]:
        db = self.catalog.connection()
        objects = db.execute("SELECT count(*) FROM nodes WHERE is_dir=0 AND size > 0").fetchone()[0]
        indexed, dicom, studies, series, patients = db.execute(
            "SELECT count(*), count(*) FILTER (WHERE problem IS NULL), "
            "count(DISTINCT study_uid) FILTER (WHERE problem IS NULL AND study_uid != ''), "
            "count(DISTINCT series_uid) FILTER (WHERE problem IS NULL AND series_uid != ''), "
            "count(DISTINCT patient_id) FILTER (WHERE problem IS NULL) "
            "FROM dicom_instances d JOIN nodes n ON n.key = d.key AND n.etag = d.etag"
        ).fetchone()
        placed = db.execute(
            "SELECT count(*) FROM view_nodes WHERE target IS NOT NULL AND parent IN "
            "(SELECT id FROM view_nodes WHERE parent IN (SELECT id FROM view_nodes WHERE "
            "parent IN (SELECT id FROM view_nodes WHERE parent=?)))",
            (BY_PATIENT,),
        ).fetchone()[0]
        return {
            "objects": objects,
            "indexed": indexed,
            "pending": max(objects - indexed, 0),
            "dicom": dicom,
            "not_dicom": indexed - dicom,
            "placed_in_view": placed,
            "patients": patients,
            "studies": studies,
            "series": series,
        }

    # -- pins ------------------------------------------------------------------------------

    def pins(self) -> list[str]:
        rows = self.catalog.connection().execute("SELECT selector FROM pins ORDER BY created")
        return [row[0] for row in rows]

    def add_pin(self, selector: str) -> None:
        with self.catalog.transaction(nodes=False) as db:
            db.execute("INSERT OR IGNORE INTO pins VALUES (?, ?)", (selector, time.time()))

    def remove_pin(self, selector: str) -> bool:
        with self.catalog.transaction(nodes=False) as db:
            return db.execute("DELETE FROM pins WHERE selector=?", (selector,)).rowcount > 0


SELECTOR_KEYS = ("patient", "study", "path", "from", "to", "modality")


def selector_sql(selector: dict[str, str]) -> tuple[str, list[object]]:
    """SQL over ``dicom_instances`` for a selector: patient ID, study UID, StudyDate range
    (``from``/``to``, YYYYMMDD, inclusive) and modality, all optional and combined."""
    if selector.get("path"):
        raise ValueError("a path selects files, not studies: give --path alone")
    clauses: list[str] = []
    args: list[object] = []
    for name, column, operator in (
        ("patient", "patient_id", "="),
        ("study", "study_uid", "="),
        ("modality", "modality", "="),
        ("from", "study_date", ">="),
        ("to", "study_date", "<="),
    ):
        if selector.get(name):
            clauses.append(f"d.{column} {operator} ?")
            args.append(selector[name])
    if selector.get("from") or selector.get("to"):
        clauses.append("length(d.study_date) = 8")
    return (" AND ".join(clauses) or "1"), args
