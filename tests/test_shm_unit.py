"""The shared-memory registry and the SDK's regions, in one process (no server).

Property tests: any (offset, byte_size) registration either maps exactly the
bytes the client wrote there or is refused with INVALID_ARGUMENT; a leased
region stays mapped after unregistration until its last lease is returned;
whatever the SDK writes into a region reads back unchanged, every datatype.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lockgate.errors import AlreadyExistsError, InvalidInputError, RegionNotFoundError
from lockgate.shm import Lease, SharedMemoryRegistry, check_key
from lockgate_client import SharedMemoryRegion
from lockgate_client.datatypes import WIRE_DTYPES

SIZE = 3 * 4096 + 100  # spans pages, ends mid-page


@pytest.fixture(scope="module")
def client_region() -> Iterator[SharedMemoryRegion]:
    region = SharedMemoryRegion("unit", SIZE)
    region._bytes[:] = np.arange(SIZE, dtype=np.uint32).astype(np.uint8)
    yield region
    region.close()
    assert not Path("/dev/shm", region.key.lstrip("/")).exists()


@settings(max_examples=150, deadline=None)
@given(offset=st.integers(0, SIZE + 10), byte_size=st.integers(0, SIZE + 10))
def test_any_range_maps_the_right_bytes_or_is_refused(
    client_region: SharedMemoryRegion, offset: int, byte_size: int
) -> None:
    registry = SharedMemoryRegistry()
    try:
        region = registry.register("r", client_region.key, offset, byte_size)
    except InvalidInputError as exc:
        assert byte_size == 0 or offset + byte_size > SIZE, exc.message
        assert len(registry) == 0
        return
    assert byte_size > 0 and offset + byte_size <= SIZE
    expected = client_region._bytes[offset : offset + byte_size]
    np.testing.assert_array_equal(region.view(0, byte_size, "t"), expected)
    with pytest.raises(InvalidInputError, match="past the end"):
        region.view(1, byte_size, "input 'x'")
    registry.close()
    assert not region.mapped


def test_unregistered_region_stays_mapped_while_leased(client_region: SharedMemoryRegion) -> None:
    registry = SharedMemoryRegistry()
    region = registry.register("r", client_region.key, 0, 64)
    lease = Lease()
    assert registry.lease(lease, "r", "input 'x'") is region
    view = region.view(0, 64, "input 'x'")
    registry.unregister("r")
    assert region.mapped and len(registry) == 0
    np.testing.assert_array_equal(view, client_region._bytes[:64])  # still readable
    with pytest.raises(RegionNotFoundError, match="not registered"):
        registry.lease(Lease(), "r", "input 'y'")
    del view
    lease.release()
    assert not region.mapped  # (this process maps the key too, as the client)


def test_names_and_duplicates(client_region: SharedMemoryRegion) -> None:
    registry = SharedMemoryRegistry(max_regions=2)
    registry.register("a", client_region.key, 0, 8)
    with pytest.raises(AlreadyExistsError):
        registry.register("a", client_region.key, 0, 8)
    registry.register("b", client_region.key, 8, 8)
    from lockgate.errors import TooManyRegionsError

    with pytest.raises(TooManyRegionsError):
        registry.register("c", client_region.key, 0, 8)
    assert [r.name for r in registry.status("")] == ["a", "b"]
    with pytest.raises(RegionNotFoundError):
        registry.status("c")
    registry.unregister("c")  # unknown: no error
    registry.unregister("")
    assert len(registry) == 0


@given(key=st.text(max_size=300))
def test_keys_are_names_never_paths(key: str) -> None:
    try:
        name = check_key(key)
    except InvalidInputError:
        return
    assert name and "/" not in name and name not in (".", "..") and "\0" not in name
    assert os.path.dirname(os.path.join("/dev/shm", name)) == "/dev/shm"


NUMERIC = [d for d in WIRE_DTYPES if d not in ("BYTES", "BF16")]


@settings(max_examples=80, deadline=None)
@given(
    datatype=st.sampled_from(NUMERIC),
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=3),
    seed=st.integers(0, 2**32 - 1),
)
def test_sdk_write_read_round_trip(datatype: str, shape: list[int], seed: int) -> None:
    dtype = WIRE_DTYPES[datatype]
    raw = np.random.default_rng(seed).integers(0, 256, int(np.prod(shape)) * dtype.itemsize)
    array = raw.astype(np.uint8).view(dtype).reshape(shape)
    with SharedMemoryRegion("rt", 4096) as region:
        region.write(np.zeros(3, np.uint8))  # the next write starts at 64, aligned
        tensor = region.write(array)
        assert tensor.offset == 64 and tensor.datatype == datatype
        assert tensor.byte_size == array.nbytes and tensor.shape == tuple(shape)
        back = region.read(datatype, shape, tensor.offset)
        assert back.tobytes() == array.tobytes()  # bit for bit, NaN payloads included
        del back


@given(items=st.lists(st.binary(max_size=40), max_size=12))
def test_sdk_bytes_round_trip(items: list[bytes]) -> None:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    with SharedMemoryRegion("bytes", 4096) as region:
        tensor = region.write(array)
        assert tensor.datatype == "BYTES" and tensor.byte_size == sum(4 + len(i) for i in items)
        assert list(region.read("BYTES", [len(items)], tensor.offset)) == items
