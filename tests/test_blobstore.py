"""One contract suite for every BlobStore: file, S3 on moto in-process, S3 on moto's server."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import email.utils
import hashlib
import io
import json
import random
import secrets
import socket
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import botocore.awsrequest
import botocore.exceptions
import botocore.utils
import pytest
from hypothesis import given
from hypothesis import strategies as st
from moto import mock_aws

from clipstore.app import blob_store
from clipstore.blobs import BlobNotFound, BlobStore, BlobUnavailable, FileBlobStore, S3BlobStore
from clipstore.blobs._s3 import UPLOAD_BUFFERS, _timestamp
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


class _PagingS3:
    """An S3 client that pages ListMultipartUploads as S3 does (moto answers every upload in one page): at
    most MaxUploads (<= 1,000) a call, those after KeyMarker, or of KeyMarker itself with an upload id
    (lexicographically) after UploadIdMarker."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.listings = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def list_multipart_uploads(self, *, MaxUploads: int = 1000, KeyMarker: str = "",  # noqa: N803
                               UploadIdMarker: str = "", **kwargs: Any) -> dict[str, Any]:
        self.listings += 1
        uploads = sorted(self._client.list_multipart_uploads(**kwargs).get("Uploads", []),
                         key=lambda u: (u["Key"], u["UploadId"]))
        if KeyMarker:
            uploads = [u for u in uploads if u["Key"] > KeyMarker or (
                u["Key"] == KeyMarker and UploadIdMarker and u["UploadId"] > UploadIdMarker)]
        page = uploads[:min(MaxUploads, 1000)]
        answer: dict[str, Any] = {"Uploads": page, "IsTruncated": len(uploads) > len(page)}
        if answer["IsTruncated"]:
            answer |= {"NextKeyMarker": page[-1]["Key"], "NextUploadIdMarker": page[-1]["UploadId"]}
        return answer


def test_the_sweep_aborts_abandoned_uploads_on_every_page_of_the_listing() -> None:
    """Before, it read only ListMultipartUploads' first page: past 1,000 abandoned uploads, the rest were
    never aborted (and S3 bills their parts)."""
    bucket = f"clips-{uuid.uuid4().hex[:12]}"
    with mock_aws():
        raw = boto3.client("s3")
        raw.create_bucket(Bucket=bucket)
        for n in range(350):  # three uploads a key: the first page ends between two uploads of one key
            for _ in range(3):
                raw.create_multipart_upload(Bucket=bucket, Key=f"clips/c_{n:04d}")
        raw.create_multipart_upload(Bucket=bucket, Key="other/c_kept")  # outside the store's prefix
        client = _PagingS3(raw)
        store = S3BlobStore(bucket, client=client, part_bytes=PART)
        assert store.sweep_incomplete(older_than_s=-1) == 1050
        assert client.listings == 2
        assert [u["Key"] for u in raw.list_multipart_uploads(Bucket=bucket).get("Uploads", [])] == ["other/c_kept"]
        assert store.sweep_incomplete(older_than_s=-1) == 0


def test_an_upload_another_sweep_aborted_first_does_not_stop_this_sweep() -> None:
    """Before, an abort answered NoSuchUpload (another replica's sweep got there first) failed the whole
    sweep as BLOB_STORE_UNAVAILABLE, and the orphan objects after it were not swept that round."""
    bucket = f"clips-{uuid.uuid4().hex[:12]}"
    with mock_aws():
        raw = boto3.client("s3")
        raw.create_bucket(Bucket=bucket)
        for n in range(3):
            raw.create_multipart_upload(Bucket=bucket, Key=f"clips/c_{n}")
        client = _PagingS3(raw)
        listed = client.list_multipart_uploads

        def listed_then_aborted_elsewhere(**kwargs: Any) -> dict[str, Any]:
            answer = listed(**kwargs)
            first = answer["Uploads"][0]
            raw.abort_multipart_upload(Bucket=bucket, Key=first["Key"], UploadId=first["UploadId"])
            return answer

        client.list_multipart_uploads = listed_then_aborted_elsewhere  # type: ignore[method-assign]
        store = S3BlobStore(bucket, client=client, part_bytes=PART)
        assert store.sweep_incomplete(older_than_s=-1) == 2
        assert raw.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


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


