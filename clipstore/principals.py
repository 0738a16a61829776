"""Principal lifecycle for every role: create, list, disable, re-enable, rotate a key, expire.

Refusal happens at authentication (`clipstore.auth.check_standing`), for API
keys and certificates alike, so a change here takes effect on the next call.
Every change is audited before it takes effect. A reviewer's factors (API key,
TOTP secret) are never handed to an admin: reviewers are created, and their
factors rotated, through enrolment codes (`clipstore.enrolment`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from clipstore.audit import Actor, AuditLog
from clipstore.auth import ROLES, create_principal, hash_api_key, new_api_key
from clipstore.clock import Clock, rfc3339
from clipstore.config import MAX_KEY_OVERLAP_S
from clipstore.errors import FailedPrecondition, InvalidArgument, NotFound
from clipstore.spiffe import parse_spiffe_id
from clipstore.store.principals import Principal, PrincipalListing, PrincipalRepository


class ReviewerSessions(Protocol):
    def close_all(self, reviewer_id: str) -> tuple[int, int]:
        """End the reviewer's sessions and void their unredeemed grants; (ended, voided)."""
        ...


@dataclass(frozen=True, kw_only=True)
class Rotation:
    api_key: str  # shown once
    previous_keys_retire_at: float


class PrincipalLifecycle:
    def __init__(self, *, repo: PrincipalRepository, audit: AuditLog, clock: Clock, trust_domain: str,
                 reviewer_sessions: ReviewerSessions, default_overlap_s: float) -> None:
        self._repo, self._audit, self._clock = repo, audit, clock
        self._trust_domain, self._reviewer_sessions = trust_domain, reviewer_sessions
        self.default_overlap_s = default_overlap_s

    def check_spiffe_id(self, spiffe_id: str, role: str) -> str:
        """A SPIFFE id a principal of `role` may be enrolled under, in its canonical spelling."""
        parsed = parse_spiffe_id(spiffe_id)
        if parsed is None:
            raise InvalidArgument("spiffe_id", f"must be spiffe://{self._trust_domain}/<role>/<name>")
        if parsed.trust_domain != self._trust_domain:
            raise InvalidArgument("spiffe_id", f"must be in this server's trust domain {self._trust_domain!r}")
        if parsed.role != role:
            raise InvalidArgument("spiffe_id", f"names role {parsed.role!r}, but the principal's role is {role!r}")
        if self._repo.by_spiffe_id(str(parsed)) is not None:
            raise FailedPrecondition("another principal is enrolled under that SPIFFE id; disable it and "
                                     "issue a certificate with another name", reason="SPIFFE_ID_IN_USE")
        return str(parsed)

    def create(self, *, role: str, name: str, spiffe_id: str | None, expires_at: float | None,
               actor: Actor) -> tuple[Principal, str | None]:
        """A new principal of any role but reviewer, with its API key (shown once) unless a certificate names it."""
        if role not in ROLES or role == "reviewer":
            raise InvalidArgument("role", "choose ingest, safety, auditor or admin; reviewers are created with "
                                          "CreateReviewer, which hands the admin an enrolment code, not factors")
        spiffe_id = self.check_spiffe_id(spiffe_id, role) if spiffe_id else None
        return create_principal(self._repo, self._audit, role=role, name=name, actor=actor, spiffe_id=spiffe_id,
                                expires_at=expires_at, now=self._clock.now())

    def page(self, *, role: str | None, after: str, limit: int) -> list[PrincipalListing]:
        return self._repo.page(role=role, after=after, limit=limit, now=self._clock.now())

    def require(self, principal_id: str, *, role: str | None = None) -> Principal:
        principal = self._repo.get(principal_id)
        if principal is None or (role is not None and principal.role != role):
            if role == "reviewer":
                raise NotFound(f"no reviewer {principal_id}", reason="REVIEWER_NOT_FOUND")
            raise NotFound(f"no principal {principal_id}", reason="PRINCIPAL_NOT_FOUND")
        return principal

    def disable(self, principal_id: str, actor: Actor, *, role: str | None = None) -> tuple[Principal, int, int]:
        """Refuse the principal from its next call on; a reviewer's sessions and open grants end now too,
        so re-enabling later does not revive them. Returns (principal, ended sessions, voided grants)."""
        principal = self.require(principal_id, role=role)
        self._audit.append(actor.record("principal.disable", reason=principal.role, principal_id=principal.id))
        self._repo.set_disabled(principal.id, True)
        ended, voided = self._reviewer_sessions.close_all(principal.id) if principal.role == "reviewer" else (0, 0)
        return self.require(principal.id), ended, voided

    def enable(self, principal_id: str, actor: Actor) -> Principal:
        principal = self.require(principal_id)
        self._audit.append(actor.record("principal.enable", reason=principal.role, principal_id=principal.id))
        self._repo.set_disabled(principal.id, False)
        return self.require(principal.id)

    def rotate_key(self, principal_id: str, overlap_s: float | None, actor: Actor) -> Rotation:
        """A new current key; the keys in use keep working for `overlap_s` (default: the configured one)."""
        principal = self.require(principal_id)
        if principal.role == "reviewer":
            raise FailedPrecondition("a reviewer's API key is issued only to the reviewer: issue them a "
                                     "ROTATE_API_KEY enrolment code", reason="FACTORS_BELONG_TO_REVIEWER")
        overlap = self.default_overlap_s if overlap_s is None else overlap_s
        if not 0 <= overlap <= MAX_KEY_OVERLAP_S:
            raise InvalidArgument("overlap", f"between 0 and {MAX_KEY_OVERLAP_S} s, got {overlap:g}")
        return Rotation(api_key=self.install_key(principal, overlap, actor),
                        previous_keys_retire_at=self._clock.now() + overlap)

    def install_key(self, principal: Principal, overlap_s: float, actor: Actor) -> str:
        """Audit, then make a fresh key the principal's current one; returns it (to show once)."""
        now = self._clock.now()
        self._audit.append(actor.record("principal.key_rotate", reason=f"overlap={overlap_s:g}s",
                                        principal_id=principal.id))
        key = new_api_key()
        if not self._repo.rotate_key(principal.id, hash_api_key(key), now=now, retires_at=now + overlap_s):
            raise NotFound(f"no principal {principal.id}", reason="PRINCIPAL_NOT_FOUND")
        return key

    def set_expiry(self, principal_id: str, expires_at: float | None, actor: Actor) -> Principal:
        principal = self.require(principal_id)
        self._audit.append(actor.record("principal.expiry", principal_id=principal.id,
                                        reason="never" if expires_at is None else rfc3339(expires_at)))
        self._repo.set_expiry(principal.id, expires_at)
        return self.require(principal.id)
