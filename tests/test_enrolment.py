"""Self-enrolment: the admin hands out one-time codes; only the reviewer ever sees their factors."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf.message import Message

from clipstore.auth import hash_api_key
from clipstore.enrolment import code_hash
from clipstore.server import ClipstoreServer
from clipstore.store import schema
from clipstore.store.enrolment import EnrolmentRows
from clipstore.totp import code_at
from clipstore.v1 import (
    enrolment_pb2,
    enrolment_pb2_grpc,
    principal_admin_pb2,
    principal_admin_pb2_grpc,
    review_pb2,
    review_pb2_grpc,
    reviewer_admin_pb2,
    reviewer_admin_pb2_grpc,
)
from tests.conftest import FakeClock, bearer, new_key
from tests.db_helpers import database_bytes
from tests.enrolment_helpers import create_reviewer, enrol, redeem, totp_secret_bytes
from tests.grpc_helpers import error_info

RACERS = 24
ROTATE_TOTP = enrolment_pb2.ENROLMENT_PURPOSE_ROTATE_TOTP
ROTATE_API_KEY = enrolment_pb2.ENROLMENT_PURPOSE_ROTATE_API_KEY


@pytest.fixture
def channel(srv: ClipstoreServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        yield ch


@pytest.fixture
def admin(srv: ClipstoreServer) -> tuple[tuple[str, str], ...]:
    return bearer(new_key(srv.app, "admin", "root"))


def _issue(channel: grpc.Channel, admin: tuple[tuple[str, str], ...], reviewer_id: str,
           purpose: enrolment_pb2.EnrolmentPurpose.ValueType) -> reviewer_admin_pb2.EnrolmentOffer:
    return reviewer_admin_pb2_grpc.ReviewerAdminServiceStub(channel).IssueEnrolmentCode(
        reviewer_admin_pb2.IssueEnrolmentCodeRequest(reviewer_id=reviewer_id, purpose=purpose), metadata=admin,
        timeout=10).enrolment


def _entries(srv: ClipstoreServer) -> list[dict]:
    return [json.loads(e) for e in srv.app.audit.reader.entries(0, 100_000)]


def _refused(srv: ClipstoreServer, call: object, code: grpc.StatusCode, reason: str) -> None:
    """The redemption is refused with its reason, and the refusal is on record."""
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    assert (caught.value.code(), error_info(caught.value).reason) == (code, reason), caught.value.details()
    last = [e for e in _entries(srv) if e["action"] == "enrolment.deny"][-1]
    assert last["outcome"] == {"result": "denied", "reason": reason}


def _counted_anonymously(srv: ClipstoreServer, token: str) -> int:
    """End the interval and return how many of `token`'s refusals the anonymous summary counted."""
    srv.denials.flush()
    counted = 0
    for entry in _entries(srv):
        if entry["action"] == "auth.deny_summary" and entry["actor"]["id"] == "anonymous":
            counted += sum(int(n) for t, _, n in (p.partition("=") for p in entry["outcome"]["reason"].split())
                           if t == token)
    return counted


def _session(channel: grpc.Channel, api_key: str, secret: bytes, now: float) -> str:
    return review_pb2_grpc.ReviewServiceStub(channel).StartReviewSession(review_pb2.StartReviewSessionRequest(
        totp_code=code_at(secret, now)), metadata=bearer(api_key), timeout=10).session_token


def _strings(message: Message) -> str:
    return message.SerializeToString().decode("latin-1") + str(message)


def test_the_admin_never_receives_a_factor_only_the_reviewer_does(srv: ClipstoreServer, channel, admin,
                                                                  clock: FakeClock) -> None:
    admin_saw: list[Message] = []
    created = create_reviewer(channel, admin, "Jane Doe")
    admin_saw.append(created)
    assert set(created.DESCRIPTOR.fields_by_name) == {"reviewer_id", "enrolment"}
    factors = [redeem(channel, created.reviewer_id, created.enrolment.code)]
    for purpose in (ROTATE_TOTP, ROTATE_API_KEY):
        offer = _issue(channel, admin, created.reviewer_id, purpose)
        admin_saw.append(offer)
        factors.append(redeem(channel, created.reviewer_id, offer.code))
    admin_saw.append(principal_admin_pb2_grpc.PrincipalAdminServiceStub(channel).ListPrincipals(
        principal_admin_pb2.ListPrincipalsRequest(), metadata=admin, timeout=10))
    secrets_ = [s for f in factors for s in (f.api_key, f.totp_secret, f.provisioning_uri) if s]
    assert len(secrets_) == 6  # enrol: key, secret, uri; rotate TOTP: secret, uri; rotate key: key
    seen = "\n".join(_strings(m) for m in admin_saw)
    assert all(s not in seen for s in secrets_)
    stored = b"".join(data for _, data in database_bytes(srv))
    assert all(s.encode() not in stored for s in secrets_)
    # and the factors are real: the last key and the rotated secret open a session
    assert _session(channel, factors[2].api_key, totp_secret_bytes(factors[1].totp_secret), clock.now())


