"""Issuing a grant, and redeeming one: the steps of docs/grant-format.md.

`check_redeem` is pure: given the claims and a snapshot of what the database
says, read in the redeeming unit of work, it raises the first failing step.
Steps 1 (session), 7 (single use) and 8 (the fetch entry) need the database
and live in `Grants.redeem`.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clipstore.audio.fetch import FetchAudio, FetchPlan
from clipstore.errors import FailedPrecondition, PermissionDenied, ResourceExhausted
from clipstore.grants import GrantClaims, check_grant_time, decode_grant, encode_grant
from clipstore.review.assignments import check_open
from clipstore.review.policy import MAX_GRANTS_PER_ASSIGNMENT, ReviewPolicy
from clipstore.review.ports import ReviewPorts, ReviewStore
from clipstore.review.sessions import live_session
from clipstore.rows import ClipRow, GrantRow, WatermarkRow
from clipstore.unit import Actor, Tx

WATERMARK_ID_DRAWS = 4


@dataclass(frozen=True, kw_only=True)
class RedeemState:
    """What the database says at redemption, read in the redeeming transaction."""

    caller_id: str
    session_id: str  # the caller's live session
    review_clip_id: str  # what the caller asks to hear
    reviewer_enabled: bool
    grant: GrantRow | None
    clip: ClipRow | None
    assignment_exists: bool
    account_allows_review: bool


def check_redeem(claims: GrantClaims, state: RedeemState, *, now: float) -> None:
    """Steps 3 to 6 of docs/grant-format.md, in order; raises the first failure."""
    # 3. time
    check_grant_time(claims, now=now)
    # 4. binding: the caller, the session, the clip asked for
    if claims.reviewer_id != state.caller_id:
        raise PermissionDenied("this grant was issued to another reviewer", reason="GRANT_WRONG_REVIEWER")
    if claims.session_id != state.session_id:
        raise PermissionDenied("this grant belongs to another session", reason="GRANT_WRONG_SESSION")
    if claims.review_clip_id != state.review_clip_id:
        raise PermissionDenied("this grant is for another clip", reason="GRANT_WRONG_CLIP")
    # 5. still live: the reviewer is enabled, the grant not voided (disable, opt-out, flag, session end)
    if not state.reviewer_enabled:
        raise PermissionDenied("reviewer is disabled", reason="REVIEWER_DISABLED")
    if state.grant is None or state.grant.voided:
        raise PermissionDenied("the grant was revoked; request a new one", reason="GRANT_REVOKED")
    # 6. the clip may still be heard: not deleted or expired, the account still allows review
    if state.clip is None or state.clip.expires_at <= now or not state.assignment_exists:
        raise FailedPrecondition("the clip was deleted or expired", reason="CLIP_GONE")
    if not state.account_allows_review:
        raise PermissionDenied("the account no longer allows human review", reason="ACCOUNT_OPTED_OUT")


class Grants:
    def __init__(self, ports: ReviewPorts, *, key: Ed25519PrivateKey, policy: ReviewPolicy,
                 audio: FetchAudio | None = None) -> None:
        self._ports, self._key, self._policy = ports, key, policy
        self.audio = audio or FetchAudio()
        self._public = key.public_key()

    def issue(self, token: str, assignment_id: str, actor: Actor) -> tuple[str, int, str]:
        """A signed single-use grant for the caller's open assignment: (grant, expires_at, review_clip_id).
        The unit records the grant; it is signed after, off the writer thread (it is usable only once its
        row is committed anyway)."""
        policy = self._policy

        def unit(tx: Tx) -> GrantClaims:
            rows = self._ports.bind(tx)
            session, _ = live_session(rows, tx, actor, token, "grant.deny", policy)
            target = rows.grant_target(assignment_id) if assignment_id else None
            assignment = check_open(tx, actor, target.assignment if target is not None else None, "grant.deny")
            assert target is not None
            if target.grants >= MAX_GRANTS_PER_ASSIGNMENT:
                raise tx.deny(actor, "grant.deny", ResourceExhausted(
                    f"this assignment already had {MAX_GRANTS_PER_ASSIGNMENT} grants; complete or flag it",
                    reason="GRANT_LIMIT"), clip_id=assignment.clip_id)
            queued = target.queued
            if queued is None or not queued.eligible(tx.now):
                raise tx.deny(actor, "grant.deny", FailedPrecondition(
                    "the clip is no longer available for review", reason="CLIP_UNAVAILABLE"),
                    clip_id=assignment.clip_id)
            issued = int(tx.now)
            # Never past the assignment: once it lapses the clip may go to another reviewer, and its former
            # holder may no longer complete or flag it, nor hear it.
            expires = min(issued + policy.grant_ttl_s, math.floor(assignment.expires_at))
            if expires <= issued:
                raise tx.deny(actor, "grant.deny", FailedPrecondition(
                    "the assignment expires within the second; ask for the next one", reason="ASSIGNMENT_EXPIRED"),
                    clip_id=assignment.clip_id)
            claims = GrantClaims(grant_id="g_" + secrets.token_hex(12), reviewer_id=actor.id,
                                 session_id=session.session_id, assignment_id=assignment_id,
                                 review_clip_id=assignment.review_clip_id, issued_at=issued, expires_at=expires)
            rows.add_grant(GrantRow(grant_id=claims.grant_id, reviewer_id=actor.id, session_id=session.session_id,
                                    assignment_id=assignment_id, clip_id=assignment.clip_id,
                                    account_ref=queued.queue.account_ref, expires_at=claims.expires_at,
                                    redeemed_at=None, voided=False), tx.now)
            tx.audit(actor.record("grant.issue", clip_id=assignment.clip_id, account_ref=queued.queue.account_ref))
            return claims

        claims = self._ports.ledger.run(unit)
        return encode_grant(claims, self._key), claims.expires_at, claims.review_clip_id

    def _plan(self, rows: ReviewStore, clip: ClipRow, grant_id: str, actor: Actor) -> FetchPlan:
        """The fetch's plan; a watermark id already given to another fetch (random 40 bits: a birthday
        collision is likely after about a million fetches) is drawn again."""
        for _ in range(WATERMARK_ID_DRAWS):
            plan = self.audio.plan(locale=clip.locale, content_type=clip.content_type, grant_id=grant_id,
                                   reviewer_id=actor.id)
            if plan.watermark is None or rows.watermark(plan.watermark.watermark_id) is None:
                return plan
        raise RuntimeError(f"{WATERMARK_ID_DRAWS} watermark ids in a row were taken: is the id source random?")

    def redeem(self, token: str, grant: str, review_clip_id: str, actor: Actor) -> tuple[str, ClipRow, FetchPlan]:
        """Every check, the single-use redemption and the durable `clip.fetch` entry, in one unit;
        returns (review_clip_id, clip, what the fetch does to the audio). Only then may audio flow."""
        policy = self._policy
        # 2. form and signature: a pure check, made before the unit (off the writer thread); its outcome is
        # acted on in the unit, in its place after step 1
        claims: GrantClaims | None = None
        malformed: PermissionDenied | FailedPrecondition | None = None
        try:
            claims = decode_grant(grant, self._public)
        except (PermissionDenied, FailedPrecondition) as refused:
            # Kept past its except block, its traceback would hold this frame, which holds it: a cycle that
            # kept the caller's gRPC call (and its HTTP/2 stream) alive until the collector ran, whenever
            # the unit refused for another reason first (an unknown session with a malformed grant).
            malformed = refused.with_traceback(None)

        def unit(tx: Tx) -> tuple[str, ClipRow, FetchPlan]:
            rows = self._ports.bind(tx)
            # 1. a live session of the caller, the reviewer not locked
            session, _ = live_session(rows, tx, actor, token, "grant.deny", policy)
            if claims is None:  # 2.
                assert malformed is not None
                raise tx.deny(actor, "grant.deny", malformed)
            # 3.–6., on one joined read
            read = rows.redeem_rows(claims.grant_id, claims.assignment_id, actor.id)
            clip = read.clip
            try:
                check_redeem(claims, RedeemState(
                    caller_id=actor.id, session_id=session.session_id, review_clip_id=review_clip_id,
                    reviewer_enabled=read.reviewer_enabled, grant=read.grant, clip=clip,
                    assignment_exists=read.assignment_exists, account_allows_review=read.account_allows_review),
                    now=tx.now)
            except (PermissionDenied, FailedPrecondition) as refused:
                target = {"clip_id": clip.clip_id, "account_ref": clip.account_ref} if clip is not None else {}
                raise tx.deny(actor, "grant.deny", refused, **target) from None
            assert clip is not None
            # what the reviewer will hear: disguise and watermark, or a refusal if a transform is required
            try:
                plan = self._plan(rows, clip, claims.grant_id, actor)
            except FailedPrecondition as refused:
                raise tx.deny(actor, "grant.deny", refused, clip_id=clip.clip_id,
                              account_ref=clip.account_ref) from None
            # 7. single use, atomically
            if not rows.redeem(claims.grant_id, tx.now):
                raise tx.deny(actor, "grant.deny", PermissionDenied(
                    "the grant was already used; request a new one", reason="GRANT_REPLAYED"),
                    clip_id=clip.clip_id, account_ref=clip.account_ref)
            # 8. the fetch is on record, committed with the redemption, before the first byte leaves
            if plan.watermark is not None:  # the mark's id names this fetch (clipstore forensics identify)
                rows.add_watermark(WatermarkRow(watermark_id=plan.watermark.watermark_id, grant_id=claims.grant_id,
                                                reviewer_id=actor.id, clip_id=clip.clip_id,
                                                review_clip_id=claims.review_clip_id, fetched_at=tx.now))
            tx.audit(actor.record("clip.fetch", clip_id=clip.clip_id, account_ref=clip.account_ref,
                                  **plan.audit_fields()))
            return claims.review_clip_id, clip, plan

        return self._ports.ledger.run(unit)