def test_s3_reads_leave_checking_to_the_envelope(moto_endpoint: str) -> None:
    """A GET asks S3 for no checksum, so botocore does not CRC the body again: every byte served is
    authenticated by the envelope's AES-GCM when the clip is opened (the CRC cost 80 % of a 5 MiB GET's
    client CPU). Uploads keep theirs (the test above)."""
    bucket = f"clips-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=bucket)
    store = S3BlobStore(bucket, endpoint_url=moto_endpoint)
    modes: list[object] = []
    store.client.meta.events.register(
        "before-send.s3.GetObject", lambda request, **kwargs: modes.append(request.headers.get("x-amz-checksum-mode")))
    data = secrets.token_bytes(70_000)
    store.put_stream("c", _chunks(data))
    assert b"".join(store.get_stream("c")) == data and store.read_range("c", 5, 10) == data[5:15]
    assert modes == [None, None]


@given(st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1)))
def test_s3_timestamps_parse_as_botocores_own_parser_parses_them(moment: datetime) -> None:
    """The store's timestamp parser (no dateutil: it cost ~65 us per GET) reads both forms S3 sends, an HTTP
    date and ISO 8601, to the instant botocore's default reads, and hands anything else to botocore's."""
    moment = moment.replace(tzinfo=UTC)
    http_date = email.utils.format_datetime(moment.replace(microsecond=0), usegmt=True)
    iso = moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    for text in (http_date, iso, moment.strftime("%Y-%m-%dT%H:%M:%SZ"), str(int(moment.timestamp()))):
        assert _timestamp(text) == botocore.utils.parse_timestamp(text), text


def test_s3_listings_read_object_times(moto_endpoint: str) -> None:
    bucket = f"clips-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=bucket)
    store = S3BlobStore(bucket, endpoint_url=moto_endpoint)
    store.put_stream("c", [b"x"])
    assert list(store.list_keys(older_than_s=-60)) == ["c"] and list(store.list_keys(older_than_s=60)) == []
    head = store.client.head_object(Bucket=bucket, Key="clips/c")
    assert abs(head["LastModified"].timestamp() - time.time()) < 60


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


def _envelope_chunks(data: bytes, rng: random.Random) -> Iterator[bytes]:
    """Chunks as the envelope writes them (a 64 KiB segment and its tag), with now and then an odd one."""
    i = 0
    while i < len(data):
        step = rng.choice([65_552] * 6 + [1, 4096, 300_001])
        yield data[i:i + step]
        i += step


def test_s3_parallel_uploads_of_distinct_bodies_each_store_exactly_their_own(moto_endpoint: str) -> None:
    """24 uploads at once through one store (8 pooled buffers, so some assemble in buffers another upload
    just gave back, others in their own): every object read back is exactly its own bytes, none carries
    a byte of another clip. Sizes around 1, 5, 6 and 7 MiB: below and above the pooling threshold, a single
    PUT just under part_bytes, and multipart with a short last part."""
    bucket = f"clips-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=bucket)
    part = 6 * 1024 * 1024
    store = S3BlobStore(bucket, endpoint_url=moto_endpoint, part_bytes=part, connections=24)
    rng = random.Random(7)
    mib = 1024 * 1024
    sizes = [base * mib + rng.randrange(-70_000, 70_000) for base in (1, 5, 6, 7)] * 6
    bodies = {f"c_par{i:02d}": secrets.token_bytes(size) for i, size in enumerate(sizes)}
    start = threading.Barrier(len(bodies))

    def upload(key: str) -> int:
        chunks = list(_envelope_chunks(bodies[key], random.Random(key)))
        start.wait()
        return store.put_stream(key, iter(chunks))

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        assert list(pool.map(upload, bodies)) == [len(b) for b in bodies.values()]
    assert len(store._buffers._idle) == UPLOAD_BUFFERS  # all were in use, and all came back
    for key, body in bodies.items():
        stored = b"".join(store.get_stream(key))
        assert len(stored) == len(body) and hashlib.sha256(stored).digest() == hashlib.sha256(body).digest(), key


