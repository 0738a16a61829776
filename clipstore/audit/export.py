"""Exports in the layout `auditlog verify` reads: entries.jsonl, checkpoint, verifier.key; and WORM
exports of that layout to an S3 Object Lock bucket, with a manifest of every object's version id."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc

from auditlog.__main__ import verify_dir
from auditlog.checkpoint import open_checkpoint
from clipstore.audit.log import AuditLog
from clipstore.audit.reader import MAX_PAGE_ENTRIES
from clipstore.unit import AuditRecord
from clipstore.v1 import audit_pb2, audit_pb2_grpc

ENTRIES_FILE, CHECKPOINT_FILE, VERIFIER_KEY_FILE = "entries.jsonl", "checkpoint", "verifier.key"
EXPORT_FILES = (ENTRIES_FILE, CHECKPOINT_FILE, VERIFIER_KEY_FILE)
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "clipstore-audit-worm-export/1"
MAX_PUT_BYTES = 5 << 30  # S3's limit for one PUT, the only upload that carries If-None-Match and the lock


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


def _as_is(note: str) -> str:
    return note


def export_log(audit: AuditLog, out: Path, *, actor_id: str, actor_role: str,
               cosign: Callable[[str], str] = _as_is) -> int:
    """Record the export, sign a checkpoint covering it (cosigned by the witnesses when they are
    configured: `cosign`), write every entry up to it."""
    audit.append(AuditRecord(actor_id=actor_id, actor_role=actor_role, action="audit.export"))
    size, note = audit.checkpoint()
    write_export(out, audit.reader.iter_entries(size), cosign(note), audit.signer.verifier.key_string())
    return size


class ExportError(Exception):
    """The export could not be written as new, locked objects; nothing was superseded."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _put_new(client: Any, bucket: str, key: str, body: Any, lock: dict[str, Any]) -> str:
    """Create `key` as a new object under compliance-mode Object Lock and return its version id. Never a
    new version of an existing key: with If-None-Match: * S3 refuses (412) when the key exists."""
    try:
        response = client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*", **lock)
    except client.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("PreconditionFailed", "ConditionalRequestConflict"):
            raise ExportError(f"s3://{bucket}/{key} already exists; an export is never written over") from None
        message = exc.response.get("Error", {}).get("Message", "")
        hint = {"NoSuchBucket": "; create it with Object Lock (aws s3api create-bucket "
                                "--object-lock-enabled-for-bucket)",
                "InvalidRequest": "; the bucket needs versioning and Object Lock"}.get(code, "")
        raise ExportError(f"cannot write s3://{bucket}/{key}: {code}: {message}{hint}") from None
    version: str = response.get("VersionId") or ""
    if not version:
        raise ExportError(f"s3://{bucket}/{key} got no version id: the bucket needs versioning and Object Lock")
    return version


def export_to_s3(audit: AuditLog, client: Any, bucket: str, *, prefix: str = "audit/", retention_days: int,
                 actor_id: str, actor_role: str, cosign: Callable[[str], str] = _as_is) -> tuple[dict[str, Any], str]:
    """Write a sealed range [0, checkpoint size) with its (cosigned) checkpoint to an Object Lock bucket,
    each object new and locked in compliance mode (nobody, root included, can delete it or shorten its
    retention before `retention_days`). Returns the manifest auditors keep (every object's version id,
    SHA-256 and size) and the version id of its locked copy, `<prefix><size>/manifest.json`."""
    audit.append(AuditRecord(actor_id=actor_id, actor_role=actor_role, action="audit.export",
                             reason=f"s3:{bucket}"))
    size, note = audit.checkpoint()
    note = cosign(note)
    root = open_checkpoint(note, audit.signer.verifier).root
    retain_until = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=retention_days)
    lock = {"ObjectLockMode": "COMPLIANCE", "ObjectLockRetainUntilDate": retain_until}
    base, objects = f"{prefix}{size:016d}/", {}
    with tempfile.TemporaryDirectory() as tmp:
        write_export(Path(tmp), audit.reader.iter_entries(size), note, audit.signer.verifier.key_string())
        for name in EXPORT_FILES:
            path = Path(tmp) / name
            if path.stat().st_size > MAX_PUT_BYTES:
                raise ExportError(f"{name} is {path.stat().st_size} bytes, above S3's single-PUT limit; publish "
                                  "logs this large as tiles (audit.tiles with audit.tiles_retain_days)")
            with path.open("rb") as body:
                version = _put_new(client, bucket, base + name, body, lock)
            objects[name] = {"version_id": version, "sha256": _sha256(path), "bytes": path.stat().st_size}
    manifest = {"format": MANIFEST_FORMAT, "bucket": bucket, "prefix": base, "tree_size": size, "root": root.hex(),
                "object_lock": {"mode": "COMPLIANCE", "retain_until": retain_until.isoformat()}, "objects": objects}
    return manifest, _put_new(client, bucket, base + MANIFEST_FILE, manifest_bytes(manifest), lock)


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, sort_keys=True, indent=1).encode() + b"\n"


