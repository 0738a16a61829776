"""FileBlobStore: the embedded default. Write to a temp file, fsync, rename, fsync the dir."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from clipstore.blobs.protocol import READ_CHUNK_BYTES, BlobNotFound, BlobUnavailable

_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_TMP_SUFFIX = ".partial"


class FileBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def __repr__(self) -> str:
        return f"FileBlobStore({self.root})"

    def _path(self, key: str) -> Path:
        if not _KEY_RE.match(key):
            raise ValueError(f"blob key must match {_KEY_RE.pattern}, got {key!r}")
        return self.root / key[-2:] / key  # fan out: no directory grows past ~1/256 of the objects

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> int:
        path = self._path(key)
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}{_TMP_SUFFIX}")
        size = 0
        try:
            path.parent.mkdir(exist_ok=True, mode=0o700)  # inside: a broken store is unavailable, not a bug
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                for chunk in chunks:
                    fh.write(chunk)
                    size += len(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the rename itself must survive a crash
            finally:
                os.close(dir_fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise BlobUnavailable(f"could not store the clip object ({exc.strerror}); retry later") from None
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return size

    def get_stream(self, key: str) -> Iterator[bytes]:
        with self._reading():
            fh = self._path(key).open("rb")
        with fh:
            while True:
                with self._reading():
                    chunk = fh.read(READ_CHUNK_BYTES)
                if not chunk:
                    return
                yield chunk

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        with self._reading(), self._path(key).open("rb") as fh:
            fh.seek(offset)
            return fh.read(length)

    def size(self, key: str) -> int:
        with self._reading():
            return self._path(key).stat().st_size

    @staticmethod
    @contextlib.contextmanager
    def _reading() -> Iterator[None]:
        """A missing object is BlobNotFound; any other failure of the file system (an I/O error, a lost
        mount, a path that is no longer a file) is the store being unavailable, not a bug."""
        try:
            yield
        except FileNotFoundError:
            raise BlobNotFound("clip object is missing") from None
        except OSError as exc:
            raise BlobUnavailable(f"could not read the clip object ({exc.strerror}); retry later") from None

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def check(self) -> None:
        if not self.root.is_dir() or not os.access(self.root, os.W_OK | os.X_OK):
            raise BlobUnavailable(f"{self.root} is not a writable directory")

    def list_keys(self, older_than_s: float) -> Iterator[str]:
        cutoff = time.time() - older_than_s
        for path in self.root.glob("*/*"):
            if not path.name.endswith(_TMP_SUFFIX) and path.stat().st_mtime < cutoff:
                yield path.name

    def sweep_incomplete(self, older_than_s: float) -> int:
        cutoff, removed = time.time() - older_than_s, 0
        for path in self.root.glob(f"*/*{_TMP_SUFFIX}"):
            if path.stat().st_mtime < cutoff:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
        return removed
