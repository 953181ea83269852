"""The control socket of a running mount: where it lives, and one JSON answer per request."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from cloudfs import control

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory path: Unix socket paths are limited to 107 bytes."""
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="cfs") as name:
        yield Path(name)


def test_socket_path_is_per_mountpoint(tmp_path: Path) -> None:
    """Each mountpoint gets its own socket; a symlink to a mountpoint finds the same one."""
    (tmp_path / "m1").mkdir()
    (tmp_path / "m2").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "m1")
    first = control.socket_path(tmp_path / "m1")
    assert first == control.socket_path(tmp_path / "m1")
    assert first != control.socket_path(tmp_path / "m2")
    assert control.socket_path(tmp_path / "alias") == first
    assert first.suffix == ".sock"
    assert len(str(first).encode()) < 108


def test_socket_path_for_unprivileged_users(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Non-root daemons listen under XDG_RUNTIME_DIR, or a per-user /tmp directory."""
    monkeypatch.setattr(os, "geteuid", lambda: 4321)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    assert control.socket_path(tmp_path).parent == tmp_path / "run" / "cloudfs"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert control.socket_path(tmp_path).parent == Path("/tmp/cloudfs-4321")


def test_serve_answers_requests(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Known commands get their handler's JSON; unknown commands and failing handlers are
    reported to the client and the server keeps answering; the socket is private and is
    removed on shutdown."""
    sock = short_dir / "run" / "ctl.sock"
    monkeypatch.setattr(control, "socket_path", lambda mountpoint: sock)
    calls: list[str] = []

    async def status(arguments: dict[str, Any]) -> dict[str, Any]:
        calls.append("status")
        return {"pid": 7, "cache": {"bytes": 1}}

    async def broken(arguments: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("handler exploded")

    async def echo(arguments: dict[str, Any]) -> dict[str, Any]:
        if arguments.get("refuse"):
            raise ValueError("refused: " + arguments["refuse"])
        return {"got": arguments}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                control.serve, sock, {"status": status, "refresh": broken, "echo": echo}
            )
            with trio.fail_after(5):
                while not sock.exists():
                    await trio.sleep(0.01)
            assert sock.stat().st_mode & 0o777 == 0o600
            assert sock.parent.stat().st_mode & 0o777 == 0o700

            def ask(command: str) -> dict[str, Any]:
                return control.request(short_dir / "mnt", command, timeout=5)

            assert await trio.to_thread.run_sync(ask, "status") == {
                "pid": 7,
                "cache": {"bytes": 1},
            }
            with pytest.raises(RuntimeError, match="unknown command 'nope'"):
                await trio.to_thread.run_sync(ask, "nope")
            with pytest.raises(RuntimeError, match="handler exploded"):
                await trio.to_thread.run_sync(ask, "refresh")
            assert (await trio.to_thread.run_sync(ask, "status"))["pid"] == 7
            big = {"study": "1.2." * 2000, "path": "ü/x"}
            reply = await trio.to_thread.run_sync(
                lambda: control.request(short_dir / "mnt", "echo", timeout=5, arguments=big)
            )
            assert reply == {"got": big}
            with pytest.raises(RuntimeError, match="refused: no"):
                await trio.to_thread.run_sync(
                    lambda: control.request(
                        short_dir / "mnt", "echo", timeout=5, arguments={"refuse": "no"}
                    )
                )
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert calls == ["status", "status"]
    assert not sock.exists()


def test_request_without_daemon_is_oserror(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Asking a mountpoint nobody serves fails with OSError (the CLI turns it into a message)."""
    monkeypatch.setattr(control, "socket_path", lambda mountpoint: short_dir / "none.sock")
    with pytest.raises(OSError):
        control.request(short_dir, "status", timeout=2)
