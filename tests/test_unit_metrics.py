"""The metrics endpoint: address parsing, the figures a scrape shows, and the HTTP server's life."""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from helpers_unit import make_rig
from prometheus_client.parser import text_string_to_metric_families

from cloudfs import fs as fs_module
from cloudfs import metrics
from cloudfs.fs import ArchiveFS
from cloudfs.metrics import (
    DEFAULT_ADDRESS,
    FIGURES,
    READ_LATENCY_BUCKETS,
    SNAPSHOT_KEYS,
    Metrics,
    MetricsOptions,
    Snapshot,
    format_address,
    parse_address,
)

pytestmark = pytest.mark.timeout(30)

_AGES = {"upload_oldest_pending_at", "catalog_synced_at", "started_at", "audit_held_since"}


def full_snapshot() -> dict[str, Any]:
    """A distinct value per key, so a figure read from the wrong key shows; ages 100 s old."""
    now = time.time()
    values: dict[str, Any] = {
        key: 1000 + number for number, key in enumerate(sorted(SNAPSHOT_KEYS - _AGES))
    }
    return values | {key: now - 100 for key in _AGES}


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape by name and labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }


def value(text: bytes, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


def scrape(address: tuple[str, int]) -> tuple[int, bytes]:
    # No proxy: a proxy from the environment must not stand between the test and loopback.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{format_address(*address)}/metrics", timeout=10) as reply:
        return reply.status, reply.read()


@pytest.fixture
def served() -> Iterator[tuple[Metrics, dict[str, Any]]]:
    state = full_snapshot()
    endpoint = Metrics(lambda: state)
    endpoint.serve(("127.0.0.1", 0))
    try:
        yield endpoint, state
    finally:
        endpoint.stop()


# -- addresses ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("9464", ("127.0.0.1", 9464)),
        (" 9464 ", ("127.0.0.1", 9464)),
        ("0.0.0.0:9464", ("0.0.0.0", 9464)),
        ("127.0.0.1:1", ("127.0.0.1", 1)),
        ("[::1]:9464", ("::1", 9464)),
        ("[::]:65535", ("::", 65535)),
        ("localhost:8000", ("localhost", 8000)),
        ("metrics-1.example.org:9464", ("metrics-1.example.org", 9464)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected
    assert parse_address(format_address(*expected)) == expected


def test_default_address_is_loopback() -> None:
    """``--metrics`` alone must not expose an endpoint without authentication to the network."""
    assert MetricsOptions().address == ""
    assert parse_address(DEFAULT_ADDRESS) == ("127.0.0.1", 9464)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty metrics address"),
        ("   ", "empty metrics address"),
        ("metrics", "expected PORT, HOST:PORT or [IPV6]:PORT"),
        (":9464", "give a host before the port"),
        ("::1:9464", "put an IPv6 address in brackets: [::1]:9464"),
        ("fe80::1", "put an IPv6 address in brackets"),
        ("[::1]", "expected PORT, HOST:PORT or [IPV6]:PORT"),
        ("[::1]9464", "expected PORT, HOST:PORT or [IPV6]:PORT"),
        ("[localhost]:9464", "only an IPv6 address goes in brackets"),
        ("0", "from 1 to 65535"),
        ("99999", "from 1 to 65535"),
        ("host:0", "from 1 to 65535"),
        ("host:65536", "from 1 to 65535"),
        ("host:http", "from 1 to 65535"),
        ("host:", "from 1 to 65535"),
        ("host:-1", "from 1 to 65535"),
        ("bad host:9464", "bad host name 'bad host'"),
        ("http://host:9464", "bad host name"),
    ],
)
def test_parse_address_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="metrics address") as caught:
        parse_address(text)
    assert message in str(caught.value)


# -- the figures -------------------------------------------------------------------------------


def test_snapshot_keys_are_documented() -> None:
    """The TypedDict the daemon fills and the keys the collector reads are the same set."""
    assert Snapshot.__optional_keys__ == SNAPSHOT_KEYS
    assert not Snapshot.__required_keys__


def test_metric_names_follow_the_conventions() -> None:
    names = [figure.name for figure in FIGURES]
    assert len(names) == len(set(names))
    for figure in FIGURES:
        assert figure.name.startswith("cloudfs_")
        # prometheus_client adds the suffix to counters itself.
        assert not figure.name.endswith("_total")
        assert figure.help.endswith(".")
        if figure.age:
            assert figure.name.endswith("_seconds")


