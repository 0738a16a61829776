"""A PutClip stream becomes a clip only when it ends with a trailer that matches it and the call is
still wanted: a cancelled or cut-short upload leaves nothing, and the device's retry stores the whole clip.

Runs against the file store and S3 (moto's server), through a real server on loopback.
"""

from __future__ import annotations

import hashlib
import io
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import grpc
import pytest
import sqlalchemy as sa

from clipstore.server import ClipstoreServer, running_server
from clipstore.store import schema
from clipstore.v1 import clip_pb2, clip_pb2_grpc
from tests.clip_helpers import metadata, put_requests, trailer
from tests.conftest import bearer, make_config, new_key
from tests.grpc_helpers import error_info

CHUNK_BYTES = 64 * 1024
ROUNDS = 5
PUT_METHOD = "/clipstore.v1.ClipService/PutClip"
# File store: the 3 MiB clip. S3: large enough for a multipart upload (parts are 6 MiB).
AUDIO = {"file": secrets.token_bytes(3 << 20), "s3": secrets.token_bytes(6_815_744)}


@dataclass
class Store:
    name: str
    server: ClipstoreServer
    stub: clip_pb2_grpc.ClipServiceStub
    md: tuple[tuple[str, str], ...]
    s3: Any = None
    bucket: str = ""

    @property
    def audio(self) -> bytes:
        return AUDIO[self.name]

    def objects(self) -> set[str]:
        """Every object and every partial write the blob store holds."""
        if self.s3 is None:
            return {p.name for p in self.server.app.config.blob_dir.rglob("*") if p.is_file()}
        listed = self.s3.list_objects_v2(Bucket=self.bucket).get("Contents", [])
        uploads = self.s3.list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])
        return {o["Key"] for o in listed} | {f"multipart:{u['Key']}" for u in uploads}

    def rows(self, table: sa.Table) -> set[str]:
        with self.server.app.db.read() as conn:
            return set(conn.scalars(sa.select(table.c.clip_id)))

    def state(self) -> tuple[set[str], set[str], set[str]]:
        """(clip rows, objects, review-queue entries)."""
        return self.rows(schema.clips), self.objects(), self.rows(schema.review_queue)

    def finished_puts(self) -> dict[str, float]:
        """PutClip calls the server has finished handling, by recorded status."""
        return {s.labels["code"]: s.value for metric in self.server.metrics.rpcs.collect() for s in metric.samples
                if s.name == "clipstore_rpcs_total" and s.labels["method"] == PUT_METHOD}


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path, log_stream: io.StringIO) -> Iterator[Store]:
    # Every committed wake-word clip would be queued for review: a fragment would show up there too.
    overrides: dict[str, object] = {"review.default_allow": True, "review.sample_rate": 1.0}
    s3, bucket = None, ""
    if request.param == "s3":
        endpoint = request.getfixturevalue("moto_endpoint")
        s3, bucket = boto3.client("s3", endpoint_url=endpoint), f"clips-{uuid.uuid4().hex[:12]}"
        s3.create_bucket(Bucket=bucket)
        overrides |= {"s3.bucket": bucket, "s3.endpoint_url": endpoint}
    with running_server(make_config(tmp_path / "data", **overrides)) as srv, \
            grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        yield Store(request.param, srv, clip_pb2_grpc.ClipServiceStub(channel),
                    bearer(new_key(srv.app, "ingest")), s3, bucket)


def _chunks(audio: bytes) -> list[bytes]:
    return [audio[i:i + CHUNK_BYTES] for i in range(0, len(audio), CHUNK_BYTES)]


def _cancel_upload(store: Store, key: str, *, chunks_sent: int, trailer_sent: bool, delay_s: float) -> None:
    """Send metadata, `chunks_sent` chunks (and the trailer), then cancel without ever half-closing."""
    reached, release = threading.Event(), threading.Event()

    def requests() -> Iterator[clip_pb2.PutClipRequest]:
        yield clip_pb2.PutClipRequest(metadata=metadata(idempotency_key=key))
        for chunk in _chunks(store.audio)[:chunks_sent]:
            yield clip_pb2.PutClipRequest(audio_chunk=chunk)
        if trailer_sent:
            yield trailer(store.audio)
        reached.set()
        release.wait(30)  # the call is cancelled by then: nothing after this reaches the server

    finished = sum(store.finished_puts().values())
    call = store.stub.PutClip.future(requests(), metadata=store.md, timeout=60)
    assert reached.wait(30)
    call.initial_metadata()  # the server's handler is running (a cancel before it starts is never seen)
    time.sleep(delay_s)
    call.cancel()
    release.set()
    with pytest.raises(grpc.FutureCancelledError):
        call.result()
    deadline = time.monotonic() + 30
    while sum(store.finished_puts().values()) == finished:  # until the server is done with the call
        assert time.monotonic() < deadline, "the server never finished the cancelled call"
        time.sleep(0.005)


def _full_chunks(audio: bytes) -> int:
    return len(_chunks(audio))


# (name, chunks sent as a share of the clip, trailer sent)
CANCEL_POINTS = [("before-first-chunk", 0.0, False), ("after-512-KiB", 512 / 3072, False),
                 ("mid-stream-late", 0.96, False), ("after-last-chunk", 1.0, False),
                 ("after-trailer", 1.0, True)]


