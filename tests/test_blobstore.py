"""One contract suite for every BlobStore: file, S3 on moto in-process, S3 on moto's server."""

from __future__ import annotations

import base64
import hashlib
import secrets
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest
from moto import mock_aws

from clipstore.app import blob_store
from clipstore.blobs import BlobNotFound, BlobStore, BlobUnavailable, FileBlobStore, S3BlobStore
from clipstore.config import load_config

PART = 5 * 1024 * 1024


@pytest.fixture(params=["file", "s3-in-process", "s3-server"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    if request.param == "file":
        yield FileBlobStore(tmp_path / "blobs")
        return
    bucket = f"clips-{uuid.uuid4().hex[:12]}"
    if request.param == "s3-in-process":
        with mock_aws():
            boto3.client("s3").create_bucket(Bucket=bucket)
            yield S3BlobStore(bucket, part_bytes=PART)
        return
    endpoint = request.getfixturevalue("moto_endpoint")
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    yield S3BlobStore(bucket, endpoint_url=endpoint, part_bytes=PART)


def _chunks(data: bytes, size: int = 100_000) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


@pytest.mark.parametrize("size", [0, 1, 70_000, 2 * PART + 123])
def test_put_get_size_round_trip(store: BlobStore, size: int) -> None:
    data = secrets.token_bytes(size)
    assert store.put_stream("c_abc", _chunks(data)) == size
    assert b"".join(store.get_stream("c_abc")) == data
    assert store.size("c_abc") == size


def test_ranged_read(store: BlobStore) -> None:
    data = secrets.token_bytes(300_000)
    store.put_stream("c_rng", _chunks(data))
    assert store.read_range("c_rng", 12_345, 70_000) == data[12_345:82_345]
    assert store.read_range("c_rng", 299_990, 100) == data[299_990:]


def test_missing_object_is_not_found(store: BlobStore) -> None:
    with pytest.raises(BlobNotFound):
        b"".join(store.get_stream("c_missing"))
    with pytest.raises(BlobNotFound):
        store.size("c_missing")


def test_delete_is_idempotent(store: BlobStore) -> None:
    store.put_stream("c_del", [b"x"])
    store.delete("c_del")
    store.delete("c_del")
    with pytest.raises(BlobNotFound):
        store.size("c_del")


def test_overwrite_replaces_whole_object(store: BlobStore) -> None:
    store.put_stream("c_ow", [b"a" * 1000])
    store.put_stream("c_ow", [b"b" * 10])
    assert b"".join(store.get_stream("c_ow")) == b"b" * 10


def test_failing_source_leaves_nothing_behind(store: BlobStore) -> None:
    def failing() -> Iterator[bytes]:
        yield secrets.token_bytes(PART + 10)  # forces a multipart upload on S3
        raise RuntimeError("client went away")

    with pytest.raises(RuntimeError):
        store.put_stream("c_fail", failing())
    with pytest.raises(BlobNotFound):
        store.size("c_fail")
    assert store.sweep_incomplete(older_than_s=-1) == 0  # nothing partial left to sweep
    assert list(store.list_keys(older_than_s=-1)) == []


def test_list_keys_sees_old_objects(store: BlobStore) -> None:
    store.put_stream("c_one", [b"1"])
    store.put_stream("c_two", [b"2"])
    assert sorted(store.list_keys(older_than_s=-1)) == ["c_one", "c_two"]
    assert list(store.list_keys(older_than_s=3600)) == []


def test_s3_failure_mid_multipart_upload_aborts_it(moto_endpoint: str) -> None:
    bucket = f"clips-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=bucket)
    store = S3BlobStore(bucket, endpoint_url=moto_endpoint, part_bytes=PART)
    calls = []

    def fail_second_part(**kwargs: object) -> None:
        calls.append(1)
        if len(calls) >= 2:  # the second part and every retry of it
            raise botocore.exceptions.EndpointConnectionError(endpoint_url=moto_endpoint)

    store.client.meta.events.register("before-send.s3.UploadPart", fail_second_part)
    with pytest.raises(BlobUnavailable):
        store.put_stream("c_mid", _chunks(secrets.token_bytes(3 * PART)))
    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_s3_uploads_carry_a_crc32_and_a_signed_payload_hash_and_parts_go_whole(moto_endpoint: str) -> None:
    """The buffer goes to botocore as assembled (no copy): S3 still checks every body it receives, and
    each part but the last holds at least part_bytes."""
    bucket = f"clips-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=bucket)
    store = S3BlobStore(bucket, endpoint_url=moto_endpoint, part_bytes=PART)
    sent: list[tuple[str, int]] = []

    def check(request: Any, **kwargs: object) -> None:
        body = bytes(request.body)
        assert request.headers["x-amz-checksum-crc32"] == base64.b64encode(zlib.crc32(body).to_bytes(4, "big"))
        assert request.headers["X-Amz-Content-SHA256"] == hashlib.sha256(body).hexdigest().encode()
        sent.append((str(kwargs["event_name"]).rsplit(".", 1)[1], len(body)))

    for operation in ("PutObject", "UploadPart"):
        store.client.meta.events.register(f"before-send.s3.{operation}", check)
    small, large = secrets.token_bytes(70_000), secrets.token_bytes(2 * PART + 123)
    store.put_stream("c_small", _chunks(small))
    store.put_stream("c_large", _chunks(large))
    assert b"".join(store.get_stream("c_small")) == small and b"".join(store.get_stream("c_large")) == large
    parts = [size for operation, size in sent if operation == "UploadPart"]
    assert sent[0] == ("PutObject", 70_000) and len(parts) == 2 and sum(parts) == len(large)
    assert all(size >= PART for size in parts[:-1])


def test_file_store_rejects_path_like_keys(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path / "b")
    for key in ("../etc/passwd", "a/b", "", "x" * 200):
        with pytest.raises(ValueError):
            store.put_stream(key, [b"x"])


def test_the_s3_connection_pool_holds_one_connection_per_worker(tmp_path: Path) -> None:
    """A pool smaller than the calls that may be in S3 at once drops and reopens connections under load."""
    config = load_config(env={"CLIPSTORE_DATA_DIR": str(tmp_path), "CLIPSTORE_S3_BUCKET": "clips",
                              "CLIPSTORE_SERVER_MAX_WORKERS": "48", "AWS_DEFAULT_REGION": "us-east-1"})
    store = blob_store(config)
    assert isinstance(store, S3BlobStore)
    assert store.client.meta.config.max_pool_connections == 48
