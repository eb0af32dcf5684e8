"""The front end ⇄ engine hop's pure pieces: slabs, their allocator, the messages."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lockgate.errors import ModelNotFoundError, QueueFullError
from lockgate.ipc import messages as m
from lockgate.ipc.slab import (
    ALIGN,
    LEASE,
    SHM_DIR,
    RingAllocator,
    ServerLease,
    Slab,
    dead_servers,
    remove_slabs,
    slab_prefix,
)
from lockgate.remote_engine import ERROR_KINDS, error_from


@pytest.fixture
def prefix() -> Iterator[str]:
    name = f"lockgate-test-{os.getpid()}-{uuid.uuid4().hex[:8]}-"
    yield name
    remove_slabs(name)


def test_slab_is_shared_between_mappings(prefix: str) -> None:
    writer = Slab(prefix + "a", 4096, create=True)
    reader = Slab(prefix + "a", 0, create=False)
    assert reader.size == writer.size == 4096
    data = np.arange(16, dtype=np.float32)
    writer.write(128, data)
    view = np.frombuffer(reader.buffer[128 : 128 + data.nbytes], dtype=np.float32)
    np.testing.assert_array_equal(view, data)
    del view
    reader.close()
    writer.close()
    assert not (SHM_DIR / (prefix + "a")).exists(), "the creator unlinks its slab"


def test_close_with_live_views_keeps_them_valid(prefix: str) -> None:
    slab = Slab(prefix + "b", 4096, create=True)
    slab.write(0, np.full(8, 7, dtype=np.int64))
    view = np.frombuffer(slab.buffer[0:64], dtype=np.int64)
    slab.close()  # a batch may still hold a view: closing must not crash or corrupt it
    assert view.tolist() == [7] * 8
    assert not (SHM_DIR / (prefix + "b")).exists()


def test_remove_slabs_takes_only_the_prefix(prefix: str) -> None:
    mine = Slab(prefix + "x", 64, create=True)
    other = Slab(prefix.rstrip("-") + "z-other", 64, create=True)
    try:
        assert remove_slabs(prefix) == [prefix + "x"]
        assert (SHM_DIR / other.name).exists()
    finally:
        mine.close()
        other.close()
    assert slab_prefix(42) == "lockgate-42-"


def test_ring_allocates_aligned_and_reports_full() -> None:
    ring = RingAllocator(1024)
    first = ring.alloc(1)
    second = ring.alloc(100)
    assert first == 0 and second == ALIGN
    assert ring.alloc(2000) is None, "bigger than the slab: the caller sends inline"
    rest = ring.alloc(1024 - 3 * ALIGN)
    assert rest is not None
    assert ring.alloc(1) is None, "full"
    ring.free(first)
    assert ring.alloc(ALIGN) == 0, "the head region freed: the tail wraps into it"
    ring.free(second)
    ring.free(rest)
    ring.free(0)
    assert ring.in_use == 0
    assert ring.alloc(1024) == 0, "empty again: the whole slab"


def test_ring_out_of_order_free_waits_for_the_head() -> None:
    ring = RingAllocator(4 * ALIGN)
    a, b, c, d = (ring.alloc(ALIGN) for _ in range(4))
    assert a is not None and b is not None and c is not None and d is not None
    ring.free(b)  # not the oldest: reclaimed once a is
    assert ring.alloc(ALIGN) is None
    ring.free(a)
    assert ring.alloc(2 * ALIGN) == 0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(st.integers(1, 700).map(lambda n: ("alloc", n)), st.integers(0, 50)),
        max_size=120,
    )
)
def test_ring_never_overlaps(ops: list[tuple[str, int] | int]) -> None:
    size = 2048
    ring = RingAllocator(size)
    live: dict[int, int] = {}
    for op in ops:
        if isinstance(op, tuple):
            offset = ring.alloc(op[1])
            if offset is None:
                continue
            end = offset + op[1]
            assert offset % ALIGN == 0 and end <= size
            for start, stop in live.items():
                assert end <= start or offset >= stop, "regions overlap"
            live[offset] = end
        elif live:
            victim = sorted(live)[op % len(live)]
            ring.free(victim)
            del live[victim]
    for offset in list(live):
        ring.free(offset)
    assert ring.in_use == 0
    assert ring.alloc(size) == 0


def test_messages_round_trip_in_one_frame() -> None:
    infer = m.Infer(
        id=7,
        model="simple",
        version="1",
        inputs=[
            m.TensorRef("INPUT0", "<i4", (1, 16), 64, 64),
            m.TensorRef("TEXT", "BYTES", (2,), data=["a", b"\x00b"]),
            m.TensorRef("RAW", "<f4", (1,), data=b"\x00\x00\x80?"),
        ],
        rows=1,
        shape_key=[("INPUT0", (16,))],
        outputs=["OUTPUT0"],
        deadline=12.5,
        trace=((1 << 100).to_bytes(16, "big"), 1 << 60, 1),
    )
    frame = m.encode([m.Hello(0, 1, "in", "out"), infer, m.Cancel(7), m.Release([0, 64])])
    hello, decoded, cancel, release = m.decode_to_engine(frame)
    assert hello == m.Hello(0, 1, "in", "out")
    assert decoded == infer
    assert decoded.inputs[1].data == ["a", b"\x00b"], "BYTES elements keep str vs bytes"
    assert cancel == m.Cancel(7) and release == m.Release([0, 64])
    snapshot = m.Snapshot(
        True, ["simple"], [m.ModelEntry("simple", "1", b"cfg")], {"simple": "1"}, True
    )
    back = m.decode_to_frontend(m.encode([snapshot, m.Error(3, "QueueFullError", "full")]))
    assert back[0] == snapshot
    assert isinstance(error_from(back[1]), QueueFullError)  # type: ignore[arg-type]


def test_error_kinds_cross_the_hop() -> None:
    assert ERROR_KINDS["ModelNotFoundError"] is ModelNotFoundError
    error = error_from(m.Error(1, "ModelNotFoundError", "unknown model 'x'"))
    assert isinstance(error, ModelNotFoundError) and error.message == "unknown model 'x'"


def test_a_held_lease_is_alive_and_an_abandoned_one_is_dead() -> None:
    """What a SIGKILLed supervisor leaves: a lease file nobody holds a lock on."""
    live = f"lockgate-{uuid.uuid4().int % 10**9}-"
    dead = f"lockgate-{uuid.uuid4().int % 10**9}-"
    lease = ServerLease(live)
    abandoned = SHM_DIR / f"{dead}{LEASE}"
    abandoned.write_bytes(b"")  # as the kernel leaves it: no lock
    try:
        found = list(dead_servers())
        assert dead in found
        assert live not in found
        assert not list(SHM_DIR.glob(f"{live}*.draft"))
    finally:
        lease.close()
        abandoned.unlink(missing_ok=True)
    assert not (SHM_DIR / f"{live}{LEASE}").exists()
