"""The front end ⇄ engine connection: length-prefixed frames on a Unix socket.

One stream connection per front end, read and written by the event loop's
own transport: a frame costs one ``write`` on one side and part of one
``read`` on the other, with no thread in between. (ZeroMQ was the first
transport; measured here its send, which hands every message to an I/O
thread, was a fifth of the engine's time at 64 callers.)

Each frame is a 4-byte little-endian length, then that many bytes (a msgpack
list of messages, see messages.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

HEADER = 4


class Link(asyncio.Protocol):
    """One connection's framing; ``on_frame(link, frame)`` for each frame received."""

    def __init__(
        self,
        on_frame: Callable[[Link, bytes], None],
        on_lost: Callable[[Link], None] | None = None,
    ) -> None:
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        #: This side closed it (a clean stop), rather than the peer going away.
        self.closed_here = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        end = len(buffer)
        while end - start >= HEADER:
            size = int.from_bytes(buffer[start : start + HEADER], "little")
            if end - start - HEADER < size:
                break
            first = start + HEADER
            start = first + size
            self._on_frame(self, bytes(buffer[first:start]))
        if start:
            del buffer[:start]

    def send(self, frame: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.writelines((len(frame).to_bytes(HEADER, "little"), frame))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._on_lost is not None:
            self._on_lost(self)

    def close(self) -> None:
        self.closed = True
        self.closed_here = True
        if self.transport is not None:
            self.transport.close()


async def connect(
    path: str, on_frame: Callable[[Link, bytes], None], on_lost: Callable[[Link], None]
) -> Link:
    """Connect to the engine's socket; wait for it to exist (the engine may still start)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            _, link = await loop.create_unix_connection(lambda: Link(on_frame, on_lost), path)
        except (FileNotFoundError, ConnectionRefusedError):
            await asyncio.sleep(0.05)
            continue
        return link
