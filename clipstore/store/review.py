"""Rows of the review workflow: reviewers, sessions, queue, assignments, grants, escalations.

`ReviewRows` works on a connection it is given: inside a unit of work (one
transaction with the request's audit entry) or on a read connection. Every
state change that must happen once (a TOTP step, a queue claim, a grant
redemption) is also one conditional UPDATE whose row count says who won, so
it holds even between replicas.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import sqlalchemy as sa

from clipstore.locales import canonical_locale
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
    WatermarkRow,
)
from clipstore.store import schema
from clipstore.store.clips import CLIP_COLUMNS
from clipstore.store.plain import PlainRows

_T = TypeVar("_T")


def _row(cls: Any, row: Any) -> Any:
    """Build a row dataclass from the columns it declares."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in row._mapping.items() if k in names})



# A queue entry joined with its clip's review-relevant fields and its account's preference.
_QUEUED = ("SELECT q.clip_id, q.review_clip_id, q.account_ref, q.locale, c.clip_id, c.wake_word, c.expires_at, "
           "c.duration_ms, c.content_type, a.allow_review FROM review_queue q "
           "LEFT JOIN clips c ON c.clip_id = q.clip_id LEFT JOIN accounts a ON a.account_ref = q.account_ref")


_REVIEWER = ("r.principal_id, r.locales, r.wrapped_totp_secret, r.last_totp_step, r.failed_attempts, "
             "r.locked_until, r.lockouts")
_ASSIGNMENT = "a.assignment_id, a.clip_id, a.review_clip_id, a.reviewer_id, a.created_at, a.expires_at, a.completed_at"
_GRANT = ("g.grant_id, g.reviewer_id, g.session_id, g.assignment_id, g.clip_id, g.account_ref, g.expires_at, "
          "g.redeemed_at, g.voided")
_CLIP = ", ".join(f"c.{name}" for name in CLIP_COLUMNS.split(", "))
# Every review call: the caller's session and its reviewer, in one read.
_SESSION = (f"SELECT s.session_id, s.reviewer_id, s.expires_at, s.last_seen_at, s.ended, {_REVIEWER} "  # noqa: S608
            "FROM review_sessions s LEFT JOIN reviewers r ON r.principal_id = s.reviewer_id WHERE s.token_hash = ?")
# RequestGrant: the assignment, how many grants it had, and its queue entry with clip and account, in one read.
_GRANT_TARGET = (f"SELECT {_ASSIGNMENT}, (SELECT count(*) FROM grants g WHERE g.assignment_id = a.assignment_id), "  # noqa: S608
                 "q.clip_id, q.review_clip_id, q.account_ref, q.locale, c.clip_id, c.wake_word, c.expires_at, "
                 "c.duration_ms, c.content_type, acc.allow_review FROM assignments a "
                 "LEFT JOIN review_queue q ON q.clip_id = a.clip_id LEFT JOIN clips c ON c.clip_id = q.clip_id "
                 "LEFT JOIN accounts acc ON acc.account_ref = q.account_ref WHERE a.assignment_id = ?")
# FetchClip: everything its redemption checks, in one read (one row even when the grant is unknown).
_REDEEM = (f"SELECT (SELECT disabled FROM principals WHERE id = ?), "  # noqa: S608
           f"(SELECT count(*) FROM assignments WHERE assignment_id = ?), acc.allow_review, {_GRANT}, {_CLIP} "
           "FROM (SELECT 1 AS one) AS one LEFT JOIN grants g ON g.grant_id = ? "
           "LEFT JOIN clips c ON c.clip_id = g.clip_id LEFT JOIN accounts acc ON acc.account_ref = c.account_ref")


def _reviewer(row: tuple[Any, ...]) -> ReviewerRow:
    pid, locales, secret, step, failures, locked_until, lockouts = row
    return ReviewerRow(principal_id=pid, locales=tuple(canonical_locale(loc) for loc in locales.split(",") if loc),
                       wrapped_totp_secret=None if secret is None else bytes(secret),  # not yet enrolled
                       last_totp_step=step, failed_attempts=failures, locked_until=locked_until, lockouts=lockouts)


