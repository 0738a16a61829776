"""The review rules on in-memory ports: each denial, each limit, state unchanged after a refusal.

No SQL, no gRPC, no sleeps: a FakeClock, `MemoryReviewStore` and `MemoryLedger`
(tests/review_fakes.py). The same rules run through the real server and both
databases in tests/test_review.py and tests/test_review_rules.py.
"""

from __future__ import annotations

import copy
import dataclasses
import secrets

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clipstore.clipkey import ClipKey
from clipstore.errors import ClipstoreError
from clipstore.review.assignments import Assignments
from clipstore.review.escalations import Escalations
from clipstore.review.policy import ReviewPolicy
from clipstore.review.redeem import Grants
from clipstore.review.sessions import Sessions
from clipstore.rows import ClipRow, ReviewerRow
from clipstore.totp import code_at
from clipstore.unit import Actor
from kms import LocalKms
from tests.conftest import FakeClock
from tests.review_fakes import MemoryLedger, MemoryReviewStore, memory_ports

POLICY = ReviewPolicy(session_lifetime_s=8 * 3600, session_idle_s=30 * 60, max_failed_codes=3, lockout_s=60,
                      daily_cap=2, grant_ttl_s=120)
REVIEWER = Actor(id="p_rev", role="reviewer")
OTHER = Actor(id="p_other", role="reviewer")
DEK = secrets.token_bytes(32)


class Desk:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.ports, self.store, self.ledger = memory_ports(self.clock)
        self.root = LocalKms(secrets.token_bytes(32))
        self.secret = secrets.token_bytes(20)
        self.decrypts = 0
        self.sessions = Sessions(self.ports, root=self, policy=POLICY)  # type: ignore[arg-type]
        self.assignments = Assignments(self.ports, policy=POLICY)
        self.grants = Grants(self.ports, key=Ed25519PrivateKey.generate(), policy=POLICY)
        self.escalations = Escalations(self.ports, data_key=lambda clip: ClipKey(DEK), policy=POLICY)
        for actor, locales in ((REVIEWER, ("en-US",)), (OTHER, ())):
            self.store.t.reviewers[actor.id] = ReviewerRow(
                principal_id=actor.id, locales=locales, wrapped_totp_secret=b"wrapped", last_totp_step=-1,
                failed_attempts=0, locked_until=0.0, lockouts=0)
            self.store.t.disabled[actor.id] = False

    def decrypt(self, blob: bytes, context: dict[str, str]) -> bytes:  # the root, as Sessions uses it
        self.decrypts += 1
        return self.secret

    def code(self) -> str:
        return code_at(self.secret, self.clock.now())

    def session(self, actor: Actor = REVIEWER) -> str:
        token, _ = self.sessions.start(self.code(), actor)
        self.clock.advance(30)
        return token

    def clip(self, n: int, *, locale: str = "en-US", account: str = "acct_1", wake_word: bool = True) -> str:
        clip_id = f"c_{n}"
        self.store.enqueue(ClipRow(
            clip_id=clip_id, account_ref=account, size_bytes=1, sealed_bytes=1, content_type="audio/opus",
            locale=locale, device_type="", duration_ms=1000, captured_at=None, wake_word=wake_word,
            created_at=self.clock.now(), expires_at=self.clock.now() + 86400, key_version=1, wrapped_dek=b"",
            identity_ct=b""), f"rc_{n}")
        self.store.t.allow_review[account] = True
        return clip_id

    def refused(self, reason: str, call, *args, **kwargs) -> None:  # noqa: ANN001
        """The call is refused with `reason`, and the review tables are exactly as before."""
        before = copy.deepcopy(self.store.t)
        with pytest.raises(ClipstoreError) as caught:
            call(*args, **kwargs)
        assert caught.value.reason == reason, caught.value.message
        assert self._without_counters(self.store.t) == self._without_counters(before)

    @staticmethod
    def _without_counters(t: object) -> object:
        """Refusals may only move the failure counters and the lock (that is their point)."""
        t = copy.deepcopy(t)
        t.reviewers = {k: (r.principal_id, r.locales, r.last_totp_step)  # type: ignore[attr-defined]
                       for k, r in t.reviewers.items()}  # type: ignore[attr-defined]
        t.sessions = {k: (s.session_id, s.ended, s.expires_at) for k, s in t.sessions.items()}  # type: ignore
        return t


@pytest.fixture
def d() -> Desk:
    return Desk()


def entries(ledger: MemoryLedger) -> list[tuple[str, str]]:
    return ledger.actions()


# -- sessions ------------------------------------------------------------------------------------
def test_a_right_code_opens_a_session_and_is_never_accepted_twice(d: Desk) -> None:
    code = d.code()
    token, _ = d.sessions.start(code, REVIEWER)
    assert token and ("session.start", "") in entries(d.ledger)
    d.refused("REPLAYED_CODE", d.sessions.start, code, REVIEWER)


