"""clipstore.client against a real server on loopback: the sync client, its asyncio twin, the errors
generated per reason, retries with one idempotency key, and audit reads verified before they are returned."""

from __future__ import annotations

import asyncio
import base64
import importlib
import io
import json
import pkgutil
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import sqlalchemy as sa
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from auditlog.errors import CheckpointError, EntryError, NoteError, ProofError
from auditlog.merkle import inclusion_proof, leaf_hash, root_hash
from auditlog.note import NoteSigner
from clipstore.auth import create_principal
from clipstore.client import (
    SERVICE_CONFIG,
    AsyncClipstoreClient,
    ClipstoreClient,
    ClipstoreRpcError,
    VerifiedCheckpoint,
    errors,
)
from clipstore.client._audit import range_root
from clipstore.client._wire import AUDIO_CHUNK_BYTES
from clipstore.clips import MAX_CHUNK_BYTES
from clipstore.config import Config, default, load_config
from clipstore.errors import Reason, Unavailable
from clipstore.interceptors import ClipstoreInterceptor
from clipstore.rows import Principal
from clipstore.server import ClipstoreServer, running_server
from clipstore.store import schema
from clipstore.tls import write_dev_certs
from clipstore.totp import code_at
from clipstore.v1 import audit_pb2, clip_pb2, clip_pb2_grpc, reviewer_admin_pb2
from tests.conftest import make_config

AUDIO = bytes(range(256)) * 600  # 150 KiB: three envelope segments
ACCOUNT = "acct-client-test"
CLIP = {"account_id": ACCOUNT, "locale": "en-US", "content_type": "audio/opus", "wake_word_detected": True}
CLIENT_SOURCES = sorted((Path(__file__).parent.parent / "clipstore" / "client").glob("*.py"))


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """SQLite only: nothing the client does depends on the database. Every clip is sampled for review."""
    return make_config(tmp_path / "data", **{"review.sample_rate": 1.0})


def connect(server: ClipstoreServer, key: str | None, **kw: Any) -> ClipstoreClient:
    return ClipstoreClient(f"127.0.0.1:{server.port}", api_key=key, **kw)


def aconnect(server: ClipstoreServer, key: str | None, **kw: Any) -> AsyncClipstoreClient:
    return AsyncClipstoreClient(f"127.0.0.1:{server.port}", api_key=key, **kw)


def audit_entries(server: ClipstoreServer) -> list[dict[str, Any]]:
    return [json.loads(e) for e in server.app.audit.reader.entries(0, 100_000)]


def verifier_key(server: ClipstoreServer) -> str:
    """In production the security team holds this key from elsewhere; tests read it off the signer."""
    return server.app.audit.signer.verifier.key_string()


# -- clips --------------------------------------------------------------------------------------------

def test_put_get_list_and_delete_a_clip_from_bytes_a_file_and_an_iterator(server: ClipstoreServer,
                                                                          keys: dict[str, str]) -> None:
    with connect(server, keys["ingest"]) as client:
        from_bytes = client.put_clip(AUDIO, **CLIP, device_serial="SERIAL-1", duration_ms=4800)
        from_file = client.put_clip(io.BytesIO(AUDIO), **CLIP)
        from_iterator = client.put_clip(iter([AUDIO[:1000], AUDIO[1000:]]), **CLIP)
        assert [c.size_bytes for c in (from_bytes, from_file, from_iterator)] == [len(AUDIO)] * 3
        got = client.get_clip(from_bytes.clip_id)
        assert (got.identity.account_id, got.identity.device_serial, got.duration_ms) == (ACCOUNT, "SERIAL-1", 4800)
        listed = list(client.list_clips(ACCOUNT, page_size=2, include_identity=True))  # two pages
        assert sorted(c.clip_id for c in listed) == sorted(c.clip_id for c in (from_bytes, from_file, from_iterator))
        assert {c.identity.account_id for c in listed} == {ACCOUNT}
        client.delete_clip(from_file.clip_id)
        with pytest.raises(errors.ClipNotFoundError):
            client.get_clip(from_file.clip_id)