def test_render_shows_every_figure() -> None:
    snapshot = full_snapshot()
    text = Metrics(lambda: snapshot).render()
    found = samples(text)
    for figure in FIGURES:
        sample = figure.name + ("_total" if figure.kind == "counter" else "")
        kind = "counter" if figure.kind == "counter" else "gauge"
        assert f"# TYPE {sample} {kind}\n".encode() in text
        assert f"# HELP {sample} {figure.help}\n".encode() in text
        for label, key in figure.keys:
            labels = ((figure.label, label),) if figure.label else ()
            if figure.age:
                assert 100 <= found[(sample, labels)] < 200, figure.name
            else:
                assert found[(sample, labels)] == snapshot[key], figure.name
    assert value(text, "cloudfs_cache_hits_total", source="memory") == snapshot["memory_hits"]
    assert value(text, "cloudfs_cache_hits_total", source="disk") == snapshot["disk_hits"]
    assert value(text, "cloudfs_uploaded_bytes_total") == snapshot["uploaded_bytes"]
    assert value(text, "cloudfs_cache_used_bytes") == snapshot["cache_bytes"]
    assert b"# HELP cloudfs_read_latency_seconds " in text
    assert b"# HELP cloudfs_cloud_errors_total " in text


def test_units_are_stated_in_openmetrics() -> None:
    from prometheus_client.openmetrics.exposition import generate_latest

    snapshot = full_snapshot()
    text = generate_latest(Metrics(lambda: snapshot).registry).decode()
    assert "# UNIT cloudfs_cache_used_bytes bytes" in text
    assert "# UNIT cloudfs_uptime_seconds seconds" in text
    assert "# UNIT cloudfs_read_latency_seconds seconds" in text
    assert "# UNIT cloudfs_cache_blocks" not in text


def test_missing_and_odd_values_drop_their_figure_only() -> None:
    """A key the daemon has not filled yet, None, or a non-number leaves that figure out; the
    rest of the scrape is unchanged."""
    snapshot = full_snapshot()
    del snapshot["cache_bytes"]
    snapshot["catalog_files"] = None
    snapshot["open_files"] = "three"
    snapshot["disk_hits"] = True
    text = Metrics(lambda: snapshot).render()
    assert b"cloudfs_cache_used_bytes" not in text
    assert b"cloudfs_catalog_files" not in text
    assert b"cloudfs_open_files" not in text
    assert value(text, "cloudfs_cache_hits_total", source="disk") is None
    assert value(text, "cloudfs_cache_hits_total", source="memory") == snapshot["memory_hits"]
    assert value(text, "cloudfs_catalog_bytes") == snapshot["catalog_bytes"]


def test_empty_snapshot_still_renders() -> None:
    text = Metrics(dict).render()
    assert b"cloudfs_read_latency_seconds_count" in text
    assert not [name for name, _ in samples(text) if name.startswith("cloudfs_cache_")]


