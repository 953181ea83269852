"""The control channel of a running mount: a Unix socket answering ``status``, ``refresh`` and the
DICOM commands (``index``, ``studies``, ``pin``, ``prefetch`` ...).

Not extended attributes on the mount: the kernel would then ask the daemon for ACL and SELinux
attributes on every ``ls -l`` entry (two round trips per file), while a filesystem that answers
ENOSYS to getxattr is never asked again.

The socket lives in a runtime directory only its owner can enter, named after the mountpoint, so
``cloudfs status MOUNTPOINT`` finds it without any registry.  One request per connection: a command
name and a JSON object of arguments in, one JSON document out.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import trio

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Coroutine[Any, Any, dict[str, Any]]]
_MAX_REQUEST = 64 * 1024


def socket_path(mountpoint: Path) -> Path:
    """Where the daemon serving ``mountpoint`` listens."""
    if os.geteuid() == 0:
        base = Path("/run/cloudfs")
    else:
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        base = Path(runtime) / "cloudfs" if runtime else Path(f"/tmp/cloudfs-{os.geteuid()}")
    digest = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:20]
    return base / f"{digest}.sock"


async def serve(path: Path, handlers: dict[str, Handler]) -> None:
    """Accept control requests on ``path`` (from ``socket_path``, computed before mounting: it
    resolves the mountpoint, which the daemon's own thread must never stat) until cancelled; a
    failing handler answers an error, never dies."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(16)
    try:
        async with trio.open_nursery() as nursery:
            while True:
                connection, _ = await listener.accept()
                nursery.start_soon(_answer, connection, handlers)
    finally:
        listener.close()
        path.unlink(missing_ok=True)


async def _answer(connection: trio.socket.SocketType, handlers: dict[str, Handler]) -> None:
    async with trio.SocketStream(connection) as stream:
        try:
            request = b""
            while len(request) < _MAX_REQUEST and (chunk := await stream.receive_some(65536)):
                request += chunk
            command, _, arguments = request.decode().strip().partition(" ")
            handler = handlers.get(command)
            if handler is None:
                reply: dict[str, Any] = {"error": f"unknown command {command!r}"}
            else:
                reply = await handler(json.loads(arguments) if arguments else {})
        except (ValueError, KeyError) as exc:  # a request the daemon refuses, not a failure
            reply = {"error": str(exc)}
        except Exception as exc:
            log.exception("control request failed")
            reply = {"error": str(exc)}
        with contextlib.suppress(trio.BrokenResourceError):  # the client went away
            await stream.send_all(json.dumps(reply).encode())


def request(
    mountpoint: Path,
    command: str,
    timeout: float = 600.0,
    arguments: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Ask the daemon of ``mountpoint``; OSError if none listens, RuntimeError if it refused."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        client.connect(str(socket_path(mountpoint)))
        line = command if arguments is None else f"{command} {json.dumps(arguments)}"
        client.sendall(line.encode() + b"\n")
        client.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := client.recv(65536):
            chunks.append(chunk)
    reply: dict[str, Any] = json.loads(b"".join(chunks))
    if "error" in reply:
        raise RuntimeError(reply["error"])
    return reply