class _Loopback:
    """A TCP server on loopback at `endpoint`; each connection goes to `_serve`, on a thread of its own
    when `threaded`. Subclasses set their state before calling this `__init__`: it starts accepting."""

    def __init__(self, *, threaded: bool) -> None:
        self._threaded = threaded
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            if self._threaded:
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()
            else:
                self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._listener.close()


class _CuttingProxy(_Loopback):
    """A TCP proxy in front of moto's server that records every request's bytes and, for the first
    `cuts` requests whose first line contains `match`, resets the connection once `after` bytes of it
    have passed: a connection lost in the middle of a body, which botocore retries."""

    def __init__(self, upstream: str, match: bytes, after: int, cuts: int = 1) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self._upstream = (host, int(port))
        self.match, self.after, self.cuts = match, after, cuts
        self.requests: list[bytes] = []  # what each connection sent (a connection may carry several requests)
        self._lock = threading.Lock()
        super().__init__(threaded=True)

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self._upstream)
        seen = bytearray()
        with self._lock:
            self.requests.append(b"")
            index = len(self.requests) - 1

        def back() -> None:
            with contextlib.suppress(OSError):
                while data := upstream.recv(1 << 16):
                    client.sendall(data)
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_WR)

        threading.Thread(target=back, daemon=True).start()
        try:
            while data := client.recv(1 << 16):
                seen += data
                with self._lock:
                    self.requests[index] = bytes(seen)
                    cut = self.cuts > 0 and self.match in seen.split(b"\r\n", 1)[0] and len(seen) >= self.after
                    if cut:
                        self.cuts -= 1
                if cut:
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return  # reset, mid-body
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            client.close()
            upstream.close()


@pytest.mark.parametrize("size", [5 * 1024 * 1024 - 17, 7 * 1024 * 1024 + 5])
def test_s3_a_body_retried_after_a_connection_lost_mid_body_sends_the_same_bytes(moto_endpoint: str,
                                                                                  size: int) -> None:
    """botocore resends the same bytearray after a connection reset half-way through the body. While the
    first attempt waits for its retry, other uploads run through the same store's buffers: the retry
    must still send exactly the bytes of the first, and the object read back is the one written."""
    bucket = f"clips-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=bucket)
    proxy = _CuttingProxy(moto_endpoint, match=b"/c_victim", after=2 * 1024 * 1024, cuts=1)
    part = 6 * 1024 * 1024
    store = S3BlobStore(bucket, endpoint_url=proxy.endpoint, part_bytes=part, connections=8)
    others = S3BlobStore(bucket, endpoint_url=moto_endpoint, part_bytes=part)
    others._buffers = store._buffers  # the same pool: the victim's buffer must not be handed out meanwhile
    noise = {f"c_noise{i}": secrets.token_bytes(size) for i in range(6)}
    victim = secrets.token_bytes(size)
    sends: dict[str, list[bytes]] = {}  # each request of the victim's (PUT, or part) -> the body of each attempt

    def record(request: Any, **kwargs: object) -> None:
        if "/c_victim" in str(request.url) and request.method == "PUT":
            attempts = sends.setdefault(str(request.url), [])
            attempts.append(bytes(request.body))
            if len(attempts) == 2:  # the retry: other uploads have had the store's buffers in between
                with concurrent.futures.ThreadPoolExecutor(6) as pool:
                    list(pool.map(lambda key: others.put_stream(key, _chunks(noise[key])), noise))

    store.client.meta.events.register("before-send.s3", record)
    try:
        assert store.put_stream("c_victim", _chunks(victim)) == size
    finally:
        proxy.close()
    assert proxy.cuts == 0  # a connection was cut mid-body
    retried = [attempts for attempts in sends.values() if len(attempts) > 1]
    assert len(retried) == 1 and retried[0] == [retried[0][0]] * 2 and len(retried[0][0]) >= 2 * 1024 * 1024
    assert b"".join(others.get_stream("c_victim")) == victim
    for key, body in noise.items():
        assert b"".join(others.get_stream(key)) == body