def _assignment(row: tuple[Any, ...]) -> AssignmentRow:
    return AssignmentRow(assignment_id=row[0], clip_id=row[1], review_clip_id=row[2], reviewer_id=row[3],
                         created_at=row[4], expires_at=row[5], completed_at=row[6])


def _grant(row: tuple[Any, ...]) -> GrantRow:
    return GrantRow(grant_id=row[0], reviewer_id=row[1], session_id=row[2], assignment_id=row[3], clip_id=row[4],
                    account_ref=row[5], expires_at=row[6], redeemed_at=row[7], voided=bool(row[8]))


def _clip(row: tuple[Any, ...]) -> ClipRow:
    values = dict(zip(CLIP_COLUMNS.split(", "), row, strict=True))
    values["wake_word"] = bool(values["wake_word"])
    values["wrapped_dek"], values["identity_ct"] = bytes(values["wrapped_dek"]), bytes(values["identity_ct"])
    return ClipRow(**values)


def _queued(row: tuple[Any, ...]) -> QueuedClip:
    return QueuedClip(queue=QueueRow(clip_id=row[0], review_clip_id=row[1], account_ref=row[2],
                                           locale=canonical_locale(row[3])),
                      clip_exists=row[4] is not None, wake_word=bool(row[5]), expires_at=row[6] or 0.0,
                      duration_ms=row[7] or 0, content_type=row[8] or "", allow_review=bool(row[9]))


