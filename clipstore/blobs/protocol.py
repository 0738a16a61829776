"""The `BlobStore` protocol and its errors."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol, runtime_checkable

from clipstore.errors import NotFound, Reason, Unavailable

# `get_stream` reads 16 sealed segments (64 KiB + tag each) at a time. The header puts segments off
# the read boundaries, and a segment split across two reads must be copied before it can be opened;
# with 16 per read that happens to one segment in 16, not to every one. Bounds memory per stream.
READ_CHUNK_BYTES = 16 * (64 * 1024 + 16)


class BlobUnavailable(Unavailable):
    reason = Reason.BLOB_STORE_UNAVAILABLE


class BlobNotFound(NotFound):
    reason = Reason.BLOB_NOT_FOUND


@runtime_checkable
class BlobStore(Protocol):
    def put_stream(self, key: str, chunks: Iterable[bytes]) -> int:
        """Store the object durably, or leave nothing behind and raise; returns its size."""
        ...

    def get_stream(self, key: str) -> Iterator[bytes]: ...

    def read_range(self, key: str, offset: int, length: int) -> bytes: ...

    def size(self, key: str) -> int: ...

    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing object is not an error."""
        ...

    def list_keys(self, older_than_s: float) -> Iterator[str]:
        """Keys of objects last written more than `older_than_s` ago (for the orphan sweep)."""
        ...

    def check(self) -> None:
        """Raise unless the store answers (a health probe: cheap, writes nothing)."""
        ...

    def sweep_incomplete(self, older_than_s: float) -> int:
        """Remove abandoned partial writes (temp files, multipart uploads); returns how many."""
        ...
