"""The review desk: the concepts of human review behind one front for the servicers.

Each RPC is one call here and one unit of work below it (sessions, assignments,
grants, escalations, enrolment); the desk only adds what joins two concepts:
sealing a label under the clip's key, and streaming audio after a redemption.
"""

from __future__ import annotations

from collections.abc import Iterator

from clipstore.audio.errors import AudioTooLong, UnsupportedAudio
from clipstore.audio.fetch import FetchPlan
from clipstore.clipkey import Purpose
from clipstore.clips import ClipLibrary, key_failure
from clipstore.errors import ClipstoreError, EnvelopeError, FailedPrecondition
from clipstore.logs import get_logger
from clipstore.review.assignments import Assignments, assigned_clip
from clipstore.review.escalations import Escalations
from clipstore.review.policy import ReviewPolicy
from clipstore.review.ports import ReviewPorts
from clipstore.review.redeem import Grants
from clipstore.review.sessions import Sessions
from clipstore.rows import AssignmentRow, ClipRow, EscalationRow, QueuedClip
from clipstore.unit import Actor, AuditTrail
from kms import KmsError

log = get_logger("clipstore.review")


class ReviewDesk:
    def __init__(self, *, ports: ReviewPorts, sessions: Sessions, assignments: Assignments, grants: Grants,
                 escalations: Escalations, clips: ClipLibrary, audit: AuditTrail,
                 policy: ReviewPolicy) -> None:
        self.sessions, self.assignments, self.grants = sessions, assignments, grants
        self.escalations = escalations
        self._ports, self._clips, self._audit, self.policy = ports, clips, audit, policy

    # -- sessions ------------------------------------------------------------
    def start_session(self, code: str, actor: Actor) -> tuple[str, float]:
        return self.sessions.start(code, actor)

    def end_session(self, token: str, actor: Actor) -> None:
        self.sessions.end(token, actor)

    # -- assignments -----------------------------------------------------------
    def next_assignment(self, token: str, locale: str, actor: Actor) -> tuple[AssignmentRow, QueuedClip]:
        return self.assignments.next(token, locale, actor)

    def queue_depth(self) -> int:
        return self.assignments.queue_depth()

    def complete(self, token: str, assignment_id: str, label: str, actor: Actor) -> None:
        clip = assigned_clip(self._ports, assignment_id, actor)
        label_ct = self._clips.key(clip).seal(Purpose.LABEL, assignment_id, label.encode()) if clip else b""
        self.assignments.complete(token, assignment_id, label_ct, actor)

    # -- grants and fetch ----------------------------------------------------------
    def request_grant(self, token: str, assignment_id: str, actor: Actor) -> tuple[str, int, str]:
        return self.grants.issue(token, assignment_id, actor)

    def fetch(self, token: str, grant: str, review_clip_id: str, actor: Actor
              ) -> tuple[str, ClipRow, Iterator[bytes]]:
        review_clip_id, clip, plan = self.grants.redeem(token, grant, review_clip_id, actor)
        return review_clip_id, clip, self._heard(clip, plan, actor)

    def _heard(self, clip: ClipRow, plan: FetchPlan, actor: Actor) -> Iterator[bytes]:
        """The plaintext as the plan transforms it. A clip that should be transformed but does not decode
        fails the stream (audited): the reviewer never gets the undisguised audio instead."""
        try:
            yield from self.grants.audio.apply(plan, clip.content_type, lambda: self._audio(clip, actor),
                                               size_bytes=clip.size_bytes, declared_ms=clip.duration_ms)
        except UnsupportedAudio as exc:
            reason = "AUDIO_LONGER_THAN_STORED" if isinstance(exc, AudioTooLong) else "AUDIO_FORMAT_UNSUPPORTED"
            self._audit.append(actor.record("clip.audio_failure", clip_id=clip.clip_id,
                                            account_ref=clip.account_ref, outcome="failed", reason=reason))
            raise FailedPrecondition(f"the clip's audio could not be transformed ({exc}); skip the clip",
                                     reason=reason) from exc

    def _audio(self, clip: ClipRow, actor: Actor) -> Iterator[bytes]:
        """The clip's plaintext. Its `clip.fetch` entry is already written: a failure from here on is an entry
        too, so the log does not say the clip was heard whole when the reviewer got nothing, or part of it
        (the blob store or key service failed, the object is missing, the account was deleted meanwhile)."""
        try:
            yield from self._clips.audio(clip)
        except EnvelopeError as exc:
            self._audit.append(actor.record("clip.integrity_failure", clip_id=clip.clip_id,
                                            account_ref=clip.account_ref, outcome="failed", reason=exc.tamper))
            raise
        except (ClipstoreError, KmsError) as exc:
            error = key_failure(exc) if isinstance(exc, KmsError) else exc
            try:
                self._audit.append(actor.record("clip.audio_failure", clip_id=clip.clip_id,
                                                account_ref=clip.account_ref, outcome="failed", reason=error.reason))
            except Exception as audit_exc:  # the database may be what failed too: the caller gets the first failure
                log.warning("clip.audio_failure_unrecorded", clip_id=clip.clip_id, exc_type=type(audit_exc).__name__)
            raise

    # -- escalation ------------------------------------------------------------------
    def flag(self, token: str, assignment_id: str, category: int, note: str, actor: Actor, *,
             accidental: bool) -> str:
        return self.escalations.flag(token, assignment_id, category, note, actor, accidental=accidental)

    def list_escalations(self, *, include_resolved: bool, after: str, limit: int,
                         actor: Actor) -> list[tuple[EscalationRow, str]]:
        return self.escalations.list(include_resolved=include_resolved, after=after, limit=limit, actor=actor)

    def resolve_escalation(self, escalation_id: str, resolution: str, actor: Actor) -> tuple[EscalationRow, str]:
        return self.escalations.resolve(escalation_id, resolution, actor)
