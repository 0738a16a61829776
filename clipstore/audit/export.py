"""Exports in the layout `auditlog verify` reads: entries.jsonl, checkpoint, verifier.key."""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc

from clipstore.audit.log import AuditLog, AuditRecord
from clipstore.audit.reader import MAX_PAGE_ENTRIES
from clipstore.v1 import audit_pb2, audit_pb2_grpc

ENTRIES_FILE, CHECKPOINT_FILE, VERIFIER_KEY_FILE = "entries.jsonl", "checkpoint", "verifier.key"


def _write_atomic(path: Path, chunks: Iterable[bytes]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        for chunk in chunks:
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def write_export(out: Path, entries: Iterable[bytes], checkpoint_note: str, verifier_key: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / ENTRIES_FILE, (e + b"\n" for e in entries))
    _write_atomic(out / CHECKPOINT_FILE, [checkpoint_note.encode()])
    _write_atomic(out / VERIFIER_KEY_FILE, [verifier_key.encode() + b"\n"])


def export_log(audit: AuditLog, out: Path, *, actor_id: str, actor_role: str) -> int:
    """Record the export, sign a checkpoint covering it, write every entry up to it."""
    audit.append(AuditRecord(actor_id=actor_id, actor_role=actor_role, action="audit.export"))
    size, note = audit.checkpoint()
    write_export(out, audit.reader.iter_entries(size), note, audit.signer.verifier.key_string())
    return size


def export_to_s3(audit: AuditLog, client: Any, bucket: str, *, prefix: str = "audit/", retention_days: int,
                 actor_id: str, actor_role: str) -> tuple[str, int, dict[str, str]]:
    """Write a sealed range [0, checkpoint size) with its checkpoint to an Object Lock bucket
    (compliance mode: nobody, root included, can delete or shorten it before `retention_days`)."""
    audit.append(AuditRecord(actor_id=actor_id, actor_role=actor_role, action="audit.export",
                             reason=f"s3:{bucket}"))
    size, note = audit.checkpoint()
    lock = {"ObjectLockMode": "COMPLIANCE",
            "ObjectLockRetainUntilDate": dt.datetime.now(dt.UTC) + dt.timedelta(days=retention_days)}
    base, versions = f"{prefix}{size:016d}/", {}
    with tempfile.TemporaryDirectory() as tmp:
        write_export(Path(tmp), audit.reader.iter_entries(size), note, audit.signer.verifier.key_string())
        for name in (ENTRIES_FILE, CHECKPOINT_FILE, VERIFIER_KEY_FILE):
            client.upload_file(str(Path(tmp) / name), bucket, base + name, ExtraArgs=lock)
            versions[name] = client.head_object(Bucket=bucket, Key=base + name).get("VersionId", "")
    return base, size, versions


def download_export(client: Any, bucket: str, base: str, out: Path, versions: dict[str, str] | None = None) -> None:
    """Fetch an export written by `export_to_s3` into a directory `auditlog verify` reads
    (the locked versions, when their ids are known)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in (ENTRIES_FILE, CHECKPOINT_FILE, VERIFIER_KEY_FILE):
        extra = {"VersionId": versions[name]} if versions and versions.get(name) else None
        client.download_file(bucket, base + name, str(out / name), ExtraArgs=extra)


def fetch_export(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...], out: Path) -> int:
    """Download a live server's log through AuditService into an export directory (as an auditor: a bearer
    key in `metadata`, or the channel's client certificate)."""
    stub = audit_pb2_grpc.AuditServiceStub(channel)
    checkpoint = stub.GetCheckpoint(audit_pb2.GetCheckpointRequest(), metadata=metadata, timeout=30)

    def pages() -> Iterable[bytes]:
        index = 0
        while index < checkpoint.tree_size:
            page = stub.ListEntries(audit_pb2.ListEntriesRequest(
                start_index=index, page_size=min(MAX_PAGE_ENTRIES, checkpoint.tree_size - index)),
                metadata=metadata, timeout=60)
            if not page.entries:
                break
            yield from page.entries
            index = page.next_index

    write_export(out, pages(), checkpoint.signed_note, checkpoint.verifier_key)
    return checkpoint.tree_size