def test_a_principal_that_is_not_a_reviewer_is_refused_and_audited(d: Desk) -> None:
    d.refused("NOT_ENROLLED", d.sessions.start, d.code(), Actor(id="p_admin", role="admin"))
    assert entries(d.ledger)[-1] == ("session.deny", "NOT_ENROLLED")


def test_wrong_codes_lock_and_a_locked_reviewer_is_refused_before_any_code_is_evaluated(d: Desk) -> None:
    for _ in range(POLICY.max_failed_codes):
        d.refused("BAD_CODE", d.sessions.start, "000000", REVIEWER)
    assert [a for a, _ in entries(d.ledger)].count("reviewer.lockout") == 1
    decrypts = d.decrypts
    d.refused("REVIEWER_LOCKED", d.sessions.start, d.code(), REVIEWER)  # even the right code
    assert d.decrypts == decrypts  # the secret was not even unwrapped


def test_each_lockout_before_a_good_code_lasts_twice_as_long(d: Desk) -> None:
    lengths = []
    for _ in range(3):
        for _ in range(POLICY.max_failed_codes):
            d.refused("BAD_CODE", d.sessions.start, "000000", REVIEWER)
        lengths.append(d.store.t.reviewers[REVIEWER.id].locked_until - d.clock.now())
        d.clock.advance(lengths[-1])
    assert lengths == [60, 120, 240]
    d.session()  # a good code resets the escalation
    assert d.store.t.reviewers[REVIEWER.id].lockouts == 0


def _active_until_lifetime_ends(d: Desk) -> None:
    """Never idle, but past the session's lifetime."""
    d.clock.advance(POLICY.session_lifetime_s)
    for key, session in d.store.t.sessions.items():
        d.store.t.sessions[key] = dataclasses.replace(session, last_seen_at=d.clock.now())


@pytest.mark.parametrize(("setup", "reason"), [
    (lambda d, t: None, "SESSION_UNKNOWN"),
    (lambda d, t: d.sessions.end(t, REVIEWER), "SESSION_ENDED"),
    (lambda d, t: d.clock.advance(POLICY.session_idle_s), "SESSION_IDLE"),
    (lambda d, t: _active_until_lifetime_ends(d),
     "SESSION_EXPIRED"),
])
def test_every_session_problem_has_its_reason(d: Desk, setup, reason: str) -> None:  # noqa: ANN001
    token = d.session()
    setup(d, token)
    d.refused(reason, d.assignments.next, "not-a-token" if reason == "SESSION_UNKNOWN" else token, "", REVIEWER)
    assert entries(d.ledger)[-1] == ("assignment.deny", reason)


# -- assignments ----------------------------------------------------------------------------------
def test_the_daily_cap_counts_every_assignment_of_the_day(d: Desk) -> None:
    token = d.session()
    for n in range(3):
        d.clip(n)
    d.assignments.next(token, "", REVIEWER)
    d.assignments.next(token, "", REVIEWER)
    d.refused("DAILY_CAP", d.assignments.next, token, "", REVIEWER)


def test_a_reviewer_may_ask_only_for_their_own_locales(d: Desk) -> None:
    token = d.session()
    d.clip(1, locale="de-DE")
    d.refused("LOCALE_NOT_ENROLLED", d.assignments.next, token, "de-DE", REVIEWER)
    d.refused("QUEUE_EMPTY", d.assignments.next, token, "", REVIEWER)  # their own locales hold nothing


def test_an_opted_out_clip_found_in_the_queue_is_withdrawn_not_assigned(d: Desk) -> None:
    token = d.session()
    d.clip(1)
    d.store.t.allow_review["acct_1"] = False
    with pytest.raises(ClipstoreError, match="no clips"):
        d.assignments.next(token, "", REVIEWER)
    assert d.store.queue_depth() == 0  # the refusal kept the withdrawal


# -- grants ----------------------------------------------------------------------------------------
def _assigned(d: Desk) -> tuple[str, str, str]:
    token = d.session()
    d.clip(1)
    assignment, _ = d.assignments.next(token, "", REVIEWER)
    return token, assignment.assignment_id, assignment.review_clip_id


def test_an_assignment_gets_at_most_three_grants(d: Desk) -> None:
    token, assignment_id, _ = _assigned(d)
    for _ in range(3):
        d.grants.issue(token, assignment_id, REVIEWER)
    d.refused("GRANT_LIMIT", d.grants.issue, token, assignment_id, REVIEWER)


