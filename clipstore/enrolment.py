"""Self-enrolment: a reviewer's factors reach the reviewer alone.

An admin creates a reviewer and receives only a one-time, short-lived
enrolment code (and later, codes to rotate the TOTP secret or the API key).
The reviewer redeems the code over the API and receives their own factors,
shown once; the admin never sees one, so `clip.fetch` entries attributed to a
reviewer are theirs. Every step is audited.

Redemption, as numbered steps (each refusal audited as `enrolment.deny`):
  1. the code exists, is unused and unexpired (a read: garbage never reaches
     the KMS);
  2. fresh factors are made and the TOTP secret is wrapped by the KMS root,
     outside the transaction;
  3. in one unit of work: claim the code with ONE conditional UPDATE (single
     use, even across replicas) — from here the code is spent, whatever
     follows; it must be the named reviewer's, presented by no other
     certificate; the reviewer must be in good standing; install the factors
     (a new TOTP secret ends the reviewer's sessions and voids their grants);
     record `enrolment.redeem`.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import StrEnum
from typing import NoReturn, Protocol

from clipstore.auth import check_standing, hash_api_key, new_api_key, new_principal
from clipstore.clock import Clock
from clipstore.errors import ClipstoreError, InvalidArgument, PermissionDenied, Unauthenticated
from clipstore.principals import PrincipalStore, ReviewerSessions, principal_not_found, require_free_spiffe_id
from clipstore.rows import CodeRow, Principal
from clipstore.totp import new_secret, provisioning_uri, secret_base32
from clipstore.unit import ANONYMOUS_ID, Actor, Ledger, Tx, deny_alone

CODE_PREFIX = "cse_"
CODE_RANDOM_BYTES = 16  # 128 bits: guessing is hopeless, typing it is still bearable


class Purpose(StrEnum):
    ENROL = "enrol"  # a TOTP secret and (unless a certificate names the reviewer) an API key; old keys retire now
    ROTATE_TOTP = "rotate_totp"  # a new TOTP secret; the old one stops at once
    ROTATE_API_KEY = "rotate_api_key"  # a new API key; the old ones work for the configured overlap


class EnrolmentStore(PrincipalStore, Protocol):
    def add_code(self, code_hash: bytes, *, principal_id: str, purpose: str, created_by: str, now: float,
                 expires_at: float) -> int: ...
    def code(self, code_hash: bytes) -> CodeRow | None: ...
    def claim_code(self, code_hash: bytes, *, now: float) -> CodeRow | None: ...
    def add_reviewer(self, principal_id: str, locales: tuple[str, ...], *, now: float) -> None: ...
    def set_totp_secret(self, principal_id: str, wrapped_secret: bytes) -> None: ...


@dataclass(frozen=True, kw_only=True)
class EnrolmentPorts:
    ledger: Ledger
    bind: Callable[[Tx], EnrolmentStore]
    read: Callable[[], AbstractContextManager[EnrolmentStore]]
    seal_totp: Callable[[str, bytes], bytes]  # (principal id, secret) → the secret wrapped by the KMS root
    sessions: Callable[[Tx], ReviewerSessions]  # what a new TOTP secret ends: sessions the old one opened
    clock: Clock


@dataclass(frozen=True, kw_only=True)
class Offer:
    """What the admin receives: a code to pass on, never a factor."""

    reviewer_id: str
    purpose: Purpose
    code: str
    expires_at: float


@dataclass(frozen=True, kw_only=True)
class Factors:
    """What the reviewer receives, once. Empty strings for what the purpose does not issue."""

    reviewer_id: str
    purpose: Purpose
    api_key: str = ""
    totp_secret: str = ""  # base32
    provisioning_uri: str = ""


def code_hash(code: str) -> bytes:
    return hashlib.sha256(code.encode()).digest()


def _redeemable(row: CodeRow | None, now: float) -> bool:
    return row is not None and row.redeemed_at is None and now < row.expires_at


def _refusal(row: CodeRow | None) -> ClipstoreError:
    """Why a code that is not redeemable is not."""
    if row is None:
        return Unauthenticated("no such enrolment code; check it, or ask an admin for a new one",
                               reason="ENROLMENT_CODE_INVALID")
    if row.redeemed_at is not None:
        return Unauthenticated("this enrolment code was already redeemed; ask an admin for a new one",
                               reason="ENROLMENT_CODE_USED")
    return Unauthenticated("this enrolment code expired (or a newer one replaced it); ask an admin for a new one",
                           reason="ENROLMENT_CODE_EXPIRED")


class SelfEnrolment:
    def __init__(self, ports: EnrolmentPorts, *, code_ttl_s: float, key_overlap_s: float) -> None:
        self._ports, self._code_ttl_s, self._key_overlap_s = ports, code_ttl_s, key_overlap_s

    # -- the admin's side --------------------------------------------------------------------------------
    def create_reviewer(self, name: str, locales: tuple[str, ...], actor: Actor, *,
                        spiffe_id: str | None = None) -> Offer:
        """A reviewer with no factor yet (named by `spiffe_id`'s certificate, if given), and its ENROL code."""
        principal, _ = new_principal(role="reviewer", name=name, spiffe_id=spiffe_id, with_key=False)
        code = CODE_PREFIX + secrets.token_urlsafe(CODE_RANDOM_BYTES)

        def unit(tx: Tx) -> Offer:
            rows = self._ports.bind(tx)
            require_free_spiffe_id(rows, tx, actor, spiffe_id)
            rows.add(principal, key_hash=None, now=tx.now)
            rows.add_reviewer(principal.id, locales, now=tx.now)
            tx.audit(actor.record("principal.create", reason="reviewer", principal_id=principal.id))
            tx.audit(actor.record("reviewer.enroll", principal_id=principal.id))
            return self._offer(rows, tx, actor, principal.id, Purpose.ENROL, code)
        return self._ports.ledger.run(unit)

    def issue(self, reviewer_id: str, purpose: Purpose, actor: Actor) -> Offer:
        """A fresh code for an existing reviewer; any earlier unredeemed code of theirs stops working."""
        code = CODE_PREFIX + secrets.token_urlsafe(CODE_RANDOM_BYTES)

        def unit(tx: Tx) -> Offer:
            rows = self._ports.bind(tx)
            reviewer = rows.get(reviewer_id)
            if reviewer is None or reviewer.role != "reviewer":
                raise tx.refuse(principal_not_found(reviewer_id, "reviewer"))
            if purpose is Purpose.ROTATE_API_KEY and reviewer.spiffe_id:
                raise tx.refuse(InvalidArgument("purpose", "this reviewer authenticates with a certificate and has "
                                                           "no API key; revoke and reissue the certificate instead"))
            return self._offer(rows, tx, actor, reviewer.id, purpose, code)
        return self._ports.ledger.run(unit)

    def _offer(self, rows: EnrolmentStore, tx: Tx, actor: Actor, reviewer_id: str, purpose: Purpose,
               code: str) -> Offer:
        expires_at = tx.now + self._code_ttl_s
        replaced = rows.add_code(code_hash(code), principal_id=reviewer_id, purpose=purpose, created_by=actor.id,
                                 now=tx.now, expires_at=expires_at)
        tx.audit(actor.record("enrolment.offer", principal_id=reviewer_id,
                              reason=f"{purpose}; replaced {replaced}" if replaced else str(purpose)))
        return Offer(reviewer_id=reviewer_id, purpose=purpose, code=code, expires_at=expires_at)

    # -- the reviewer's side -------------------------------------------------------------------------------
    def redeem(self, reviewer_id: str, code: str, *, presented_by: str | None, request_id: str) -> Factors:
        """The reviewer's new factors, shown once. `presented_by` is the principal id the caller's client
        certificate names ("" if it names none), or None when the call carries no certificate."""
        hashed = code_hash(code)
        caller = Actor(id=presented_by or ANONYMOUS_ID, role="", request_id=request_id)
        # 1. a code that exists, unused, unexpired
        with self._ports.read() as rows:
            row = rows.code(hashed)
            principal = rows.get(row.principal_id) if row else None
        if not _redeemable(row, self._ports.clock.now()):
            self._deny(caller, _refusal(row), reviewer_id)
        assert row is not None and principal is not None  # principals are disabled, never deleted
        # 2. fresh factors, the secret wrapped by the KMS root (no transaction is held meanwhile)
        purpose = Purpose(row.purpose)
        api_key = new_api_key() if purpose is Purpose.ROTATE_API_KEY or (
            purpose is Purpose.ENROL and not principal.spiffe_id) else ""
        secret = new_secret() if purpose in (Purpose.ENROL, Purpose.ROTATE_TOTP) else b""
        wrapped = self._ports.seal_totp(principal.id, secret) if secret else b""

        # 3. one unit: spend the code, check who redeems it, install, record
        def unit(tx: Tx) -> Factors:
            rows = self._ports.bind(tx)
            claimed = rows.claim_code(hashed, now=tx.now)
            if claimed is None:  # another redeemer won the race, or it expired meanwhile
                raise tx.deny(caller, "enrolment.deny", _refusal(rows.code(hashed)), principal_id=reviewer_id)
            if claimed.principal_id != reviewer_id or presented_by not in (None, claimed.principal_id):
                raise tx.deny(caller, "enrolment.deny", PermissionDenied(
                    "this enrolment code was issued to another reviewer; it is void now, ask an admin for a new one",
                    reason="ENROLMENT_CODE_WRONG_REVIEWER"), principal_id=claimed.principal_id)
            current = rows.get(claimed.principal_id)
            assert current is not None  # principals are disabled, never deleted
            try:
                check_standing(current, now=tx.now)
            except ClipstoreError as exc:
                raise tx.deny(caller, "enrolment.deny", exc, principal_id=current.id) from None
            if wrapped:
                rows.set_totp_secret(current.id, wrapped)
                # A new secret is asked for when the old one may be known to someone else (a lost phone): the
                # sessions it opened, and their grants, end with it, as they do when a reviewer is disabled.
                sessions = self._ports.sessions(tx)
                sessions.end_sessions(reviewer_id=current.id)
                sessions.void_grants(reviewer_id=current.id)
            if api_key:
                overlap = self._key_overlap_s if purpose is Purpose.ROTATE_API_KEY else 0.0
                rows.rotate_key(current.id, hash_api_key(api_key), now=tx.now, retires_at=tx.now + overlap)
            tx.audit(Actor(id=current.id, role="reviewer", request_id=request_id).record(
                "enrolment.redeem", reason=str(purpose), principal_id=current.id))
            return self._factors(current, purpose, api_key, secret)
        return self._ports.ledger.run(unit)

    @staticmethod
    def _factors(reviewer: Principal, purpose: Purpose, api_key: str, secret: bytes) -> Factors:
        if not secret:
            return Factors(reviewer_id=reviewer.id, purpose=purpose, api_key=api_key)
        return Factors(reviewer_id=reviewer.id, purpose=purpose, api_key=api_key, totp_secret=secret_base32(secret),
                       provisioning_uri=provisioning_uri(secret, account_name=f"{reviewer.name} ({reviewer.id})"))

    def _deny(self, caller: Actor, error: ClipstoreError, reviewer_id: str) -> NoReturn:
        """Record a refusal found before any unit ran (its own unit), then raise it."""
        deny_alone(self._ports.ledger, caller, "enrolment.deny", error, principal_id=reviewer_id)
