"""An idempotency key names one recording. A retry of it (same metadata, identity and audio) gets its clip;
the key reused for anything else is refused (IDEMPOTENCY_KEY_REUSED, audited) and nothing is stored or lost.
The key outlives its clip: once the clip is deleted, purged or erased with its account, a retry with the key
is refused (IDEMPOTENCY_KEY_SPENT) and the recording never comes back.

On SQLite and PostgreSQL, through a real server on loopback; the race of two uploads with one key also
in-process, where the rival can be made to commit first.
"""

from __future__ import annotations

import io
import json
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf.timestamp_pb2 import Timestamp

from clipstore.app import App
from clipstore.clips import NewClip
from clipstore.errors import ClipstoreError
from clipstore.server import ClipstoreServer, running_server
from clipstore.store import schema
from clipstore.store.keys import destroy_keks
from clipstore.unit import OPERATOR, SYSTEM
from clipstore.v1 import account_pb2, account_pb2_grpc, clip_pb2, clip_pb2_grpc
from tests.clip_helpers import ACCOUNT_ID, SERIAL, Chunks, metadata, put_requests, trailer
from tests.conftest import FakeClock, bearer, make_config, new_key
from tests.grpc_helpers import error_info

AUDIO = secrets.token_bytes(100_000)
RACERS = 24


@dataclass
class Ingest:
    server: ClipstoreServer
    clock: FakeClock
    clips: clip_pb2_grpc.ClipServiceStub
    accounts: account_pb2_grpc.AccountServiceStub
    md: tuple[tuple[str, str], ...]

    def put(self, key: str, audio: bytes = AUDIO, **meta: object) -> clip_pb2.Clip:
        return self.clips.PutClip(put_requests(metadata(idempotency_key=key, **meta), audio), metadata=self.md,
                                  timeout=30).clip

    def refused(self, key: str, audio: bytes = AUDIO, **meta: object) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            self.put(key, audio, **meta)
        return caught.value

    def entries(self) -> list[dict[str, object]]:
        return [json.loads(e) for e in self.server.app.audit.reader.entries(0, 100_000)]

    def audio(self, clip_id: str) -> bytes:
        clips = self.server.app.clips
        return b"".join(clips.audio(clips.get(clip_id)))

    def stored(self) -> dict[str, int]:
        """What the retry must not bring back: clip rows, accounts, queued clips, objects."""
        app = self.server.app
        with app.db.read() as conn:
            counts = {t.name: conn.scalar(sa.select(sa.func.count()).select_from(t))
                      for t in (schema.clips, schema.accounts, schema.review_queue)}
        return counts | {"objects": len(list(app.blobs.list_keys(older_than_s=-1)))}


@pytest.fixture
def ingest(tmp_path: Path, database_url: str | None, log_stream: io.StringIO) -> Iterator[Ingest]:
    clock = FakeClock()
    # Every wake-word clip is queued for review: a resurrected one would be handed to a reviewer.
    config = make_config(tmp_path / "data", database_url=database_url,
                         **{"review.default_allow": True, "review.sample_rate": 1.0})
    with running_server(config, clock=clock) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        yield Ingest(srv, clock, clip_pb2_grpc.ClipServiceStub(channel), account_pb2_grpc.AccountServiceStub(channel),
                     bearer(new_key(srv.app, "ingest")))


def _assert_spent(err: grpc.RpcError) -> None:
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(err).reason == "IDEMPOTENCY_KEY_SPENT"


def test_retry_after_delete_clip_is_refused_as_spent_and_recreates_nothing(ingest: Ingest) -> None:
    clip = ingest.put("device-7-upload-1")
    ingest.clips.DeleteClip(clip_pb2.DeleteClipRequest(clip_id=clip.clip_id), metadata=ingest.md, timeout=10)
    after_delete = ingest.stored()
    assert after_delete["clips"] == after_delete["objects"] == after_delete["review_queue"] == 0
    _assert_spent(ingest.refused("device-7-upload-1"))
    assert ingest.stored() == after_delete


def test_retry_after_retention_purge_is_refused_as_spent_and_recreates_nothing(ingest: Ingest) -> None:
    ingest.put("expires")
    ingest.clock.advance(181 * 86400)
    _assert_spent(ingest.refused("expires"))  # expired, not yet purged: already gone for callers
    assert ingest.server.app.clips.purge_expired() == 1
    after_purge = ingest.stored()
    _assert_spent(ingest.refused("expires"))
    assert ingest.stored() == after_purge and after_purge["clips"] == 0


