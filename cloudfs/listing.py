"""The first listing of a store, made while the mount already answers.

A first mount used to list the whole store before answering: an archive of tens of millions of
objects kept the mount (and the PACS writing to it) waiting for hours.  Now the mount answers at
once and the listing fills the catalog in the background, a batch of keys at a time.

A store lists its keys in order, so the catalog is complete for every key up to the last one
cataloged (``cursor``).  A directory whose key prefix lies wholly before the cursor is known in
full: it is listed, and a name missing from it does not exist.  A request that needs to know more
(a lookup that finds nothing, a listing of a directory the cursor has not passed) waits until the
cursor passes, for at most ``wait`` seconds, then fails with EAGAIN ("try again") and one log
line.  Answering "no such file" early instead would let a writer create a name that already
exists in the store and overwrite that object at upload.

The listing itself is the catalog's ordinary sync of a first listing: every batch records how far
it got, so a listing interrupted by a crash or an outage goes on from there, and local changes made
through the mount meanwhile win over it as they do over any relist.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from .catalog import Catalog, SyncReport
from .errors import CloudfsError
from .store import ObjectStore
from .systemd import notify

log = logging.getLogger(__name__)

PROGRESS_PERIOD = 10.0
"""Seconds between progress reports of a first listing (log line, systemd status)."""
RETRY_PAUSE = 30.0
"""Seconds before a first listing that failed (the store is down) goes on from its last batch."""
WAIT = 60.0
"""Longest a request waits for the first listing to reach the names it needs before EAGAIN."""
_WARNING_PERIOD = 60.0
"""Seconds between log lines about requests refused while the first listing runs."""


def passed(cursor: str, prefix: str) -> bool:
    """Whether a listing in key order that has reached ``cursor`` has listed every key starting
    with ``prefix``: such keys sort together, and a key after them all sorts after ``prefix``
    without starting with it.  Never true of the empty prefix: only the end of the listing
    says the root is complete."""
    return cursor > prefix and not cursor.startswith(prefix)


class FirstListing:
    """How far the first listing has got, for the trio thread: requests wait here for it."""

    def __init__(
        self,
        running: bool,
        cursor: str = "",
        objects: int = 0,
        wait: float = WAIT,
        moved: Callable[[], None] = lambda: None,
    ) -> None:
        """``cursor``: where an earlier, interrupted attempt got to, and ``objects`` how many it
        cataloged; ``moved``: called after each batch cataloged and when the listing ends."""
        self.running = running
        """False once the catalog holds a complete listing (at once, for any later mount)."""
        self.cursor = cursor
        """The last key cataloged so far, in the store's (and Python's) key order."""
        self.objects = objects
        """Objects the first listing has cataloged so far, those of an attempt a restart
        interrupted included: the progress a status shows never starts over."""
        self.batches = 0
        """Batches cataloged so far: a request that looked in the catalog knows from this
        whether a batch has landed since."""
        self.wait = wait
        self._moved = trio.lowlevel.ParkingLot()
        self._on_move = moved
        self._warned_at = 0.0

    def listed(self, prefix: str) -> bool:
        """Whether the catalog holds every key starting with ``prefix``."""
        return not self.running or passed(self.cursor, prefix)

    async def moved(self) -> None:
        """Until the next batch is cataloged, or the listing ends."""
        await self._moved.park()

    def refused(self, what: str) -> None:
        """Log (at most once a minute) that a request gave up waiting for the listing."""
        now = time.monotonic()
        if now - self._warned_at >= _WARNING_PERIOD:
            self._warned_at = now
            log.warning(
                "%s: not listed yet (the first listing of the store is at %r); try again later",
                what,
                self.cursor,
            )

    def advance(self, report: SyncReport, earlier: int = 0) -> None:
        """Take the progress of a batch the catalog has committed; ``earlier``: objects this
        daemon's failed attempts cataloged before the one ``report`` counts."""
        self.cursor = report.listed_up_to
        self.objects = earlier + report.added
        self.batches += 1
        self._moved.unpark_all()
        self._on_move()

    def finish(self) -> None:
        self.running = False
        self._moved.unpark_all()
        self._on_move()


def list_into_catalog(
    store: ObjectStore,
    catalog: Catalog,
    on_batch: Callable[[SyncReport], None],
    earlier: int = 0,
) -> SyncReport:
    """Blocking: list the store into the catalog after the last key an earlier attempt
    cataloged, calling ``on_batch`` after each batch it commits; raises the store's error if
    the listing fails part way (the batches done stay).  ``earlier``: objects cataloged by
    earlier attempts, counted in the progress reports so they never go backwards."""
    after = catalog.listing_checkpoint()
    if after:
        log.info("first listing of %s goes on after %r", store.describe(), after)
    else:
        log.info("first mount of %s: listing the store into the catalog", store.describe())
    reported = time.monotonic()

    def progress(report: SyncReport) -> None:
        nonlocal reported
        on_batch(report)
        if time.monotonic() - reported < PROGRESS_PERIOD:
            return
        reported = time.monotonic()
        done = f"{earlier + report.added} objects added to the catalog so far"
        log.info("listing %s: %s", store.describe(), done)
        notify(f"STATUS=listing the store: {done}")

    return catalog.sync(store.list(after), resume=after, progress=progress)


async def run_first_listing(
    store: ObjectStore, catalog: Catalog, listing: FirstListing
) -> SyncReport:
    """List the store into the catalog in a worker thread, going on after every failure from
    the last batch cataloged, until the listing is complete; ``listing`` follows each batch."""
    token = trio.lowlevel.current_trio_token()
    started = time.monotonic()
    before = listing.objects  # what an attempt before a restart cataloged
    while True:
        earlier = listing.objects

        def on_batch(report: SyncReport, earlier: int = earlier) -> None:
            trio.from_thread.run_sync(listing.advance, report, earlier, trio_token=token)

        try:
            report: SyncReport = await trio.to_thread.run_sync(
                list_into_catalog, store, catalog, on_batch, earlier, abandon_on_cancel=True
            )
        except CloudfsError as exc:
            log.warning(
                "first listing of %s failed: %s; going on from its last batch in %.0fs",
                store.describe(),
                exc,
                RETRY_PAUSE,
            )
        except Exception:  # a bug or a full disk must not take the mount down with it
            log.exception("first listing of %s failed", store.describe())
        else:
            listing.finish()
            log.info(
                "catalog ready: %d objects listed, %d of them in %.1fs by this run; %d keys not "
                "mappable",
                listing.objects,
                listing.objects - before,
                time.monotonic() - started,
                report.rejected,
            )
            notify(f"STATUS=catalog ready: {listing.objects} objects listed")
            return report
        await trio.sleep(RETRY_PAUSE)