def test_a_reviewer_cannot_start_a_session_before_redeeming(srv: ClipstoreServer, channel, admin) -> None:
    created = create_reviewer(channel, admin)
    match = srv.app.principals.get(created.reviewer_id)
    assert match is not None and not match.disabled
    with srv.app.principals.read() as rows:  # the reviewer has no key at all yet
        assert rows.page(role="reviewer", after="", limit=10, now=0)[0].usable_keys == 0


def test_every_enrolment_step_is_audited(srv: ClipstoreServer, channel, admin) -> None:
    created, _ = enrol(channel, admin)
    offer = _issue(channel, admin, created.reviewer_id, ROTATE_TOTP)
    redeem(channel, created.reviewer_id, offer.code)
    mine = [(e["action"], e["actor"]["role"], e["outcome"]["reason"]) for e in _entries(srv)
            if e["target"]["principal_id"] == created.reviewer_id]
    assert mine == [("principal.create", "admin", "reviewer"), ("reviewer.enroll", "admin", ""),
                    ("enrolment.offer", "admin", "enrol"), ("enrolment.redeem", "reviewer", "enrol"),
                    ("enrolment.offer", "admin", "rotate_totp"), ("enrolment.redeem", "reviewer", "rotate_totp")]


def test_a_reused_code_is_refused_and_audited(srv: ClipstoreServer, channel, admin) -> None:
    created, _ = enrol(channel, admin)
    _refused(srv, lambda: redeem(channel, created.reviewer_id, created.enrolment.code),
             grpc.StatusCode.UNAUTHENTICATED, "ENROLMENT_CODE_USED")


def test_an_expired_code_is_refused_and_audited(srv: ClipstoreServer, channel, admin, clock: FakeClock) -> None:
    created = create_reviewer(channel, admin)
    assert created.enrolment.expires_at.seconds == int(clock.now() + srv.app.config.enrolment_code_ttl_s)
    clock.advance(srv.app.config.enrolment_code_ttl_s)
    _refused(srv, lambda: redeem(channel, created.reviewer_id, created.enrolment.code),
             grpc.StatusCode.UNAUTHENTICATED, "ENROLMENT_CODE_EXPIRED")


def test_an_unknown_code_is_refused_and_audited(srv: ClipstoreServer, channel, admin) -> None:
    created = create_reviewer(channel, admin)
    _refused(srv, lambda: redeem(channel, created.reviewer_id, "cse_" + "A" * 22),
             grpc.StatusCode.UNAUTHENTICATED, "ENROLMENT_CODE_INVALID")


def test_a_code_for_another_reviewer_is_refused_audited_and_void(srv: ClipstoreServer, channel, admin) -> None:
    alice, bob = create_reviewer(channel, admin, "alice"), create_reviewer(channel, admin, "bob")
    _refused(srv, lambda: redeem(channel, bob.reviewer_id, alice.enrolment.code),
             grpc.StatusCode.PERMISSION_DENIED, "ENROLMENT_CODE_WRONG_REVIEWER")
    _refused(srv, lambda: redeem(channel, alice.reviewer_id, alice.enrolment.code),
             grpc.StatusCode.UNAUTHENTICATED, "ENROLMENT_CODE_USED")  # whoever tried it, it is spent


def test_a_reissued_code_replaces_the_unredeemed_one(srv: ClipstoreServer, channel, admin) -> None:
    created = create_reviewer(channel, admin)
    again = _issue(channel, admin, created.reviewer_id, enrolment_pb2.ENROLMENT_PURPOSE_ENROL)
    _refused(srv, lambda: redeem(channel, created.reviewer_id, created.enrolment.code),
             grpc.StatusCode.UNAUTHENTICATED, "ENROLMENT_CODE_EXPIRED")
    assert redeem(channel, created.reviewer_id, again.code).totp_secret


def test_a_disabled_reviewer_cannot_redeem(srv: ClipstoreServer, channel, admin) -> None:
    created = create_reviewer(channel, admin)
    reviewer_admin_pb2_grpc.ReviewerAdminServiceStub(channel).DisableReviewer(
        reviewer_admin_pb2.DisableReviewerRequest(reviewer_id=created.reviewer_id), metadata=admin, timeout=10)
    _refused(srv, lambda: redeem(channel, created.reviewer_id, created.enrolment.code),
             grpc.StatusCode.UNAUTHENTICATED, "PRINCIPAL_DISABLED")


