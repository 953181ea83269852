"""Running cloudfs as a service: the systemd unit, readiness notification, fstab mounts and the
example configuration, each with the real programs (systemd-analyze, mount(8), mount.fuse3)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    PYTHON,
    Bucket,
    MotoServer,
    Mounter,
    cloudfs,
    drop_kernel_caches,
    fill,
    free_port,
    is_mounted,
    new_bucket,
    wait_until,
)
from dicom_samples import synthetic_study

from cloudfs import configfile
from cloudfs.catalog import Catalog
from cloudfs.listing import list_into_catalog
from cloudfs.store.local import LocalStore

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "cloudfs@.service"
VENV_BIN = Path(PYTHON).parent


def archive(tmp_path: Path) -> tuple[Path, bytes]:
    source = tmp_path / "archive"
    (source / "studies").mkdir(parents=True)
    data = os.urandom(300_000)
    (source / "studies" / "a.dcm").write_bytes(data)
    return source, data


@contextlib.contextmanager
def unmounted_after(mountpoint: Path) -> Iterator[None]:
    try:
        yield
    finally:
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)


@contextlib.contextmanager
def installed_command() -> Iterator[None]:
    """``cloudfs`` in /usr/local/bin, as the README installs it: mount(8) runs its helpers with a
    fixed PATH, so this checkout's virtualenv is not on it."""
    link = Path("/usr/local/bin/cloudfs")
    made = not link.exists() and not link.is_symlink()
    if made:
        link.symlink_to(VENV_BIN / "cloudfs")
    try:
        yield
    finally:
        if made:
            link.unlink()


