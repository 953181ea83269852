"""Sizes as operators write them, and the configuration checks that refuse unworkable mounts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cloudfs.config import (
    MAX_FREE_SPACE,
    CacheOptions,
    Config,
    GiB,
    KiB,
    MiB,
    MountOptions,
    format_size,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20G", 20 * GiB),
        ("512M", 512 * MiB),
        ("64KiB", 64 * KiB),
        ("64K", 64 * KiB),
        ("64kb", 64 * KiB),
        ("1.5G", 3 * GiB // 2),
        ("2T", 2 * 1024 * GiB),
        ("4096", 4096),
        ("0", 0),
        ("7B", 7),
        (" 10 MiB ", 10 * MiB),
        ("512m", 512 * MiB),
    ],
)
def test_parse_size_units(text: str, expected: int) -> None:
    """Binary units, optional 'iB'/'B' suffixes, decimals and plain byte counts all parse."""
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "  ", "abc", "G", "10X", "-1G", "1.2.3G", "10 GG", "1e3"])
def test_parse_size_rejects_garbage(text: str) -> None:
    """Anything that is not a number and a unit raises ValueError naming the bad input."""
    with pytest.raises(ValueError, match="not a size") as caught:
        parse_size(text)
    assert repr(text) in str(caught.value)
    assert "K, M, G, T" in str(caught.value)


@pytest.mark.parametrize(
    ("count", "expected"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (64 * KiB, "64.0 KiB"),
        (3 * GiB // 2, "1.5 GiB"),
        (10 * GiB, "10.0 GiB"),
        (5 * 1024 * GiB, "5.0 TiB"),
        (2048 * 1024 * GiB, "2048.0 TiB"),
    ],
)
def test_format_size(count: int, expected: str) -> None:
    """Byte counts render with the largest binary unit below 1024 (TiB at most)."""
    assert format_size(count) == expected


@pytest.mark.parametrize("count", [1, 1000, 64 * KiB, 512 * MiB, 20 * GiB, 3 * GiB // 2])
def test_format_then_parse_round_trips(count: int) -> None:
    """What format_size prints, parse_size reads back (for sizes exact at one decimal)."""
    assert parse_size(format_size(count)) == count


def config(tmp_path: Path, **cache: int) -> Config:
    return Config(
        source=f"file://{tmp_path}/src",
        mountpoint=tmp_path / "mnt",
        cache=CacheOptions(directory=tmp_path / "cache", **cache),
    )


def test_defaults_pass_check(tmp_path: Path) -> None:
    """The documented defaults are a valid configuration."""
    config(tmp_path).check()


def test_check_rejects_too_small_cache(tmp_path: Path) -> None:
    """A cache below four read-ahead windows is refused with both sizes in the message."""
    with pytest.raises(ValueError, match="too small") as caught:
        config(tmp_path, size_limit=100 * MiB).check()
    message = str(caught.value)
    assert "100.0 MiB" in message
    assert "544.0 MiB" in message  # 4 * (128 MiB read-ahead + 8 MiB fetch chunk)


def test_check_accepts_cache_at_the_minimum(tmp_path: Path) -> None:
    """Exactly four read-ahead windows is enough; one byte less is not."""
    minimum = 4 * (128 * MiB + 8 * MiB)
    config(tmp_path, size_limit=minimum).check()
    with pytest.raises(ValueError, match="too small"):
        config(tmp_path, size_limit=minimum - 1).check()


@pytest.mark.parametrize("block_size", [4 * KiB, 64 * KiB - 1, 64 * MiB + 1, 128 * MiB, 0])
def test_check_rejects_bad_block_sizes(tmp_path: Path, block_size: int) -> None:
    """Block sizes outside 64 KiB..64 MiB are refused."""
    with pytest.raises(ValueError, match="block size"):
        config(tmp_path, block_size=block_size).check()


@pytest.mark.parametrize("block_size", [64 * KiB, 1 * MiB, 8 * MiB])
def test_check_accepts_block_sizes_in_range(tmp_path: Path, block_size: int) -> None:
    """The bounds themselves and typical sizes are accepted."""
    config(tmp_path, block_size=block_size).check()


@pytest.mark.parametrize("block_size", [16 * MiB, 64 * MiB])
def test_large_block_sizes_in_documented_range_pass(tmp_path: Path, block_size: int) -> None:
    """Block sizes up to the advertised 64 MiB pass once the fetch chunk and the small-object
    threshold are raised to one block, as the command line does."""
    config(tmp_path, block_size=block_size, fetch_chunk=block_size, small_object=block_size).check()


def test_small_objects_must_fit_one_fetch(tmp_path: Path) -> None:
    """An object fetched whole must be fetched by one GET."""
    with pytest.raises(ValueError, match="small objects"):
        config(tmp_path, small_object=16 * MiB).check()


def test_check_rejects_fetch_chunk_below_block(tmp_path: Path) -> None:
    """A ranged GET must cover at least one block."""
    with pytest.raises(ValueError, match="fetch chunk"):
        config(tmp_path, block_size=2 * MiB, fetch_chunk=1 * MiB).check()


@pytest.mark.parametrize("budget", ["readahead_budget", "foreground_budget"])
def test_check_rejects_budgets_below_a_fetch_chunk(tmp_path: Path, budget: str) -> None:
    """Each memory budget must hold one fetch chunk, or fetches could never start."""
    with pytest.raises(ValueError, match="budgets"):
        config(tmp_path, **{budget: 4 * MiB}).check()


def test_config_is_frozen(tmp_path: Path) -> None:
    """Every layer reads one immutable configuration."""
    built = config(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.cache.block_size = 1  # type: ignore[misc]


@pytest.mark.parametrize("free_space", [MiB, 3 * GiB, 1 << 50, MAX_FREE_SPACE])
def test_free_space_from_one_block_up_passes(tmp_path: Path, free_space: int) -> None:
    """statfs reports free space in cache blocks: one block is the least it can say."""
    dataclasses.replace(config(tmp_path), mount=MountOptions(free_space=free_space)).check()


@pytest.mark.parametrize("free_space", [-1, 0, MiB - 1, MAX_FREE_SPACE + 1])
def test_free_space_below_a_block_or_absurdly_large_is_refused(
    tmp_path: Path, free_space: int
) -> None:
    """Less than a block would show a full disk (a PACS stops writing); the upper bound keeps
    the block counts statfs reports inside 64 bits."""
    built = dataclasses.replace(config(tmp_path), mount=MountOptions(free_space=free_space))
    with pytest.raises(ValueError, match=r"free space must be at least one cache block \(1.0 MiB"):
        built.check()
