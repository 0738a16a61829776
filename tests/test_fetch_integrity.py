"""A damaged, cut, extended or replaced clip object never reaches a reviewer as a clip: FetchClip ends with
DATA_LOSS / CLIP_INTEGRITY and a `clip.integrity_failure` entry naming the defect, whether the bytes are
served as stored or decoded to be disguised, on the file store and on S3 (moto's server). S3 reads no longer
ask botocore for a CRC: the envelope is the only check between the bucket and the reviewer."""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import grpc
import pytest
import sqlalchemy as sa

from clipstore.envelope import SEGMENT_SIZE_BYTES, TAG_BYTES
from clipstore.server import running_server
from clipstore.store import schema
from clipstore.v1 import clip_pb2, review_pb2
from tests.audio_speech import encoded, speech
from tests.clip_helpers import metadata, put_requests
from tests.conftest import FakeClock, make_config
from tests.grpc_helpers import error_info
from tests.test_review import World

# A stream's failure must reach the decoder's caller as the end of the file, never as an exception inside
# libsndfile's cffi callback: that one is printed as unraisable, a traceback outside the JSON log.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")

SEGMENT_CT_BYTES = SEGMENT_SIZE_BYTES + TAG_BYTES
# (content type, bytes, duration): each more than one segment
CLIPS = {"wav": ("audio/wav", encoded(speech("a", 5.0), 16000, "audio/wav"), 5000),  # 160 KB
         # 92 KB; Opus at 48 kHz is decoded by FFmpeg (PyAV), after libsndfile has opened it
         "opus_48k": ("audio/opus", encoded(speech("a", 12.0, rate=48000), 48000, "audio/opus"), 12000)}
assert all(len(audio) > SEGMENT_SIZE_BYTES for _, audio, _ in CLIPS.values())


class Objects:
    """The stored clip objects, read and replaced behind the server's back."""

    def __init__(self, root: Path | None, s3: Any = None, bucket: str = "") -> None:
        self._root, self._s3, self._bucket = root, s3, bucket

    def get(self, clip_id: str) -> bytes:
        if self._s3 is not None:
            return bytes(self._s3.get_object(Bucket=self._bucket, Key=f"clips/{clip_id}")["Body"].read())
        assert self._root is not None
        (path,) = self._root.rglob(clip_id)
        return path.read_bytes()

    def put(self, clip_id: str, data: bytes) -> None:
        if self._s3 is not None:
            self._s3.put_object(Bucket=self._bucket, Key=f"clips/{clip_id}", Body=data)
            return
        assert self._root is not None
        (path,) = self._root.rglob(clip_id)
        path.write_bytes(data)


