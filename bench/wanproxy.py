"""A TCP proxy that makes the loopback endpoint look like a WAN link (``python -m bench --wan``).

Each burst of bytes from the client (in practice one HTTP request) is held for one round-trip
time before it is forwarded, and each connection's responses are paced to a bandwidth cap, as a
single TCP stream to a distant object store is.  On loopback every strategy looks alike; behind
this proxy, read-ahead that keeps several ranged GETs in flight is what fills the link.

Request bodies (uploads) need ``--upload-bandwidth``: by default each 256 KiB the client sends
waits a whole round trip after the previous one, which caps an upload at about 13 MB/s per
connection at 20 ms whatever the bandwidth.  With the option, the client's bytes are delayed by
one round trip as a pipeline (every byte arrives ``rtt`` later, not ``rtt`` per burst) and paced
to that bandwidth, as a request body crossing a real link is.  A read's requests fit in one burst,
so for them both ways are the same.

Run as its own process: ``python -m bench.wanproxy --listen PORT --target PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

CHUNK = 256 * 1024
PACED_QUEUE = 64
"""Chunks (16 MiB) a paced upstream holds before it stops reading from the client."""


async def _upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rtt: float) -> None:
    while data := await reader.read(CHUNK):
        await asyncio.sleep(rtt)
        writer.write(data)
        await writer.drain()
    with contextlib.suppress(OSError):
        writer.write_eof()


async def _upstream_paced(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rtt: float, bandwidth: float
) -> None:
    """Every byte forwarded one round trip after it arrived, at most ``bandwidth`` bytes/s."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=PACED_QUEUE)

    async def receive() -> None:
        while data := await reader.read(CHUNK):
            await queue.put((loop.time(), data))
        await queue.put((loop.time(), b""))

    async def send() -> None:
        next_free = loop.time()
        while True:
            arrived, data = await queue.get()
            if not data:
                break
            due = max(arrived + rtt, next_free)
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            writer.write(data)
            await writer.drain()
            next_free = due + len(data) / bandwidth
        with contextlib.suppress(OSError):
            writer.write_eof()

    await asyncio.gather(receive(), send())


async def _downstream(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, bandwidth: float
) -> None:
    loop = asyncio.get_running_loop()
    next_free = loop.time()
    while data := await reader.read(CHUNK):
        now = loop.time()
        if next_free > now:
            await asyncio.sleep(next_free - now)
        writer.write(data)
        await writer.drain()
        next_free = max(next_free, now) + len(data) / bandwidth
    with contextlib.suppress(OSError):
        writer.write_eof()


async def _connection(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    target: int,
    rtt: float,
    bandwidth: float,
    upload_bandwidth: float,
) -> None:
    try:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target)
    except OSError:
        client_writer.close()
        return
    try:
        upstream = (
            _upstream_paced(client_reader, server_writer, rtt, upload_bandwidth)
            if upload_bandwidth > 0
            else _upstream(client_reader, server_writer, rtt)
        )
        await asyncio.gather(
            upstream,
            _downstream(server_reader, client_writer, bandwidth),
        )
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        for writer in (client_writer, server_writer):
            writer.close()


async def serve(
    listen: int, target: int, rtt: float, bandwidth: float, upload_bandwidth: float = 0.0
) -> None:
    server = await asyncio.start_server(
        lambda r, w: _connection(r, w, target, rtt, bandwidth, upload_bandwidth),
        "127.0.0.1",
        listen,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.wanproxy", description=__doc__)
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--target", type=int, required=True)
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument("--bandwidth", type=float, default=50e6, help="bytes/s per connection")
    parser.add_argument(
        "--upload-bandwidth",
        type=float,
        default=0.0,
        help="pace request bodies to this many bytes/s per connection, delayed one round trip "
        "as a pipeline (default 0: each burst held one round trip)",
    )
    args = parser.parse_args(argv)
    rtt = args.rtt_ms / 1000
    asyncio.run(serve(args.listen, args.target, rtt, args.bandwidth, args.upload_bandwidth))


if __name__ == "__main__":
    main()