# -- the fast path: GetObject and a single PutObject signed and sent without botocore's per-call pipeline --

def _s3_store(endpoint: str, **kwargs: Any) -> S3BlobStore:
    bucket = f"clips-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return S3BlobStore(bucket, endpoint_url=endpoint, **kwargs)


def _boto3_calls(store: S3BlobStore) -> list[str]:
    """The operations the store makes through its boto3 client from now on."""
    calls: list[str] = []
    store.client.meta.events.register("before-call.s3", lambda **kwargs: calls.append(
        str(kwargs["event_name"]).rsplit(".", 1)[1]))
    return calls


def _answer(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> Any:
    from moto.core.botocore_stubber import MockRawResponse
    return botocore.awsrequest.AWSResponse("http://s3.test/", status, headers or {}, MockRawResponse(body))


KEYS = ["c_fast", "c with spaces/ünïcödé~+%&=?#;.x", "x/../y"]


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("size", [0, 1, 70_000])
def test_s3_gets_and_single_puts_take_the_fast_path_and_store_what_boto3_stores(moto_endpoint: str, key: str,
                                                                                 size: int) -> None:
    store = _s3_store(moto_endpoint)
    calls = _boto3_calls(store)
    data = secrets.token_bytes(size)
    assert store.put_stream(key, _chunks(data)) == size
    assert b"".join(store.get_stream(key)) == data
    assert store.read_range(key, 0, size) == data
    assert size == 0 or store.read_range(key, size // 3, 7) == data[size // 3:][:7]
    assert calls == []  # none of them went through boto3
    # The object is the one boto3's put_object makes, and boto3 reads it as the fast path wrote it.
    store.client.put_object(Bucket=store.bucket, Key="clips/boto3", Body=data)
    fast, ours = (store.client.head_object(Bucket=store.bucket, Key=k, ChecksumMode="ENABLED")
                  for k in (f"clips/{key}", "clips/boto3"))
    for field in ("ContentLength", "ETag", "ContentType", "ChecksumCRC32"):
        assert fast.get(field) == ours.get(field), field
    assert store.client.get_object(Bucket=store.bucket, Key=f"clips/{key}")["Body"].read() == data
    assert [obj["Key"] for obj in store.client.list_objects_v2(Bucket=store.bucket)["Contents"]] == sorted(
        ["clips/boto3", f"clips/{key}"])


def test_s3_fast_requests_are_signed_as_s3_checks_them(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """moto checks each request's SigV4 signature over the path it received: the fast path's canonical
    request (keys with spaces, unicode, reserved characters, dot segments) is the one S3 computes. With a
    wrong secret, the fast attempt's refusal is not what the caller sees: boto3's is, exactly as before."""
    from moto.core.authorization import enable_iam_authentication
    iam = boto3.client("iam", endpoint_url=moto_endpoint)
    user = f"u{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument='{"Version": "2012-10-17", "Statement": '
                        '[{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}')
    access = iam.create_access_key(UserName=user)["AccessKey"]
    bucket = f"clips-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=bucket)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access["AccessKeyId"])
    data = secrets.token_bytes(1000)
    with enable_iam_authentication():
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", access["SecretAccessKey"])
        store = S3BlobStore(bucket, endpoint_url=moto_endpoint)
        calls = _boto3_calls(store)
        for key in KEYS:
            store.put_stream(key, [data])
            assert b"".join(store.get_stream(key)) == data and store.read_range(key, 5, 10) == data[5:15]
        assert calls == []
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        store = S3BlobStore(bucket, endpoint_url=moto_endpoint)
        calls = _boto3_calls(store)
        with pytest.raises(BlobUnavailable, match="SignatureDoesNotMatch"):
            store.put_stream("c_fast", [data])
        with pytest.raises(BlobUnavailable, match="SignatureDoesNotMatch"):
            b"".join(store.get_stream("c_fast"))
        assert calls == ["PutObject", "GetObject"]


def test_s3_in_process_mock_answers_the_fast_path() -> None:
    """moto's mock_aws() answers from its before-send handler, which the fast path emits as botocore does.
    (Its PUT handler cannot read a bytearray body, so under the mock a PUT falls back to boto3.)"""
    with mock_aws():
        boto3.client("s3").create_bucket(Bucket="clips-inproc")
        store = S3BlobStore("clips-inproc")
        data = secrets.token_bytes(70_000)
        store.put_stream("c", _chunks(data))
        calls = _boto3_calls(store)
        assert b"".join(store.get_stream("c")) == data and store.read_range("c", 3, 4) == data[3:7]
        with pytest.raises(BlobNotFound):
            b"".join(store.get_stream("c_missing"))
        assert calls == ["GetObject"]  # the missing one only


@pytest.mark.parametrize("operation", ["PutObject", "GetObject"])
def test_s3_a_failed_fast_attempt_is_made_again_through_boto3(moto_endpoint: str, operation: str) -> None:
    """A 503 to the fast attempt, or an exception in a before-send handler: the call is made once more, through
    boto3 (with its retries and error mapping), and succeeds; the caller sees nothing of the first attempt."""
    store = _s3_store(moto_endpoint)
    data = secrets.token_bytes(70_000)
    store.put_stream("c", [data])
    for fault in ("503", "raise"):
        sent: list[str] = []

        def fail_once(request: Any, fault: str = fault, sent: list[str] = sent, **kwargs: object) -> Any:
            sent.append(request.method)
            if len(sent) > 1:
                return None
            if fault == "raise":
                raise botocore.exceptions.EndpointConnectionError(endpoint_url="http://s3.test")
            return _answer(503, b"<Error><Code>SlowDown</Code></Error>")

        store.client.meta.events.register(f"before-send.s3.{operation}", fail_once)
        calls = _boto3_calls(store)
        store.put_stream("c", [data])
        assert b"".join(store.get_stream("c")) == data
        store.client.meta.events.unregister(f"before-send.s3.{operation}", fail_once)
        assert len(sent) == 2 and calls == [operation]


def test_s3_fast_path_fallbacks_are_counted_and_said_at_most_once_a_minute(moto_endpoint: str,
                                                                           log_stream: io.StringIO) -> None:
    """A store that refuses the fast form doubles every request: the log says so (operation and status, never
    the key, URL or signature), once per FALLBACK_WARN_EVERY_S however often it happens; a missing
    object's 404 is no fallback of the fast path's making."""
    store = _s3_store(moto_endpoint)
    store.put_stream("c_warn", [b"sealed"])
    def refuse_fast(request: Any, **kwargs: object) -> Any:  # the fast path's requests; boto3's go through
        return None if "amz-sdk-invocation-id" in request.headers else _answer(
            403, b"<Error><Code>AccessDenied</Code></Error>")

    store.client.meta.events.register("before-send.s3.GetObject", refuse_fast)
    for _ in range(3):
        assert b"".join(store.get_stream("c_warn")) == b"sealed"
    store.client.meta.events.unregister("before-send.s3.GetObject", refuse_fast)
    with pytest.raises(BlobNotFound):
        b"".join(store.get_stream("c_absent"))
    warnings = [json.loads(line) for line in log_stream.getvalue().splitlines() if "s3.fast_path_fallback" in line]
    assert [(w["operation"], w["why"], w["fallbacks"]) for w in warnings] == [("GetObject", "status 403", 1)]
    assert "c_warn" not in log_stream.getvalue() and "Signature" not in log_stream.getvalue()
    assert store._fast is not None and store._fast.fallbacks == 3


def test_s3_errors_are_boto3s_after_a_refused_fast_attempt(moto_endpoint: str) -> None:
    store = _s3_store(moto_endpoint)
    calls = _boto3_calls(store)
    with pytest.raises(BlobNotFound):
        b"".join(store.get_stream("c_missing"))
    with pytest.raises(BlobNotFound):
        store.read_range("c_missing", 0, 10)
    store.client.meta.events.register("before-send.s3.PutObject", lambda **kwargs: _answer(
        403, b"<Error><Code>AccessDenied</Code><Message>no</Message></Error>"))
    with pytest.raises(BlobUnavailable, match="AccessDenied"):
        store.put_stream("c", [b"x"])
    assert calls == ["GetObject", "GetObject", "PutObject"]  # each once: 404 and 403 are not retried


def test_s3_a_connection_cut_before_the_answer_falls_back_to_boto3(moto_endpoint: str) -> None:
    store = _s3_store(moto_endpoint)
    data = secrets.token_bytes(300_000)
    store.put_stream("c_cut", [data])
    proxy = _CuttingProxy(moto_endpoint, match=b"GET /", after=0, cuts=1)
    reader = S3BlobStore(store.bucket, endpoint_url=proxy.endpoint)
    calls = _boto3_calls(reader)
    try:
        assert b"".join(reader.get_stream("c_cut")) == data
        assert proxy.cuts == 0 and calls == ["GetObject"]
        proxy.cuts = 1
        assert reader.read_range("c_cut", 1000, 5000) == data[1000:6000]
        assert proxy.cuts == 0 and calls == ["GetObject", "GetObject"]
        assert reader.read_range("c_cut", 1000, 5000) == data[1000:6000] and len(calls) == 2
    finally:
        proxy.close()


class _ShortBodyServer(_Loopback):
    """Answers every request 200 with a Content-Length of `declared` and `sent` bytes of body, then closes
    the connection (a FIN) or resets it: a body cut after its first bytes."""

    def __init__(self, declared: int, sent: int, reset: bool) -> None:
        self.declared, self.sent, self.reset, self.requests = declared, sent, reset, 0
        super().__init__(threaded=False)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            request = b""
            while b"\r\n\r\n" not in request and (data := conn.recv(1 << 16)):
                request += data
            self.requests += 1
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.declared + b"x" * self.sent)
            if self.reset:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "reset"])