def test_the_same_idempotency_key_stores_one_clip(server: ClipstoreServer, keys: dict[str, str]) -> None:
    with connect(server, keys["ingest"]) as client:
        first = client.put_clip(AUDIO, **CLIP, idempotency_key="upload-42")
        again = client.put_clip(AUDIO, **CLIP, idempotency_key="upload-42")
        assert again.clip_id == first.clip_id
        assert [c.clip_id for c in client.list_clips(ACCOUNT)] == [first.clip_id]
        with pytest.raises(errors.IdempotencyKeyReusedError) as caught:  # another recording: not retried
            client.put_clip(AUDIO[::-1], **CLIP, idempotency_key="upload-42")
        assert caught.value.code is grpc.StatusCode.FAILED_PRECONDITION and not caught.value.retryable
        assert [c.clip_id for c in client.list_clips(ACCOUNT)] == [first.clip_id]


class _MessageSizes(grpc.StreamUnaryClientInterceptor):
    """Records the audio bytes of each PutClip message the client sends."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def _seen(self, requests: Iterator[clip_pb2.PutClipRequest]) -> Iterator[clip_pb2.PutClipRequest]:
        for request in requests:
            if request.WhichOneof("part") == "audio_chunk":
                self.sizes.append(len(request.audio_chunk))
            yield request

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(details, self._seen(requests))


def test_audio_goes_in_messages_of_the_most_the_server_takes_and_is_stored_whole(
        server: ClipstoreServer, keys: dict[str, str]) -> None:
    """Fewer, larger messages cost both processes less per byte; the server seals across their edges."""
    audio = secrets.token_bytes(2 * AUDIO_CHUNK_BYTES + 12_345)
    assert AUDIO_CHUNK_BYTES == MAX_CHUNK_BYTES
    assert clip_pb2.PutClipRequest(audio_chunk=audio[:AUDIO_CHUNK_BYTES]).ByteSize() < default("max_message_bytes")
    sent = _MessageSizes()
    with connect(server, keys["ingest"], interceptors=[sent]) as client:
        clips = [client.put_clip(audio, **CLIP), client.put_clip(io.BytesIO(audio), **CLIP)]
    assert sent.sizes == [AUDIO_CHUNK_BYTES, AUDIO_CHUNK_BYTES, 12_345] * 2
    for clip in clips:
        assert b"".join(server.app.clips.audio(server.app.clips.get(clip.clip_id))) == audio


class _LostResponse(grpc.RpcError):
    """What a connection reset after the server answered looks like to the caller."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection reset"

    def trailing_metadata(self) -> tuple[()]:
        return ()


def _keys_of(requests: Iterator[clip_pb2.PutClipRequest], seen: list[str]) -> Iterator[clip_pb2.PutClipRequest]:
    for request in requests:
        if request.WhichOneof("part") == "metadata":
            seen.append(request.metadata.idempotency_key)
        yield request


class LoseFirstPutClipResponse(grpc.StreamUnaryClientInterceptor):
    """Lets the first PutClip reach the server and complete there, then loses its response."""

    def __init__(self) -> None:
        self.calls = 0
        self.keys: list[str] = []  # the idempotency key of each attempt

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        self.calls += 1
        call = continuation(details, _keys_of(requests, self.keys))
        if self.calls == 1:
            call.result()  # the server stored the clip ...
            raise _LostResponse()  # ... and its answer never arrives
        return call


def test_a_lost_response_is_retried_with_the_same_idempotency_key_and_stores_one_clip(
        server: ClipstoreServer, keys: dict[str, str]) -> None:
    lose = LoseFirstPutClipResponse()
    waits: list[float] = []
    with connect(server, keys["ingest"], interceptors=[lose], sleep=waits.append) as client:
        clip = client.put_clip(io.BytesIO(AUDIO), **CLIP)
        stored = list(client.list_clips(ACCOUNT))
    first, second = lose.keys
    assert first == second and len(waits) == 1
    assert [c.clip_id for c in stored] == [clip.clip_id]


