"""The per-mount TOML file: precedence (flag > file > default) and every way it is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cloudfs import cli, configfile
from cloudfs.errors import ConfigError


def write_config(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "archive.toml"
    path.write_text(text)
    path.chmod(mode)
    return path


def mount_with(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str, dict[str, Any]]:
    """Run ``cloudfs mount ARGS`` up to the point where it would mount; returns the exit code,
    the output and the settings the mount would have used."""
    seen: dict[str, Any] = {}
    monkeypatch.setattr(cli, "_mount", lambda **settings: seen.update(settings))
    result = CliRunner().invoke(cli.main, ["mount", *args])
    return result.exit_code, result.output, seen


FULL = """
source = "s3://pacs-archive/studies"
mountpoint = "/mnt/archive"
[cache]
dir = "/var/cache/cloudfs/archive"
size = "500G"
read_ahead = "64M"
[mount]
read_only = true
free_space = "500G"
fuse_options = ["allow_other"]
[write]
upload_mode = "sync"
upload_threads = 4
[s3]
endpoint_url = "https://s3.example.internal"
path_style = true
[dicom]
patient_folder = "name"
priors = 1
keep_recent_days = 365
[log]
level = "warning"
"""


def test_file_values_reach_the_mount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, output, seen = mount_with(monkeypatch, "--config", str(write_config(tmp_path, FULL)))
    assert code == 0, output
    assert seen["source"] == "s3://pacs-archive/studies"
    assert seen["mountpoint"] == Path("/mnt/archive")
    assert seen["cache_dir"] == Path("/var/cache/cloudfs/archive")
    assert seen["cache_size"] == 500 << 30
    assert seen["read_ahead"] == 64 << 20
    assert seen["read_only"] is True
    assert tuple(seen["fuse_options"]) == ("allow_other",)
    assert seen["free_space"] == 500 << 30
    assert seen["upload_mode"] == "sync" and seen["upload_threads"] == 4
    assert seen["endpoint_url"] == "https://s3.example.internal" and seen["path_style"] is True
    assert seen["patient_folder"] == "name" and seen["priors"] == 1
    assert seen["keep_recent_days"] == 365
    assert seen["log_level"] == "warning"
    # Untouched options keep their defaults.
    assert seen["block_size"] == 1 << 20 and seen["upload_delay"] == 1.0


def test_flags_override_the_file_and_the_file_overrides_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path, FULL)
    code, output, seen = mount_with(
        monkeypatch,
        "s3://other/bucket",
        "/mnt/elsewhere",
        "--config",
        str(path),
        "--cache-size",
        "20G",
        "--upload-mode",
        "async",
        "--priors",
        "0",
    )
    assert code == 0, output
    assert seen["source"] == "s3://other/bucket"
    assert seen["mountpoint"] == Path("/mnt/elsewhere")
    assert seen["cache_size"] == 20 << 30
    assert seen["upload_mode"] == "async"
    assert seen["priors"] == 0
    assert seen["read_ahead"] == 64 << 20  # from the file


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sauce = 'x'", "unknown key 'sauce'"),
        ("[cache]\nsise = '1G'", "unknown key [cache] sise (known in [cache]: backup_programs"),
        ("[caches]\nsize = '1G'", "unknown key 'caches'"),
        ("[cache]\nsize = 'lots'", "[cache] size: not a size: 'lots'"),
        ("[write]\nupload_mode = 'fast'", "[write] upload_mode: 'fast' is not one of"),
        ("[write]\nupload_threads = 'many'", "[write] upload_threads:"),
        ("[dicom]\npriors = 99", "[dicom] priors: 99 is not in the range"),
        ("[mount]\nread_only = 'perhaps'", "[mount] read_only:"),
        ("[mount]\nfree_space = 'plenty'", "[mount] free_space: not a size: 'plenty'"),
        ("source = [", "not valid TOML"),
    ],
)
def test_invalid_files_name_the_key_and_the_expected_form(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, message: str
) -> None:
    code, output, seen = mount_with(monkeypatch, "--config", str(write_config(tmp_path, text)))
    assert code != 0 and not seen
    assert message in output, output
    assert str(tmp_path / "archive.toml") in output


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o620, 0o666])
def test_files_open_to_others_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int
) -> None:
    code, output, seen = mount_with(
        monkeypatch, "--config", str(write_config(tmp_path, FULL, mode))
    )
    assert code != 0 and not seen
    assert f"open to others (mode {mode:04o})" in output and "chmod 600" in output


def test_private_modes_are_accepted(tmp_path: Path) -> None:
    for mode in (0o600, 0o640, 0o400):
        configfile.check_private(write_config(tmp_path, FULL, mode), "configuration file")


def test_missing_source_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path, "mountpoint = '/mnt/x'")
    code, output, seen = mount_with(monkeypatch, "--config", str(path))
    assert code != 0 and not seen and "missing SOURCE" in output


def test_unreadable_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the configuration file"):
        configfile.load(tmp_path / "absent.toml")


def test_every_file_key_names_a_mount_option() -> None:
    names = {parameter.name for parameter in cli.mount.params}
    for section in configfile.KEYS.values():
        assert set(section.values()) <= names


def test_free_space_flag_sets_statfs_and_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--free-space`` reaches the mount options; a value statfs cannot report (less than one
    cache block) is refused before anything is mounted, with the reason."""
    code, output, seen = mount_with(monkeypatch, "s3://b", "/mnt/x", "--free-space", "2T")
    assert code == 0, output
    assert seen["free_space"] == 2 << 40
    monkeypatch.undo()
    built: list[Any] = []
    monkeypatch.setattr(cli, "_start_daemon", lambda *args: built.append(args))
    result = CliRunner().invoke(cli.main, ["mount", "s3://b", "/mnt/x", "--free-space", "4K"])
    assert result.exit_code != 0 and not built
    assert "free space must be at least one cache block" in result.output, result.output
    result = CliRunner().invoke(cli.main, ["mount", "s3://b", "/mnt/x", "--free-space", "some"])
    assert result.exit_code != 0 and "not a size: 'some'" in result.output, result.output


def test_backup_programs_from_the_file_the_flag_or_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TOML list or a comma-separated flag; '' means none; the default names the usual
    archivers and backup clients."""
    base = 'source = "file:///srv/archive"\nmountpoint = "/mnt/archive"\n'
    listed = write_config(tmp_path, base + '[cache]\nbackup_programs = ["tar", " bacula-fd "]\n')
    code, output, seen = mount_with(monkeypatch, "--config", str(listed))
    assert code == 0, output
    assert seen["backup_programs"] == frozenset({"tar", "bacula-fd"})
    code, output, seen = mount_with(
        monkeypatch, "--config", str(listed), "--backup-programs", "rsync,restic"
    )
    assert code == 0, output
    assert seen["backup_programs"] == frozenset({"rsync", "restic"})
    code, output, seen = mount_with(monkeypatch, "--config", str(listed), "--backup-programs", "")
    assert code == 0, output
    assert seen["backup_programs"] == frozenset()
    code, output, seen = mount_with(monkeypatch, "file:///srv/archive", "/mnt/archive")
    assert code == 0, output
    assert {"tar", "rsync", "bacula-fd"} <= seen["backup_programs"]
    wrong = write_config(tmp_path, base + "[cache]\nbackup_programs = [1, 2]\n")
    code, output, _ = mount_with(monkeypatch, "--config", str(wrong))
    assert code != 0 and "backup_programs" in output and "expected names" in output, output