def test_retry_after_an_accidental_activation_is_purged_is_refused_as_spent(ingest: Ingest) -> None:
    clip = ingest.put("wake-word-misheard")
    ingest.server.app.clips.expire_now(clip.clip_id, SYSTEM)  # what FlagClip(accidental) does
    assert ingest.server.app.clips.purge_expired() == 1
    _assert_spent(ingest.refused("wake-word-misheard"))
    assert ingest.stored()["clips"] == ingest.stored()["review_queue"] == 0


def test_retry_after_account_deletion_is_refused_and_does_not_recreate_the_account(ingest: Ingest) -> None:
    ingest.put("before-erasure")
    ingest.accounts.DeleteAccount(account_pb2.DeleteAccountRequest(account_id=ACCOUNT_ID), metadata=ingest.md,
                                  timeout=10)
    _assert_spent(ingest.refused("before-erasure"))
    assert ingest.stored() == {"clips": 0, "accounts": 0, "review_queue": 0, "objects": 0}
    assert ingest.put("after-erasure").size_bytes == len(AUDIO)  # a new recording, with a new key, is stored


def test_parallel_retries_of_a_deleted_clip_are_all_refused(ingest: Ingest) -> None:
    clip = ingest.put("raced")
    ingest.clips.DeleteClip(clip_pb2.DeleteClipRequest(clip_id=clip.clip_id), metadata=ingest.md, timeout=10)
    with ThreadPoolExecutor(RACERS) as pool:
        errors = list(pool.map(lambda _: ingest.refused("raced"), range(RACERS)))
    for err in errors:
        _assert_spent(err)
    assert ingest.stored()["clips"] == ingest.stored()["objects"] == 0


def test_parallel_first_uploads_with_one_key_store_one_clip(ingest: Ingest) -> None:
    with ThreadPoolExecutor(RACERS) as pool:
        ids = set(pool.map(lambda _: ingest.put("one-recording").clip_id, range(RACERS)))
    assert len(ids) == 1
    stored = ingest.stored()
    assert (stored["clips"], stored["objects"], stored["review_queue"]) == (1, 1, 1)


# -- a key names one recording -------------------------------------------------------------------------

CAPTURED = Timestamp(seconds=1_799_999_000, nanos=123_456_789)  # a float in the row: must compare as sent


def _assert_reused(ingest: Ingest, err: grpc.RpcError, clip: clip_pb2.Clip, part: str) -> None:
    """Refused with the precise reason, naming only the part that differs, and audited against the clip."""
    assert (err.code(), error_info(err).reason) == (grpc.StatusCode.FAILED_PRECONDITION, "IDEMPOTENCY_KEY_REUSED")
    assert f"other {part}" in (err.details() or "") and "use a new key" in (err.details() or "")
    denial = [e for e in ingest.entries() if e["action"] == "clip.ingest"][-1]
    assert denial["outcome"] == {"result": "denied", "reason": "IDEMPOTENCY_KEY_REUSED"}
    target = denial["target"]
    assert isinstance(target, dict)
    assert (target["clip_id"], target["account_ref"]) == (clip.clip_id,
                                                           ingest.server.app.clips.get(clip.clip_id).account_ref)


def test_a_retry_of_the_same_recording_returns_its_clip_and_releases_no_identity(ingest: Ingest) -> None:
    first = ingest.put("upload-1", captured_at=CAPTURED)
    before, entries = ingest.stored(), len(ingest.entries())
    again = ingest.put("upload-1", captured_at=CAPTURED)
    assert again == first
    assert ingest.stored() == before == {"clips": 1, "accounts": 1, "review_queue": 1, "objects": 1}
    assert len(ingest.entries()) == entries  # no clip.identity_read: the identity was compared, not released


@pytest.mark.parametrize("audio", [AUDIO[:-1] + bytes([AUDIO[-1] ^ 1]), AUDIO[:-1], AUDIO + b"\0"],
                         ids=["one-bit", "shorter", "longer"])
