"""Principal lifecycle for every role: create, list, disable, re-enable, rotate a key, expire.

Refusal happens at authentication (`clipstore.auth.check_standing`), for API
keys and certificates alike, so a change here takes effect on the next call.
Each change is one unit of work: its checks, its effect and its audit entry
commit together. A reviewer's factors (API key, TOTP secret) are never handed
to an admin: reviewers are created, and their factors rotated, through
enrolment codes (`clipstore.enrolment`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol, TypeVar

from clipstore.auth import ROLES, hash_api_key, new_api_key, new_principal
from clipstore.clock import Clock, rfc3339
from clipstore.config import MAX_KEY_OVERLAP_S
from clipstore.errors import FailedPrecondition, InvalidArgument, NotFound
from clipstore.rows import Principal, PrincipalListing
from clipstore.spiffe import parse_spiffe_id
from clipstore.unit import Actor, Ledger, Tx

T = TypeVar("T")

# An admin whose expiry falls within this of now is not counted on to act: it needs the time to create or
# enable another admin before the service has none (then only the local bootstrap CLI can make one).
LAST_ADMIN_MARGIN_S = 3600.0


class PrincipalStore(Protocol):
    def add(self, principal: Principal, *, key_hash: bytes | None, now: float) -> None: ...
    def get(self, principal_id: str) -> Principal | None: ...
    def by_spiffe_id(self, spiffe_id: str) -> Principal | None: ...
    def page(self, *, role: str | None, after: str, limit: int, now: float) -> list[PrincipalListing]: ...
    def listing(self, principal_id: str, *, now: float) -> PrincipalListing | None: ...
    def set_disabled(self, principal_id: str, disabled: bool) -> bool: ...
    def set_expiry(self, principal_id: str, expires_at: float | None) -> bool: ...
    def standing_admins(self, *, other_than: str, until: float, by_certificate: bool) -> int: ...
    def rotate_key(self, principal_id: str, key_hash: bytes, *, now: float, retires_at: float) -> bool: ...


class ReviewerSessions(Protocol):
    """What disabling a reviewer ends at once."""

    def end_sessions(self, *, reviewer_id: str) -> int: ...
    def void_grants(self, *, reviewer_id: str) -> int: ...


@dataclass(frozen=True, kw_only=True)
class PrincipalPorts:
    ledger: Ledger
    bind: Callable[[Tx], PrincipalStore]  # the store inside a unit's transaction
    read: Callable[[], AbstractContextManager[PrincipalStore]]  # the store on a read connection
    sessions: Callable[[Tx], ReviewerSessions]
    clock: Clock


@dataclass(frozen=True, kw_only=True)
class Rotation:
    api_key: str  # shown once
    previous_keys_retire_at: float


def canonical_spiffe_id(spiffe_id: str, *, role: str, trust_domain: str) -> str:
    """The SPIFFE id a principal of `role` may be enrolled under, spelled canonically; INVALID_ARGUMENT if not."""
    parsed = parse_spiffe_id(spiffe_id)
    if parsed is None:
        raise InvalidArgument("spiffe_id", f"must be spiffe://{trust_domain}/<role>/<name>")
    if parsed.trust_domain != trust_domain:
        raise InvalidArgument("spiffe_id", f"must be in this server's trust domain {trust_domain!r}")
    if parsed.role != role:
        raise InvalidArgument("spiffe_id", f"names role {parsed.role!r}, but the principal's role is {role!r}")
    return str(parsed)


def require_free_spiffe_id(rows: PrincipalStore, tx: Tx, actor: Actor, spiffe_id: str | None) -> None:
    """Inside a unit: refuse (audited) a SPIFFE id another principal is enrolled under."""
    if spiffe_id is not None and rows.by_spiffe_id(spiffe_id) is not None:
        raise tx.deny(actor, "principal.deny", FailedPrecondition(
            "another principal is enrolled under that SPIFFE id; disable it and issue a certificate with another "
            "name", reason="SPIFFE_ID_IN_USE"))


def _takes_last_admin(rows: PrincipalStore, tx: Tx, actor: Actor, principal: Principal, change: str, *,
                      by_certificate: bool) -> None:
    """Inside the unit, before its write: refuse (audited) a change that takes away the standing of the
    last admin able to act (enabled, not expiring within LAST_ADMIN_MARGIN_S, holding a credential this
    service accepts: an API key not retiring within it, or a SPIFFE id where client certificates are
    accepted; an admin named only by a certificate cannot sign in to a service without them). The count is
    read in the unit's transaction, which the writer serialises with every other unit (on every replica),
    so two admins disabling each other at once cannot both succeed."""
    if rows.standing_admins(other_than=principal.id, until=tx.now + LAST_ADMIN_MARGIN_S,
                            by_certificate=by_certificate) == 0:
        raise tx.deny(actor, "principal.deny", FailedPrecondition(
            f"{change} would leave no enabled admin that stays unexpired for the next "
            f"{LAST_ADMIN_MARGIN_S / 60:g} minutes; create or enable another admin first, then retry",
            reason="LAST_ADMIN"), principal_id=principal.id)


def _brings_admin_expiry_near(principal: Principal, expires_at: float | None, *, now: float) -> bool:
    """Whether the new expiry moves an enabled admin's expiry earlier, to within LAST_ADMIN_MARGIN_S of now
    (or past); extending one, even to a time still near, never is."""
    return (principal.role == "admin" and not principal.disabled and expires_at is not None
            and expires_at <= now + LAST_ADMIN_MARGIN_S
            and (principal.expires_at is None or expires_at < principal.expires_at))


def principal_not_found(principal_id: str, role: str | None) -> NotFound:
    if role == "reviewer":
        return NotFound(f"no reviewer {principal_id}", reason="REVIEWER_NOT_FOUND")
    return NotFound(f"no principal {principal_id}", reason="PRINCIPAL_NOT_FOUND")


class PrincipalLifecycle:
    def __init__(self, ports: PrincipalPorts, *, trust_domain: str, default_overlap_s: float,
                 certificates: bool = False) -> None:
        """`certificates`: whether this service accepts client certificates (tls.client_ca_file), so that an
        admin named only by a SPIFFE id can act."""
        self._ports, self.trust_domain, self.default_overlap_s = ports, trust_domain, default_overlap_s
        self._certificates = certificates

    def _existing(self, rows: PrincipalStore, tx: Tx, principal_id: str, role: str | None = None) -> Principal:
        principal = rows.get(principal_id)
        if principal is None or (role is not None and principal.role != role):
            raise tx.refuse(principal_not_found(principal_id, role))
        return principal

    def _listed(self, rows: PrincipalStore, tx: Tx, principal_id: str) -> PrincipalListing:
        """The principal as the unit leaves it, with the keys that authenticate now (as `page` lists it)."""
        listing = rows.listing(principal_id, now=tx.now)
        if listing is None:
            raise tx.refuse(principal_not_found(principal_id, None))
        return listing

    def create(self, *, role: str, name: str, spiffe_id: str | None, expires_at: float | None,
               actor: Actor) -> tuple[Principal, str | None]:
        """A new principal of any role but reviewer, with its API key (shown once) unless a certificate names it."""
        if role not in ROLES or role == "reviewer":
            raise InvalidArgument("role", "choose ingest, safety, auditor or admin; reviewers are created with "
                                          "CreateReviewer, which hands the admin an enrolment code, not factors")
        spiffe_id = canonical_spiffe_id(spiffe_id, role=role, trust_domain=self.trust_domain) if spiffe_id else None
        principal, key = new_principal(role=role, name=name, spiffe_id=spiffe_id, expires_at=expires_at)

        def unit(tx: Tx) -> Principal:
            rows = self._ports.bind(tx)
            require_free_spiffe_id(rows, tx, actor, spiffe_id)
            rows.add(principal, key_hash=hash_api_key(key) if key else None, now=tx.now)
            tx.audit(actor.record("principal.create", reason=role, principal_id=principal.id))
            return self._existing(rows, tx, principal.id)
        return self._ports.ledger.run(unit), key

    def page(self, *, role: str | None, after: str, limit: int) -> list[PrincipalListing]:
        with self._ports.read() as rows:
            return rows.page(role=role, after=after, limit=limit, now=self._ports.clock.now())

    def disable(self, principal_id: str, actor: Actor, *,
                role: str | None = None) -> tuple[PrincipalListing, int, int]:
        """Refuse the principal from its next call on; a reviewer's sessions and open grants end now too,
        so re-enabling later does not revive them. Returns (principal, ended sessions, voided grants)."""
        def unit(tx: Tx) -> tuple[PrincipalListing, int, int]:
            rows = self._ports.bind(tx)
            principal = self._existing(rows, tx, principal_id, role)
            if principal.role == "admin" and not principal.disabled:
                _takes_last_admin(rows, tx, actor, principal, "disabling this admin",
                                  by_certificate=self._certificates)
            rows.set_disabled(principal.id, True)
            ended = voided = 0
            if principal.role == "reviewer":
                sessions = self._ports.sessions(tx)
                ended, voided = sessions.end_sessions(reviewer_id=principal.id), \
                    sessions.void_grants(reviewer_id=principal.id)
            tx.audit(actor.record("principal.disable", reason=principal.role, principal_id=principal.id))
            return self._listed(rows, tx, principal.id), ended, voided
        return self._ports.ledger.run(unit)

    def enable(self, principal_id: str, actor: Actor) -> PrincipalListing:
        def unit(tx: Tx) -> PrincipalListing:
            rows = self._ports.bind(tx)
            principal = self._existing(rows, tx, principal_id)
            rows.set_disabled(principal.id, False)
            tx.audit(actor.record("principal.enable", reason=principal.role, principal_id=principal.id))
            return self._listed(rows, tx, principal.id)
        return self._ports.ledger.run(unit)

    def rotate_key(self, principal_id: str, overlap_s: float | None, actor: Actor) -> Rotation:
        """A new current key; the keys in use keep working for `overlap_s` (default: the configured one)."""
        overlap = self.default_overlap_s if overlap_s is None else overlap_s
        if not 0 <= overlap <= MAX_KEY_OVERLAP_S:
            raise InvalidArgument("overlap", f"between 0 and {MAX_KEY_OVERLAP_S} s, got {overlap:g}")
        key = new_api_key()

        def unit(tx: Tx) -> Rotation:
            rows = self._ports.bind(tx)
            principal = self._existing(rows, tx, principal_id)
            if principal.role == "reviewer":
                raise tx.deny(actor, "principal.deny", FailedPrecondition(
                    "a reviewer's API key is issued only to the reviewer: issue them a ROTATE_API_KEY enrolment "
                    "code", reason="FACTORS_BELONG_TO_REVIEWER"), principal_id=principal.id)
            rows.rotate_key(principal.id, hash_api_key(key), now=tx.now, retires_at=tx.now + overlap)
            tx.audit(actor.record("principal.key_rotate", reason=f"overlap={overlap:g}s", principal_id=principal.id))
            return Rotation(api_key=key, previous_keys_retire_at=tx.now + overlap)
        return self._ports.ledger.run(unit)

    def set_expiry(self, principal_id: str, expires_at: float | None, actor: Actor) -> PrincipalListing:
        def unit(tx: Tx) -> PrincipalListing:
            rows = self._ports.bind(tx)
            principal = self._existing(rows, tx, principal_id)
            if _brings_admin_expiry_near(principal, expires_at, now=tx.now):
                _takes_last_admin(rows, tx, actor, principal, "this expiry", by_certificate=self._certificates)
            rows.set_expiry(principal.id, expires_at)
            lapsed = principal.expires_at is not None and principal.expires_at <= tx.now
            if principal.role == "reviewer" and (lapsed or expires_at is not None and expires_at <= tx.now):
                # Expired now, or already (an expiry that passed): as when disabled, the sessions and grants
                # end, so that extending the expiry does not bring back those opened before it lapsed.
                sessions = self._ports.sessions(tx)
                sessions.end_sessions(reviewer_id=principal.id)
                sessions.void_grants(reviewer_id=principal.id)
            tx.audit(actor.record("principal.expiry", principal_id=principal.id,
                                  reason="never" if expires_at is None else rfc3339(expires_at)))
            return self._listed(rows, tx, principal.id)
        return self._ports.ledger.run(unit)
