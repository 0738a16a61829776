"""The review desk: MFA sessions, assignments, grants, fetch, escalation.

A reviewer never searches or browses: they are handed the next sampled clip,
get a short-lived single-use grant for it, and hear it under a pseudonymous
id. Every denial is audited with its own reason.
"""

from __future__ import annotations

import hashlib
import random
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clipstore.audit import Actor, AuditLog
from clipstore.auth import create_principal
from clipstore.clips import ClipLibrary
from clipstore.clock import Clock
from clipstore.errors import (
    ClipstoreError,
    EnvelopeError,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from clipstore.grants import DEFAULT_GRANT_TTL_S, GrantClaims, check_grant_time, decode_grant, encode_grant
from clipstore.identity import open_note, seal_note
from clipstore.store.clips import AccountRepository, ClipRow
from clipstore.store.principals import Principal, PrincipalRepository
from clipstore.store.review import AssignmentRow, EscalationRow, GrantRow, QueueRow, ReviewRepository, SessionRow
from clipstore.totp import matching_step, new_secret, provisioning_uri, secret_base32
from kms import KeyProvider, KmsError

DAY_S = 86400
MAX_GRANTS_PER_ASSIGNMENT = 3  # a reviewer may replay a clip a little, not pass it around
NOTE_ERASED = "[note erased: the clip was deleted]"
CANDIDATES_PER_CLAIM = 20
CLAIM_ROUNDS = 5
SESSION_TOUCH_S = 60.0  # idle time is tracked to the minute: most RPCs need not write


@dataclass(frozen=True, kw_only=True)
class ReviewPolicy:
    session_lifetime_s: float = 8 * 3600
    session_idle_s: float = 30 * 60
    max_failed_codes: int = 5
    lockout_s: float = 15 * 60
    daily_cap: int = 1000
    assignment_ttl_s: float = 10 * 60
    grant_ttl_s: int = DEFAULT_GRANT_TTL_S


@dataclass(frozen=True, kw_only=True)
class Enrolment:
    principal: Principal
    api_key: str
    totp_secret: str
    provisioning_uri: str


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _totp_context(principal_id: str) -> dict[str, str]:
    return {"purpose": "reviewer-totp", "principal_id": principal_id}


class ReviewDesk:
    def __init__(self, *, repo: ReviewRepository, principals: PrincipalRepository, accounts: AccountRepository,
                 clips: ClipLibrary, audit: AuditLog, clock: Clock, root: KeyProvider,
                 grant_key: Ed25519PrivateKey, policy: ReviewPolicy) -> None:
        self._repo, self._principals, self._accounts, self._clips = repo, principals, accounts, clips
        self._audit, self._clock, self._root, self._grant_key = audit, clock, root, grant_key
        self._grant_public = grant_key.public_key()
        self.policy = policy

    def _deny(self, actor: Actor, action: str, error: ClipstoreError, **target: str) -> ClipstoreError:
        """Audit a refusal (durably) and return the error to raise."""
        self._audit.append(actor.record(action, outcome="denied", reason=error.reason, **target))
        return error

    # -- enrolment -----------------------------------------------------------
    def enroll(self, name: str, locales: tuple[str, ...], actor: Actor) -> Enrolment:
        principal, api_key = create_principal(self._principals, self._audit, role="reviewer", name=name,
                                              actor=actor)
        secret = new_secret()
        self._audit.append(actor.record("reviewer.enroll", principal_id=principal.id))
        self._repo.add_reviewer(principal.id, locales, self._root.encrypt(secret, _totp_context(principal.id)),
                                self._clock.now())
        return Enrolment(principal=principal, api_key=api_key, totp_secret=secret_base32(secret),
                         provisioning_uri=provisioning_uri(secret, account_name=f"{name} ({principal.id})"))

    # -- sessions --------------------------------------------------------------
    def start_session(self, code: str, actor: Actor) -> tuple[str, float]:
        now = self._clock.now()
        reviewer = self._repo.reviewer(actor.id)
        if reviewer is None:
            raise self._deny(actor, "session.deny", PermissionDenied(
                "this principal is not an enrolled reviewer", reason="NOT_ENROLLED"))
        if reviewer.locked_until > now:
            raise self._deny(actor, "session.deny", PermissionDenied(
                f"reviewer is locked for another {reviewer.locked_until - now:.0f} s after repeated wrong codes",
                reason="REVIEWER_LOCKED"))
        secret = self._root.decrypt(reviewer.wrapped_totp_secret, _totp_context(actor.id))
        step = matching_step(secret, code, now=now)
        if step is None or not self._repo.accept_step(actor.id, step):
            reason = "BAD_CODE" if step is None else "REPLAYED_CODE"
            if self._repo.record_failure(actor.id, max_failures=self.policy.max_failed_codes,
                                         lock_until=now + self.policy.lockout_s):
                self._audit.append(actor.record("reviewer.lockout", principal_id=actor.id,
                                                reason=f"{self.policy.max_failed_codes} failed codes"))
            raise self._deny(actor, "session.deny", Unauthenticated(
                "the code is wrong or was already used; wait for the next code", reason=reason))
        token, session_id = secrets.token_urlsafe(32), "s_" + secrets.token_hex(10)
        expires = now + self.policy.session_lifetime_s
        self._audit.append(actor.record("session.start", principal_id=actor.id))
        self._repo.add_session(session_id, _hash(token), actor.id, now, expires)
        return token, expires

    def _session(self, token: str, actor: Actor, action: str) -> SessionRow:
        now = self._clock.now()
        session = self._repo.session_by_token(_hash(token)) if token else None
        problem = None
        if session is None or session.reviewer_id != actor.id:
            problem = ("SESSION_UNKNOWN", "no such session; start one with a TOTP code")
        elif session.ended:
            problem = ("SESSION_ENDED", "the session has ended; start a new one")
        elif now >= session.expires_at:
            problem = ("SESSION_EXPIRED", "the session reached its lifetime; start a new one")
        elif now - session.last_seen_at >= self.policy.session_idle_s:
            problem = ("SESSION_IDLE", "the session was idle too long; start a new one")
        if problem is not None:
            raise self._deny(actor, action, Unauthenticated(problem[1], reason=problem[0]))
        assert session is not None
        reviewer = self._repo.reviewer(actor.id)
        if reviewer is not None and reviewer.locked_until > now:
            raise self._deny(actor, action, PermissionDenied("reviewer is locked", reason="REVIEWER_LOCKED"))
        if now - session.last_seen_at >= SESSION_TOUCH_S:
            self._repo.touch_session(session.session_id, now)
        return session

    def end_session(self, token: str, actor: Actor) -> None:
        session = self._session(token, actor, "session.deny")
        self._audit.append(actor.record("session.end", principal_id=actor.id))
        self._repo.end_sessions(session_id=session.session_id)
        self._repo.void_grants(session_id=session.session_id)

    # -- assignments -------------------------------------------------------------
    def next_assignment(self, token: str, locale: str, actor: Actor) -> tuple[AssignmentRow, ClipRow]:
        self._session(token, actor, "assignment.deny")
        now = self._clock.now()
        day_start = now - now % DAY_S
        if self._repo.assignments_since(actor.id, day_start) >= self.policy.daily_cap:
            raise self._deny(actor, "assignment.deny", ResourceExhausted(
                f"daily cap of {self.policy.daily_cap} clips reached; it resets at 00:00 UTC"))
        reviewer = self._repo.reviewer(actor.id)
        locales = (locale,) if locale else (reviewer.locales if reviewer else ())
        for _ in range(CLAIM_ROUNDS):
            candidates = self._repo.candidates(now=now, locales=locales, limit=CANDIDATES_PER_CLAIM)
            if not candidates:
                break
            random.shuffle(candidates)  # concurrent reviewers then rarely race for the same row
            for candidate in candidates:
                clip = self._eligible_clip(candidate, now)
                if clip is None:
                    self._repo.dequeue(clip_id=candidate.clip_id)  # opted out, expired or deleted since queued
                    continue
                assignment = AssignmentRow(assignment_id="as_" + secrets.token_hex(10), clip_id=clip.clip_id,
                                           review_clip_id=candidate.review_clip_id, reviewer_id=actor.id,
                                           created_at=now, expires_at=now + self.policy.assignment_ttl_s,
                                           completed_at=None)
                if not self._repo.claim(candidate.clip_id, assignment, now):
                    continue
                try:  # on record before the reviewer learns of it
                    self._audit.append(actor.record("assignment.issue", clip_id=clip.clip_id,
                                                    account_ref=clip.account_ref))
                except Exception:
                    self._repo.release(assignment.assignment_id)
                    raise
                return assignment, clip
        raise NotFound("no clips are waiting for review; try again later", reason="QUEUE_EMPTY")

    def queue_depth(self) -> int:
        return self._repo.queue_depth()

    def _eligible_clip(self, queued: QueueRow, now: float) -> ClipRow | None:
        account = self._accounts.get(queued.account_ref)
        if account is None or not account.allow_review:
            return None
        clip = self._clips.find(queued.clip_id)
        if clip is None or clip.expires_at <= now or not clip.wake_word:
            return None
        return clip

    def _assignment(self, token: str, assignment_id: str, actor: Actor, action: str
                    ) -> tuple[SessionRow, AssignmentRow]:
        session = self._session(token, actor, action)
        assignment = self._repo.assignment(assignment_id) if assignment_id else None
        if assignment is None or assignment.reviewer_id != actor.id:
            raise self._deny(actor, action, NotFound("no such assignment for you", reason="ASSIGNMENT_NOT_FOUND"))
        if assignment.completed_at is not None:
            raise self._deny(actor, action, FailedPrecondition("the assignment is already completed",
                                                               reason="ASSIGNMENT_COMPLETED"))
        return session, assignment

    # -- grants and fetch ------------------------------------------------------------
    def request_grant(self, token: str, assignment_id: str, actor: Actor) -> tuple[str, int, str]:
        session, assignment = self._assignment(token, assignment_id, actor, "grant.deny")
        now = self._clock.now()
        if now >= assignment.expires_at:
            raise self._deny(actor, "grant.deny", FailedPrecondition(
                "the assignment expired; ask for the next one", reason="ASSIGNMENT_EXPIRED"))
        if self._repo.grants_for(assignment.assignment_id) >= MAX_GRANTS_PER_ASSIGNMENT:
            raise self._deny(actor, "grant.deny", ResourceExhausted(
                f"this assignment already had {MAX_GRANTS_PER_ASSIGNMENT} grants; complete or flag it",
                reason="GRANT_LIMIT"))
        queued = self._repo.queued(assignment.clip_id)
        clip = self._eligible_clip(queued, now) if queued else None
        if clip is None:
            raise self._deny(actor, "grant.deny", FailedPrecondition(
                "the clip is no longer available for review", reason="CLIP_UNAVAILABLE"))
        issued = int(now)
        claims = GrantClaims(grant_id="g_" + secrets.token_hex(12), reviewer_id=actor.id,
                             session_id=session.session_id, assignment_id=assignment.assignment_id,
                             review_clip_id=assignment.review_clip_id, issued_at=issued,
                             expires_at=issued + self.policy.grant_ttl_s)
        self._audit.append(actor.record("grant.issue", clip_id=clip.clip_id, account_ref=clip.account_ref))
        self._repo.add_grant(GrantRow(grant_id=claims.grant_id, reviewer_id=actor.id, session_id=session.session_id,
                                      assignment_id=assignment.assignment_id, clip_id=clip.clip_id,
                                      account_ref=clip.account_ref, expires_at=claims.expires_at,
                                      redeemed_at=None, voided=False), now)
        return encode_grant(claims, self._grant_key), claims.expires_at, assignment.review_clip_id

    def fetch(self, token: str, grant: str, review_clip_id: str, actor: Actor) -> tuple[AssignmentRow, ClipRow,
                                                                                       Iterator[bytes]]:
        """Every check, then the single-use redemption, then a durable audit entry; only then audio."""
        session = self._session(token, actor, "grant.deny")
        now = self._clock.now()

        def deny(error: ClipstoreError, clip: ClipRow | None = None) -> ClipstoreError:
            target = {"clip_id": clip.clip_id, "account_ref": clip.account_ref} if clip else {}
            return self._deny(actor, "grant.deny", error, **target)

        # 1. signature and form; 2. time
        try:
            claims = decode_grant(grant, self._grant_public)
            check_grant_time(claims, now=now)
        except PermissionDenied as exc:
            raise deny(exc) from None
        # 3. bound to this reviewer, this session, this clip
        if claims.reviewer_id != actor.id:
            raise deny(PermissionDenied("this grant was issued to another reviewer", reason="GRANT_WRONG_REVIEWER"))
        if claims.session_id != session.session_id:
            raise deny(PermissionDenied("this grant belongs to another session", reason="GRANT_WRONG_SESSION"))
        if claims.review_clip_id != review_clip_id:
            raise deny(PermissionDenied("this grant is for another clip", reason="GRANT_WRONG_CLIP"))
        # 4. still live: not voided (disable, opt-out, session end), reviewer enabled
        row = self._repo.grant(claims.grant_id)
        principal = self._principals.get(actor.id)
        if principal is None or principal.disabled:
            raise deny(PermissionDenied("reviewer is disabled", reason="REVIEWER_DISABLED"))
        if row is None or row.voided:
            raise deny(PermissionDenied("the grant was revoked; request a new one", reason="GRANT_REVOKED"))
        # 5. the clip may still be heard: exists, not expired, account still allows review
        assignment = self._repo.assignment(claims.assignment_id)
        clip = self._clips.find(row.clip_id)
        if clip is None or clip.expires_at <= now or assignment is None:
            raise deny(FailedPrecondition("the clip was deleted or expired", reason="CLIP_GONE"))
        account = self._accounts.get(clip.account_ref)
        if account is None or not account.allow_review:
            raise deny(PermissionDenied("the account no longer allows human review", reason="ACCOUNT_OPTED_OUT"),
                       clip)
        # 6. single use, atomically
        if not self._repo.redeem(claims.grant_id, now):
            raise deny(PermissionDenied("the grant was already used; request a new one", reason="GRANT_REPLAYED"),
                       clip)
        # 7. the fetch is on record before the first byte leaves
        self._audit.append(actor.record("clip.fetch", clip_id=clip.clip_id, account_ref=clip.account_ref))
        return assignment, clip, self._audio(clip, actor)

    def _audio(self, clip: ClipRow, actor: Actor) -> Iterator[bytes]:
        try:
            yield from self._clips.audio(clip)
        except EnvelopeError as exc:
            self._audit.append(actor.record("clip.integrity_failure", clip_id=clip.clip_id,
                                            account_ref=clip.account_ref, outcome="failed", reason=exc.tamper))
            raise

    # -- closing and escalation ---------------------------------------------------------
    def complete(self, token: str, assignment_id: str, label: str, actor: Actor) -> None:
        _, assignment = self._assignment(token, assignment_id, actor, "assignment.deny")
        self._audit.append(actor.record("assignment.complete", clip_id=assignment.clip_id))
        self._repo.complete(assignment_id, label, self._clock.now())
        self._repo.void_grants(clip_id=assignment.clip_id)  # a closed assignment opens nothing more

    def flag(self, token: str, assignment_id: str, category: int, note: str, actor: Actor,
             *, accidental: bool) -> str:
        _, assignment = self._assignment(token, assignment_id, actor, "assignment.deny")
        escalation_id = "esc_" + secrets.token_hex(10)
        clip = self._clips.find(assignment.clip_id)
        if clip is None:
            raise self._deny(actor, "assignment.deny", FailedPrecondition("the clip was deleted", reason="CLIP_GONE"))
        self._audit.append(actor.record("clip.flag", clip_id=assignment.clip_id, reason=str(category)))
        self._repo.add_escalation(EscalationRow(
            escalation_id=escalation_id, review_clip_id=assignment.review_clip_id, clip_id=assignment.clip_id,
            category=category, note_ct=seal_note(self._clips.dek(clip), escalation_id, note),
            created_at=self._clock.now(), resolved_at=None), actor.id)
        if accidental:  # never reviewable, and gone at the next purge
            self._clips.expire_now(assignment.clip_id, actor)
        return escalation_id

    def list_escalations(self, *, include_resolved: bool, after: str, limit: int) -> list[tuple[EscalationRow, str]]:
        rows = self._repo.escalations(include_resolved=include_resolved, after=after, limit=limit)
        return [(row, self.note(row)) for row in rows]

    def note(self, row: EscalationRow) -> str:
        """The reviewer's note, or a marker once the clip (and with it the note's key) is gone."""
        clip = self._clips.find(row.clip_id)
        if clip is None:
            return NOTE_ERASED
        try:
            return open_note(self._clips.dek(clip), row.escalation_id, row.note_ct)
        except KmsError:  # the account was crypto-shredded
            return NOTE_ERASED

    def resolve_escalation(self, escalation_id: str, resolution: str, actor: Actor) -> EscalationRow:
        self._audit.append(actor.record("escalation.resolve", reason=escalation_id))
        row = self._repo.resolve(escalation_id, resolution, self._clock.now())
        if row is None:
            raise NotFound(f"no escalation {escalation_id}", reason="ESCALATION_NOT_FOUND")
        return row