def test_s3_a_body_cut_mid_get_is_unavailable_never_short(reset: bool) -> None:
    server = _ShortBodyServer(declared=3 * 1024 * 1024, sent=1024 * 1024 + 7, reset=reset)
    store = S3BlobStore("clips-short", endpoint_url=server.endpoint)
    calls = _boto3_calls(store)
    got = bytearray()
    try:
        with pytest.raises(BlobUnavailable):
            for chunk in store.get_stream("c"):
                got += chunk
        assert calls == [] and server.requests == 1  # past its first byte, a body is never fetched again
        with pytest.raises(BlobUnavailable):
            store.read_range("c", 0, 3 * 1024 * 1024)
    finally:
        server.close()
    assert len(got) <= 1024 * 1024 + 7


def test_s3_fast_puts_send_the_sse_kms_headers(moto_endpoint: str) -> None:
    key_id = boto3.client("kms", endpoint_url=moto_endpoint).create_key()["KeyMetadata"]["Arn"]
    store = _s3_store(moto_endpoint, sse_kms_key_id=key_id)
    calls = _boto3_calls(store)
    store.put_stream("c_kms", [b"sealed"])
    assert calls == []
    head = store.client.head_object(Bucket=store.bucket, Key="clips/c_kms")
    assert head["ServerSideEncryption"] == "aws:kms" and head["SSEKMSKeyId"] == key_id


