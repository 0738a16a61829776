"""Review rules that must hold against races, former holders and curious callers (issue 11 items 4–11,
issue 13 item 6), through a real server on SQLite and PostgreSQL.

A race test sends 24 calls released together by a barrier; every limit is checked inside the call's unit
of work, so the counts must come out exact, not merely bounded. Every denial test also checks that the
denial changed nothing (grants, queue, sessions, assignments).
"""

from __future__ import annotations

import importlib
import io
import json
import pkgutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

import clipstore.v1
from auditlog.__main__ import verify_dir
from clipstore.audit.export import export_log
from clipstore.auth import METHOD_ROLES, PUBLIC_PREFIXES, ROLES
from clipstore.clipkey import Purpose
from clipstore.server import running_server
from clipstore.store import schema
from clipstore.store.db import connection
from clipstore.totp import code_at
from clipstore.unit import Actor, Tx
from clipstore.v1 import account_pb2, clip_pb2, common_pb2, review_pb2, review_pb2_grpc, safety_pb2
from tests.clip_helpers import ACCOUNT_ID
from tests.conftest import FakeClock, bearer, make_config, new_key
from tests.db_helpers import database_bytes
from tests.grpc_helpers import error_info
from tests.test_review import AUDIO, Reviewer, World

RACERS = 24
PER_PRINCIPAL = 10  # audit.denials_per_principal's default: refusals appended one by one per interval
MAX_FAILED_CODES = 5  # the default policy, which these tests run under
LOCKOUT_S = 15 * 60
ASSIGNMENT_TTL_S = 10 * 60


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def overrides() -> dict[str, object]:
    """Config beyond the review defaults; a test parametrises this to change a limit."""
    return {}


@pytest.fixture
def w(tmp_path: Path, database_url: str | None, clock: FakeClock, overrides: dict[str, object],
      log_stream: io.StringIO) -> Iterator[World]:
    config = make_config(tmp_path / "data", database_url=database_url,
                         **{"review.sample_rate": 1.0, "review.daily_cap": 3, **overrides})
    with running_server(config, clock=clock) as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield World(server, channel, clock)


# -- helpers ------------------------------------------------------------------------------------------------
def _race(call: Callable[[], Any], n: int = RACERS) -> list[Any]:
    """`call` n times at once (a barrier releases them together); each result or the RpcError it raised."""
    barrier = threading.Barrier(n)

    def one(_: int) -> Any:
        barrier.wait(10)
        try:
            result = call()
            return list(result) if isinstance(result, Iterator) else result
        except grpc.RpcError as err:
            return err

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def _outcomes(results: list[Any]) -> Counter[str]:
    """'ok' or 'CODE/REASON' per result."""
    return Counter(f"{r.code().name}/{error_info(r).reason}" if isinstance(r, grpc.RpcError) else "ok"
                   for r in results)


