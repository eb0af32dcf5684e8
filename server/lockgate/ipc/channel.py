"""A ZeroMQ socket on the asyncio loop, without a future per message.

zmq.asyncio gives each receive its own future and poller round; at a
request per message that is a good part of the hop's cost. Here the socket
stays a plain non-blocking one: the loop calls ``_drain`` when the socket's
file descriptor signals, and ``_drain`` reads every frame that is there.
ZeroMQ's descriptor is edge-triggered and a send can consume the edge, so a
send also looks for frames that arrived meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import zmq


class Channel:
    """One socket: ``send`` frames, and ``on_frames`` called for each arrival."""

    def __init__(
        self,
        socket_type: int,
        on_frames: Callable[[list[bytes]], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.socket: Any = zmq.Context.instance().socket(socket_type)
        # Never block a send: the peer reads as fast as it can, and a full
        # queue would stall this whole event loop instead of one request.
        self.socket.setsockopt(zmq.SNDHWM, 0)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.socket.setsockopt(zmq.LINGER, 0)
        self._on_frames = on_frames
        self._loop = loop
        self._fd: int = self.socket.getsockopt(zmq.FD)
        self._drain_scheduled = False
        loop.add_reader(self._fd, self._drain)

    def send(self, frames: list[bytes]) -> None:
        self.socket.send_multipart(frames, zmq.NOBLOCK)
        self._check()

    def _check(self) -> None:
        if not self._drain_scheduled and self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False
        socket = self.socket
        while socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._on_frames(socket.recv_multipart(zmq.NOBLOCK))

    def close(self) -> None:
        self._loop.remove_reader(self._fd)
        self.socket.close(linger=0)