class ReviewRows(PlainRows):
    """The review tables, on one connection (see the module docstring).

    The reads every review call makes run as plain SQL on the connection's own
    DBAPI cursor (the database caches their plans): 10–40 µs each, where a
    SQLAlchemy Core select costs 150–300 µs, and they run inside the writer's
    transaction, so each one counts."""

    def _first(self, cls: type[_T], statement: sa.Select[Any]) -> _T | None:
        row = self._conn.execute(statement).first()
        return None if row is None else _row(cls, row)

    # -- reviewers -----------------------------------------------------------
    def reviewer(self, principal_id: str) -> ReviewerRow | None:
        row = self._fetch("SELECT principal_id, locales, wrapped_totp_secret, last_totp_step, failed_attempts, "
                          "locked_until, lockouts FROM reviewers WHERE principal_id = ?", (principal_id,))
        return None if row is None else _reviewer(row)

    def accept_step(self, principal_id: str, step: int) -> bool:
        """Record a TOTP step as used; False if it (or a later one) was used before: a replay."""
        return self._exec("UPDATE reviewers SET last_totp_step = ?, failed_attempts = 0, lockouts = 0 "
                          "WHERE principal_id = ? AND last_totp_step < ?", (step, principal_id, step)) == 1

    def count_failure(self, principal_id: str) -> int:
        """One more failed code; returns the count so far."""
        t = schema.reviewers
        self._conn.execute(t.update().where(t.c.principal_id == principal_id)
                           .values(failed_attempts=t.c.failed_attempts + 1))
        return int(self._conn.scalar(sa.select(t.c.failed_attempts).where(t.c.principal_id == principal_id)) or 0)

    def lock(self, principal_id: str, until: float) -> None:
        t = schema.reviewers
        self._conn.execute(t.update().where(t.c.principal_id == principal_id)
                           .values(locked_until=until, failed_attempts=0, lockouts=t.c.lockouts + 1))

    # -- sessions ------------------------------------------------------------
    def add_session(self, session_id: str, token_hash: bytes, reviewer_id: str, now: float, expires_at: float) -> None:
        self._exec("INSERT INTO review_sessions (session_id, token_hash, reviewer_id, created_at, expires_at, "
                   "last_seen_at, ended) VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (session_id, token_hash, reviewer_id, now, expires_at, now, False))

    def session_with_reviewer(self, token_hash: bytes) -> tuple[SessionRow, ReviewerRow | None] | None:
        """The session a token opens and its reviewer's row (None if the reviewer has none), in one read."""
        row = self._fetch(_SESSION, (token_hash,))
        if row is None:
            return None
        session = SessionRow(session_id=row[0], reviewer_id=row[1], expires_at=row[2], last_seen_at=row[3],
                             ended=bool(row[4]))
        return session, None if row[5] is None else _reviewer(row[5:])

    def touch_session(self, session_id: str, now: float) -> None:
        self._exec("UPDATE review_sessions SET last_seen_at = ? WHERE session_id = ?", (now, session_id))

    def end_sessions(self, *, reviewer_id: str | None = None, session_id: str | None = None) -> int:
        t = schema.review_sessions
        where = t.c.reviewer_id == reviewer_id if reviewer_id else t.c.session_id == session_id
        return self._conn.execute(t.update().where(where, t.c.ended.is_(False)).values(ended=True)).rowcount

    # -- queue and assignments ------------------------------------------------
    def enqueue(self, clip_id: str, review_clip_id: str, account_ref: str, locale: str, now: float) -> None:
        self._exec("INSERT INTO review_queue (clip_id, review_clip_id, account_ref, locale, enqueued_at) "
                   "VALUES (?, ?, ?, ?, ?)", (clip_id, review_clip_id, account_ref, locale, now))

    def candidates(self, *, now: float, locales: tuple[str, ...], limit: int) -> list[QueuedClip]:
        """The oldest unclaimed (or lapsed) queue entries in the given locales (any when empty)."""
        # lower(): rows stored before locales were canonicalised may be in any case (tags are case-insensitive)
        in_locales = f" AND lower(q.locale) IN ({', '.join('?' * len(locales))})" if locales else ""
        sql = (f"{_QUEUED} WHERE (q.assignment_id IS NULL OR q.assignment_expires_at < ?){in_locales} "
               "ORDER BY q.enqueued_at LIMIT ?")
        return [_queued(row) for row in self._fetchall(sql, (now, *(loc.lower() for loc in locales), limit))]

    def claim(self, clip_id: str, assignment: AssignmentRow, now: float) -> bool:
        won = self._exec("UPDATE review_queue SET assignment_id = ?, assignment_expires_at = ? WHERE clip_id = ? "
                         "AND (assignment_id IS NULL OR assignment_expires_at < ?)",
                         (assignment.assignment_id, assignment.expires_at, clip_id, now)) == 1
        if won:
            a = assignment
            self._exec("INSERT INTO assignments (assignment_id, clip_id, review_clip_id, reviewer_id, created_at, "
                       "expires_at, completed_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (a.assignment_id, a.clip_id, a.review_clip_id, a.reviewer_id, a.created_at, a.expires_at,
                        a.completed_at))
        return won

    def assignments_since(self, reviewer_id: str, since: float) -> int:
        row = self._fetch("SELECT count(*) FROM assignments WHERE reviewer_id = ? AND created_at >= ?",
                          (reviewer_id, since))
        return int(row[0]) if row else 0

    def assignment(self, assignment_id: str) -> AssignmentRow | None:
        row = self._fetch("SELECT assignment_id, clip_id, review_clip_id, reviewer_id, created_at, expires_at, "
                          "completed_at FROM assignments WHERE assignment_id = ?", (assignment_id,))
        return None if row is None else _assignment(row)

    def grant_target(self, assignment_id: str) -> GrantTarget | None:
        """One joined read: the assignment, the grants issued for it, its queue entry (see GrantTarget)."""
        row = self._fetch(_GRANT_TARGET, (assignment_id,))
        if row is None:
            return None
        return GrantTarget(assignment=_assignment(row), grants=int(row[7]),
                           queued=None if row[8] is None else _queued(row[8:]))

    def complete_open(self, assignment_id: str, reviewer_id: str, label_ct: bytes, now: float) -> str | None:
        """Close the reviewer's own assignment if it is still open and not expired, in one conditional
        UPDATE, and take its clip out of the queue; returns its clip id, or None if it was not that."""
        row = self._fetch("UPDATE assignments SET completed_at = ?, label_ct = ? WHERE assignment_id = ? "
                          "AND reviewer_id = ? AND completed_at IS NULL AND expires_at > ? RETURNING clip_id",
                          (now, label_ct, assignment_id, reviewer_id, now))
        if row is None:
            return None
        self._exec("DELETE FROM review_queue WHERE assignment_id = ?", (assignment_id,))
        return str(row[0])

    def dequeue(self, *, account_ref: str | None = None, clip_id: str | None = None) -> int:
        q = schema.review_queue
        where = q.c.account_ref == account_ref if account_ref else q.c.clip_id == clip_id
        return self._conn.execute(q.delete().where(where)).rowcount

    def queue_depth(self) -> int:
        return int(self._conn.scalar(sa.select(sa.func.count()).select_from(schema.review_queue)) or 0)

    # -- grants ----------------------------------------------------------------
    def add_grant(self, grant: GrantRow, now: float) -> None:
        g = grant
        self._exec("INSERT INTO grants (grant_id, reviewer_id, session_id, assignment_id, clip_id, account_ref, "
                   "issued_at, expires_at, redeemed_at, voided) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (g.grant_id, g.reviewer_id, g.session_id, g.assignment_id, g.clip_id, g.account_ref, now,
                    g.expires_at, g.redeemed_at, g.voided))

    def redeem_rows(self, grant_id: str, assignment_id: str, principal_id: str) -> RedeemRows:
        """One joined read: what a redemption checks (see RedeemRows); the account is the clip's."""
        row = self._fetch(_REDEEM, (principal_id, assignment_id, grant_id))
        assert row is not None  # one row, whatever matched
        grant = None if row[3] is None else _grant(row[3:12])
        clip = None if row[12] is None else _clip(row[12:])
        return RedeemRows(reviewer_enabled=row[0] is not None and not row[0], grant=grant, clip=clip,
                          assignment_exists=bool(row[1]), account_allows_review=clip is not None and bool(row[2]))

    def redeem(self, grant_id: str, now: float) -> bool:
        """Single use: exactly one caller ever gets True for a grant."""
        return self._exec("UPDATE grants SET redeemed_at = ? WHERE grant_id = ? AND redeemed_at IS NULL "
                          "AND voided = ?", (now, grant_id, False)) == 1

    def add_watermark(self, row: WatermarkRow) -> None:
        self._exec("INSERT INTO watermarks (watermark_id, grant_id, reviewer_id, clip_id, review_clip_id, fetched_at) "
                   "VALUES (?, ?, ?, ?, ?, ?)",
                   (row.watermark_id, row.grant_id, row.reviewer_id, row.clip_id, row.review_clip_id, row.fetched_at))

    def watermark(self, watermark_id: str) -> WatermarkRow | None:
        row = self._fetch("SELECT watermark_id, grant_id, reviewer_id, clip_id, review_clip_id, fetched_at "
                          "FROM watermarks WHERE watermark_id = ?", (watermark_id,))
        if row is None:
            return None
        return WatermarkRow(watermark_id=row[0], grant_id=row[1], reviewer_id=row[2], clip_id=row[3],
                            review_clip_id=row[4], fetched_at=row[5])

    def void_grants(self, *, reviewer_id: str | None = None, session_id: str | None = None,
                    account_ref: str | None = None, clip_id: str | None = None,
                    assignment_id: str | None = None) -> int:
        given = [(c, v) for c, v in (("reviewer_id", reviewer_id), ("session_id", session_id),
                                     ("account_ref", account_ref), ("clip_id", clip_id),
                                     ("assignment_id", assignment_id)) if v is not None]
        if len(given) != 1:
            raise TypeError("void_grants takes exactly one of reviewer_id, session_id, account_ref, clip_id, "
                            "assignment_id")
        (column, value), = given
        return self._exec(f"UPDATE grants SET voided = ? WHERE {column} = ? "  # noqa: S608 (a column name above)
                          "AND redeemed_at IS NULL AND voided = ?", (True, value, False))

    def withdraw_from_review(self, *, clip_id: str | None = None, account_ref: str | None = None) -> tuple[int, int]:
        """The one way a clip (or every clip of an account) leaves review: out of the queue, its unredeemed
        grants void. Returns (dequeued, voided)."""
        if (clip_id is None) == (account_ref is None):
            raise TypeError("withdraw_from_review takes exactly one of clip_id, account_ref")
        if clip_id is not None:
            return self.dequeue(clip_id=clip_id), self.void_grants(clip_id=clip_id)
        return self.dequeue(account_ref=account_ref), self.void_grants(account_ref=account_ref)

    def forget_clip(self, clip_id: str) -> None:
        """A deleted clip leaves no reviewer label and no escalation text behind (they are sealed under its
        key, which is gone, but need not be kept as noise; labels and resolutions from before sealing are
        in clear). Assignment rows stay without their label: they count toward the reviewer's daily cap,
        which a deletion must not hand back."""
        self.withdraw_from_review(clip_id=clip_id)
        a = schema.assignments
        self._conn.execute(a.update().where(a.c.clip_id == clip_id).values(label=None, label_ct=None))
        e = schema.escalations
        self._conn.execute(e.update().where(e.c.clip_id == clip_id).values(note_ct=b"", resolution=None,
                                                                         resolution_ct=None))

    # -- what review needs of other tables ------------------------------------------
    def clip(self, clip_id: str) -> ClipRow | None:
        row = self._fetch(f"SELECT {CLIP_COLUMNS} FROM clips WHERE clip_id = ?", (clip_id,))  # noqa: S608
        return None if row is None else _clip(row)

    def clip_of_assignment(self, assignment_id: str, reviewer_id: str) -> ClipRow | None:
        """The clip behind the reviewer's own assignment (None if it is not theirs, or the clip is gone)."""
        row = self._fetch(f"SELECT {_CLIP} FROM assignments a JOIN clips c ON c.clip_id = a.clip_id "  # noqa: S608
                          "WHERE a.assignment_id = ? AND a.reviewer_id = ?", (assignment_id, reviewer_id))
        return None if row is None else _clip(row)

    def expire_clip(self, clip_id: str, now: float) -> None:
        c = schema.clips
        self._conn.execute(c.update().where(c.c.clip_id == clip_id, c.c.expires_at > now).values(expires_at=now))

    def allows_review(self, account_ref: str) -> bool:
        row = self._fetch("SELECT allow_review FROM accounts WHERE account_ref = ?", (account_ref,))
        return row is not None and bool(row[0])

    # -- escalations -------------------------------------------------------------
    def add_escalation(self, row: EscalationRow, created_by: str) -> None:
        self._conn.execute(schema.escalations.insert().values(**row.__dict__, created_by=created_by,
                                                              resolution=None))

    def flagged(self, review_clip_id: str, created_by: str, since: float) -> str | None:
        """The escalation `created_by` made of `review_clip_id` at or after `since` (an assignment's start), if
        any: what its flag made."""
        t = schema.escalations
        return self._conn.execute(sa.select(t.c.escalation_id).where(
            t.c.review_clip_id == review_clip_id, t.c.created_by == created_by, t.c.created_at >= since)
            .order_by(t.c.created_at).limit(1)).scalar()

    def escalation(self, escalation_id: str) -> EscalationRow | None:
        t = schema.escalations
        return self._first(EscalationRow, sa.select(t).where(t.c.escalation_id == escalation_id))

    def escalations(self, *, include_resolved: bool, after: str, limit: int) -> list[EscalationRow]:
        t = schema.escalations
        q = sa.select(t).where(t.c.escalation_id > after)
        if not include_resolved:
            q = q.where(t.c.resolved_at.is_(None))
        return [_row(EscalationRow, r) for r in self._conn.execute(q.order_by(t.c.escalation_id).limit(limit))]

    def resolve(self, escalation_id: str, resolution_ct: bytes | None, now: float) -> bool:
        t = schema.escalations
        return self._conn.execute(t.update().where(t.c.escalation_id == escalation_id, t.c.resolved_at.is_(None))
                                  .values(resolved_at=now, resolution_ct=resolution_ct)).rowcount == 1
