"""The ``cloudfs`` command: mount, unmount, status, refresh and the demo archive.

``mount`` without ``--foreground`` starts the daemon as a detached child and returns once the mount
answers (as mount(8) and fstab expect), or prints the child's one-line error and exits non-zero.
"""

from __future__ import annotations

import hashlib
import json
import logging
import logging.handlers
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from . import __version__, configfile, control
from .audit import LEVELS, WHEN_UNWRITABLE, AuditOptions, rotated_files, verify
from .config import (
    BACKUP_PROGRAMS,
    PATIENT_FOLDERS,
    UPLOAD_MODES,
    CacheOptions,
    Config,
    DicomOptions,
    MountOptions,
    S3Options,
    WriteOptions,
    format_size,
    parse_size,
)
from .errors import CloudfsError, ConfigError
from .metrics import DEFAULT_ADDRESS
from .mount import mounted_cloudfs, serve

log = logging.getLogger("cloudfs")

_DAEMON_START_TIMEOUT = 900.0
"""Seconds ``mount`` waits for the daemon to answer (the unit's start timeout): its checks of the
store and the cache come first, a first listing runs after; anything longer is a hang."""
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class SizeType(click.ParamType):
    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SIZE = SizeType()


class OctalType(click.ParamType):
    name = "octal"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            number = int(str(value), 8)
        except ValueError:
            self.fail(f"not an octal mode: {value!r} (e.g. 022 or 027)", param, ctx)
        if not 0 <= number <= 0o777:
            self.fail(f"{value!r} is not a umask (000 to 777)", param, ctx)
        return number


OCTAL = OctalType()


class NamesType(click.ParamType):
    """A set of names: comma-separated on the command line, a list or that string in a file."""

    name = "names"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> frozenset[str]:
        if isinstance(value, frozenset):
            return value
        items = value if isinstance(value, list) else str(value).split(",")
        if not all(isinstance(item, str) for item in items):
            self.fail(f"expected names, got {value!r}", param, ctx)
        return frozenset(item.strip() for item in items if item.strip())


NAMES = NamesType()


def default_cache_dir(source: str) -> Path:
    """Per-source cache directory: /var/cache/cloudfs for root, the XDG cache dir otherwise."""
    if os.geteuid() == 0:
        base = Path("/var/cache/cloudfs")
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cloudfs"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", source.split("://", 1)[-1]).strip("_")[:60]
    digest = hashlib.sha256(source.encode()).hexdigest()[:8]
    return base / f"{slug}-{digest}"


def setup_logging(level: str, log_file: Path | None) -> None:
    handler: logging.Handler
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            log_file, maxBytes=20 * 1024 * 1024, backupCount=5
        )
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


_MOUNT_HELPER_DROPS = {"_netdev", "auto", "noauto", "nofail", "user", "users", "nouser", "rw"}
"""fstab options meant for mount(8) and systemd, not for the filesystem."""


def mount_helper_arguments(argv: list[str]) -> list[str]:
    """Turn ``cloudfs SOURCE MOUNTPOINT -o opt,key=value`` (how mount.fuse3 starts the program
    of an fstab line of type ``fuse.cloudfs``) into ``cloudfs mount ...``: ``key=value`` options
    that name a ``cloudfs mount`` option (``cache_size=500G``, ``config=/etc/cloudfs/a.toml``)
    become that option, flags likewise (``read_only``), the rest stay FUSE options."""
    if len(argv) < 2 or "://" not in argv[0]:
        return argv
    known = {parameter.name: parameter for parameter in mount.params}
    known["config"] = known["config_file"]
    arguments = ["mount", argv[0], argv[1]]
    rest = argv[2:]
    while rest:
        item = rest.pop(0)
        if item != "-o" or not rest:
            arguments.append(item)
            continue
        for option in rest.pop(0).split(","):
            name, has_value, value = option.partition("=")
            parameter = known.get(name.replace("-", "_"))
            if option in _MOUNT_HELPER_DROPS or not option:
                continue
            if isinstance(parameter, click.Option) and name not in ("ro", "o"):
                flag = parameter.opts[0]
                if parameter.is_flag and not has_value:
                    arguments.append(flag)
                elif has_value:
                    arguments += [flag, value]
                else:
                    raise click.UsageError(f"-o {name} needs a value ({name}=...)")
            else:
                arguments += ["-o", option]
    return arguments


def run() -> None:
    """The ``cloudfs`` program: the commands below, or the form mount(8) uses for fstab."""
    main(args=mount_helper_arguments(sys.argv[1:]))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="cloudfs")
def main() -> None:
    """cloudfs: an S3 (or local) archive of medical images mounted as ordinary directories.

    Reads are served from a persistent local block cache; missing blocks are fetched with ranged
    GETs and sequential readers get read-ahead.  Run `cloudfs COMMAND --help` for each command.
    """


