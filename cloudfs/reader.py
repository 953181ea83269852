"""The read path: serves byte ranges of object versions from memory, the disk cache or the store.

Order of lookup for each block: a small in-memory tier of recent blocks (the kernel sends several
requests per block; see ``_remember`` for what it evicts first), then the disk cache (in a worker
thread), then a ranged GET.  Missing neighbouring blocks are fetched with one GET; small objects
are fetched whole.

Invariants (see docs/design.md):

* Single flight: a block being fetched, or loaded from disk ahead of a sequential reader, has one
  ``_Pending`` in ``_inflight``; every reader of it waits on that instead of doing the work again.
  Blocks fetched recently are remembered in ``_landed``, so read-ahead never fetches them twice.
* Foreground reads never wait behind read-ahead: read-ahead has its own memory budget, may hold
  at most half of the ``fetch_threads`` GETs, and registers its blocks as in flight only once it
  holds its budget.  All GETs together never exceed ``fetch_threads``.
* Read-ahead never evicts the blocks it is about to serve: the bytes it fetched that no read has
  asked for yet and a reader may still ask for (the ledger's awaited bytes, and those in flight)
  stay within ``UNREAD_AHEAD_SHARE`` of the cache.
* Memory: in-flight bytes are bounded by the foreground and read-ahead budgets and resident blocks
  by ``memory_blocks``, whatever the number of open files.
* Worker threads see only immutable values (keys, ranges, bytes); ``_memory``, ``_inflight``,
  ``_landed`` and the counters are touched only on the trio thread.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .cache import BlockCache, BlockId
from .config import CacheOptions
from .errors import CloudfsError, Interrupted, Unavailable
from .prefetch import Cancelled, PrefetchLedger
from .store import ObjectStore

log = logging.getLogger(__name__)

RECENCY_PERIOD = 2.0
"""Seconds between recency updates of the disk cache: late enough to batch thousands of reads
into one transaction, early enough that eviction never sees a stale order for long."""

HEDGE_BEHIND = 3
"""Blocks still to arrive before a read's block in a read-ahead GET beyond which the read sends a
GET of its own for that block.  Over a WAN link capped per connection (50 MB/s), the tail of an
8 MiB read-ahead GET comes 140 ms after its head, where a GET of one block costs a round trip and
one block (40 ms): a reader jumping into that tail should not wait for all that comes before."""

RESENDS = 3
"""Times a GET whose reply was cut short (a connection dropped mid-body) is sent again for the
blocks still missing, before its readers get EIO."""

_LANDED_MEMORY = 4096
"""Recently fetched blocks remembered by identity only, so read-ahead never fetches twice a block
that a foreground read fetched while read-ahead waited for its budget."""

UNREAD_AHEAD_SHARE = 0.5
"""Share of the cache that read-ahead may fill with blocks no read has asked for yet, across all
open files (the per-file guard, a cache of four windows, says nothing of many files at once):
past it, read-ahead skips its plan and the reader fetches those blocks when it gets there.  The
other half holds the blocks readers are using now, which the LRU keeps as recent.  Blocks of
files closed unread stop counting, so files read only in part do not hold read-ahead back."""

WARM_AHEAD = 16
"""Blocks just ahead of a sequential reader that are loaded from the disk cache into memory, so
its next requests are memory hits; blocks farther ahead only need to be on disk."""

WARM_BATCH = 4
"""Blocks loaded per worker-thread call: a thread hop per block costs the trio thread more than
the read itself when the cache files are in the page cache."""


@dataclass(frozen=True, slots=True)
class ObjectVersion:
    """The object an open file reads: pinned to the ETag it had when opened."""

    key: str
    etag: str
    size: int
    backup: bool = False
    """Opened by a backup program: the blocks its reads bring into the disk cache go first,
    and its reads do not make cached blocks recent (see ``cache``)."""

    def block(self, index: int) -> BlockId:
        return BlockId(self.key, self.etag, index)


_NO_LIMIT = contextlib.nullcontext()
"""Stands in for the read-ahead thread share around a foreground GET."""


@dataclass
class ReadStats:
    memory_hits: int = 0
    disk_hits: int = 0
    fetched_blocks: int = 0
    prefetched_blocks: int = 0
    fetched_bytes: int = 0
    requests: int = 0
    requests_in_flight: int = 0
    errors: int = 0
    last_error: str = ""
    prefetched_bytes: int = 0
    errors_by_kind: Counter[str] = field(default_factory=Counter)
    """Failed fetches by error class (Unavailable, StaleObject, ...), for the metrics."""


def _held(start: int, end: int) -> int:
    """Memory a GET of ``[start, end)`` may hold at its peak, counted with room: its blocks,
    which its entries keep until it ends, and as much again for the connection's buffers and
    the joins of readers whose requests span several of its blocks."""
    return 2 * (end - start)


class ByteBudget:
    """A semaphore counted in bytes.  A request larger than the whole budget still proceeds alone,
    so an odd size can never deadlock."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lot = trio.lowlevel.ParkingLot()

    async def acquire(self, amount: int) -> None:
        while self.used and self.used + amount > self.limit:
            await self._lot.park()
        self.used += amount

    def release(self, amount: int) -> None:
        self.used -= amount
        self._lot.unpark_all()


