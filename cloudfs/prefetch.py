"""Access-pattern detection for one open file: decides what to read ahead, fetches nothing itself.

A read that starts where the previous one ended (within one block, because the kernel may reorder
its own read-ahead requests) is sequential.  Sequential reading opens a window ahead of the reader
that doubles each time new blocks are scheduled, up to a maximum; a random read closes it, so a
viewer seeking around an object never pays for bytes it will not read.  The window is topped up
when less than half of it is left ahead, so steady reading issues half-window batches (several
full-size GETs), not one small GET per block read.

A reader that keeps jumping around one object (a viewer paging through the frames of a large
multi-frame image, a database) will want most of it: after ``SCATTERED_READS`` random reads the
whole object is scheduled once, in the background, if it is no larger than the open file's
``whole_limit``.  Its later reads then come from the disk cache instead of one round trip each.

Pure logic on integers: no FUSE, no store, no clock.  ``PrefetchLedger`` keeps the account of
what read-ahead fetched for nothing, and of what it fetched for readers still to come.
"""

from __future__ import annotations

SCATTERED_READS = 4
"""Random reads of one open file after which its whole object is fetched: enough that a program
reading a header and then a trailer, or a few tags, does not trigger it."""


class ReadAhead:
    def __init__(self, block_size: int, initial: int, maximum: int, whole_limit: int = 0) -> None:
        self.block_size = block_size
        self.initial = initial
        self.maximum = maximum
        self.whole_limit = whole_limit
        """Largest object fetched whole for a scattered reader (0: never)."""
        self.window = 0
        self.expected: int | None = None
        self.scheduled_until = 0
        self.scattered = 0
        """Random reads so far."""

    def on_read(self, offset: int, size: int, file_size: int) -> tuple[int, int] | None:
        """Record a read; return the block range ``[first, last)`` to prefetch, or None."""
        end = min(offset + size, file_size)
        if self.expected is None:
            sequential = offset == 0
        else:
            # Near the furthest point read so far, from either side: the kernel's own
            # read-ahead requests may arrive swapped.
            sequential = (
                offset <= self.expected + self.block_size and end >= self.expected - self.block_size
            )
        self.expected = max(end, self.expected or 0) if sequential else end
        if not sequential:
            self.window = 0
            self.scheduled_until = end
            self.scattered += 1
            if self.scattered == SCATTERED_READS and 0 < file_size <= self.whole_limit:
                return 0, -(-file_size // self.block_size)
            return None
        if self.window == 0:
            self.window = self.initial
        if self.scheduled_until - end > self.window // 2:
            # More than half a window is still ahead: topping up now would issue many small
            # GETs; waiting gives fewer, larger ones.
            return None
        target = min(end + self.window, file_size)
        start = max(self.scheduled_until, end)
        first = -(-start // self.block_size)  # the next block the reader has not entered
        last = -(-target // self.block_size)
        if last <= first:
            return None
        self.scheduled_until = last * self.block_size
        self.window = min(self.window * 2, self.maximum)
        return first, last


class Cancelled:
    """A flag set when an open file is closed: read-ahead for it stops, and the blocks fetched
    ahead for it no longer wait for a reader."""

    def __init__(self) -> None:
        self.is_set = False


class PrefetchLedger:
    """Whether the bytes fetched ahead of readers were worth fetching: a prefetched block is
    *used* when a read asks for it, and *wasted* when it is still unread after the cache has taken
    in a whole cache's worth of newer fetches (by then an LRU cache has evicted it, or it is
    kept only because it is pinned).  A block counts once, under the first of those to happen.

    Unread blocks are *awaited* while a reader may still ask for them: those fetched for a file
    still open, and those fetched for no file in particular (whole objects).  Read-ahead keeps
    awaited bytes within a share of the cache, so the cache does not evict them before their
    reader comes.

    Blocks are opaque hashable names; sizes and the cache's capacity are in bytes.
    """

    def __init__(self, horizon: int) -> None:
        self.horizon = horizon
        self.used_bytes = 0
        self.wasted_bytes = 0
        self.unread_bytes = 0
        self.awaited_bytes = 0
        self._fetched_total = 0
        self._unread: dict[object, tuple[int, int, Cancelled | None, bool]] = {}
        """Prefetched blocks no read has asked for: the fetch total when each landed, its size,
        the open file it was fetched for and whether it is awaited.  In landing order, so the
        oldest are first."""

    def fetched(
        self, block: object, size: int, ahead: bool, reader: Cancelled | None = None
    ) -> None:
        """A block came from the cloud, fetched on a read's demand or ahead of readers (of the
        open file ``reader``, if for one)."""
        self._fetched_total += size
        if ahead and block not in self._unread:
            self._unread[block] = (self._fetched_total, size, reader, True)
            self.unread_bytes += size
            self.awaited_bytes += size
        self._expire()

    def is_unread(self, block: object) -> bool:
        """Whether ``block`` was fetched ahead and no read has asked for it yet."""
        return block in self._unread

    def read(self, block: object) -> None:
        """A read asked for ``block``."""
        entry = self._unread.pop(block, None) if self._unread else None
        if entry is not None:
            self.used_bytes += entry[1]
            self._uncount(entry)

    def forget_closed(self) -> None:
        """Await no reader for the unread blocks of files closed since: they stay unread, and
        count as used or wasted later, as any other."""
        for block, (landed, size, reader, awaited) in self._unread.items():
            if awaited and reader is not None and reader.is_set:
                self._unread[block] = (landed, size, reader, False)
                self.awaited_bytes -= size

    def _uncount(self, entry: tuple[int, int, Cancelled | None, bool]) -> None:
        self.unread_bytes -= entry[1]
        if entry[3]:
            self.awaited_bytes -= entry[1]

    def _expire(self) -> None:
        oldest_kept = self._fetched_total - self.horizon
        while self._unread:
            block, entry = next(iter(self._unread.items()))
            if entry[0] > oldest_kept:
                return
            del self._unread[block]
            self.wasted_bytes += entry[1]
            self._uncount(entry)