def test_s3_fast_requests_carry_botocores_user_agent(moto_endpoint: str) -> None:
    """S3's access logs name one client for every call, fast or not."""
    store = _s3_store(moto_endpoint)
    agents: list[str] = []
    store.client.meta.events.register("before-send.s3", lambda request, **kwargs: agents.append(
        request.headers["User-Agent"].decode() if isinstance(request.headers["User-Agent"], bytes)
        else request.headers["User-Agent"]))
    store.put_stream("c_agent", [b"sealed"])
    assert b"".join(store.get_stream("c_agent")) == b"sealed"
    store.size("c_agent")  # through boto3
    assert len(agents) == 3 and all(agent.startswith("Boto3/") for agent in agents), agents


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_s3_fast_puts_hash_the_payload_as_botocore_would(scheme: str) -> None:
    """Over HTTP the payload's SHA-256 is signed; over HTTPS, with the CRC32 header, it is UNSIGNED-PAYLOAD
    (what S3SigV4Auth chooses for a streaming body with a checksum). The bytearray goes as it is."""
    store = S3BlobStore("clips-sign", endpoint_url=f"{scheme}://s3.example.test")
    sent: list[Any] = []

    def answer(request: Any, **kwargs: object) -> Any:
        sent.append(request)
        return _answer(200)

    store.client.meta.events.register("before-send.s3.PutObject", answer)
    calls = _boto3_calls(store)
    body = secrets.token_bytes(70_000)
    store.put_stream("c", [body])
    request, = sent
    assert calls == [] and request.url == f"{scheme}://s3.example.test/clips-sign/clips/c"
    assert isinstance(request.body, bytearray) and request.body == body
    expected = hashlib.sha256(body).hexdigest() if scheme == "http" else "UNSIGNED-PAYLOAD"
    assert request.headers["X-Amz-Content-SHA256"] == expected.encode()
    assert request.headers["x-amz-checksum-crc32"] == base64.b64encode(zlib.crc32(body).to_bytes(4, "big"))
    assert request.headers["Content-Length"] == b"70000" and "Expect" not in request.headers