def test_a_grant_redeems_once_and_the_fetch_is_on_record(d: Desk) -> None:
    token, assignment_id, review_clip_id = _assigned(d)
    grant, _, _ = d.grants.issue(token, assignment_id, REVIEWER)
    assert d.grants.redeem(token, grant, review_clip_id, REVIEWER)[1].clip_id == "c_1"
    assert entries(d.ledger)[-1] == ("clip.fetch", "")
    d.refused("GRANT_REPLAYED", d.grants.redeem, token, grant, review_clip_id, REVIEWER)


def test_a_clip_whose_account_opted_out_after_assignment_gets_no_grant(d: Desk) -> None:
    token, assignment_id, _ = _assigned(d)
    d.store.t.allow_review["acct_1"] = False
    d.refused("CLIP_UNAVAILABLE", d.grants.issue, token, assignment_id, REVIEWER)


def test_an_expired_assignment_belongs_to_nobody(d: Desk) -> None:
    token, assignment_id, _ = _assigned(d)
    d.clock.advance(POLICY.assignment_ttl_s)
    d.refused("ASSIGNMENT_EXPIRED", d.grants.issue, token, assignment_id, REVIEWER)
    d.refused("ASSIGNMENT_EXPIRED", d.assignments.complete, token, assignment_id, b"label", REVIEWER)
    d.refused("ASSIGNMENT_EXPIRED", d.escalations.flag, token, assignment_id, 1, "note", REVIEWER,
              accidental=False)


def test_someone_elses_assignment_is_not_found(d: Desk) -> None:
    _, assignment_id, _ = _assigned(d)
    d.refused("ASSIGNMENT_NOT_FOUND", d.grants.issue, d.session(OTHER), assignment_id, OTHER)


def test_flagging_voids_the_clips_outstanding_grants(d: Desk) -> None:
    token, assignment_id, review_clip_id = _assigned(d)
    grant, _, _ = d.grants.issue(token, assignment_id, REVIEWER)
    d.escalations.flag(token, assignment_id, 2, "distress", REVIEWER, accidental=False)
    d.refused("GRANT_REVOKED", d.grants.redeem, token, grant, review_clip_id, REVIEWER)


def test_an_accidental_activation_leaves_review_and_expires_at_once(d: Desk) -> None:
    token, assignment_id, _ = _assigned(d)
    d.escalations.flag(token, assignment_id, 4, "", REVIEWER, accidental=True)
    assert d.store.queue_depth() == 0 and d.store.t.clips["c_1"].expires_at <= d.clock.now()


def test_completing_voids_the_assignments_grants(d: Desk) -> None:
    token, assignment_id, review_clip_id = _assigned(d)
    grant, _, _ = d.grants.issue(token, assignment_id, REVIEWER)
    d.assignments.complete(token, assignment_id, b"sealed label", REVIEWER)
    d.refused("GRANT_REVOKED", d.grants.redeem, token, grant, review_clip_id, REVIEWER)
    d.refused("ASSIGNMENT_COMPLETED", d.assignments.complete, token, assignment_id, b"again", REVIEWER)


# -- escalations -------------------------------------------------------------------------------------
def test_an_unknown_escalation_is_refused_with_a_fixed_reason_and_no_request_text(d: Desk) -> None:
    d.refused("ESCALATION_NOT_FOUND", d.escalations.resolve, "esc_nope", "secret words", Actor(id="s", role="safety"))
    assert all("secret" not in str(r) for r in d.ledger.entries)


def test_a_note_is_on_record_before_it_is_listed_and_an_escalation_resolves_once(d: Desk) -> None:
    token, assignment_id, _ = _assigned(d)
    escalation_id = d.escalations.flag(token, assignment_id, 1, "he said a name", REVIEWER, accidental=False)
    safety = Actor(id="p_safety", role="safety")
    [(row, note)] = d.escalations.list(include_resolved=False, after="", limit=10, actor=safety)
    assert note == "he said a name" and entries(d.ledger)[-1] == ("escalation.read", "")
    d.escalations.resolve(escalation_id, "referred", safety)
    assert d.store.t.escalations[escalation_id].resolution_ct not in (None, b"referred")  # sealed
    d.refused("ESCALATION_RESOLVED", d.escalations.resolve, escalation_id, "again", safety)


def test_a_unit_that_fails_for_any_other_reason_leaves_nothing_behind(d: Desk) -> None:
    token, assignment_id, _ = _assigned(d)
    before = copy.deepcopy(d.store.t)
    d.store.add_grant = None  # type: ignore[assignment,method-assign]  # a bug half-way through the unit
    with pytest.raises(TypeError):
        d.grants.issue(token, assignment_id, REVIEWER)
    assert d.store.t == before and entries(d.ledger)[-1][0] != "grant.issue"
    assert isinstance(d.store, MemoryReviewStore)
