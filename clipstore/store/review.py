"""Rows of the review workflow: reviewers, sessions, queue, assignments, grants, escalations.

Every state change that must happen once (a TOTP step, a queue claim, a grant
redemption) is one conditional UPDATE whose row count says who won.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from clipstore.store import schema
from clipstore.store.db import Database


@dataclass(frozen=True, kw_only=True)
class ReviewerRow:
    principal_id: str
    locales: tuple[str, ...]
    wrapped_totp_secret: bytes
    last_totp_step: int
    failed_attempts: int
    locked_until: float


@dataclass(frozen=True, kw_only=True)
class SessionRow:
    session_id: str
    reviewer_id: str
    expires_at: float
    last_seen_at: float
    ended: bool


@dataclass(frozen=True, kw_only=True)
class QueueRow:
    clip_id: str
    review_clip_id: str
    account_ref: str
    locale: str


@dataclass(frozen=True, kw_only=True)
class AssignmentRow:
    assignment_id: str
    clip_id: str
    review_clip_id: str
    reviewer_id: str
    created_at: float
    expires_at: float
    completed_at: float | None


@dataclass(frozen=True, kw_only=True)
class GrantRow:
    grant_id: str
    reviewer_id: str
    session_id: str
    assignment_id: str
    clip_id: str
    account_ref: str
    expires_at: float
    redeemed_at: float | None
    voided: bool


@dataclass(frozen=True, kw_only=True)
class EscalationRow:
    escalation_id: str
    review_clip_id: str
    clip_id: str
    category: int
    note_ct: bytes
    created_at: float
    resolved_at: float | None


def _row(cls: Any, row: Any) -> Any:
    """Build a row dataclass from the columns it declares."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in row._mapping.items() if k in names})


class ReviewRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    def _execute(self, statement: sa.Executable) -> sa.CursorResult[Any]:
        with self._db.transaction() as conn:
            return conn.execute(statement)

    def _first(self, cls: type, statement: sa.Select[Any]) -> Any:
        with self._db.read() as conn:
            row = conn.execute(statement).first()
        return None if row is None else _row(cls, row)

    # -- reviewers -----------------------------------------------------------
    def add_reviewer(self, principal_id: str, locales: tuple[str, ...], wrapped_secret: bytes, now: float) -> None:
        self._execute(schema.reviewers.insert().values(
            principal_id=principal_id, locales=",".join(locales), wrapped_totp_secret=wrapped_secret,
            last_totp_step=-1, failed_attempts=0, locked_until=0.0, created_at=now))

    def reviewer(self, principal_id: str) -> ReviewerRow | None:
        t = schema.reviewers
        with self._db.read() as conn:
            row = conn.execute(sa.select(t).where(t.c.principal_id == principal_id)).first()
        if row is None:
            return None
        return ReviewerRow(principal_id=row.principal_id, locales=tuple(filter(None, row.locales.split(","))),
                           wrapped_totp_secret=bytes(row.wrapped_totp_secret), last_totp_step=row.last_totp_step,
                           failed_attempts=row.failed_attempts, locked_until=row.locked_until)

    def accept_step(self, principal_id: str, step: int) -> bool:
        """Record a TOTP step as used; False if it (or a later one) was used before: a replay."""
        t = schema.reviewers
        return self._execute(t.update().where(t.c.principal_id == principal_id, t.c.last_totp_step < step)
                             .values(last_totp_step=step, failed_attempts=0)).rowcount == 1

    def record_failure(self, principal_id: str, *, max_failures: int, lock_until: float) -> bool:
        """Count a failed code; True when this failure locks the reviewer."""
        t = schema.reviewers
        with self._db.transaction() as conn:
            conn.execute(t.update().where(t.c.principal_id == principal_id)
                         .values(failed_attempts=t.c.failed_attempts + 1))
            failures = conn.scalar(sa.select(t.c.failed_attempts).where(t.c.principal_id == principal_id))
            if failures is not None and failures >= max_failures:
                conn.execute(t.update().where(t.c.principal_id == principal_id)
                             .values(locked_until=lock_until, failed_attempts=0))
                return True
        return False

    # -- sessions ------------------------------------------------------------
    def add_session(self, session_id: str, token_hash: bytes, reviewer_id: str, now: float, expires_at: float) -> None:
        self._execute(schema.review_sessions.insert().values(
            session_id=session_id, token_hash=token_hash, reviewer_id=reviewer_id, created_at=now,
            expires_at=expires_at, last_seen_at=now, ended=False))

    def session_by_token(self, token_hash: bytes) -> SessionRow | None:
        t = schema.review_sessions
        return self._first(SessionRow, sa.select(t).where(t.c.token_hash == token_hash))

    def session(self, session_id: str) -> SessionRow | None:
        t = schema.review_sessions
        return self._first(SessionRow, sa.select(t).where(t.c.session_id == session_id))

    def touch_session(self, session_id: str, now: float) -> None:
        t = schema.review_sessions
        self._execute(t.update().where(t.c.session_id == session_id).values(last_seen_at=now))

    def end_sessions(self, *, reviewer_id: str | None = None, session_id: str | None = None) -> int:
        t = schema.review_sessions
        where = t.c.reviewer_id == reviewer_id if reviewer_id else t.c.session_id == session_id
        return self._execute(t.update().where(where, t.c.ended.is_(False)).values(ended=True)).rowcount

    # -- queue and assignments ------------------------------------------------
    def enqueue(self, clip_id: str, review_clip_id: str, account_ref: str, locale: str, now: float) -> None:
        self._execute(schema.review_queue.insert().values(
            clip_id=clip_id, review_clip_id=review_clip_id, account_ref=account_ref, locale=locale,
            enqueued_at=now))

    def candidates(self, *, now: float, locales: tuple[str, ...], limit: int) -> list[QueueRow]:
        t = schema.review_queue
        q = sa.select(t).where(sa.or_(t.c.assignment_id.is_(None), t.c.assignment_expires_at < now))
        if locales:
            q = q.where(t.c.locale.in_(locales))
        with self._db.read() as conn:
            return [_row(QueueRow, r) for r in conn.execute(q.order_by(t.c.enqueued_at).limit(limit))]

    def claim(self, clip_id: str, assignment: AssignmentRow, now: float) -> bool:
        q = schema.review_queue
        with self._db.transaction() as conn:
            won = conn.execute(q.update().where(
                q.c.clip_id == clip_id, sa.or_(q.c.assignment_id.is_(None), q.c.assignment_expires_at < now))
                .values(assignment_id=assignment.assignment_id,
                        assignment_expires_at=assignment.expires_at)).rowcount == 1
            if won:
                conn.execute(schema.assignments.insert().values(**assignment.__dict__, label=None))
        return won

    def release(self, assignment_id: str) -> None:
        """Undo a claim whose audit entry could not be written."""
        q = schema.review_queue
        with self._db.transaction() as conn:
            conn.execute(q.update().where(q.c.assignment_id == assignment_id)
                         .values(assignment_id=None, assignment_expires_at=None))
            conn.execute(schema.assignments.delete().where(schema.assignments.c.assignment_id == assignment_id))

    def assignments_since(self, reviewer_id: str, since: float) -> int:
        t = schema.assignments
        with self._db.read() as conn:
            return int(conn.scalar(sa.select(sa.func.count()).select_from(t).where(
                t.c.reviewer_id == reviewer_id, t.c.created_at >= since)) or 0)

    def assignment(self, assignment_id: str) -> AssignmentRow | None:
        t = schema.assignments
        return self._first(AssignmentRow, sa.select(t).where(t.c.assignment_id == assignment_id))

    def complete(self, assignment_id: str, label: str, now: float) -> bool:
        t = schema.assignments
        with self._db.transaction() as conn:
            done = conn.execute(t.update().where(t.c.assignment_id == assignment_id, t.c.completed_at.is_(None))
                                .values(completed_at=now, label=label)).rowcount == 1
            if done:
                conn.execute(schema.review_queue.delete().where(
                    schema.review_queue.c.assignment_id == assignment_id))
        return done

    def dequeue(self, *, account_ref: str | None = None, clip_id: str | None = None) -> int:
        q = schema.review_queue
        where = q.c.account_ref == account_ref if account_ref else q.c.clip_id == clip_id
        return self._execute(q.delete().where(where)).rowcount

    def queue_depth(self) -> int:
        with self._db.read() as conn:
            return int(conn.scalar(sa.select(sa.func.count()).select_from(schema.review_queue)) or 0)

    def queued(self, clip_id: str) -> QueueRow | None:
        t = schema.review_queue
        return self._first(QueueRow, sa.select(t).where(t.c.clip_id == clip_id))

    # -- grants ----------------------------------------------------------------
    def add_grant(self, grant: GrantRow, now: float) -> None:
        self._execute(schema.grants.insert().values(**grant.__dict__, issued_at=now))

    def grants_for(self, assignment_id: str) -> int:
        t = schema.grants
        with self._db.read() as conn:
            return int(conn.scalar(sa.select(sa.func.count()).select_from(t)
                                   .where(t.c.assignment_id == assignment_id)) or 0)

    def grant(self, grant_id: str) -> GrantRow | None:
        t = schema.grants
        return self._first(GrantRow, sa.select(t).where(t.c.grant_id == grant_id))

    def redeem(self, grant_id: str, now: float) -> bool:
        """Single use: exactly one caller ever gets True for a grant."""
        t = schema.grants
        return self._execute(t.update().where(t.c.grant_id == grant_id, t.c.redeemed_at.is_(None),
                                              t.c.voided.is_(False)).values(redeemed_at=now)).rowcount == 1

    def void_grants(self, *, reviewer_id: str | None = None, session_id: str | None = None,
                    account_ref: str | None = None, clip_id: str | None = None) -> int:
        t = schema.grants
        conditions = [c for c, v in ((t.c.reviewer_id, reviewer_id), (t.c.session_id, session_id),
                                     (t.c.account_ref, account_ref), (t.c.clip_id, clip_id)) if v is not None]
        if len(conditions) != 1:
            raise TypeError("void_grants takes exactly one of reviewer_id, session_id, account_ref, clip_id")
        value = reviewer_id or session_id or account_ref or clip_id
        return self._execute(t.update().where(conditions[0] == value, t.c.redeemed_at.is_(None),
                                              t.c.voided.is_(False)).values(voided=True)).rowcount

    # -- escalations -------------------------------------------------------------
    def add_escalation(self, row: EscalationRow, created_by: str) -> None:
        self._execute(schema.escalations.insert().values(**row.__dict__, created_by=created_by, resolution=None))

    def escalations(self, *, include_resolved: bool, after: str, limit: int) -> list[EscalationRow]:
        t = schema.escalations
        q = sa.select(t).where(t.c.escalation_id > after)
        if not include_resolved:
            q = q.where(t.c.resolved_at.is_(None))
        with self._db.read() as conn:
            return [_row(EscalationRow, r) for r in conn.execute(q.order_by(t.c.escalation_id).limit(limit))]

    def resolve(self, escalation_id: str, resolution: str, now: float) -> EscalationRow | None:
        t = schema.escalations
        self._execute(t.update().where(t.c.escalation_id == escalation_id, t.c.resolved_at.is_(None))
                      .values(resolved_at=now, resolution=resolution))
        return self._first(EscalationRow, sa.select(t).where(t.c.escalation_id == escalation_id))
