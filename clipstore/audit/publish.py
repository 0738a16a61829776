"""Publish the audit log as C2SP tlog-tiles to a directory or an S3 prefix.

Tiles and entry bundles (partial ones included: each width has its own path)
are immutable: an existing file is never replaced, and one whose bytes differ
from what the log now says stops publishing (the published log and the
database disagree: someone rewrote one of them). Only `checkpoint` changes,
and it is written last, after every tile it needs. On S3 with
`retain_days`, every object is written under Object Lock in compliance mode.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Protocol

from auditlog._files import write_durably
from auditlog.checkpoint import Checkpoint
from auditlog.note import open_note
from auditlog.tiles import TileWriter, tree_root
from clipstore.audit.reader import AuditReader

CHECKPOINT_PATH = "checkpoint"
READ_BATCH_ENTRIES = 4096  # bounds memory per publishing step


class PublishedLogDiverges(Exception):
    """The published tiles and the database's log disagree; publishing stops."""


class TileStorage(Protocol):
    def read(self, path: str) -> bytes: ...  # FileNotFoundError when absent

    def write(self, path: str, data: bytes, *, immutable: bool) -> None: ...


class DirStorage:
    def __init__(self, root: Path) -> None:
        self.root = root

    def read(self, path: str) -> bytes:
        return (self.root / path).read_bytes()

    def write(self, path: str, data: bytes, *, immutable: bool) -> None:
        target = self.root / path
        if immutable and target.exists():
            if target.read_bytes() != data:
                raise PublishedLogDiverges(f"published {path} differs from the log")
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        write_durably(target, data)


class S3Storage:
    def __init__(self, client: Any, bucket: str, prefix: str = "", *, retain_days: int | None = None) -> None:
        self._s3, self._bucket, self._prefix, self._retain_days = client, bucket, prefix, retain_days

    def read(self, path: str) -> bytes:
        try:
            body: bytes = self._s3.get_object(Bucket=self._bucket, Key=self._prefix + path)["Body"].read()
        except self._s3.exceptions.NoSuchKey:
            raise FileNotFoundError(path) from None
        return body

    def write(self, path: str, data: bytes, *, immutable: bool) -> None:
        if immutable:
            try:
                existing = self.read(path)
            except FileNotFoundError:
                existing = None
            if existing is not None:
                if existing != data:
                    raise PublishedLogDiverges(f"published {path} differs from the log")
                return
        extra: dict[str, Any] = {}
        if self._retain_days:
            extra = {"ObjectLockMode": "COMPLIANCE", "ObjectLockRetainUntilDate":
                     dt.datetime.now(dt.UTC) + dt.timedelta(days=self._retain_days)}
        self._s3.put_object(Bucket=self._bucket, Key=self._prefix + path, Body=data, **extra)


def storage_for(location: str, *, retain_days: int | None = None, s3_client: Any = None) -> TileStorage:
    """A directory, or `s3://bucket/prefix`."""
    if location.startswith("s3://"):
        bucket, _, prefix = location.removeprefix("s3://").partition("/")
        if s3_client is None:
            import boto3
            s3_client = boto3.client("s3")
        return S3Storage(s3_client, bucket, prefix.strip("/") + "/" if prefix.strip("/") else "",
                         retain_days=retain_days)
    return DirStorage(Path(location))


class Publisher:
    """Writes tiles for each new checkpoint; resumes from what is already published."""

    def __init__(self, reader: AuditReader, storage: TileStorage) -> None:
        self._reader, self.storage = reader, storage
        self._writer: TileWriter | None = None

    def published(self) -> tuple[int, str] | None:
        try:
            note = self.storage.read(CHECKPOINT_PATH).decode()
        except FileNotFoundError:
            return None
        return Checkpoint.parse(note.split("\n\n", 1)[0] + "\n").size, note

    def _resume(self) -> TileWriter:
        published = self.published()
        if published is None:
            return TileWriter()
        size = published[0]
        if size and tree_root(self.storage.read, size) != self._reader.root(size):
            raise PublishedLogDiverges(f"the published tree of size {size} is not the database's")
        return TileWriter.resume(size, self.storage.read)

    def publish(self, note: str, verifiers: list[Any]) -> int:
        """Publish tiles up to the note's size, then the note (already verified by the caller)."""
        checkpoint = Checkpoint.parse(open_note(note, verifiers))
        if self._writer is None:
            self._writer = self._resume()
        writer = self._writer
        if checkpoint.size < writer.size:
            raise PublishedLogDiverges(f"refusing to publish size {checkpoint.size} after {writer.size}")
        while writer.size < checkpoint.size:
            batch = self._reader.entries(writer.size, min(READ_BATCH_ENTRIES, checkpoint.size - writer.size))
            if not batch:
                raise PublishedLogDiverges(f"the log has no entry {writer.size} below its checkpoint")
            for path, data in writer.append(batch):
                self.storage.write(path, data, immutable=True)
        for path, data in writer.flush():
            self.storage.write(path, data, immutable=True)
        if tree_root(self.storage.read, checkpoint.size) != checkpoint.root:
            self._writer = None
            raise PublishedLogDiverges("the tiles written do not hash to the checkpoint being published")
        self.storage.write(CHECKPOINT_PATH, note.encode(), immutable=False)
        return checkpoint.size
