"""Shared-memory slabs: tensor bytes that cross the process hop without a socket.

A ``Slab`` is one POSIX shared-memory segment (a file in ``/dev/shm``),
mapped once per process and viewed with numpy. Exactly one process allocates
in a slab (its writer) with a ``RingAllocator``; the reader hands regions
back by message. Requests finish in roughly the order they arrive, so a ring
(allocate at the tail, reclaim from the head) costs O(1) per request; a
region freed out of order is reclaimed once everything before it is.

Ownership: the process that creates a slab names it and unlinks it when it
closes; the supervisor unlinks the slabs of a child that died without doing
so (every name starts with ``slab_prefix(supervisor pid)``). A supervisor
killed with SIGKILL cleans nothing; its ``ServerLease`` lets the next server
started on the host tell its slabs from a live server's, and remove them.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

#: Where POSIX shared memory lives on Linux.
SHM_DIR = Path("/dev/shm")
#: Regions start on cache-line boundaries, so numpy views are aligned for any dtype.
ALIGN = 64


def slab_prefix(supervisor_pid: int) -> str:
    """The name prefix of every slab belonging to one server."""
    return f"lockgate-{supervisor_pid}-"


class Slab:
    """One named shared-memory segment mapped into this process."""

    def __init__(self, name: str, size: int, *, create: bool) -> None:
        self.name = name
        self.path = SHM_DIR / name
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            else:
                size = os.fstat(fd).st_size
            self.size = size
            self._map = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            if create:
                self.path.unlink(missing_ok=True)
            raise
        os.close(fd)  # the mapping keeps the memory
        self.created = create
        #: The whole slab as bytes; numpy views are taken from it.
        self.buffer = memoryview(self._map)

    def write(self, offset: int, array: npt.NDArray[Any]) -> None:
        """Copy ``array``'s bytes into the slab at ``offset``."""
        flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        self.buffer[offset : offset + flat.nbytes] = flat.data

    def unlink(self) -> None:
        """Remove the name; the memory lives on while anyone maps it."""
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        """Unmap (when no numpy view still uses it) and, for its creator, unlink."""
        if self.created:
            self.unlink()
        self.buffer.release()
        # Views still alive keep the mapping; it goes when they do.
        with contextlib.suppress(BufferError):
            self._map.close()


def remove_slabs(prefix: str) -> list[str]:
    """Unlink every slab whose name starts with ``prefix``; return their names."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for path in SHM_DIR.iterdir():
            if path.name.startswith(prefix):
                path.unlink(missing_ok=True)
                removed.append(path.name)
    return removed


#: The last part of a server's lease file name (after its prefix).
LEASE = "lease"


class ServerLease:
    """A lock held for a server's whole life: flock on ``<prefix>lease`` in /dev/shm.

    The kernel drops a flock when its holder dies, however it dies, so a
    lease that can be locked belongs to a server that is gone. It works
    where pids do not: across PID namespaces sharing one /dev/shm, and after
    the dead server's pid has been reused.
    """

    def __init__(self, prefix: str) -> None:
        self.path = SHM_DIR / f"{prefix}{LEASE}"
        # Locked under a name no sweeper looks for, then renamed: a lease is
        # never seen unlocked while its server lives.
        draft = self.path.with_name(f"{self.path.name}.{os.getpid()}.draft")
        fd = os.open(draft, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.rename(draft, self.path)
        except BaseException:
            os.close(fd)
            draft.unlink(missing_ok=True)
            raise
        self._fd = fd

    def close(self) -> None:
        """Unlink and release (the caller removes its slabs first)."""
        if self._fd >= 0:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = -1


def dead_servers() -> Iterator[str]:
    """The name prefix of every server whose lease nobody holds.

    Each lease stays locked by us while the caller removes what that server
    left, so that two servers starting at once do not clean up together.
    """
    with contextlib.suppress(FileNotFoundError):
        for path in SHM_DIR.glob(f"lockgate-*-{LEASE}"):
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:
                continue  # gone meanwhile, or another user's
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue  # held: that server is alive
            try:
                yield path.name[: -len(LEASE)]
            finally:
                os.close(fd)


class RingAllocator:
    """Hands out regions of a slab in allocation order; reclaims from the oldest.

    ``alloc`` returns None when the slab has no room: the caller then sends the
    bytes inline with the message, so a full slab costs speed, never a request.
    """

    __slots__ = ("_blocks", "_head", "_live", "_tail", "_wrapped", "size")

    def __init__(self, size: int) -> None:
        self.size = size - size % ALIGN
        #: [offset, end, freed] per region, oldest first.
        self._blocks: deque[list[int]] = deque()
        self._live: dict[int, list[int]] = {}
        self._head = 0  # start of the oldest region still held
        self._tail = 0  # where the next region goes
        self._wrapped = False  # the tail has wrapped to before the head

    @property
    def in_use(self) -> int:
        """Regions handed out and not yet freed."""
        return len(self._live)

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a new region of ``nbytes``, or None if it does not fit now."""
        size = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        if not self._blocks:
            self._head = self._tail = 0
            self._wrapped = False
        if not self._wrapped:
            if self._tail + size <= self.size:
                offset = self._tail
            elif size <= self._head:
                offset = 0
                self._wrapped = True
            else:
                return None
        elif self._tail + size <= self._head:
            offset = self._tail
        else:
            return None
        block = [offset, offset + size, 0]
        self._blocks.append(block)
        self._live[offset] = block
        self._tail = offset + size
        return offset

    def free(self, offset: int) -> None:
        """Give back the region at ``offset``."""
        block = self._live.pop(offset)
        block[2] = 1
        blocks = self._blocks
        while blocks and blocks[0][2]:
            gone = blocks.popleft()
            if blocks:
                if blocks[0][0] < gone[0]:
                    self._wrapped = False  # the head followed the tail round
                self._head = blocks[0][0]