def test_an_iterator_is_sent_once_so_a_lost_response_is_raised_not_retried(
        server: ClipstoreServer, keys: dict[str, str]) -> None:
    lose = LoseFirstPutClipResponse()
    with connect(server, keys["ingest"], interceptors=[lose], sleep=lambda s: None) as client, \
            pytest.raises(ClipstoreRpcError) as raised:
        client.put_clip(iter([AUDIO]), **CLIP)
    assert raised.value.code is grpc.StatusCode.UNAVAILABLE and raised.value.retryable
    assert type(raised.value) is ClipstoreRpcError and raised.value.reason is None  # no server reason: transport


def test_a_blob_store_outage_is_retried_with_the_same_key_until_it_recovers(
        server: ClipstoreServer, keys: dict[str, str]) -> None:
    blobs: Path = server.app.blobs.root
    away = blobs.with_name("blobs.away")
    blobs.rename(away)
    blobs.write_bytes(b"")  # a file where the store's directory should be: every write fails

    def recover(seconds: float) -> None:
        blobs.unlink()
        away.rename(blobs)
        waits.append(seconds)

    waits: list[float] = []
    with connect(server, keys["ingest"], sleep=recover) as client:
        clip = client.put_clip(AUDIO, **CLIP)
        assert [c.clip_id for c in client.list_clips(ACCOUNT)] == [clip.clip_id]
    assert len(waits) == 1 and 0 <= waits[0] <= 0.1
    outcomes = [e["outcome"] for e in audit_entries(server) if e["action"] == "clip.ingest"]
    assert outcomes == [{"result": "failed", "reason": "BLOB_STORE_UNAVAILABLE"},
                        {"result": "ok", "reason": ""}]


def test_put_clip_gives_up_after_the_policy_s_attempts(server: ClipstoreServer, keys: dict[str, str]) -> None:
    server.app.blobs.root.rename(server.app.blobs.root.with_name("blobs.away"))
    server.app.blobs.root.write_bytes(b"")
    waits: list[float] = []
    with connect(server, keys["ingest"], sleep=waits.append) as client, \
            pytest.raises(errors.BlobStoreUnavailableError) as raised:
        client.put_clip(AUDIO, **CLIP)
    assert len(waits) == client.retry.max_attempts - 1 == 3
    assert raised.value.retryable


# -- errors ---------------------------------------------------------------------------------------------

def test_every_reason_has_one_generated_error_class_and_none_is_written_by_hand() -> None:
    assert set(errors.BY_REASON) == set(Reason)
    assert len({cls.__name__ for cls in errors.BY_REASON.values()}) == len(Reason)
    for reason, cls in errors.BY_REASON.items():
        assert issubclass(cls, ClipstoreRpcError) and getattr(errors, cls.__name__) is cls
        assert cls.kind is reason.kind and reason.advice in (cls.__doc__ or "")
    assert errors.GrantExpiredError is errors.BY_REASON[Reason.GRANT_EXPIRED]
    assert errors.ClipstoreNotImplementedError.kind is Reason.NOT_IMPLEMENTED.kind  # never shadows the builtin
    handwritten = [name for path in CLIENT_SOURCES for name in re.findall(r"^class (\w+Error)\b", path.read_text(),
                                                                            re.M)]
    assert handwritten == ["ClipstoreRpcError"]


def test_server_errors_arrive_as_their_reason_s_class_with_code_message_and_request_id(
        server: ClipstoreServer, keys: dict[str, str]) -> None:
    with connect(server, None) as anonymous, pytest.raises(errors.MissingCredentialsError) as missing:
        anonymous.get_clip("c_0")
    assert missing.value.code is grpc.StatusCode.UNAUTHENTICATED and missing.value.reason == "MISSING_CREDENTIALS"
    assert re.fullmatch(r"[0-9a-f]{32}", missing.value.request_id or "")

    with connect(server, keys["auditor"]) as auditor, pytest.raises(errors.WrongRoleError) as wrong_role:
        auditor.put_clip(AUDIO, **CLIP)
    assert wrong_role.value.code is grpc.StatusCode.PERMISSION_DENIED and "ingest" in wrong_role.value.message
    denial = [e for e in audit_entries(server) if e["action"] == "auth.deny"][-1]
    assert denial["request_id"] == wrong_role.value.request_id  # the id to quote is the one the audit log holds

    with connect(server, keys["ingest"]) as ingest:
        with pytest.raises(errors.InvalidArgumentError) as invalid:
            ingest.put_clip(AUDIO, **{**CLIP, "locale": "english please"})
        assert invalid.value.metadata == {"field": "metadata.locale"}
        with pytest.raises(errors.ClipNotFoundError) as not_found:
            ingest.get_clip("c_000000000000000000000000")
        assert not_found.value.code is grpc.StatusCode.NOT_FOUND and not not_found.value.retryable
        assert "c_000000000000000000000000" in str(not_found.value)