@main.command()
@click.argument("source", required=False)
@click.argument("mountpoint", type=click.Path(path_type=Path), required=False)
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    help="Block cache and catalog directory [default: /var/cache/cloudfs/<source> for "
    "root, ~/.cache/cloudfs/<source> otherwise].",
)
@click.option(
    "--cache-size",
    type=SIZE,
    default="10G",
    show_default=True,
    help="Hard cap on the block cache (units K, M, G, T).",
)
@click.option(
    "--cache-key-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Encrypt cached blocks, staged writes and the catalog with the key in this file "
    "(0600; 32 bytes or 64 hex digits) [default: $CLOUDFS_CACHE_KEY, else unencrypted].",
)
@click.option(
    "--block-size",
    type=SIZE,
    default="1M",
    show_default=True,
    help="Cache block and minimum GET size.",
)
@click.option(
    "--read-ahead",
    "read_ahead",
    type=SIZE,
    default="128M",
    show_default=True,
    help="Largest read-ahead window per open file.",
)
@click.option(
    "--read-ahead-memory",
    type=SIZE,
    default="128M",
    show_default=True,
    help="Read-ahead bytes in flight across all open files together.",
)
@click.option(
    "--refresh-interval",
    type=float,
    default=600.0,
    show_default=True,
    help="Seconds between relists of the store into the catalog.",
)
@click.option(
    "--attr-timeout",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds the kernel may cache attributes and names.",
)
@click.option(
    "--io-timeout",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds a read may wait for the cloud before failing with EIO.",
)
@click.option(
    "--backup-programs",
    type=NAMES,
    default=",".join(sorted(BACKUP_PROGRAMS)),
    show_default=True,
    help="Programs whose reads must not displace cached data: what they bring in is evicted "
    "first ('' for none).",
)
@click.option("--read-only", is_flag=True, help="Mount read-only.")
@click.option(
    "--staging-size",
    type=SIZE,
    default="10G",
    show_default=True,
    help="Written data not yet in the cloud that may wait on the cache disk; past it, writes "
    "fail with ENOSPC (never evicted, never dropped).",
)
@click.option(
    "--upload-mode",
    type=click.Choice(UPLOAD_MODES),
    default="async",
    show_default=True,
    help="async: fsync returns once the data is durable on local disk; sync: fsync also "
    "waits for the cloud.",
)
@click.option("--sync-on-close", is_flag=True, help="Make close() as durable as fsync().")
@click.option(
    "--upload-delay",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Seconds without a file being closed or fsync'd before uploads start: a study "
    "arriving goes up in the pause after it, and temp-file renames land first.",
)
@click.option(
    "--upload-max-delay",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Longest uploads wait for that pause while files keep arriving.",
)
@click.option(
    "--upload-threads",
    type=click.IntRange(min=1, max=64),
    default=8,
    show_default=True,
    help="Files uploaded at once.",
)
@click.option(
    "--part-size",
    type=SIZE,
    default="16M",
    show_default=True,
    help="Multipart upload part size; larger files go up in parts of this size.",
)
@click.option(
    "--drain-timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="On unmount, seconds to wait for pending uploads; the rest stays journaled for the "
    "next mount.",
)
@click.option(
    "--restore-days",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Opening an archived (GLACIER, DEEP_ARCHIVE) object asks S3 to restore it for this "
    "many days; 0 never asks.",
)
@click.option(
    "--free-space",
    type=SIZE,
    default="1024T",
    show_default=True,
    help="Free space statfs reports (df, PACS free-space thresholds); at least one block.",
)
@click.option("--endpoint-url", help="S3-compatible endpoint [default: AWS_ENDPOINT_URL or AWS].")
@click.option("--region", help="S3 region [default: AWS_REGION or the profile's].")
@click.option("--profile", help="AWS profile [default: AWS_PROFILE or the default chain].")
@click.option("--path-style", is_flag=True, help="Use path-style S3 addressing.")
@click.option(
    "--sse",
    type=click.Choice(["AES256", "aws:kms"]),
    help="Server-side encryption of every object written [default: the bucket's].",
)
@click.option("--sse-kms-key-id", help="KMS key for --sse aws:kms [default: aws/s3].")
@click.option(
    "--verify-tls/--no-verify-tls",
    default=True,
    show_default=True,
    help="Check the endpoint's TLS certificate (off only for test endpoints).",
)
@click.option(
    "-o",
    "fuse_options",
    multiple=True,
    metavar="OPT[,OPT...]",
    help="FUSE mount options, e.g. -o allow_other (ro is the same as --read-only).",
)
@click.option(
    "--uid",
    "owner_uid",
    type=click.IntRange(0),
    help="Owner of objects that carry none [default: the mounting user].",
)
@click.option(
    "--gid",
    "owner_gid",
    type=click.IntRange(0),
    help="Group of objects that carry none [default: the mounting user's].",
)
@click.option(
    "--umask",
    type=OCTAL,
    default="022",
    show_default=True,
    help="Cleared from the default modes of objects that carry none (octal).",
)
@click.option(
    "--metrics",
    "metrics_address",
    is_flag=False,
    flag_value=DEFAULT_ADDRESS,
    default="",
    metavar="[HOST:]PORT",
    help=f"Serve Prometheus metrics (alone: on {DEFAULT_ADDRESS}).",
)
@click.option(
    "--audit-log",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the access audit trail (hash-chained JSON lines) to this file.",
)
@click.option(
    "--audit-level",
    type=click.Choice(LEVELS),
    default="changes",
    show_default=True,
    help="changes: opens and changes; all: reads too (per file and process).",
)
@click.option(
    "--audit-max-size",
    type=SIZE,
    default="64M",
    show_default=True,
    help="Rotate the audit log at this size.",
)
@click.option(
    "--audit-backups",
    type=click.IntRange(0),
    default=10,
    show_default=True,
    help="Rotated audit logs kept.",
)
@click.option(
    "--audit-syslog",
    metavar="ADDRESS",
    help="Also send audit records to syslog (RFC 5424): /dev/log, or host:port (UDP).",
)
@click.option(
    "--audit-when-unwritable",
    type=click.Choice(WHEN_UNWRITABLE),
    default="serve",
    show_default=True,
    help="While the audit log cannot be written (disk full): serve accesses, their records "
    "waiting in memory, or refuse every audited operation with EACCES (fail closed).",
)
@click.option(
    "--dicom-index/--no-dicom-index",
    default=True,
    show_default=True,
    help="Index DICOM headers (needed by the view, study prefetch and pins).",
)
@click.option(
    "--view-dir",
    default=DicomOptions.view_dir,
    show_default=True,
    help="Name of the read-only DICOM browse tree at the mount's root ('' for none).",
)
@click.option(
    "--patient-folder",
    type=click.Choice(PATIENT_FOLDERS),
    default=DicomOptions.patient_folder,
    show_default=True,
    help="Name patient folders by ID only, or by name and ID (names are PHI).",
)
@click.option(
    "--study-prefetch/--no-study-prefetch",
    default=True,
    show_default=True,
    help="On open of an instance, fetch the rest of its study in the background.",
)
@click.option(
    "--prefetch-threads",
    type=click.IntRange(1, 64),
    default=DicomOptions.prefetch_threads,
    show_default=True,
    help="Instances study prefetch fetches at once.",
)
@click.option(
    "--max-study-size",
    type=SIZE,
    default="4G",
    show_default=True,
    help="Larger studies are not prefetched whole.",
)
@click.option(
    "--priors",
    type=click.IntRange(0, 20),
    default=DicomOptions.priors,
    show_default=True,
    help="Prior studies of the patient prefetched after an opened study.",
)
@click.option(
    "--keep-recent-days",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Pin studies of the last N days in the cache (0: off).",
)
@click.option(
    "-f",
    "--foreground",
    is_flag=True,
    help="Stay attached and log to stderr (for systemd); otherwise return once mounted.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="Least severe log lines written.",
)
@click.option(
    "--log-file",
    type=click.Path(path_type=Path),
    help="Log file [default: stderr in the foreground, CACHE_DIR/cloudfs.log otherwise].",
)
@click.option("--ready-fd", type=int, hidden=True)
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="A TOML file of these options (see README); options given here override it.",
)
@click.pass_context
def mount(context: click.Context, config_file: Path | None, **given: Any) -> None:
    """Mount SOURCE (s3://bucket[/prefix] or file:///path) at MOUNTPOINT.

    S3 credentials, region and endpoint follow the standard AWS configuration (environment,
    AWS_PROFILE, ~/.aws, instance roles, AWS_ENDPOINT_URL); the options here override it.
    SOURCE and MOUNTPOINT may come from the --config file instead.
    """
    if config_file is not None:
        given = _with_config_file(context, config_file, given)
    for name in ("source", "mountpoint"):
        if given[name] is None:
            raise click.UsageError(f"missing {name.upper()} (give it, or set it in --config)")
    _mount(**given)