@dataclass
class _Get:
    """One ranged GET in flight: its blocks arrive in order."""

    ahead: bool
    arrived: int = 0


@dataclass
class _Pending:
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | memoryview | None = None
    error: CloudfsError | None = None
    from_disk: bool = False
    """A warm-up load: it may find nothing, so read-ahead still fetches the block."""
    get: _Get | None = None
    """The GET bringing the block, with ``position`` its place in it (None: a warm-up load)."""
    position: int = 0

    def far_back(self) -> bool:
        """Whether the block comes from a read-ahead GET with HEDGE_BEHIND blocks or more still
        to arrive before it."""
        get = self.get
        return get is not None and get.ahead and self.position - get.arrived >= HEDGE_BEHIND


class _Batch:
    """The GETs of a whole object, counted for a caller that waits for all of them: holding
    their ``_Pending`` entries instead would keep every block's bytes alive until the last GET
    (a whole 1 GiB object in memory)."""

    def __init__(self) -> None:
        self.running = 0
        self.fetched_bytes = 0
        self.error: CloudfsError | None = None
        self._lot = trio.lowlevel.ParkingLot()

    def started(self, start: int, end: int) -> None:
        self.running += 1
        self.fetched_bytes += end - start

    def finished(self, error: CloudfsError | None) -> None:
        self.running -= 1
        self.error = self.error or error
        self._lot.unpark_all()

    async def wait(self) -> None:
        """Until every GET started so far has ended; raises the first failure."""
        while self.running:
            await self._lot.park()
        if self.error is not None:
            raise self.error


