"""S3BlobStore: boto3 against any S3-compatible endpoint; multipart for large objects."""

from __future__ import annotations

import contextlib
import email.utils
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions
import botocore.session
import botocore.utils

from clipstore.blobs._buffers import BufferPool
from clipstore.blobs.protocol import READ_CHUNK_BYTES, BlobNotFound, BlobUnavailable

T = TypeVar("T")
PART_BYTES = 6 * 1024 * 1024  # ≥ the S3 minimum (5 MiB); a 5 MiB clip still goes in one PUT
# Upload buffers (clipstore.blobs._buffers) hold a part and the chunk that completes it (the envelope's are
# 64 KiB + a tag); 8 are kept for reuse, made only when bodies over 1 MiB are in flight: 56 MiB at most.
BUFFER_SLACK_BYTES = 1 << 20
UPLOAD_BUFFERS = 8
_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})


def _timestamp(value: str) -> datetime:
    """botocore's timestamp parser for the two forms S3 sends, without dateutil: an HTTP date (the
    Last-Modified header of every GET) and ISO 8601 (listings). dateutil's took ~65 us per GET here;
    anything else goes to botocore's own."""
    try:
        if value.endswith("Z"):
            return datetime.fromisoformat(value)
        return email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        parsed: datetime = botocore.utils.parse_timestamp(value)
        return parsed


class S3BlobStore:
    def __init__(self, bucket: str, *, prefix: str = "clips/", client: Any | None = None,
                 endpoint_url: str | None = None, region: str | None = None, profile: str | None = None,
                 sse_kms_key_id: str | None = None, part_bytes: int = PART_BYTES, connections: int = 10) -> None:
        if part_bytes < 5 * 1024 * 1024:
            raise ValueError("part_bytes must be at least 5 MiB (an S3 limit)")
        self.bucket, self.prefix, self.part_bytes = bucket, prefix, part_bytes
        self._buffers = BufferPool(capacity=part_bytes + BUFFER_SLACK_BYTES, count=UPLOAD_BUFFERS)
        config = botocore.config.Config(retries={"max_attempts": 3, "mode": "standard"},
                                        connect_timeout=5, read_timeout=30,
                                        # One per call that may be in S3 at once: a smaller pool drops and
                                        # reopens connections under load (a TCP handshake per clip).
                                        max_pool_connections=connections,
                                        # Uploads keep botocore's CRC32 (S3 refuses a body damaged on the
                                        # way, so no clip is acknowledged that could not be read back).
                                        # Reads skip its check: every byte served is authenticated by the
                                        # envelope's AES-GCM (a damaged object is an integrity failure, audited),
                                        # and the CRC took 80 % of a 5 MiB GET's client CPU.
                                        response_checksum_validation="when_required")
        core = botocore.session.get_session()
        core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=_timestamp)
        session = boto3.session.Session(profile_name=profile, botocore_session=core)
        self.client = client or session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
        # Defence in depth: the object is already sealed; SSE-KMS adds the bucket's own key.
        self._sse = {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": sse_kms_key_id} if sse_kms_key_id else {}

    def __repr__(self) -> str:
        return f"S3BlobStore(bucket={self.bucket!r}, prefix={self.prefix!r})"

    def _key(self, key: str) -> str:
        return self.prefix + key

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in _MISSING:
                raise BlobNotFound("clip object is missing") from None
            raise BlobUnavailable(f"blob store error {code}; retry later") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise BlobUnavailable(f"blob store unreachable ({type(exc).__name__}); retry later") from None

    def _upload_part(self, key: str, upload_id: str, parts: list[dict[str, Any]], body: bytearray) -> None:
        number = len(parts) + 1
        etag = self._call(lambda: self.client.upload_part(Bucket=self.bucket, Key=self._key(key), UploadId=upload_id,
                                                          PartNumber=number, Body=body))["ETag"]
        parts.append({"PartNumber": number, "ETag": etag})

    def check(self) -> None:
        self._call(lambda: self.client.head_bucket(Bucket=self.bucket))

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> int:
        # The object, or a part, is written into a buffer used again by later uploads and handed to
        # botocore as a bytearray of exactly its length, which it hashes and sends in place (see _buffers).
        # A part goes as soon as it holds part_bytes, whole (S3 parts need not be equal; all but the last
        # must be >= 5 MiB).
        size, parts = 0, []  # type: ignore[var-annotated]
        upload_id: str | None = None
        with self._buffers.assembly() as buf:
            try:
                for chunk in chunks:
                    buf.write(chunk)
                    if buf.size >= self.part_bytes:
                        if upload_id is None:
                            upload_id = self._call(lambda: self.client.create_multipart_upload(
                                Bucket=self.bucket, Key=self._key(key), **self._sse))["UploadId"]
                        self._upload_part(key, upload_id, parts, buf.body())
                        size += buf.size
                        buf.reset()
                size += buf.size
                if upload_id is None:
                    body = buf.body()
                    self._call(lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=body,
                                                              **self._sse))
                    return size
                if buf.size:
                    self._upload_part(key, upload_id, parts, buf.body())
                self._call(lambda: self.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=self._key(key), UploadId=upload_id, MultipartUpload={"Parts": parts}))
                return size
            except BaseException:
                if upload_id is not None:  # leave no multipart upload behind
                    with contextlib.suppress(Exception):
                        self.client.abort_multipart_upload(Bucket=self.bucket, Key=self._key(key),
                                                           UploadId=upload_id)
                raise

    def get_stream(self, key: str) -> Iterator[bytes]:
        body = self._call(lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(key)))["Body"]
        try:
            while chunk := self._call(lambda: body.read(READ_CHUNK_BYTES)):
                yield chunk
        finally:
            body.close()

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        resp = self._call(lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(key),
                                                         Range=f"bytes={offset}-{offset + length - 1}"))
        return bytes(self._call(lambda: resp["Body"].read()))

    def size(self, key: str) -> int:
        return int(self._call(lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key)))
                   ["ContentLength"])

    def delete(self, key: str) -> None:
        self._call(lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key)))

    def list_keys(self, older_than_s: float) -> Iterator[str]:
        cutoff = time.time() - older_than_s
        paginator = self.client.get_paginator("list_objects_v2")
        for page in self._call(lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=self.prefix))):
            for obj in page.get("Contents", []):
                if obj["LastModified"].timestamp() < cutoff:
                    yield obj["Key"][len(self.prefix):]

    def _abort(self, key: str, upload_id: str) -> None:
        self._call(lambda: self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id))

    def sweep_incomplete(self, older_than_s: float) -> int:
        cutoff, removed = time.time() - older_than_s, 0
        resp = self._call(lambda: self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=self.prefix))
        for upload in resp.get("Uploads", []):
            if upload["Initiated"].timestamp() < cutoff:
                self._abort(upload["Key"], upload["UploadId"])
                removed += 1
        return removed
