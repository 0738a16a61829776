"""Upload buffers: an object (or a part) assembled in memory that is used again, not fresh per upload.

Fresh multi-MiB memory per upload costs more than filling it: the kernel maps and zeroes its pages on
first touch and unmaps them when it is freed, which in a process of many threads also interrupts the
other CPUs (TLB shootdowns). In bench/ingest.py a 5 MiB PutClip faulted in ~2,000 pages of the server
this way; assembling in a reused buffer took ~2-3 ms of the server's ~27 ms of CPU per clip off.

botocore needs a `bytearray` of exactly the body's length: it hashes and sends a bytearray in place (it
would read a `bytes` body back through a BytesIO in 1 MiB copies, for the CRC32, the SigV4 payload hash
and the send). A pooled buffer is therefore cut to each body's length within its allocation: CPython's
bytearray keeps its memory when it shrinks by less than half or grows within what it holds, so every
length from half its capacity up is reached without reallocating; a shorter body is copied out. Where a
Python reallocates anyway, that costs a copy, never a wrong byte.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

POOLED_FROM_BYTES = 1 << 20  # a body moves into a pooled buffer once it passes this; smaller ones never do


class Assembly:
    """One body being written: plain until it passes POOLED_FROM_BYTES, then in a pooled buffer."""

    def __init__(self, pool: BufferPool) -> None:
        self._pool = pool
        self._buf = bytearray()
        self.pooled: bytearray | None = None  # the pooled buffer in use, given back by the pool
        self._asked = False
        self.size = 0

    def write(self, chunk: bytes) -> None:
        end = self.size + len(chunk)
        if not self._asked and end > POOLED_FROM_BYTES:
            self._asked = True
            self.pooled = self._pool.take()
            if self.pooled is not None:
                self.pooled[:self.size] = self._buf[:self.size]  # same length: a copy, no resize
                self._buf = self.pooled
        if end <= len(self._buf):
            self._buf[self.size:end] = chunk  # same length: a copy, no resize
        else:
            del self._buf[self.size:]
            self._buf += chunk
        self.size = end

    def body(self) -> bytearray:
        """What was written, in a bytearray of exactly its length; valid until the next write or reset."""
        if len(self._buf) == self.size:
            return self._buf
        if self.size >= self._pool.capacity // 2:
            del self._buf[self.size:]  # within its allocation
            return self._buf
        return self._buf[:self.size]  # a short body in a pooled buffer: copied, the buffer keeps its memory

    def reset(self) -> None:
        """Start the next body (the next part) in the same buffer."""
        self.size = 0


class BufferPool:
    """At most `count` buffers of `capacity` bytes, made on demand and then used again and again
    (memory held: count x capacity at most)."""

    def __init__(self, *, capacity: int, count: int) -> None:
        if capacity <= 2 * POOLED_FROM_BYTES or count < 0:
            raise ValueError(f"capacity must exceed {2 * POOLED_FROM_BYTES} and count be >= 0, "
                             f"got {capacity} and {count}")
        self.capacity, self.count = capacity, count
        self._idle: list[bytearray] = []
        self._made = 0
        self._lock = threading.Lock()
        self._zeros = memoryview(bytes(capacity))  # never written: growing a buffer copies from here

    def take(self) -> bytearray | None:
        """An idle buffer of length capacity - 1 (allocation: capacity), or None when all are in use."""
        with self._lock:
            if self._idle:
                return self._idle.pop()
            if self._made >= self.count:
                return None
            self._made += 1
        return bytearray(self.capacity - 1)

    def give(self, buf: bytearray) -> None:
        try:
            # A shrink checks for views before it touches a byte; a same-length slice (a body of exactly
            # capacity - 1) would not, and a buffer still viewed would go back to the pool.
            del buf[len(buf) - 1:]
            if len(buf) < self.capacity - 1:
                buf += self._zeros[:self.capacity - 1 - len(buf)]  # within its allocation
            else:
                del buf[self.capacity - 1:]
        except BufferError:  # something still holds a view of it: leave it to that, make a new one later
            with self._lock:
                self._made -= 1
            return
        with self._lock:
            self._idle.append(buf)

    @contextmanager
    def assembly(self) -> Iterator[Assembly]:
        """An Assembly whose pooled buffer, if it took one, goes back when the block ends."""
        assembly = Assembly(self)
        try:
            yield assembly
        finally:
            if assembly.pooled is not None:
                self.give(assembly.pooled)