def test_a_reason_newer_than_the_client_still_raises_with_its_code_and_reason() -> None:
    info = error_details_pb2.ErrorInfo(reason="A_REASON_FROM_THE_FUTURE", domain="clipstore.v1",
                                       metadata={"request_id": "r1"})
    detail = any_pb2.Any()
    detail.Pack(info)
    trailer = ("grpc-status-details-bin", status_pb2.Status(code=9, details=[detail]).SerializeToString())
    error = errors.from_rpc_error(_LostResponse(), trailing_metadata=[trailer])
    assert type(error) is ClipstoreRpcError
    assert (error.reason, error.request_id, error.code) == ("A_REASON_FROM_THE_FUTURE", "r1",
                                                            grpc.StatusCode.UNAVAILABLE)


# -- channel, credentials, deadlines -------------------------------------------------------------------------

class RecordDeadlines(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor,
                      grpc.UnaryStreamClientInterceptor):
    def __init__(self) -> None:
        self.calls: list[tuple[str, float | None]] = []

    def _record(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        self.calls.append((details.method, details.timeout))
        return continuation(details, request)

    intercept_unary_unary = intercept_stream_unary = intercept_unary_stream = _record


def test_every_call_carries_a_deadline(server: ClipstoreServer, keys: dict[str, str]) -> None:
    record = RecordDeadlines()
    with connect(server, keys["ingest"], interceptors=[record], timeout_s=7) as client:
        clip = client.put_clip(AUDIO, **CLIP, timeout_s=60)
        client.get_clip(clip.clip_id)
        list(client.list_clips(ACCOUNT))
        client.set_review_preference(ACCOUNT, False)
        client.delete_clip(clip.clip_id)
        assert client.health() == "SERVING"
    assert len(record.calls) == 6
    assert all(timeout is not None and 0 < timeout <= 60 for _, timeout in record.calls), record.calls


def test_service_config_sets_a_deadline_for_every_method_and_retries_only_idempotent_ones() -> None:
    import clipstore.v1
    from clipstore.server import SERVICE_NAMES
    configs = SERVICE_CONFIG["methodConfig"]
    with_timeout = {n["service"] for c in configs if "timeout" in c for n in c["name"] if "method" not in n}
    assert with_timeout == set(SERVICE_NAMES)
    retried = {f"{n['service'].rsplit('.', 1)[1]}/{n['method']}" for c in configs if "retryPolicy" in c
               for n in c["name"]}
    assert retried == {"ClipService/GetClip", "ClipService/ListClips", "AccountService/SetReviewPreference",
                       "SafetyService/ListEscalations", "AuditService/GetCheckpoint", "AuditService/ListEntries",
                       "AuditService/GetInclusionProof", "AuditService/GetConsistencyProof",
                       "PrincipalAdminService/ListPrincipals", "Health/Check"}
    modules = [importlib.import_module(f"clipstore.v1.{m.name}") for m in pkgutil.iter_modules(clipstore.v1.__path__)
               if m.name.endswith("_pb2")]
    methods = {f"{s.name}/{m.name}" for module in modules for s in module.DESCRIPTOR.services_by_name.values()
               for m in s.methods}
    assert retried - {"Health/Check"} <= methods  # no typo: each names a real method
    assert [c["retryPolicy"]["retryableStatusCodes"] for c in configs if "retryPolicy" in c] == [["UNAVAILABLE"]]


def test_an_admin_manages_principals(server: ClipstoreServer, keys: dict[str, str]) -> None:
    with connect(server, keys["admin"]) as admin:
        created = admin.create_principal("ingest", "asr-backend")
        assert created.api_key.startswith("csk_")
        assert created.principal.principal_id in {p.principal_id for p in admin.list_principals("ingest", page_size=1)}
        rotated = admin.rotate_principal_key(created.principal.principal_id, overlap_s=0)
        with connect(server, created.api_key) as old_key, pytest.raises(errors.KeyRotatedOutError):
            list(old_key.list_clips(ACCOUNT))
        with connect(server, rotated.api_key) as new_key:
            assert list(new_key.list_clips(ACCOUNT)) == []
        assert admin.disable_principal(created.principal.principal_id).principal.disabled
        with connect(server, rotated.api_key) as disabled, pytest.raises(errors.PrincipalDisabledError):
            list(disabled.list_clips(ACCOUNT))
        assert not admin.enable_principal(created.principal.principal_id).disabled


class FailsOnce(clip_pb2_grpc.ClipServiceServicer):
    """A ClipService whose database is down for the first call of each method."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def _once(self, method: str) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        if self.calls[method] == 1:
            raise Unavailable("the metadata database is unavailable; retry later", reason="DATABASE_UNAVAILABLE")

    def GetClip(self, request: Any, context: Any) -> clip_pb2.GetClipResponse:
        self._once("GetClip")
        return clip_pb2.GetClipResponse(clip=clip_pb2.Clip(clip_id=request.clip_id))

    def DeleteClip(self, request: Any, context: Any) -> clip_pb2.DeleteClipResponse:
        self._once("DeleteClip")
        return clip_pb2.DeleteClipResponse()


def test_the_published_service_config_retries_an_unavailable_read_and_never_a_delete() -> None:
    """Through the server's real interceptor chain: a failure is the call's only answer (Trailers-Only),
    which is what lets gRPC's retry policy retry it."""
    servicer = FailsOnce()
    interceptor = ClipstoreInterceptor(lambda metadata, context: Principal(id="p_test", name="test", role="ingest"),
                                       serving=load_config(env={}).serving)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[interceptor])
    clip_pb2_grpc.add_ClipServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with ClipstoreClient(f"127.0.0.1:{port}", api_key="csk_test") as client:
            assert client.get_clip("c_1").clip_id == "c_1"
            with pytest.raises(errors.DatabaseUnavailableError):
                client.delete_clip("c_1")
    finally:
        server.stop(None)
        interceptor.close()
    assert servicer.calls == {"GetClip": 2, "DeleteClip": 1}