def test_a_key_reused_for_other_audio_is_refused_audited_and_the_original_kept(ingest: Ingest,
                                                                               audio: bytes) -> None:
    clip = ingest.put("upload-2")
    before = ingest.stored()
    err = ingest.refused("upload-2", audio)
    _assert_reused(ingest, err, clip, "audio")
    assert ingest.stored() == before
    assert ingest.audio(clip.clip_id) == AUDIO
    assert ingest.put("upload-3", audio).clip_id != clip.clip_id  # with a new key, it is stored


@pytest.mark.parametrize("meta", [
    {"identity": clip_pb2.ClipIdentity(account_id="amzn1.account.OTHERPERSON77", device_serial=SERIAL)},
    {"identity": clip_pb2.ClipIdentity(account_id=ACCOUNT_ID, device_serial="OTHER-SERIAL-0001")},
    {"locale": "de-DE"}, {"device_type": "echo-show-8"}, {"wake_word_detected": False},
    {"content_type": "audio/wav"}, {"duration_ms": 2301}, {"captured_at": None},
    {"captured_at": Timestamp(seconds=CAPTURED.seconds, nanos=CAPTURED.nanos + 1000)},
], ids=["account-id", "serial", "locale", "device-type", "wake-word", "content-type", "duration", "no-capture-time",
        "capture-time"])
def test_a_key_reused_with_other_metadata_is_refused_without_naming_any_value(ingest: Ingest,
                                                                              meta: dict[str, object]) -> None:
    clip = ingest.put("upload-4", captured_at=CAPTURED)
    before, meta = ingest.stored(), {"captured_at": CAPTURED} | meta
    err = ingest.refused("upload-4", **meta)
    _assert_reused(ingest, err, clip, "metadata")
    for value in (ACCOUNT_ID, SERIAL, "OTHERPERSON77", "OTHER-SERIAL", "de-DE", "echo", "audio/", "2301", "2300"):
        assert value not in (err.details() or "")
    assert ingest.stored() == before and ingest.audio(clip.clip_id) == AUDIO
    log = b"".join(ingest.server.app.audit.reader.entries(0, 100_000))
    assert ACCOUNT_ID.encode() not in log and b"OTHERPERSON77" not in log and SERIAL.encode() not in log


def _retry(ingest: Ingest, key: str, messages: list[clip_pb2.PutClipRequest]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        ingest.clips.PutClip(iter([clip_pb2.PutClipRequest(metadata=metadata(idempotency_key=key)), *messages]),
                             metadata=ingest.md, timeout=30)
    return caught.value


@pytest.mark.parametrize(("messages", "reason"), [
    ([clip_pb2.PutClipRequest(audio_chunk=AUDIO)], "CLIP_TRAILER_MISSING"),
    ([clip_pb2.PutClipRequest(audio_chunk=AUDIO), trailer(AUDIO[1:])], "CLIP_SIZE_MISMATCH"),
    ([clip_pb2.PutClipRequest(audio_chunk=AUDIO), trailer(AUDIO[::-1])], "CLIP_DIGEST_MISMATCH"),
    ([trailer(b"")], "INVALID_ARGUMENT"),  # empty, as a first upload would be told
], ids=["no-trailer", "size", "digest", "empty"])
def test_a_retry_is_read_to_its_trailer_with_every_check_of_a_first_upload(
        ingest: Ingest, messages: list[clip_pb2.PutClipRequest], reason: str) -> None:
    clip = ingest.put("upload-5")
    before, entries = ingest.stored(), len(ingest.entries())
    err = _retry(ingest, "upload-5", messages)
    assert (err.code(), error_info(err).reason) == (grpc.StatusCode.INVALID_ARGUMENT, reason)
    assert ingest.stored() == before and len(ingest.entries()) == entries
    assert ingest.put("upload-5").clip_id == clip.clip_id  # the whole clip, resent, still gets it


def test_parallel_first_uploads_of_different_recordings_with_one_key_store_one_and_refuse_the_rest(
        ingest: Ingest) -> None:
    recordings = [secrets.token_bytes(50_000) for _ in range(3)]

    def put(i: int) -> tuple[bytes, str]:
        audio = recordings[i % len(recordings)]
        try:
            return audio, ingest.put("one-key", audio).clip_id
        except grpc.RpcError as err:
            assert (err.code(), error_info(err).reason) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                            "IDEMPOTENCY_KEY_REUSED"), err.details()
            return audio, ""

    with ThreadPoolExecutor(RACERS) as pool:
        outcomes = list(pool.map(put, range(RACERS)))
    stored = ingest.stored()
    assert (stored["clips"], stored["objects"], stored["review_queue"]) == (1, 1, 1)  # no orphan object
    [clip_id] = {c for _, c in outcomes if c}
    kept = ingest.audio(clip_id)
    assert all(bool(c) == (audio == kept) for audio, c in outcomes)  # its retries got it, the others a refusal


