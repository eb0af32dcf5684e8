"""What one loop tick produces for one link, sent as one frame.

Both sides of the hop queue their messages here rather than writing each
one: under load a tick answers or forwards many requests, and one frame
(one msgpack encode, one ``write``) for all of them is what keeps the hop's
CPU per request low. The flush runs as the tick's last callback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from lockgate.ipc.channel import Link
from lockgate.ipc.messages import encode


class Outbox:
    """Messages for ``link``, flushed once per loop tick."""

    __slots__ = ("_closed", "_last", "_link", "_loop", "_messages", "_scheduled")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        link: Link,
        last: Callable[[], Any] | None = None,
    ) -> None:
        self._loop = loop
        self._link = link
        #: Called at each flush; a message it returns goes last in the frame.
        self._last = last
        self._messages: list[Any] = []
        self._scheduled = False
        self._closed = False

    def put(self, message: Any) -> None:
        if self._closed:
            return
        self._messages.append(message)
        self.wake()

    def wake(self) -> None:
        """Flush at the end of this tick, even with nothing put (for ``last``)."""
        if not self._scheduled and not self._closed:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def close(self) -> None:
        """Drop what is queued; send nothing more."""
        self._closed = True
        self._messages.clear()

    def _flush(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        if self._last is not None:
            message = self._last()
            if message is not None:
                self._messages.append(message)
        if not self._messages:
            return
        frame = encode(self._messages)
        self._messages = []
        self._link.send(frame)
