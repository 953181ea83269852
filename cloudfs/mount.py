"""The life of one mount: checks, catalog, FUSE session, signals, readiness, clean unmount.

Everything that can fail for a reason the user can fix (the source, credentials, the endpoint,
the mountpoint, the cache directory) is checked before the kernel mount, so the user gets one clear
line and nothing is left mounted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import resource
import signal
import time
from collections.abc import Callable
from pathlib import Path

import trio

from . import allocator, control, fuse_ops
from .audit import AuditLog
from .cache import REMEMBERED_FILES, BlockCache
from .catalog import Catalog
from .config import Config
from .crypto import BlockCipher, load_key
from .errors import ConfigError, StoreUnreachable
from .fs import ArchiveFS
from .metrics import Metrics, parse_address
from .store import ObjectStore, open_store
from .systemd import notify

log = logging.getLogger(__name__)

FS_TYPE = "cloudfs"


def is_mounted(path: Path) -> bool:
    """True if ``path`` is a mount point (of any filesystem)."""
    try:
        return os.path.ismount(path)
    except OSError:
        # A dead FUSE mount answers ENOTCONN: it is mounted, just broken.
        return True


def mounted_cloudfs(path: Path) -> bool:
    """True if ``path`` is the mount point of a cloudfs (per /proc/self/mounts)."""
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 2 and fields[1] == target and fields[2] == f"fuse.{FS_TYPE}":
                return True
    return False


def check_mountpoint(mountpoint: Path) -> None:
    if mounted_cloudfs(mountpoint):
        try:
            # stat may still answer from the kernel's attribute cache: opening it may not.
            os.listdir(mountpoint)
        except OSError as exc:
            if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
                raise ConfigError(
                    f"{mountpoint}: a mount whose daemon has stopped is still there; "
                    f"clear it with `cloudfs unmount {mountpoint}`"
                ) from exc
    if not mountpoint.exists():
        raise ConfigError(f"{mountpoint}: mountpoint does not exist (create it with mkdir)")
    if not mountpoint.is_dir():
        raise ConfigError(f"{mountpoint}: mountpoint is not a directory")
    if is_mounted(mountpoint):
        raise ConfigError(f"{mountpoint}: mountpoint is busy (something is already mounted there)")


def lock_cache(directory: Path) -> int:
    """Hold the cache directory for this process: two daemons on one cache would corrupt it."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            holder = (directory / "lock").read_text().strip() or "another process"
            raise ConfigError(
                f"{directory}: cache directory in use by cloudfs pid {holder}"
            ) from exc
        raise
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def open_catalog(config: Config, store: ObjectStore, key: bytes | None) -> Catalog:
    """The catalog of this cache directory, refusing one that belongs to another source."""
    catalog = Catalog(config.cache.directory / "catalog.sqlite", key)
    owner = catalog.get_meta("source")
    if owner is None:
        catalog.set_meta("source", config.source)
    elif owner != config.source:
        raise ConfigError(
            f"{config.cache.directory}: cache directory belongs to {owner}; "
            f"use another --cache-dir for {config.source}"
        )
    return catalog


def raise_kernel_read_ahead(mountpoint: Path, kilobytes: int) -> None:
    """Let the kernel send larger reads: its 128 KiB default halves FUSE throughput (root only)."""
    device = os.stat(mountpoint).st_dev
    path = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
    try:
        path.write_text(str(kilobytes))
        log.debug("kernel read-ahead of %s set to %d KiB", mountpoint, kilobytes)
    except OSError as exc:
        log.debug("kernel read-ahead left at its default (%s)", exc.strerror)


