"""Ingest and lifecycle end to end over gRPC, with S3 on moto's server."""

from __future__ import annotations

import io
import json
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import botocore.exceptions
import grpc
import pytest

from clipstore.config import Config
from clipstore.server import ClipstoreServer, running_server
from clipstore.store.keys import destroy_keks
from clipstore.v1 import account_pb2, account_pb2_grpc, clip_pb2, clip_pb2_grpc
from kms import AccountKeysDestroyed, WrappedDek
from tests.clip_helpers import ACCOUNT_ID, SERIAL, metadata, put_requests, trailer
from tests.conftest import FakeClock, bearer, make_config, new_key
from tests.db_helpers import database_bytes
from tests.grpc_helpers import error_info

AUDIO = secrets.token_bytes(200_000)


@pytest.fixture
def bucket(moto_endpoint: str) -> str:
    name = f"clips-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_config(tmp_path: Path, moto_endpoint: str, bucket: str, database_url: str | None) -> Config:
    return make_config(tmp_path / "data", database_url=database_url,
                       **{"s3.bucket": bucket, "s3.endpoint_url": moto_endpoint})


@pytest.fixture
def s3_server(s3_config: Config, clock: FakeClock, log_stream: io.StringIO) -> Iterator[ClipstoreServer]:
    with running_server(s3_config, clock=clock) as srv:
        yield srv


@pytest.fixture
def stubs(s3_server: ClipstoreServer) -> Iterator[tuple[clip_pb2_grpc.ClipServiceStub,
                                                        account_pb2_grpc.AccountServiceStub, tuple]]:
    key = new_key(s3_server.app, "ingest", "asr-backend")
    with grpc.insecure_channel(f"127.0.0.1:{s3_server.port}") as channel:
        yield clip_pb2_grpc.ClipServiceStub(channel), account_pb2_grpc.AccountServiceStub(channel), bearer(key)


def _objects(moto_endpoint: str, bucket: str) -> list[str]:
    return [o["Key"] for o in boto3.client("s3", endpoint_url=moto_endpoint).list_objects_v2(
        Bucket=bucket).get("Contents", [])]


def _put(clips: clip_pb2_grpc.ClipServiceStub, md: tuple, audio: bytes = AUDIO, **meta: object) -> clip_pb2.Clip:
    return clips.PutClip(put_requests(metadata(**meta), audio), metadata=md, timeout=30).clip