def test_unit_file_verifies(tmp_path: Path) -> None:
    """``systemd-analyze verify`` accepts the unit (with ExecStart pointing at this checkout's
    cloudfs), and rejects a broken copy, so the check itself is real."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing (apt-get install systemd)")
    text = UNIT.read_text().replace("/usr/local/bin/cloudfs", str(VENV_BIN / "cloudfs"))
    for name, body in (("good", text), ("bad", text + "\n[Service]\nExecStart=/nonexistent\n")):
        template = tmp_path / f"cloudfs-{name}@.service"
        template.write_text(body)
        instance = tmp_path / f"cloudfs-{name}@archive.service"
        instance.symlink_to(template)
        result = subprocess.run([analyze, "verify", str(instance)], capture_output=True, text=True)
        assert (result.returncode == 0) == (name == "good"), result.stdout + result.stderr
    for directive in ("Type=notify", "Restart=on-failure", "NoNewPrivileges=yes"):
        assert directive in text


def test_example_configuration_is_valid(tmp_path: Path) -> None:
    example = tmp_path / "archive.toml"
    shutil.copy(ROOT / "systemd" / "archive.toml.example", example)
    example.chmod(0o600)
    settings = configfile.load(example)
    assert settings["source"][1].startswith("s3://")
    assert settings["mountpoint"][1] == "/mnt/archive"
    assert settings["audit_log"][1].startswith("/var/log/cloudfs/")


def state_change(listener: socket.socket) -> str:
    """The next notification that is not a STATUS line (the first listing sends those)."""
    while (message := listener.recv(4096).decode()).startswith("STATUS="):
        pass
    return message


def test_notify_ready_only_once_the_mount_answers_and_stopping_on_sigterm(
    integration_environment: None, tmp_path: Path
) -> None:
    """With $NOTIFY_SOCKET set (as systemd sets it), READY=1 arrives only when the mount is up
    and answering, and SIGTERM sends STOPPING=1, unmounts and exits 0."""
    source, data = archive(tmp_path)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = str(tmp_path / "notify.sock")
    listener.bind(address)
    listener.settimeout(60)
    config = tmp_path / "archive.toml"
    config.write_text(
        f'source = "file://{source}"\nmountpoint = "{mountpoint}"\n'
        f'[cache]\ndir = "{tmp_path / "cache"}"\nsize = "1G"\n'
    )
    config.chmod(0o600)
    environment = dict(os.environ, NOTIFY_SOCKET=address)
    process = subprocess.Popen(
        [PYTHON, "-m", "cloudfs", "mount", "--config", str(config), "--foreground"],
        env=environment,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd="/",
    )
    with unmounted_after(mountpoint), listener:
        try:
            message = state_change(listener)
            assert message == "READY=1", message
            assert is_mounted(mountpoint)
            assert (mountpoint / "studies" / "a.dcm").read_bytes() == data
            process.send_signal(signal.SIGTERM)
            assert state_change(listener) == "STOPPING=1"
            assert process.wait(60) == 0
            assert not is_mounted(mountpoint)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)


def test_a_long_first_listing_reports_its_progress_to_the_log_and_to_systemd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """While the first listing runs (the mount already answers), each progress report goes to
    the log and to systemd as a STATUS line, which ``systemctl status`` shows."""
    root = tmp_path / "root"
    for i in range(2500):
        (root / f"d{i % 5}").mkdir(parents=True, exist_ok=True)
        (root / f"d{i % 5}" / f"f{i:05d}").write_bytes(b"x")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = str(tmp_path / "notify.sock")
    listener.bind(address)
    listener.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setattr("cloudfs.listing.PROGRESS_PERIOD", 0.0)
    catalog = Catalog(tmp_path / "catalog.sqlite")
    batches: list[str] = []
    with listener, caplog.at_level(logging.INFO, logger="cloudfs.listing"):
        list_into_catalog(
            LocalStore(root), catalog, lambda report: batches.append(report.listed_up_to)
        )
        messages = [listener.recv(4096).decode() for _ in range(3)]
    assert messages == [
        f"STATUS=listing the store: {count} objects added to the catalog so far"
        for count in (1000, 2000, 2500)
    ]
    assert batches == ["d1/f02496", "d3/f02498", "d4/f02499"]
    assert "2000 objects added to the catalog so far" in caplog.text


def test_mount_t_fuse_cloudfs_through_mount_fuse3(
    integration_environment: None, tmp_path: Path
) -> None:
    """An fstab-style mount: ``mount -t fuse.cloudfs SOURCE DIR -o _netdev,cache_dir=...``
    runs cloudfs through mount.fuse3; the options reach cloudfs and the files read back."""
    if shutil.which("mount.fuse3") is None:
        pytest.fail("mount.fuse3 is missing (apt-get install fuse3)")
    source, data = archive(tmp_path)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    cache = tmp_path / "fstab-cache"
    options = f"_netdev,nofail,cache_dir={cache},cache_size=1G,read_only"
    with unmounted_after(mountpoint), installed_command():
        result = subprocess.run(
            ["mount", "-t", "fuse.cloudfs", f"file://{source}", str(mountpoint), "-o", options],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert wait_until(lambda: is_mounted(mountpoint), 30)
        assert (mountpoint / "studies" / "a.dcm").read_bytes() == data
        assert (cache / "catalog.sqlite").exists(), "cache_dir did not reach cloudfs"
        with pytest.raises(OSError):
            (mountpoint / "studies" / "new.dcm").write_bytes(b"x")  # read_only reached it
        unmount = cloudfs("unmount", mountpoint)
        assert unmount.returncode == 0, unmount.stderr
    assert sys.platform.startswith("linux")


def scrape(port: int) -> dict[str, float]:
    """``/metrics`` as name{labels} -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    figures = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            figures[name] = float(value)
    return figures


