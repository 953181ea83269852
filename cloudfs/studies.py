"""DICOM work of a mount: the background header indexer, study prefetch, pins and tiering.

* Indexing reads the first bytes of each pending object (``dicom.HEADER_PROBE``; more only if the
  header is longer) with one ranged GET that does not fill the block cache, or from the cache when
  the object's first block is there already, as it is for files written through the mount.
* Study prefetch: when an indexed instance is opened, the rest of its series is fetched nearest
  first in both directions, then the other series of the study, then the patient's most recent
  prior studies (dated before it).  A study that first appears through the write path has its
  priors fetched the same way.  Every open of another instance of the study re-centres what is
  still queued.  It fetches through the read path's read-ahead (read-ahead's share of the fetch
  threads and its memory budget), so foreground reads never queue behind it, and
  ``prefetch_threads`` instances at a time.  At most ``_ACTIVE_STUDIES`` studies are prefetched
  at once; opening another drops the oldest.  ``study_prefetch`` off stops both triggers.
* Pins: stored selectors (patient, study, path, date range) plus the tiering window (studies of the
  last ``keep_recent_days`` days) name a set of objects whose blocks the cache never evicts; they
  are fetched ahead of time.  A pin that would take more than ``pin_fraction`` of the cache is
  refused.

Trio side only: tables of jobs and pins are changed on the trio thread; SQLite and the store are
called in worker threads with immutable arguments.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import count
from typing import Any

import trio

from .cache import BlockCache, BlockId
from .config import DicomOptions, format_size
from .dicom import HEADER_LIMIT, HEADER_PROBE, Header, NeedMore, NotDicom, parse_header
from .dicom_index import SELECTOR_KEYS, DicomIndex, Instance, ObjectRef, Pending
from .errors import CloudfsError, contained
from .reader import BlockReader, ObjectVersion
from .store import ObjectStore

log = logging.getLogger(__name__)

_BATCH = 256
"""Headers read per round before their rows are written in one transaction."""
_IDLE_PERIOD = 300.0
"""Seconds between looks for pending objects when nothing woke the indexer."""
_FAILURE_PAUSE = 30.0
"""Seconds to wait after a round in which every header read failed (the store is down)."""
_ACTIVE_STUDIES = 2
"""Studies prefetched at once: the one being read and the one opened before it."""
_FINISHED_MEMORY = 600.0
"""Seconds a study prefetched to the end is not looked at again on the next open."""
_TIERING_PERIOD = 3600.0
"""Seconds between re-evaluations of the pins (the date window moves, new studies arrive)."""
_QUIET_STEP = 0.05
"""Seconds the indexer waits at a time while the mount is busy with requests."""
_MAX_YIELD = 2.0
"""Longest one header read waits for a quiet moment: under constant load indexing still moves,
``index_threads`` headers every this many seconds."""


def _blocks(obj: ObjectRef, block_size: int) -> list[BlockId]:
    return [BlockId(obj.key, obj.etag, n) for n in range(-(-obj.size // block_size))]


def _around(series: list[Instance], position: int) -> list[Instance]:
    """A series in the order a radiologist scrolling from ``position`` needs it: the next
    image, the one before, two ahead, two back, and so on."""
    order = []
    for distance in range(1, len(series)):
        for index in (position + distance, position - distance):
            if 0 <= index < len(series):
                order.append(series[index])
    return order


@dataclass
class _Job:
    """A study (and its priors) being made local."""

    study_uid: str
    queue: list[Instance]
    total: int
    bytes_total: int
    done: int = 0
    fetched_bytes: int = 0
    failed: int = 0
    cancelled: bool = False
    finished: trio.Event = field(default_factory=trio.Event)

    def recentre(self, instance: Instance) -> None:
        """Queue the rest of ``instance``'s series around it first, the rest after."""
        series = [
            i for i in self.queue if i.series_uid == instance.series_uid and i.key != instance.key
        ]
        if not series:
            return
        ordered = sorted([*series, instance], key=_viewing_order)
        position = ordered.index(instance)
        rest = [i for i in self.queue if i.series_uid != instance.series_uid]
        self.queue = _around(ordered, position) + rest


def _viewing_order(instance: Instance) -> tuple[int, str]:
    number = instance.instance_number
    return (number if number is not None else 1 << 31, instance.key)


@dataclass
class _Transfer:
    """An explicit ``cloudfs prefetch``: progress the command line polls."""

    number: int
    files: int
    bytes_total: int
    started: float = field(default_factory=time.monotonic)
    files_done: int = 0
    bytes_done: int = 0
    fetched_bytes: int = 0
    failed: int = 0
    finished: bool = False
    last_error: str = ""