def test_an_api_key_is_never_sent_in_plaintext_off_loopback() -> None:
    with pytest.raises(ValueError, match="plaintext"):
        ClipstoreClient("clipstore.internal:50051", api_key="csk_x")
    with pytest.raises(ValueError, match="cert_file and key_file"):
        ClipstoreClient("127.0.0.1:1", cert_file="client.pem")


def test_a_client_certificate_authenticates_over_mtls(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    write_dev_certs(certs, [("asr", "ingest")])
    config = make_config(tmp_path / "data", **{"tls.cert_file": str(certs / "server.pem"),
                                               "tls.key_file": str(certs / "server.key"),
                                               "tls.client_ca_file": str(certs / "ca.pem")})
    with running_server(config) as server, \
            ClipstoreClient(f"localhost:{server.port}", ca_file=certs / "ca.pem", cert_file=certs / "client-asr.pem",
                            key_file=certs / "client-asr.key") as client:
        create_principal(server.app.principals, server.app.audit, role="ingest", name="asr",
                         spiffe_id="spiffe://clipstore/ingest/asr")
        clip = client.put_clip(AUDIO, **CLIP)
        assert client.get_clip(clip.clip_id).identity.account_id == ACCOUNT


# -- review -------------------------------------------------------------------------------------------------

def _enrolled(client: ClipstoreClient, admin_response: reviewer_admin_pb2.CreateReviewerResponse
              ) -> tuple[str, bytes]:
    """The reviewer redeems the admin's one-time code: their API key and TOTP secret, shown to them alone."""
    offer = admin_response.enrolment
    factors = client.redeem_enrolment_code(offer.reviewer_id, offer.code)
    return factors.api_key, base64.b32decode(factors.totp_secret + "=" * (-len(factors.totp_secret) % 8))


def test_a_reviewer_hears_a_clip_once_per_grant_and_escalates_another(server: ClipstoreServer, keys: dict[str, str],
                                                                      tmp_path: Path) -> None:
    with connect(server, keys["ingest"]) as ingest, connect(server, keys["admin"]) as admin:
        ingest.set_review_preference(ACCOUNT, True)
        ingest.put_clip(AUDIO, **CLIP)
        ingest.put_clip(AUDIO[:5000], **CLIP)
        with connect(server, None) as newcomer:
            api_key, secret = _enrolled(newcomer, admin.create_reviewer("rev-1", ["en-US"]))
    with connect(server, api_key) as reviewer:
        token = reviewer.start_review_session(code_at(secret, time.time())).session_token
        first = reviewer.next_assignment(token)
        grant = reviewer.request_grant(token, first.assignment_id)
        heard = b"".join(reviewer.fetch_clip(token, grant.grant, grant.review_clip_id))
        assert heard in (AUDIO, AUDIO[:5000])
        out = tmp_path / "clip.opus"
        with pytest.raises(errors.GrantReplayedError):
            reviewer.fetch_clip_to(out, token, grant.grant, grant.review_clip_id)
        assert list(tmp_path.iterdir()) == [tmp_path / "data"]  # nothing written, not even a partial file
        again = reviewer.request_grant(token, first.assignment_id)
        assert reviewer.fetch_clip_to(out, token, again.grant, again.review_clip_id) == len(heard)
        assert out.read_bytes() == heard and out.stat().st_mode & 0o777 == 0o600
        reviewer.complete_assignment(token, first.assignment_id, "command")
        second = reviewer.next_assignment(token)
        escalation_id = reviewer.flag_clip(token, second.assignment_id, "distress", "caller sounded hurt")
        reviewer.end_review_session(token)
        with pytest.raises(errors.SessionEndedError):
            reviewer.next_assignment(token)
    with connect(server, keys["safety"]) as safety:
        [open_one] = list(safety.list_escalations())
        assert (open_one.escalation_id, open_one.note) == (escalation_id, "caller sounded hurt")
        assert safety.resolve_escalation(escalation_id, "called back").resolved


# -- audit ---------------------------------------------------------------------------------------------------

def _log_with_entries(server: ClipstoreServer, keys: dict[str, str], clips: int) -> None:
    with connect(server, keys["ingest"]) as ingest:
        for _ in range(clips):
            ingest.put_clip(AUDIO[:100], **CLIP)
    server.app.audit.checkpoint()  # sign what is there now, rather than wait for the next interval


def test_audit_reads_are_verified_against_the_caller_s_key(server: ClipstoreServer, keys: dict[str, str]) -> None:
    _log_with_entries(server, keys, 4)
    with connect(server, keys["auditor"]) as auditor:
        checkpoint = auditor.get_checkpoint(verifier_key(server))
        entries = list(auditor.list_entries(checkpoint, page_size=3))
        assert [e.data for e in entries] == server.app.audit.reader.entries(0, checkpoint.size)
        assert [e.index for e in entries] == list(range(checkpoint.size)) and checkpoint.size >= 9
        assert [e.index for e in auditor.list_entries(checkpoint, start=5, page_size=2)] == \
            list(range(5, checkpoint.size))
        proof = auditor.get_inclusion_proof(3, checkpoint, entry=entries[3].data)
        assert proof.leaf_hash == leaf_hash(entries[3].data)

        _log_with_entries(server, keys, 2)
        later = auditor.get_checkpoint(verifier_key(server), trusted=checkpoint)
        assert later.size > checkpoint.size
        assert auditor.get_consistency_proof(checkpoint, later)
        saved = VerifiedCheckpoint.open(checkpoint.note, verifier_key(server))
        assert (saved.size, saved.root) == (checkpoint.size, checkpoint.root)


def test_a_checkpoint_not_signed_by_the_caller_s_key_is_refused(server: ClipstoreServer,
                                                                keys: dict[str, str]) -> None:
    stranger = NoteSigner.generate(server.app.audit.signer.name).verifier.key_string()
    with connect(server, keys["auditor"]) as auditor, pytest.raises(NoteError, match="no verifiable signatures"):
        auditor.get_checkpoint(stranger)


def test_an_edited_entry_is_caught_before_its_page_is_returned(server: ClipstoreServer,
                                                               keys: dict[str, str]) -> None:
    _log_with_entries(server, keys, 3)
    with connect(server, keys["auditor"]) as auditor:
        checkpoint = auditor.get_checkpoint(verifier_key(server))
        original = server.app.audit.reader.entries(5, 1)[0]
        edited = original.replace(b'"action":"clip.ingest"', b'"action":"clip.ingesT"')
        assert edited != original
        with server.app.db.transaction() as conn:
            conn.execute(sa.update(schema.audit_entries).where(schema.audit_entries.c.seq == 5).values(entry=edited))
        returned: list[int] = []
        with pytest.raises(EntryError) as raised:
            for entry in auditor.list_entries(checkpoint, page_size=2):
                returned.append(entry.index)
        assert returned == [0, 1, 2, 3] and raised.value.index in (4, 5)  # the page [4, 5] never reached the caller
        with pytest.raises(ProofError):
            auditor.get_inclusion_proof(5, checkpoint, entry=edited)


def test_a_rolled_back_log_is_refused_against_a_trusted_checkpoint(server: ClipstoreServer,
                                                                   keys: dict[str, str]) -> None:
    _log_with_entries(server, keys, 1)
    with connect(server, keys["auditor"]) as auditor:
        old = auditor.get_checkpoint(verifier_key(server))
        _log_with_entries(server, keys, 1)
        new = auditor.get_checkpoint(verifier_key(server), trusted=old)
        with server.app.db.transaction() as conn:  # the operator restores the checkpoints of a backup
            conn.execute(sa.delete(schema.audit_checkpoints).where(schema.audit_checkpoints.c.size > old.size))
        with pytest.raises(ProofError, match="rolled back"):
            auditor.get_checkpoint(verifier_key(server), trusted=new)


def test_a_checkpoint_whose_unsigned_fields_disagree_with_its_note_is_refused(server: ClipstoreServer,
                                                                              keys: dict[str, str]) -> None:
    from clipstore.client._audit import checkpoint_from
    with connect(server, keys["auditor"]) as auditor:
        note = auditor.get_checkpoint(verifier_key(server)).note
    lying = audit_pb2.GetCheckpointResponse(signed_note=note, tree_size=10**6, root_hash=b"\x00" * 32)
    with pytest.raises(CheckpointError, match="disagree"):
        checkpoint_from(lying, verifier_key(server))


@pytest.mark.parametrize("size", [1, 2, 3, 7, 8, 13, 64, 100])
def test_a_range_and_two_inclusion_proofs_give_back_the_tree_root(size: int) -> None:
    leaves = [leaf_hash(i.to_bytes(4, "big")) for i in range(size)]
    for start in range(size):
        for end in range(start + 1, size + 1):
            got = range_root(size, start, leaves[start:end], inclusion_proof(leaves, start),
                             inclusion_proof(leaves, end - 1))
            assert got == root_hash(leaves), (start, end)
    if size > 2:  # a leaf inside the range that the server swapped is never taken from the proof
        forged = [*leaves[:1], leaf_hash(b"forged"), *leaves[2:]]
        assert range_root(size, 0, forged, inclusion_proof(leaves, 0), inclusion_proof(leaves, size - 1)) \
            != root_hash(leaves)


# -- asyncio -------------------------------------------------------------------------------------------------

class AioLoseFirstPutClipResponse(grpc.aio.StreamUnaryClientInterceptor):
    """The asyncio twin of LoseFirstPutClipResponse; calls after the retry pass through untouched."""

    def __init__(self) -> None:
        self.calls = 0
        self.keys: list[str] = []

    async def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        self.calls += 1
        if self.calls > 2:
            return await continuation(details, requests)
        call = await continuation(details, _keys_of(requests, self.keys))
        if self.calls == 1:
            await call
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       details="connection reset")
        return call