def test_rotating_the_totp_secret_by_code_retires_the_old_one(srv: ClipstoreServer, channel, admin,
                                                              clock: FakeClock) -> None:
    _, first = enrol(channel, admin)
    old = totp_secret_bytes(first.totp_secret)
    rotated = redeem(channel, first.reviewer_id, _issue(channel, admin, first.reviewer_id, ROTATE_TOTP).code)
    assert rotated.api_key == "" and rotated.totp_secret != first.totp_secret
    with pytest.raises(grpc.RpcError) as caught:
        _session(channel, first.api_key, old, clock.now())
    assert error_info(caught.value).reason == "BAD_CODE"
    clock.advance(30)
    assert _session(channel, first.api_key, totp_secret_bytes(rotated.totp_secret), clock.now())


def test_rotating_the_api_key_by_code_keeps_the_old_key_for_the_overlap(srv: ClipstoreServer, channel, admin,
                                                                        clock: FakeClock) -> None:
    _, first = enrol(channel, admin)
    rotated = redeem(channel, first.reviewer_id, _issue(channel, admin, first.reviewer_id, ROTATE_API_KEY).code)
    assert rotated.totp_secret == "" and rotated.api_key.startswith("csk_")
    secret = totp_secret_bytes(first.totp_secret)
    assert _session(channel, first.api_key, secret, clock.now())
    clock.advance(srv.app.config.key_overlap_s)
    with pytest.raises(grpc.RpcError) as caught:
        _session(channel, first.api_key, secret, clock.now())
    assert error_info(caught.value).reason == "KEY_ROTATED_OUT"
    assert _session(channel, rotated.api_key, secret, clock.now())


def test_a_reviewer_named_by_a_certificate_gets_no_api_key_and_no_key_rotation(srv: ClipstoreServer, channel,
                                                                               admin) -> None:
    created, factors = enrol(channel, admin, "alice", spiffe_id="spiffe://clipstore/reviewer/alice")
    assert factors.api_key == "" and factors.totp_secret
    with pytest.raises(grpc.RpcError) as caught:
        _issue(channel, admin, created.reviewer_id, ROTATE_API_KEY)
    assert error_info(caught.value).metadata["field"] == "purpose"


def test_only_admins_issue_codes(srv: ClipstoreServer, channel, admin) -> None:
    _, factors = enrol(channel, admin)
    with pytest.raises(grpc.RpcError) as caught:
        reviewer_admin_pb2_grpc.ReviewerAdminServiceStub(channel).IssueEnrolmentCode(
            reviewer_admin_pb2.IssueEnrolmentCodeRequest(reviewer_id=factors.reviewer_id, purpose=ROTATE_API_KEY),
            metadata=bearer(factors.api_key), timeout=10)
    assert error_info(caught.value).reason == "WRONG_ROLE"


def test_24_parallel_redemptions_of_one_code_yield_exactly_one_set_of_factors(srv: ClipstoreServer, channel,
                                                                              admin) -> None:
    created = create_reviewer(channel, admin)
    start = threading.Barrier(RACERS)

    def attempt(_: int) -> str:
        start.wait(10)
        try:
            return redeem(channel, created.reviewer_id, created.enrolment.code).api_key
        except grpc.RpcError as err:
            return error_info(err).reason

    with ThreadPoolExecutor(RACERS) as pool:
        outcomes = list(pool.map(attempt, range(RACERS)))
    keys = [o for o in outcomes if o.startswith("csk_")]
    assert len(keys) == 1 and outcomes.count("ENROLMENT_CODE_USED") == RACERS - 1, outcomes
    actions = [e["action"] for e in _entries(srv) if e["target"]["principal_id"] == created.reviewer_id]
    # every refusal is on record: appended, or past the anonymous budget counted into the summary
    assert actions.count("enrolment.redeem") == 1
    counted = _counted_anonymously(srv, "enrolment.deny/ENROLMENT_CODE_USED")
    assert actions.count("enrolment.deny") + counted == RACERS - 1
    k = schema.principal_keys
    with srv.app.db.read() as conn:
        hashes = conn.scalars(sa.select(k.c.key_hash).where(k.c.principal_id == created.reviewer_id)).all()
    assert [bytes(h) for h in hashes] == [hash_api_key(keys[0])]


