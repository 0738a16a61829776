"""Privacy scenarios: one test per fact of 2019 that this service makes impossible."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.message import Message

from auditlog.__main__ import verify_dir
from clipstore.audit.export import export_log
from clipstore.config import Config
from clipstore.grants import GrantClaims, encode_grant
from clipstore.review.sessions import token_hash
from clipstore.server import ClipstoreServer, running_server
from clipstore.store import schema
from clipstore.store.clips import ClipRows
from clipstore.store.review import ReviewRows
from clipstore.totp import code_at, matching_step
from clipstore.v1 import (
    account_pb2,
    account_pb2_grpc,
    clip_pb2,
    clip_pb2_grpc,
    common_pb2,
    review_pb2,
    review_pb2_grpc,
    reviewer_admin_pb2,
    reviewer_admin_pb2_grpc,
    safety_pb2,
    safety_pb2_grpc,
)
from tests.clip_helpers import ACCOUNT_ID, SERIAL, metadata, put_requests
from tests.conftest import FakeClock, bearer, make_config, new_key
from tests.db_helpers import database_bytes
from tests.enrolment_helpers import enrol, totp_secret_bytes
from tests.grpc_helpers import error_info

T = TypeVar("T")

AUDIO = bytes(range(256)) * 300  # 75 KiB: two segments


@pytest.fixture
def review_config(tmp_path: Path, database_url: str | None) -> Config:
    return make_config(tmp_path / "data", database_url=database_url,
                       **{"review.sample_rate": 1.0, "review.daily_cap": 3})


@pytest.fixture
def srv(review_config: Config, clock: FakeClock, log_stream: io.StringIO) -> Iterator[ClipstoreServer]:
    with running_server(review_config, clock=clock) as server:
        yield server


@dataclass
class Reviewer:
    id: str
    md: tuple[tuple[str, str], ...]
    secret: bytes
    stub: review_pb2_grpc.ReviewServiceStub


class World:
    """Real stubs on one channel, one key per role, helpers that read like the workflow."""

    def __init__(self, server: ClipstoreServer, channel: grpc.Channel, clock: FakeClock) -> None:
        self.server, self.channel, self.clock = server, channel, clock
        self.admin = bearer(new_key(server.app, "admin"))
        self.ingest = bearer(new_key(server.app, "ingest"))
        self.safety_md = bearer(new_key(server.app, "safety"))
        self.clips = clip_pb2_grpc.ClipServiceStub(channel)
        self.accounts = account_pb2_grpc.AccountServiceStub(channel)
        self.admin_stub = reviewer_admin_pb2_grpc.ReviewerAdminServiceStub(channel)
        self.safety = safety_pb2_grpc.SafetyServiceStub(channel)
        self.seen: list[Message] = []  # every message a reviewer or safety caller received

    def saw(self, message: Message) -> Message:
        self.seen.append(message)
        return message

    def enroll(self, name: str = "rev") -> Reviewer:
        _, factors = enrol(self.channel, self.admin, name)
        assert factors.provisioning_uri.startswith("otpauth://totp/")
        return Reviewer(factors.reviewer_id, bearer(factors.api_key), totp_secret_bytes(factors.totp_secret),
                        review_pb2_grpc.ReviewServiceStub(self.channel))

    def opt_in(self, account_id: str = ACCOUNT_ID, allow: bool = True) -> account_pb2.SetReviewPreferenceResponse:
        return self.accounts.SetReviewPreference(account_pb2.SetReviewPreferenceRequest(
            account_id=account_id, allow_human_review=allow), metadata=self.ingest, timeout=10)

    def put(self, **meta: object) -> clip_pb2.Clip:
        return self.clips.PutClip(put_requests(metadata(**meta), AUDIO), metadata=self.ingest, timeout=30).clip

    def session(self, r: Reviewer) -> str:
        resp = r.stub.StartReviewSession(review_pb2.StartReviewSessionRequest(
            totp_code=code_at(r.secret, self.clock.now())), metadata=r.md, timeout=10)
        self.clock.advance(30)  # the next session needs a fresh step
        return self.saw(resp).session_token

    def next(self, r: Reviewer, token: str) -> review_pb2.NextAssignmentResponse:
        return self.saw(r.stub.NextAssignment(review_pb2.NextAssignmentRequest(session_token=token), metadata=r.md,
                                              timeout=10))

    def grant(self, r: Reviewer, token: str, assignment_id: str) -> review_pb2.RequestGrantResponse:
        return self.saw(r.stub.RequestGrant(review_pb2.RequestGrantRequest(
            session_token=token, assignment_id=assignment_id), metadata=r.md, timeout=10))

    def fetch(self, r: Reviewer, token: str, grant: str, review_clip_id: str) -> tuple[review_pb2.ReviewClip, bytes]:
        responses = [self.saw(m) for m in r.stub.FetchClip(review_pb2.FetchClipRequest(
            session_token=token, grant=grant, review_clip_id=review_clip_id), metadata=r.md, timeout=10)]
        return responses[0].clip, b"".join(m.audio_chunk for m in responses[1:])

    def entries(self) -> list[dict[str, object]]:
        return [json.loads(e) for e in self.server.app.audit.reader.entries(0, 100_000)]

    def denied(self, err: grpc.RpcError, code: grpc.StatusCode, reason: str, action: str = "grant.deny") -> None:
        assert (err.code(), error_info(err).reason) == (code, reason), err.details()
        last = [e for e in self.entries() if e["action"] == action][-1]
        assert last["outcome"] == {"result": "denied", "reason": reason}


@pytest.fixture
def w(srv: ClipstoreServer, clock: FakeClock) -> Iterator[World]:
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        yield World(srv, channel, clock)


def _ready(w: World) -> tuple[Reviewer, str, review_pb2.NextAssignmentResponse, review_pb2.RequestGrantResponse]:
    w.opt_in()
    w.put()
    r = w.enroll()
    token = w.session(r)
    assignment = w.next(r, token)
    return r, token, assignment, w.grant(r, token, assignment.assignment_id)


def _raises(call: object, *args: object, **kwargs: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        result = call(*args, **kwargs)  # type: ignore[operator]
        if isinstance(result, Iterator):
            list(result)
    return caught.value


def test_review_flow_streams_audio_every_fetch_is_audited_and_the_export_verifies(w: World, tmp_path: Path) -> None:
    r, token, assignment, grant = _ready(w)
    clip, audio = w.fetch(r, token, grant.grant, grant.review_clip_id)
    assert audio == AUDIO and clip.review_clip_id == assignment.clip.review_clip_id
    fetches = [e for e in w.entries() if e["action"] == "clip.fetch"]
    assert len(fetches) == 1 and fetches[0]["actor"] == {"id": r.id, "role": "reviewer"}
    size = export_log(w.server.app.audit, tmp_path / "export", actor_id="test", actor_role="auditor")
    code, line = verify_dir(tmp_path / "export", w.server.app.audit.signer.verifier.key_string(), None)
    assert code == 0 and line.startswith(f"OK size={size} ")


def _strings(message: Message) -> Iterator[str]:
    for _field, value in message.ListFields():
        repeated = not isinstance(value, (str, bytes, Message)) and hasattr(value, "__iter__")
        values = value if repeated else [value]
        for v in values:
            if isinstance(v, Message):
                yield from _strings(v)
            elif isinstance(v, str):
                yield v
                if v.startswith("v1.") and v.count(".") == 2:  # a grant: its payload is visible too
                    yield base64.urlsafe_b64decode(v.split(".")[1] + "==").decode()
            elif isinstance(v, bytes):
                yield v.decode("latin-1")


def test_no_reviewer_or_safety_visible_field_carries_identity(w: World) -> None:
    r, token, assignment, grant = _ready(w)
    w.fetch(r, token, grant.grant, grant.review_clip_id)
    w.saw(r.stub.FlagClip(review_pb2.FlagClipRequest(session_token=token, assignment_id=assignment.assignment_id,
                                                     category=common_pb2.FLAG_CATEGORY_DISTRESS, note="crying"),
                          metadata=r.md, timeout=10))
    listed = w.saw(w.safety.ListEscalations(safety_pb2.ListEscalationsRequest(), metadata=w.safety_md, timeout=10))
    w.saw(w.safety.ResolveEscalation(safety_pb2.ResolveEscalationRequest(
        escalation_id=listed.escalations[0].escalation_id, resolution="referred"), metadata=w.safety_md, timeout=10))
    with w.server.app.db.read() as conn:
        clip_id = ReviewRows(conn).assignment(assignment.assignment_id).clip_id
    row = w.server.app.clips.find(clip_id)
    forbidden = [ACCOUNT_ID, SERIAL, row.account_ref, row.clip_id]
    text = "\n".join(s for m in w.seen for s in _strings(m))
    assert text and all(f not in text for f in forbidden)
    assert len(w.seen) >= 7
    for message in (review_pb2.ReviewClip, safety_pb2.Escalation):
        names = {f.name for f in message.DESCRIPTOR.fields}
        assert not names & {"account_id", "device_serial", "identity", "account_ref", "clip_id", "first_name"}


def test_never_opted_in_accounts_are_never_assigned(w: World) -> None:
    w.put()  # default is opt-in: no human review unless allowed
    r = w.enroll()
    err = _raises(r.stub.NextAssignment, review_pb2.NextAssignmentRequest(session_token=w.session(r)),
                  metadata=r.md, timeout=10)
    assert (err.code(), error_info(err).reason) == (grpc.StatusCode.NOT_FOUND, "QUEUE_EMPTY")


def test_accidental_activations_are_never_assigned(w: World) -> None:
    w.opt_in()
    w.put(wake_word_detected=False)
    r = w.enroll()
    err = _raises(r.stub.NextAssignment, review_pb2.NextAssignmentRequest(session_token=w.session(r)),
                  metadata=r.md, timeout=10)
    assert error_info(err).reason == "QUEUE_EMPTY"


def test_opt_out_dequeues_and_a_grant_issued_before_it_is_denied_at_fetch(w: World) -> None:
    r, token, _, grant = _ready(w)
    w.put()  # a second clip waits in the queue
    resp = w.opt_in(allow=False)
    assert (resp.dequeued_clips, resp.revoked_grants) == (2, 1)
    err = _raises(r.stub.FetchClip, review_pb2.FetchClipRequest(session_token=token, grant=grant.grant,
                                                                review_clip_id=grant.review_clip_id),
                  metadata=r.md, timeout=10)
    w.denied(err, grpc.StatusCode.PERMISSION_DENIED, "GRANT_REVOKED")


def test_opt_out_is_rechecked_at_fetch_even_if_the_grant_survived(w: World) -> None:
    r, token, _, grant = _ready(w)
    ref = w.server.app.accounts.require(ACCOUNT_ID).account_ref
    with w.server.app.db.transaction() as conn:  # as if revocation had not reached the grant
        ClipRows(conn).set_allow_review(ref, False)
    err = _raises(r.stub.FetchClip, review_pb2.FetchClipRequest(session_token=token, grant=grant.grant,
                                                                review_clip_id=grant.review_clip_id),
                  metadata=r.md, timeout=10)
    w.denied(err, grpc.StatusCode.PERMISSION_DENIED, "ACCOUNT_OPTED_OUT")


def _fetch_err(w: World, r: Reviewer, token: str, grant: str, review_clip_id: str) -> grpc.RpcError:
    return _raises(r.stub.FetchClip, review_pb2.FetchClipRequest(session_token=token, grant=grant,
                                                                 review_clip_id=review_clip_id),
                   metadata=r.md, timeout=10)


def test_replayed_grant_is_denied_and_audited(w: World) -> None:
    r, token, _, grant = _ready(w)
    w.fetch(r, token, grant.grant, grant.review_clip_id)
    w.denied(_fetch_err(w, r, token, grant.grant, grant.review_clip_id), grpc.StatusCode.PERMISSION_DENIED,
             "GRANT_REPLAYED")


def test_expired_grant_is_denied_and_audited(w: World) -> None:
    r, token, _, grant = _ready(w)
    w.clock.advance(121)
    err = _fetch_err(w, r, token, grant.grant, grant.review_clip_id)
    w.denied(err, grpc.StatusCode.PERMISSION_DENIED, "GRANT_EXPIRED")
    assert "expired" in err.details() and "request a new grant" in err.details()


def test_grant_used_by_another_reviewer_is_denied_and_audited(w: World) -> None:
    _, _, _, grant = _ready(w)
    other = w.enroll("other")
    w.denied(_fetch_err(w, other, w.session(other), grant.grant, grant.review_clip_id),
             grpc.StatusCode.PERMISSION_DENIED, "GRANT_WRONG_REVIEWER")


def test_grant_for_another_clip_is_denied_and_audited(w: World) -> None:
    r, token, _, grant = _ready(w)
    w.put()
    second = w.next(r, token)
    w.denied(_fetch_err(w, r, token, grant.grant, second.clip.review_clip_id), grpc.StatusCode.PERMISSION_DENIED,
             "GRANT_WRONG_CLIP")


def test_forged_grant_is_denied_and_audited(w: World) -> None:
    r, token, _, grant = _ready(w)
    prefix, body, sig = grant.grant.split(".")
    forged = f"{prefix}.{body}.{'A' if sig[0] != 'A' else 'B'}{sig[1:]}"
    w.denied(_fetch_err(w, r, token, forged, grant.review_clip_id), grpc.StatusCode.PERMISSION_DENIED,
             "GRANT_INVALID")


def test_re_signed_grant_is_denied_and_audited(w: World) -> None:
    r, token, _, grant = _ready(w)
    claims = json.loads(base64.urlsafe_b64decode(grant.grant.split(".")[1] + "=="))
    claims["expires_at"] = claims["issued_at"] + 300
    resigned = encode_grant(GrantClaims(**claims), Ed25519PrivateKey.generate())
    w.denied(_fetch_err(w, r, token, resigned, grant.review_clip_id), grpc.StatusCode.PERMISSION_DENIED,
             "GRANT_INVALID")


def test_grant_from_an_ended_session_is_denied_and_audited(w: World) -> None:
    r, token, _, grant = _ready(w)
    r.stub.EndReviewSession(review_pb2.EndReviewSessionRequest(session_token=token), metadata=r.md, timeout=10)
    w.denied(_fetch_err(w, r, token, grant.grant, grant.review_clip_id), grpc.StatusCode.UNAUTHENTICATED,
             "SESSION_ENDED")
    fresh = w.session(r)  # a new session cannot use the old session's grant either
    w.denied(_fetch_err(w, r, fresh, grant.grant, grant.review_clip_id), grpc.StatusCode.PERMISSION_DENIED,
             "GRANT_WRONG_SESSION")


def test_disabled_reviewer_is_refused_at_once_and_audited(w: World) -> None:
    r, token, _, grant = _ready(w)
    resp = w.admin_stub.DisableReviewer(reviewer_admin_pb2.DisableReviewerRequest(reviewer_id=r.id),
                                        metadata=w.admin, timeout=10)
    assert (resp.ended_sessions, resp.voided_grants) == (1, 1)
    w.denied(_fetch_err(w, r, token, grant.grant, grant.review_clip_id), grpc.StatusCode.UNAUTHENTICATED,
             "PRINCIPAL_DISABLED", action="auth.deny")


def test_locked_reviewer_is_refused_and_audited(w: World) -> None:
    r, token, _, grant = _ready(w)
    for _ in range(5):
        _raises(r.stub.StartReviewSession, review_pb2.StartReviewSessionRequest(totp_code="000000"), metadata=r.md,
                timeout=10)
    assert any(e["action"] == "reviewer.lockout" for e in w.entries())
    w.denied(_fetch_err(w, r, token, grant.grant, grant.review_clip_id), grpc.StatusCode.PERMISSION_DENIED,
             "REVIEWER_LOCKED")


def test_totp_code_is_never_accepted_twice(w: World) -> None:
    r = w.enroll()
    code = code_at(r.secret, w.clock.now())
    r.stub.StartReviewSession(review_pb2.StartReviewSessionRequest(totp_code=code), metadata=r.md, timeout=10)
    err = _raises(r.stub.StartReviewSession, review_pb2.StartReviewSessionRequest(totp_code=code), metadata=r.md,
                  timeout=10)
    w.denied(err, grpc.StatusCode.UNAUTHENTICATED, "REPLAYED_CODE", action="session.deny")


def test_totp_accepts_one_step_of_drift_and_no_more(w: World) -> None:
    r = w.enroll()
    now = w.clock.now()
    ok = r.stub.StartReviewSession(review_pb2.StartReviewSessionRequest(totp_code=code_at(r.secret, now + 30)),
                                   metadata=r.md, timeout=10)
    assert ok.session_token
    err = _raises(r.stub.StartReviewSession, review_pb2.StartReviewSessionRequest(
        totp_code=code_at(r.secret, now + 90)), metadata=r.md, timeout=10)
    w.denied(err, grpc.StatusCode.UNAUTHENTICATED, "BAD_CODE", action="session.deny")


def test_five_wrong_codes_lock_the_reviewer_for_fifteen_minutes(w: World) -> None:
    r = w.enroll()
    for _ in range(5):
        err = _raises(r.stub.StartReviewSession, review_pb2.StartReviewSessionRequest(totp_code="123456"),
                      metadata=r.md, timeout=10)
        assert error_info(err).reason == "BAD_CODE"
    good = review_pb2.StartReviewSessionRequest(totp_code=code_at(r.secret, w.clock.now()))
    w.denied(_raises(r.stub.StartReviewSession, good, metadata=r.md, timeout=10), grpc.StatusCode.PERMISSION_DENIED,
             "REVIEWER_LOCKED", action="session.deny")
    w.clock.advance(15 * 60 + 1)
    assert w.session(r)


def test_session_idle_limit_and_lifetime(w: World) -> None:
    r = w.enroll()
    token = w.session(r)
    w.clock.advance(31 * 60)
    err = _raises(r.stub.NextAssignment, review_pb2.NextAssignmentRequest(session_token=token), metadata=r.md,
                  timeout=10)
    w.denied(err, grpc.StatusCode.UNAUTHENTICATED, "SESSION_IDLE", action="assignment.deny")
    token = w.session(r)
    for _ in range(17):  # active all day, never idle for long
        w.clock.advance(29 * 60)
        with pytest.raises(grpc.RpcError):
            r.stub.NextAssignment(review_pb2.NextAssignmentRequest(session_token=token), metadata=r.md, timeout=10)
    err = _raises(r.stub.NextAssignment, review_pb2.NextAssignmentRequest(session_token=token), metadata=r.md,
                  timeout=10)
    w.denied(err, grpc.StatusCode.UNAUTHENTICATED, "SESSION_EXPIRED", action="assignment.deny")


def test_daily_cap_per_reviewer(w: World) -> None:
    w.opt_in()
    for _ in range(4):
        w.put()
    r = w.enroll()
    token = w.session(r)
    for _ in range(3):
        w.next(r, token)
    err = _raises(r.stub.NextAssignment, review_pb2.NextAssignmentRequest(session_token=token), metadata=r.md,
                  timeout=10)
    w.denied(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "DAILY_CAP", action="assignment.deny")


def test_a_flagged_clip_reaches_safety_not_a_chat_room(w: World) -> None:
    r, token, assignment, _ = _ready(w)
    esc = r.stub.FlagClip(review_pb2.FlagClipRequest(
        session_token=token, assignment_id=assignment.assignment_id,
        category=common_pb2.FLAG_CATEGORY_POSSIBLE_CRIME, note="sounds like a break-in"), metadata=r.md, timeout=10)
    listed = w.safety.ListEscalations(safety_pb2.ListEscalationsRequest(), metadata=w.safety_md, timeout=10)
    assert [(e.escalation_id, e.review_clip_id, e.category, e.note) for e in listed.escalations] == [
        (esc.escalation_id, assignment.clip.review_clip_id, common_pb2.FLAG_CATEGORY_POSSIBLE_CRIME,
         "sounds like a break-in")]
    resolved = w.safety.ResolveEscalation(safety_pb2.ResolveEscalationRequest(
        escalation_id=esc.escalation_id, resolution="reported to authorities"), metadata=w.safety_md, timeout=10)
    assert resolved.escalation.resolved
    assert {"clip.flag", "escalation.resolve"} <= {e["action"] for e in w.entries()}
    err = _raises(r.stub.FlagClip, review_pb2.FlagClipRequest(session_token=token,
                                                              assignment_id=assignment.assignment_id),
                  metadata=r.md, timeout=10)
    assert error_info(err).metadata["field"] == "category"


def test_accidental_activation_flag_schedules_the_clip_for_purge(w: World) -> None:
    r, token, assignment, grant = _ready(w)
    r.stub.FlagClip(review_pb2.FlagClipRequest(session_token=token, assignment_id=assignment.assignment_id,
                                               category=common_pb2.FLAG_CATEGORY_ACCIDENTAL_ACTIVATION),
                    metadata=r.md, timeout=10)
    w.denied(_fetch_err(w, r, token, grant.grant, grant.review_clip_id), grpc.StatusCode.PERMISSION_DENIED,
             "GRANT_REVOKED")
    w.clock.advance(1)
    assert w.server.app.clips.purge_expired() == 1


def test_complete_assignment_closes_it(w: World) -> None:
    r, token, assignment, grant = _ready(w)
    r.stub.CompleteAssignment(review_pb2.CompleteAssignmentRequest(
        session_token=token, assignment_id=assignment.assignment_id, label="weather"), metadata=r.md, timeout=10)
    err = _raises(r.stub.RequestGrant, review_pb2.RequestGrantRequest(session_token=token,
                                                                      assignment_id=assignment.assignment_id),
                  metadata=r.md, timeout=10)
    w.denied(err, grpc.StatusCode.FAILED_PRECONDITION, "ASSIGNMENT_COMPLETED")
    w.denied(_fetch_err(w, r, token, grant.grant, grant.review_clip_id), grpc.StatusCode.PERMISSION_DENIED,
             "GRANT_REVOKED")


def test_every_review_rpc_is_one_durable_commit(w: World) -> None:
    # Checks, state change and audit entry commit together: one transaction (one fsync) per RPC.
    w.opt_in()
    w.put()
    r = w.enroll()
    db, audit = w.server.app.db, w.server.app.audit
    audit.checkpoint()  # no checkpoint falls due while the clock stands still, so only the RPCs commit

    def commits(call: Callable[[], T]) -> tuple[int, T]:
        before = db.commits
        result = call()
        return db.commits - before, result

    started, resp = commits(lambda: r.stub.StartReviewSession(review_pb2.StartReviewSessionRequest(
        totp_code=code_at(r.secret, w.clock.now())), metadata=r.md, timeout=10))
    token = resp.session_token
    assigned, assignment = commits(lambda: w.next(r, token))
    granted, grant = commits(lambda: w.grant(r, token, assignment.assignment_id))
    fetched, _ = commits(lambda: w.fetch(r, token, grant.grant, grant.review_clip_id))
    completed, _ = commits(lambda: r.stub.CompleteAssignment(review_pb2.CompleteAssignmentRequest(
        session_token=token, assignment_id=assignment.assignment_id, label="weather"), metadata=r.md, timeout=10))
    assert (started, assigned, granted, fetched, completed) == (1, 1, 1, 1, 1)


def test_rfc6238_vectors_sha1() -> None:
    secret = b"12345678901234567890"
    for t, code in [(59, "94287082"), (1111111109, "07081804"), (1111111111, "14050471"),
                    (1234567890, "89005924"), (2000000000, "69279037"), (20000000000, "65353130")]:
        assert code_at(secret, t, digits=8) == code
        assert matching_step(secret, code, now=t, digits=8) == t // 30
    assert matching_step(secret, "94287083", now=59, digits=8) is None


def test_no_secret_token_code_or_identity_reaches_any_log_line(w: World, log_stream: io.StringIO) -> None:
    w.opt_in()
    w.put()
    created, enrolled = enrol(w.channel, w.admin, "Jane Doe")
    secret = totp_secret_bytes(enrolled.totp_secret)
    r = Reviewer(enrolled.reviewer_id, bearer(enrolled.api_key), secret, review_pb2_grpc.ReviewServiceStub(w.channel))
    code = code_at(secret, w.clock.now())
    token = r.stub.StartReviewSession(review_pb2.StartReviewSessionRequest(totp_code=code), metadata=r.md,
                                      timeout=10).session_token
    _raises(r.stub.StartReviewSession, review_pb2.StartReviewSessionRequest(totp_code=code), metadata=r.md,
            timeout=10)  # a replay: denial paths log too
    assignment = w.next(r, token)
    grant = w.grant(r, token, assignment.assignment_id)
    w.fetch(r, token, grant.grant, grant.review_clip_id)
    _fetch_err(w, r, token, grant.grant, grant.review_clip_id)
    logs = log_stream.getvalue()
    assert logs.count('"event": "rpc"') >= 8
    assert f'"{code}"' not in logs  # quoted: six bare digits can occur by chance in a timestamp
    for secret_text in (enrolled.api_key, enrolled.totp_secret, created.enrolment.code, token, grant.grant,
                        ACCOUNT_ID, SERIAL,
                        w.admin[0][1], w.ingest[0][1], AUDIO[:64].hex(), base64.b64encode(AUDIO[:48]).decode()):
        assert secret_text not in logs, "a secret reached the logs"
    for line in logs.splitlines():
        json.loads(line)  # every line is structured JSON


def test_escalation_notes_are_encrypted_and_erased_with_the_account(w: World) -> None:
    r, token, assignment, _ = _ready(w)
    note = "caller says her name is Jane Roe, 12 Elm Street"
    r.stub.FlagClip(review_pb2.FlagClipRequest(session_token=token, assignment_id=assignment.assignment_id,
                                               category=common_pb2.FLAG_CATEGORY_DISTRESS, note=note),
                    metadata=r.md, timeout=10)
    assert all(note.encode() not in data for _, data in database_bytes(w.server))
    listed = w.safety.ListEscalations(safety_pb2.ListEscalationsRequest(), metadata=w.safety_md, timeout=10)
    assert listed.escalations[0].note == note
    w.accounts.DeleteAccount(account_pb2.DeleteAccountRequest(account_id=ACCOUNT_ID), metadata=w.ingest, timeout=10)
    listed = w.safety.ListEscalations(safety_pb2.ListEscalationsRequest(), metadata=w.safety_md, timeout=10)
    assert [e.note for e in listed.escalations] == ["[note erased: the clip was deleted]"]


def test_an_assignment_gets_at_most_three_grants(w: World) -> None:
    r, token, assignment, _ = _ready(w)
    for _ in range(2):
        w.grant(r, token, assignment.assignment_id)
    err = _raises(r.stub.RequestGrant, review_pb2.RequestGrantRequest(session_token=token,
                                                                      assignment_id=assignment.assignment_id),
                  metadata=r.md, timeout=10)
    w.denied(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "GRANT_LIMIT")


def test_the_joined_reads_and_the_conditional_completion_agree_with_the_single_reads(w: World) -> None:
    """What the hot path reads in one statement is what the single-row reads say, on both databases; the
    conditional completion closes only the caller's open, unexpired assignment."""
    r, token, assignment, _ = _ready(w)
    now = w.clock.now()
    with w.server.app.db.read() as conn:
        rows = ReviewRows(conn)
        mine = rows.assignment(assignment.assignment_id)
        assert mine is not None
        clip = rows.clip(mine.clip_id)
        grant_id = conn.execute(sa.select(schema.grants.c.grant_id)
                                .where(schema.grants.c.assignment_id == mine.assignment_id)).scalar_one()
        found = rows.session_with_reviewer(token_hash(token))
        assert found is not None and found[0].reviewer_id == r.id and found[1] == rows.reviewer(r.id)
        assert rows.session_with_reviewer(token_hash("no such token")) is None
        target = rows.grant_target(mine.assignment_id)
        assert target is not None and (target.assignment, target.grants) == (mine, 1)
        assert target.queued is not None and target.queued.queue.clip_id == mine.clip_id and target.queued.eligible(now)
        assert rows.grant_target("as_unknown") is None
        read = rows.redeem_rows(grant_id, mine.assignment_id, r.id)
        assert read.grant is not None and read.grant.grant_id == grant_id and read.clip == clip
        assert read.reviewer_enabled and read.assignment_exists and read.account_allows_review
        unknown = rows.redeem_rows("g_unknown", "as_unknown", r.id)  # still one row: the caller's flag
        assert (unknown.grant, unknown.clip, unknown.assignment_exists, unknown.account_allows_review,
                unknown.reviewer_enabled) == (None, None, False, False, True)
        assert not rows.redeem_rows(grant_id, mine.assignment_id, "p_nobody").reviewer_enabled
        assert rows.clip_of_assignment(mine.assignment_id, r.id) == clip
        assert rows.clip_of_assignment(mine.assignment_id, "p_nobody") is None
    with w.server.app.db.transaction() as conn:
        rows = ReviewRows(conn)
        assert rows.complete_open(mine.assignment_id, "p_nobody", b"l", now) is None
        assert rows.complete_open(mine.assignment_id, r.id, b"l", mine.expires_at) is None  # expired
        assert rows.complete_open(mine.assignment_id, r.id, b"l", now) == mine.clip_id
        assert rows.complete_open(mine.assignment_id, r.id, b"l", now) is None  # completed
        assert rows.grant_target(mine.assignment_id).queued is None  # type: ignore[union-attr]  # left the queue


def test_a_locale_with_a_trailing_newline_is_invalid_argument(w: World) -> None:
    # The locale pattern ended in "$", which also matches before a final newline: CreateReviewer stored
    # "en-US\n" (a reviewer no clip could ever match) and NextAssignment searched for it.
    err = _raises(w.admin_stub.CreateReviewer, reviewer_admin_pb2.CreateReviewerRequest(
        name="nl", locales=["en-US\n"]), metadata=w.admin, timeout=10)
    assert (err.code(), error_info(err).metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "locales")
    r = w.enroll()
    token = w.session(r)
    err = _raises(r.stub.NextAssignment, review_pb2.NextAssignmentRequest(session_token=token, locale="en-US\n"),
                  metadata=r.md, timeout=10)
    assert (err.code(), error_info(err).metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "locale")