def test_async_client_stores_lists_and_retries_a_lost_response_with_the_same_key(
        server: ClipstoreServer, keys: dict[str, str]) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield AUDIO[:70_000]
        yield AUDIO[70_000:]

    async def scenario() -> None:
        lose = AioLoseFirstPutClipResponse()
        waits: list[float] = []

        async def sleep(seconds: float) -> None:
            waits.append(seconds)

        async with aconnect(server, keys["ingest"], interceptors=[lose], sleep=sleep) as client:
            retried = await client.put_clip(AUDIO, **CLIP)
            assert lose.keys[0] == lose.keys[1] and len(lose.keys) == 2 and len(waits) == 1
            streamed = await client.put_clip(chunks(), **CLIP)
            assert streamed.size_bytes == len(AUDIO)
            listed = [c.clip_id async for c in client.list_clips(ACCOUNT, page_size=1)]
            assert sorted(listed) == sorted([retried.clip_id, streamed.clip_id])
            assert (await client.get_clip(streamed.clip_id)).identity.account_id == ACCOUNT
            await client.delete_clip(streamed.clip_id)
            with pytest.raises(errors.ClipNotFoundError) as raised:
                await client.get_clip(streamed.clip_id)
            assert raised.value.code is grpc.StatusCode.NOT_FOUND and raised.value.request_id
            assert await client.health("clipstore.v1.ClipService") == "SERVING"

    asyncio.run(scenario())