@pytest.mark.parametrize(("point", "share", "trailer_sent"), CANCEL_POINTS, ids=[p[0] for p in CANCEL_POINTS])
def test_cancelled_upload_stores_nothing_and_the_retry_stores_the_whole_clip(
        store: Store, point: str, share: float, trailer_sent: bool) -> None:
    audio = store.audio
    for round_ in range(ROUNDS):
        key = f"{point}-{round_}-{secrets.token_hex(4)}"
        before = store.state()
        _cancel_upload(store, key, chunks_sent=round(share * _full_chunks(audio)), trailer_sent=trailer_sent,
                       delay_s=0.01 * round_)
        assert store.state() == before, f"round {round_}: a cancelled upload left a row, object or queue entry"

        clip = store.stub.PutClip(put_requests(metadata(idempotency_key=key), audio), metadata=store.md,
                                  timeout=60).clip
        assert clip.size_bytes == len(audio)
        row = store.server.app.clips.find(clip.clip_id)
        assert hashlib.sha256(b"".join(store.server.app.clips.audio(row))).digest() == hashlib.sha256(audio).digest()
        rows, _, queued = store.state()
        assert rows == before[0] | {clip.clip_id} and queued == before[2] | {clip.clip_id}
    assert store.finished_puts() == {"OK": ROUNDS, "CANCELLED": ROUNDS}  # a cancel is never INTERNAL


def _refused(store: Store, requests: list[clip_pb2.PutClipRequest]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        store.stub.PutClip(iter(requests), metadata=store.md, timeout=60)
    return caught.value


def _stream(audio: bytes, end: list[clip_pb2.PutClipRequest]) -> list[clip_pb2.PutClipRequest]:
    return [clip_pb2.PutClipRequest(metadata=metadata())] + \
        [clip_pb2.PutClipRequest(audio_chunk=c) for c in _chunks(audio)] + end


def _declared(size: int, sha256: bytes) -> clip_pb2.PutClipRequest:
    return clip_pb2.PutClipRequest(trailer=clip_pb2.ClipTrailer(size_bytes=size, sha256=sha256))


TRAILER_CASES = {
    "missing": (lambda a: [], "trailer", "CLIP_TRAILER_MISSING"),
    "size-short": (lambda a: [_declared(len(a) + 1, hashlib.sha256(a).digest())], "trailer.size_bytes",
                   "CLIP_SIZE_MISMATCH"),
    "size-zero": (lambda a: [_declared(0, hashlib.sha256(a).digest())], "trailer.size_bytes", "CLIP_SIZE_MISMATCH"),
    "digest-other-audio": (lambda a: [_declared(len(a), hashlib.sha256(a[:-1] + b"\0").digest())], "trailer.sha256",
                           "CLIP_DIGEST_MISMATCH"),
    "digest-empty": (lambda a: [_declared(len(a), b"")], "trailer.sha256", "CLIP_DIGEST_MISMATCH"),
    "message-after-trailer": (lambda a: [trailer(a), clip_pb2.PutClipRequest(audio_chunk=b"late")], "trailer",
                              "INVALID_ARGUMENT"),
    "second-trailer": (lambda a: [trailer(a), trailer(a)], "trailer", "INVALID_ARGUMENT"),
}


@pytest.mark.parametrize("case", list(TRAILER_CASES))
def test_a_stream_without_a_matching_final_trailer_is_refused_naming_it_and_stores_nothing(
        store: Store, case: str) -> None:
    end, field, reason = TRAILER_CASES[case]
    before = store.state()
    err = _refused(store, _stream(store.audio, end(store.audio)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(err)
    assert (info.reason, info.metadata["field"]) == (reason, field)
    assert store.state() == before  # no row, no object, no multipart upload, nothing queued


@pytest.mark.parametrize("store", ["s3"], indirect=True)
def test_a_call_cancelled_after_half_close_while_its_object_is_finalised_never_commits(store: Store) -> None:
    """The whole clip and a valid trailer arrived, but the caller gave up before the row was committed:
    the object is removed and nothing is committed (the retry stores it)."""
    finalising, cancelled = threading.Event(), threading.Event()

    def hold(**kwargs: object) -> None:  # the server's own S3 client, completing the multipart upload
        finalising.set()
        assert cancelled.wait(30)

    store.server.app.blobs.client.meta.events.register("before-send.s3.CompleteMultipartUpload", hold)
    before, finished, key = store.state(), store.finished_puts(), secrets.token_hex(8)
    call = store.stub.PutClip.future(put_requests(metadata(idempotency_key=key), store.audio), metadata=store.md,
                                     timeout=60)
    assert finalising.wait(30)
    call.cancel()
    time.sleep(0.2)  # lets the server's gRPC thread see the cancel
    cancelled.set()
    deadline = time.monotonic() + 30
    while store.finished_puts() == finished:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert store.finished_puts().get("CANCELLED") == 1
    assert store.state() == before
    store.server.app.blobs.client.meta.events.unregister("before-send.s3.CompleteMultipartUpload", hold)
    clip = store.stub.PutClip(put_requests(metadata(idempotency_key=key), store.audio), metadata=store.md,
                              timeout=60).clip
    assert b"".join(store.server.app.clips.audio(store.server.app.clips.find(clip.clip_id))) == store.audio
