"""MFA review sessions: a TOTP code opens one; every review call checks it is live.

Check-and-count of codes is one unit of work: a locked reviewer is refused
before the code is evaluated, the failure that reaches the limit locks, and
concurrent guesses cannot evaluate more codes than the limit allows.
"""

from __future__ import annotations

import hashlib
import secrets

from clipstore.errors import PermissionDenied, Unauthenticated
from clipstore.review.policy import SESSION_TOUCH_S, ReviewPolicy
from clipstore.review.ports import ReviewPorts, ReviewStore
from clipstore.rows import ReviewerRow, SessionRow
from clipstore.totp import matching_step
from clipstore.unit import Actor, Tx
from kms import KeyProvider


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def totp_context(principal_id: str) -> dict[str, str]:
    return {"purpose": "reviewer-totp", "principal_id": principal_id}


def _locked(reviewer: ReviewerRow, now: float) -> PermissionDenied | None:
    if reviewer.locked_until <= now:
        return None
    return PermissionDenied(f"reviewer is locked for another {reviewer.locked_until - now:.0f} s after repeated "
                            "wrong codes", reason="REVIEWER_LOCKED")


def live_session(rows: ReviewStore, tx: Tx, actor: Actor, token: str, action: str,
                 policy: ReviewPolicy) -> tuple[SessionRow, ReviewerRow]:
    """Inside a unit: the caller's live session and reviewer row, or a recorded refusal."""
    found = rows.session_with_reviewer(token_hash(token)) if token else None
    session, reviewer = found if found is not None else (None, None)
    problem = None
    if session is None or session.reviewer_id != actor.id:
        problem = ("SESSION_UNKNOWN", "no such session; start one with a TOTP code")
    elif session.ended:
        problem = ("SESSION_ENDED", "the session has ended; start a new one")
    elif tx.now >= session.expires_at:
        problem = ("SESSION_EXPIRED", "the session reached its lifetime; start a new one")
    elif tx.now - session.last_seen_at >= policy.session_idle_s:
        problem = ("SESSION_IDLE", "the session was idle too long; start a new one")
    if problem is not None:
        raise tx.deny(actor, action, Unauthenticated(problem[1], reason=problem[0]))
    assert session is not None
    if reviewer is None:  # the session's reviewer, who is the caller
        raise tx.deny(actor, action, PermissionDenied("this principal is not an enrolled reviewer",
                                                      reason="NOT_ENROLLED"))
    locked = _locked(reviewer, tx.now)
    if locked is not None:
        raise tx.deny(actor, action, locked)
    if tx.now - session.last_seen_at >= SESSION_TOUCH_S:
        rows.touch_session(session.session_id, tx.now)
    return session, reviewer


class Sessions:
    def __init__(self, ports: ReviewPorts, *, root: KeyProvider, policy: ReviewPolicy) -> None:
        self._ports, self._root, self._policy = ports, root, policy

    def start(self, code: str, actor: Actor) -> tuple[str, float]:
        """A new session for a right, unused code; returns (token, expires_at)."""
        with self._ports.read() as rows:
            reviewer = rows.reviewer(actor.id)
        if reviewer is None or reviewer.wrapped_totp_secret is None:  # not yet redeemed their enrolment code
            self._ports.deny(actor, "session.deny", PermissionDenied(
                "this principal is not an enrolled reviewer (or has not redeemed their enrolment code)",
                reason="NOT_ENROLLED"))
        locked = _locked(reviewer, self._ports.clock.now())
        if locked is not None:  # refused before the root key is even asked for the secret
            self._ports.deny(actor, "session.deny", locked)
        secret = self._root.decrypt(reviewer.wrapped_totp_secret, totp_context(actor.id))
        token, session_id = secrets.token_urlsafe(32), "s_" + secrets.token_hex(10)
        policy = self._policy

        def unit(tx: Tx) -> float:
            rows = self._ports.bind(tx)
            current = rows.reviewer(actor.id)
            assert current is not None  # reviewers are disabled, never deleted
            locked = _locked(current, tx.now)
            if locked is not None:  # no code is evaluated while locked
                raise tx.deny(actor, "session.deny", locked)
            if current.wrapped_totp_secret != reviewer.wrapped_totp_secret:
                # A new secret was installed since it was read: a code of the old one opens nothing (its
                # sessions ended with it). Not the caller's mistake, so no failure is counted.
                raise tx.deny(actor, "session.deny", Unauthenticated(
                    "the TOTP secret was just replaced; use a code of the new one", reason="BAD_CODE"))
            step = matching_step(secret, code, now=tx.now)
            if step is not None and rows.accept_step(actor.id, step):
                expires = tx.now + policy.session_lifetime_s
                rows.add_session(session_id, token_hash(token), actor.id, tx.now, expires)
                tx.audit(actor.record("session.start", principal_id=actor.id))
                return expires
            if rows.count_failure(actor.id) >= policy.max_failed_codes:
                lock_s = policy.lockout_after(current.lockouts)
                rows.lock(actor.id, tx.now + lock_s)
                tx.audit(actor.record("reviewer.lockout", principal_id=actor.id,
                                      reason=f"{policy.max_failed_codes} failed codes; locked {lock_s:.0f} s"))
            raise tx.deny(actor, "session.deny", Unauthenticated(
                "the code is wrong or was already used; wait for the next code",
                reason="BAD_CODE" if step is None else "REPLAYED_CODE"))

        return token, self._ports.ledger.run(unit)

    def end(self, token: str, actor: Actor) -> None:
        def unit(tx: Tx) -> None:
            rows = self._ports.bind(tx)
            session, _ = live_session(rows, tx, actor, token, "session.deny", self._policy)
            rows.end_sessions(session_id=session.session_id)
            rows.void_grants(session_id=session.session_id)
            tx.audit(actor.record("session.end", principal_id=actor.id))
        self._ports.ledger.run(unit)