def _with_config_file(context: click.Context, path: Path, given: dict[str, Any]) -> dict[str, Any]:
    """``given`` with the file's values for every option not set on the command line."""
    try:
        settings = configfile.load(path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    parameters = {parameter.name: parameter for parameter in context.command.params}
    merged = dict(given)
    for name, (where, value) in settings.items():
        if context.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE:
            continue
        parameter = parameters[name]
        if parameter.multiple and isinstance(value, str):
            value = [value]
        try:
            merged[name] = parameter.type_cast_value(context, value)
        except click.BadParameter as exc:
            raise click.ClickException(f"{path}: {where}: {exc.message}") from None
        except (TypeError, ValueError):
            raise click.ClickException(
                f"{path}: {where}: expected {parameter.type.name}, got {value!r}"
            ) from None
    return merged


def _mount(
    source: str,
    mountpoint: Path,
    cache_dir: Path | None,
    cache_size: int,
    cache_key_file: Path | None,
    block_size: int,
    read_ahead: int,
    read_ahead_memory: int,
    refresh_interval: float,
    attr_timeout: float,
    io_timeout: float,
    backup_programs: frozenset[str],
    read_only: bool,
    staging_size: int,
    upload_mode: str,
    sync_on_close: bool,
    upload_delay: float,
    upload_max_delay: float,
    upload_threads: int,
    part_size: int,
    drain_timeout: float,
    restore_days: int,
    free_space: int,
    endpoint_url: str | None,
    region: str | None,
    profile: str | None,
    path_style: bool,
    sse: str | None,
    sse_kms_key_id: str | None,
    verify_tls: bool,
    fuse_options: tuple[str, ...],
    owner_uid: int | None,
    owner_gid: int | None,
    umask: int,
    metrics_address: str,
    audit_log: Path | None,
    audit_level: str,
    audit_max_size: int,
    audit_backups: int,
    audit_syslog: str | None,
    audit_when_unwritable: str,
    dicom_index: bool,
    view_dir: str,
    patient_folder: str,
    study_prefetch: bool,
    prefetch_threads: int,
    max_study_size: int,
    priors: int,
    keep_recent_days: int,
    foreground: bool,
    log_level: str,
    log_file: Path | None,
    ready_fd: int | None,
) -> None:
    cache_dir = (cache_dir or default_cache_dir(source)).absolute()
    extra = tuple(o for group in fuse_options for o in group.split(",") if o)
    read_only = read_only or "ro" in extra
    config = Config(
        source=source,
        mountpoint=mountpoint.absolute(),
        cache=CacheOptions(
            directory=cache_dir,
            size_limit=cache_size,
            key_file=None if cache_key_file is None else cache_key_file.absolute(),
            block_size=block_size,
            fetch_chunk=max(block_size, CacheOptions.fetch_chunk),
            small_object=max(block_size, CacheOptions.small_object),
            readahead_max=read_ahead,
            readahead_budget=read_ahead_memory,
            io_timeout=io_timeout,
            backup_programs=backup_programs,
        ),
        mount=MountOptions(
            read_only=read_only,
            restore_days=restore_days,
            free_space=free_space,
            attr_timeout=attr_timeout,
            refresh_interval=refresh_interval,
            fuse_options=tuple(o for o in extra if o not in ("ro", "rw")),
            metrics_address=metrics_address,
            owner_uid=owner_uid,
            owner_gid=owner_gid,
            umask=umask,
        ),
        s3=S3Options(
            endpoint_url=endpoint_url,
            region=region,
            profile=profile,
            path_style=path_style,
            part_size=part_size,
            sse=sse or "",
            sse_kms_key_id=sse_kms_key_id,
            verify_tls=verify_tls,
        ),
        write=WriteOptions(
            staging_limit=staging_size,
            upload_mode=upload_mode,
            sync_on_close=sync_on_close,
            upload_delay=upload_delay,
            upload_max_delay=upload_max_delay,
            upload_threads=upload_threads,
            drain_timeout=drain_timeout,
        ),
        dicom=DicomOptions(
            index=dicom_index,
            view_dir=view_dir if dicom_index else "",
            patient_folder=patient_folder,
            study_prefetch=study_prefetch and dicom_index,
            prefetch_threads=prefetch_threads,
            max_study_size=max_study_size,
            priors=priors,
            keep_recent_days=keep_recent_days,
        ),
        audit=None
        if audit_log is None
        else AuditOptions(
            path=audit_log.absolute(),
            level=audit_level,
            max_bytes=audit_max_size,
            backups=audit_backups,
            syslog=audit_syslog,
            when_unwritable=audit_when_unwritable,
        ),
    )
    try:
        config.check()
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if not foreground:
        _start_daemon(sys.argv[1:], cache_dir, log_file)
        return
    setup_logging(log_level, log_file)

    waiting = [ready_fd] if ready_fd is not None else []

    def tell_parent(line: str) -> None:
        while waiting:
            fd = waiting.pop()
            try:
                os.write(fd, line.encode() + b"\n")
            except OSError:
                log.warning("the mount command that started this daemon is gone; serving anyway")
            finally:
                os.close(fd)

    def ready() -> None:
        log.info("ready: %s is mounted at %s", source, config.mountpoint)
        tell_parent("ready")

    try:
        serve(config, ready)
    except Exception as exc:
        message = str(exc) if isinstance(exc, ConfigError) else f"mount failed: {exc}"
        log.error("%s", message, exc_info=not isinstance(exc, ConfigError))
        tell_parent(f"error: {message}")
        raise click.ClickException(message) from None


def _start_daemon(args: list[str], cache_dir: Path, log_file: Path | None) -> None:
    """Run the mount command ``args`` detached with --foreground; wait for its ready or error."""
    log_file = (log_file or cache_dir / "cloudfs.log").absolute()
    log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    read_end, write_end = os.pipe()
    command = [
        sys.executable,
        "-m",
        "cloudfs",
        *args,
        "--foreground",
        "--ready-fd",
        str(write_end),
        "--log-file",
        str(log_file),
    ]
    child = subprocess.Popen(
        command,
        pass_fds=(write_end,),
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        ready, _, _ = select.select([pipe], [], [], _DAEMON_START_TIMEOUT)
        answer = pipe.readline().strip() if ready else "timeout"
    if answer == "timeout":
        child.terminate()
        raise click.ClickException(
            f"the daemon did not become ready in {_DAEMON_START_TIMEOUT:.0f}s and was stopped; "
            f"see {log_file}"
        )
    if answer == "ready":
        click.echo(f"cloudfs: mounted (pid {child.pid}, log {log_file})", err=True)
        return
    if answer.startswith("error: "):
        raise click.ClickException(answer.removeprefix("error: "))
    code = child.wait()
    raise click.ClickException(
        f"the daemon exited with status {code} before mounting; see {log_file}"
    )


def _ask(mountpoint: Path, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    """Send a control command to the daemon serving ``mountpoint``."""
    if not mounted_cloudfs(mountpoint):
        raise click.ClickException(f"{mountpoint}: not a cloudfs mount")
    try:
        return control.request(mountpoint, command, arguments=arguments)
    except OSError as exc:
        raise click.ClickException(
            f"{mountpoint}: its daemon does not answer ({exc.strerror or exc}); "
            "run this as the user who mounted it"
        ) from None
    except RuntimeError as exc:
        raise click.ClickException(f"{mountpoint}: {command} failed: {exc}") from None


@main.command()
@click.argument("mountpoint", type=click.Path(path_type=Path), required=False)
@click.option(
    "--timeout",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds to wait for the daemon to finish after the unmount.",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Take MOUNTPOINT from this mount's TOML file.",
)
def unmount(mountpoint: Path | None, timeout: float, config_file: Path | None) -> None:
    """Unmount MOUNTPOINT cleanly and wait for its daemon to exit.  A mount whose daemon was
    killed is detached (lazily) so the mountpoint can be used again."""
    if mountpoint is None and config_file is not None:
        try:
            where = configfile.load(config_file).get("mountpoint")
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        mountpoint = Path(where[1]) if where else None
    if mountpoint is None:
        raise click.UsageError("missing MOUNTPOINT (give it, or --config)")
    if not mounted_cloudfs(mountpoint):
        raise click.ClickException(f"{mountpoint}: not a cloudfs mount")
    try:
        pid = control.request(mountpoint, "status", timeout=10)["pid"]
    except (OSError, RuntimeError):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
        if mounted_cloudfs(mountpoint):
            raise click.ClickException(f"{mountpoint}: its daemon does not answer") from None
        click.echo(f"cloudfs: the daemon of {mountpoint} was gone; its mount is cleared", err=True)
        return
    result = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True)
    if result.returncode != 0:
        raise click.ClickException(result.stderr.strip() or f"cannot unmount {mountpoint}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise click.ClickException(f"unmounted, but daemon pid {pid} is still running")


@main.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the raw status as JSON.")
def status(mountpoint: Path, as_json: bool) -> None:
    """Show cache use, hit ratio, bytes fetched, requests in flight and the upload backlog."""
    facts = _ask(mountpoint, "status")
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    cache, reads, catalog = facts["cache"], facts["reads"], facts["catalog"]
    ratio = reads["hit_ratio"]
    synced = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(catalog["synced_at"]))
    lines = [
        f"source:            {facts['source']}",
        f"mountpoint:        {facts['mountpoint']} (pid {facts['pid']}, "
        f"up {facts['uptime_seconds']:.0f}s)",
        f"cache:             {format_size(cache['bytes'])} of {format_size(cache['limit'])}, "
        f"{cache['blocks']} blocks of {format_size(cache['block_size'])} in {cache['directory']}",
        f"hit ratio:         {'n/a' if ratio is None else f'{ratio:.1%}'} "
        f"(memory {reads['memory_hits']}, disk {reads['disk_hits']}, "
        f"fetched {reads['blocks_fetched_on_demand']}, read ahead {reads['blocks_read_ahead']})",
        f"fetched:           {format_size(reads['bytes_fetched'])} "
        f"in {reads['requests']} requests, "
        f"{reads['requests_in_flight']} in flight, {reads['fetch_errors']} errors",
        f"prefetched:        {format_size(reads['prefetch_used_bytes'])} used, "
        f"{format_size(reads['prefetch_wasted_bytes'])} wasted, "
        f"{format_size(reads['prefetch_unread_bytes'])} not read yet",
        f"catalog:           {catalog['files']} files, {catalog['directories']} directories, "
        f"{format_size(catalog['bytes'])}, "
        + (
            f"first listing running ({listing['objects']} objects so far, at {listing['at']!r})"
            if (listing := catalog.get("first_listing"))
            else f"refreshed {synced}"
        ),
        f"open files:        {facts['open_files']}",
        _upload_line(facts["uploads"]),
    ]
    dicom = facts.get("dicom")
    if dicom:
        lines.append(
            f"dicom:             {dicom['dicom']} instances in {dicom['studies']} studies, "
            f"{dicom['pending']} objects pending; {dicom['studies_prefetched']} studies "
            f"prefetched, {len(dicom['studies_prefetching'])} in progress"
        )
    if facts.get("audit"):
        lines.append(_audit_line(facts["audit"]))
    if reads["last_error"]:
        lines.append(f"last cloud error:  {reads['last_error']}")
    if facts["uploads"]["last_error"]:
        lines.append(f"last upload error: {facts['uploads']['last_error']}")
    if catalog["last_refresh_error"]:
        lines.append(f"last refresh error: {catalog['last_refresh_error']}")
    if catalog["rejected_keys"]:
        lines.append(f"keys not shown:    {catalog['rejected_keys']} (see --json for examples)")
    click.echo("\n".join(lines))


def _audit_line(audit: dict[str, Any]) -> str:
    line = f"audit:             {audit['written']} records written to {audit['path']}"
    if audit["held"]:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(audit["held_since"]))
        line += (
            f"; {audit['held']} HELD in memory since {since}, the log cannot be written "
            f"({audit['last_error']})"
        )
    if audit["refusing"]:
        line += "; audited accesses REFUSED (EACCES) until it can"
    if audit["dropped"]:
        line += f"; {audit['dropped']} DROPPED (see the log)"
    return line


def _upload_line(uploads: dict[str, Any]) -> str:
    age = uploads["oldest_pending_age"]
    pending = (
        f"{uploads['pending_files']} files ({format_size(uploads['pending_bytes'])}), "
        f"{uploads['pending_renames']} renames, {uploads['pending_deletes']} deletes pending"
        + (f", oldest {age:.0f}s" if age is not None else "")
        + (" (waiting for a pause in the files arriving)" if uploads["waiting_for_pause"] else "")
    )
    return (
        f"uploads:           {pending}; {uploads['uploaded_files']} files "
        f"({format_size(uploads['uploaded_bytes'])}) uploaded, {uploads['conflicts']} conflicts, "
        f"staging {format_size(uploads['staging_bytes'])} of "
        f"{format_size(uploads['staging_limit'])} ({uploads['mode']})"
        + (
            f"; {uploads['damaged_files']} staged files DAMAGED, not uploaded (see the log)"
            if uploads.get("damaged_files")
            else ""
        )
    )


@main.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
def refresh(mountpoint: Path) -> None:
    """Relist the store now, so objects added, changed or deleted by others show at once."""
    report = _ask(mountpoint, "refresh")
    click.echo(
        f"catalog refreshed in {report['seconds']:.1f}s: {report['added']} added, "
        f"{report['changed']} changed, {report['removed']} removed"
    )


_DATE = re.compile(r"^\d{4}-?\d{2}-?\d{2}$")


def _date(context: click.Context, parameter: click.Parameter, value: str | None) -> str | None:
    """YYYY-MM-DD or YYYYMMDD, as DICOM's StudyDate keeps it (YYYYMMDD)."""
    if value is None:
        return None
    if not _DATE.match(value):
        raise click.BadParameter("expected a date as YYYY-MM-DD")
    return value.replace("-", "")


def selector_options(command: Any) -> Any:
    """The options that name a set of studies or files, shared by the DICOM commands."""
    options = [
        click.option("--patient", help="PatientID."),
        click.option("--study", help="StudyInstanceUID."),
        click.option("--path", help="A file or directory under the mount (raw tree)."),
        click.option("--from", "date_from", callback=_date, help="StudyDate from (YYYY-MM-DD)."),
        click.option("--to", "date_to", callback=_date, help="StudyDate up to (YYYY-MM-DD)."),
        click.option("--modality", help="Modality (CT, MR, CR ...)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _selector(mountpoint: Path, **given: str | None) -> dict[str, str]:
    path = given.pop("path", None)
    selector = {
        "from" if name == "date_from" else "to" if name == "date_to" else name: value
        for name, value in given.items()
        if value
    }
    if path:
        absolute = Path(os.path.abspath(path))
        root = Path(os.path.abspath(mountpoint))
        if absolute != root and root not in absolute.parents:
            relative = Path(path)
        else:
            relative = absolute.relative_to(root)
        selector["path"] = relative.as_posix().strip("/")
    return selector


def _need_selector(selector: dict[str, str]) -> None:
    if not selector:
        raise click.UsageError("name what: --patient, --study, --path, --from/--to, --modality")


@main.group()
def audit() -> None:
    """The access audit trail."""


@audit.command("verify")
@click.argument("log_file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
def audit_verify(log_file: Path) -> None:
    """Check LOG_FILE and its rotated predecessors: every record's hash, and the chain from each
    record to the next, so an edited, removed, inserted or reordered record is found."""
    files = rotated_files(log_file)
    result = verify(files)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    if not result.ok:
        where = f"{result.file}:{result.line}" if result.line else str(result.file)
        raise click.ClickException(f"audit trail broken at {where}: {result.reason}")
    start = "" if result.first_seq in (None, 1) else f" (from record {result.first_seq} on)"
    click.echo(f"audit trail intact: {result.records} records in {len(files)} files{start}")


@main.group()
def index() -> None:
    """The DICOM header index of a mount."""


@index.command("status")
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the raw figures as JSON.")
def index_status(mountpoint: Path, as_json: bool) -> None:
    """Show how far indexing is: objects read, DICOM instances, studies, what is pending."""
    facts = _ask(mountpoint, "index")
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    done = facts["indexed"] / facts["objects"] if facts["objects"] else 1.0
    lines = [
        f"indexed:     {facts['indexed']} of {facts['objects']} objects ({done:.1%}), "
        f"{facts['pending']} pending",
        f"DICOM:       {facts['dicom']} instances, {facts['series']} series, "
        f"{facts['studies']} studies, {facts['patients']} patients; "
        f"{facts['not_dicom']} other objects",
        f"view:        {facts['placed_in_view']} instances placed",
        f"headers:     {facts['headers_read']} read, {format_size(facts['header_bytes'])} fetched,"
        f" {facts['read_failures']} failed reads",
        f"prefetch:    {facts['studies_prefetched']} studies made local"
        + "".join(
            f"; {job['study']}: {job['done']}/{job['total']}"
            for job in facts["studies_prefetching"]
        ),
    ]
    if facts["last_error"]:
        lines.append(f"last error:  {facts['last_error']}")
    click.echo("\n".join(lines))


@main.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
@selector_options
@click.option(
    "--limit", type=click.IntRange(1), default=1000, show_default=True, help="Studies at most."
)
@click.option("--names", is_flag=True, help="Show patient names (PHI) too.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document, for scripts.")
def studies(
    mountpoint: Path, limit: int, names: bool, as_json: bool, **selector: str | None
) -> None:
    """List indexed studies, newest first, optionally filtered."""
    rows = _ask(
        mountpoint, "studies", {"selector": _selector(mountpoint, **selector), "limit": limit}
    )["studies"]
    if not names:
        for row in rows:
            row.pop("patient_name", None)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    columns = ["study_date", "patient_id", *(["patient_name"] if names else [])]
    columns += ["modalities", "series", "instances", "bytes", "accession", "description"]
    columns.append("study_uid")
    table = [
        [format_size(row[c]) if c == "bytes" else str(row[c]) for c in columns] for row in rows
    ]
    widths = [max([len(c), *(len(r[i]) for r in table)]) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
    for line in table:
        click.echo("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())


def _pin_summary(reply: dict[str, Any]) -> str:
    return (
        f"{reply['pinned_files']} files pinned ({format_size(reply['pinned_bytes'])} of "
        f"{format_size(reply['limit'])} allowed)"
    )


@main.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
@selector_options
def pin(mountpoint: Path, **selector: str | None) -> None:
    """Keep what the selector names in the cache: fetched now, never evicted."""
    chosen = _selector(mountpoint, **selector)
    _need_selector(chosen)
    click.echo(_pin_summary(_ask(mountpoint, "pin", {"selector": chosen})))


@main.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
@selector_options
def unpin(mountpoint: Path, **selector: str | None) -> None:
    """Drop a pin made with the same selector; its blocks become evictable."""
    chosen = _selector(mountpoint, **selector)
    _need_selector(chosen)
    click.echo(_pin_summary(_ask(mountpoint, "unpin", {"selector": chosen})))


@main.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the pins as JSON.")
def pins(mountpoint: Path, as_json: bool) -> None:
    """List the pins of a mount and what they hold."""
    reply = _ask(mountpoint, "pins")
    if as_json:
        click.echo(json.dumps(reply, indent=2))
        return
    for selector in reply["pins"]:
        click.echo("pin: " + " ".join(f"--{k} {v}" for k, v in selector.items()))
    if reply["tiering"]:
        click.echo(f"tiering: studies from {reply['tiering']['from']} on")
    click.echo(
        _pin_summary(reply) + f"; {format_size(reply['pinned_in_cache'])} of it in the cache"
    )


@main.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
@selector_options
@click.option("--quiet", is_flag=True, help="No progress bar; only the final line.")
def prefetch(mountpoint: Path, quiet: bool, **selector: str | None) -> None:
    """Fetch what the selector names into the cache now, with a progress bar."""
    chosen = _selector(mountpoint, **selector)
    _need_selector(chosen)
    progress = _ask(mountpoint, "prefetch", {"selector": chosen})
    number = progress["id"]
    shown = 0

    def describe(_: object) -> str:
        rate = progress["fetched_bytes"] / max(progress["seconds"], 1e-3)
        return f"{progress['files_done']}/{progress['files']} files, {format_size(rate)}/s"

    with click.progressbar(
        length=progress["bytes"],
        label=f"prefetch {format_size(progress['bytes'])}",
        show_eta=True,
        item_show_func=describe,
        hidden=quiet,
    ) as bar:
        while True:
            bar.update(progress["bytes_done"] - shown, progress)
            shown = progress["bytes_done"]
            if progress["finished"]:
                break
            time.sleep(0.5)
            progress = _ask(mountpoint, "prefetch-progress", {"id": number})
    rate = progress["fetched_bytes"] / max(progress["seconds"], 1e-3)
    click.echo(
        f"{progress['files_done']} files ({format_size(progress['bytes'])}) local in "
        f"{progress['seconds']:.1f}s: {format_size(progress['fetched_bytes'])} fetched at "
        f"{format_size(rate)}/s, {progress['failed']} failed"
    )
    if progress["failed"]:
        raise click.ClickException(f"{progress['failed']} files failed: {progress['last_error']}")


@main.command()
@click.option(
    "--mountpoint",
    type=click.Path(path_type=Path),
    default=lambda: str(Path.home() / "cloudfs-demo"),
    show_default="~/cloudfs-demo",
    help="Where to mount the sample archive.",
)
@click.option(
    "--archive",
    type=click.Path(path_type=Path),
    default=lambda: str(_demo_home() / "archive"),
    show_default=True,
    help="Where the sample archive is generated (once).",
)
def demo(mountpoint: Path, archive: Path) -> None:
    """Mount the embedded default: a local sample archive, generated on first run."""
    from .demo import generate_samples

    created = generate_samples(archive)
    if created:
        click.echo(f"cloudfs: generated {created} sample files in {archive}", err=True)
    mountpoint = mountpoint.absolute()
    mountpoint.mkdir(parents=True, exist_ok=True)
    if mounted_cloudfs(mountpoint):
        click.echo(f"cloudfs: the demo is already mounted at {mountpoint}", err=True)
    else:
        cache_dir = archive.absolute().parent / "cache"
        source = f"file://{archive.absolute()}"
        _start_daemon(
            ["mount", source, str(mountpoint), "--cache-dir", str(cache_dir), "--cache-size", "2G"],
            cache_dir,
            None,
        )
    me = sys.argv[0]
    click.echo(
        f"\nThe demo archive is mounted at {mountpoint}\n"
        f"  look:   ls -l {mountpoint}; cat {mountpoint}/README.txt\n"
        f"  status: {me} status {mountpoint}\n"
        f"  stop:   {me} unmount {mountpoint}"
    )


@main.command("export-staged")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option(
    "--cache-key-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The key of the mount that staged it [default: $CLOUDFS_CACHE_KEY].",
)
def export_staged(path: Path, cache_key_file: Path | None) -> None:
    """Write a staged file (such as one set aside in CACHE_DIR/staging/unsynced/) to stdout,
    decrypted if the mount sealed it; a chunk altered on disk stops it with an error."""
    from .crypto import load_key
    from .staging import export

    try:
        export(path, load_key(cache_key_file), sys.stdout.buffer)
    except CloudfsError as exc:
        raise click.ClickException(f"{path}: {exc}") from None


def _demo_home() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/cloudfs/demo")
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local/share")) / "cloudfs/demo"