def test_24_transactions_claiming_one_code_at_once_let_exactly_one_win(srv: ClipstoreServer, channel,
                                                                       admin, clock: FakeClock) -> None:
    """The claim itself, below the writer thread: as replicas sharing one database would race it."""
    created = create_reviewer(channel, admin)
    hashed = code_hash(created.enrolment.code)
    start = threading.Barrier(RACERS)

    def claim(_: int) -> bool:
        start.wait(10)
        with srv.app.db.engine.begin() as conn:  # its own transaction, no process-wide lock
            return EnrolmentRows(conn).claim_code(hashed, now=clock.now()) is not None

    with ThreadPoolExecutor(RACERS) as pool:
        won = list(pool.map(claim, range(RACERS)))
    assert won.count(True) == 1


def test_redeeming_takes_no_credential_but_the_code(srv: ClipstoreServer, channel, admin) -> None:
    created = create_reviewer(channel, admin)
    stranger = bearer(new_key(srv.app, "ingest", "someone"))
    factors = enrolment_pb2_grpc.EnrolmentServiceStub(channel).RedeemEnrolmentCode(
        enrolment_pb2.RedeemEnrolmentCodeRequest(reviewer_id=created.reviewer_id, code=created.enrolment.code),
        metadata=stranger, timeout=10)  # a bearer key is neither needed nor looked at
    assert factors.reviewer_id == created.reviewer_id
    [redeemed] = [e for e in _entries(srv) if e["action"] == "enrolment.redeem"]
    assert redeemed["actor"] == {"id": created.reviewer_id, "role": "reviewer"}


def test_wrong_codes_past_the_budget_are_counted_not_appended(srv: ClipstoreServer, channel, admin) -> None:
    """Redeeming needs no credential, so a wrong code is an anonymous refusal: anyone could otherwise grow the
    permanent log at RPC rate. Every caller gets the same answer; the log grows by the budget and one summary."""
    created = create_reviewer(channel, admin)
    budget = srv.app.config.denials_per_principal
    before = srv.app.audit.reader.size()
    for _ in range(3 * budget):
        with pytest.raises(grpc.RpcError) as caught:
            redeem(channel, created.reviewer_id, "cse_" + "A" * 22)
        assert (caught.value.code(), error_info(caught.value).reason) == (
            grpc.StatusCode.UNAUTHENTICATED, "ENROLMENT_CODE_INVALID")
    appended = _entries(srv)[before:]
    assert [(e["action"], e["actor"]["id"]) for e in appended] == [("enrolment.deny", "anonymous")] * budget
    assert _counted_anonymously(srv, "enrolment.deny/ENROLMENT_CODE_INVALID") == 2 * budget
    [summary] = _entries(srv)[before + budget:]
    assert (summary["action"], summary["actor"]["id"], summary["outcome"]["reason"]) == (
        "auth.deny_summary", "anonymous",
        f"count={2 * budget} peer=other enrolment.deny/ENROLMENT_CODE_INVALID={2 * budget}")