# -- in-process: the race where a rival commits while the upload is still arriving -----------------------

@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    app = App(make_config(tmp_path / "data"), clock=FakeClock())
    try:
        yield app
    finally:
        app.close()


def _new(**fields: object) -> NewClip:
    values: dict[str, object] = {"account_id": ACCOUNT_ID, "device_serial": SERIAL, "device_type": "echo-dot-5",
                                 "locale": "en-US", "captured_at": 1_799_999_000.123456789, "wake_word": True,
                                 "content_type": "audio/opus", "idempotency_key": "raced", "duration_ms": 2300}
    return NewClip(**(values | fields))  # type: ignore[arg-type]


def _overtaken(app: App, rival: NewClip, rival_audio: bytes) -> Iterator[bytes]:
    """Our upload's chunks; half-way through, a rival upload with the same key commits first."""
    yield AUDIO[:50_000]
    app.clips.ingest(rival, Chunks([rival_audio]), OPERATOR)
    yield AUDIO[50_000:]


def test_an_upload_overtaken_by_the_same_recording_gets_the_rivals_clip_and_leaves_no_object(app: App) -> None:
    clip = app.clips.ingest(_new(), Chunks(_overtaken(app, _new(), AUDIO)), OPERATOR)
    assert [k for k in app.blobs.list_keys(older_than_s=-1)] == [clip.clip_id]
    assert b"".join(app.clips.audio(clip)) == AUDIO


@pytest.mark.parametrize(("rival", "rival_audio", "part"), [
    (_new(), AUDIO[::-1], "audio"), (_new(account_id="someone-else"), AUDIO, "metadata"),
    (_new(captured_at=1_799_999_000.123456), AUDIO, "metadata"),
], ids=["audio", "account-id", "capture-time"])
def test_an_upload_overtaken_by_another_recording_with_its_key_is_refused_and_leaves_no_object(
        app: App, rival: NewClip, rival_audio: bytes, part: str) -> None:
    with pytest.raises(ClipstoreError) as caught:
        app.clips.ingest(_new(), Chunks(_overtaken(app, rival, rival_audio)), OPERATOR)
    assert caught.value.reason == "IDEMPOTENCY_KEY_REUSED" and f"other {part}" in caught.value.message
    [kept] = app.blobs.list_keys(older_than_s=-1)
    assert b"".join(app.clips.audio(app.clips.get(kept))) == rival_audio


def test_a_retry_after_the_accounts_keys_were_shredded_is_spent_before_its_audio_is_read(app: App) -> None:
    clip = app.clips.ingest(_new(idempotency_key="shredded"), Chunks([AUDIO]), OPERATOR)
    with app.db.transaction() as conn:  # an account deletion that stopped before the clip rows went
        destroy_keks(conn, clip.account_ref, app.clock.now())
    app.keyring.forget(clip.account_ref)

    def unread() -> Iterator[bytes]:
        raise AssertionError("a spent key's upload is not read")
        yield b""

    with pytest.raises(ClipstoreError) as caught:
        app.clips.ingest(_new(idempotency_key="shredded"), Chunks(unread()), OPERATOR)
    assert caught.value.reason == "IDEMPOTENCY_KEY_SPENT"


