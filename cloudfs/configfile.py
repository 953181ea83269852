"""The per-mount TOML file (``/etc/cloudfs/<name>.toml``): what it may hold and how it is checked.

Every key names one ``cloudfs mount`` option, so the file and the command line share one meaning,
one default and one validation (the option's own type converts the file's value).  Precedence:
an option given on the command line wins over the file, the file over the default.

Checks, each failing with one message that names the file, the key and what was expected:
unknown sections and keys (a typo must not silently fall back to a default), values of the wrong
form, and a file that others may read or anyone but its owner may change (it says where the
archive's data goes and may sit beside credentials).
"""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path
from typing import Any

from .errors import ConfigError

KEYS: dict[str, dict[str, str]] = {
    "": {"source": "source", "mountpoint": "mountpoint"},
    "cache": {
        "dir": "cache_dir",
        "size": "cache_size",
        "key_file": "cache_key_file",
        "block_size": "block_size",
        "read_ahead": "read_ahead",
        "read_ahead_memory": "read_ahead_memory",
        "io_timeout": "io_timeout",
        "backup_programs": "backup_programs",
    },
    "mount": {
        "read_only": "read_only",
        "refresh_interval": "refresh_interval",
        "attr_timeout": "attr_timeout",
        "restore_days": "restore_days",
        "free_space": "free_space",
        "fuse_options": "fuse_options",
        "uid": "owner_uid",
        "gid": "owner_gid",
        "umask": "umask",
    },
    "write": {
        "staging_size": "staging_size",
        "upload_mode": "upload_mode",
        "sync_on_close": "sync_on_close",
        "upload_delay": "upload_delay",
        "upload_max_delay": "upload_max_delay",
        "upload_threads": "upload_threads",
        "part_size": "part_size",
        "drain_timeout": "drain_timeout",
    },
    "s3": {
        "endpoint_url": "endpoint_url",
        "region": "region",
        "profile": "profile",
        "path_style": "path_style",
        "sse": "sse",
        "sse_kms_key_id": "sse_kms_key_id",
        "verify_tls": "verify_tls",
    },
    "dicom": {
        "index": "dicom_index",
        "view_dir": "view_dir",
        "patient_folder": "patient_folder",
        "study_prefetch": "study_prefetch",
        "prefetch_threads": "prefetch_threads",
        "max_study_size": "max_study_size",
        "priors": "priors",
        "keep_recent_days": "keep_recent_days",
    },
    "metrics": {"address": "metrics_address"},
    "audit": {
        "path": "audit_log",
        "level": "audit_level",
        "max_size": "audit_max_size",
        "backups": "audit_backups",
        "syslog": "audit_syslog",
        "when_unwritable": "audit_when_unwritable",
    },
    "log": {"level": "log_level", "file": "log_file"},
}
"""Section -> key -> the ``cloudfs mount`` parameter it sets ("" is the top level)."""


def _describe(section: str, key: str) -> str:
    return f"[{section}] {key}" if section else key


def check_private(path: Path, what: str) -> None:
    """Refuse a file others may read, or anyone but its owner may change."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what}: {exc.strerror}") from None
    if mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IWGRP):
        raise ConfigError(
            f"{path}: the {what} is open to others (mode {stat.S_IMODE(mode):04o}); "
            f"make it private: chmod 600 {path}"
        )


def load(path: Path) -> dict[str, tuple[str, Any]]:
    """The file's settings as ``parameter -> (where, raw value)``; ConfigError if unusable."""
    check_private(path, "configuration file")
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    settings: dict[str, tuple[str, Any]] = {}
    for name, value in document.items():
        if isinstance(value, dict) and name in KEYS and name:
            section, entries = name, value
        elif name in KEYS[""]:
            settings[KEYS[""][name]] = (name, value)
            continue
        else:
            known = sorted([*KEYS[""], *(f"[{s}]" for s in KEYS if s)])
            raise ConfigError(f"{path}: unknown key {name!r} (known: {', '.join(known)})")
        for key, item in entries.items():
            parameter = KEYS[section].get(key)
            if parameter is None:
                raise ConfigError(
                    f"{path}: unknown key {_describe(section, key)} "
                    f"(known in [{section}]: {', '.join(sorted(KEYS[section]))})"
                )
            settings[parameter] = (_describe(section, key), item)
    return settings