def test_a_reviewer_id_that_is_no_principal_id_is_refused_before_it_can_reach_the_log(
        srv: ClipstoreServer, channel, admin) -> None:
    # Anyone may redeem, and each refusal wrote the reviewer id as given into the permanent, published log:
    # the code pasted into the wrong field (then readable by every auditor and tile reader), or any text an
    # anonymous caller chose.
    created = create_reviewer(channel, admin)
    before = srv.app.audit.reader.size()
    for reviewer_id in (created.enrolment.code, "Alice Example, +1 555 0100", created.reviewer_id.upper(),
                        created.reviewer_id + "0"):
        with pytest.raises(grpc.RpcError) as caught:
            redeem(channel, reviewer_id, created.reviewer_id)  # the two fields swapped, and other text
        assert (caught.value.code(), error_info(caught.value).reason) == (
            grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"), caught.value.details()
        assert error_info(caught.value).metadata["field"] == "reviewer_id"
    assert srv.app.audit.reader.size() == before
    assert redeem(channel, created.reviewer_id, created.enrolment.code).totp_secret  # the code still works


@pytest.mark.parametrize("purpose", [ROTATE_TOTP, enrolment_pb2.ENROLMENT_PURPOSE_ENROL])
def test_a_new_totp_secret_ends_the_sessions_the_old_one_opened(srv: ClipstoreServer, channel, admin,
                                                               clock: FakeClock, purpose: int) -> None:
    # A new secret is asked for when the old one may be in other hands (a lost phone); the sessions opened
    # with it lived on for their 8 hours, for whoever held the key (or the certificate) as well.
    _, first = enrol(channel, admin)
    old_token = _session(channel, first.api_key, totp_secret_bytes(first.totp_secret), clock.now())
    rotated = redeem(channel, first.reviewer_id, _issue(channel, admin, first.reviewer_id, purpose).code)
    key = rotated.api_key or first.api_key
    with pytest.raises(grpc.RpcError) as caught:
        review_pb2_grpc.ReviewServiceStub(channel).NextAssignment(review_pb2.NextAssignmentRequest(
            session_token=old_token), metadata=bearer(key), timeout=10)
    assert (caught.value.code(), error_info(caught.value).reason) == (grpc.StatusCode.UNAUTHENTICATED,
                                                                      "SESSION_ENDED")
    clock.advance(30)
    assert _session(channel, key, totp_secret_bytes(rotated.totp_secret), clock.now())


def test_a_new_api_key_alone_leaves_the_sessions_open(srv: ClipstoreServer, channel, admin,
                                                      clock: FakeClock) -> None:
    _, first = enrol(channel, admin)
    token = _session(channel, first.api_key, totp_secret_bytes(first.totp_secret), clock.now())
    rotated = redeem(channel, first.reviewer_id, _issue(channel, admin, first.reviewer_id, ROTATE_API_KEY).code)
    review_pb2_grpc.ReviewServiceStub(channel).EndReviewSession(review_pb2.EndReviewSessionRequest(
        session_token=token), metadata=bearer(rotated.api_key), timeout=10)  # still live: ends without error


def test_a_code_of_the_old_secret_read_before_a_rotation_committed_opens_no_session(
        srv: ClipstoreServer, channel, admin, clock: FakeClock) -> None:
    # StartReviewSession reads and unwraps the secret before its unit: a rotation committing in between
    # let a code of the replaced secret open a session after the rotation had ended the others.
    _, first = enrol(channel, admin)
    old = totp_secret_bytes(first.totp_secret)
    offer = _issue(channel, admin, first.reviewer_id, ROTATE_TOTP)
    sessions = srv.app.review.sessions
    real_root = sessions._root

    class RotateMeanwhile:
        def decrypt(self, *args: object, **kwargs: object) -> bytes:
            secret = real_root.decrypt(*args, **kwargs)
            redeem(channel, first.reviewer_id, offer.code)  # commits while the session's unit has not run
            return secret

    sessions._root = RotateMeanwhile()
    try:
        with pytest.raises(grpc.RpcError) as caught:
            _session(channel, first.api_key, old, clock.now())
    finally:
        sessions._root = real_root
    assert (caught.value.code(), error_info(caught.value).reason) == (grpc.StatusCode.UNAUTHENTICATED, "BAD_CODE")
    with srv.app.db.read() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(schema.review_sessions)) == 0
        assert conn.scalar(sa.select(schema.reviewers.c.failed_attempts)) == 0


def test_with_bearer_keys_an_admin_who_redeems_first_is_noticed_and_shut_out_by_the_next_enrol(
        srv: ClipstoreServer, channel, admin, clock: FakeClock) -> None:
    """What the README says of bearer-key reviewers: the code is the only credential, so the admin holding it
    can redeem it first; the reviewer's own redemption then fails, and the ENROL code they are issued next
    ends the other holder's API key and sessions at once."""
    created = create_reviewer(channel, admin)
    taken = redeem(channel, created.reviewer_id, created.enrolment.code)  # the admin, first
    _refused(srv, lambda: redeem(channel, created.reviewer_id, created.enrolment.code),
             grpc.StatusCode.UNAUTHENTICATED, "ENROLMENT_CODE_USED")
    review = review_pb2_grpc.ReviewServiceStub(channel)
    review.StartReviewSession(review_pb2.StartReviewSessionRequest(
        totp_code=code_at(totp_secret_bytes(taken.totp_secret), clock.now())), metadata=bearer(taken.api_key),
        timeout=10)
    again = _issue(channel, admin, created.reviewer_id, enrolment_pb2.ENROLMENT_PURPOSE_ENROL)
    mine = redeem(channel, created.reviewer_id, again.code)
    clock.advance(30)
    with pytest.raises(grpc.RpcError) as shut_out:
        review.StartReviewSession(review_pb2.StartReviewSessionRequest(
            totp_code=code_at(totp_secret_bytes(taken.totp_secret), clock.now())), metadata=bearer(taken.api_key),
            timeout=10)
    assert shut_out.value.code() == grpc.StatusCode.UNAUTHENTICATED
    review.StartReviewSession(review_pb2.StartReviewSessionRequest(
        totp_code=code_at(totp_secret_bytes(mine.totp_secret), clock.now())), metadata=bearer(mine.api_key),
        timeout=10)