def test_failing_snapshot_never_fails_the_scrape(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("catalog closed")

    endpoint = Metrics(broken)
    endpoint.observe_read(0.01, "cloud")
    with caplog.at_level(logging.WARNING, logger="cloudfs.metrics"):
        first = endpoint.render()
        endpoint.render()
    assert value(first, "cloudfs_read_latency_seconds_count", source="cloud") == 1
    assert b"cloudfs_cache_hits_total" not in first
    # Logged once, not at every scrape.
    assert [r.getMessage() for r in caplog.records] == [
        "metrics snapshot failed, its figures are left out: catalog closed"
    ]


def test_ages_are_computed_at_scrape_time() -> None:
    """Ages come from timestamps, so they grow between snapshot refreshes; 0 means nothing
    waits (upload backlog) or never (catalog refresh: left out)."""
    now = time.time()
    snapshot: dict[str, Any] = {
        "started_at": now - 3600,
        "catalog_synced_at": 0,
        "upload_oldest_pending_at": 0,
    }
    endpoint = Metrics(lambda: snapshot)
    text = endpoint.render()
    assert 3600 <= (value(text, "cloudfs_uptime_seconds") or 0) < 3700
    assert value(text, "cloudfs_upload_backlog_oldest_age_seconds") == 0
    assert b"cloudfs_catalog_refresh_age_seconds" not in text

    snapshot["upload_oldest_pending_at"] = None
    snapshot["catalog_synced_at"] = now - 30
    snapshot["started_at"] = now + 60  # a clock stepped back: never a negative age
    text = endpoint.render()
    assert value(text, "cloudfs_upload_backlog_oldest_age_seconds") == 0
    assert 30 <= (value(text, "cloudfs_catalog_refresh_age_seconds") or 0) < 130
    assert value(text, "cloudfs_uptime_seconds") == 0


# -- events ------------------------------------------------------------------------------------


def test_observe_read_fills_the_histogram() -> None:
    endpoint = Metrics(dict)
    text = endpoint.render()
    for source in ("memory", "disk", "cloud"):
        assert value(text, "cloudfs_read_latency_seconds_count", source=source) == 0
    endpoint.observe_read(0.00005, "memory")
    endpoint.observe_read(0.003, "disk")
    endpoint.observe_read(0.2, "cloud")
    endpoint.observe_read(45.0, "cloud")
    text = endpoint.render()

    def bucket(source: str, le: str) -> float | None:
        return value(text, "cloudfs_read_latency_seconds_bucket", source=source, le=le)

    assert bucket("memory", "0.0001") == 1
    assert bucket("disk", "0.0025") == 0
    assert bucket("disk", "0.005") == 1
    assert bucket("cloud", "0.1") == 0
    assert bucket("cloud", "0.25") == 1
    assert bucket("cloud", "30.0") == 1
    assert bucket("cloud", "+Inf") == 2
    assert value(text, "cloudfs_read_latency_seconds_count", source="cloud") == 2
    assert value(text, "cloudfs_read_latency_seconds_sum", source="cloud") == pytest.approx(45.2)
    assert value(text, "cloudfs_read_latency_seconds_sum", source="disk") == pytest.approx(0.003)
    assert READ_LATENCY_BUCKETS[0] == 0.0001 and READ_LATENCY_BUCKETS[-1] == 30.0


def test_observe_read_refuses_unknown_sources() -> None:
    with pytest.raises(ValueError, match="unknown read source 'tape'"):
        Metrics(dict).observe_read(1.0, "tape")


def test_cloud_errors_by_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = Metrics(dict)
    assert value(endpoint.render(), "cloudfs_cloud_errors_total", kind="Unavailable") is None
    endpoint.cloud_error("Unavailable")
    endpoint.cloud_error("Unavailable")
    endpoint.cloud_error("StaleObject")
    text = endpoint.render()
    assert value(text, "cloudfs_cloud_errors_total", kind="Unavailable") == 2
    assert value(text, "cloudfs_cloud_errors_total", kind="StaleObject") == 1

    # Kinds past the limit share one series instead of growing the scrape without bound.
    monkeypatch.setattr(metrics, "MAX_ERROR_KINDS", 3)
    endpoint.cloud_error("NotFound")
    endpoint.cloud_error("a message by mistake 1")
    endpoint.cloud_error("a message by mistake 2")
    endpoint.cloud_error("Unavailable")
    text = endpoint.render()
    assert value(text, "cloudfs_cloud_errors_total", kind="NotFound") == 1
    assert value(text, "cloudfs_cloud_errors_total", kind="other") == 2
    assert value(text, "cloudfs_cloud_errors_total", kind="Unavailable") == 3


def test_two_mounts_in_one_process_do_not_clash() -> None:
    first_state = {"open_files": 1}
    second_state = {"open_files": 2}
    first = Metrics(lambda: first_state)
    second = Metrics(lambda: second_state)
    first.observe_read(0.001, "disk")
    first.cloud_error("Unavailable")
    one, two = first.render(), second.render()
    assert value(one, "cloudfs_open_files") == 1
    assert value(two, "cloudfs_open_files") == 2
    assert value(one, "cloudfs_read_latency_seconds_count", source="disk") == 1
    assert value(two, "cloudfs_read_latency_seconds_count", source="disk") == 0
    assert value(two, "cloudfs_cloud_errors_total", kind="Unavailable") is None


# -- the HTTP endpoint -------------------------------------------------------------------------


def test_serve_answers_scrapes(served: tuple[Metrics, dict[str, Any]]) -> None:
    endpoint, state = served
    address = endpoint.address
    assert address is not None and address[0] == "127.0.0.1" and address[1] > 0
    status, body = scrape(address)
    assert status == 200
    assert value(body, "cloudfs_cache_misses_total") == state["blocks_fetched"]
    assert value(body, "cloudfs_upload_backlog_files") == state["upload_pending_files"]

    # The daemon replaces values; the next scrape reads them, nothing is pushed.
    state["blocks_fetched"] += 5
    state["upload_pending_files"] = 0
    endpoint.observe_read(0.5, "cloud")
    _, body = scrape(address)
    assert value(body, "cloudfs_cache_misses_total") == state["blocks_fetched"]
    assert value(body, "cloudfs_upload_backlog_files") == 0
    assert value(body, "cloudfs_read_latency_seconds_count", source="cloud") == 1


def test_scrapes_while_the_daemon_updates(served: tuple[Metrics, dict[str, Any]]) -> None:
    """Scrapes run in the server's threads while the trio thread keeps replacing values."""
    endpoint, state = served
    address = endpoint.address
    assert address is not None
    failures: list[BaseException] = []
    stop = threading.Event()

    def scraper() -> None:
        try:
            while not stop.is_set():
                status, body = scrape(address)
                assert status == 200 and b"cloudfs_cache_misses_total" in body
        except BaseException as exc:  # reported to the test below
            failures.append(exc)

    threads = [threading.Thread(target=scraper) for _ in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        state["blocks_fetched"] += 1
        state[f"extra_{state['blocks_fetched'] % 50}"] = 1  # keys come and go too
        endpoint.observe_read(0.001, "memory")
    stop.set()
    for thread in threads:
        thread.join()
    assert not failures


def test_stop_frees_the_port() -> None:
    endpoint = Metrics(dict)
    endpoint.serve(("127.0.0.1", 0))
    address = endpoint.address
    assert address is not None
    assert scrape(address)[0] == 200
    endpoint.stop()
    assert endpoint.address is None
    endpoint.stop()  # twice is harmless
    with pytest.raises(OSError):
        scrape(address)

    again = Metrics(dict)
    again.serve(address)
    try:
        assert again.address == address
        assert scrape(address)[0] == 200
    finally:
        again.stop()


def test_serving_on_a_busy_port_fails_clearly() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        endpoint = Metrics(dict)
        with pytest.raises(OSError) as caught:
            endpoint.serve(("127.0.0.1", port))
    assert caught.value.errno == errno.EADDRINUSE
    message = str(caught.value)
    assert f"cannot serve metrics on 127.0.0.1:{port}" in message
    assert "choose another port" in message
    assert endpoint.address is None


def test_serving_an_unknown_host_fails_clearly() -> None:
    with pytest.raises(OSError, match="cannot serve metrics on no-such-host.invalid:9464"):
        Metrics(dict).serve(("no-such-host.invalid", 9464))


def test_serve_twice_is_refused(served: tuple[Metrics, dict[str, Any]]) -> None:
    endpoint, _ = served
    with pytest.raises(RuntimeError, match="already served on 127.0.0.1:"):
        endpoint.serve(("127.0.0.1", 0))


def test_figures_of_a_large_catalog_are_counted_less_often(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The figures count every catalog and index row, close to a second with a million objects:
    their refresh is spaced so that it takes at most 5% of one core, not every few seconds."""
    monkeypatch.setattr(fs_module, "_FIGURES_PERIOD", 0.01)
    rig = make_rig(tmp_path, {})
    calls: list[float] = []
    counts = rig.catalog.counts

    def slow_counts() -> dict[str, int]:
        calls.append(time.monotonic())
        time.sleep(0.05)
        return counts()

    rig.catalog.counts = slow_counts  # type: ignore[method-assign]

    async def main() -> None:
        fs = ArchiveFS(rig.config, rig.store, rig.catalog, rig.cache)
        fs.metrics = Metrics(fs.metrics_snapshot)
        with trio.move_on_after(1.5):
            await fs.run(3600.0)

    trio.run(main)
    rig.close()
    assert 1 <= len(calls) <= 2, f"counted {len(calls)} times in 1.5 s"