def test_metrics_move_with_reads_miss_then_hit(mount: Mounter, bucket: Bucket) -> None:
    """A cold read shows as a cache miss and cloud bytes, the same read from the disk cache as
    hits; the latency histogram counts both; the catalog figures are there.  Read-ahead of a
    large object read to its end shows as used prefetch bytes, of one read only at its start
    as unread ones."""
    data = os.urandom(3 << 20)
    bucket.put("studies/a.dcm", data)
    large = os.urandom(24 << 20)
    bucket.put("large/whole.bin", large)
    bucket.put("large/started.bin", large)
    port = free_port()
    m = mount(bucket, options=["--metrics", f"127.0.0.1:{port}", "--no-study-prefetch"])
    before = scrape(port)
    assert before["cloudfs_cache_misses_total"] == 0
    assert before['cloudfs_prefetch_outcome_bytes_total{outcome="used"}'] == 0
    assert (m.path / "studies" / "a.dcm").read_bytes() == data
    cold = scrape(port)
    assert cold["cloudfs_cache_misses_total"] >= 3
    assert cold["cloudfs_cloud_fetched_bytes_total"] >= len(data)
    assert cold['cloudfs_read_latency_seconds_count{source="cloud"}'] >= 1
    assert (m.path / "large" / "whole.bin").read_bytes() == large
    read_ahead = scrape(port)
    assert read_ahead['cloudfs_prefetch_outcome_bytes_total{outcome="used"}'] >= 8 << 20
    assert read_ahead['cloudfs_prefetch_outcome_bytes_total{outcome="wasted"}'] == 0
    with open(m.path / "large" / "started.bin", "rb") as handle:
        for _ in range(16):
            assert handle.read(128 << 10)
        assert wait_until(lambda: scrape(port)["cloudfs_prefetch_unread_bytes"] >= 1 << 20, 20)
    m.unmount()
    drop_kernel_caches()
    again = mount(bucket, cache_dir=m.cache_dir, options=["--metrics", f"127.0.0.1:{port}"])
    assert (again.path / "studies" / "a.dcm").read_bytes() == data
    warm = scrape(port)
    assert warm['cloudfs_cache_hits_total{source="disk"}'] >= 3
    assert warm["cloudfs_cloud_fetched_bytes_total"] == 0
    assert warm["cloudfs_cache_served_bytes_total"] >= len(data)
    assert wait_until(lambda: scrape(port).get("cloudfs_catalog_files") == 3, 20)


def audit_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def verified_after_full_disk(path: Path) -> list[dict[str, Any]]:
    """The records of a log that a full disk interrupted, once ``verify`` has passed on it
    (a line the full disk cut short is bridged by the chain, and skipped here)."""
    assert cloudfs("audit", "verify", path).returncode == 0
    records = []
    for line in path.read_bytes().splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records