def _err(call: Callable[..., Any], request: Any, r: Reviewer | None = None,
         md: tuple[tuple[str, str], ...] | None = None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        result = call(request, metadata=md if md is not None else r.md, timeout=10)  # type: ignore[union-attr]
        if isinstance(result, Iterator):
            list(result)
    return caught.value


def _count(w: World, table: sa.Table, *where: sa.ColumnElement[bool]) -> int:
    with w.server.app.db.read() as conn:
        return int(conn.scalar(sa.select(sa.func.count()).select_from(table).where(*where)) or 0)


def _actions(w: World, action: str) -> list[dict[str, Any]]:
    return [e for e in w.entries() if e["action"] == action]


def _summary(w: World, r: Reviewer) -> Counter[str]:
    """End the interval (flush) and return the reviewer's denial summary, `count=N` checked against the
    rest (an empty Counter: no summary). A new interval begins: the budget is whole again."""
    w.server.denials.flush()
    summaries = [e for e in _actions(w, "auth.deny_summary") if e["actor"]["id"] == r.id]
    if not summaries:
        return Counter()
    assert summaries[-1]["actor"] == {"id": r.id, "role": "reviewer"}
    count, *tokens = summaries[-1]["outcome"]["reason"].split()
    counts = Counter({token: int(n) for token, n in (t.split("=") for t in tokens)})
    assert count == f"count={sum(counts.values())}"
    return counts


def _wrong_code(r: Reviewer, now: float) -> str:
    """A code that no step within the accepted drift produces."""
    near = {code_at(r.secret, now + d) for d in (-30, 0, 30)}
    return next(c for c in (f"{i:06d}" for i in range(1000)) if c not in near)


def _start(w: World, r: Reviewer, code: str) -> review_pb2.StartReviewSessionResponse:
    return r.stub.StartReviewSession(review_pb2.StartReviewSessionRequest(totp_code=code), metadata=r.md, timeout=10)


def _assigned(w: World, clips: int = 1) -> tuple[Reviewer, str, review_pb2.NextAssignmentResponse]:
    w.opt_in()
    for _ in range(clips):
        w.put()
    r = w.enroll()
    token = w.session(r)
    return r, token, w.next(r, token)


def _flag(r: Reviewer, token: str, assignment_id: str, note: str = "") -> review_pb2.FlagClipResponse:
    return r.stub.FlagClip(review_pb2.FlagClipRequest(session_token=token, assignment_id=assignment_id,
                                                      category=common_pb2.FLAG_CATEGORY_DISTRESS, note=note),
                           metadata=r.md, timeout=10)


def _fetch_req(token: str, grant: review_pb2.RequestGrantResponse) -> review_pb2.FetchClipRequest:
    return review_pb2.FetchClipRequest(session_token=token, grant=grant.grant, review_clip_id=grant.review_clip_id)


def _clip_of(w: World, assignment_id: str) -> str:
    with w.server.app.db.read() as conn:
        return str(conn.scalar(sa.select(schema.assignments.c.clip_id)
                               .where(schema.assignments.c.assignment_id == assignment_id)))


def _opened(w: World, assignment_id: str, escalation_id: str) -> tuple[str | None, str | None]:
    """The stored label and resolution, opened with the clip's key (None where nothing is stored)."""
    clips = w.server.app.clips
    clip = clips.find(_clip_of(w, assignment_id))
    assert clip is not None
    with w.server.app.db.read() as conn:
        label_ct = conn.scalar(sa.select(schema.assignments.c.label_ct)
                               .where(schema.assignments.c.assignment_id == assignment_id))
        resolution_ct = conn.scalar(sa.select(schema.escalations.c.resolution_ct)
                                    .where(schema.escalations.c.escalation_id == escalation_id))
    return (clips.key(clip).open(Purpose.LABEL, assignment_id, bytes(label_ct)).decode() if label_ct else None,
            clips.key(clip).open(Purpose.RESOLUTION, escalation_id, bytes(resolution_ct)).decode()
            if resolution_ct else None)


# -- item 4: TOTP check-and-count, escalating lockouts --------------------------------------------------------
def test_24_parallel_wrong_codes_are_evaluated_five_times_then_the_reviewer_is_locked_once(w: World) -> None:
    r = w.enroll()
    wrong = _wrong_code(r, w.clock.now())
    results = _race(lambda: _start(w, r, wrong))
    assert _outcomes(results) == {"UNAUTHENTICATED/BAD_CODE": MAX_FAILED_CODES,
                                  "PERMISSION_DENIED/REVIEWER_LOCKED": RACERS - MAX_FAILED_CODES}
    assert len(_actions(w, "reviewer.lockout")) == 1
    # Every refusal is on record: the first PER_PRINCIPAL one by one (the writer decides, one unit at a
    # time, so a burst cannot append more), the rest in the reviewer's summary of the interval.
    appended = Counter(e["outcome"]["reason"] for e in _actions(w, "session.deny"))
    assert sum(appended.values()) == PER_PRINCIPAL
    counted = _summary(w, r)
    assert set(counted) <= {"session.deny/BAD_CODE", "session.deny/REVIEWER_LOCKED"}
    assert appended["BAD_CODE"] + counted["session.deny/BAD_CODE"] == MAX_FAILED_CODES
    assert sum(counted.values()) == RACERS - PER_PRINCIPAL
    # The right code is not even evaluated while locked: no session, and the step stays unused.
    right = code_at(r.secret, w.clock.now())
    w.denied(_err(r.stub.StartReviewSession, review_pb2.StartReviewSessionRequest(totp_code=right), r),
             grpc.StatusCode.PERMISSION_DENIED, "REVIEWER_LOCKED", action="session.deny")
    assert _count(w, schema.review_sessions) == 0
    assert len(_actions(w, "reviewer.lockout")) == 1


def test_a_second_lockout_after_the_first_expires_lasts_twice_as_long(w: World) -> None:
    r = w.enroll()
    for expected_s in (LOCKOUT_S, 2 * LOCKOUT_S):
        for _ in range(MAX_FAILED_CODES):
            _err(r.stub.StartReviewSession, review_pb2.StartReviewSessionRequest(
                totp_code=_wrong_code(r, w.clock.now())), r)
        assert _actions(w, "reviewer.lockout")[-1]["outcome"]["reason"].endswith(f"locked {expected_s} s")
        w.clock.advance(LOCKOUT_S + 1)  # the first lockout would be over by now
        w.server.denials.flush()  # so would the interval of denial summaries: each refusal below is appended
    # ... the second is not: it lasts 2 × 15 min.
    w.denied(_err(r.stub.StartReviewSession, review_pb2.StartReviewSessionRequest(
        totp_code=code_at(r.secret, w.clock.now())), r), grpc.StatusCode.PERMISSION_DENIED, "REVIEWER_LOCKED",
        action="session.deny")
    w.clock.advance(LOCKOUT_S)
    assert w.session(r)
    assert len(_actions(w, "reviewer.lockout")) == 2


# -- item 5: grant limit, daily cap, single use --------------------------------------------------------------
def test_24_parallel_grant_requests_on_one_assignment_issue_exactly_three(w: World) -> None:
    r, token, assignment = _assigned(w)
    request = review_pb2.RequestGrantRequest(session_token=token, assignment_id=assignment.assignment_id)
    results = _race(lambda: r.stub.RequestGrant(request, metadata=r.md, timeout=30))
    assert _outcomes(results) == {"ok": 3, "RESOURCE_EXHAUSTED/GRANT_LIMIT": RACERS - 3}
    assert _count(w, schema.grants) == 3
    assert len(_actions(w, "grant.issue")) == 3
    assert len(_actions(w, "grant.deny")) == PER_PRINCIPAL  # the rest are counted in the reviewer's summary
    assert _summary(w, r) == {"grant.deny/GRANT_LIMIT": RACERS - 3 - PER_PRINCIPAL}


@pytest.mark.parametrize("overrides", [{"review.daily_cap": 2}])
def test_24_parallel_next_assignment_calls_hand_out_exactly_the_daily_cap(w: World) -> None:
    w.opt_in()
    for _ in range(6):  # more than the cap: the queue is never what stops them
        w.put()
    r = w.enroll()
    token = w.session(r)
    request = review_pb2.NextAssignmentRequest(session_token=token)
    results = _race(lambda: r.stub.NextAssignment(request, metadata=r.md, timeout=30))
    assert _outcomes(results) == {"ok": 2, "RESOURCE_EXHAUSTED/DAILY_CAP": RACERS - 2}
    assert len({res.clip.review_clip_id for res in results if not isinstance(res, grpc.RpcError)}) == 2
    assert _count(w, schema.assignments) == 2
    assert len(_actions(w, "assignment.issue")) == 2
    assert _count(w, schema.review_queue, schema.review_queue.c.assignment_id.is_(None)) == 4


def test_24_parallel_fetches_of_one_grant_stream_it_exactly_once(w: World) -> None:
    r, token, assignment = _assigned(w)
    grant = w.grant(r, token, assignment.assignment_id)
    request = _fetch_req(token, grant)
    results = _race(lambda: r.stub.FetchClip(request, metadata=r.md, timeout=30))
    assert _outcomes(results) == {"ok": 1, "PERMISSION_DENIED/GRANT_REPLAYED": RACERS - 1}
    streamed = next(res for res in results if not isinstance(res, grpc.RpcError))
    assert b"".join(m.audio_chunk for m in streamed[1:]) == AUDIO
    assert len(_actions(w, "clip.fetch")) == 1


# -- item 6: flagging voids the clip's grants ----------------------------------------------------------------
def test_flagging_a_clip_voids_the_grants_requested_before_the_flag(w: World) -> None:
    r, token, assignment = _assigned(w)
    grants = [w.grant(r, token, assignment.assignment_id) for _ in range(2)]
    _flag(r, token, assignment.assignment_id, note="someone is shouting")
    for grant in grants:
        w.denied(_err(r.stub.FetchClip, _fetch_req(token, grant), r), grpc.StatusCode.PERMISSION_DENIED,
                 "GRANT_REVOKED")
    assert _count(w, schema.grants, schema.grants.c.voided.is_(True)) == 2
    assert not _actions(w, "clip.fetch")


# -- item 7: a requested locale must be one of the reviewer's ------------------------------------------------
def test_a_reviewer_cannot_pull_a_locale_they_are_not_enrolled_for(w: World) -> None:
    w.opt_in()
    w.put(locale="de-DE")
    english = w.put(locale="en-US")
    r = w.enroll()  # en-US only
    token = w.session(r)
    w.denied(_err(r.stub.NextAssignment, review_pb2.NextAssignmentRequest(session_token=token, locale="de-DE"), r),
             grpc.StatusCode.PERMISSION_DENIED, "LOCALE_NOT_ENROLLED", action="assignment.deny")
    assert _count(w, schema.assignments) == 0 and _count(w, schema.review_queue) == 2
    # Without a locale the reviewer gets their own locales only: the en-US clip, then nothing.
    got = w.next(r, token)
    assert got.clip.locale == "en-US" and _clip_of(w, got.assignment_id) == english.clip_id
    err = _err(r.stub.NextAssignment, review_pb2.NextAssignmentRequest(session_token=token), r)
    assert error_info(err).reason == "QUEUE_EMPTY"
    assert _count(w, schema.assignments) == 1


def test_locales_match_whatever_their_case(w: World) -> None:
    """BCP 47 tags are case-insensitive: before, a clip stored as `en-us` never reached a reviewer enrolled
    for `en-US`. Tags are now stored canonical (`en-US`), and rows stored before in another case match."""
    w.opt_in()
    lower = w.put(locale="en-us")
    assert w.server.app.clips.find(lower.clip_id).locale == "en-US"
    r = w.enroll()  # en-US
    token = w.session(r)
    got = w.next(r, token)
    assert got.clip.locale == "en-US" and _clip_of(w, got.assignment_id) == lower.clip_id
    # A queue row and a reviewer stored before canonicalisation, in other cases.
    older = w.put(locale="de-DE")
    with w.server.app.db.transaction() as conn:
        conn.execute(sa.update(schema.review_queue).where(schema.review_queue.c.clip_id == older.clip_id)
                     .values(locale="DE-de"))
    other = w.enroll("other")
    with w.server.app.db.transaction() as conn:
        conn.execute(sa.update(schema.reviewers).where(schema.reviewers.c.principal_id == other.id)
                     .values(locales="de-de"))
    other_token = w.session(other)
    theirs = other.stub.NextAssignment(review_pb2.NextAssignmentRequest(session_token=other_token, locale="de-DE"),
                                       metadata=other.md, timeout=10)
    assert theirs.clip.locale == "de-DE" and _clip_of(w, theirs.assignment_id) == older.clip_id


# -- item 8: an expired assignment belongs to nobody ---------------------------------------------------------
def test_the_former_holder_of_an_expired_assignment_cannot_complete_or_flag_it(w: World) -> None:
    r, token, mine = _assigned(w)
    clip_id = _clip_of(w, mine.assignment_id)
    expires_before = w.server.app.clips.find(clip_id).expires_at
    w.clock.advance(ASSIGNMENT_TTL_S + 1)
    other = w.enroll("other")
    other_token = w.session(other)
    theirs = w.next(other, other_token)  # the clip went back to the queue and to another reviewer
    assert theirs.clip.review_clip_id == mine.clip.review_clip_id
    their_grant = w.grant(other, other_token, theirs.assignment_id)

    w.denied(_err(r.stub.CompleteAssignment, review_pb2.CompleteAssignmentRequest(
        session_token=token, assignment_id=mine.assignment_id, label="weather"), r),
        grpc.StatusCode.FAILED_PRECONDITION, "ASSIGNMENT_EXPIRED", action="assignment.deny")
    for category in (common_pb2.FLAG_CATEGORY_DISTRESS, common_pb2.FLAG_CATEGORY_ACCIDENTAL_ACTIVATION):
        w.denied(_err(r.stub.FlagClip, review_pb2.FlagClipRequest(
            session_token=token, assignment_id=mine.assignment_id, category=category, note="n"), r),
            grpc.StatusCode.FAILED_PRECONDITION, "ASSIGNMENT_EXPIRED", action="assignment.deny")
    err = _err(r.stub.RequestGrant, review_pb2.RequestGrantRequest(session_token=token,
                                                                  assignment_id=mine.assignment_id), r)
    w.denied(err, grpc.StatusCode.FAILED_PRECONDITION, "ASSIGNMENT_EXPIRED")

    # Nothing the former holder tried touched the clip or the current holder's grant.
    assert _count(w, schema.escalations) == 0 and _count(w, schema.grants) == 1
    assert w.server.app.clips.find(clip_id).expires_at == expires_before
    _, audio = w.fetch(other, other_token, their_grant.grant, their_grant.review_clip_id)
    assert audio == AUDIO


# -- item 9: resolving escalations --------------------------------------------------------------------------
def test_resolving_an_unknown_escalation_is_not_found_with_a_fixed_reason_and_none_of_the_callers_text(
        w: World) -> None:
    text = "Resolution: called Jane Roe back at 555-0100"
    err = _err(w.safety.ResolveEscalation, safety_pb2.ResolveEscalationRequest(
        escalation_id="esc_0000000000000000dead", resolution=text), md=w.safety_md)
    w.denied(err, grpc.StatusCode.NOT_FOUND, "ESCALATION_NOT_FOUND", action="escalation.deny")
    assert not _actions(w, "escalation.resolve")
    raw = b"".join(w.server.app.audit.reader.entries(0, 100_000))
    assert text.encode() not in raw and b"Jane" not in raw and b"555-0100" not in raw
    assert text not in err.details()


def test_an_escalation_is_resolved_once_and_a_second_resolution_is_refused(w: World) -> None:
    r, token, assignment = _assigned(w)
    esc = _flag(r, token, assignment.assignment_id, note="distress")
    w.safety.ResolveEscalation(safety_pb2.ResolveEscalationRequest(
        escalation_id=esc.escalation_id, resolution="first: referred"), metadata=w.safety_md, timeout=10)
    second = "second: overwrite attempt by Jane Roe"
    w.denied(_err(w.safety.ResolveEscalation, safety_pb2.ResolveEscalationRequest(
        escalation_id=esc.escalation_id, resolution=second), md=w.safety_md),
        grpc.StatusCode.FAILED_PRECONDITION, "ESCALATION_RESOLVED", action="escalation.deny")
    assert len(_actions(w, "escalation.resolve")) == 1
    assert second.encode() not in b"".join(w.server.app.audit.reader.entries(0, 100_000))
    assert _opened(w, assignment.assignment_id, esc.escalation_id)[1] == "first: referred"  # the first stands


# -- item 10: labels and resolutions are sealed and die with the account --------------------------------------
def test_labels_and_resolutions_are_sealed_and_leave_no_byte_after_account_deletion(w: World) -> None:
    r, token, assignment = _assigned(w)
    label, resolution = "jane-roe-says-elm-street", "Resolution: Jane Roe of 12 Elm Street was called back"
    esc = _flag(r, token, assignment.assignment_id, note="distress")
    w.safety.ResolveEscalation(safety_pb2.ResolveEscalationRequest(
        escalation_id=esc.escalation_id, resolution=resolution), metadata=w.safety_md, timeout=10)
    r.stub.CompleteAssignment(review_pb2.CompleteAssignmentRequest(
        session_token=token, assignment_id=assignment.assignment_id, label=label), metadata=r.md, timeout=10)
    secrets_ = (label.encode(), resolution.encode(), b"Elm Street")
    assert _opened(w, assignment.assignment_id, esc.escalation_id) == (label, resolution)  # kept, but sealed
    assert not [name for name, data in database_bytes(w.server) for s in secrets_ if s in data]
    w.accounts.DeleteAccount(account_pb2.DeleteAccountRequest(account_id=ACCOUNT_ID), metadata=w.ingest, timeout=10)
    assert not [name for name, data in database_bytes(w.server) for s in secrets_ if s in data]
    with w.server.app.db.read() as conn:  # and no ciphertext is kept as noise either
        assert conn.execute(sa.select(schema.assignments.c.label_ct, schema.assignments.c.label)).all() == \
            [(None, None)]  # kept for the daily cap, without its label
        assert conn.execute(sa.select(schema.escalations.c.resolution_ct, schema.escalations.c.resolution,
                                      schema.escalations.c.note_ct)).all() == [(None, None, b"")]


def test_clear_text_written_before_sealing_is_removed_when_its_clip_is_deleted(w: World) -> None:
    """Labels and resolutions from before migration 7 sit in clear columns; deleting the clip removes them."""
    r, token, assignment = _assigned(w)
    esc = _flag(r, token, assignment.assignment_id, note="n")
    clip_id = _clip_of(w, assignment.assignment_id)
    with w.server.app.db.transaction() as conn:  # as a database upgraded from before sealing holds them
        conn.execute(schema.assignments.update().values(label="legacy label Jane Roe"))
        conn.execute(schema.escalations.update().values(resolution="legacy resolution Jane Roe",
                                                        resolved_at=w.clock.now()))
    w.clips.DeleteClip(clip_pb2.DeleteClipRequest(clip_id=clip_id), metadata=w.ingest, timeout=10)
    with w.server.app.db.read() as conn:
        labels = conn.scalars(sa.select(schema.assignments.c.label).where(schema.assignments.c.label.is_not(None)))
        resolutions = conn.scalars(sa.select(schema.escalations.c.resolution)
                                   .where(schema.escalations.c.resolution.is_not(None)))
        assert (list(labels), list(resolutions)) == ([], [])
    listed = w.safety.ListEscalations(safety_pb2.ListEscalationsRequest(include_resolved=True),
                                      metadata=w.safety_md, timeout=10)
    assert [e.escalation_id for e in listed.escalations] == [esc.escalation_id]  # the case itself stays


# -- item 11: every disclosed note is on record first ---------------------------------------------------------
def test_listing_escalations_records_one_read_per_disclosed_note_before_returning(w: World) -> None:
    r, token, first = _assigned(w, clips=2)
    second = w.next(r, token)
    for assignment in (first, second):
        _flag(r, token, assignment.assignment_id, note=f"note for {assignment.assignment_id}")
    clip_ids = {_clip_of(w, a.assignment_id) for a in (first, second)}
    for round_ in (1, 2):
        listed = w.safety.ListEscalations(safety_pb2.ListEscalationsRequest(), metadata=w.safety_md, timeout=10)
        assert {e.note for e in listed.escalations} == {f"note for {a.assignment_id}" for a in (first, second)}
        reads = _actions(w, "escalation.read")  # already durable when the response arrived
        assert len(reads) == 2 * round_
        assert {e["target"]["clip_id"] for e in reads[-2:]} == clip_ids
        assert all(e["actor"]["role"] == "safety" for e in reads)
    w.accounts.DeleteAccount(account_pb2.DeleteAccountRequest(account_id=ACCOUNT_ID), metadata=w.ingest, timeout=10)
    listed = w.safety.ListEscalations(safety_pb2.ListEscalationsRequest(), metadata=w.safety_md, timeout=10)
    assert {e.note for e in listed.escalations} == {"[note erased: the clip was deleted]"}
    assert len(_actions(w, "escalation.read")) == 4  # an erased note discloses nothing


def test_listing_escalations_while_the_key_service_is_down_is_unavailable_not_erased(
        w: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, a KMS outage listed every note as "[note erased: the clip was deleted]": false, and a safety
    reviewer could close a case believing its note gone. Now the call is UNAVAILABLE (KMS_UNAVAILABLE,
    retry), nothing is disclosed or recorded as read; a note whose own key does not open is marked
    unreadable, never erased."""
    from kms import KmsUnavailable, UnknownKeyVersion
    r, token, assignment = _assigned(w)
    _flag(r, token, assignment.assignment_id, note="she said to call her sister")
    keyring = w.server.app.keyring

    def down(*args: object, **kwargs: object) -> bytes:
        raise KmsUnavailable("the root provider could not be reached")
    monkeypatch.setattr(keyring, "unwrap", down)
    err = _err(w.safety.ListEscalations, safety_pb2.ListEscalationsRequest(), md=w.safety_md)
    assert (err.code(), error_info(err).reason) == (grpc.StatusCode.UNAVAILABLE, "KMS_UNAVAILABLE")
    assert not _actions(w, "escalation.read")

    def unknown(*args: object, **kwargs: object) -> bytes:
        raise UnknownKeyVersion("no such version")
    monkeypatch.setattr(keyring, "unwrap", unknown)
    listed = w.safety.ListEscalations(safety_pb2.ListEscalationsRequest(), metadata=w.safety_md, timeout=10)
    assert [e.note for e in listed.escalations] == [
        "[note unreadable: its clip's key does not open it; operators: see the logs]"]
    assert not _actions(w, "escalation.read")
    monkeypatch.undo()
    listed = w.safety.ListEscalations(safety_pb2.ListEscalationsRequest(), metadata=w.safety_md, timeout=10)
    assert [e.note for e in listed.escalations] == ["she said to call her sister"]


# -- issue 13 item 6: the denials no other test reaches -------------------------------------------------------
def test_a_made_up_or_another_reviewers_session_token_is_session_unknown_and_audited(w: World) -> None:
    r, token, assignment = _assigned(w, clips=2)
    other = w.enroll("other")
    for who, tok in ((r, "made-up-token"), (other, token)):
        w.denied(_err(who.stub.NextAssignment, review_pb2.NextAssignmentRequest(session_token=tok), who),
                 grpc.StatusCode.UNAUTHENTICATED, "SESSION_UNKNOWN", action="assignment.deny")
        w.denied(_err(who.stub.RequestGrant, review_pb2.RequestGrantRequest(
            session_token=tok, assignment_id=assignment.assignment_id), who),
            grpc.StatusCode.UNAUTHENTICATED, "SESSION_UNKNOWN")
    assert _count(w, schema.assignments) == 1 and _count(w, schema.grants) == 0
    assert _count(w, schema.review_queue, schema.review_queue.c.assignment_id.is_(None)) == 1


def test_a_reviewer_principal_that_was_never_enrolled_is_not_enrolled_and_audited(w: World) -> None:
    md = bearer(new_key(w.server.app, "reviewer", "no-totp"))
    stub = review_pb2_grpc.ReviewServiceStub(w.channel)
    w.denied(_err(stub.StartReviewSession, review_pb2.StartReviewSessionRequest(totp_code="123456"), md=md),
             grpc.StatusCode.PERMISSION_DENIED, "NOT_ENROLLED", action="session.deny")
    assert _count(w, schema.review_sessions) == 0


def test_a_grant_for_an_expired_assignment_is_assignment_expired_and_not_issued(w: World) -> None:
    r, token, assignment = _assigned(w)
    w.clock.advance(ASSIGNMENT_TTL_S)
    err = _err(r.stub.RequestGrant, review_pb2.RequestGrantRequest(session_token=token,
                                                                  assignment_id=assignment.assignment_id), r)
    w.denied(err, grpc.StatusCode.FAILED_PRECONDITION, "ASSIGNMENT_EXPIRED")
    assert _actions(w, "grant.deny")[-1]["target"]["clip_id"] == _clip_of(w, assignment.assignment_id)
    assert _count(w, schema.grants) == 0


def test_a_grant_requested_after_the_account_opted_out_is_clip_unavailable_and_not_issued(w: World) -> None:
    r, token, assignment = _assigned(w)
    w.opt_in(allow=False)
    err = _err(r.stub.RequestGrant, review_pb2.RequestGrantRequest(session_token=token,
                                                                  assignment_id=assignment.assignment_id), r)
    w.denied(err, grpc.StatusCode.FAILED_PRECONDITION, "CLIP_UNAVAILABLE")
    assert _count(w, schema.grants) == 0 and _count(w, schema.review_queue) == 0


def test_a_clip_deleted_after_its_grant_is_refused_at_fetch_as_revoked(w: World) -> None:
    """Deletion voids the clip's grants, so step 5 (GRANT_REVOKED) answers before step 6 could."""
    r, token, assignment = _assigned(w)
    grant = w.grant(r, token, assignment.assignment_id)
    w.clips.DeleteClip(clip_pb2.DeleteClipRequest(clip_id=_clip_of(w, assignment.assignment_id)),
                       metadata=w.ingest, timeout=10)
    w.denied(_err(r.stub.FetchClip, _fetch_req(token, grant), r), grpc.StatusCode.PERMISSION_DENIED,
             "GRANT_REVOKED")
    assert _count(w, schema.grants, schema.grants.c.redeemed_at.is_not(None)) == 0


def test_a_clip_that_expires_between_grant_and_fetch_is_clip_gone_and_the_grant_stays_unused(w: World) -> None:
    w.opt_in()
    clip = w.put()
    r = w.enroll()
    w.clock.t = clip.expires_at.seconds - 90  # retention ends a minute into the grant's life
    token = w.session(r)
    assignment = w.next(r, token)
    grant = w.grant(r, token, assignment.assignment_id)
    w.clock.advance(61)
    w.denied(_err(r.stub.FetchClip, _fetch_req(token, grant), r), grpc.StatusCode.FAILED_PRECONDITION,
             "CLIP_GONE")
    assert _actions(w, "grant.deny")[-1]["target"]["clip_id"] == clip.clip_id
    assert _count(w, schema.grants, schema.grants.c.redeemed_at.is_not(None)) == 0
    assert not _actions(w, "clip.fetch")


def test_flagging_a_clip_deleted_after_assignment_is_clip_gone(w: World) -> None:
    r, token, assignment = _assigned(w)
    w.clips.DeleteClip(clip_pb2.DeleteClipRequest(clip_id=_clip_of(w, assignment.assignment_id)),
                       metadata=w.ingest, timeout=10)
    w.denied(_err(r.stub.FlagClip, review_pb2.FlagClipRequest(
        session_token=token, assignment_id=assignment.assignment_id,
        category=common_pb2.FLAG_CATEGORY_DISTRESS, note="n"), r),
        grpc.StatusCode.FAILED_PRECONDITION, "CLIP_GONE", action="assignment.deny")
    assert _count(w, schema.escalations) == 0


def test_a_reviewer_disabled_while_their_fetch_waits_is_refused_reviewer_disabled(w: World) -> None:
    """A disabled reviewer's key is refused at the door (PRINCIPAL_DISABLED, see test_review); REVIEWER_DISABLED
    is what a fetch that was already past the door gets when an admin disables the reviewer meanwhile."""
    r, token, assignment = _assigned(w)
    grant = w.grant(r, token, assignment.assignment_id)
    app = w.server.app
    holding, release = threading.Event(), threading.Event()

    def admin_disables(tx: Tx) -> None:  # the admin's unit runs just before the fetch's
        holding.set()
        assert release.wait(10)
        connection(tx).execute(schema.principals.update().where(schema.principals.c.id == r.id).values(disabled=True))
        tx.audit(Actor(id="p_admin", role="admin").record("principal.disable", principal_id=r.id))

    disabling = app.audit.submit(admin_disables)
    assert holding.wait(10)
    with ThreadPoolExecutor(1) as pool:
        fetching = pool.submit(_err, r.stub.FetchClip, _fetch_req(token, grant), r)
        deadline = time.monotonic() + 10
        while app.audit._queue.qsize() == 0:  # the fetch has passed authentication and waits for the writer
            assert time.monotonic() < deadline
            time.sleep(0.005)
        release.set()
        err = fetching.result(10)
    disabling.result(10)
    w.denied(err, grpc.StatusCode.PERMISSION_DENIED, "REVIEWER_DISABLED")
    assert _count(w, schema.grants, schema.grants.c.redeemed_at.is_not(None)) == 0
    assert not _actions(w, "clip.fetch")


def test_a_tampered_clip_object_is_refused_and_recorded_as_an_integrity_failure(w: World) -> None:
    r, token, assignment = _assigned(w)
    clip_id = _clip_of(w, assignment.assignment_id)
    grant = w.grant(r, token, assignment.assignment_id)
    (path,) = (w.server.app.config.data_dir).rglob(clip_id)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01  # one bit inside the first segment's ciphertext
    path.write_bytes(bytes(data))
    received: list[review_pb2.FetchClipResponse] = []
    with pytest.raises(grpc.RpcError) as caught:
        for message in r.stub.FetchClip(_fetch_req(token, grant), metadata=r.md, timeout=10):
            received.append(message)
    assert (caught.value.code(), error_info(caught.value).reason) == (grpc.StatusCode.DATA_LOSS, "CLIP_INTEGRITY")
    assert not any(m.audio_chunk for m in received)
    actions = [e["action"] for e in w.entries()]
    assert actions[-2:] == ["clip.fetch", "clip.integrity_failure"]  # the fetch was on record first
    failure = _actions(w, "clip.integrity_failure")[0]
    assert failure["outcome"] == {"result": "failed", "reason": "segment_tampered"}
    assert failure["target"]["clip_id"] == clip_id and failure["actor"]["id"] == r.id


# -- issue 13 item 6: every proto method has a role ----------------------------------------------------------
def _proto_methods() -> set[str]:
    methods = set()
    for info in pkgutil.iter_modules(clipstore.v1.__path__):
        if info.name.endswith("_pb2"):
            module = importlib.import_module(f"clipstore.v1.{info.name}")
            for service in module.DESCRIPTOR.services_by_name.values():
                methods |= {f"/{service.full_name}/{m.name}" for m in service.methods}
    return methods


def test_every_proto_method_has_a_role_and_every_role_entry_names_a_proto_method() -> None:
    """Except the deliberately public ones (an enrolment code is its own credential), listed by prefix."""
    methods = {m for m in _proto_methods() if not m.startswith(PUBLIC_PREFIXES)}
    assert len(methods) >= 20
    assert methods == set(METHOD_ROLES)
    assert all(roles and roles <= set(ROLES) for roles in METHOD_ROLES.values())


# -- issue 13: a principal's refusals share one budget, the interceptor's and the service's own ---------------
BUDGET = 4
NO_ASSIGNMENT = "a_0000000000000000"  # well formed, and no one's


def _no_grant(r: Reviewer, token: str) -> grpc.RpcError:
    return _err(r.stub.RequestGrant, review_pb2.RequestGrantRequest(session_token=token, assignment_id=NO_ASSIGNMENT),
                r)


def _entries_after(w: World, before: int) -> list[dict[str, Any]]:
    return [json.loads(e) for e in w.server.app.audit.reader.entries(before, 10_000)]


@pytest.mark.parametrize("overrides", [{"audit.denials_per_principal": BUDGET, "audit.denial_summary_s": 3600}])
def test_three_budgets_of_grant_requests_for_no_assignment_append_the_budget_then_one_summary(
        w: World, tmp_path: Path) -> None:
    """A stolen reviewer key sending garbage at RPC rate grows the permanent log by at most the budget and
    one summary per interval; every call still gets the same answer, with its own request id."""
    r, token, _ = _assigned(w)
    before = w.server.app.audit.reader.size()
    errors = [_no_grant(r, token) for _ in range(3 * BUDGET)]
    assert {(e.code(), error_info(e).reason, e.details()) for e in errors} == {
        (grpc.StatusCode.NOT_FOUND, "ASSIGNMENT_NOT_FOUND", "no such assignment for you")}
    request_ids = [dict(e.trailing_metadata())["x-request-id"] for e in errors]
    assert len(set(request_ids)) == 3 * BUDGET
    appended = _entries_after(w, before)
    assert [(e["action"], e["outcome"]["reason"]) for e in appended] == [
        ("grant.deny", "ASSIGNMENT_NOT_FOUND")] * BUDGET
    assert [e["request_id"] for e in appended] == request_ids[:BUDGET]
    assert _summary(w, r) == {"grant.deny/ASSIGNMENT_NOT_FOUND": 2 * BUDGET}
    assert w.server.app.audit.reader.size() == before + BUDGET + 1
    assert w.server.metrics.registry.get_sample_value("clipstore_audit_records_total", {
        "action": "grant.deny", "outcome": "denied", "reason": "ASSIGNMENT_NOT_FOUND"}) == 3 * BUDGET
    size = export_log(w.server.app.audit, tmp_path / "export", actor_id="test", actor_role="auditor")
    code, line = verify_dir(tmp_path / "export", w.server.app.audit.signer.verifier.key_string(), None)
    assert code == 0 and line.startswith(f"OK size={size} ")


@pytest.mark.parametrize("overrides", [{"audit.denials_per_principal": 2, "audit.denial_summary_s": 3600}])
def test_forty_wrong_codes_past_the_budget_still_lock_at_the_fifth_while_the_log_grows_by_four(w: World) -> None:
    r = w.enroll()
    before = w.server.app.audit.reader.size()
    reasons = [error_info(_err(r.stub.StartReviewSession, review_pb2.StartReviewSessionRequest(
        totp_code=_wrong_code(r, w.clock.now())), r)).reason for _ in range(40)]
    # the failure count and the lockout commit with each refusal, appended or counted
    assert reasons == ["BAD_CODE"] * MAX_FAILED_CODES + ["REVIEWER_LOCKED"] * (40 - MAX_FAILED_CODES)
    assert [e["action"] for e in _entries_after(w, before)] == ["session.deny", "session.deny", "reviewer.lockout"]
    assert _summary(w, r) == {"session.deny/BAD_CODE": MAX_FAILED_CODES - 2,
                              "session.deny/REVIEWER_LOCKED": 40 - MAX_FAILED_CODES}
    assert w.server.app.audit.reader.size() == before + 4
    w.clock.advance(LOCKOUT_S + 1)
    assert w.session(r)  # the lockout ran its course, as ever


@pytest.mark.parametrize("overrides", [{"audit.denials_per_principal": BUDGET, "audit.denial_summary_s": 3600}])
def test_a_reviewers_role_and_domain_refusals_share_one_budget_and_another_reviewers_is_its_own(w: World) -> None:
    r, token, _ = _assigned(w)
    other = w.enroll("other")
    other_token = w.session(other)
    before = w.server.app.audit.reader.size()

    def wrong_role() -> None:
        err = _err(w.clips.GetClip, clip_pb2.GetClipRequest(clip_id="c_x"), r)
        assert error_info(err).reason == "WRONG_ROLE"

    for _ in range(BUDGET - 1):
        wrong_role()
    for _ in range(3):
        assert error_info(_no_grant(r, token)).reason == "ASSIGNMENT_NOT_FOUND"
    for _ in range(BUDGET + 1):
        assert error_info(_no_grant(other, other_token)).reason == "ASSIGNMENT_NOT_FOUND"
    wrong_role()
    appended = Counter((e["actor"]["id"], e["action"]) for e in _entries_after(w, before))
    assert appended == {(r.id, "auth.deny"): BUDGET - 1, (r.id, "grant.deny"): 1, (other.id, "grant.deny"): BUDGET}
    assert _summary(w, r) == {"WRONG_ROLE": 1, "grant.deny/ASSIGNMENT_NOT_FOUND": 2}
    assert _summary(w, other) == {"grant.deny/ASSIGNMENT_NOT_FOUND": 1}


def test_a_flagged_clip_leaves_review_no_grant_for_its_flagger_and_no_later_reviewer(w: World) -> None:
    # Flagging voided the grants already issued but left the clip queued: its flagger could ask for new
    # grants and hear it again, and once the assignment lapsed the clip went to the next reviewer.
    r, token, assignment = _assigned(w)
    _flag(r, token, assignment.assignment_id, note="someone is shouting")
    w.denied(_err(r.stub.RequestGrant, review_pb2.RequestGrantRequest(
        session_token=token, assignment_id=assignment.assignment_id), r),
        grpc.StatusCode.FAILED_PRECONDITION, "CLIP_UNAVAILABLE")
    w.clock.advance(ASSIGNMENT_TTL_S + 1)
    other = w.enroll("other")
    other_token = w.session(other)
    err = _err(other.stub.NextAssignment, review_pb2.NextAssignmentRequest(session_token=other_token), other)
    assert (err.code(), error_info(err).reason) == (grpc.StatusCode.NOT_FOUND, "QUEUE_EMPTY")
    assert _count(w, schema.review_queue) == 0 and not _actions(w, "clip.fetch")


def test_a_grant_never_outlives_its_assignment(w: World) -> None:
    # A grant asked for just before the assignment lapsed lived its full TTL: its former holder heard the
    # clip after it had been handed to the next reviewer, though they could no longer complete or flag it.
    r, token, assignment = _assigned(w)
    w.clock.advance(ASSIGNMENT_TTL_S - 10)
    grant = w.grant(r, token, assignment.assignment_id)
    assert grant.expires_at.seconds <= assignment.expires_at.seconds
    w.clock.advance(11)
    other = w.enroll("other")
    other_token = w.session(other)
    assert w.next(other, other_token).clip.review_clip_id == assignment.clip.review_clip_id
    w.denied(_err(r.stub.FetchClip, _fetch_req(token, grant), r), grpc.StatusCode.PERMISSION_DENIED,
             "GRANT_EXPIRED")
    assert not _actions(w, "clip.fetch")
    w.put()
    w.clock.advance(0.7)
    mine = w.next(r, token)  # in the assignment's last second (a grant of under 1 s) none is issued at all
    assert mine.expires_at.nanos
    w.clock.t = mine.expires_at.seconds + 0.1
    w.denied(_err(r.stub.RequestGrant, review_pb2.RequestGrantRequest(
        session_token=token, assignment_id=mine.assignment_id), r),
        grpc.StatusCode.FAILED_PRECONDITION, "ASSIGNMENT_EXPIRED")


def test_expiring_a_reviewer_now_ends_their_sessions_and_grants_as_disabling_does(w: World) -> None:
    # Expiry stopped the reviewer's calls, but their sessions and grants lived on: extending the expiry
    # again brought them back (disabling ends them, so that re-enabling does not).
    from google.protobuf.timestamp_pb2 import Timestamp

    from clipstore.v1 import principal_admin_pb2, principal_admin_pb2_grpc
    r, token, assignment = _assigned(w)
    grant = w.grant(r, token, assignment.assignment_id)
    admins = principal_admin_pb2_grpc.PrincipalAdminServiceStub(w.channel)
    admins.SetPrincipalExpiry(principal_admin_pb2.SetPrincipalExpiryRequest(
        principal_id=r.id, expires_at=Timestamp(seconds=int(w.clock.now()))), metadata=w.admin, timeout=10)
    admins.SetPrincipalExpiry(principal_admin_pb2.SetPrincipalExpiryRequest(principal_id=r.id), metadata=w.admin,
                              timeout=10)  # extended again: never expires
    w.denied(_err(r.stub.FetchClip, _fetch_req(token, grant), r), grpc.StatusCode.UNAUTHENTICATED, "SESSION_ENDED")
    assert _count(w, schema.grants, schema.grants.c.voided.is_(True)) == 1
    token = w.session(r)
    w.denied(_err(r.stub.FetchClip, _fetch_req(token, grant), r), grpc.StatusCode.PERMISSION_DENIED,
             "GRANT_WRONG_SESSION")


def test_extending_a_reviewer_whose_expiry_passed_does_not_bring_back_their_sessions(w: World) -> None:
    # Setting an expiry in the past ended the reviewer's sessions and grants, but an expiry that simply passed
    # did not: extending it again (within the session's idle time) brought back the sessions and grants that
    # had been opened before it, as if the reviewer had never lapsed.
    from google.protobuf.timestamp_pb2 import Timestamp

    from clipstore.v1 import principal_admin_pb2, principal_admin_pb2_grpc
    r, token, assignment = _assigned(w)
    grant = w.grant(r, token, assignment.assignment_id)
    admins = principal_admin_pb2_grpc.PrincipalAdminServiceStub(w.channel)
    admins.SetPrincipalExpiry(principal_admin_pb2.SetPrincipalExpiryRequest(
        principal_id=r.id, expires_at=Timestamp(seconds=int(w.clock.now()) + 5)), metadata=w.admin, timeout=10)
    w.clock.advance(10)  # the expiry passes; the session is not idle for long
    assert _err(r.stub.NextAssignment, review_pb2.NextAssignmentRequest(session_token=token), r).code() \
        == grpc.StatusCode.UNAUTHENTICATED
    admins.SetPrincipalExpiry(principal_admin_pb2.SetPrincipalExpiryRequest(principal_id=r.id), metadata=w.admin,
                              timeout=10)  # extended again: never expires
    w.denied(_err(r.stub.FetchClip, _fetch_req(token, grant), r), grpc.StatusCode.UNAUTHENTICATED, "SESSION_ENDED")
    assert _count(w, schema.grants, schema.grants.c.voided.is_(True)) == 1


def test_an_assignment_is_flagged_once_a_repeat_names_the_escalation_it_already_made(w: World) -> None:
    # Each FlagClip of the same open assignment made a new escalation: a reviewer could fill the safety
    # team's queue with copies of one case (24 at once, or one after another).
    r, token, assignment = _assigned(w)
    first = _flag(r, token, assignment.assignment_id, note="someone is shouting")
    errors = [x for x in _race(lambda: _flag(r, token, assignment.assignment_id, note="again"))
              if isinstance(x, grpc.RpcError)]
    assert len(errors) == RACERS
    assert {(e.code(), error_info(e).reason) for e in errors} == {(grpc.StatusCode.FAILED_PRECONDITION,
                                                                   "ALREADY_FLAGGED")}
    assert {error_info(e).metadata["escalation_id"] for e in errors} == {first.escalation_id}
    assert _count(w, schema.escalations) == 1 and len(_actions(w, "clip.flag")) == 1
    last = [e for e in w.entries() if e["action"] == "assignment.deny"][-1]
    assert last["outcome"] == {"result": "denied", "reason": "ALREADY_FLAGGED"}
    w.safety.ResolveEscalation(safety_pb2.ResolveEscalationRequest(
        escalation_id=first.escalation_id, resolution="called back"), metadata=w.safety_md, timeout=10)
    err = _err(r.stub.FlagClip, review_pb2.FlagClipRequest(  # resolved or not, the assignment had its flag
        session_token=token, assignment_id=assignment.assignment_id, category=common_pb2.FLAG_CATEGORY_DISTRESS), r)
    assert error_info(err).reason == "ALREADY_FLAGGED"
    assert _count(w, schema.escalations) == 1


def test_a_reviewer_whose_locales_do_not_fit_their_column_is_invalid_argument_not_internal(w: World) -> None:
    # Up to 20 tags of up to 30 characters each were taken, but the column holding them (comma-separated)
    # has 400 characters: on PostgreSQL the insert failed and CreateReviewer answered INTERNAL.
    from clipstore.v1 import reviewer_admin_pb2, reviewer_admin_pb2_grpc
    stub = reviewer_admin_pb2_grpc.ReviewerAdminServiceStub(w.channel)
    locales = [f"ab{chr(97 + i)}-abcdefgh-abcdefgh-abcdefgh" for i in range(20)]
    err = _err(stub.CreateReviewer, reviewer_admin_pb2.CreateReviewerRequest(name="many", locales=locales),
               md=w.admin)
    assert (err.code(), error_info(err).reason, error_info(err).metadata["field"]) == \
        (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "locales")
    fits = locales[:12]  # 12 * 31 - 1 = 371 characters
    stub.CreateReviewer(reviewer_admin_pb2.CreateReviewerRequest(name="many", locales=fits), metadata=w.admin,
                        timeout=10)