def _versions(client: Any, bucket: str, base: str) -> tuple[dict[str, int], dict[str, str]]:
    """Per key under `base`: how many versions and delete markers it has, and its (last listed) version id."""
    counts: dict[str, int] = {}
    ids: dict[str, str] = {}
    for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=base):
        for v in page.get("Versions", []):
            counts[v["Key"]] = counts.get(v["Key"], 0) + 1
            ids[v["Key"]] = v["VersionId"]
        for marker in page.get("DeleteMarkers", []):
            counts[marker["Key"]] = counts.get(marker["Key"], 0) + 1
    return counts, ids


def _well_formed(manifest: dict[str, Any]) -> bool:
    objects = manifest.get("objects")
    return isinstance(manifest.get("tree_size"), int) and isinstance(objects, dict) and all(
        isinstance(objects.get(name), dict) and isinstance(objects[name].get("version_id"), str)
        and isinstance(objects[name].get("sha256"), str) for name in EXPORT_FILES)


def verify_s3_export(client: Any, location: str, vkey: str, *, manifest: dict[str, Any] | None = None,
                     trusted: Path | None = None, witnesses: Sequence[str] = (), quorum: int = 0) -> tuple[int, str]:
    """Verify a WORM export by version id; returns (exit code, the one line to print).

    (1) every key under the export's prefix has exactly one version and no delete marker: a second version
    is an attempt to supersede the export, whatever it holds; (2) the manifest is the auditors' own copy,
    else the locked one in the bucket; (3) each object is the version the manifest names, under
    compliance-mode Object Lock that has not expired, with the manifest's SHA-256; (4) the entries verify
    against the checkpoint (`auditlog verify`, with the witnesses' cosignatures when asked) and the
    checkpoint's size is the manifest's."""
    bucket, _, base = location.removeprefix("s3://").partition("/")
    base = base.strip("/") + "/"
    # (1)
    counts, ids = _versions(client, bucket, base)
    for key in sorted(set(counts) | {base + name for name in (*EXPORT_FILES, MANIFEST_FILE)}):
        if counts.get(key, 0) != 1:
            return 1, (f"FAIL s3 {key}: {counts.get(key, 0)} versions (delete markers included); an export object "
                       "has exactly one, so this export was superseded or deleted")
    # (2)
    if manifest is None:
        manifest = json.loads(client.get_object(Bucket=bucket, Key=base + MANIFEST_FILE,
                                                VersionId=ids[base + MANIFEST_FILE])["Body"].read())
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT \
            or (manifest.get("bucket"), manifest.get("prefix")) != (bucket, base):
        return 1, f"FAIL s3 manifest: it describes another export, not s3://{bucket}/{base}"
    if not _well_formed(manifest):
        return 1, "FAIL s3 manifest: malformed (it must name tree_size and each object's version_id and sha256)"
    # (3)
    now = dt.datetime.now(dt.UTC)
    with tempfile.TemporaryDirectory() as tmp:
        for name in (*EXPORT_FILES, MANIFEST_FILE):
            key, version = base + name, ids[base + name]
            if name != MANIFEST_FILE and version != manifest["objects"][name]["version_id"]:
                return 1, f"FAIL s3 {key}: version {version} is not the one the manifest names"
            head = client.head_object(Bucket=bucket, Key=key, VersionId=version)
            until = head.get("ObjectLockRetainUntilDate")
            if head.get("ObjectLockMode") != "COMPLIANCE" or until is None or until <= now:
                return 1, f"FAIL s3 {key}: not under compliance-mode Object Lock"
            if name == MANIFEST_FILE:
                continue
            client.download_file(bucket, key, str(Path(tmp) / name), ExtraArgs={"VersionId": version})
            if _sha256(Path(tmp) / name) != manifest["objects"][name]["sha256"]:
                return 1, f"FAIL s3 {key}: its bytes are not those the manifest names"
        # (4)
        code, line = verify_dir(Path(tmp), vkey, trusted, witnesses=witnesses, quorum=quorum)
    if code == 0 and not line.startswith(f"OK size={manifest['tree_size']} "):
        return 1, f"FAIL s3 manifest: the checkpoint's size is not the manifest's {manifest['tree_size']}"
    return code, line + (" s3_versions=single,locked" if code == 0 else "")


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
