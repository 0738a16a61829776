"""Assignment, not browsing: a reviewer is handed the next sampled clip, within a daily cap.

Claiming, the cap and the locale check run in one unit of work, so parallel
calls cannot hand out more than the cap or one clip twice.
"""

from __future__ import annotations

import random
import secrets

from clipstore.errors import FailedPrecondition, NotFound, PermissionDenied, ResourceExhausted
from clipstore.review.policy import CANDIDATES_PER_CLAIM, CLAIM_ROUNDS, DAY_S, ReviewPolicy
from clipstore.review.ports import ReviewPorts, ReviewStore
from clipstore.review.sessions import live_session
from clipstore.rows import AssignmentRow, ClipRow, QueuedClip
from clipstore.unit import Actor, Tx


def open_assignment(rows: ReviewStore, tx: Tx, actor: Actor, assignment_id: str, action: str) -> AssignmentRow:
    """Inside a unit: the caller's own assignment, still open and not expired, or a recorded refusal."""
    return check_open(tx, actor, rows.assignment(assignment_id) if assignment_id else None, action)


def check_open(tx: Tx, actor: Actor, assignment: AssignmentRow | None, action: str) -> AssignmentRow:
    """Inside a unit, on the assignment it read: the caller's own, still open and not expired, or a recorded
    refusal. An expired assignment belongs to nobody: its former holder can neither complete nor flag it."""
    if assignment is None or assignment.reviewer_id != actor.id:
        raise tx.deny(actor, action, NotFound("no such assignment for you", reason="ASSIGNMENT_NOT_FOUND"))
    if assignment.completed_at is not None:
        raise tx.deny(actor, action, FailedPrecondition("the assignment is already completed",
                                                        reason="ASSIGNMENT_COMPLETED"))
    if tx.now >= assignment.expires_at:
        raise tx.deny(actor, action, FailedPrecondition("the assignment expired; ask for the next one",
                                                        reason="ASSIGNMENT_EXPIRED"), clip_id=assignment.clip_id)
    return assignment


def assigned_clip(ports: ReviewPorts, assignment_id: str, actor: Actor) -> ClipRow | None:
    """The clip behind the caller's assignment, read ahead of a unit to seal text under its key
    (the unit checks the assignment again)."""
    if not assignment_id:
        return None
    with ports.read() as rows:
        return rows.clip_of_assignment(assignment_id, actor.id)


class Assignments:
    def __init__(self, ports: ReviewPorts, *, policy: ReviewPolicy) -> None:
        self._ports, self._policy = ports, policy

    def next(self, token: str, locale: str, actor: Actor) -> tuple[AssignmentRow, QueuedClip]:
        policy = self._policy

        def unit(tx: Tx) -> tuple[AssignmentRow, QueuedClip]:
            rows = self._ports.bind(tx)
            _, reviewer = live_session(rows, tx, actor, token, "assignment.deny", policy)
            if locale and reviewer.locales and locale not in reviewer.locales:
                raise tx.deny(actor, "assignment.deny", PermissionDenied(
                    "you are not enrolled for that locale; ask for one of yours or leave it empty",
                    reason="LOCALE_NOT_ENROLLED"))
            if rows.assignments_since(actor.id, tx.now - tx.now % DAY_S) >= policy.daily_cap:
                raise tx.deny(actor, "assignment.deny", ResourceExhausted(
                    f"daily cap of {policy.daily_cap} clips reached; it resets at 00:00 UTC", reason="DAILY_CAP"))
            locales = (locale,) if locale else reviewer.locales
            for _ in range(CLAIM_ROUNDS):
                candidates = rows.candidates(now=tx.now, locales=locales, limit=CANDIDATES_PER_CLAIM)
                if not candidates:
                    break
                random.shuffle(candidates)  # replicas on one PostgreSQL rarely race for the same row
                for candidate in candidates:
                    queued = candidate.queue
                    if not candidate.eligible(tx.now):  # opted out, expired or deleted since it was queued
                        rows.withdraw_from_review(clip_id=queued.clip_id)
                        continue
                    assignment = AssignmentRow(
                        assignment_id="as_" + secrets.token_hex(10), clip_id=queued.clip_id,
                        review_clip_id=queued.review_clip_id, reviewer_id=actor.id, created_at=tx.now,
                        expires_at=tx.now + policy.assignment_ttl_s, completed_at=None)
                    if rows.claim(queued.clip_id, assignment, tx.now):
                        tx.audit(actor.record("assignment.issue", clip_id=queued.clip_id,
                                              account_ref=queued.account_ref))
                        return assignment, candidate
            raise tx.refuse(NotFound("no clips are waiting for review; try again later", reason="QUEUE_EMPTY"))

        return self._ports.ledger.run(unit)

    def complete(self, token: str, assignment_id: str, label_ct: bytes, actor: Actor) -> None:
        """Close the assignment with a label sealed under its clip's key; its unredeemed grants go void."""
        def unit(tx: Tx) -> None:
            rows = self._ports.bind(tx)
            live_session(rows, tx, actor, token, "assignment.deny", self._policy)
            # the checks of open_assignment as one conditional write; it is asked why only when that fails
            clip_id = rows.complete_open(assignment_id, actor.id, label_ct, tx.now) if assignment_id else None
            if clip_id is None:
                open_assignment(rows, tx, actor, assignment_id, "assignment.deny")
                raise AssertionError("an open assignment of the caller was not completed")
            rows.void_grants(assignment_id=assignment_id)  # a closed assignment opens nothing more
            tx.audit(actor.record("assignment.complete", clip_id=clip_id))
        self._ports.ledger.run(unit)

    def queue_depth(self) -> int:
        with self._ports.read() as rows:
            return rows.queue_depth()