def test_ingest_get_list_delete(stubs: tuple, moto_endpoint: str, bucket: str, clock: FakeClock) -> None:
    clips, _, md = stubs
    clip = _put(clips, md)
    assert clip.clip_id.startswith("c_") and clip.size_bytes == len(AUDIO)
    assert clip.expires_at.seconds == int(clock.now() + 180 * 86400)
    assert not clip.HasField("identity")
    assert _objects(moto_endpoint, bucket) == [f"clips/{clip.clip_id}"]
    got = clips.GetClip(clip_pb2.GetClipRequest(clip_id=clip.clip_id), metadata=md, timeout=10).clip
    assert (got.identity.account_id, got.identity.device_serial) == (ACCOUNT_ID, SERIAL)
    assert (got.locale, got.content_type, got.duration_ms) == ("en-US", "audio/opus", 2300)
    listed = clips.ListClips(clip_pb2.ListClipsRequest(account_id=ACCOUNT_ID), metadata=md, timeout=10)
    assert [c.clip_id for c in listed.clips] == [clip.clip_id]
    clips.DeleteClip(clip_pb2.DeleteClipRequest(clip_id=clip.clip_id), metadata=md, timeout=10)
    assert _objects(moto_endpoint, bucket) == []
    with pytest.raises(grpc.RpcError) as caught:
        clips.GetClip(clip_pb2.GetClipRequest(clip_id=clip.clip_id), metadata=md, timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_list_pages_through_all_clips(stubs: tuple) -> None:
    clips, _, md = stubs
    made = {_put(clips, md, audio=b"a" * 100).clip_id for _ in range(5)}
    seen, token = [], ""
    while True:
        page = clips.ListClips(clip_pb2.ListClipsRequest(account_id=ACCOUNT_ID, page_size=2, page_token=token),
                               metadata=md, timeout=10)
        seen += [c.clip_id for c in page.clips]
        if not page.next_page_token:
            break
        token = page.next_page_token
    assert sorted(seen) == sorted(made)


def test_retry_with_same_idempotency_key_returns_same_clip(stubs: tuple, moto_endpoint: str, bucket: str) -> None:
    clips, _, md = stubs
    first = _put(clips, md, idempotency_key="upload-42")
    again = _put(clips, md, idempotency_key="upload-42")
    assert again.clip_id == first.clip_id
    assert len(_objects(moto_endpoint, bucket)) == 1


def test_identity_never_reaches_the_database_file_in_clear(stubs: tuple, s3_server: ClipstoreServer,
                                                           log_stream: io.StringIO) -> None:
    clips, accounts, md = stubs
    _put(clips, md)
    accounts.SetReviewPreference(account_pb2.SetReviewPreferenceRequest(account_id=ACCOUNT_ID,
                                                                        allow_human_review=True),
                                 metadata=md, timeout=10)
    s3_server.app.audit.checkpoint()
    for name, data in database_bytes(s3_server):
        for secret in (ACCOUNT_ID, SERIAL):
            assert secret.encode() not in data, f"{secret} in {name}"
    logs = log_stream.getvalue()
    for secret in (ACCOUNT_ID, SERIAL, AUDIO[:32].hex()):
        assert secret not in logs


def test_review_is_opt_in_by_default_and_can_be_toggled(stubs: tuple, s3_server: ClipstoreServer) -> None:
    clips, accounts, md = stubs
    _put(clips, md)
    assert s3_server.app.accounts.require(ACCOUNT_ID).allow_review is False
    resp = accounts.SetReviewPreference(account_pb2.SetReviewPreferenceRequest(
        account_id=ACCOUNT_ID, allow_human_review=True), metadata=md, timeout=10)
    assert resp.allow_human_review and s3_server.app.accounts.require(ACCOUNT_ID).allow_review
    accounts.SetReviewPreference(account_pb2.SetReviewPreferenceRequest(account_id=ACCOUNT_ID,
                                                                        allow_human_review=False),
                                 metadata=md, timeout=10)
    assert s3_server.app.accounts.require(ACCOUNT_ID).allow_review is False


def test_purge_removes_expired_and_accidental_clips(stubs: tuple, s3_server: ClipstoreServer, clock: FakeClock,
                                                    moto_endpoint: str, bucket: str) -> None:
    clips, _, md = stubs
    accidental = _put(clips, md, wake_word_detected=False)
    kept = _put(clips, md)
    assert accidental.expires_at.seconds == int(clock.now() + 24 * 3600)
    clock.advance(25 * 3600)
    assert s3_server.app.clips.purge_expired() == 1
    assert _objects(moto_endpoint, bucket) == [f"clips/{kept.clip_id}"]
    assert s3_server.app.clips._clips.get(accidental.clip_id) is None  # row and wrapped DEK gone
    clock.advance(180 * 86400)
    assert s3_server.app.clips.purge_expired() == 1
    assert _objects(moto_endpoint, bucket) == []
    actions = [json.loads(e)["action"] for e in s3_server.app.audit.reader.entries(0, 1000)]
    assert actions.count("clip.purge") == 2


def test_account_deletion_makes_an_earlier_copy_undecryptable(stubs: tuple, s3_server: ClipstoreServer,
                                                              moto_endpoint: str, bucket: str) -> None:
    clips, accounts, md = stubs
    clip = _put(clips, md)
    app = s3_server.app
    row = app.clips._clips.get(clip.clip_id)  # what a database backup holds
    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    copy = s3.get_object(Bucket=bucket, Key=f"clips/{clip.clip_id}")["Body"].read()  # a bucket backup
    assert b"".join(app.clips.audio(row)) == AUDIO  # the copy is good before deletion
    resp = accounts.DeleteAccount(account_pb2.DeleteAccountRequest(account_id=ACCOUNT_ID), metadata=md, timeout=10)
    assert resp.deleted_clips == 1
    assert _objects(moto_endpoint, bucket) == []
    with pytest.raises(AccountKeysDestroyed):
        app.keyring.unwrap(WrappedDek(key_version=row.key_version, blob=row.wrapped_dek),
                           account_ref=row.account_ref, clip_id=row.clip_id)
    assert len(copy) > len(AUDIO)
    for rpc, req in ((clips.GetClip, clip_pb2.GetClipRequest(clip_id=clip.clip_id)),
                     (accounts.RotateAccountKey, account_pb2.RotateAccountKeyRequest(account_id=ACCOUNT_ID))):
        with pytest.raises(grpc.RpcError) as caught:
            rpc(req, metadata=md, timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert app.accounts.find(ACCOUNT_ID) is None  # the pseudonym mapping is gone


def test_rotation_rewraps_every_clip_and_keeps_them_readable(stubs: tuple, s3_server: ClipstoreServer) -> None:
    clips, accounts, md = stubs
    made = [_put(clips, md, audio=secrets.token_bytes(1000)) for _ in range(3)]
    resp = accounts.RotateAccountKey(account_pb2.RotateAccountKeyRequest(account_id=ACCOUNT_ID), metadata=md,
                                     timeout=10)
    assert (resp.active_key_version, resp.rewrapped_clips) == (2, 3)
    for clip in made:
        row = s3_server.app.clips._clips.get(clip.clip_id)
        assert row.key_version == 2
        got = clips.GetClip(clip_pb2.GetClipRequest(clip_id=clip.clip_id), metadata=md, timeout=10).clip
        assert got.identity.account_id == ACCOUNT_ID
        assert len(b"".join(s3_server.app.clips.audio(row))) == 1000


def _bad_put(clips: clip_pb2_grpc.ClipServiceStub, md: tuple, requests: list[clip_pb2.PutClipRequest]
             ) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        clips.PutClip(iter(requests), metadata=md, timeout=30)
    return caught.value


@pytest.mark.parametrize(("requests", "field"), [
    ([clip_pb2.PutClipRequest(audio_chunk=b"x")], "metadata"),
    ([], "metadata"),
    ([clip_pb2.PutClipRequest(metadata=metadata()), trailer(b"")], "audio_chunk"),
    ([clip_pb2.PutClipRequest(metadata=metadata(content_type="video/mp4")),
      clip_pb2.PutClipRequest(audio_chunk=b"x")], "metadata.content_type"),
    ([clip_pb2.PutClipRequest(metadata=metadata(locale="not a locale")),
      clip_pb2.PutClipRequest(audio_chunk=b"x")], "metadata.locale"),
    ([clip_pb2.PutClipRequest(metadata=metadata(idempotency_key="")),
      clip_pb2.PutClipRequest(audio_chunk=b"x")], "metadata.idempotency_key"),
    ([clip_pb2.PutClipRequest(metadata=metadata(identity=clip_pb2.ClipIdentity(account_id="a" * 300))),
      clip_pb2.PutClipRequest(audio_chunk=b"x")], "metadata.identity.account_id"),
    ([clip_pb2.PutClipRequest(metadata=metadata()), clip_pb2.PutClipRequest(audio_chunk=b"x" * (2 << 20))],
     "audio_chunk"),
    ([clip_pb2.PutClipRequest(metadata=metadata()), clip_pb2.PutClipRequest(audio_chunk=b"x"),
      clip_pb2.PutClipRequest(metadata=metadata())], "metadata"),
], ids=["audio-first", "no-messages", "empty-clip", "content-type", "locale", "idempotency-key",
        "oversized-account-id", "oversized-chunk", "second-metadata"])
def test_bad_put_is_invalid_argument_naming_the_field_and_leaves_nothing(
        stubs: tuple, s3_server: ClipstoreServer, moto_endpoint: str, bucket: str,
        requests: list[clip_pb2.PutClipRequest], field: str) -> None:
    clips, _, md = stubs
    err = _bad_put(clips, md, requests)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(err).metadata["field"] == field
    assert _objects(moto_endpoint, bucket) == []
    assert list(s3_server.app.blobs.list_keys(older_than_s=-1)) == []


def test_s3_failure_mid_upload_is_unavailable_audited_and_leaves_nothing(
        stubs: tuple, s3_server: ClipstoreServer, moto_endpoint: str, bucket: str) -> None:
    clips, _, md = stubs

    def fail(**kwargs: object) -> None:
        raise botocore.exceptions.EndpointConnectionError(endpoint_url=moto_endpoint)

    s3_server.app.blobs.client.meta.events.register("before-send.s3.UploadPart", fail)
    err = _bad_put(clips, md, list(put_requests(metadata(), secrets.token_bytes(9 * 1024 * 1024), chunk=1 << 20)))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(err).reason == "BLOB_STORE_UNAVAILABLE"
    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    assert _objects(moto_endpoint, bucket) == []
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    entries = [json.loads(e) for e in s3_server.app.audit.reader.entries(0, 1000)]
    failed = [e for e in entries if e["action"] == "clip.ingest"]
    assert failed and failed[-1]["outcome"] == {"result": "failed", "reason": "BLOB_STORE_UNAVAILABLE"}
    assert s3_server.app.clips._clips.get(failed[-1]["target"]["clip_id"]) is None


def test_orphan_object_from_a_crash_is_swept(s3_server: ClipstoreServer, moto_endpoint: str, bucket: str) -> None:
    s3_server.app.blobs.put_stream("c_orphan0001", [b"sealed bytes of a clip whose row never committed"])
    assert s3_server.app.clips.sweep_orphans(older_than_s=-1) == 1
    assert _objects(moto_endpoint, bucket) == []


def test_ingest_on_the_embedded_file_store(server: ClipstoreServer, channel: grpc.Channel) -> None:
    md = bearer(new_key(server.app, "ingest"))
    clips = clip_pb2_grpc.ClipServiceStub(channel)
    clip = _put(clips, md)
    row = server.app.clips._clips.get(clip.clip_id)
    assert b"".join(server.app.clips.audio(row)) == AUDIO
    sealed = next(server.app.config.blob_dir.rglob(clip.clip_id)).read_bytes()
    assert AUDIO[:1000] not in sealed


def test_lower_layer_failures_map_to_precise_statuses(stubs: tuple, s3_server: ClipstoreServer,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    clips, _, md = stubs
    clip = _put(clips, md)
    app = s3_server.app
    row = app.clips.find(clip.clip_id)
    with app.db.transaction() as conn:  # keys shredded while rows still exist (mid-deletion)
        destroy_keks(conn, row.account_ref, app.clock.now())
    app.keyring.forget(row.account_ref)
    err = _bad_get(clips, md, clip.clip_id)
    assert (err.code(), error_info(err).reason) == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_DELETED")

    import sqlalchemy as sa

    def db_down(*args: object, **kwargs: object) -> None:
        raise sa.exc.OperationalError("SELECT 1", {}, Exception("connection refused"))

    monkeypatch.setattr(app.clips._clips, "get", db_down)
    err = _bad_get(clips, md, clip.clip_id)
    assert (err.code(), error_info(err).reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")
    assert "connection refused" not in err.details()


def _bad_get(clips: clip_pb2_grpc.ClipServiceStub, md: tuple, clip_id: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        clips.GetClip(clip_pb2.GetClipRequest(clip_id=clip_id), metadata=md, timeout=10)
    return caught.value


def test_old_key_versions_retire_only_after_the_rewrap(stubs: tuple, s3_server: ClipstoreServer,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from clipstore.errors import FailedPrecondition
    from clipstore.unit import OPERATOR
    clips, accounts, md = stubs
    clip = _put(clips, md)
    app = s3_server.app

    def stop(*args: object, **kwargs: object) -> WrappedDek:
        raise RuntimeError("injected: the rotation stopped before its rewrap")

    monkeypatch.setattr(app.keyring, "rewrap", stop)
    with pytest.raises(RuntimeError, match="injected"):
        app.accounts.rotate_key(ACCOUNT_ID, OPERATOR)  # a new version, but this clip's key still uses version 1
    monkeypatch.undo()
    with pytest.raises(FailedPrecondition):
        app.accounts.retire_key_versions(ACCOUNT_ID, 2, OPERATOR)
    # A clip below the active version is a rotation that stopped half-way: RotateAccountKey resumes it
    # (rewraps to version 2) rather than adding a third version.
    rotated = accounts.RotateAccountKey(account_pb2.RotateAccountKeyRequest(account_id=ACCOUNT_ID), metadata=md,
                                        timeout=10)
    assert (rotated.active_key_version, rotated.rewrapped_clips, rotated.remaining_clips) == (2, 1, 0)
    assert app.accounts.retire_key_versions(ACCOUNT_ID, 2, OPERATOR) == 1
    assert clips.GetClip(clip_pb2.GetClipRequest(clip_id=clip.clip_id), metadata=md,
                         timeout=10).clip.identity.account_id == ACCOUNT_ID