def test_audit_trail_records_who_did_what_and_verify_catches_tampering(
    mount: Mounter, bucket: Bucket, tmp_path: Path
) -> None:
    """Each operation leaves a record with this process's uid, pid and executable, the path,
    and the patient and study of a DICOM file; reads are folded into one record per handle;
    a refused access is recorded with its errno.  ``cloudfs audit verify`` passes on the log
    and fails on a copy with an edited, a removed and a swapped line."""
    study = synthetic_study("AUD-1", 1, [("CT", 2)], rows=64, columns=64)
    for key, data in study:
        bucket.put(key, data)
    log_path = tmp_path / "audit" / "access.jsonl"
    m = mount(bucket, options=["--audit-log", str(log_path), "--audit-level", "all"])
    assert wait_until(
        lambda: json.loads(cloudfs("index", "status", m.path, "--json").stdout)["pending"] == 0,
        60,
    )
    key, data = study[0]
    with open(m.path / key, "rb") as handle:  # many small reads, one record
        while handle.read(4096):
            pass
    (m.path / "incoming").mkdir()
    (m.path / "incoming" / "new.dcm").write_bytes(b"x" * 5000)
    os.rename(m.path / "incoming" / "new.dcm", m.path / "incoming" / "renamed.dcm")
    os.unlink(m.path / "incoming" / "renamed.dcm")
    view_file = next((m.path / "@dicom" / "by-patient" / "AUD-1").rglob("*.dcm"))
    with pytest.raises(OSError):
        open(view_file, "r+b")  # noqa: SIM115  (refused: the view is read-only)
    m.unmount()
    records = audit_records(log_path)
    mine = [r for r in records if r["pid"] == os.getpid()]
    assert all(r["uid"] == os.getuid() and r["gid"] == os.getgid() for r in mine)
    assert {os.path.realpath(r["executable"]) for r in mine} == {os.path.realpath(sys.executable)}
    reads = [r for r in mine if r["operation"] == "read" and r["path"] == key]
    assert len(reads) == 1 and reads[0]["bytes"] == len(data), reads
    assert reads[0]["patient_id"] == "AUD-1" and reads[0]["study_uid"]
    opened = [r for r in mine if r["operation"] == "open" and r["path"] == key]
    assert opened and opened[0]["outcome"] == "success"
    operations = [(r["operation"], r["path"]) for r in mine]
    for expected in [
        ("mkdir", "incoming"),
        ("create", "incoming/new.dcm"),
        ("rename", "incoming/new.dcm -> incoming/renamed.dcm"),
        ("unlink", "incoming/renamed.dcm"),
    ]:
        assert expected in operations, operations
    written = [r for r in mine if r["operation"] == "write"]
    assert written and written[0]["bytes"] == 5000
    refused = [r for r in mine if r["outcome"] == "EROFS"]
    assert refused and refused[0]["path"].startswith("@dicom/by-patient/AUD-1/")
    verified = cloudfs("audit", "verify", log_path)
    assert verified.returncode == 0, verified.stderr
    assert f"{len(records)} records" in verified.stdout
    lines = log_path.read_text().splitlines()
    edited = list(lines)
    edited[1] = edited[1].replace('"uid":0', '"uid":1000')
    removed = lines[:2] + lines[3:]
    swapped = [lines[0], lines[2], lines[1], *lines[3:]]
    for name, body, line in (
        ("edited", edited, 2),
        ("removed", removed, 3),
        ("swapped", swapped, 2),
    ):
        copy = tmp_path / f"{name}.jsonl"
        copy.write_text("\n".join(body) + "\n")
        result = cloudfs("audit", "verify", copy)
        assert result.returncode != 0, name
        assert f"audit trail broken at {copy}:{line}:" in result.stderr, result.stderr


def test_an_audit_log_on_a_full_disk_keeps_its_records_until_space_is_freed(
    mount: Mounter, bucket: Bucket, small_disk: Path
) -> None:
    """The disk holding the audit log fills up while a PACS writes through the mount: the
    writes go on, ``cloudfs status`` says records are held in memory and why, and once space is
    freed every access of that time is in the log, which verifies; the metrics say the same."""
    bucket.put("before.dcm", b"b" * 1000)
    log_path = small_disk / "audit" / "access.jsonl"
    port = free_port()
    options = ["--audit-log", str(log_path), "--no-dicom-index", "--metrics", f"127.0.0.1:{port}"]
    m = mount(bucket, options=options)
    assert (m.path / "before.dcm").read_bytes() == b"b" * 1000
    filler = fill(small_disk, leave=0)
    names = [f"made-{number:03d}-{'x' * 150}.dcm" for number in range(100)]
    for name in names:
        (m.path / name).write_bytes(b"y" * 100)
    assert wait_until(lambda: "HELD" in cloudfs("status", m.path).stdout, 30)
    status = cloudfs("status", m.path).stdout
    assert "the log cannot be written (" in status and "No space left on device" in status
    assert wait_until(lambda: scrape(port)["cloudfs_audit_records_held"] > 0, 30)
    filler.unlink()
    assert wait_until(lambda: "HELD" not in cloudfs("status", m.path).stdout, 30)
    assert "DROPPED" not in cloudfs("status", m.path).stdout
    assert wait_until(lambda: scrape(port)["cloudfs_audit_records_held"] == 0, 30)
    assert scrape(port)["cloudfs_audit_records_dropped_total"] == 0
    m.unmount()
    records = verified_after_full_disk(log_path)
    created = [r["path"] for r in records if r["operation"] == "create"]
    assert created == names