def test_async_client_fetches_a_clip_and_verifies_the_audit_log(server: ClipstoreServer, keys: dict[str, str],
                                                                 tmp_path: Path) -> None:
    async def scenario() -> None:
        async with aconnect(server, keys["ingest"]) as ingest, aconnect(server, keys["admin"]) as admin:
            await ingest.set_review_preference(ACCOUNT, True)
            await ingest.put_clip(io.BytesIO(AUDIO), **CLIP)
            offer = (await admin.create_reviewer("rev-aio", ["en-US"])).enrolment
        async with aconnect(server, None) as newcomer:
            factors = await newcomer.redeem_enrolment_code(offer.reviewer_id, offer.code)
            api_key = factors.api_key
            secret = base64.b32decode(factors.totp_secret + "=" * (-len(factors.totp_secret) % 8))
        async with aconnect(server, api_key) as reviewer:
            token = (await reviewer.start_review_session(code_at(secret, time.time()))).session_token
            assignment = await reviewer.next_assignment(token)
            grant = await reviewer.request_grant(token, assignment.assignment_id)
            assert b"".join([c async for c in reviewer.fetch_clip(token, grant.grant, grant.review_clip_id)]) == AUDIO
            with pytest.raises(errors.GrantReplayedError):
                await reviewer.fetch_clip_to(tmp_path / "x", token, grant.grant, grant.review_clip_id)
            assert not (tmp_path / "x").exists()
            await reviewer.complete_assignment(token, assignment.assignment_id, "command")
            await reviewer.end_review_session(token)
        async with aconnect(server, keys["auditor"]) as auditor:
            checkpoint = await auditor.get_checkpoint(verifier_key(server))
            entries = [e async for e in auditor.list_entries(checkpoint, page_size=4)]
            assert [e.data for e in entries] == server.app.audit.reader.entries(0, checkpoint.size)
            with connect(server, keys["ingest"]) as ingest_sync:
                ingest_sync.put_clip(AUDIO[:10], **CLIP)
            server.app.audit.checkpoint()
            later = await auditor.get_checkpoint(verifier_key(server), trusted=checkpoint)
            assert later.size > checkpoint.size
            proof = await auditor.get_inclusion_proof(0, later, entry=entries[0].data)
            assert proof.tree_size == later.size
            with pytest.raises(NoteError):
                await auditor.get_checkpoint(NoteSigner.generate("other").verifier.key_string())

    asyncio.run(scenario())


def test_async_errors_use_the_same_generated_classes(server: ClipstoreServer, keys: dict[str, str]) -> None:
    async def scenario() -> None:
        async with aconnect(server, keys["auditor"]) as auditor:
            with pytest.raises(errors.WrongRoleError) as raised:
                await auditor.set_review_preference(ACCOUNT, True)
            assert raised.value.code is grpc.StatusCode.PERMISSION_DENIED

    asyncio.run(scenario())

