"""Reviewers: enrolment (API key and TOTP secret) and disabling."""

from __future__ import annotations

from dataclasses import dataclass

from clipstore.audit import Actor, AuditLog
from clipstore.auth import create_principal
from clipstore.clock import Clock
from clipstore.review.ports import ReviewPorts
from clipstore.review.sessions import totp_context
from clipstore.store.principals import Principal, PrincipalRepository
from clipstore.store.review import ReviewRepository
from clipstore.totp import new_secret, provisioning_uri, secret_base32
from kms import KeyProvider


@dataclass(frozen=True, kw_only=True)
class Enrolment:
    principal: Principal
    api_key: str
    totp_secret: str
    provisioning_uri: str


class Enrolments:
    def __init__(self, ports: ReviewPorts, *, principals: PrincipalRepository, repo: ReviewRepository,
                 audit: AuditLog, root: KeyProvider, clock: Clock) -> None:
        self._ports, self._principals, self._repo = ports, principals, repo
        self._audit, self._root, self._clock = audit, root, clock

    def enroll(self, name: str, locales: tuple[str, ...], actor: Actor, *, spiffe_id: str | None = None
               ) -> Enrolment:
        """A reviewer named by an API key, or (mTLS) by the certificate carrying `spiffe_id` and no key."""
        principal, api_key = create_principal(self._principals, self._audit, role="reviewer", name=name,
                                              actor=actor, spiffe_id=spiffe_id)
        secret = new_secret()
        self._audit.append(actor.record("reviewer.enroll", principal_id=principal.id))
        self._repo.add_reviewer(principal.id, locales, self._root.encrypt(secret, totp_context(principal.id)),
                                self._clock.now())
        return Enrolment(principal=principal, api_key=api_key or "", totp_secret=secret_base32(secret),
                         provisioning_uri=provisioning_uri(secret, account_name=f"{name} ({principal.id})"))