def test_failing_closed_an_unwritable_audit_log_refuses_access_until_space_is_freed(
    mount: Mounter, bucket: Bucket, small_disk: Path
) -> None:
    """``--audit-when-unwritable refuse``: once the log's disk refuses a record, opening a file
    fails with EACCES (listing still works), status and metrics say accesses are refused; once
    space is freed the same open succeeds, and the log, which verifies, holds the refusals."""
    bucket.put("study.dcm", b"s" * 1000)
    log_path = small_disk / "audit" / "access.jsonl"
    port = free_port()
    options = ["--audit-log", str(log_path), "--audit-when-unwritable", "refuse"]
    m = mount(bucket, options=[*options, "--no-dicom-index", "--metrics", f"127.0.0.1:{port}"])
    assert (m.path / "study.dcm").read_bytes() == b"s" * 1000
    filler = fill(small_disk, leave=0)

    def refused() -> bool:
        try:
            (m.path / "study.dcm").read_bytes()
        except PermissionError:
            return True
        return False

    assert wait_until(refused, 30)
    assert os.listdir(m.path) == ["study.dcm"]
    with pytest.raises(PermissionError):
        (m.path / "new.dcm").write_bytes(b"n")
    assert "audited accesses REFUSED (EACCES)" in cloudfs("status", m.path).stdout
    assert wait_until(lambda: scrape(port)["cloudfs_audit_refusing_access"] == 1, 30)
    filler.unlink()
    assert wait_until(lambda: not refused(), 30)
    (m.path / "new.dcm").write_bytes(b"n")
    assert "REFUSED" not in cloudfs("status", m.path).stdout
    assert wait_until(lambda: scrape(port)["cloudfs_audit_refusing_access"] == 0, 30)
    m.unmount()
    records = verified_after_full_disk(log_path)
    outcomes = [(r["operation"], r["path"], r["outcome"]) for r in records]
    assert ("open", "study.dcm", "EACCES") in outcomes
    assert ("create", "new.dcm", "EACCES") in outcomes
    assert ("create", "new.dcm", "success") in outcomes


def test_allow_other_applies_modes_and_owner_mapping(mount: Mounter, bucket: Bucket) -> None:
    """With ``-o allow_other`` the kernel checks the shown modes (``default_permissions`` is
    added); ``--uid/--gid/--umask`` give objects that carry no owner or mode theirs, so another
    user is refused a file the mapping keeps from them, and may read one it allows."""
    bucket.put("private/a.dcm", b"p" * 1000)
    m = mount(
        bucket, options=["-o", "allow_other", "--uid", "4242", "--gid", "4242", "--umask", "027"]
    )
    mounts = Path("/proc/mounts").read_text().splitlines()
    options = next(line.split()[3] for line in mounts if line.split()[1] == str(m.path))
    assert "allow_other" in options and "default_permissions" in options, options
    info = (m.path / "private" / "a.dcm").stat()
    assert (info.st_uid, info.st_gid) == (4242, 4242)
    assert info.st_mode & 0o777 == 0o640
    assert (m.path / "private").stat().st_mode & 0o777 == 0o750

    # The test's own directories are root's alone: the other user reaches the mount through
    # a descriptor of its root, so only the mount's permissions decide.
    root = os.open(m.path, os.O_PATH | os.O_DIRECTORY)

    def read_as(uid: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "cat",
             f"/proc/self/fd/{root}/private/a.dcm"],
            capture_output=True,
            text=True,
            timeout=30,
            pass_fds=(root,),
        )  # fmt: skip

    refused = read_as(5555)
    assert refused.returncode != 0 and "Permission denied" in refused.stderr, refused
    allowed = read_as(4242)
    os.close(root)
    assert allowed.returncode == 0 and allowed.stdout == "p" * 1000, allowed.stderr


