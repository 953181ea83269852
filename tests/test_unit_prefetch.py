"""Read-ahead decisions: the window grows on sequential reads and closes on random ones."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cloudfs.prefetch import SCATTERED_READS, Cancelled, PrefetchLedger, ReadAhead

BS = 64 * 1024
INITIAL = 2 * BS
MAXIMUM = 16 * BS
BIG = 1000 * BS


def blocks_in(file_size: int) -> int:
    return -(-file_size // BS)


def test_first_sequential_read_opens_initial_window() -> None:
    """A read from offset 0 schedules the blocks after it, one initial window deep."""
    ra = ReadAhead(BS, INITIAL, MAXIMUM)
    assert ra.on_read(0, BS, BIG) == (1, 3)
    assert ra.window == 2 * INITIAL


def test_window_doubles_up_to_maximum() -> None:
    """Each plan doubles the window until it reaches the maximum; plans are contiguous, reach one
    window past the read, and the reader never overtakes them."""
    ra = ReadAhead(BS, INITIAL, MAXIMUM)
    windows = []
    plans = []
    scheduled: set[int] = set()
    reads = 60
    for step in range(reads):
        if step:
            assert step in scheduled, step  # read-ahead stays in front of the reader
        before = ra.window or INITIAL
        end = (step + 1) * BS
        plan = ra.on_read(step * BS, BS, BIG)
        if plan is None:
            continue
        plans.append(plan)
        windows.append(ra.window)
        scheduled |= set(range(*plan))
        assert plan[1] * BS >= end + before
        assert plan[1] * BS < end + before + BS
    assert windows[:4] == [2 * INITIAL, 4 * INITIAL, 8 * INITIAL, MAXIMUM]
    assert set(windows[3:]) == {MAXIMUM}
    for previous, current in zip(plans, plans[1:], strict=False):
        assert current[0] == previous[1]  # contiguous, no overlap


def test_read_ahead_tops_up_in_half_window_batches() -> None:
    """Once the window is at its maximum, read-ahead waits until half of it is consumed and then
    schedules at least half a window at once: fewer, larger GETs."""
    ra = ReadAhead(BS, INITIAL, MAXIMUM)
    plans = []
    for step in range(100):
        plan = ra.on_read(step * BS, BS, BIG)
        if plan is not None:
            plans.append(plan)
    steady = [plan for plan in plans if plan[0] * BS > 2 * MAXIMUM]
    assert steady
    assert all((last - first) * BS >= MAXIMUM // 2 for first, last in steady)
    assert len(plans) < 100 // 4


def test_random_read_closes_window_and_next_run_starts_small() -> None:
    """A jump returns None and resets the window; reading on from there starts at the initial."""
    ra = ReadAhead(BS, INITIAL, MAXIMUM)
    for step in range(6):
        ra.on_read(step * BS, BS, BIG)
    assert ra.window == MAXIMUM
    assert ra.on_read(500 * BS, BS, BIG) is None
    assert ra.window == 0
    plan = ra.on_read(501 * BS, BS, BIG)
    assert plan == (502, 504)
    assert ra.window == 2 * INITIAL


def test_backward_jump_is_random() -> None:
    """Seeking back (re-reading a header) closes the window too."""
    ra = ReadAhead(BS, INITIAL, MAXIMUM)
    for step in range(4):
        ra.on_read(step * BS, BS, BIG)
    assert ra.on_read(0, 100, BIG) is None
    assert ra.window == 0


def test_first_read_not_at_zero_is_random() -> None:
    """A file whose first read is in the middle gets no read-ahead."""
    ra = ReadAhead(BS, INITIAL, MAXIMUM)
    assert ra.on_read(10 * BS, BS, BIG) is None
    assert ra.window == 0


def test_sub_block_reordering_keeps_window_open() -> None:
    """Small reads arriving slightly out of order within one block stay sequential."""
    ra = ReadAhead(BS, INITIAL, MAXIMUM)
    q = BS // 4
    scheduled: set[int] = set()
    for offset in [0, 2 * q, q, 3 * q, 5 * q, 4 * q, 6 * q, 7 * q, 8 * q]:
        plan = ra.on_read(offset, q, BIG)
        assert ra.window > 0, offset
        if plan is not None:
            new = set(range(*plan))
            assert not new & scheduled
            scheduled |= new
    assert ra.window > 2 * INITIAL


def test_swapped_block_sized_requests_keep_window_open() -> None:
    """Two adjacent block-sized kernel requests arriving swapped do not close the window."""
    ra = ReadAhead(BS, INITIAL, MAXIMUM)
    for step in range(4):
        ra.on_read(step * BS, BS, BIG)
    grown = ra.window
    ra.on_read(5 * BS, BS, BIG)  # the request for block 5 overtakes the one for block 4
    ra.on_read(4 * BS, BS, BIG)
    assert ra.window >= grown
    ra.on_read(6 * BS, BS, BIG)
    assert ra.window >= grown


def test_nothing_past_end_of_file() -> None:
    """Plans stop at the last block; at the end of a file nothing more is scheduled."""
    size = 5 * BS + 100
    ra = ReadAhead(BS, INITIAL, MAXIMUM)
    plans = []
    offset = 0
    while offset < size:
        plan = ra.on_read(offset, BS, size)
        if plan is not None:
            plans.append(plan)
        offset += BS
    assert plans
    assert max(last for _, last in plans) == blocks_in(size)
    assert ra.on_read(size, BS, size) is None


def test_scattered_reader_gets_its_whole_object_once() -> None:
    """The SCATTERED_READS-th random read schedules the whole object, once, when it is within
    the limit; sequential reads do not count, and a larger object or no limit never does."""
    size = 100 * BS + 7
    ra = ReadAhead(BS, INITIAL, MAXIMUM, whole_limit=size)
    assert ra.on_read(0, BS, size) is not None  # sequential from the start: read-ahead
    plans = [ra.on_read(offset * BS, BS, size) for offset in (50, 10, 80, 30, 60, 20)]
    assert plans == [None] * (SCATTERED_READS - 1) + [(0, 101)] + [None] * 2
    assert ra.window == 0
    for limit in (size - 1, 0):
        ra = ReadAhead(BS, INITIAL, MAXIMUM, whole_limit=limit)
        assert all(ra.on_read(offset * BS, BS, size) is None for offset in (50, 10, 80, 30, 60))
    ra = ReadAhead(BS, INITIAL, MAXIMUM, whole_limit=size)
    assert all(ra.on_read(offset * BS, 10, 0) is None for offset in range(SCATTERED_READS + 2))


def test_empty_and_one_block_files() -> None:
    """Files with nothing after the first read schedule nothing."""
    assert ReadAhead(BS, INITIAL, MAXIMUM).on_read(0, BS, 0) is None
    assert ReadAhead(BS, INITIAL, MAXIMUM).on_read(0, BS, BS) is None
    assert ReadAhead(BS, INITIAL, MAXIMUM).on_read(0, 100, 200) is None


step = st.one_of(
    st.tuples(st.just("next"), st.just(0), st.integers(1, 3 * BS)),
    st.tuples(st.just("jitter"), st.integers(-BS, BS), st.integers(1, 3 * BS)),
    st.tuples(st.just("seek"), st.integers(0, 70 * BS), st.integers(1, 3 * BS)),
)


@settings(max_examples=300, deadline=None)
@given(
    file_blocks=st.integers(0, 64),
    tail=st.integers(0, BS - 1),
    initial_blocks=st.integers(1, 4),
    maximum_blocks=st.integers(4, 32),
    steps=st.lists(step, max_size=60),
)
def test_read_ahead_invariants(
    file_blocks: int,
    tail: int,
    initial_blocks: int,
    maximum_blocks: int,
    steps: list[tuple[str, int, int]],
) -> None:
    """No plan passes the end of file or lies behind the reader, the window stays within its
    maximum, and no block is scheduled twice within one sequential run."""
    file_size = file_blocks * BS + tail
    maximum = maximum_blocks * BS
    ra = ReadAhead(BS, initial_blocks * BS, maximum)
    position = 0
    scheduled: set[int] = set()
    for kind, value, size in steps:
        if kind == "next":
            offset = position
        elif kind == "jitter":
            offset = max(0, position + value)
        else:
            offset = value
        plan = ra.on_read(offset, size, file_size)
        end = min(offset + size, file_size)
        position = offset + size
        assert 0 <= ra.window <= maximum
        if ra.window == 0:  # a random read: the run ended, nothing scheduled
            assert plan is None
            scheduled = set()
            continue
        if plan is None:
            continue
        first, last = plan
        assert 0 <= first < last <= blocks_in(file_size)
        assert first * BS >= end
        assert last * BS < end + maximum + BS
        new = set(range(first, last))
        assert not new & scheduled, (new, scheduled)
        scheduled |= new


# -- PrefetchLedger ----------------------------------------------------------------------------


def test_ledger_counts_a_read_prefetched_block_as_used_once() -> None:
    ledger = PrefetchLedger(horizon=10 * BS)
    ledger.fetched("a", BS, ahead=True)
    ledger.fetched("b", BS, ahead=True)
    assert ledger.unread_bytes == 2 * BS
    ledger.read("a")
    ledger.read("a")
    assert (ledger.used_bytes, ledger.wasted_bytes, ledger.unread_bytes) == (BS, 0, BS)


def test_ledger_ignores_blocks_fetched_on_demand() -> None:
    ledger = PrefetchLedger(horizon=10 * BS)
    ledger.fetched("a", BS, ahead=False)
    ledger.read("a")
    assert (ledger.used_bytes, ledger.wasted_bytes, ledger.unread_bytes) == (0, 0, 0)


def test_ledger_counts_a_block_unread_past_a_cache_of_newer_fetches_as_wasted() -> None:
    ledger = PrefetchLedger(horizon=3 * BS)
    ledger.fetched("early", BS, ahead=True)
    ledger.fetched("x", BS, ahead=False)
    ledger.fetched("y", BS, ahead=False)
    assert ledger.wasted_bytes == 0, "two newer blocks fit beside it in a 3-block cache"
    ledger.fetched("z", BS, ahead=False)
    assert (ledger.wasted_bytes, ledger.unread_bytes) == (BS, 0)
    ledger.read("early")
    assert ledger.used_bytes == 0, "counted once, as wasted"


def test_ledger_expires_oldest_first_and_keeps_newer_ones() -> None:
    ledger = PrefetchLedger(horizon=2 * BS)
    for name in "abcd":
        ledger.fetched(name, BS, ahead=True)
    ledger.read("d")
    ledger.read("c")
    assert (ledger.used_bytes, ledger.wasted_bytes, ledger.unread_bytes) == (2 * BS, 2 * BS, 0)


def test_ledger_awaits_unread_blocks_until_their_file_closes() -> None:
    """Unread blocks are awaited while their file is open (and always when fetched for no file);
    once it closes they stop being awaited but stay unread, and are still counted as used or
    wasted later."""
    ledger = PrefetchLedger(horizon=4 * BS)
    first, second = Cancelled(), Cancelled()
    ledger.fetched("a", BS, ahead=True, reader=first)
    ledger.fetched("b", BS, ahead=True, reader=first)
    ledger.fetched("c", BS, ahead=True, reader=second)
    ledger.fetched("whole", BS, ahead=True)
    assert (ledger.unread_bytes, ledger.awaited_bytes) == (4 * BS, 4 * BS)

    first.is_set = True
    assert ledger.awaited_bytes == 4 * BS, "closing alone changes nothing until asked"
    ledger.forget_closed()
    ledger.forget_closed()
    assert (ledger.unread_bytes, ledger.awaited_bytes) == (4 * BS, 2 * BS)

    ledger.read("a")  # another open of the same object reads it after all
    assert (ledger.used_bytes, ledger.unread_bytes, ledger.awaited_bytes) == (BS, 3 * BS, 2 * BS)
    ledger.read("c")
    assert (ledger.used_bytes, ledger.unread_bytes, ledger.awaited_bytes) == (2 * BS, 2 * BS, BS)
    for name in "wxyz":  # a cache's worth of newer fetches expires "b" and "whole"
        ledger.fetched(name, BS, ahead=False)
    assert (ledger.wasted_bytes, ledger.unread_bytes, ledger.awaited_bytes) == (2 * BS, 0, 0)
