"""In-memory fakes of the review ports: the domain's rules run in milliseconds, without SQL or gRPC.

`MemoryReviewStore` keeps the review tables in dicts; `MemoryLedger` runs a unit
of work against it with the real unit semantics: a refusal keeps the unit's
writes and entries, any other failure restores the state as it was.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from clipstore.review.ports import ReviewPorts
from clipstore.rows import (
    AssignmentRow,
    ClipRow,
    EscalationRow,
    GrantRow,
    GrantTarget,
    QueuedClip,
    QueueRow,
    RedeemRows,
    ReviewerRow,
    SessionRow,
)
from clipstore.unit import AuditRecord, Tx
from tests.conftest import FakeClock

T = TypeVar("T")


@dataclasses.dataclass
class _Tables:
    reviewers: dict[str, ReviewerRow] = dataclasses.field(default_factory=dict)
    sessions: dict[bytes, SessionRow] = dataclasses.field(default_factory=dict)
    queue: dict[str, tuple[QueueRow, str | None, float | None]] = dataclasses.field(default_factory=dict)
    assignments: dict[str, AssignmentRow] = dataclasses.field(default_factory=dict)
    labels: dict[str, bytes] = dataclasses.field(default_factory=dict)
    grants: dict[str, GrantRow] = dataclasses.field(default_factory=dict)
    clips: dict[str, ClipRow] = dataclasses.field(default_factory=dict)
    allow_review: dict[str, bool] = dataclasses.field(default_factory=dict)
    disabled: dict[str, bool] = dataclasses.field(default_factory=dict)
    escalations: dict[str, EscalationRow] = dataclasses.field(default_factory=dict)
    escalation_authors: dict[str, str] = dataclasses.field(default_factory=dict)  # escalation id -> created_by


class MemoryReviewStore:
    def __init__(self) -> None:
        self.t = _Tables()

    # -- reviewers
    def reviewer(self, principal_id: str) -> ReviewerRow | None:
        return self.t.reviewers.get(principal_id)

    def accept_step(self, principal_id: str, step: int) -> bool:
        r = self.t.reviewers[principal_id]
        if r.last_totp_step >= step:
            return False
        self.t.reviewers[principal_id] = dataclasses.replace(r, last_totp_step=step, failed_attempts=0, lockouts=0)
        return True

    def count_failure(self, principal_id: str) -> int:
        r = self.t.reviewers[principal_id]
        self.t.reviewers[principal_id] = r = dataclasses.replace(r, failed_attempts=r.failed_attempts + 1)
        return r.failed_attempts

    def lock(self, principal_id: str, until: float) -> None:
        r = self.t.reviewers[principal_id]
        self.t.reviewers[principal_id] = dataclasses.replace(r, locked_until=until, failed_attempts=0,
                                                             lockouts=r.lockouts + 1)

    # -- sessions
    def add_session(self, session_id: str, token_hash: bytes, reviewer_id: str, now: float,
                    expires_at: float) -> None:
        self.t.sessions[token_hash] = SessionRow(session_id=session_id, reviewer_id=reviewer_id,
                                                 expires_at=expires_at, last_seen_at=now, ended=False)

    def session_with_reviewer(self, token_hash: bytes) -> tuple[SessionRow, ReviewerRow | None] | None:
        session = self.t.sessions.get(token_hash)
        return None if session is None else (session, self.t.reviewers.get(session.reviewer_id))

    def touch_session(self, session_id: str, now: float) -> None:
        for k, s in self.t.sessions.items():
            if s.session_id == session_id:
                self.t.sessions[k] = dataclasses.replace(s, last_seen_at=now)

    def end_sessions(self, *, reviewer_id: str | None = None, session_id: str | None = None) -> int:
        ended = 0
        for k, s in self.t.sessions.items():
            if not s.ended and (s.reviewer_id == reviewer_id or s.session_id == session_id):
                self.t.sessions[k] = dataclasses.replace(s, ended=True)
                ended += 1
        return ended

    # -- queue and assignments
    def enqueue(self, clip: ClipRow, review_clip_id: str) -> None:
        """Test setup: a clip row and its queue entry."""
        self.t.clips[clip.clip_id] = clip
        self.t.queue[clip.clip_id] = (QueueRow(clip_id=clip.clip_id, review_clip_id=review_clip_id,
                                               account_ref=clip.account_ref, locale=clip.locale), None, None)

    def _queued(self, clip_id: str) -> QueuedClip | None:
        if clip_id not in self.t.queue:
            return None
        row, clip = self.t.queue[clip_id][0], self.t.clips.get(clip_id)
        return QueuedClip(queue=row, clip_exists=clip is not None, wake_word=bool(clip and clip.wake_word),
                          expires_at=clip.expires_at if clip else 0.0,
                          allow_review=self.t.allow_review.get(row.account_ref, False),
                          duration_ms=clip.duration_ms if clip else 0, content_type=clip.content_type if clip else "")

    def candidates(self, *, now: float, locales: tuple[str, ...], limit: int) -> list[QueuedClip]:
        free = [cid for cid, (row, holder, until) in self.t.queue.items()
                if (holder is None or (until or 0) < now) and (not locales or row.locale in locales)]
        return [q for q in (self._queued(cid) for cid in free[:limit]) if q is not None]

    def claim(self, clip_id: str, assignment: AssignmentRow, now: float) -> bool:
        row, holder, until = self.t.queue[clip_id]
        if holder is not None and (until or 0) >= now:
            return False
        self.t.queue[clip_id] = (row, assignment.assignment_id, assignment.expires_at)
        self.t.assignments[assignment.assignment_id] = assignment
        return True

    def assignments_since(self, reviewer_id: str, since: float) -> int:
        return sum(a.reviewer_id == reviewer_id and a.created_at >= since for a in self.t.assignments.values())

    def assignment(self, assignment_id: str) -> AssignmentRow | None:
        return self.t.assignments.get(assignment_id)

    def grant_target(self, assignment_id: str) -> GrantTarget | None:
        a = self.t.assignments.get(assignment_id)
        if a is None:
            return None
        return GrantTarget(assignment=a, grants=sum(g.assignment_id == assignment_id for g in self.t.grants.values()),
                           queued=self._queued(a.clip_id))

    def complete_open(self, assignment_id: str, reviewer_id: str, label_ct: bytes, now: float) -> str | None:
        a = self.t.assignments.get(assignment_id)
        if a is None or a.reviewer_id != reviewer_id or a.completed_at is not None or a.expires_at <= now:
            return None
        self.t.assignments[assignment_id] = dataclasses.replace(a, completed_at=now)
        self.t.labels[assignment_id] = label_ct
        self.t.queue = {k: v for k, v in self.t.queue.items() if v[1] != assignment_id}
        return a.clip_id

    def queue_depth(self) -> int:
        return len(self.t.queue)

    # -- grants
    def add_grant(self, grant: GrantRow, now: float) -> None:
        self.t.grants[grant.grant_id] = grant

    def redeem_rows(self, grant_id: str, assignment_id: str, principal_id: str) -> RedeemRows:
        grant = self.t.grants.get(grant_id)
        clip = self.t.clips.get(grant.clip_id) if grant is not None else None
        return RedeemRows(reviewer_enabled=principal_id in self.t.disabled and not self.t.disabled[principal_id],
                          grant=grant, clip=clip, assignment_exists=assignment_id in self.t.assignments,
                          account_allows_review=clip is not None and self.t.allow_review.get(clip.account_ref, False))

    def redeem(self, grant_id: str, now: float) -> bool:
        g = self.t.grants.get(grant_id)
        if g is None or g.redeemed_at is not None or g.voided:
            return False
        self.t.grants[grant_id] = dataclasses.replace(g, redeemed_at=now)
        return True

    def void_grants(self, **where: str | None) -> int:
        (field, value), = [(k, v) for k, v in where.items() if v is not None]
        voided = 0
        for k, g in self.t.grants.items():
            if getattr(g, field) == value and g.redeemed_at is None and not g.voided:
                self.t.grants[k] = dataclasses.replace(g, voided=True)
                voided += 1
        return voided

    def withdraw_from_review(self, *, clip_id: str | None = None, account_ref: str | None = None) -> tuple[int, int]:
        gone = [k for k, (row, _, _) in self.t.queue.items() if k == clip_id or row.account_ref == account_ref]
        for k in gone:
            del self.t.queue[k]
        return len(gone), self.void_grants(clip_id=clip_id) if clip_id else self.void_grants(account_ref=account_ref)

    # -- other tables
    def clip(self, clip_id: str) -> ClipRow | None:
        return self.t.clips.get(clip_id)

    def clip_of_assignment(self, assignment_id: str, reviewer_id: str) -> ClipRow | None:
        a = self.t.assignments.get(assignment_id)
        return self.t.clips.get(a.clip_id) if a is not None and a.reviewer_id == reviewer_id else None

    def expire_clip(self, clip_id: str, now: float) -> None:
        c = self.t.clips[clip_id]
        self.t.clips[clip_id] = dataclasses.replace(c, expires_at=min(c.expires_at, now))

    def allows_review(self, account_ref: str) -> bool:
        return self.t.allow_review.get(account_ref, False)

    # -- escalations
    def add_escalation(self, row: EscalationRow, created_by: str) -> None:
        self.t.escalations[row.escalation_id] = row
        self.t.escalation_authors[row.escalation_id] = created_by

    def flagged(self, review_clip_id: str, created_by: str, since: float) -> str | None:
        return next((e.escalation_id for e in sorted(self.t.escalations.values(), key=lambda e: e.created_at)
                     if e.review_clip_id == review_clip_id and e.created_at >= since
                     and self.t.escalation_authors.get(e.escalation_id) == created_by), None)

    def escalation(self, escalation_id: str) -> EscalationRow | None:
        return self.t.escalations.get(escalation_id)

    def escalations(self, *, include_resolved: bool, after: str, limit: int) -> list[EscalationRow]:
        rows = sorted((e for e in self.t.escalations.values()
                       if e.escalation_id > after and (include_resolved or e.resolved_at is None)),
                      key=lambda e: e.escalation_id)
        return rows[:limit]

    def resolve(self, escalation_id: str, resolution_ct: bytes | None, now: float) -> bool:
        e = self.t.escalations.get(escalation_id)
        if e is None or e.resolved_at is not None:
            return False
        self.t.escalations[escalation_id] = dataclasses.replace(e, resolved_at=now, resolution_ct=resolution_ct)
        return True


class MemoryLedger:
    """Runs units one at a time, with the writer's semantics, and keeps the entries they commit."""

    def __init__(self, store: MemoryReviewStore, clock: FakeClock) -> None:
        self.store, self.clock = store, clock
        self.entries: list[AuditRecord] = []

    def run(self, unit: Callable[[Tx], T]) -> T:
        before = copy.deepcopy(self.store.t)
        tx = Tx(None, self.clock.now())  # the fakes never touch a connection
        try:
            value = unit(tx)
        except BaseException as exc:
            if not tx.is_denial(exc):
                self.store.t = before
                raise
            self.entries.extend(tx.records)
            raise
        self.entries.extend(tx.records)
        return value

    def actions(self) -> list[tuple[str, str]]:
        return [(r.action, str(r.reason)) for r in self.entries]


def memory_ports(clock: FakeClock) -> tuple[ReviewPorts, MemoryReviewStore, MemoryLedger]:
    store = MemoryReviewStore()
    ledger = MemoryLedger(store, clock)

    @contextmanager
    def read() -> Iterator[MemoryReviewStore]:
        yield store

    ports = ReviewPorts(ledger=ledger, bind=lambda tx: store, read=read, clock=clock)
    return ports, store, ledger


__all__ = ["MemoryLedger", "MemoryReviewStore", "memory_ports"]
