"""Escalation instead of a chat room: a reviewer flags a clip to the safety team.

A note, a resolution and a label may quote the speaker, so each is sealed under
the clip's key (and dies with the account); every note that leaves the service
is preceded by an audit entry.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from clipstore.clipkey import ClipKey, Purpose
from clipstore.errors import FailedPrecondition, NotFound
from clipstore.logs import get_logger
from clipstore.review.assignments import assigned_clip, open_assignment
from clipstore.review.policy import ReviewPolicy
from clipstore.review.ports import ReviewPorts
from clipstore.review.sessions import live_session
from clipstore.rows import ClipRow, EscalationRow
from clipstore.unit import Actor, Tx
from kms import AccountKeysDestroyed, KmsAccessDenied, KmsError, KmsUnavailable

NOTE_ERASED = "[note erased: the clip was deleted]"
# The note exists but its key does not open it now (a retired or unknown key version, a wrapped key that does
# not open): never shown as erased, which would be false. An outage of the key service fails the call instead.
NOTE_UNREADABLE = "[note unreadable: its clip's key does not open it; operators: see the logs]"
MARKERS = frozenset({NOTE_ERASED, NOTE_UNREADABLE})
log = get_logger("clipstore.review.escalations")

DataKey = Callable[[ClipRow], ClipKey]


class Escalations:
    def __init__(self, ports: ReviewPorts, *, data_key: DataKey, policy: ReviewPolicy) -> None:
        self._ports, self._data_key, self._policy = ports, data_key, policy

    def flag(self, token: str, assignment_id: str, category: int, note: str, actor: Actor, *,
             accidental: bool) -> str:
        """Send the clip to the safety team: it leaves review at once (out of the queue, its grants void).
        An accidental activation is also purged at the next run."""
        escalation_id = "esc_" + secrets.token_hex(10)
        sealed_for = assigned_clip(self._ports, assignment_id, actor)
        note_ct = self._data_key(sealed_for).seal(Purpose.NOTE, escalation_id, note.encode()) if sealed_for else b""

        def unit(tx: Tx) -> str:
            rows = self._ports.bind(tx)
            live_session(rows, tx, actor, token, "assignment.deny", self._policy)
            assignment = open_assignment(rows, tx, actor, assignment_id, "assignment.deny")
            clip = rows.clip(assignment.clip_id)
            if clip is None or sealed_for is None or sealed_for.clip_id != clip.clip_id:
                raise tx.deny(actor, "assignment.deny", FailedPrecondition("the clip was deleted",
                                                                           reason="CLIP_GONE"))
            # One escalation per assignment: a repeat (a retry whose answer was lost, or a reviewer pressing
            # again) would only fill the safety team's queue with copies of one case.
            flagged = rows.flagged(assignment.review_clip_id, actor.id, assignment.created_at)
            if flagged is not None:
                raise tx.deny(actor, "assignment.deny", FailedPrecondition(
                    f"this assignment was already flagged as escalation {flagged}; nothing more was sent",
                    reason="ALREADY_FLAGGED", metadata={"escalation_id": flagged}), clip_id=clip.clip_id,
                    account_ref=clip.account_ref)
            rows.add_escalation(EscalationRow(
                escalation_id=escalation_id, review_clip_id=assignment.review_clip_id, clip_id=clip.clip_id,
                category=category, note_ct=note_ct, created_at=tx.now, resolved_at=None, resolution_ct=None),
                actor.id)
            # A flagged clip opens nothing more: it is the safety team's now. Out of the queue, so no further
            # grant (this reviewer's included) and no later reviewer once the assignment lapses; grants void.
            rows.withdraw_from_review(clip_id=clip.clip_id)
            tx.audit(actor.record("clip.flag", clip_id=clip.clip_id, account_ref=clip.account_ref,
                                  reason=str(category)))
            if accidental:  # and gone at the next purge
                rows.expire_clip(clip.clip_id, tx.now)
                tx.audit(actor.record("clip.expire", clip_id=clip.clip_id, account_ref=clip.account_ref,
                                      reason="accidental_activation"))
            return escalation_id

        return self._ports.ledger.run(unit)

    def _note(self, row: EscalationRow, clip: ClipRow | None) -> str:
        """The reviewer's note, or a marker once the clip (and with it the note's key) is gone, or when
        its key does not open it. Raises KmsUnavailable (and KmsAccessDenied) while the key service is
        out of reach: the note is unavailable, not erased, and the caller must hear so and retry."""
        if clip is None or not row.note_ct:
            return NOTE_ERASED
        try:
            return self._data_key(clip).open(Purpose.NOTE, row.escalation_id, row.note_ct).decode()
        except AccountKeysDestroyed:  # the account was crypto-shredded: the note is gone for good
            return NOTE_ERASED
        except (KmsUnavailable, KmsAccessDenied):  # the whole key service: UNAVAILABLE, retry
            raise
        except KmsError as exc:  # this note's key only
            log.error("escalation.note_unreadable", escalation_id=row.escalation_id, exc_type=type(exc).__name__)
            return NOTE_UNREADABLE

    def list(self, *, include_resolved: bool, after: str, limit: int,
             actor: Actor) -> list[tuple[EscalationRow, str]]:
        """A page of escalations with their notes; each disclosed note is on record before it leaves."""
        with self._ports.read() as rows:
            page = [(row, rows.clip(row.clip_id))
                    for row in rows.escalations(include_resolved=include_resolved, after=after, limit=limit)]
        notes = [(row, self._note(row, clip), clip) for row, clip in page]
        disclosed = [clip for _, note, clip in notes if clip is not None and note not in MARKERS]
        if disclosed:
            def unit(tx: Tx) -> None:
                for clip in disclosed:
                    tx.audit(actor.record("escalation.read", clip_id=clip.clip_id, account_ref=clip.account_ref))
            self._ports.ledger.run(unit)
        return [(row, note) for row, note, _ in notes]

    def resolve(self, escalation_id: str, resolution: str, actor: Actor) -> tuple[EscalationRow, str]:
        """Close an escalation; the resolution text is sealed under the clip's key (dropped if the clip
        is gone: nothing could protect it). Unknown ids are refused with a fixed reason."""
        with self._ports.read() as rows:
            row = rows.escalation(escalation_id)
            clip = rows.clip(row.clip_id) if row is not None else None
        if row is None:
            self._ports.deny(actor, "escalation.deny", NotFound("no such escalation",
                                                                reason="ESCALATION_NOT_FOUND"))
        resolution_ct = self._data_key(clip).seal(Purpose.RESOLUTION, escalation_id, resolution.encode()) \
            if clip is not None else None

        def unit(tx: Tx) -> EscalationRow:
            rows = self._ports.bind(tx)
            target = {"clip_id": clip.clip_id, "account_ref": clip.account_ref} if clip is not None else {}
            if not rows.resolve(escalation_id, resolution_ct, tx.now):
                raise tx.deny(actor, "escalation.deny", FailedPrecondition(
                    "the escalation is already resolved", reason="ESCALATION_RESOLVED"), **target)
            tx.audit(actor.record("escalation.resolve", **target))
            resolved = rows.escalation(escalation_id)
            assert resolved is not None
            return resolved

        resolved = self._ports.ledger.run(unit)
        return resolved, self._note(resolved, clip)
