"""Upload buffers (clipstore.blobs._buffers): used again and again, every body comes out exactly as written."""

from __future__ import annotations

import ctypes
import random
import secrets
import sys

import pytest

from clipstore.blobs._buffers import POOLED_FROM_BYTES, BufferPool

CAPACITY = 3 * POOLED_FROM_BYTES


def _write(pool: BufferPool, data: bytes, rng: random.Random) -> bytes:
    with pool.assembly() as assembly:
        position = 0
        while position < len(data):
            step = rng.choice([1, 100, 65_552, 300_000])
            assembly.write(data[position:position + step])
            position += step
        body = assembly.body()
        assert type(body) is bytearray and assembly.size == len(data)
        return bytes(body)


@pytest.mark.parametrize("seed", range(3))
def test_bodies_of_every_size_come_out_exactly_as_written_one_after_another(seed: int) -> None:
    """A short body after a long one in the same buffer carries nothing of the long one."""
    rng, pool = random.Random(seed), BufferPool(capacity=CAPACITY, count=1)
    sizes = [0, 1, POOLED_FROM_BYTES, POOLED_FROM_BYTES + 1, CAPACITY // 2 - 1, CAPACITY // 2, CAPACITY - 1,
             CAPACITY + 70_000, 5, CAPACITY - 2, POOLED_FROM_BYTES + 2]
    rng.shuffle(sizes)
    for size in sizes:
        data = secrets.token_bytes(size)
        assert _write(pool, data, rng) == data


def test_parts_written_one_after_another_into_the_same_buffer() -> None:
    pool = BufferPool(capacity=CAPACITY, count=1)
    parts = [secrets.token_bytes(n) for n in (CAPACITY - 100, CAPACITY // 2 + 3, 1000, CAPACITY - 1)]
    seen = []
    with pool.assembly() as assembly:
        for part in parts:
            for i in range(0, len(part), 65_552):
                assembly.write(part[i:i + 65_552])
            seen.append(bytes(assembly.body()))
            assembly.reset()
    assert seen == parts  # parts longer and shorter than the one before


def test_at_most_count_buffers_are_made_and_further_bodies_use_their_own() -> None:
    pool = BufferPool(capacity=CAPACITY, count=2)
    data = secrets.token_bytes(CAPACITY // 2 + 10)
    with pool.assembly() as a, pool.assembly() as b, pool.assembly() as c:
        for assembly in (a, b, c):
            assembly.write(data)
        assert [x.pooled is not None for x in (a, b, c)] == [True, True, False]
        assert bytes(a.body()) == bytes(b.body()) == bytes(c.body()) == data
    assert pool.take() is not None and pool.take() is not None and pool.take() is None


def test_small_bodies_never_take_a_pooled_buffer() -> None:
    pool = BufferPool(capacity=CAPACITY, count=1)
    with pool.assembly() as assembly:
        assembly.write(secrets.token_bytes(POOLED_FROM_BYTES))
        assert assembly.pooled is None


@pytest.mark.skipif(sys.implementation.name != "cpython", reason="CPython's bytearray resizing")
def test_a_buffer_is_used_again_without_reallocating() -> None:
    """The point of the pool: the same memory, already mapped, for every long body."""
    pool = BufferPool(capacity=CAPACITY, count=1)
    places = set()
    for size in (CAPACITY - 1, CAPACITY // 2, CAPACITY - 7, POOLED_FROM_BYTES + 1, CAPACITY // 2 + 1):
        with pool.assembly() as assembly:
            assembly.write(secrets.token_bytes(size))
            body = assembly.body()
            assert assembly.pooled is not None
            if size >= CAPACITY // 2:
                assert body is assembly.pooled
                places.add(ctypes.addressof(ctypes.c_char.from_buffer(body)))
            del body
    assert len(places) == 1


def test_a_buffer_still_viewed_is_not_used_again() -> None:
    pool = BufferPool(capacity=CAPACITY, count=1)
    with pool.assembly() as assembly:
        assembly.write(secrets.token_bytes(CAPACITY // 2 + 1))
        view = memoryview(assembly.body())  # someone kept a view past the upload
    fresh = pool.take()
    assert fresh is not None and fresh is not view.obj
    view.release()


def test_capacity_must_leave_room_above_the_pooling_threshold() -> None:
    with pytest.raises(ValueError):
        BufferPool(capacity=2 * POOLED_FROM_BYTES, count=1)


@pytest.mark.parametrize("size", [CAPACITY - 1, CAPACITY // 2 + 1, CAPACITY + 70_000])
def test_a_buffer_still_viewed_is_not_used_again_whatever_the_length_of_its_last_body(size: int) -> None:
    """A body of exactly the buffer's length needs no resize to give it back, which is where a view
    was noticed: such a buffer went back to the pool still viewed, and the next upload wrote into
    memory the viewer could still read (or write into)."""
    pool = BufferPool(capacity=CAPACITY, count=1)
    data = secrets.token_bytes(size)
    with pool.assembly() as assembly:
        assembly.write(data)
        view = memoryview(assembly.body())
    fresh = pool.take()
    assert fresh is not None and fresh is not view.obj
    assert bytes(view) == data  # and nobody wrote into what the viewer holds
    view.release()