def test_encrypted_cache_holds_no_plaintext_and_refetches_a_tampered_block(
    mount: Mounter, bucket: Bucket, tmp_path: Path
) -> None:
    """With a cache key, no 64-byte run of a file read through the mount appears anywhere
    under the cache directory, nor its object key in any file or name there (the catalog
    included); a block with one flipped bit fails authentication and is fetched again, so the
    reader still gets the right bytes.  A key file others may read is refused."""
    data = os.urandom(3 << 20)
    key = "patients/PAT-SECRET-77/ct/a.dcm"
    bucket.put(key, data)
    key_file = tmp_path / "cache.key"
    key_file.write_text(os.urandom(32).hex())
    key_file.chmod(0o644)
    refused = mount.attempt(bucket, options=["--cache-key-file", str(key_file)])
    assert refused.returncode != 0 and "chmod 600" in refused.stderr, refused.stderr
    key_file.chmod(0o600)
    options = ["--cache-key-file", str(key_file), "--no-study-prefetch", "--no-dicom-index"]
    m = mount(bucket, options=options)
    assert (m.path / key).read_bytes() == data
    m.unmount()
    samples = [data[offset : offset + 64] for offset in range(0, len(data), 256 * 1024)]
    cached = [p for p in m.cache_dir.rglob("*") if p.is_file() and "staging" not in p.parts]
    for path in cached:
        content = path.read_bytes()
        assert not any(sample in content for sample in samples), f"plaintext in {path}"
    for path in m.cache_dir.rglob("*"):  # entry names are opaque; the catalog is encrypted
        assert "PAT-SECRET-77" not in path.name, f"object key in the name {path}"
        if path.is_file():
            assert b"PAT-SECRET-77" not in path.read_bytes(), f"object key in {path}"
    blocks = sorted(
        (p for p in cached if p.suffix == ".val"), key=lambda p: p.stat().st_size, reverse=True
    )
    assert blocks, "no block files under the cache directory"
    with open(blocks[0], "r+b") as handle:
        handle.seek(100_000)
        byte = handle.read(1)
        handle.seek(100_000)
        handle.write(bytes([byte[0] ^ 0x01]))
    drop_kernel_caches()
    again = mount(bucket, cache_dir=m.cache_dir, options=options)
    assert (again.path / key).read_bytes() == data
    facts = again.status()
    assert facts["cache"]["corrupt_blocks_dropped"] == 1, facts["cache"]
    assert facts["reads"]["blocks_fetched_on_demand"] >= 1


@pytest.mark.timeout(240)
def test_encrypted_staging_holds_no_plaintext_until_the_upload(
    mount: Mounter, private_s3_server: MotoServer, tmp_path: Path
) -> None:
    """With a cache key, a file written and fsync'd while the S3 server is frozen waits in the
    staging area sealed: the mount reads it back, yet no 64-byte run of it appears anywhere
    under the staging directory.  Once the server answers, the bucket holds exactly the bytes
    written."""
    bucket = new_bucket(private_s3_server)
    key_file = tmp_path / "cache.key"
    key_file.write_text(os.urandom(32).hex())
    key_file.chmod(0o600)
    options = ["--cache-key-file", str(key_file), "--no-study-prefetch", "--no-dicom-index"]
    m = mount(bucket, options=[*options, "--upload-delay", "0.2"])
    data = os.urandom(3 << 20)
    private_s3_server.pause()
    try:
        with open(m.path / "scan.dcm", "wb") as file:
            file.write(data[:1000])
            file.write(data[1000:])
            os.fsync(file.fileno())
        drop_kernel_caches()
        assert (m.path / "scan.dcm").read_bytes() == data
        samples = [data[offset : offset + 64] for offset in range(0, len(data) - 64, 10_007)]
        staged = [path for path in (m.cache_dir / "staging").rglob("*") if path.is_file()]
        assert staged, "nothing under the staging directory"
        for path in staged:
            content = path.read_bytes()
            assert not any(sample in content for sample in samples), f"plaintext in {path}"
        assert m.status()["uploads"]["pending_files"] == 1
    finally:
        private_s3_server.resume()

    def uploaded() -> bytes | None:
        if "scan.dcm" not in bucket.listed_keys():
            return None
        reply = private_s3_server.client().get_object(Bucket=bucket.name, Key="scan.dcm")
        body: bytes = reply["Body"].read()
        return body

    assert wait_until(lambda: uploaded() is not None, 120), m.log_tail()
    assert uploaded() == data
    assert wait_until(lambda: m.status()["uploads"]["pending_files"] == 0, 30)
    assert m.status()["uploads"]["staging_bytes"] == 0