class Studies:
    def __init__(
        self,
        options: DicomOptions,
        index: DicomIndex,
        store: ObjectStore,
        cache: BlockCache,
        reader: BlockReader,
        busy: Callable[[], bool] = lambda: False,
    ) -> None:
        """``busy``: whether the mount is answering requests right now; header reads wait for
        a quiet moment (up to ``_MAX_YIELD``), so indexing a large new bucket does not slow the
        listings and reads of the people using the mount."""
        self.options = options
        self._busy = busy
        self.index = index
        self.store = store
        self.cache = cache
        self.reader = reader
        self._db_threads = trio.CapacityLimiter(2)
        self._header_threads = trio.CapacityLimiter(options.index_threads)
        self._fetch_slots = trio.CapacityLimiter(options.prefetch_threads)
        self._wanted = trio.Event()
        self._jobs: OrderedDict[str, _Job] = OrderedDict()
        self._job_of: dict[str, tuple[_Job, Instance]] = {}
        self._finished: dict[str, float] = {}
        self._looking: set[str] = set()
        self._pinned: dict[str, ObjectRef] = {}
        self._pin_lock = trio.Lock()
        self._transfers: dict[int, _Transfer] = {}
        self._next_transfer = count(1)
        self._nursery: trio.Nursery | None = None
        self.headers_read = 0
        self.header_bytes = 0
        self.read_failures = 0
        self.prefetched_studies = 0
        self.last_error = ""

    async def _db(self, function: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(function, *args, limiter=self._db_threads)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.options.index:
                nursery.start_soon(self._indexer)
            nursery.start_soon(self._tiering)

    def wake(self) -> None:
        """New objects may be pending (a relist or an upload finished)."""
        self._wanted.set()

    # -- indexing --------------------------------------------------------------------------

    async def _indexer(self) -> None:
        """Index pending objects round after round; a round that fails (a full disk refuses
        its rows) is tried again after a pause, never ending the mount."""
        while True:
            try:
                indexed = await self._index_round()
            except Exception as exc:
                log.warning(
                    "indexing DICOM headers failed: %s; retried in %.0fs", exc, _FAILURE_PAUSE
                )
                self.last_error = str(exc)
                indexed = False
            if not indexed:
                await trio.sleep(_FAILURE_PAUSE)

    async def _index_round(self) -> bool:
        """Read and record the headers of a batch of pending objects (after waiting for some if
        there are none); False if every read failed (the store is down)."""
        batch: list[Pending] = await self._db(self.index.pending, _BATCH)
        if not batch:
            with trio.move_on_after(_IDLE_PERIOD):
                await self._wanted.wait()
            self._wanted = trio.Event()
            return True
        results: list[tuple[Pending, Any, bool]] = []
        queue = iter(batch)
        # index_threads tasks share the batch, so only they look at the clock while waiting.
        async with trio.open_nursery() as nursery:
            for _ in range(self.options.index_threads):
                nursery.start_soon(self._read_some, queue, results)
        if not results:
            return False
        new, local = await self._db(self.index.record, results)
        # A study just written through the mount is local; its priors are what a reader of it
        # will want next.  Study prefetch off means no fetch that nobody asked for.
        if local and self.options.study_prefetch and self.options.priors:
            for study_uid in local:
                self._start_study(study_uid, None)
        if new and (self._pinned or self.options.keep_recent_days):
            await self.apply_pins()
        return True

    async def _read_some(
        self, queue: Iterator[Pending], results: list[tuple[Pending, Any, bool]]
    ) -> None:
        """Read headers from ``queue`` until it is empty, each after a quiet moment or, under
        constant load, ``_MAX_YIELD`` after the last: then this task reads one header every
        ``_MAX_YIELD`` seconds, which never competes with the requests for long (a deadline per
        batch let the rest of the batch run at full speed through a listing)."""
        for item in queue:
            yield_until = trio.current_time() + _MAX_YIELD
            while self._busy() and trio.current_time() < yield_until:
                await trio.sleep(_QUIET_STEP)
            await self._read_one(item, results)

    async def _read_one(self, item: Pending, results: list[tuple[Pending, Any, bool]]) -> None:
        try:
            outcome, read = await trio.to_thread.run_sync(
                self._header, item, limiter=self._header_threads, abandon_on_cancel=True
            )
            self.header_bytes += read
        except CloudfsError as exc:
            self.read_failures += 1
            if self.last_error != str(exc):
                log.warning("cannot read the header of %s: %s (retried later)", item.key, exc)
            self.last_error = str(exc)
            return
        self.headers_read += 1
        results.append((item, outcome, item.local))

    def _header(self, item: Pending) -> tuple[Header | str, int]:
        """Worker thread: the Header of ``item`` or why it is not DICOM, and the bytes GET."""
        first_block = min(item.size, self.cache.block_size)
        wanted, read = min(item.size, HEADER_PROBE), 0
        data = b""
        while True:
            if len(data) < wanted and wanted <= first_block:
                # Only the pieces the header lies in: a file just written is in the cache.
                cached = self.cache.get_range(
                    BlockId(item.key, item.etag, 0), 0, wanted, first_block
                )
                data = bytes(cached) if cached is not None else data
            if len(data) < wanted:
                data = self.store.get_range(item.key, 0, wanted, item.etag)
                read += len(data)
            try:
                return parse_header(data, item.size), read
            except NeedMore as more:
                if more.wanted <= len(data) or len(data) >= HEADER_LIMIT:
                    return f"header longer than {format_size(HEADER_LIMIT)}", read
                wanted = min(more.wanted, item.size, HEADER_LIMIT)
            except NotDicom as exc:
                return str(exc), read

    # -- study prefetch --------------------------------------------------------------------

    def opened(self, key: str) -> None:
        """An object was opened for reading: prefetch its study if it is an indexed instance."""
        if not self.options.study_prefetch or self._nursery is None:
            return
        known = self._job_of.get(key)
        if known is not None:
            job, instance = known
            if not job.cancelled:
                job.recentre(instance)
                self._jobs.move_to_end(job.study_uid)
            return
        if key not in self._looking:
            self._looking.add(key)
            self._nursery.start_soon(
                contained, f"looking up {key} in the index", self._look_up, key
            )

    async def _look_up(self, key: str) -> None:
        try:
            instance: Instance | None = await self._db(self.index.instance, key)
        finally:
            self._looking.discard(key)
        if instance is not None and instance.study_uid:
            self._start_study(instance.study_uid, instance)

    def _start_study(self, study_uid: str, opened: Instance | None) -> None:
        running = self._jobs.get(study_uid)
        if running is not None:
            # An instance fetched already was opened: the reader moved, so does the queue.
            if opened is not None:
                running.recentre(opened)
                self._jobs.move_to_end(study_uid)
            return
        finished = self._finished.get(study_uid)
        if finished and time.monotonic() - finished < _FINISHED_MEMORY:
            return
        assert self._nursery is not None
        # Registered before its instances are known, so the next open of the study waits.
        job = _Job(study_uid, [], 0, 0)
        self._jobs[study_uid] = job
        while len(self._jobs) > _ACTIVE_STUDIES:
            _, oldest = self._jobs.popitem(last=False)
            oldest.cancelled = True
        self._nursery.start_soon(
            contained, f"prefetch of study {study_uid}", self._prefetch_study, job, opened
        )

    async def _prefetch_study(self, job: _Job, opened: Instance | None) -> None:
        try:
            instances: list[Instance] = await self._db(self.index.study_instances, job.study_uid)
            size = sum(i.size for i in instances)
            if size > self.options.max_study_size or size > self.cache.size_limit // 2:
                log.info(
                    "study %s is %s: larger than study prefetch takes; read on demand",
                    job.study_uid,
                    format_size(size),
                )
                return
            queue = [i for i in instances if opened is None or i.key != opened.key]
            room = min(self.options.max_study_size, self.cache.size_limit // 2) - size
            for prior in await self._priors(instances):
                more: list[Instance] = await self._db(self.index.study_instances, prior)
                if sum(i.size for i in more) > room:
                    continue  # too large to take along: read on demand if it is opened
                room -= sum(i.size for i in more)
                queue.extend(more)
            job.queue, job.total = queue, len(queue)
            job.bytes_total = sum(i.size for i in queue)
            if opened is not None:
                job.recentre(opened)
            for instance in queue:
                self._job_of[instance.key] = (job, instance)
            async with trio.open_nursery() as nursery:
                for _ in range(self.options.prefetch_threads):
                    nursery.start_soon(self._work, job)
            if not job.cancelled:
                self.prefetched_studies += 1
                self._finished[job.study_uid] = time.monotonic()
                log.info(
                    "study %s local: %d instances, %s fetched, %d failed",
                    job.study_uid,
                    job.done,
                    format_size(job.fetched_bytes),
                    job.failed,
                )
        finally:
            job.finished.set()
            if self._jobs.get(job.study_uid) is job:
                del self._jobs[job.study_uid]
            for instance in job.queue:
                self._job_of.pop(instance.key, None)
            stale = [k for k, (j, _) in self._job_of.items() if j is job]
            for key in stale:
                del self._job_of[key]

    async def _priors(self, instances: list[Instance]) -> list[str]:
        if not self.options.priors or not instances:
            return []
        first = instances[0]
        priors: list[str] = await self._db(
            self.index.priors, first.study_uid, first.patient_id, first.modality,
            self.options.priors,
        )  # fmt: skip
        return priors

    async def _work(self, job: _Job) -> None:
        while job.queue and not job.cancelled:
            instance = job.queue.pop(0)
            self._job_of.pop(instance.key, None)
            async with self._fetch_slots:
                fetched = await self._fetch(instance)
            job.fetched_bytes += fetched  # after the await: other workers add meanwhile
            job.done += 1

    async def _fetch(self, obj: ObjectRef | Instance) -> int:
        """Make one object local; 0 if it was, or if its fetch failed (logged)."""
        try:
            return await self.reader.fetch_object(ObjectVersion(obj.key, obj.etag, obj.size))
        except CloudfsError as exc:
            self.read_failures += 1
            if self.last_error != str(exc):
                log.warning("prefetch of %s failed: %s", obj.key, exc)
            self.last_error = str(exc)
            return 0

    # -- pins and tiering ------------------------------------------------------------------

    def _tiering_selector(self) -> dict[str, str] | None:
        days = self.options.keep_recent_days
        if not days:
            return None
        since = time.strftime("%Y%m%d", time.gmtime(time.time() - days * 86400))
        return {"from": since}

    def _pin_limit(self) -> int:
        return int(self.cache.size_limit * self.options.pin_fraction)

    def _resolve(self, selectors: list[dict[str, str]]) -> dict[str, ObjectRef]:
        """Worker thread: the objects all selectors name together."""
        objects: dict[str, ObjectRef] = {}
        for selector in selectors:
            for obj in self.index.select_objects(selector):
                objects.setdefault(obj.key, obj)
        return objects

    def _stored_selectors(self) -> list[dict[str, str]]:
        return [json.loads(text) for text in self.index.pins()]

    async def pin(self, selector: dict[str, str]) -> dict[str, Any]:
        """Pin what ``selector`` names, unless the pins would outgrow their share of the cache."""
        text = _selector_text(selector)
        async with self._pin_lock:
            stored = await self._db(self._stored_selectors)
            wanted: dict[str, ObjectRef] = await self._db(self._resolve, [*stored, selector])
            if not await self._db(self._resolve, [selector]):
                raise ValueError(f"nothing matches {text}")
            total = sum(obj.size for obj in wanted.values())
            if total > self._pin_limit():
                raise ValueError(
                    f"pinning {text} would pin {format_size(total)} in all, more than the "
                    f"{format_size(self._pin_limit())} pins may take "
                    f"({self.options.pin_fraction:.0%} of the {format_size(self.cache.size_limit)}"
                    " cache): pin less, or give the cache more room (--cache-size)",
                )
            await self._db(self.index.add_pin, text)
        return await self.apply_pins()

    async def unpin(self, selector: dict[str, str]) -> dict[str, Any]:
        text = _selector_text(selector)
        if not await self._db(self.index.remove_pin, text):
            raise ValueError(f"no pin {text}; `cloudfs pins` lists them")
        return await self.apply_pins()

    async def apply_pins(self) -> dict[str, Any]:
        """Make the cache's pinned set match the stored pins and the tiering window, then fetch
        what is pinned but not yet local in the background."""
        async with self._pin_lock:
            selectors = await self._db(self._stored_selectors)
            tiering = self._tiering_selector()
            objects: dict[str, ObjectRef] = await self._db(self._resolve, selectors)
            if tiering is not None:
                recent = await self._db(self._resolve, [tiering])
                room = self._pin_limit() - sum(obj.size for obj in objects.values())
                for key, obj in recent.items():  # newest studies first
                    if key in objects:
                        continue
                    if obj.size > room:
                        log.warning(
                            "recent studies do not all fit in the pinned share of the cache; "
                            "older ones stay on demand"
                        )
                        break
                    objects[key] = obj
                    room -= obj.size
            previous, self._pinned = self._pinned, objects
            dropped = [obj for key, obj in previous.items() if objects.get(key) != obj]
            # Only what is new to the pinned set: the rest is pinned and fetched already.
            added = [obj for key, obj in objects.items() if previous.get(key) != obj]
            block_size = self.cache.block_size

            def update() -> None:
                self.cache.pin_keys(set(objects))
                self.cache.unpin(b for obj in dropped for b in _blocks(obj, block_size))
                self.cache.pin(b for obj in added for b in _blocks(obj, block_size))

            await self._db(update)
        if added and self._nursery is not None:
            self._nursery.start_soon(
                self._transfer, added, _Transfer(number=0, files=len(added), bytes_total=0)
            )
        return {
            "pins": selectors,
            "pinned_files": len(objects),
            "pinned_bytes": sum(obj.size for obj in objects.values()),
            "limit": self._pin_limit(),
        }

    async def _tiering(self) -> None:
        while True:
            if self.options.keep_recent_days or await self._db(self.index.pins):
                try:
                    await self.apply_pins()
                except Exception:
                    log.exception("applying pins failed")
            await trio.sleep(_TIERING_PERIOD)

    async def pins(self) -> dict[str, Any]:
        selectors = await self._db(self._stored_selectors)
        return {
            "pins": selectors,
            "tiering": self._tiering_selector(),
            "pinned_files": len(self._pinned),
            "pinned_bytes": sum(obj.size for obj in self._pinned.values()),
            "pinned_in_cache": await self._db(self.cache.pinned_volume),
            "limit": self._pin_limit(),
        }

    # -- explicit prefetch -----------------------------------------------------------------

    async def prefetch(self, selector: dict[str, str]) -> dict[str, Any]:
        """Start fetching what ``selector`` names; returns the id to poll progress with."""
        objects: dict[str, ObjectRef] = await self._db(self._resolve, [selector])
        if not objects:
            raise ValueError(f"nothing matches {_selector_text(selector)}")
        total = sum(obj.size for obj in objects.values())
        if total > self.cache.size_limit:
            raise ValueError(
                f"{_selector_text(selector)} is {format_size(total)}, more than the whole cache "
                f"({format_size(self.cache.size_limit)})",
            )
        number = next(self._next_transfer)
        transfer = _Transfer(number, len(objects), total)
        self._transfers[number] = transfer
        assert self._nursery is not None
        self._nursery.start_soon(self._transfer, list(objects.values()), transfer)
        return self._progress(transfer)

    async def _transfer(self, objects: list[ObjectRef], transfer: _Transfer) -> None:
        queue = objects[::-1]

        async def worker() -> None:
            while queue:
                obj = queue.pop()
                async with self._fetch_slots:
                    before = self.read_failures
                    fetched = await self._fetch(obj)
                    transfer.fetched_bytes += fetched  # after the await, never across it
                    if self.read_failures != before:
                        transfer.failed += 1
                        transfer.last_error = self.last_error
                transfer.files_done += 1
                transfer.bytes_done += obj.size

        async with trio.open_nursery() as nursery:
            for _ in range(self.options.prefetch_threads):
                nursery.start_soon(worker)
        transfer.finished = True

    def prefetch_progress(self, number: int) -> dict[str, Any]:
        transfer = self._transfers.get(number)
        if transfer is None:
            raise ValueError(f"no prefetch {number}")
        return self._progress(transfer)

    @staticmethod
    def _progress(transfer: _Transfer) -> dict[str, Any]:
        return {
            "id": transfer.number,
            "files": transfer.files,
            "bytes": transfer.bytes_total,
            "files_done": transfer.files_done,
            "bytes_done": transfer.bytes_done,
            "fetched_bytes": transfer.fetched_bytes,
            "failed": transfer.failed,
            "seconds": time.monotonic() - transfer.started,
            "finished": transfer.finished,
            "last_error": transfer.last_error,
        }

    # -- status ----------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        progress: dict[str, Any] = await self._db(self.index.progress)
        progress.update(
            headers_read=self.headers_read,
            header_bytes=self.header_bytes,
            read_failures=self.read_failures,
            studies_prefetched=self.prefetched_studies,
            studies_prefetching=[
                {"study": job.study_uid, "done": job.done, "total": job.total}
                for job in self._jobs.values()
            ],
            last_error=self.last_error,
        )
        return progress


def _selector_text(selector: dict[str, str]) -> str:
    """The canonical form a pin is stored and named by."""
    unknown = set(selector) - set(SELECTOR_KEYS)
    if unknown or not any(selector.values()):
        raise ValueError(f"a selector takes {', '.join(SELECTOR_KEYS)}")
    return json.dumps({k: v for k, v in sorted(selector.items()) if v}, sort_keys=True)