def test_a_retry_compared_with_a_tampered_clip_fails_its_integrity_check_audited(app: App) -> None:
    clip = app.clips.ingest(_new(idempotency_key="tampered"), Chunks([AUDIO]), OPERATOR)
    path = next(app.config.blob_dir.rglob(clip.clip_id))
    sealed = bytearray(path.read_bytes())
    sealed[len(sealed) // 2] ^= 1
    path.write_bytes(bytes(sealed))
    with pytest.raises(ClipstoreError) as caught:
        app.clips.ingest(_new(idempotency_key="tampered"), Chunks([AUDIO]), OPERATOR)
    assert caught.value.reason == "CLIP_INTEGRITY"
    last = json.loads(app.audit.reader.entries(0, 100_000)[-1])
    assert (last["action"], last["outcome"]["result"], last["target"]["clip_id"]) == (
        "clip.integrity_failure", "failed", clip.clip_id)


def _deleted_mid_upload(app: App, clip_id: str) -> Iterator[bytes]:
    """A retry's chunks; half-way through, its clip is deleted (DeleteClip, a purge or an erasure)."""
    yield AUDIO[:50_000]
    app.clips.delete(clip_id, OPERATOR)
    yield AUDIO[50_000:]


@pytest.mark.parametrize("meta", [{}, {"locale": "de-DE"}], ids=["same-recording", "other-metadata"])
def test_a_retry_whose_clip_is_deleted_while_its_audio_arrives_is_refused_as_spent(app: App,
                                                                                   meta: dict[str, str]) -> None:
    # The key's clip is looked up before the upload is read (which takes as long as the client likes), and
    # compared after: by then its object may be gone with it. Spent, as for a retry that came later; not
    # a missing object (NOT_FOUND), which would read as a storage fault, nor a refusal naming a clip that is gone.
    clip = app.clips.ingest(_new(idempotency_key="deleted-meanwhile"), Chunks([AUDIO]), OPERATOR)
    with pytest.raises(ClipstoreError) as caught:
        app.clips.ingest(_new(idempotency_key="deleted-meanwhile", **meta),
                         Chunks(_deleted_mid_upload(app, clip.clip_id)), OPERATOR)
    assert caught.value.reason == "IDEMPOTENCY_KEY_SPENT", caught.value.message
    assert list(app.blobs.list_keys(older_than_s=-1)) == []
    last = json.loads(app.audit.reader.entries(0, 100_000)[-1])
    assert last["action"] == "clip.delete"  # no refusal or integrity failure entry for a clip that is gone


def test_a_retry_whose_clip_is_deleted_as_it_is_compared_is_refused_as_spent(
        app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    clip = app.clips.ingest(_new(idempotency_key="deleted-at-compare"), Chunks([AUDIO]), OPERATOR)
    get_stream = app.blobs.get_stream

    def deleted_first(key: str) -> Iterator[bytes]:  # the deletion lands between the last look-up and the read
        app.clips.delete(clip.clip_id, OPERATOR)
        return get_stream(key)

    monkeypatch.setattr(app.blobs, "get_stream", deleted_first)
    with pytest.raises(ClipstoreError) as caught:
        app.clips.ingest(_new(idempotency_key="deleted-at-compare"), Chunks([AUDIO]), OPERATOR)
    assert caught.value.reason == "IDEMPOTENCY_KEY_SPENT", caught.value.message


def test_a_retry_racing_the_deletion_of_its_account_is_refused_as_spent_and_leaves_nothing(ingest: Ingest) -> None:
    ingest.put("erased-meanwhile")

    def retry() -> Iterator[clip_pb2.PutClipRequest]:
        requests = put_requests(metadata(idempotency_key="erased-meanwhile"), AUDIO)
        yield next(requests)  # the metadata: the server looks the key up and starts reading the audio
        yield next(requests)
        ingest.accounts.DeleteAccount(account_pb2.DeleteAccountRequest(account_id=ACCOUNT_ID), metadata=ingest.md,
                                      timeout=10)
        yield from requests

    with pytest.raises(grpc.RpcError) as caught:
        ingest.clips.PutClip(retry(), metadata=ingest.md, timeout=30)
    _assert_spent(caught.value)
    assert ingest.stored() == {"clips": 0, "accounts": 0, "review_queue": 0, "objects": 0}


def test_a_retry_matches_a_clip_stored_before_locales_were_canonicalised(ingest: Ingest) -> None:
    """Locales are stored canonical now (`en-us` as `en-US`); a retry of a clip stored before, as `en-us`,
    gets its clip, not IDEMPOTENCY_KEY_REUSED."""
    first = ingest.put("k-locale", locale="en-us")
    with ingest.server.app.db.transaction() as conn:  # as a row written before the change
        conn.execute(sa.update(schema.clips).where(schema.clips.c.clip_id == first.clip_id).values(locale="en-us"))
    assert ingest.put("k-locale", locale="en-us").clip_id == first.clip_id
    assert ingest.clips.GetClip(clip_pb2.GetClipRequest(clip_id=first.clip_id), metadata=ingest.md,
                                timeout=10).clip.locale == "en-US"  # shown canonical too
    assert ingest.put("k-locale", locale="EN-US").clip_id == first.clip_id
