"""The plain rows the domain and the store exchange: frozen dataclasses, no SQL and no I/O.

The store (`clipstore.store.*`) builds them from its queries and writes them back;
the domain (`clipstore.review`, `clipstore.accounts`, ...) reads them without
loading a database driver.
"""

from __future__ import annotations

from dataclasses import dataclass

# Accounts and clips

@dataclass(frozen=True, kw_only=True)
class AccountRow:
    account_ref: str
    allow_review: bool
    retention_days: int | None


@dataclass(frozen=True, kw_only=True)
class ClipRow:
    clip_id: str
    account_ref: str
    size_bytes: int
    sealed_bytes: int
    content_type: str
    locale: str
    device_type: str
    duration_ms: int
    captured_at: float | None
    wake_word: bool
    created_at: float
    expires_at: float
    key_version: int
    wrapped_dek: bytes
    identity_ct: bytes


# The review workflow: reviewers, sessions, queue, assignments, grants, watermarks, escalations

@dataclass(frozen=True, kw_only=True)
class ReviewerRow:
    principal_id: str
    locales: tuple[str, ...]
    wrapped_totp_secret: bytes | None  # None until the reviewer redeems their enrolment code
    last_totp_step: int
    failed_attempts: int
    locked_until: float
    lockouts: int


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
class QueuedClip:
    """One joined read: a queue entry, its clip's review-relevant fields and its account's preference."""

    queue: QueueRow
    clip_exists: bool
    wake_word: bool
    expires_at: float
    allow_review: bool
    duration_ms: int
    content_type: str

    def eligible(self, now: float) -> bool:
        """Never reviewable: deleted, expired, no wake word (accidental activation), opted out."""
        return self.clip_exists and self.wake_word and self.expires_at > now and self.allow_review


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
class GrantTarget:
    """One joined read for RequestGrant: the assignment, the grants issued for it so far, and its clip in
    the queue (None once it left the queue)."""

    assignment: AssignmentRow
    grants: int
    queued: QueuedClip | None


@dataclass(frozen=True, kw_only=True)
class RedeemRows:
    """One joined read for a redemption: the grant, its clip, whether the grant's assignment still
    exists, whether the clip's account allows review, and whether the caller is enabled."""

    reviewer_enabled: bool
    grant: GrantRow | None
    clip: ClipRow | None
    assignment_exists: bool
    account_allows_review: bool


@dataclass(frozen=True, kw_only=True)
class WatermarkRow:
    """A watermarked fetch: the id embedded in the audio, and whose copy it was."""

    watermark_id: str
    grant_id: str
    reviewer_id: str  # the principal id: the pseudonym the audit log knows, never a name
    clip_id: str
    review_clip_id: str
    fetched_at: float


@dataclass(frozen=True, kw_only=True)
class EscalationRow:
    escalation_id: str
    review_clip_id: str
    clip_id: str
    category: int
    note_ct: bytes
    created_at: float
    resolved_at: float | None
    resolution_ct: bytes | None


# Principals (services and people) and their keys

@dataclass(frozen=True, kw_only=True)
class Principal:
    id: str
    name: str
    role: str
    disabled: bool = False
    expires_at: float | None = None  # None: never
    spiffe_id: str | None = None  # the certificate identity that names this principal, if any
    created_at: float = 0.0


@dataclass(frozen=True, kw_only=True)
class KeyMatch:
    """The principal an API key belongs to, and until when the key works (None: it is the current key)."""

    principal: Principal
    retires_at: float | None


@dataclass(frozen=True, kw_only=True)
class PrincipalListing:
    principal: Principal
    usable_keys: int  # keys that still authenticate now (the current one and any in their overlap)


# Self-enrolment codes

@dataclass(frozen=True, kw_only=True)
class CodeRow:
    principal_id: str
    purpose: str
    expires_at: float
    redeemed_at: float | None