def raise_open_file_limit() -> None:
    """Raise this process's open-file limit to its hard limit, and grow the kernel's table of
    descriptors now to what the block cache may hold.

    The cache keeps the files of recent blocks open (a quarter of the limit, at most
    ``REMEMBERED_FILES``); the soft limit of 1,024 that shells and services start with would
    leave room for only 256.  The table starts at 64 descriptors and doubles when full; in a
    process with threads each doubling waits for an RCU grace period, which held single reads
    up for 5-13 ms, once at the 64th open descriptor, again at the 128th, and so on."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as exc:
            log.info("open-file limit stays at %d: %s", soft, exc)
    highest = min(2 * REMEMBERED_FILES, soft) - 1
    with contextlib.suppress(OSError):
        os.fstat(highest)
        return  # in use: the table is that large already (and dup2 would close it)
    placeholder = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.dup2(placeholder, highest, inheritable=False)
        os.close(highest)
    except OSError as exc:
        log.info("descriptor table not grown ahead: %s", exc)
    finally:
        os.close(placeholder)


def prepare(config: Config) -> tuple[ObjectStore, Catalog, BlockCache, bytes | None, float]:
    """Everything up to the kernel mount; returns the cache key (None: nothing is sealed) and
    the delay before the first catalog refresh."""
    config.check()
    check_mountpoint(config.mountpoint)
    store = open_store(config.source, config.s3)
    lock_cache(config.cache.directory)
    key = load_key(config.cache.key_file)
    catalog = open_catalog(config, store, key)
    synced_at = float(catalog.get_meta("synced_at") or 0)
    try:
        store.check()
    except StoreUnreachable as exc:
        if not synced_at:
            raise
        # An outage must not stop reading: serve the catalog and the cached blocks.
        log.warning("%s; serving the catalog and the cache until it answers", exc)
    cache = BlockCache(
        config.cache.directory / "blocks",
        config.cache.size_limit,
        config.cache.block_size,
        None if key is None else BlockCipher(key),
    )
    first_refresh = max(0.0, synced_at + config.mount.refresh_interval - time.time())
    return store, catalog, cache, key, first_refresh


def serve(config: Config, on_ready: Callable[[], None]) -> None:
    """Mount and serve until unmounted or signalled; ``on_ready`` runs once the mount answers."""
    allocator.tune_for_blocks(config.cache.block_size)
    raise_open_file_limit()
    store, catalog, cache, key, first_refresh = prepare(config)
    fs = ArchiveFS(config, store, catalog, cache, key)
    fs.recover()
    options = {f"fsname={FS_TYPE}", f"subtype={FS_TYPE}", *config.mount.fuse_options}
    if "allow_other" in options:
        # Other users' access is then checked by the kernel against the modes and owners
        # shown, which is what makes them mean anything.
        options.add("default_permissions")
    if config.mount.read_only:
        options.add("ro")
    control_socket = control.socket_path(config.mountpoint)
    metrics = None
    if config.mount.metrics_address:
        metrics = Metrics(fs.metrics_snapshot)
        try:
            metrics.serve(parse_address(config.mount.metrics_address))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"metrics endpoint: {exc}") from None
        fs.metrics = metrics
        log.info("metrics at http://%s/metrics", config.mount.metrics_address)

    def start_tasks(nursery: trio.Nursery) -> None:
        nursery.start_soon(fs.run, first_refresh)
        nursery.start_soon(_stop_on_signals)
        nursery.start_soon(_announce_ready, config, on_ready)
        nursery.start_soon(control.serve, control_socket, fs.control_handlers())

    audit = None
    if config.audit is not None and config.audit.level != "off":
        try:
            audit = AuditLog(config.audit)
        except OSError as exc:
            raise ConfigError(f"audit trail {config.audit.path}: {exc.strerror or exc}") from None
        fs.audit_state = audit.state
    log.info("mounting %s at %s", store.describe(), config.mountpoint)
    try:
        fuse_ops.serve(fs, config.mountpoint, options, start_tasks, audit)
    finally:
        if audit is not None:
            audit.close()
        if metrics is not None:
            metrics.stop()
        cache.close()
        log.info("unmounted %s", config.mountpoint)


async def _stop_on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("%s received: unmounting", signal.Signals(signum).name)
            notify("STOPPING=1")
            fuse_ops.stop()
            return


async def _announce_ready(config: Config, on_ready: Callable[[], None]) -> None:
    # A stat through the kernel proves the mount answers; it must run off the trio thread,
    # which is the one serving it.
    await trio.to_thread.run_sync(
        raise_kernel_read_ahead, config.mountpoint, config.mount.read_ahead_kb
    )
    on_ready()
    notify("READY=1")