def test_s3_without_credentials_every_call_goes_through_boto3(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    assert S3BlobStore("clips-anon", endpoint_url="http://s3.example.test")._fast is None


class _WrongBytesServer(_Loopback):
    """Answers every GET 2xx with other bytes than asked for: `ignore` answers a range 200 with the whole
    object (a server that ignores Range), `cut` answers a whole read 206 with its first 100 bytes, `shifted`
    answers a range 206 with the object's first bytes (Content-Range from 0), `long` with a Content-Length
    past its Content-Range."""

    def __init__(self, data: bytes, mode: str) -> None:
        self.data, self.mode, self.requests = data, mode, 0
        super().__init__(threaded=True)

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            request = b""
            while data := conn.recv(1 << 16):
                request += data
                if b"\r\n\r\n" not in request:
                    continue
                request = b""
                self.requests += 1
                size, part = len(self.data), self.data[:100]
                if self.mode == "ignore":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + self.data)
                    continue
                rng = b"bytes 0-99/%d" % size if self.mode in ("cut", "shifted") else b"bytes 500-509/%d" % size
                conn.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Range: %s\r\nContent-Length: 100\r\n\r\n"
                             % rng + part)


@pytest.mark.parametrize("mode", ["ignore", "cut", "shifted", "long"])
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "boto3"])
def test_s3_an_answer_with_other_bytes_than_asked_is_unavailable(mode: str, fast: bool) -> None:
    data = bytes(range(256)) * 40
    server = _WrongBytesServer(data, mode)
    client = None if fast else boto3.client("s3", endpoint_url=server.endpoint)
    store = S3BlobStore("clips-wrong", endpoint_url=server.endpoint, client=client)
    assert (store._fast is not None) == fast
    try:
        with pytest.raises(BlobUnavailable, match="other bytes than were asked"):
            if mode == "cut":
                b"".join(store.get_stream("c"))
            else:
                store.read_range("c", 500, 10)
    finally:
        server.close()