class BlockReader:
    def __init__(self, store: ObjectStore, cache: BlockCache, options: CacheOptions) -> None:
        self.store = store
        self.cache = cache
        self.options = options
        self.block_size = cache.block_size
        self.stats = ReadStats()
        self.ledger = PrefetchLedger(cache.size_limit)
        self._memory: OrderedDict[BlockId, bytes | memoryview] = OrderedDict()
        self._memory_bytes = 0
        self._inflight: dict[BlockId, _Pending] = {}
        self._landed: OrderedDict[BlockId, None] = OrderedDict()
        self._fetch_threads = trio.CapacityLimiter(options.fetch_threads)
        # Taken before a fetch thread, so read-ahead always leaves half of them to readers.
        self._ahead_threads = trio.CapacityLimiter(max(options.fetch_threads // 2, 1))
        self._disk_threads = trio.CapacityLimiter(options.disk_threads)
        # Warming has threads of its own so a foreground disk lookup never queues behind it.
        self._warm_threads = trio.CapacityLimiter(options.disk_threads)
        self._demand_budget = ByteBudget(options.foreground_budget)
        self._ahead_budget = ByteBudget(options.readahead_budget)
        self._unread_limit = int(cache.size_limit * UNREAD_AHEAD_SHARE)
        self._ahead_in_flight = 0
        """Bytes of read-ahead GETs started and not landed: unread too, once they land."""
        self._nursery: trio.Nursery | None = None

    async def run(self) -> None:
        """Own the nursery that fetches outlive the request that started them in, and pass
        the cache the recency of what was read every few seconds."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            while True:
                await trio.sleep(RECENCY_PERIOD)
                await trio.to_thread.run_sync(self.cache.record_recency, limiter=self._disk_threads)

    # -- memory tier -----------------------------------------------------------------------

    def _remember(self, block: BlockId, data: bytes | memoryview, ahead: bool = False) -> None:
        """Keep ``block`` in memory, evicting blocks already read first (least recently used
        first), then blocks fetched ahead that no read has reached yet.  A block fetched ahead
        never evicts those: it stays on disk only, and is loaded when its reader comes near.
        Otherwise a reader slower than its read-ahead (a fast link) found most blocks pushed out
        by the ones landing behind them, and read nearly every block back from disk."""
        if block in self._memory:
            self._memory.move_to_end(block)
            return
        unread = self.ledger.is_unread
        while self._memory_bytes + len(data) > self.options.memory_blocks and self._memory:
            victim = next(iter(self._memory))
            if unread(victim):
                # Only then look past the least recently used block for one already read.
                victim = next((b for b in self._memory if not unread(b)), victim)
                if ahead and unread(victim):
                    return
            self._memory_bytes -= len(self._memory.pop(victim))
        self._memory[block] = data
        self._memory_bytes += len(data)

    def _recall(self, block: BlockId) -> bytes | memoryview | None:
        data = self._memory.get(block)
        if data is not None:
            self._memory.move_to_end(block)
        return data

    # -- foreground reads ------------------------------------------------------------------

    async def read(
        self, obj: ObjectVersion, offset: int, size: int, random_access: bool = False
    ) -> bytes | memoryview:
        """Bytes ``[offset, offset+size)`` of ``obj`` (short at end of file).  ``random_access``:
        the reader jumps around, so a cached block is read from disk only as far as asked."""
        end = min(offset + size, obj.size)
        if offset >= end:
            return b""
        bs = self.block_size
        first, last = offset // bs, (end - 1) // bs
        if first == last:
            block = obj.block(first)
            data = self._recall(block)
            if data is not None:
                # The hot path: no thread hop, no copy.
                self.stats.memory_hits += 1
                self.ledger.read(block)
                return memoryview(data)[offset - first * bs : end - first * bs]
            if random_access and block not in self._inflight:
                span = (offset - first * bs, end - first * bs, min(bs, obj.size - first * bs))
                part = self.cache.get_range_in_memory(block, *span, obj.backup)
                if part is None:
                    part = await trio.to_thread.run_sync(
                        self.cache.get_range, block, *span, obj.backup, limiter=self._disk_threads
                    )
                if part is not None:
                    self.stats.disk_hits += 1
                    self.ledger.read(block)
                    return part
        blocks = await self._blocks(obj, first, last)
        for index in range(first, last + 1):
            self.ledger.read(obj.block(index))
        if first == last:
            return memoryview(blocks[0])[offset - first * bs : end - first * bs]
        # Join only the requested bytes: a copy of whole blocks would double what each of many
        # concurrent readers holds.
        parts = [memoryview(block) for block in blocks]
        parts[0] = parts[0][offset - first * bs :]
        parts[-1] = parts[-1][: end - last * bs]
        return b"".join(parts)

    async def _blocks(
        self, obj: ObjectVersion, first: int, last: int, look_again: bool = True
    ) -> list[bytes | memoryview]:
        # Small objects are fetched whole: the rest of a DICOM instance is read next anyway.
        small = obj.size <= self.options.small_object
        span = range(0, math.ceil(obj.size / self.block_size)) if small else range(first, last + 1)
        found: dict[int, bytes | memoryview] = {}
        for index in span:
            data = self._recall(obj.block(index))
            if data is not None:
                found[index] = data
                self.stats.memory_hits += first <= index <= last
        wanted = [i for i in span if i not in found]
        waiting: dict[int, _Pending] = {}
        to_check = []
        for index in wanted:
            pending = self._inflight.get(obj.block(index))
            if pending is not None:
                waiting[index] = pending
            else:
                to_check.append(index)
        if to_check:
            loaded = await trio.to_thread.run_sync(
                self._load_blocks,
                [obj.block(i) for i in to_check],
                obj.backup,
                limiter=self._disk_threads,
            )
            on_disk = {
                i: data for i, data in zip(to_check, loaded, strict=True) if data is not None
            }
            self.stats.disk_hits += len(on_disk)
            for index, data in on_disk.items():
                self._remember(obj.block(index), data)
                found[index] = data
            missing, landed = [], []
            for index in to_check:
                if index in on_disk:
                    continue
                # Another reader may have fetched this block, or started to, while we looked.
                block = obj.block(index)
                pending = self._inflight.get(block)
                remembered = self._recall(block)
                if pending is not None:
                    waiting[index] = pending
                elif remembered is not None:
                    found[index] = remembered
                elif look_again and block in self._landed:
                    landed.append(index)
                else:
                    missing.append(index)
            waiting.update(self._start_fetches(obj, missing))
            for index in landed:  # on disk since our look: look again rather than fetch again
                (found[index],) = await self._blocks(obj, index, index, look_again=False)
        with trio.move_on_after(self.options.io_timeout) as deadline:
            for index, pending in waiting.items():
                if index in found or not first <= index <= last:
                    continue  # the rest of a small object arrives without this read waiting
                if pending.far_back():
                    pending = await self._first_arrival(pending, self._start_fetches(obj, [index]))
                else:
                    await pending.done.wait()
                if pending.error is not None:
                    raise pending.error
                if pending.data is None:
                    # A warm-up load that found nothing on disk: take the normal path.
                    (found[index],) = await self._blocks(obj, index, index, look_again=False)
                else:
                    found[index] = pending.data
        if deadline.cancelled_caught:
            raise Unavailable(f"{obj.key}: no answer from the store in {self.options.io_timeout}s")
        return [found[i] for i in range(first, last + 1)]

    async def _first_arrival(self, slow: _Pending, own: dict[int, _Pending]) -> _Pending:
        """Whichever of a block far back in a read-ahead GET and the read's own GET of it
        brings the block first; the other's failure counts only if both fail."""
        candidates = [slow, *own.values()]
        ended: list[_Pending] = []
        async with trio.open_nursery() as nursery:

            async def watch(pending: _Pending) -> None:
                await pending.done.wait()
                ended.append(pending)
                if pending.data is not None or len(ended) == len(candidates):
                    nursery.cancel_scope.cancel()

            for pending in candidates:
                nursery.start_soon(watch, pending)
        return next((pending for pending in ended if pending.data is not None), ended[-1])

    # -- fetching --------------------------------------------------------------------------

    def _runs(self, indices: list[int]) -> list[list[int]]:
        """Group block indices into runs of consecutive blocks, each at most one fetch chunk."""
        per_chunk = max(self.options.fetch_chunk // self.block_size, 1)
        runs: list[list[int]] = []
        for index in sorted(indices):
            if runs and runs[-1][-1] == index - 1 and len(runs[-1]) < per_chunk:
                runs[-1].append(index)
            else:
                runs.append([index])
        return runs

    def _span(self, obj: ObjectVersion, run: list[int]) -> tuple[int, int]:
        return run[0] * self.block_size, min((run[-1] + 1) * self.block_size, obj.size)

    def _start_fetches(
        self,
        obj: ObjectVersion,
        indices: list[int],
        ahead: bool = False,
        reader: Cancelled | None = None,
        batch: _Batch | None = None,
    ) -> dict[int, _Pending]:
        """Register ``indices`` as in flight and start their GETs; must not await in between.
        Read-ahead callers hold the budget for these bytes already; the fetch releases it.
        ``reader``: the open file read-ahead fetches for, if any; ``batch``: counts the GETs
        for a caller waiting for a whole object."""
        assert self._nursery is not None, "BlockReader.run() is not running"
        started: dict[int, _Pending] = {}
        for run in self._runs(indices):
            get = _Get(ahead)
            pendings = {index: _Pending(get=get, position=n) for n, index in enumerate(run)}
            for index, pending in pendings.items():
                self._inflight[obj.block(index)] = pending
            started.update(pendings)
            start, end = self._span(obj, run)
            if ahead:
                self._ahead_in_flight += end - start
            if batch is not None:
                batch.started(start, end)
            self._nursery.start_soon(self._fetch, obj, pendings, ahead, reader, batch)
        return started

    async def _fetch(
        self,
        obj: ObjectVersion,
        pendings: dict[int, _Pending],
        ahead: bool,
        reader: Cancelled | None,
        batch: _Batch | None,
    ) -> None:
        start, end = self._span(obj, list(pendings))
        failure: CloudfsError | None = None
        budget = self._ahead_budget if ahead else self._demand_budget
        token = trio.lowlevel.current_trio_token()

        def deliver(index: int, data: bytes) -> None:
            """Worker thread: hand a block that has arrived to the trio thread, without waiting
            for it (its waiters wake while the rest of the GET is still on its way)."""
            token.run_sync_soon(self._land, obj, index, data, pendings[index], ahead, reader)

        self.stats.requests_in_flight += 1
        try:
            if not ahead:
                await budget.acquire(_held(start, end))
            try:
                async with self._ahead_threads if ahead else _NO_LIMIT:
                    await trio.to_thread.run_sync(
                        self._get_and_store,
                        obj,
                        start,
                        end,
                        deliver,
                        limiter=self._fetch_threads,
                        abandon_on_cancel=True,
                    )
            finally:
                budget.release(_held(start, end))
                if ahead:
                    self._ahead_in_flight -= end - start
            self.stats.requests += 1
            self.stats.fetched_bytes += end - start
            if ahead:
                self.stats.prefetched_bytes += end - start
        except CloudfsError as exc:
            failure = exc
            self._failed(obj, exc, pendings)
        except Exception as exc:  # a bug must fail the read, not the mount
            log.exception("fetching %s bytes %d-%d failed", obj.key, start, end)
            failure = Unavailable(f"{obj.key}: {exc}")
            self._failed(obj, failure, pendings)
        finally:
            self.stats.requests_in_flight -= 1
            for index, pending in pendings.items():
                self._settle(obj.block(index), pending)
            if batch is not None:
                batch.finished(failure)

    def _land(
        self,
        obj: ObjectVersion,
        index: int,
        data: bytes,
        pending: _Pending,
        ahead: bool,
        reader: Cancelled | None,
    ) -> None:
        """A block of a GET in progress has arrived (and is in the disk cache): serve it."""
        block = obj.block(index)
        if pending.get is not None:
            pending.get.arrived += 1
        # Counted as they arrive: a read served from this GET before it ends is a cloud read.
        if ahead:
            self.stats.prefetched_blocks += 1
        else:
            self.stats.fetched_blocks += 1
        self._remember(block, data, ahead)
        self._landed[block] = None
        while len(self._landed) > _LANDED_MEMORY:
            self._landed.popitem(last=False)
        self.ledger.fetched(block, len(data), ahead, reader)
        pending.data = data
        self._settle(block, pending)

    def _failed(self, obj: ObjectVersion, exc: CloudfsError, pendings: dict[int, _Pending]) -> None:
        self.stats.errors += 1
        self.stats.errors_by_kind[type(exc).__name__] += 1
        self.stats.last_error = str(exc)
        log.warning("fetch failed: %s", exc)
        for pending in pendings.values():
            if pending.data is None:  # the blocks that arrived before the failure stand
                pending.error = exc

    def _get_and_store(
        self,
        obj: ObjectVersion,
        start: int,
        end: int,
        deliver: Callable[[int, bytes], None],
    ) -> None:
        """Worker thread: one ranged GET, each block written to the disk cache and delivered as
        soon as it has arrived.  A reply cut short is asked for again from its first missing
        block, up to RESENDS times, so neither its waiting readers nor its blocks already
        delivered see the drop."""
        for resend in range(RESENDS + 1):
            pieces = self.store.stream_range(obj.key, start, end, obj.etag, self.block_size)
            try:
                with contextlib.closing(pieces):
                    for index, block in enumerate(pieces, start // self.block_size):
                        self.cache.put(obj.block(index), block, obj.backup)
                        deliver(index, block)
                        start += len(block)
                return
            except Interrupted as exc:
                if resend == RESENDS:
                    raise
                log.info("%s; asking again for bytes %d-%d", exc, start, end - 1)

    # -- read-ahead ------------------------------------------------------------------------

    def prefetch(self, obj: ObjectVersion, first: int, last: int, cancelled: Cancelled) -> None:
        """Make blocks ``[first, last)`` local in the background; never raises, never waits."""
        assert self._nursery is not None, "BlockReader.run() is not running"
        self._nursery.start_soon(self._prefetch, obj, first, last, cancelled)

    async def _prefetch(
        self, obj: ObjectVersion, first: int, last: int, cancelled: Cancelled
    ) -> None:
        candidates = [i for i in range(first, last) if self._unfetched(obj.block(i))]
        if not candidates or cancelled.is_set:
            return
        await self._fetch_ahead(obj, candidates, cancelled)

    async def _fetch_ahead(
        self,
        obj: ObjectVersion,
        candidates: list[int],
        reader: Cancelled | None = None,
        batch: _Batch | None = None,
    ) -> None:
        """Start, as read-ahead, the GETs of the candidate blocks the disk cache lacks, a run of
        blocks at a time once the read-ahead budget holds it, counted in ``batch`` if given.
        With ``reader`` (read-ahead for an open file) it stops when the file closes or the
        unread share of the cache is full; without (a whole study), it fetches them all."""
        on_disk = await trio.to_thread.run_sync(
            self._on_disk, obj, candidates, limiter=self._disk_threads
        )
        for run in self._runs([i for i in candidates if i not in on_disk]):
            start, end = self._span(obj, run)
            await self._ahead_budget.acquire(_held(start, end))
            # While this waited, the file may have closed or a foreground read taken blocks over.
            closed = reader is not None and reader.is_set
            still = [] if closed else [i for i in run if self._unfetched(obj.block(i))]
            spans = [self._span(obj, r) for r in self._runs(still)]
            if reader is not None and not self._room_ahead(sum(b - a for a, b in spans)):
                log.debug("read-ahead of %s skipped: cache share full", obj.key)
                self._ahead_budget.release(_held(start, end))
                break
            self._ahead_budget.release(_held(start, end) - sum(_held(a, b) for a, b in spans))
            self._start_fetches(obj, still, ahead=True, reader=reader, batch=batch)

    def _room_ahead(self, wanted: int) -> bool:
        """Whether ``wanted`` more bytes fetched ahead stay within the unread share."""
        if not wanted or self._awaited() + wanted <= self._unread_limit:
            return True
        self.ledger.forget_closed()  # only when needed: it walks every unread block
        return self._awaited() + wanted <= self._unread_limit

    def _awaited(self) -> int:
        """Bytes fetched ahead of readers that a reader may still ask for, landed or not."""
        return self.ledger.awaited_bytes + self._ahead_in_flight

    async def fetch_object(self, obj: ObjectVersion) -> int:
        """Make a whole object local as read-ahead does (its own threads and memory budget, so
        foreground reads go first) and wait until it is; returns the bytes fetched (0: it was
        local already).  Raises the store's error if a fetch fails."""
        blocks = range(-(-obj.size // self.block_size))
        candidates = [i for i in blocks if self._unfetched(obj.block(i))]
        # Fetches someone else started: bounded by the budgets, so holding them costs little.
        waiting = [p for i in blocks if (p := self._inflight.get(obj.block(i))) is not None]
        batch = _Batch()
        if candidates:
            await self._fetch_ahead(obj, candidates, batch=batch)
        await batch.wait()
        for pending in waiting:
            await pending.done.wait()
            if pending.error is not None:
                raise pending.error
        return batch.fetched_bytes

    def warm(self, obj: ObjectVersion, first: int) -> None:
        """Load the next WARM_AHEAD blocks from the disk cache into memory in the background,
        so a sequential reader of cached data finds them there instead of waiting for a disk
        read per block."""
        assert self._nursery is not None, "BlockReader.run() is not running"
        last = min(first + WARM_AHEAD, -(-obj.size // self.block_size))
        absent = [index for index in range(first, last) if self._absent(obj.block(index))]
        if not absent or (absent[0] != first and len(absent) < WARM_BATCH):
            # The next block is on its way: wait until a whole batch is missing, or a reader
            # advancing a block at a time would cost a thread hop (and its wake-ups) per block.
            return
        batch: list[tuple[BlockId, _Pending]] = []
        for index in absent:
            block = obj.block(index)
            # In flight like a fetch, so a reader arriving meanwhile waits for this load
            # instead of reading the same block from disk a second time.
            pending = self._inflight[block] = _Pending(from_disk=True)
            batch.append((block, pending))
            if len(batch) == WARM_BATCH:
                self._nursery.start_soon(self._warm, batch, obj.backup)
                batch = []
        if batch:
            self._nursery.start_soon(self._warm, batch, obj.backup)

    async def _warm(self, batch: list[tuple[BlockId, _Pending]], backup: bool) -> None:
        try:
            found = await trio.to_thread.run_sync(
                self._load_blocks, [block for block, _ in batch], backup, limiter=self._warm_threads
            )
            for (block, pending), data in zip(batch, found, strict=True):
                if data is not None:
                    self._remember(block, data)
                    pending.data = data
        finally:
            for block, pending in batch:
                self._settle(block, pending)

    def _load_blocks(self, blocks: list[BlockId], backup: bool) -> list[memoryview | None]:
        """Worker thread: the blocks from the disk cache, None where absent."""
        return [self.cache.get(block, backup) for block in blocks]

    def _absent(self, block: BlockId) -> bool:
        return block not in self._memory and block not in self._inflight

    def _unfetched(self, block: BlockId) -> bool:
        """Neither in memory, nor being fetched (a warm-up load may come back empty), nor just
        fetched (it may have left memory while read-ahead waited for its budget)."""
        pending = self._inflight.get(block)
        return (
            block not in self._memory
            and block not in self._landed
            and (pending is None or pending.from_disk)
        )

    def _settle(self, block: BlockId, pending: _Pending) -> None:
        """Wake the waiters of ``pending`` and retire it, unless a fetch has taken its place."""
        if self._inflight.get(block) is pending:
            del self._inflight[block]
        pending.done.set()

    def _on_disk(self, obj: ObjectVersion, candidates: list[int]) -> set[int]:
        """Worker thread: which candidate blocks the disk cache holds."""
        return {i for i in candidates if self.cache.contains(obj.block(i))}