def _segments(plaintext_bytes: int) -> int:
    return max(1, -(-plaintext_bytes // SEGMENT_SIZE_BYTES))


def _header_bytes(obj: bytes, plaintext_bytes: int) -> int:
    return len(obj) - plaintext_bytes - _segments(plaintext_bytes) * TAG_BYTES


def _flip(at: Callable[[bytes, int], int]) -> Callable[[bytes, int, bytes], bytes]:
    def tamper(obj: bytes, plain: int, other: bytes) -> bytes:
        data = bytearray(obj)
        data[at(obj, plain)] ^= 0x01
        return bytes(data)
    return tamper


# name: (how the object is changed (object, plaintext size, another clip's object), the audit reason)
TAMPERS: dict[str, tuple[Callable[[bytes, int, bytes], bytes], str]] = {
    "bit_in_commitment": (_flip(lambda obj, plain: _header_bytes(obj, plain) - 5), "header_tampered"),
    "bit_in_clip_id": (_flip(lambda obj, plain: 20), "clip_id_mismatch"),
    "bit_in_first_segment": (_flip(lambda obj, plain: _header_bytes(obj, plain) + 100), "segment_tampered"),
    "bit_in_last_segment": (_flip(lambda obj, plain: len(obj) - TAG_BYTES - 5), "segment_tampered"),
    "last_segment_dropped": (lambda obj, plain, other: obj[:_header_bytes(obj, plain)
                                                           + (_segments(plain) - 1) * SEGMENT_CT_BYTES], "truncated"),
    "last_byte_dropped": (lambda obj, plain, other: obj[:-1], "segment_tampered"),
    "bytes_appended": (lambda obj, plain, other: obj + bytes(32), "segment_tampered"),
    "replaced_by_another_clip": (lambda obj, plain, other: other, "clip_id_mismatch"),
    "emptied": (lambda obj, plain, other: b"", "malformed_header"),
}


@pytest.fixture(params=["file", "s3"])
def backend(request: pytest.FixtureRequest) -> dict[str, object]:
    if request.param == "file":
        return {}
    endpoint = request.getfixturevalue("moto_endpoint")
    bucket = f"clips-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return {"s3.bucket": bucket, "s3.endpoint_url": endpoint}


@pytest.fixture(params=["wav_served_as_stored", "wav_disguised", "opus_48k_disguised"])
def plan(request: pytest.FixtureRequest) -> tuple[str, dict[str, object]]:
    """(the clip, the config): served as stored, or decoded (libsndfile; FFmpeg for Opus at 48 kHz)."""
    clip, _, how = str(request.param).rpartition("_")
    if how == "stored":
        return "wav", {}
    return clip, {"review.disguise": "pitch_formant"}


@pytest.fixture
def world(tmp_path: Path, backend: dict[str, object], plan: tuple[str, dict[str, object]],
          log_stream: io.StringIO) -> Iterator[tuple[World, Objects]]:
    config = make_config(tmp_path / "data", **{"review.sample_rate": 1.0, "review.daily_cap": 20,
                                               **backend, **plan[1]})
    s3 = boto3.client("s3", endpoint_url=str(backend["s3.endpoint_url"])) if backend else None
    objects = Objects(None if backend else config.data_dir, s3, str(backend.get("s3.bucket", "")))
    clock = FakeClock()
    with running_server(config, clock=clock) as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        w = World(server, channel, clock)
        w.opt_in()
        yield w, objects


def _put(w: World, clip: str) -> clip_pb2.Clip:
    content_type, audio, duration_ms = CLIPS[clip]
    return w.clips.PutClip(put_requests(metadata(content_type=content_type, duration_ms=duration_ms), audio),
                           metadata=w.ingest, timeout=30).clip


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_a_damaged_object_fails_the_fetch_with_data_loss_and_is_recorded_as_an_integrity_failure(
        world: tuple[World, Objects], plan: tuple[str, dict[str, object]], tamper: str) -> None:
    w, objects = world
    audio = CLIPS[plan[0]][1]
    _put(w, plan[0])
    r = w.enroll()
    token = w.session(r)
    assignment = w.next(r, token)
    grant = w.grant(r, token, assignment.assignment_id)
    with w.server.app.db.read() as conn:
        clip_id = str(conn.scalar(sa.select(schema.assignments.c.clip_id)
                                  .where(schema.assignments.c.assignment_id == assignment.assignment_id)))
    other = _put(w, plan[0])  # only its object is used
    change, reason = TAMPERS[tamper]
    objects.put(clip_id, change(objects.get(clip_id), len(audio), objects.get(other.clip_id)))

    received: list[review_pb2.FetchClipResponse] = []
    with pytest.raises(grpc.RpcError) as caught:
        for message in r.stub.FetchClip(review_pb2.FetchClipRequest(
                session_token=token, grant=grant.grant, review_clip_id=grant.review_clip_id),
                metadata=r.md, timeout=30):
            received.append(message)
    assert (caught.value.code(), error_info(caught.value).reason) == \
        (grpc.StatusCode.DATA_LOSS, "CLIP_INTEGRITY"), caught.value.details()
    assert sum(len(m.audio_chunk) for m in received) < len(audio)
    failures = [e for e in w.entries() if e["action"] in ("clip.integrity_failure", "clip.audio_failure")]
    assert [(e["action"], e["outcome"]) for e in failures] == \
        [("clip.integrity_failure", {"result": "failed", "reason": reason})]
    assert failures[0]["target"]["clip_id"] == clip_id  # type: ignore[index]
